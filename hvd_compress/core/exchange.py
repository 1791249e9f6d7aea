"""Per-tensor bookkeeping shared by every frontend: the glue between a tensor on one rank
and the bytes a collective moves.

An :class:`Exchange` owns the pipeline's state for each tensor *name* (never keyed by
tensor identity: frameworks make new gradient tensors every step), the step counters that
key the private random streams, and the telemetry. A frontend calls :meth:`begin` with a
tensor, moves ``outgoing.wire`` with whatever collective it has (an allreduce when
``outgoing.by_allreduce``, an allgather otherwise), and hands the result to
:meth:`finish_allreduced` or :meth:`finish_gathered`, which return the update to apply.

State, step counters and telemetry live in Python here. A frontend whose steps are traced
once and run many times (TensorFlow graphs) overrides :meth:`next_step`,
:meth:`load_state`, :meth:`commit_state` and :meth:`log` to keep them in variables.
"""
from __future__ import annotations

import time
from typing import NamedTuple

from ..errors import HvdCompressError
from .ops import ITEMSIZE, backend_for
from .payload import pack, split_gathered
from .pipeline import resolve_pipeline
from .rng import Key
from .telemetry import Record, Telemetry


class Outgoing(NamedTuple):
    name: str
    step: int
    wire: object          # what to hand to the collective
    by_allreduce: bool    # summable payload values (allreduce) or packed bytes (allgather)
    payload: object       # the local payload (a template for the received ones)
    codec: object         # the compressor that produced it
    shape: tuple
    dtype: str
    proposal: object      # dynamic:agree=true: this rank's k for the next step, to average


