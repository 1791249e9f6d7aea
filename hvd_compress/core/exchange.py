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

import math
import time
from typing import Any, NamedTuple

from ..errors import HvdCompressError
from .auto import (
    CAST_HEADROOM,
    DENSE,
    HEADROOM_BITS,
    SHIFT_CLAMP,
    Auto,
    Costs,
    Route,
    cast_from_wire,
    cast_shift,
    cast_to_wire,
)
from .compressor import check_int
from .ops import ITEMSIZE, backend_for
from .payload import FLAG_NONFINITE, Stamp, pack, raise_for_verdict, split_gathered
from .pipeline import Undo, resolve_pipeline
from .rng import Key
from .telemetry import Record, Telemetry

NONFINITE = ("propagate", "raise")


class Outgoing(NamedTuple):
    """What :meth:`Exchange.begin` hands a frontend. ``payload`` and ``codec`` are None on
    auto's dense and cast routes (``dense_route``); tensors are any backend's, hence
    ``Any``."""
    name: str
    step: Any             # an int, or a step-counter tensor inside a graph
    wire: Any             # what to hand to the collective
    by_allreduce: bool    # summable payload values (allreduce) or packed bytes (allgather)
    payload: Any          # the local Payload (a template for the received ones)
    codec: Any            # the Compressor that produced it
    shape: tuple
    dtype: str
    prior: Any = None     # the pipeline state before this step (kept if the step is void)
    stamp: Stamp = Stamp()  # this rank's fingerprints, which every received header must match
    dense_route: bool = False  # auto sent the tensor as it is or cast, by an allreduce
    into: Any = None      # the flat input, whose memory the average may take (overwrite)
    # auto's cast route: the payload is float16(x * 2**shift) (inside a graph, an int32
    # tensor shift)
    shift: Any = None
    source: Any = None    # ... and x, for a resend (see resend_dense); where ``into`` is
    #                       x too, x was scaled in its memory and the update goes there
    undo: tuple = ()      # state entries this step overwrote in place (pipeline.Undo)
    flushed: Any = None   # a resend of a cast whose sum held zeros only: that cast's shift


