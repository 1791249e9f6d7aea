"""Sparsifiers: send k (index, value) pairs instead of d values.

All three travel as int32 indices (int64 when d >= 2**31) plus values in the gradient dtype
(or a cast given by ``values=``), so the wire cost is ``192 + k * (32 + value bits)`` bits
with the 24-byte header (:mod:`hvd_compress.core.payload`). ``indices=varint`` sends the
gaps between sorted positions as varints instead: about 10 bits per index at 1% density
(plus a 64-bit length), at the price of payload sizes that differ across ranks. Positions
differ across ranks, so sparse payloads go through an allgather, never through a dense
allreduce.
"""
from __future__ import annotations

import math

from ..errors import HvdCompressError
from .compressor import Compressor, check_bool, check_float, check_int, check_ratio, resolve_k
from .payload import Payload
from .registry import register
from .rng import Key, random_bits, uniform
from .select import at_least, largest_magnitudes, magnitudes_reaching, topk_indices
from .varint import encode_sorted

_VALUE_DTYPES = (None, "float16", "bfloat16", "float32")


class _Sparse(Compressor):
    """Shared encode/decode of (index, value) payloads."""
    indices = None
    decodes_into = True
    size_fixed = True  # sizes follow from d alone (threshold and the dynamic policy: no)

    @property
    def fixed_size(self):
        return self.size_fixed and self.indices != "varint"

    def _payload(self, bk, flat, idx, shape, dtype, d, scale=None):
        vals = bk.gather(flat, idx)
        if scale is not None:
            vals = vals * scale
        return self.pack_at(bk, vals, idx, shape, dtype, d)

    def pack_at(self, bk, vals, idx, shape, dtype, d):
        """The payload of ``vals`` at sorted positions ``idx``, in this codec's formats."""
        if self.values is not None:
            vals = bk.astype(vals, self.values)
        if self.indices == "varint":
            return Payload(shape=shape, dtype=dtype, count=bk.size(idx), values=vals,
                           indices=idx, index_dtype="varint", index_code=encode_sorted(bk, idx, d))
        return Payload(shape=shape, dtype=dtype, count=bk.size(idx), values=vals, indices=idx,
                       index_dtype=self._index_dtype(d))

    def decode_flat(self, bk, p):
        return bk.scatter_add(_numel(p.shape), p.indices, _wide(bk, p.values))

    def add_sent(self, bk, x, p, scale=1.0, owned=False):
        # only the k sent entries change: no dense decode (bit-identical to the dense sum,
        # since every other entry adds an exact zero; only a -0.0 entry of x stays -0.0
        # where adding +0.0 would make it +0.0)
        vals = bk.astype(_wide(bk, p.values), bk.dtype(x))
        if scale != 1.0:
            vals = -vals if scale == -1.0 else vals * scale
        return bk.scatter_add_into(x if owned else bk.copy(x), p.indices, vals)

    def touched(self, p):
        return p.indices

    def mean(self, bk, payloads, n, out=None):
        # off the positions some rank sent, the sum is an exact zero: scale and check
        # only those (positions may repeat across ranks), unless they are so many that a
        # pass over the whole tensor costs less (an indexed read or write costs about
        # 100 streamed entries on a CPU)
        total = self.aggregate(bk, payloads, out)
        counts = [p.count for p in payloads]
        if all(isinstance(c, int) for c in counts) and \
                _INDEXED_COST * sum(counts) >= _numel(payloads[0].shape):
            if n != 1:
                total = bk.mul_(total, 1.0 / n)
            return total, bk.finite_flag(total)
        at = bk.concat([p.indices for p in payloads]) if len(payloads) > 1 \
            else payloads[0].indices
        if n != 1:
            total = bk.scale_at(total, at, 1.0 / n)
        return total, bk.finite_flag(bk.gather(total, at))

    def aggregate(self, bk, payloads, out=None):
        # rank by rank, in rank order: within one payload every position is distinct, so
        # no two additions race, and every rank adds the same numbers in the same order
        # (bit-identical sums on CPU and GPU alike)
        total = None
        for p in payloads:
            values, numel = _wide(bk, p.values), _numel(p.shape)
            if total is None and out is not None and bk.dtype(out) == bk.dtype(values) \
                    and bk.size(out) == numel:
                total = bk.zeros_in(out)  # no fresh tensor of the model's size
            total = bk.scatter_add(numel, p.indices, values) if total is None \
                else bk.scatter_add_into(total, p.indices, values)
        return total


# about how many entries a pass streams in the time one indexed entry takes (torch on a
# CPU: 7 ns against 0.05 ns per entry at 1M entries)
_INDEXED_COST = 100


