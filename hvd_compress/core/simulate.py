"""n workers in one process, running exactly the code the frontends run.

The simulator is the single-process oracle of the multi-rank tests and the engine of the
experiments: each worker encodes its own gradient with its own key (seed, rank, name,
step) and state, the payloads are averaged as a collective would, and every worker
decodes the same mean into the same update.
"""
from __future__ import annotations

from ..errors import HvdCompressError
from .compressor import check_int
from .exchange import Exchange
from .ops import ITEMSIZE, backend_for
from .payload import Payload
from .pipeline import resolve_pipeline
from .rng import Key


class Workers:
    """n simulated workers sharing one pipeline, each with its own state.

    Args:
      pipeline: spec, compressor or Pipeline.
      n: number of workers.
      seed: the seed every stochastic draw mixes in (as the frontends' ``seed``).
      name: the tensor name keys are drawn for.
      model_size: entries of the whole model, for ``perturb`` (default: the size of the
        tensor stepped, as if it were the whole model).
      wire: go through the frontends' whole path instead of the payload objects: one
        :class:`~hvd_compress.core.exchange.Exchange` per worker, packed buffers
        concatenated as an allgather would (or summed in rank order as an allreduce
        would), then every header checked and decoded. ``bits`` then counts what each
        worker handed to the collective.
    """

    def __init__(self, pipeline, n: int, seed: int = 0, name: str = "x", wire: bool = False,
                 model_size=None):
        self.pipe = resolve_pipeline(pipeline)
        self.n, self.seed, self.name = n, seed, name
        self.model_size = None if model_size is None else \
            check_int("Workers", "model_size", model_size, 1)
        self.states = None
        self.step_count = 0
        self.bits: list[list[int]] = []  # per step: bits each worker sent (list of n ints)
        # the payloads of the latest step, one per worker (None: auto sent that one dense)
        self.last: list[Payload | None] = []
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

        def encode(r, gather):
            return self.pipe.encode(bk, grads[r], self.states[r],
                                    Key(self.seed, r, self.name, step), gather=gather,
                                    model_size=self.model_size or bk.size(grads[r]))
        encoded = run_ranks(self.n, encode) if self.pipe.agrees else \
            [encode(r, None) for r in range(self.n)]
        payloads = [e.payload for e in encoded]
        codec = encoded[-1].codec
        self.states = [e.state for e in encoded]
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
        for ex in self.exchanges:
            ex.model_size = self.model_size or bk.size(grads[0])

        def begin(r, gather):
            return self.exchanges[r].begin(bk, self.name, grads[r], r, gather=gather)
        outs = run_ranks(self.n, begin) if self.pipe.agrees else \
            [begin(r, None) for r in range(self.n)]
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
        self.step_count += 1
        return updates[0]


def run_ranks(n: int, fn) -> list:
    """``[fn(rank, gather) for rank in range(n)]``, each rank on its own thread, where
    ``gather(row)`` is an allgather among them: it waits for every rank's float64 row and
    returns the rows stacked in rank order. How the simulator runs the stages that talk
    to the other ranks in the middle of a step (``dynamic:agree=true``)."""
    import threading

    import numpy as np

    rows, results, errors = [None] * n, [None] * n, []
    barrier = threading.Barrier(n)

    def run(r):
        def gather(row):
            rows[r] = np.asarray(row, np.float64)
            barrier.wait()
            out = np.stack(rows)
            barrier.wait()  # nobody overwrites a row before every rank has read them
            return out
        try:
            results[r] = fn(r, gather)
        except BaseException as e:  # noqa: BLE001 - re-raised below, on the caller's thread
            errors.append(e)
            barrier.abort()  # the others stop waiting
    threads = [threading.Thread(target=run, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if real or errors:
        raise (real or errors)[0]
    return results


def threshold_for_budget(sent, budget: float, lo: float = 1e-8, hi: float = 1e2,
                         rtol: float = 0.005, rounds: int = 40) -> float:
    """The hard threshold lambda whose run sends ``budget`` in all: Sahu et al.'s setting
    (NeurIPS 2021), where hard threshold and top-k are compared at the same total budget
    over a whole run rather than per step.

    ``sent(lam)`` runs training with ``threshold:lam=<lam>`` and returns what it sent in
    all (bits or entries, as ``budget``); it must not increase with lambda. Bisection on
    log lambda in [lo, hi] (two runs at the ends, then at most ``rounds`` more) until a run
    is within ``rtol`` of the budget; returns the lambda of the closest run."""
    import math
    if not 0 < lo < hi:
        raise HvdCompressError(f"threshold_for_budget: need 0 < lo < hi, got {lo}, {hi}")
    high, low = sent(lo), sent(hi)
    if not low <= budget <= high:
        raise HvdCompressError(
            f"threshold_for_budget: lam={lo:g} sends {high:g} and lam={hi:g} sends {low:g}; "
            f"the budget {budget:g} is outside, widen [lo, hi]")
    best = (abs(high - budget), lo) if abs(high - budget) <= abs(low - budget) else \
        (abs(low - budget), hi)
    for _ in range(rounds):
        if best[0] <= rtol * budget:
            break
        lam = math.sqrt(lo * hi)
        got = sent(lam)
        best = min(best, (abs(got - budget), lam))
        lo, hi = (lam, hi) if got > budget else (lo, lam)
    return best[1]


def adiana(grads, x0, L_max: float, mu: float, compressor, n: int, steps: int, seed: int = 0,
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
      x0: starting point.
      L_max: a smoothness constant of every worker's f_i (max_i L_i: the theorem's L,
        which bounds each local function, not only their average).
      mu: strong convexity of the average.
      compressor: an unbiased compressor (spec or object); omega comes from it.
      n, steps, seed: workers, iterations, seed of every draw.
      eta: step size; default the theorem's
        min{1 / (2 L_max), n / (64 omega (2 p (omega + 1) + 1)^2 L_max)} (the strongly
        convex theorem of Li et al.), with n = 1 for shared masks (they are not independent).
      callback: ``callback(step, y, bits_per_worker)`` after every step; a true return
        value stops the run there.

    Returns the final y. Parameters follow the theorem: alpha = p = 1 / (1 + omega),
    theta2 = 1/2, theta1 = min(1/4, sqrt(eta mu / p)), gamma = eta / (2 (theta1 + eta mu)),
    beta = 1 - gamma mu. The theorem's step is conservative (64 omega (2p(omega+1)+1)^2 =
    576 omega at p = 1 / (1 + omega)); a larger ``eta`` often converges faster, with no
    guarantee.
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
    alpha = p = 1.0 / (1.0 + omega)
    if eta is None:
        eta = adiana_step(L_max, omega, spread)
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
        if callback is not None and callback(k, y, bits / n):
            break
    return y


def adiana_step(L_max: float, omega: float, n: int) -> float:
    """ADIANA's step from the strongly convex theorem of Li et al., with p = 1 / (1 + omega):
    min{1 / (2 L_max), n / (64 omega (2 p (omega + 1) + 1)^2 L_max)}."""
    if omega <= 0:
        return 1.0 / (2 * L_max)
    p = 1.0 / (1.0 + omega)
    return min(1.0 / (2 * L_max), n / (64 * omega * (2 * p * (omega + 1) + 1) ** 2 * L_max))
