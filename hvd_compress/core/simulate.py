"""n workers in one process, running exactly the code the frontends run.

The simulator is the single-process oracle of the multi-rank tests and the engine of the
experiments: each worker encodes its own gradient with its own key (seed, rank, name,
step) and state, the payloads are averaged as a collective would, and every worker
decodes the same mean into the same update.
"""
from __future__ import annotations

from .exchange import Exchange
from .ops import ITEMSIZE, backend_for
from .pipeline import resolve_pipeline
from .rng import Key


class Workers:
    """n simulated workers sharing one pipeline, each with its own state.

    Args:
      pipeline: spec, compressor or Pipeline.
      n: number of workers.
      seed: the seed every stochastic draw mixes in (as the frontends' ``seed``).
      name: the tensor name keys are drawn for.
      wire: go through the frontends' whole path instead of the payload objects: one
        :class:`~hvd_compress.core.exchange.Exchange` per worker, packed buffers
        concatenated as an allgather would (or summed in rank order as an allreduce
        would), then every header checked and decoded. ``bits`` then counts what each
        worker handed to the collective.
    """

    def __init__(self, pipeline, n: int, seed: int = 0, name: str = "x", wire: bool = False):
        self.pipe = resolve_pipeline(pipeline)
        self.n, self.seed, self.name = n, seed, name
        self.states = None
        self.level = None  # the agreed k (dynamic:agree=true)
        self.step_count = 0
        self.bits = []  # per step: bits each worker sent (list of n ints)
        self.last = []  # the payloads of the latest step, one per worker
        self.exchanges = [Exchange(self.pipe, seed, transport="simulated")
                          for _ in range(n)] if wire else None

    def step(self, grads):
        """The update every worker applies, given each worker's flat gradient."""
        if self.exchanges is not None:
            return self._wire_step(grads)
        bk = backend_for(grads[0])
        if self.states is None:
            self.states = [self.pipe.init(bk, g) for g in grads]
        step = self.step_count
        payloads, codec, proposals = [], None, []
        for r, g in enumerate(grads):
            p, codec, self.states[r], _, proposal = self.pipe.encode(
                bk, g, self.states[r], Key(self.seed, r, self.name, step), level=self.level)
            payloads.append(p)
            proposals.append(proposal)
        if self.pipe.agrees:  # as the frontends do: average, round, use next step
            self.level = max(1, int(round(sum(proposals) / self.n)))
        self.bits.append([int(p.wire_bits(bk)) for p in payloads])
        self.last, self.last_codec = payloads, codec
        mean, _ = codec.mean(bk, payloads, self.n)
        mean = bk.astype(mean, bk.dtype(grads[0]))
        update = None
        for r in range(self.n):
            u, self.states[r] = self.pipe.decode(bk, mean, self.states[r])
            update = u if update is None else update
        self.step_count += 1
        return update

    def _wire_step(self, grads):
        bk = backend_for(grads[0])
        outs = [ex.begin(bk, self.name, g, r) for r, (ex, g) in enumerate(zip(self.exchanges,
                                                                               grads))]
        self.bits.append([8 * int(bk.size(o.wire)) * (1 if not o.by_allreduce else
                                                      ITEMSIZE[bk.dtype(o.wire)])
                          for o in outs])
        self.last, self.last_codec = [o.payload for o in outs], outs[0].codec
        if outs[0].by_allreduce:
            total = outs[0].wire
            for o in outs[1:]:
                total = total + o.wire
            total = total * (1.0 / self.n)
            updates = [ex.finish_allreduced(bk, total, o, self.n, summed=False)
                       for ex, o in zip(self.exchanges, outs)]
        else:
            gathered = bk.concat([o.wire for o in outs])
            updates = [ex.finish_gathered(bk, gathered, o, self.n, summed=False)
                       for ex, o in zip(self.exchanges, outs)]
        if outs[0].proposal is not None:
            mean = sum(float(o.proposal) for o in outs) / self.n
            for ex in self.exchanges:
                ex.agree(self.name, mean)
        self.step_count += 1
        return updates[0]


def adiana(grads, x0, L: float, mu: float, compressor, n: int, steps: int, seed: int = 0,
           eta=None, callback=None):
    """ADIANA, accelerated DIANA for strongly convex problems (Li, Kovalev, Qian,
    Richtarik, "Acceleration for Compressed Gradient Descent in Distributed and Federated
    Optimization", ICML 2020), in the single-process simulator.

    Each step every worker sends two compressed messages, C_i(grad f_i(x) - h_i) for the
    gradient estimate and C'_i(grad f_i(w) - h_i) to learn its shift h_i; a Katyusha-style
    coupling of the sequences x, y, z, w gives the accelerated rate, and with independent
    compressors the compression variance shrinks with n (He, Huang, Yuan, NeurIPS 2023).

    Args:
      grads: ``grads(i, x)`` -> worker i's gradient at x (numpy).
      x0: starting point; L, mu: smoothness and strong convexity of the average.
      compressor: an unbiased compressor (spec or object); omega comes from it.
      n, steps, seed: workers, iterations, seed of every draw.
      eta: step size (default 1 / (2 L (1 + 4 omega / n)), shared masks: n = 1).
      callback: ``callback(step, y, bits_per_worker)`` after every step.

    Returns the final y. Parameters follow the paper's choices: alpha = p = 1 / (1 + omega),
    theta2 = 1/2, theta1 = min(1/4, sqrt(eta mu / p)), gamma = eta / (2 (theta1 + eta mu)),
    beta = 1 - gamma mu.
    """
    import numpy as np

    from .ops import backend_named
    from .rng import uniform
    from .spec import resolve_compressor

    c = resolve_compressor(compressor)
    bk = backend_named("numpy")
    d = x0.size
    omega = c.omega(d)
    spread = 1 if getattr(c, "shared", False) else n
    if eta is None:
        eta = 1.0 / (2 * L * (1 + 4 * omega / spread))
    alpha = p = 1.0 / (1.0 + omega)
    theta2 = 0.5
    theta1 = min(0.25, np.sqrt(eta * mu / p))
    gamma = eta / (2 * (theta1 + eta * mu))
    beta = 1 - gamma * mu
    y = z = w = x0.astype(np.float64)
    h = [np.zeros(d) for _ in range(n)]

    def send(v, rank, name, step):
        payload = c.compress(v.astype(np.float32), Key(seed, rank, name, step))
        return c.decode_flat(bk, payload).astype(np.float64), int(payload.wire_bits(bk))

    for k in range(steps):
        x = theta1 * z + theta2 * w + (1 - theta1 - theta2) * y
        g, bits = np.zeros(d), 0
        for i in range(n):
            m, b1 = send(grads(i, x) - h[i], i, "adiana.x", k)
            m2, b2 = send(grads(i, w) - h[i], i, "adiana.w", k)
            g += (m + h[i]) / n
            h[i] = h[i] + alpha * m2
            bits += b1 + b2
        y_next = x - eta * g
        z = beta * z + (1 - beta) * x + (gamma / eta) * (y_next - x)
        coin = float(uniform(bk, 1, Key(seed, None, "adiana.coin", k), x)[0])
        w = y if coin < p else w
        y = y_next
        if callback is not None:
            callback(k, y, bits / n)
    return y