def _wide(bk, values):
    """Values as they are summed: 16-bit wire casts widen to float32 (numpy's bfloat16
    is a bit pattern that must never be added as integers)."""
    return bk.astype(values, "float32") if bk.dtype(values) in ("float16", "bfloat16", "uint16") \
        else values


def _check_formats(owner, values, indices):
    if values not in _VALUE_DTYPES:
        raise HvdCompressError(
            f"{owner}: values={values!r} must be one of float16, bfloat16, float32 (or unset)")
    if indices not in (None, "varint"):
        raise HvdCompressError(f"{owner}: indices={indices!r} must be varint (or unset)")


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


@register("compressor", "topk")
class TopK(_Sparse):
    """Top-k: keep the k entries of largest magnitude (ties go to lower positions).

    Contractive with alpha = k/d: ||C(x) - x||^2 <= (1 - k/d)||x||^2, usually far better
    because gradients concentrate their energy. Use it with error feedback (EF14, EF21,
    EF21-SGDM), which restores convergence; without feedback it is biased.

    Args:
      ratio: fraction of entries kept, in (0, 1]; k = max(1, int(ratio * d)). 0.01 (1%)
        with EF21-SGDM or EF14 trains most models to dense accuracy; 0.001 is aggressive.
      k: keep exactly k entries instead (overrides ratio).
      values: cast kept values to "float16"/"bfloat16" on the wire (halves value bits).
      indices: "varint" to send delta + varint coded positions instead of int32.

    Selection is exact and deterministic: a sampled threshold narrows the candidates, then
    an exact top-k runs on them (see :mod:`hvd_compress.core.select`).
    """
    bias = "contractive"

    def __init__(self, ratio=0.01, k=None, values=None, indices=None):
        k = None if k is None else check_int("topk", "k", k, 1)
        ratio = check_ratio("topk", ratio, k)
        _check_formats("topk", values, indices)
        self.ratio, self.k, self.values, self.indices = ratio, k, values, indices

    def k_for(self, d, tensor=""):
        return resolve_k("topk", d, self.k, self.ratio, tensor)

    def compress(self, x, key: Key = Key()):
        bk, flat, d, shape, dtype = self._flat(x, key.name)
        k = self.k_for(d, key.name)
        idx = largest_magnitudes(bk, flat, k)
        return self._payload(bk, flat, idx, shape, dtype, d)

    def alpha(self, d):
        return self.k_for(d) / d


@register("compressor", "randk")
class RandK(_Sparse):
    """Rand-k: keep k positions drawn uniformly without replacement.

    Unscaled, it is contractive with alpha = k/d (in expectation). Scaled by d/k it is
    unbiased with omega = d/k - 1, the form DIANA and friends need.

    Masks are independent across ranks by default: averaging n independent unbiased
    compressors divides the compression variance by n, which is where the communication
    saving comes from (He, Huang, Yuan, NeurIPS 2023). ``shared=true`` draws one mask for
    every rank (the GRACE behaviour); it needs no indices on the wire and can be summed by
    an allreduce, but it forgoes that variance reduction.

    Args:
      ratio / k: as for top-k.
      scaled: multiply kept values by d/k (unbiased). Default false (use with EF).
      shared: one mask for all ranks (default false: independent masks).
      seed: user seed mixed into the (seed, rank, tensor name, step) key.
      values: optional fp16/bf16 cast of the kept values.
      indices: "varint" for delta + varint coded positions.
    """
    stochastic = True

    def __init__(self, ratio=0.01, k=None, scaled=False, shared=False, seed=0, values=None,
                 indices=None):
        k = None if k is None else check_int("randk", "k", k, 1)
        ratio = check_ratio("randk", ratio, k)
        _check_formats("randk", values, indices)
        self.ratio, self.k, self.values, self.indices = ratio, k, values, indices
        self.scaled = check_bool("randk", "scaled", scaled)
        self.shared = check_bool("randk", "shared", shared)
        self.seed = check_int("randk", "seed", seed)
        self.bias = "unbiased" if self.scaled else "contractive"
        self.summable = self.shared

    def k_for(self, d, tensor=""):
        return resolve_k("randk", d, self.k, self.ratio, tensor)

    def mask(self, bk, d: int, key: Key, like):
        """The sorted positions this rank keeps for ``key`` (same on every backend)."""
        key = key._replace(seed=key.seed ^ self.seed, rank=None if self.shared else key.rank)
        # the k largest of d independent uniform keys: a uniform k-subset
        k = self.k_for(d, key.name)
        blocks = bk.blocks(d, like)
        if len(blocks) > 1 and isinstance(k, int) and 16 * k <= d:
            kept = _largest_keys_by_block(bk, d, k, key, like, blocks)
            if kept is not None:
                return kept
        keys = random_bits(bk, d, key, like, out=bk.scratch("randk.keys", d, "int32", like))
        return topk_indices(bk, keys, k)

    def compress(self, x, key: Key = Key()):
        bk, flat, d, shape, dtype = self._flat(x, key.name)
        idx = self.mask(bk, d, key, flat)
        scale = d / self.k_for(d) if self.scaled else None
        p = self._payload(bk, flat, idx, shape, dtype, d, scale)
        return p

    def omega(self, d):
        if not self.scaled:
            return super().omega(d)
        return d / self.k_for(d) - 1.0

    def alpha(self, d):
        return self.k_for(d) / d if not self.scaled else super().alpha(d)