class Exchange:
    """State, step counters and telemetry for every tensor a frontend compresses.

    Args:
      pipeline: spec string, compressor or Pipeline.
      seed: mixed into every stochastic draw with (rank, name, step).
      allreduce_dtypes: payload value dtypes the frontend's allreduce can sum; summable
        payloads of other dtypes are gathered instead.
      measure_error: also record each step's relative compression error
        ||C(v) - v||^2 / ||v||^2 (costs two passes and a host sync per tensor).
    """

    def __init__(self, pipeline, seed: int = 0,
                 allreduce_dtypes=("float16", "float32", "float64"), measure_error=False):
        self.pipeline = resolve_pipeline(pipeline)
        self.seed = int(seed)
        self.measure_error = bool(measure_error)
        self.allreduce_dtypes = tuple(allreduce_dtypes)
        self.telemetry = Telemetry()
        self.states: dict[str, object] = {}
        self.steps: dict[str, int] = {}
        self.levels: dict[str, int] = {}  # agreed k per tensor (dynamic:agree=true)

    def begin(self, bk, name: str, tensor, rank, step=None, dense=None) -> Outgoing:
        """Compress ``tensor`` (this rank's gradient called ``name``) for the wire.

        ``step`` is the step counter already drawn with :meth:`next_step` (drawn here when
        None). ``dense`` forces the warm-up phase on or off where the step is a graph
        tensor and Python cannot compare it (see :meth:`Pipeline.encode`)."""
        if name is None:
            raise HvdCompressError(
                f"{self.pipeline.spec()} needs each tensor's name to keep its state apart")
        if step is None:
            step = self.next_step(name)
        t0 = time.perf_counter()
        flat = bk.flatten(tensor)
        state = self.load_state(bk, name, flat)
        payload, codec, state, error, proposal = self.pipeline.encode(
            bk, flat, state, Key(self.seed, rank, name, step), measure=self.measure_error,
            level=self.levels.get(name), dense=dense)
        self.states[name] = state
        by_allreduce = codec.summable and payload.values is not None and \
            bk.dtype(payload.values) in self.allreduce_dtypes
        if by_allreduce:
            wire = payload.values
            nbytes = bk.size(wire) * ITEMSIZE[bk.dtype(wire)]
        else:
            wire = pack(bk, payload)
            nbytes = bk.size(wire)
        d = bk.size(flat)
        self.log(step, name, nbytes, payload.count, d, 8 * d * ITEMSIZE[bk.dtype(tensor)],
                 time.perf_counter() - t0, error)
        return Outgoing(name, step, wire, by_allreduce, payload, codec, bk.shape(tensor),
                        bk.dtype(tensor), proposal)

    # -- where state, step counters and telemetry live (frontends may override) ---------
    def next_step(self, name: str):
        """This tensor's step number (0, 1, ...), advancing the counter."""
        step = self.steps.get(name, 0)
        self.steps[name] = step + 1
        return step

    def load_state(self, bk, name: str, flat):
        """The pipeline state of ``name`` before this step (fresh on its first step)."""
        state = self.states.get(name)
        return self.pipeline.init(bk, flat) if state is None else state

    def commit_state(self, name: str, state):
        """Called with the state after decoding; it is already in ``self.states``."""

    def log(self, step, name, nbytes, count, numel, dense_bits, seconds, error):
        self.telemetry.record(Record(
            step=int(step), name=name, bits=8 * int(nbytes), count=int(count), numel=numel,
            dense_bits=dense_bits, seconds=seconds,
            error=None if error is None else float(error)))

    def agree(self, name: str, mean_proposal: float):
        """Record the average over ranks of this step's proposals: next step's k."""
        self.levels[name] = max(1, int(round(float(mean_proposal))))

    def finish_allreduced(self, bk, out, outgoing: Outgoing, n: int, summed: bool):
        """The update from an allreduce of ``outgoing.wire`` (a sum if ``summed``, else the
        average), shaped like the input; a sum stays a sum."""
        mean = outgoing.codec.decode_flat(bk, outgoing.payload._replace(values=out))
        if summed:
            mean = mean * (1.0 / n)
        return self._decode(bk, mean, outgoing, n if summed else 1)

    def finish_gathered(self, bk, gathered, outgoing: Outgoing, n: int, summed: bool):
        """The update from an allgather of every rank's ``wire`` (the average over ranks, or
        the sum if ``summed``), shaped like the input."""
        parts = split_gathered(bk, gathered, outgoing.payload, n, outgoing.codec.fixed_size)
        mean = outgoing.codec.aggregate(bk, parts) * (1.0 / n)
        return self._decode(bk, mean, outgoing, n if summed else 1)

    def _decode(self, bk, mean, outgoing, scale):
        mean = bk.astype(mean, outgoing.dtype)
        update, state = self.pipeline.decode(bk, mean, self.states[outgoing.name])
        self.states[outgoing.name] = state
        self.commit_state(outgoing.name, state)
        if scale != 1:
            update = update * float(scale)
        return bk.reshape(bk.astype(update, outgoing.dtype), outgoing.shape)

    # -- checkpointing -----------------------------------------------------------------
    def _check_checkpoint(self, sd: dict):
        """Refuse a checkpoint of another pipeline; take its seed."""
        if sd.get("spec") != self.pipeline.spec():
            raise HvdCompressError(
                f"checkpoint was written with compression {sd.get('spec')!r}, "
                f"this run uses {self.pipeline.spec()!r}")
        self.seed = int(sd["seed"])

    def state_dict(self) -> dict:
        """Everything needed to resume exactly; tensors stay tensors (torch.save-able)."""
        return {"spec": self.pipeline.spec(), "seed": self.seed, "steps": dict(self.steps),
                "levels": dict(self.levels),
                "states": {k: (None if s is None else s._asdict())
                           for k, s in self.states.items()}}

    def load_state_dict(self, sd: dict):
        self._check_checkpoint(sd)
        self.steps = dict(sd["steps"])
        self.levels = dict(sd.get("levels", {}))
        self.states = {}
        for name, fields in sd["states"].items():
            if fields is None:
                self.states[name] = None
                continue
            like = fields[_first_tensor(fields)]
            template = self.pipeline.init(backend_for(like), like)
            self.states[name] = template._replace(**fields)


def _first_tensor(fields: dict) -> str:
    for k, v in fields.items():
        if hasattr(v, "shape"):
            return k
    raise HvdCompressError("checkpointed state holds no tensor")
