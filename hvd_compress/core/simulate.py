"""n workers in one process, running exactly the code the frontends run.

The simulator is the single-process oracle of the multi-rank tests and the engine of the
experiments: each worker encodes its own gradient with its own key (seed, rank, name,
step) and state, the payloads are averaged as a collective would, and every worker
decodes the same mean into the same update.
"""
from __future__ import annotations

from .ops import backend_for
from .pipeline import resolve_pipeline
from .rng import Key


class Workers:
    """n simulated workers sharing one pipeline, each with its own state.

    Args:
      pipeline: spec, compressor or Pipeline.
      n: number of workers.
      seed: the seed every stochastic draw mixes in (as the frontends' ``seed``).
      name: the tensor name keys are drawn for.
    """

    def __init__(self, pipeline, n: int, seed: int = 0, name: str = "x"):
        self.pipe = resolve_pipeline(pipeline)
        self.n, self.seed, self.name = n, seed, name
        self.states = None
        self.step_count = 0
        self.bits = []  # per step: bits each worker sent (list of n ints)
        self.last = []  # the payloads of the latest step, one per worker

    def step(self, grads):
        """The update every worker applies, given each worker's flat gradient."""
        bk = backend_for(grads[0])
        if self.states is None:
            self.states = [self.pipe.init(bk, g) for g in grads]
        step = self.step_count
        payloads, codec = [], None
        for r, g in enumerate(grads):
            p, codec, self.states[r], _ = self.pipe.encode(
                bk, g, self.states[r], Key(self.seed, r, self.name, step))
            payloads.append(p)
        self.bits.append([int(p.wire_bits(bk)) for p in payloads])
        self.last, self.last_codec = payloads, codec
        mean = codec.aggregate(bk, payloads) * (1.0 / self.n)
        mean = bk.astype(mean, bk.dtype(grads[0]))
        update = None
        for r in range(self.n):
            u, self.states[r] = self.pipe.decode(bk, mean, self.states[r])
            update = u if update is None else update
        self.step_count += 1
        return update