def _largest_keys_by_block(bk, d, k, key, like, blocks):
    """Rand-k's kept positions without writing the d keys: each block of keys, drawn in
    cache, hands over only the keys above a threshold that about k + 4 sqrt(k) + 16 of
    the d uniform keys reach; the k largest of those are the k largest of all (ties
    toward lower positions alike). None where fewer than k reached it (a chance of about
    3e-5): the caller then selects among all d keys."""
    reach = k + 4.0 * math.sqrt(k) + 16.0  # keys are uniform over the 2**32 int32 values
    t = max(-(1 << 31), (1 << 31) - math.ceil(reach / d * (1 << 32)))
    positions, keys = [], []
    for a, b in blocks:
        block = random_bits(bk, b - a, key, like,
                            out=bk.scratch("randk.block", b - a, "int32", like), start=a)
        pos, above = at_least(bk, block, t)
        positions.append(pos + a)
        keys.append(above)
    positions, keys = bk.concat(positions), bk.concat(keys)
    if bk.size(positions) < k:
        return None
    return bk.gather(positions, topk_indices(bk, keys, k))


@register("compressor", "threshold")
class Threshold(_Sparse):
    """Hard threshold: keep every entry with |x_j| >= lam.

    An *absolute* compressor: ||C(x) - x||^2 <= d * lam^2 whatever x is. With error feedback
    it minimises the total compression error over training for a given total budget
    (Sahu et al., "Rethinking gradient sparsification as total error minimization",
    NeurIPS 2021): it sends many entries early, when gradients are large, and few late.

    Args:
      lam: the threshold (> 0). To match a top-k budget of k entries per step on
        gradients of unit scale, start from lam = 1 / (2 sqrt(k)) and adjust.
      values: optional fp16/bf16 cast of the kept values.
      indices: "varint" for delta + varint coded positions.
    """
    bias = "absolute"
    size_fixed = False

    def __init__(self, lam=1e-3, values=None, indices=None):
        _check_formats("threshold", values, indices)
        self.lam, self.values, self.indices = check_float("threshold", "lam", lam), values, indices

    def compress(self, x, key: Key = Key()):
        bk, flat, d, shape, dtype = self._flat(x, key.name)
        idx = magnitudes_reaching(bk, flat, self.lam)
        return self._payload(bk, flat, idx, shape, dtype, d)

    def kappa(self, d):
        return (d ** 0.5) * self.lam


