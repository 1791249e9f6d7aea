"""Quantizers: send every entry in a few bits, with a few float32 scales.

Codes are bit-packed (:mod:`hvd_compress.core.bits`): scaled sign costs 1 bit per entry,
TernGrad 2, QSGD ``1 + ceil(log2(s + 1))``, natural compression 9 (sign + exponent). All
the arithmetic runs in float32 on the tensor's device; decompression restores the dtype.
"""
from __future__ import annotations

import math

from .bits import pack_codes, unpack_codes
from .compressor import Compressor, check_float, check_int
from .payload import Payload
from .registry import register
from .rng import Key, uniform


def _f32(bk, flat):
    return flat if bk.dtype(flat) == "float32" else bk.astype(flat, "float32")


class _Stochastic(Compressor):
    """An unbiased quantizer drawing from the private stream of its ``seed``."""
    bias = "unbiased"
    stochastic = True

    def __init__(self, seed=0):
        self.seed = check_int(self.name, "seed", seed)

    def _uniform(self, bk, d, key: Key, like):
        return uniform(bk, d, key._replace(seed=key.seed ^ self.seed), like)


@register("compressor", "qsgd")
class QSGD(_Stochastic):
    """QSGD: stochastic rounding of |x_j| / ||bucket|| to s uniform levels.

    Each bucket of ``bucket`` entries sends its l2 norm (float32) and, per entry, a sign bit
    and a level in {0..s} rounded up with probability equal to the remainder, so the result
    is unbiased with omega = min(B / s^2, sqrt(B) / s) for bucket size B (Alistarh et al.,
    "QSGD", NeurIPS 2017).

    Args:
      s: number of levels (>= 1). s = 7 is 4 bits per entry; s = 1 is 2 bits and very noisy.
      bucket: entries per norm (>= 1). Smaller buckets cut the variance (omega grows with
        B) at 32 / B extra bits per entry; 512 costs 0.06 bits per entry.
      seed: user seed of the rounding noise.
    """
    def __init__(self, s=7, bucket=512, seed=0):
        self.s = check_int("qsgd", "s", s, 1, 32767)
        self.bucket = check_int("qsgd", "bucket", bucket, 1)
        self.seed = check_int("qsgd", "seed", seed)
        self.width = 1 + max(1, math.ceil(math.log2(self.s + 1)))

    def _rows(self, bk, v, d):
        width = min(self.bucket, d) if isinstance(d, int) else self.bucket  # never pad past d
        nb = -(-d // width)
        pad = nb * width - d
        if pad:
            v = bk.concat([v, bk.zeros(pad, "float32", v)])
        return bk.reshape(v, (nb, width)), nb

    def compress(self, x, key: Key = Key()):
        bk, flat, d, shape, dtype = self._flat(x, key.name)
        v = _f32(bk, flat)
        rows, nb = self._rows(bk, v, d)
        norms = bk.sum_rows(rows * rows) ** 0.5
        inv = bk.where(norms > 0, self.s / bk.where(norms > 0, norms, norms + 1), norms)
        r = bk.flatten(bk.abs(rows) * bk.reshape(inv, (-1, 1)))[:d]
        # |x_j| s / ||bucket|| can round above s (a bucket's largest entry): level s + 1
        # would not fit the code width
        r = bk.where(r > self.s, r * 0.0 + self.s, r)
        lo = bk.floor(r)
        u = self._uniform(bk, d, key, v)
        level = lo + bk.astype(u < r - lo, "float32")
        codes = bk.astype(level, "int32") * 2 + bk.astype(v < 0, "int32")
        return Payload(shape=shape, dtype=dtype, count=d, scales=norms,
                       codes=pack_codes(bk, codes, self.width), code_bits=self.width,
                       level=self.s if self.per_rank_level else 0)

    per_rank_level = False  # set on the codecs the dynamic policy picks per step and rank

    @property
    def fixed_size(self):
        return not self.per_rank_level

    def decode_flat(self, bk, p):
        d = p.count
        s = p.level or self.s
        codes = unpack_codes(bk, p.codes, p.code_bits, d)
        sign = 1.0 - 2.0 * bk.astype(codes % 2, "float32")
        rows, _ = self._rows(bk, sign * bk.astype(codes // 2, "float32"), d)
        return bk.flatten(rows * bk.reshape(p.scales * (1.0 / s), (-1, 1)))[:d]

    def omega(self, d):
        b = min(self.bucket, d)
        return min(b / self.s ** 2, math.sqrt(b) / self.s)


@register("compressor", "terngrad")
class TernGrad(_Stochastic):
    """TernGrad: each entry becomes s * sign(x_j) * b_j with s = max|x| and
    b_j ~ Bernoulli(|x_j| / s). Unbiased; 2 bits per entry plus one float32 scale
    (Wen et al., NeurIPS 2017). Its variance is E||C(x) - x||^2 = s ||x||_1 - ||x||^2, so
    omega(x) = ||x||_inf ||x||_1 / ||x||^2 - 1, which depends on the data and is at most
    (sqrt(d) - 1) / 2 (reached by one entry 1 beside d - 1 entries 1 / (sqrt(d) + 1)).

    Args:
      seed: user seed of the Bernoulli draws.
      clip: Wen et al.'s gradient clipping: entries are first clipped to
        [-clip * sigma, clip * sigma], sigma the standard deviation of the tensor's
        entries (the paper uses 2.5). It shrinks s, hence the variance, by cutting the
        rare large entries; the result is unbiased for the clipped tensor only, so the
        compressor is then ``clipped``, a class no feedback rule accepts. Default none.
    """

    def __init__(self, seed=0, clip=None):
        super().__init__(seed)
        self.clip = None if clip is None else check_float("terngrad", "clip", clip)
        if self.clip is not None:
            self.bias = "clipped"

    def compress(self, x, key: Key = Key()):
        bk, flat, d, shape, dtype = self._flat(x, key.name)
        v = _f32(bk, flat)
        if self.clip is not None:
            mean = bk.sum(v) * (1.0 / d)
            var = bk.sum(v * v) * (1.0 / d) - mean * mean
            # a constant tensor (sigma = 0) is left as it is rather than clipped to zero
            bound = bk.where(var > 0, bk.where(var > 0, var, var + 1.0) ** 0.5 * self.clip,
                             bk.max(bk.abs(v)))
            v = bk.where(v > bound, v * 0.0 + bound, bk.where(v < -bound, v * 0.0 - bound, v))
        a = bk.abs(v)
        s = bk.max(a)
        p = a / bk.where(s > 0, s, s + 1)
        u = self._uniform(bk, d, key, v)
        keep = bk.astype(u < p, "int32")
        codes = keep * (1 + bk.astype(v < 0, "int32"))
        return Payload(shape=shape, dtype=dtype, count=d, scales=bk.reshape(s, (1,)),
                       codes=pack_codes(bk, codes, 2), code_bits=2)

    def decode_flat(self, bk, p):
        codes = unpack_codes(bk, p.codes, 2, p.count)
        keep = bk.astype(codes > 0, "float32")
        sign = 1.0 - 2.0 * bk.astype(codes == 2, "float32")
        return keep * sign * p.scales[0]

    def omega(self, d):
        if self.clip is not None:
            return super().omega(d)
        return (math.sqrt(d) - 1.0) / 2.0


@register("compressor", "sign")
class ScaledSign(Compressor):
    """Scaled sign: C(x) = (||x||_1 / d) sign(x), one bit per entry plus one float32.

    Contractive with alpha(x) = ||x||_1^2 / (d ||x||^2) >= 1/d, exactly: the error is
    ||x||^2 - ||x||_1^2 / d. Use it with error feedback (Karimireddy et al., "Error
    Feedback Fixes SignSGD", ICML 2019). Zeros are sent as +scale.
    """
    bias = "contractive"

    def __init__(self):
        pass

    def compress(self, x, key: Key = Key()):
        bk, flat, d, shape, dtype = self._flat(x, key.name)
        v = _f32(bk, flat)
        # the l1 norm is reduced in float64 so every backend rounds it the same way
        scale = bk.astype(bk.sum(bk.abs(bk.astype(flat, "float64"))) / d, "float32")
        return Payload(shape=shape, dtype=dtype, count=d, scales=bk.reshape(scale, (1,)),
                       codes=pack_codes(bk, bk.astype(v < 0, "int32"), 1), code_bits=1)

    def decode_flat(self, bk, p):
        neg = bk.astype(unpack_codes(bk, p.codes, 1, p.count), "float32")
        return (1.0 - 2.0 * neg) * p.scales[0]

    def alpha(self, d):
        return 1.0 / d  # worst case; the data-dependent value is usually much larger


@register("compressor", "natural")
class Natural(_Stochastic):
    """Natural compression: round each entry at random to one of the two nearest powers
    of two, unbiasedly (Horvath et al., "Natural Compression for Distributed Deep
    Learning", MSML 2022). omega = 1/8, and 9 bits per entry (sign + 8-bit exponent) instead
    of 32: a 3.56x saving on fp32 with almost no variance.

    Computed on the float32 bit pattern, so it is exact and identical on every backend.
    float64 gradients are rounded in float32 range.

    Args:
      seed: user seed of the rounding draws.
    """

    def compress(self, x, key: Key = Key()):
        bk, flat, d, shape, dtype = self._flat(x, key.name)
        v = _f32(bk, flat)
        a = bk.abs(v)
        expo = (bk.bitcast(a, "int32") & 0x7F800000) // (1 << 23)
        lo = bk.bitcast(expo * (1 << 23), "float32")       # 2**e (0 below the normals)
        normal = expo > 0
        hi = bk.where(normal, lo * 2.0, lo + 2.0 ** -126)
        p = (a - lo) / (hi - lo)
        u = self._uniform(bk, d, key, v)
        up = bk.astype(u < p, "int32")
        code = bk.astype(bk.where(expo < 254, expo + up, expo), "uint8")
        return Payload(shape=shape, dtype=dtype, count=d, values=code,
                       codes=pack_codes(bk, bk.astype(v < 0, "int32"), 1), code_bits=1)

    def decode_flat(self, bk, p):
        mag = bk.bitcast(bk.astype(p.values, "int32") * (1 << 23), "float32")
        neg = bk.astype(unpack_codes(bk, p.codes, 1, p.count), "float32")
        return (1.0 - 2.0 * neg) * mag

    def omega(self, d):
        return 0.125