class Exchange:
    """State, step counters and telemetry for every tensor a frontend compresses.

    Args:
      pipeline: spec string, compressor or Pipeline.
      seed: mixed into every stochastic draw with (rank, name, step).
      allreduce_dtypes: payload value dtypes the frontend's allreduce can sum; summable
        payloads of other dtypes are gathered instead.
      measure_error: also record each step's compression error ||C(v) - v||^2, relative
        to ||v||^2 and absolute (costs two passes and a host sync per tensor); see
        :meth:`Telemetry.summed_error`.
      nonfinite: what a NaN or an infinity in any rank's tensor does. ``"propagate"``
        (the default) behaves like dense Horovod: every rank gets a NaN update for that
        tensor at that step (so loss scalers skip it) and the step leaves the feedback
        state as it was; ``"raise"`` raises :class:`HvdCompressError` on every rank,
        naming the tensor and the ranks.
      transport: how payloads travel ("horovod", "mpi4py", ...); part of the fingerprint
        every payload header carries, so ranks that move payloads differently fail loudly.
      model_size: entries of the whole model, which ``perturb`` spreads its noise over
        (frontends set ``exchange.model_size`` from the parameters they are bound to).

    Every rank takes the same branch: a rank whose tensor is not finite says so in its
    payload header (its payload has the usual size: it is built from the tensor as it is,
    or with those entries zeroed where encoding reads values on the host), and every rank
    decides from the same gathered headers. On an accelerator, where every rank's payload
    has the same size, the headers, indices and the average are checked on the device and
    read once per tensor and step (``split_gathered(..., defer=True)``): nothing else
    waits. On a CPU, where a read costs nothing, they are checked on the host.
    """

    def __init__(self, pipeline, seed: int = 0,
                 allreduce_dtypes=("float16", "float32", "float64"), measure_error=False,
                 nonfinite: str = "propagate", transport: str = "horovod", model_size=None):
        self.pipeline = resolve_pipeline(pipeline)
        if nonfinite not in NONFINITE:
            raise HvdCompressError(f"nonfinite={nonfinite!r} must be one of {NONFINITE}")
        self.nonfinite, self.transport = nonfinite, str(transport)
        self.rank: int | None = None        # this rank, once known
        self.world_size: int | None = None  # and the group size
        self.seed = int(seed)
        self.measure_error = bool(measure_error)
        self.allreduce_dtypes = tuple(allreduce_dtypes)
        self.telemetry = Telemetry()
        self.states: dict[str, Any] = {}  # name -> feedback state (a NamedTuple) or None
        self.steps: dict[str, int] = {}
        # auto (see core/auto.py): the measured costs and the gradients' profiles every
        # rank agrees on, this rank's own profiles while ``profiling`` (both: name ->
        # (d, dtype, floats), the floats summed over the ranks in the agreed ones), and
        # every tensor's route under them (planned together, once per measurement)
        self._auto = self.pipeline.policy if isinstance(self.pipeline.policy, Auto) else None
        self._costs: Costs | None = None
        self._profiles: dict[str, tuple] = {}
        self.profiling = False
        self.local_profiles: dict[str, tuple] = {}
        self._routes: dict[tuple, Route] | None = None
        self._cast_seen: dict[tuple, float] = {}  # cast -> its first sum's largest entry
        self.model_size = None if model_size is None else \
            check_int("exchange", "model_size", model_size, 1)
        self._spec: str | None = None          # the pipeline's spec, once asked for
        self._stamps: dict[tuple, Stamp] = {}  # the fingerprints of each tensor, once made
        self._loaded: set[str] = set()  # states loaded whose size no step has checked yet
        self._spare: dict[str, Any] = {}  # name -> memory for its next state (_released)
        self._handed_out: set[int] = set()  # ids of state tensors a state_dict returned
        # whether encoding reads values on the host (level policies, data-sized payloads):
        # such pipelines, and every pipeline on a CPU, see a non-finite tensor with those
        # entries zeroed; the others, on an accelerator, encode it as it is (the header
        # says the step is void) and never wait for the device to say whether it is finite
        self._reads_values = not (self.pipeline.compressor.fixed_size and (
            self.pipeline.policy is None or isinstance(self.pipeline.policy, Auto)))
        # a cast alone (no feedback state, no level, no noise): a NaN or an infinity
        # travels as itself and the allreduced sum shows it on every rank, so where the
        # cast is summed nothing checks the tensor before it is sent
        p = self.pipeline
        self._cast_wire = getattr(p.compressor, "wire_dtype", False) \
            if p.feedback is None and p.policy is None and p.perturbation is None else False

    @property
    def costs(self) -> Costs | None:
        """The costs auto plans by, every rank's alike (None until measured)."""
        return self._costs

    @costs.setter
    def costs(self, costs: Costs | None):
        self._costs, self._routes, self._cast_seen = costs, None, {}

    @property
    def profiles(self) -> dict:
        """name -> (entries, dtype, the sum over ranks of auto's profile of that tensor:
        see :meth:`hvd_compress.core.auto.Auto.profile`); a copy (set them whole)."""
        return dict(self._profiles)

    @profiles.setter
    def profiles(self, profiles: dict):
        self._profiles, self._routes, self._cast_seen = dict(profiles), None, {}

    def route(self, name: str, d: int, dtype: str) -> Route:
        """auto's plan for tensor ``name`` under the agreed costs and profiles: every
        profiled tensor's is made together once per measurement
        (:meth:`hvd_compress.core.auto.Auto.plan`), any other's alone from the costs
        (dense, or top-k at the spec's k)."""
        assert self._auto is not None

        def plan(tensors):
            return self._auto.plan(tensors, self.pipeline.compressor, self._costs,
                                   self.allreduce_dtypes, self.pipeline.feedback is not None)
        if self._routes is None:
            self._routes = {(n, *self._profiles[n][:2]): r
                            for n, r in plan(self._profiles).items()}
        key = (name, d, dtype)
        route = self._routes.get(key)
        if route is None:
            route = self._routes[key] = plan({name: (d, dtype, None)})[name]
        return route

    def begin(self, bk, name: str, tensor, rank, step=None, dense=None,
              gather=None, overwrite: bool = False, level=None) -> Outgoing:
        """Compress ``tensor`` (this rank's gradient called ``name``) for the wire.

        ``step`` is the step counter already drawn with :meth:`next_step` (drawn here when
        None). ``dense`` forces the warm-up phase on or off where the step is a graph
        tensor and Python cannot compare it (see :meth:`Pipeline.encode`). ``gather`` is
        the frontend's allgather of a float64 row, which ``dynamic:agree=true`` uses to
        settle this step's k with the other ranks (see :meth:`Pipeline.encode`).
        ``overwrite``: ``tensor``'s memory belongs to the exchange until the update
        (Horovod's PyTorch optimizer overwrites the gradient with the average anyway):
        the average of sparse payloads may be written there, which saves a tensor of its
        size per step, and auto's cast scales the tensor there (it holds the scaled
        gradient until the update is written back; a step that fails in between leaves
        it so). Nothing else keeps a reference to it: payload values are gathered copies,
        feedback states other tensors. ``level``: inside a graph, auto's top-k route at
        the planned k (:meth:`Auto.codec`), which the frontend reads from its plan
        (eagerly the exchange plans it itself)."""
        if name is None:
            raise HvdCompressError(
                f"{self.pipeline.spec()} needs each tensor's name to keep its state apart")
        if step is None:
            step = self.next_step(name)
        self.rank = rank
        t0 = time.perf_counter()
        if bk.size(tensor) == 0:  # nothing to compress (its shape is every rank's alike)
            return self._begin_dense(bk, name, tensor, step, t0, None, False)
        if self._auto is not None and bk.eager():
            d, dtype = bk.size(tensor), bk.dtype(tensor)
            if self.profiling:
                self.local_profiles[name] = (d, dtype, self._auto.profile(
                    bk, bk.flatten(tensor), self.pipeline.compressor))
            route = self.route(name, d, dtype)
            if route.kind != "topk":
                return self._begin_dense(bk, name, tensor, step, t0,
                                         route.shift if route.kind == "cast" else None,
                                         overwrite)
            level = self._auto.codec(route.k, self.pipeline.compressor)
        flat = bk.flatten(tensor)
        if self._cast_wire is not False and \
                (self._cast_wire or bk.dtype(flat)) in self.allreduce_dtypes:
            finite, zeroed = True, False  # the summed cast carries it
        else:
            finite = bk.finite_flag(flat)  # stays on the device where nothing branches on it
            zeroed = not bk.eager() or self._reads_values or not bk.avoids_syncs(flat)
        if zeroed:  # a read on the host, which costs nothing on a CPU
            finite = bool(finite) if bk.eager() else finite  # no-op where already a bool
            flat = bk.cond(finite, lambda: flat, lambda: bk.finite_or_zero(flat))
        prior = self.load_state(bk, name, flat)
        if name in self._loaded:  # a checkpoint's state meets its gradient
            self._loaded.discard(name)
            _check_fits(bk, name, prior, flat)
        undo: list | None = [] if bk.mutable else None
        payload, codec, state, error = self.pipeline.encode(
            bk, flat, prior, Key(self.seed, rank, name, step), measure=self.measure_error,
            gather=gather, dense=dense, model_size=self.model_size, level=level,
            owned=overwrite, undo=undo, spare=self._spare.pop(name, None))
        self.states[name] = state
        by_allreduce = codec.summable and payload.values is not None and \
            bk.dtype(payload.values) in self.allreduce_dtypes
        stamp = self.stamp(name, bk.shape(tensor), bk.dtype(tensor))
        if by_allreduce:
            wire = payload.values
            if zeroed:  # NaN stands for the zeroed entries in the sum
                wire = bk.cond(finite, lambda: wire, lambda: bk.nan_like(wire))
            elif bk.size(wire) != bk.size(flat):  # ... and for those a shared mask missed
                wire = bk.where(finite, wire, bk.nan_like(wire))
            if bk.size(wire) == bk.size(flat):  # in the tensor's shape: Horovod checks it
                wire = bk.reshape(wire, bk.shape(tensor))
            nbytes = bk.size(wire) * ITEMSIZE[bk.dtype(wire)]
        else:
            wire = pack(bk, payload, stamp, _flags(bk, finite))
            nbytes = bk.size(wire)
        d = bk.size(flat)
        self.log(step, name, nbytes, payload.count, d, 8 * d * ITEMSIZE[bk.dtype(tensor)],
                 time.perf_counter() - t0, error)
        # the average of sparse or quantized payloads may take the flat tensor's memory
        # (the input's own, or a copy the flattening or the zeroing made)
        into = flat if overwrite and codec.decodes_into and not by_allreduce else None
        return Outgoing(name, step, wire, by_allreduce, payload, codec, bk.shape(tensor),
                        bk.dtype(tensor), prior, stamp, into=into, undo=tuple(undo or ()))

    def begin_dense(self, bk, name: str, tensor, step, shift=None) -> Outgoing:
        """auto's dense and cast routes inside a graph, where the frontend reads the plan
        (see :meth:`begin`): the tensor goes by allreduce as it is, or (``shift``, an
        int32 tensor) scaled by 2**shift and cast to float16."""
        return self._begin_dense(bk, name, tensor, step, time.perf_counter(), shift, False)

    def _begin_dense(self, bk, name, tensor, step, t0, shift,
                     overwrite: bool) -> Outgoing:
        """auto's dense and cast routes: the tensor itself travels by allreduce, exactly
        as Horovod sends it uncompressed (no copy, no pass over it, unless its entries
        are not in order in memory: then a copy that is), or (``shift`` not
        None) scaled by 2**shift and cast to float16, as Horovod's ``Compression.fp16``
        sends it but inside float16's range. With ``overwrite`` (and a contiguous
        tensor) the scaling happens in the tensor's memory, where the update is written
        back at the end (Horovod's in-place allreduce takes that memory too): no float32
        tensor of its size is made, and the scaled cast is the one pass Horovod's own
        cast is. The feedback state waits untouched for the next top-k step (EF14's
        residual is still what was not sent)."""
        d, dtype = bk.size(tensor), bk.dtype(tensor)
        in_place = overwrite and shift is not None and bk.contiguous(tensor)
        wire = bk.in_order(tensor) if shift is None else \
            cast_to_wire(bk, tensor, shift, in_place)
        nbytes = d * ITEMSIZE[bk.dtype(wire)]
        self.log(step, name, nbytes, d, d, 8 * d * ITEMSIZE[dtype],
                 time.perf_counter() - t0, None)
        return Outgoing(name, step, wire, True, None, None, bk.shape(tensor), dtype,
                        None, self.stamp(name, bk.shape(tensor), dtype), dense_route=True,
                        shift=shift, source=None if shift is None else tensor,
                        into=tensor if in_place else None)

    def resend_dense(self, bk, sum_, outgoing: Outgoing):
        """The cast route's fallback: None where the float16 sum is finite and not all
        zeros; else, since every rank holds the same sum and so decides alike, the
        Outgoing that sends the tensor again as it is, in its own dtype (the sum
        overflowed float16, or some rank's gradient is not finite, which the dense sum
        then shows; or it holds zeros only: the gradient fell below float16's range, or
        is zero, and the dense sum tells which, see :meth:`rescale_flushed`). A tensor
        scaled in its memory is scaled back there first (exactly: a power of two; only
        an entry of 2^(128 - shift) or more overflowed float32 when scaled, and goes as
        infinite). The sum's extremes also set the next steps' scale (see
        :meth:`_follow_scale`). Costs one read of two numbers per cast tensor and step
        (a wait on an accelerator). The resend's bits are logged as a row of its own
        (count 0, no dense bits: the tensor was counted once)."""
        if outgoing.shift is None:
            return None
        lo, hi = bk.extremes(sum_)
        finite = math.isfinite(lo) and math.isfinite(hi)
        if finite and max(-lo, hi) == 0.0:
            return self.resent(bk, outgoing)._replace(flushed=outgoing.shift)
        self._follow_scale(outgoing, bk.size(sum_), finite, max(-lo, hi) if finite else 0.0)
        return None if finite else self.resent(bk, outgoing)

    def rescale_flushed(self, bk, sum_, resend: Outgoing, ranks: int):
        """After a cast whose float16 sum held zeros only was sent again (``resend``, from
        :meth:`resend_dense`): the next steps' scale from that dense ``sum_`` (the
        average over ``ranks`` ranks where ``ranks`` > 1), which every rank holds alike.
        Where it is zero too the gradient is zero, and the scale stays; else the
        gradient fell below float16's range since the plan, and the scale is planned
        afresh from the largest entry (:func:`~hvd_compress.core.auto.cast_shift`, the
        sum over ranks), as a measurement would (the first sum the scale then follows is
        the next one)."""
        if resend.flushed is None:
            return
        lo, hi = bk.extremes(sum_)
        largest = max(-lo, hi) * ranks
        key = (resend.name, bk.size(sum_), resend.dtype)
        route = self._cast_at(key, resend.flushed)
        if route is not None and math.isfinite(largest) and largest > 0.0:
            self._cast_seen.pop(key, None)
            self._rescale(key, route, cast_shift(largest))

    def resent(self, bk, outgoing: Outgoing) -> Outgoing:
        """The Outgoing that sends a cast's tensor again as it is, in its own dtype (see
        :meth:`resend_dense`; inside a graph the frontend decides when, on the same
        sum)."""
        source = outgoing.source
        if outgoing.into is not None and outgoing.shift is not None:  # scaled in place
            source = bk.mul_(source, bk.power_of_two(-outgoing.shift))
        d = bk.size(source)
        self.log(outgoing.step, outgoing.name, d * ITEMSIZE[outgoing.dtype], 0, d, 0, 0.0,
                 None)
        return outgoing._replace(wire=source, source=None, shift=None, into=None)

    def _follow_scale(self, outgoing: Outgoing, d: int, finite: bool, largest: float):
        """The cast's scale for the next steps, from this step's float16 sum (the same
        on every rank, so every rank changes it alike): 2^10 smaller after an overflow
        (the gradient grew past the headroom, or a rank's was not finite); larger by the
        power of two that brings the sum's largest entry back to the first one seen
        since the plan, once it is 2^10 below it (the gradient shrank, and float16
        would flush its small entries). A scale past the clamp sends the tensor dense
        until the next measurement. ``largest`` > 0 where ``finite``: a sum of zeros
        only goes to :meth:`rescale_flushed`."""
        key = (outgoing.name, d, outgoing.dtype)
        route = self._cast_at(key, outgoing.shift)
        if route is None:
            return
        if not finite:
            self._rescale(key, route, route.shift - HEADROOM_BITS)
            return
        first = self._cast_seen[key] = self._cast_seen.get(key) or largest
        if largest * 2.0 ** HEADROOM_BITS < first:
            self._rescale(key, route, route.shift + math.frexp(first / largest)[1] - 1)

    def _cast_at(self, key, sent):
        """The plan's cast route of tensor ``key`` (name, entries, dtype) if it still
        casts at the scale ``sent`` was sent at (else None: a later measurement planned
        it anew, and this step's sum moves nothing)."""
        route = None if self._routes is None else self._routes.get(key)
        return route if route is not None and route.kind == "cast" and \
            route.shift == sent else None

    def _rescale(self, key, route: Route, shift: int):
        """The cast ``route`` of ``key`` at the scale 2**shift from the next step on
        (dense until the next measurement past the clamp)."""
        assert self._routes is not None
        self._routes[key] = route._replace(shift=shift) if abs(shift) < SHIFT_CLAMP \
            else DENSE

    def stamp(self, name: str, shape, dtype: str) -> Stamp:
        """This rank's fingerprints for tensor ``name`` (see :class:`Stamp`), computed once
        per name, shape, dtype and seed."""
        key = (name, tuple(int(s) for s in shape), dtype, self.seed)
        stamp = self._stamps.get(key)
        if stamp is None:
            if self._spec is None:
                self._spec = self.pipeline.spec()
            stamp = self._stamps[key] = Stamp.of(
                self._spec, name, shape, dtype, self.seed,
                f"{self.transport}/nonfinite={self.nonfinite}")
        return stamp

    def describe(self, shape, dtype: str) -> str:
        """This rank's configuration of a tensor, as the fingerprint checks name it when
        ranks disagree."""
        return (f"spec {self.pipeline.spec()!r}, seed {self.seed}, shape "
                f"{tuple(shape)}, dtype {dtype}, transport {self.transport}, "
                f"nonfinite={self.nonfinite!r}")

    # -- where state, step counters and telemetry live (frontends may override) ---------
    def next_step(self, name: str):
        """This tensor's step number (0, 1, ...), advancing the counter."""
        step = self.steps.get(name, 0)
        self.steps[name] = step + 1
        return step

    def step_counts(self, names) -> list:
        """How many steps each of ``names`` has taken (read on the host)."""
        return [int(self.steps.get(n, 0)) for n in names]

    def load_state(self, bk, name: str, flat):
        """The pipeline state of ``name`` before this step (fresh on its first step)."""
        state = self.states.get(name)
        return self.pipeline.init(bk, flat) if state is None else state

    def commit_state(self, name: str, state):
        """Called with the state after decoding; it is already in ``self.states``."""

    def log(self, step, name, nbytes, count, numel, dense_bits, seconds, error):
        """One telemetry row; ``error`` is (relative, absolute) or None."""
        self.telemetry.record(Record(
            step=int(step), name=name, bits=8 * int(nbytes), count=int(count), numel=numel,
            dense_bits=dense_bits, seconds=seconds,
            error=None if error is None else float(error[0]),
            error_sq=None if error is None else float(error[1])))

    def finish_allreduced(self, bk, out, outgoing: Outgoing, n: int, summed: bool):
        """The update from an allreduce of ``outgoing.wire`` (a sum if ``summed``, else the
        average), shaped like the input; a sum stays a sum."""
        self.world_size = n
        if outgoing.dense_route:  # Horovod's own result, as uncompressed Horovod returns it
            if self.nonfinite == "raise" and not bk.eager():  # checked when the step runs
                bad = bk.tf.logical_not(bk.all_finite(out))
                with bk.tf.control_dependencies([self._refuse_in_graph(bk, outgoing.name, bad,
                                                                       None)]):
                    out = bk.tf.identity(out)
            elif self.nonfinite == "raise" and not bk.all_finite(out):
                self._refuse_nonfinite(outgoing.name, outgoing.step, None, outgoing.shift)
            if outgoing.shift is not None:
                out = cast_from_wire(bk, out, outgoing.dtype, outgoing.shift, outgoing.into)
            return bk.reshape(out, outgoing.shape)
        out = bk.flatten(out)
        mean = outgoing.codec.decode_flat(bk, outgoing.payload._replace(values=out))
        if summed:
            mean = mean * (1.0 / n)
        # a rank's NaN reached every rank through the sum; only state and 'raise' need to know
        void: Any = False
        if self.pipeline.feedback is not None or self.nonfinite == "raise":
            void = not bk.all_finite(out) if bk.eager() else \
                bk.tf.logical_not(bk.all_finite(out))
        # the mean is the caller's ``out`` itself where decoding needed no new tensor (a
        # cast to the dtype it has): then the update must not take its memory
        return self._decode(bk, mean, outgoing, n if summed else 1, void, None,
                            owned=mean is not out)

    def finish_gathered(self, bk, gathered, outgoing: Outgoing, n: int, summed: bool):
        """The update from an allgather of every rank's ``wire`` (the average over ranks, or
        the sum if ``summed``), shaped like the input. Every rank's header is checked
        against this rank's payload and fingerprints first; where one is refused, every
        rank raises and keeps the state it had before this step (the gradient handed to
        :meth:`begin` with ``overwrite`` may hold a partial sum then)."""
        self.world_size = n
        try:
            parts, flags = split_gathered(bk, gathered, outgoing.payload, n,
                                          outgoing.codec.fixed_size, outgoing.stamp,
                                          outgoing.name, defer=bk.avoids_syncs(gathered))
            mean, finite = outgoing.codec.mean(bk, parts, n, outgoing.into)  # overflow?
            if bk.eager() and not isinstance(flags, list):
                # checked on the device: one read for the verdict and the sum's finiteness
                codes = [int(c) for c in bk.to_numpy(bk.concat(
                    [flags, bk.reshape(bk.astype(finite, "int64"), (1,))]))]
                flags, finite = codes[:n], codes[n]
                raise_for_verdict(bk, flags, gathered, outgoing.payload, n, outgoing.stamp,
                                  outgoing.name)
        except HvdCompressError:
            if bk.eager():
                self._restore(bk, outgoing)
            raise
        if bk.eager():
            finite = bool(finite)
            ranks = [r for r, f in enumerate(flags) if f & FLAG_NONFINITE]
            bad = bool(ranks) or not finite
        else:
            tf = bk.tf
            ranks = flags
            bad = tf.logical_or(tf.reduce_any(flags > 0), tf.logical_not(finite))
        return self._decode(bk, mean, outgoing, n if summed else 1, bad, ranks)

    def finish_merged(self, bk, merged, outgoing: Outgoing, n: int, summed: bool):
        """The update from the tree transport (gTop-k, :mod:`hvd_compress.core.gtopk`):
        ``merged`` (a :class:`~hvd_compress.comm.tree.Merged`) holds the merged sum every
        rank received, what the merges on this rank dropped (it joins this rank's EF14
        residual) and the status every rank received with it."""
        self.world_size = n
        name = outgoing.name
        if merged.disagree is not None:
            self._restore(bk, outgoing)
            raise HvdCompressError(merged.disagree)
        mean, finite = outgoing.codec.mean(bk, [merged.payload], n)
        bad = bool(merged.nonfinite) or merged.overflow or not bool(finite)
        if not bad:
            for positions, values in merged.leftover:
                self.states[name] = self.pipeline.feedback.absorb(bk, self.states[name],
                                                                  positions, values)
        return self._decode(bk, mean, outgoing, n if summed else 1, bad, merged.nonfinite)

    def _decode(self, bk, mean, outgoing, scale, bad, ranks, owned=True):
        """Apply the feedback rule's decode to the mean, unless the step is void (a rank's
        tensor was not finite): then the state stays as it was before this step and the
        update is NaN, on every rank alike. ``owned``: the mean was made for this step
        (or is the gradient ``begin`` was allowed to overwrite), so the update may take
        its memory."""
        name = outgoing.name
        if bk.eager() and bad:
            self._restore(bk, outgoing)  # first: a caught error leaves state intact
            self._refuse_nonfinite(name, outgoing.step, ranks)
            return bk.nan_like(bk.reshape(bk.astype(mean, outgoing.dtype), outgoing.shape))
        mean = bk.astype(mean, outgoing.dtype)
        update, state = self.pipeline.decode(bk, mean, self.states[name], owned=owned)
        if not bk.eager():  # the same choice, as graph ops
            if self.nonfinite == "raise":
                bad = self._refuse_in_graph(bk, name, bad, ranks)
            state = _select_state(bk, bad, outgoing.prior, state)
            update = bk.where(bad, bk.nan_like(update), update)
        self.states[name] = state
        self._spare[name] = self._released(bk, outgoing.prior, state)
        self.commit_state(name, state)
        if scale != 1:
            update = update * float(scale)
        return bk.reshape(bk.astype(update, outgoing.dtype), outgoing.shape)

    def _released(self, bk, old, new):
        """The state ``old`` less what ``new`` still holds: the tensors the feedback rule
        writes anew each step (:attr:`Feedback.renews`) that no one holds once ``new``
        replaces ``old`` (nor a caller of :meth:`state_dict`), whose memory the next
        step's state may take (the ``spare`` of :meth:`Feedback.encode`); None where
        none is worth keeping (:meth:`~hvd_compress.core.ops.Backend.keeps_memory`)."""
        if old is None or not bk.mutable:
            return None
        held = {id(v) for v in (new or ())}
        free = {}
        for f, v in old._asdict().items():
            kept = f in self.pipeline.feedback.renews and id(v) not in held
            if kept and id(v) in self._handed_out:
                self._handed_out.discard(id(v))  # the caller's now: left to it
                kept = False
            free[f] = v if kept and bk.keeps_memory(v) else None
        return old._replace(**free) if any(v is not None for v in free.values()) else None

    def _restore(self, bk, outgoing: Outgoing):
        """The state as it was before this step (a void or refused step)."""
        Undo.put_back(bk, outgoing.undo)
        self._spare[outgoing.name] = self._released(bk, self.states[outgoing.name],
                                                    outgoing.prior)
        self.states[outgoing.name] = outgoing.prior
        self.commit_state(outgoing.name, outgoing.prior)

    def _refuse_in_graph(self, bk, name, bad, flags):
        """``bad``, through a host check that raises when the step runs and it is true."""
        tf = bk.tf
        flags = tf.zeros([0], tf.uint8) if flags is None else flags

        def check(b, f):
            if b:
                self._refuse_nonfinite(name, None, [int(r) for r in f.nonzero()[0]])
            return b

        return tf.numpy_function(check, [bad, flags], tf.bool, stateful=True,
                                 name="hvd_compress_nonfinite")

    def _refuse_nonfinite(self, name, step, ranks, shift=None):
        if self.nonfinite != "raise":
            return False
        who = f"rank(s) {list(ranks)}" if ranks else "some rank (the allreduced sum is not finite)"
        at = "" if step is None else f" at step {int(step)}"
        cast = "" if shift is None else (
            f" (or it overflowed float16: auto sent it cast, scaled by 2**{shift} from the "
            f"gradients of its last measurement, which leaves room for {CAST_HEADROOM:.0f}x "
            "larger ones; measure more often with auto:every=N)")
        raise HvdCompressError(
            f"gradient {name!r} holds NaN or infinite values on {who}{at}{cast}; with "
            "nonfinite='raise' every rank stops here (nonfinite='propagate' hands every rank "
            "a NaN update instead, as dense Horovod does, so loss scalers can skip the step)")

    # -- checkpointing -----------------------------------------------------------------
    #: Layout of :meth:`state_dict`. Format 1 (no ``format`` key) held spec, seed, steps,
    #: levels and states; format 2 adds ``format``, ``rank`` and ``world_size`` (and no
    #: longer needs levels: agreed k is settled within each step).
    CHECKPOINT_FORMAT = 2

    def set_group(self, rank, world_size):
        """Say which rank of how many this exchange is. Exchanges learn it themselves
        (``begin`` sets ``rank``, ``finish_*`` sets ``world_size``); frontends call this
        before the first one, so a state saved or loaded before any step knows it too."""
        self.rank, self.world_size = int(rank), int(world_size)

    def _checkpoint_header(self) -> dict:
        """How every state_dict starts: its layout, which rank of how many wrote it, and
        the pipeline and seed it belongs to."""
        rank, size = getattr(self, "rank", None), getattr(self, "world_size", None)
        return {"format": self.CHECKPOINT_FORMAT, "rank": None if rank is None else int(rank),
                "world_size": None if size is None else int(size),
                "spec": self.pipeline.spec(), "seed": self.seed, "transport": self.transport}

    def _check_checkpoint(self, sd: dict):
        """Refuse a state this exchange cannot resume from; take its seed.

        The rules, which each rank applies to what it loads (no communication):

        * an unknown ``format`` is refused;
        * a state written with another spec loads where its feedback state carries over:
          the same feedback rule (whatever its parameters, the compressor, the level
          policy or the warm-up), or no feedback state held. Another rule's state is not
          this one's (an EF14 residual is no EF21 estimate), so it is refused;
        * the per-rank part, feedback state (EF residuals, local estimates, shifts), loads
          only on the rank and with the world size that wrote it. A state that does not
          say who wrote it (format 1) is refused when it holds feedback state;
        * a state without feedback state (casts, top-k, rand-k, quantizers without a
          feedback stage, or one whose ``states`` were emptied) holds only step counters,
          which are the same on every rank since every rank exchanges
          every tensor at every step: it loads on any rank and with any world size. The
          random streams still resume exactly: they are keyed by (seed, rank, name,
          step), and the rank is this run's, not the file's.

        An exchange that does not know its rank yet (no exchange ran and no frontend
        called :meth:`set_group`) takes the state's.
        """
        spec, fmt = self.pipeline.spec(), sd.get("format", 1)
        if fmt not in (1, self.CHECKPOINT_FORMAT):
            raise HvdCompressError(
                f"checkpoint format {fmt!r} is unknown to this hvd_compress (it reads 1 and "
                f"{self.CHECKPOINT_FORMAT}): was it written by a newer version?")
        held = sorted(k for k, s in sd["states"].items() if s is not None)
        if held and sd.get("spec") != spec:
            self._check_feedback_carries_over(sd.get("spec"))
        if held:
            saved = (sd.get("rank"), sd.get("world_size"))
            what = f"checkpoint of {spec!r} holds per-rank feedback state for " \
                f"{len(held)} tensor(s) ({', '.join(held[:3])}{', ...' if held[3:] else ''})"
            if None in saved:
                raise HvdCompressError(
                    f"{what} but does not say which rank wrote it (format 1, from before "
                    "hvd_compress recorded ranks); if this rank of this world size wrote "
                    "it, say so and load again: state.update(format=2, rank=..., "
                    "world_size=...)")
            if getattr(self, "rank", None) is None or getattr(self, "world_size", None) is None:
                self.set_group(*saved)
            if saved[1] != self.world_size:
                raise HvdCompressError(
                    f"{what}, written by rank {saved[0]} of {saved[1]}; this run has "
                    f"{self.world_size} ranks. Feedback state does not carry over to another "
                    f"number of ranks (the ranks' estimates only agree with each other): "
                    f"resume on {saved[1]} rank(s), or keep only the step counters by "
                    "loading dict(state, states={})")
            if sd.get("transport", self.transport) != self.transport:
                raise HvdCompressError(
                    f"{what}, keyed for transport {sd['transport']!r}; this run uses "
                    f"{self.transport!r}. Fused buckets and whole-model vectors keep their "
                    "state under their own names, so the state would not reach the tensors "
                    "it belongs to: resume with the same fuse_below=, whole_model= and "
                    "comm= settings")
            if saved[0] != self.rank:
                raise HvdCompressError(
                    f"{what} of rank {saved[0]}, but this is rank {self.rank} (of "
                    f"{self.world_size}): every rank must load its own state. Save one file "
                    "per rank, or one file for all: hvd_compress.checkpoint.gather("
                    "compression) on every rank, and hvd_compress.checkpoint.restore("
                    "compression, gathered) to load this rank's part")
        self.seed = int(sd["seed"])

    def _check_feedback_carries_over(self, saved):
        """Raise unless the feedback state of a checkpoint written with spec ``saved`` is
        of this pipeline's feedback rule."""
        spec = self.pipeline.spec()
        try:
            feedback = resolve_pipeline(saved).feedback
        except HvdCompressError as e:
            raise HvdCompressError(
                f"checkpoint was written with compression {saved!r}, which this version "
                f"cannot read ({e}); this run uses {spec!r}") from e
        mine = self.pipeline.feedback
        if type(feedback) is not type(mine):
            name = lambda f: "no feedback rule" if f is None else f.spec()  # noqa: E731
            raise HvdCompressError(
                f"checkpoint was written with compression {saved!r}, this run uses "
                f"{spec!r}: its feedback state ({name(feedback)}) is not state of "
                f"{name(mine)}. Resume with {name(feedback)}, or keep only the step "
                "counters by loading dict(state, states={})")

    def state_dict(self) -> dict:
        """Everything needed to resume exactly, and who wrote it (see
        :meth:`_check_checkpoint` for where it may be loaded). Tensors stay tensors (the
        live state, which later steps overwrite in place); the rest is ints, floats,
        strings and None, so torch.load(weights_only=True) reads it."""
        # the tensors a step writes anew are no step's spare memory once handed out here
        self._handed_out |= {id(v) for s in self.states.values() for v in (s or ())}
        return {**self._checkpoint_header(), "steps": dict(self.steps),
                "states": {k: (None if s is None else s._asdict())
                           for k, s in self.states.items()}}

    def load_state_dict(self, sd: dict):
        """Resume from a :meth:`state_dict`, if :meth:`_check_checkpoint` allows it here
        (a refused state changes nothing)."""
        self._check_checkpoint(sd)
        self.steps = dict(sd["steps"])
        self.states, self._spare, self._handed_out = {}, {}, set()
        self._loaded = {name for name, fields in sd["states"].items() if fields is not None}
        for name, fields in sd["states"].items():
            if fields is None:
                self.states[name] = None
                continue
            like = fields[_first_tensor(fields)]
            bk = backend_for(like)
            template = self.pipeline.init(bk, like)
            # float fields are constants of this run's rule (DIANA's alpha follows the
            # compressor), the rest is state: copies, since the rules update their
            # tensors in place and the caller may load the same dict elsewhere
            self.states[name] = template._replace(**{
                k: bk.copy(v) if hasattr(v, "shape") else v
                for k, v in fields.items() if not isinstance(v, float)})


