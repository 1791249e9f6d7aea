"""The dynamic compression level: at every step, choose the level that buys the most
objective improvement per communicated bit (Khirirat, Magnusson, Aytekin, Johansson,
"A Flexible Framework for Communication-Efficient Machine Learning", AAAI 2021).

The improvement is the descent lemma's guarantee at the step the optimizer takes: the
payload is applied as it is, unscaled, at the optimizer's step, which the rule takes to be
1/L (larger steps have no guarantee even uncompressed).

For an unbiased compressor Q (``qsgd``, ``bernoulli``) the update x - Q(g)/L guarantees
f(x) - E f(x+) >= (||g||^2 - Var(g)) / (2L), Var(g) = E||Q(g) - g||^2 = omega(g) ||g||^2:
a level whose variance exceeds ||g||^2 (omega(g) > 1) guarantees nothing, and the rule
never prefers it to one that does. The rule keeps the level with the most
(||g||^2 - Var(g)) per bit; where no level descends (QSGD with buckets of more than about
260k entries can have omega > 1 even at s = 255), the one with the least variance.
(Scoring ||g||^4 / E||Q(g)||^2 instead, the descent at the step 1/(L(1 + omega(g))), would
pick levels with omega(g) > 1 that the unscaled update at 1/L does not descend with.)

For QSGD the level is s, and Var(g) = sum over buckets of (||g_b||^2 / s^2) sum_j
f_j (1 - f_j), f_j the fractional part of s |g_j| / ||g_b||: exact, no sampling. The rule
evaluates s in {1, 3, 7, ..., 255} (every code width from 2 to 9 bits).

For unbiased magnitude-aware sparsification (``bernoulli``, p_j = min(1, |g_j| / lam))
the level is the expected budget B = sum_j p_j, with Var(g) = sum_j g_j^2 (1/p_j - 1) and
expected cost C(B); the rule evaluates B on a geometric grid d, d/2, d/4, ... down to one
entry.

For top-k the descent lemma with step 1/L guarantees an improvement of S_k / (2L), where
S_k is the energy (sum of squares) of the k largest entries of the vector sent. The rule
picks ``k* = argmax_k S_k / C(k)`` for a cost model C. S_k comes from one partial
selection and a prefix sum: the selection starts at 256 entries (or 4 k_min) and grows
four-fold only while the optimum sits at its edge, so there is no full sort per step.

With error feedback (top-k only) the vector compressed is not the gradient, and the rule
scores what feedback guarantees instead: every k it picks is at least ``kmin``, so each
step's compressor is contractive with alpha >= kmin / d and the EF14 and EF21 theorems hold
with that alpha; among those k, S_k / C(k) is the error energy removed per bit. Under EF14
the vector is e + g and the residual left is ||e + g||^2 - S_k; under EF21 and its
momentum variants it is the correction v - g_i and the estimate's error left is
||v - g_i||^2 - S_k, the quantity their Lyapunov functions track. DIANA is refused: its
shift step alpha must be at most 1/(1 + omega) of the level each rank used, and ranks
choosing their own levels would need their alphas on the wire.

Cost models (``cost=``):

* ``linear``    C(k) = b k. Efficiency S_k / k is non-increasing, so k* = k_min: greedy
                coordinate descent. Shown for completeness; real links have overheads.
* ``affine``    C(k) = c0 + b k: a per-message overhead c0 (latency times bandwidth,
                headers). Efficiency is unimodal in k.
* ``packet``    C(k) = c0 + ceil(k / m) (packet bits) with m = floor((P - H) / b) entries
                per packet of P bits with H header bits: k* fills whole packets.
* ``allgather`` alpha-beta time of a ring allgather over n ranks:
                (n - 1) (alpha + beta k b), in seconds; calibrate alpha and beta from a
                measured collective (``hvd_compress.core.policy.calibrate``).

``b`` is the wire cost of one (index, value) pair, 64 bits for int32 indices with fp32
values. Each rank chooses its own k (payload sizes then differ across ranks, and the
frontends gather them with variable sizes), unless ``agree=true``: then every rank takes
the k best for the ranks together, k* = argmax_k sum_i S_k^i / C(k), settled within the
step by two small allgathers (:meth:`Dynamic.agree_k`).
"""
from __future__ import annotations

