"""Exact (up to rounding) codecs: identity and half-precision casts.

They keep the tensor dense and are linear, so their payloads can be summed by an
allreduce; Horovod's own ``Compression.fp16`` is the cast to float16.
"""
from __future__ import annotations

from .compressor import Compressor
from .payload import Payload
from .registry import register
from .rng import Key


class _Cast(Compressor):
    bias = "exact"
    summable = True
    wire_dtype: str | None = None  # None: keep the gradient dtype

    def __init__(self):
        pass

    def compress(self, x, key: Key = Key()):
        bk, flat, d, shape, dtype = self._flat(x, key.name)
        v = flat if self.wire_dtype in (None, dtype) else bk.astype(flat, self.wire_dtype)
        return Payload(shape=shape, dtype=dtype, count=d, values=v)

    def decode_flat(self, bk, p):
        # sums of gathered payloads accumulate in the gradient's own precision
        return bk.astype(p.values, p.dtype)


@register("compressor", "none")
class Identity(_Cast):
    """No compression: the dense gradient in its own dtype (the baseline)."""


@register("compressor", "fp16")
class FP16(_Cast):
    """Cast to IEEE float16 on the wire: 16 bits per entry, range +-65504. Sums of many
    large gradients can overflow; prefer bf16 when in doubt."""
    wire_dtype = "float16"


@register("compressor", "bf16")
class BF16(_Cast):
    """Cast to bfloat16 on the wire: 16 bits per entry with float32's range and 8 bits of
    mantissa. Safer than fp16 for sums; coarser per value."""
    wire_dtype = "bfloat16"