def _first_tensor(fields: dict) -> str:
    for k, v in fields.items():
        if hasattr(v, "shape"):
            return k
    raise HvdCompressError("checkpointed state holds no tensor")


def _check_fits(bk, name, state, flat):
    """Raise where the feedback state of ``name`` is not of its gradient's size (a
    checkpoint of another model)."""
    for field, v in ({} if state is None else state._asdict()).items():
        if len(getattr(v, "shape", ())) == 1 and bk.size(v) != bk.size(flat):
            raise HvdCompressError(
                f"the feedback state of {name!r} ({field}) holds {bk.size(v)} entries, its "
                f"gradient {bk.size(flat)}: the compression state was saved for another "
                "model; resume with the model it was saved with")


def _flags(bk, finite):
    """The header flags for a tensor that is (or is not) finite: an int where that was
    read on the host, else a uint8 scalar tensor beside the tensor."""
    if isinstance(finite, bool):
        return 0 if finite else FLAG_NONFINITE
    return bk.astype(~finite, "uint8") * FLAG_NONFINITE


def _select_state(bk, bad, prior, state):
    """Field by field, ``prior`` where ``bad`` (a graph boolean) else ``state``."""
    if state is None:
        return None
    return type(state)(*[p if isinstance(p, float) else bk.where(bad, p, s)
                         for p, s in zip(prior, state)])