import math

from ..errors import HvdCompressError
from .algorithm import Algorithm
from .compressor import check_bool, check_float, check_int
from .quantizers import QSGD, bucket_rows, bucket_width, code_width
from .registry import register
from .sparsifiers import Bernoulli, TopK

_QSGD_LEVELS = (1, 3, 7, 15, 31, 63, 127, 255)

_COSTS = ("linear", "affine", "packet", "allgather")


@register("policy", "dynamic")
class Dynamic(Algorithm):
    """Per-step top-k level maximising S_k / C(k).

    Args:
      cost: linear | affine | packet | allgather.
      c0: per-message overhead in bits (affine, packet). 1000 bits is a small header;
        latency x bandwidth is the honest value on a real link.
      b: bits per sent entry (default 64: int32 index + fp32 value).
      packet: packet size P in bits (packet cost); header: header bits H per packet.
      alpha, beta, n: latency (s), seconds per bit and rank count (allgather cost).
      kmin, kmax: bounds on k (kmax 0 means the tensor size).
      agree: all ranks use one k (top-k only), the joint optimum of this step:
        k* = argmax_k sum_i S_k^i / C(k) over ranks i (see :meth:`agree_k`). Before its
        payload is formed each tensor runs two small allgathers (each rank's selection
        window, then its S_k on a grid of k); payloads are then equal in size (the
        allgather's fast path). Without it each rank picks its own k every step.
    """

    def __init__(self, cost="affine", c0=1000.0, b=64, packet=12000, header=320,
                 alpha=1e-5, beta=1e-9, n=2, kmin=1, kmax=0, agree=False):
        if cost not in _COSTS:
            raise HvdCompressError(f"dynamic: cost={cost!r} must be one of {', '.join(_COSTS)}")
        c0, b = check_float("dynamic", "c0", c0, zero_ok=True), check_float("dynamic", "b", b)
        packet = check_int("dynamic", "packet", packet, 1)
        header = check_int("dynamic", "header", header, 0)
        # beta > 0 and n >= 2, or the allgather cost would not grow with k (or be zero)
        alpha = check_float("dynamic", "alpha", alpha, zero_ok=True)
        beta = check_float("dynamic", "beta", beta)
        n = check_int("dynamic", "n", n, 2)
        kmin, kmax = check_int("dynamic", "kmin", kmin), check_int("dynamic", "kmax", kmax, 0)
        if kmin < 1 or (kmax and kmax < kmin):
            raise HvdCompressError(f"dynamic: need 1 <= kmin <= kmax, got kmin={kmin}, "
                                   f"kmax={kmax}")
        if cost == "packet" and packet - header < b:
            raise HvdCompressError(f"dynamic: packet={packet} minus header={header} bits "
                                   f"cannot hold one {b:g}-bit entry")
        self.cost, self.c0, self.b = cost, c0, b
        self.packet, self.header = packet, header
        self.alpha, self.beta, self.n = alpha, beta, n
        self.kmin, self.kmax = kmin, kmax
        self.agree = check_bool("dynamic", "agree", agree)

    def check(self, compressor, feedback=None):
        if not isinstance(compressor, (TopK, QSGD, Bernoulli)):
            raise HvdCompressError(
                f"dynamic chooses k for topk, the budget for bernoulli and s for qsgd; "
                f"{compressor.spec()} is none of them")
        if self.agree and not isinstance(compressor, TopK):
            raise HvdCompressError(f"dynamic:agree=true is for topk, not {compressor.spec()}")
        if feedback is not None and feedback.name == "diana":
            raise HvdCompressError(
                f"dynamic does not combine with diana: DIANA's shift step must be at most "
                f"1/(1 + omega) of the level each rank chose, which the other ranks cannot "
                f"know; use {compressor.spec()}+dynamic without diana, or "
                f"{compressor.spec()}+diana at a fixed level")

    def choose(self, bk, v, compressor):
        """The codec for this step: top-k at k*, or QSGD at s*."""
        if isinstance(compressor, QSGD):  # s travels in each payload's header
            return compressor.at_level(self.choose_s(bk, v, compressor), _QSGD_LEVELS[-1])
        if isinstance(compressor, Bernoulli):
            return compressor.at_budget(self.choose_budget(bk, v, compressor), bk.size(v))
        return self.codec(self.choose_k(bk, v), compressor)

    def choose_budget(self, bk, v, c: Bernoulli):
        """B* = argmax (||g||^2 - Var_B(g)) / C(B) over B = d, d/2, ..., 1, with
        Var_B(g) = sum_j g_j^2 / p_j - ||g||^2: a float, or a float64 tensor inside a
        graph (the same choice, as graph operations)."""
        d = bk.size(v)
        a = bk.abs(bk.astype(v, "float32"))
        g2 = a * a
        norm2 = bk.sum(g2)
        budgets = [float(d) / 2 ** i for i in range(int(math.log2(d)) + 2)
                   if float(d) / 2 ** i >= 1.0]
        seconds, ranked = [], c.ranked(bk, a)  # sum_j g_j^2 / p_j; one selection for all
        for budget in budgets:
            p = c.probabilities(bk, a, budget, ranked)
            seconds.append(bk.sum(bk.where(p > 0, g2 / bk.where(p > 0, p, p + 1.0), p)))
        costs = [float(self.costs([b])[0]) for b in budgets]
        if not bk.eager():
            tf = bk.tf
            eff = (2.0 * tf.cast(norm2, tf.float64) - tf.cast(tf.stack(seconds), tf.float64)) \
                / tf.constant(costs, tf.float64)
            return tf.gather(tf.constant(budgets, tf.float64), tf.argmax(eff))
        best, best_eff = float(d), -math.inf
        for budget, second, cost in zip(budgets, seconds, costs):
            eff = (2.0 * float(norm2) - float(second)) / cost
            if eff > best_eff:
                best, best_eff = budget, eff
        return best

    def bits_cost(self, bits):
        """C for a payload of ``bits`` bits (QSGD): the same models, per bit."""
        if self.cost == "linear":
            return bits
        if self.cost == "affine":
            return self.c0 + bits
        if self.cost == "packet":
            return self.c0 + self.packet * math.ceil(bits / (self.packet - self.header))
        return (self.n - 1) * (self.alpha + self.beta * bits)

    def choose_s(self, bk, v, q: QSGD):
        """s* = argmax (||g||^2 - Var_s(g)) / C(s) over s in {1, 3, 7, ..., 255}: an int,
        or an int32 tensor inside a graph (the same choice, as graph operations)."""
        d = bk.size(v)
        rows, nb = bucket_rows(bk, bk.astype(v, "float32"), d, bucket_width(q.bucket, d))
        norms2 = bk.sum_rows(rows * rows)
        inv = bk.reshape(bk.where(norms2 > 0, norms2, norms2 + 1) ** -0.5, (-1, 1))
        a = bk.abs(rows) * inv          # |g_j| / ||g_b||
        total = bk.sum(norms2)
        spreads, costs = [], []  # Var_s(g) = spread / s^2
        for s in _QSGD_LEVELS:
            r = a * s
            f = r - bk.floor(r)
            spreads.append(bk.sum(norms2 * bk.sum_rows(f * (1.0 - f))))
            costs.append(self.bits_cost(64 + 32 * nb + 8 * code_width(s) * ((d + 7) // 8)))
        if not bk.eager():
            return self._best_level_graph(bk, total, spreads, costs)
        best, best_eff = 1, (-1, -math.inf)
        for s, spread, cost in zip(_QSGD_LEVELS, spreads, costs):
            descent = float(total) - float(spread) / s ** 2
            # where nothing descends, the least variance (dividing a negative score by
            # the cost would favour the dearest level)
            eff = (1, descent / cost) if descent > 0 else (0, descent)
            if eff > best_eff:
                best, best_eff = s, eff
        return best

    @staticmethod
    def _best_level_graph(bk, total, spreads, costs):
        """:meth:`choose_s`'s rule as graph operations, in float64 as eagerly: the first
        level with the most descent per bit among those that descend, else the one that
        descends most."""
        tf = bk.tf
        squares = tf.constant([float(s * s) for s in _QSGD_LEVELS], tf.float64)
        descent = tf.cast(total, tf.float64) - tf.cast(tf.stack(spreads), tf.float64) / squares
        eff = tf.where(descent > 0, descent / tf.constant(costs, tf.float64),
                       tf.constant(-math.inf, tf.float64))
        best = tf.where(tf.reduce_any(descent > 0), tf.argmax(eff), tf.argmax(descent))
        return tf.gather(tf.constant(_QSGD_LEVELS, tf.int32), best)

    def costs(self, ks, ceil=None):
        """C(k) for a numpy array of k values (or a float64 tensor and its ``ceil``)."""
        import numpy as np
        if ceil is None:
            ks, ceil = np.asarray(ks, np.float64), np.ceil
        if self.cost == "linear":
            return self.b * ks
        if self.cost == "affine":
            return self.c0 + self.b * ks
        if self.cost == "packet":
            per = (self.packet - self.header) // self.b
            return self.c0 + self.packet * ceil(ks / per)
        return (self.n - 1) * (self.alpha + self.beta * self.b * ks)

    def choose_k(self, bk, v):
        """k* for the flat vector v: an int, or an int32 tensor inside a graph."""
        return (self._search(bk, v) if bk.eager() else self._search_graph(bk, v))[0]

    def _search_graph(self, bk, v):
        """:meth:`_search` as graph operations: the same window, growing four-fold while
        the optimum sits at its edge, in a ``tf.while_loop``; the same float64 prefix sums
        and argmax (the same k as eagerly, but for near-ties that the order of a parallel
        sum can flip, as any two frameworks may). (k*, the window), int32 tensors."""
        tf = bk.tf
        d = bk.size(v)
        kmax = min(d, self.kmax or d)
        kmin = min(self.kmin, kmax)
        a = tf.abs(v)
        edge = int(self._packet_entries() or 1)

        def body(m, best, done):
            top = tf.cast(tf.math.top_k(a, m, sorted=True).values, tf.float64)
            ks = tf.cast(tf.range(1, m + 1), tf.float64)
            eff = tf.cumsum(top * top) / self.costs(ks, tf.math.ceil)
            eff = tf.where(ks < kmin, tf.constant(-math.inf, tf.float64), eff)
            best = tf.cast(tf.argmax(eff), tf.int32) + 1
            done = tf.logical_or(best < m - edge, tf.equal(m, kmax))
            grown = tf.cast(tf.minimum(tf.cast(m, tf.int64) * 4, kmax), tf.int32)
            return tf.where(done, m, grown), best, done

        m0 = tf.constant(min(kmax, max(4 * kmin, 256)), tf.int32)
        m, best, _ = tf.while_loop(lambda m, best, done: tf.logical_not(done), body,
                                   (m0, tf.constant(0, tf.int32), tf.constant(False)))
        return best, m

    def _search(self, bk, v):
        """(k*, the selection size m that found it) for the flat vector v."""
        import numpy as np
        d = bk.size(v)
        kmax = min(d, self.kmax or d)
        kmin = min(self.kmin, kmax)
        a = bk.abs(v)
        m = min(kmax, max(4 * kmin, 256))
        while True:
            top = bk.to_numpy(bk.topk_values(a, m)).astype(np.float64)
            s = np.cumsum(top * top)
            ks = np.arange(1, m + 1)
            eff = s / self.costs(ks)
            eff[:kmin - 1] = -np.inf
            best = int(np.argmax(eff)) + 1
            # the efficiency is unimodal (affine, packet over whole packets): an optimum
            # short of the selection's edge is the global one
            if best < m - (self._packet_entries() or 1) or m == kmax:
                return best, m
            m = min(kmax, 4 * m)

    def agree_k(self, bk, v, gather):
        """The k every rank uses this step: argmax over a grid of k of
        sum_i S_k^i / C(k), S_k^i the energy of the k largest entries of rank i's vector.

        ``gather(row)`` returns every rank's float64 row, stacked in rank order (an
        allgather); it is called twice. Each rank's own optimum k_i lies within its
        selection window m_i, and the joint optimum lies between the smallest and the
        largest k_i (below every k_i each rank's efficiency rises, above every k_i it
        falls), so the grid spans [kmin, max_i m_i]: geometric with ratio 2^(1/16)
        (about 4.4% apart) plus every k up to 64, in whole packets under the packet cost.
        Every rank sums the same gathered rows in the same order, so all choose alike.
        k is an int, or inside a graph an int32 tensor (``gather`` then takes and returns
        tensors)."""
        import numpy as np
        if not bk.eager():
            return self._agree_graph(bk, v, gather)
        m = int(gather(np.array([self._search(bk, v)[1]], np.float64)).max())
        ks = self._grid(m)
        top = bk.to_numpy(bk.topk_values(bk.abs(v), int(ks[-1]))).astype(np.float64)
        energy = np.cumsum(top * top)[ks - 1]
        total = gather(energy).sum(axis=0)
        return int(ks[int(np.argmax(total / self.costs(ks)))])

    def _agree_graph(self, bk, v, gather):
        """:meth:`agree_k` with its selections and allgathers as graph operations; the
        grid and the final sum over ranks run on the host, as eagerly (a few hundred
        numbers: every rank sums the same rows in the same order, on any device)."""
        import numpy as np
        tf = bk.tf
        m = tf.reduce_max(gather(tf.cast(tf.reshape(self._search_graph(bk, v)[1], (1,)),
                                         tf.float64)))
        ks = tf.numpy_function(lambda m: self._grid(int(m)), [m], tf.int64, stateful=False,
                               name="hvd_compress_agree_grid")
        ks = tf.reshape(ks, (-1,))
        top = tf.cast(tf.math.top_k(tf.abs(v), tf.cast(ks[-1], tf.int32), sorted=True).values,
                      tf.float64)
        energy = tf.gather(tf.cumsum(top * top), ks - 1)

        def best(rows, ks):
            return ks[int(np.argmax(rows.sum(axis=0) / self.costs(ks)))].astype(np.int32)
        k = tf.numpy_function(best, [gather(energy), ks], tf.int32, stateful=False,
                              name="hvd_compress_agree_k")
        return tf.reshape(k, ())

    def _grid(self, m: int):
        """The k ``agree_k`` evaluates: sorted distinct ints in [kmin, m]."""
        import numpy as np
        kmin = min(self.kmin, m)
        geometric = np.round(kmin * 2.0 ** (np.arange(0, 16 * np.log2(m / kmin) + 1) / 16))
        ks = np.concatenate([np.arange(kmin, min(m, 64) + 1), geometric, [m]])
        per = self._packet_entries()
        if per:
            ks = np.minimum(np.ceil(ks / per) * per, m)
        return np.unique(np.clip(ks, kmin, m).astype(np.int64))

    def _packet_entries(self):
        return (self.packet - self.header) // self.b if self.cost == "packet" else 0

    def codec(self, k, like: TopK, fixed: bool = False) -> TopK:
        """A top-k codec for this step's k (an int, or a tensor inside a graph; in
        ``like``'s wire formats); payload sizes differ across ranks unless ``fixed`` (an
        agreed k)."""
        c = TopK(k=k if isinstance(k, int) else 1, values=like.values, indices=like.indices)
        c.k, c.size_fixed = k, fixed
        return c


def calibrate(sizes_bits, seconds):
    """(alpha, beta) of ``t = alpha + beta * bits`` by least squares over measured
    collective times, for ``Dynamic(cost="allgather", alpha=..., beta=...)``. In plain
    Python floats, whose operations are correctly rounded everywhere: ranks that plan
    from the same timings get the same figures to the last bit, whatever their CPU."""
    x = [float(v) for v in sizes_bits]
    t = [float(v) for v in seconds]
    mx, mt = sum(x) / len(x), sum(t) / len(t)
    sxx = sum((v - mx) ** 2 for v in x)
    beta = sum((u - mx) * (v - mt) for u, v in zip(x, t)) / sxx if sxx else 0.0
    alpha = mt - beta * mx
    return max(alpha, 0.0), max(beta, 0.0)