@register("compressor", "bernoulli")
class Bernoulli(_Sparse):
    """Unbiased magnitude-aware sparsification (Wangni, Wang, Liu, Zhang, "Gradient
    Sparsification for Communication-Efficient Distributed Optimization", NeurIPS 2018):
    keep entry j with probability p_j = min(1, |x_j| / lam) and send x_j / p_j.

    For an expected budget of B = ratio * d entries, lam solves sum_j p_j = B; these p_j
    minimise the variance sum_j x_j^2 / p_j - ||x||^2 for that budget, which is at most
    (d / B - 1) ||x||^2. Unlike rand-k the large entries are (nearly) always sent, so the
    variance is far lower on concentrated gradients. Payload sizes vary per rank.

    Args:
      ratio: expected fraction of entries sent, in (0, 1].
      seed: user seed of the Bernoulli draws.
      values, indices: wire formats, as for top-k.
    """
    bias = "unbiased"
    stochastic = True
    size_fixed = False

    def __init__(self, ratio=0.01, seed=0, values=None, indices=None):
        _check_formats("bernoulli", values, indices)
        self.ratio = check_ratio("bernoulli", ratio)
        self.seed = check_int("bernoulli", "seed", seed)
        self.values, self.indices = values, indices

    def at_budget(self, budget, d: int) -> "Bernoulli":
        """This sparsifier at an expected budget of ``budget`` of its d entries (the
        dynamic policy's choice): a float, or inside a graph a float64 tensor."""
        c = Bernoulli(self.ratio, self.seed, self.values, self.indices)
        c.ratio = budget / d
        return c

    def probabilities(self, bk, a, budget, ranked=None):
        """p_j = min(1, a_j / lam) with sum_j p_j = budget (a = |x|), exactly.

        If the m largest entries saturate, lam = (sum of the others) / (budget - m); the
        right m is the first one for which the (m+1)-th largest entry stays below lam.
        One partial selection of the top entries and a prefix sum find it (inside a
        graph as graph operations, in float64 as eagerly). ``ranked``: :meth:`ranked`
        of a, where several budgets share one selection (the dynamic policy)."""
        import numpy as np
        if not bk.eager():
            return self._probabilities_graph(bk, a, budget, ranked)
        nnz = int(bk.count(a > 0)) if ranked is None else ranked[0]
        if budget >= nnz:
            return bk.astype(a > 0, "float32")
        m_max = min(math.ceil(budget) - 1, nnz - 1)  # fewer than budget entries saturate
        if ranked is None:
            top = bk.to_numpy(bk.topk_values(a, m_max + 1)).astype(np.float64)
            total = float(bk.sum(bk.astype(a, "float64")))
        else:
            top, total = ranked[1][:m_max + 1], ranked[2]
        m = np.arange(m_max + 1)
        lams = (total - np.concatenate([[0.0], np.cumsum(top[:-1])])) / (budget - m)  # per m
        ok = top < lams
        ok[1:] &= top[:-1] >= lams[1:]
        lam = float(lams[int(np.argmax(ok))])
        return bk.where(a >= lam, a * 0.0 + 1.0, a * (1.0 / lam))

    @staticmethod
    def ranked(bk, a):
        """(the nonzero count of a, its nonzero entries in descending order and their
        total, both in float64): what :meth:`probabilities` selects, for any budget."""
        import numpy as np
        total = bk.sum(bk.astype(a, "float64"))
        if not bk.eager():
            tf = bk.tf
            nnz = bk.count(a > 0)
            return nnz, tf.cast(tf.math.top_k(a, tf.cast(nnz, tf.int32)).values, tf.float64), \
                total
        nnz = int(bk.count(a > 0))
        top = bk.to_numpy(bk.topk_values(a, nnz)).astype(np.float64) if nnz else np.zeros(0)
        return nnz, top, float(total)

    @staticmethod
    def _probabilities_graph(bk, a, budget, ranked):
        tf = bk.tf
        budget = tf.cast(budget, tf.float64)
        nnz = bk.count(a > 0) if ranked is None else ranked[0]

        def solved():
            m_max = tf.minimum(tf.cast(tf.math.ceil(budget), tf.int64) - 1, nnz - 1)
            if ranked is None:
                top = tf.cast(tf.math.top_k(a, tf.cast(m_max + 1, tf.int32)).values,
                              tf.float64)
                total = tf.reduce_sum(tf.cast(a, tf.float64))
            else:
                top, total = ranked[1][:m_max + 1], ranked[2]
            m = tf.cast(tf.range(m_max + 1), tf.float64)
            lams = (total - tf.concat([[0.0], tf.cumsum(top[:-1])], 0)) / (budget - m)
            ok = tf.logical_and(top < lams,
                                tf.concat([[True], top[:-1] >= lams[1:]], 0))
            lam = lams[tf.argmax(tf.cast(ok, tf.int32))]
            # as eagerly: a float32 compare and a float32 product by 1 / lam
            return tf.where(a >= tf.cast(lam, a.dtype), tf.ones_like(a),
                            a * tf.cast(1.0 / lam, a.dtype))
        return tf.cond(budget >= tf.cast(nnz, tf.float64),
                       lambda: tf.cast(a > 0, tf.float32), solved)

    def compress(self, x, key: Key = Key()):
        bk, flat, d, shape, dtype = self._flat(x, key.name)
        v = bk.astype(flat, "float32")
        p = self.probabilities(bk, bk.abs(v), self.ratio * d)
        u = uniform(bk, d, key._replace(seed=key.seed ^ self.seed), v)
        idx = bk.nonzero(u < p)
        vals = bk.astype(bk.gather(v, idx) / bk.gather(p, idx), dtype)
        return self.pack_at(bk, vals, idx, shape, dtype, d)

    def omega(self, d):
        return max(0.0, 1.0 / self.ratio - 1.0)
