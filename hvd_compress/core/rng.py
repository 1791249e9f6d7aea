"""A counter-based random stream that gives the same bits on numpy, torch and TensorFlow.

Stochastic compressors never touch a framework's global RNG. Each draw is a pure function
of a :class:`Key` ``(seed, rank, name, step)`` and the entry's position, computed with
integer ops that every backend evaluates identically (a 32-bit avalanche hash on int32
lanes: two's-complement wrapping multiplies and masked logical shifts). Consequences:

* the same key gives the same rand-k mask on every backend and every device;
* independent masks per rank by default (``rank`` is part of the key), shared masks when a
  compressor is told to drop the rank;
* nothing to checkpoint: the stream restarts exactly from the step number.
"""
from __future__ import annotations

import operator
import zlib
from typing import Any, NamedTuple

from ..errors import HvdCompressError

_M32 = 0xFFFFFFFF
# Odd multipliers of a 32-bit avalanche hash, as signed int32 values (the same residues
# mod 2**32), so int32 lanes multiply them with wrap-around on every backend.
_C1 = 0x7FEB352D
_C2 = 0x846CA68B - (1 << 32)
_GOLD = 0x9E3779B1 - (1 << 32)


class Key(NamedTuple):
    """Where a random draw comes from: a user seed, the rank, the tensor's name, the step.

    ``rank=None`` means the draw is shared by every rank (for example shared rand-k masks).
    """
    seed: int = 0
    rank: int | None = 0
    name: str = ""
    step: Any = 0  # a Python int, or an integer scalar tensor inside tf.function

    def stream(self, salt: int = 0) -> int:
        """The static part of the key, folded into one 32-bit integer."""
        h = _mix_py(self.seed & _M32)
        h = _mix_py(h ^ (0 if self.rank is None else (self.rank + 1) & _M32))
        h = _mix_py(h ^ zlib.crc32(self.name.encode()))
        return _mix_py(h ^ (salt & _M32))


def _mix_py(x: int) -> int:
    x &= _M32
    x ^= x >> 16
    x = (x * _C1) & _M32
    x ^= x >> 15
    x = (x * _C2) & _M32
    return x ^ (x >> 16)


def _signed(v: int) -> int:
    """A 32-bit pattern as the int32 value with the same bits."""
    return v - (1 << 32) if v >= (1 << 31) else v


def _lsr(bk, x, s: int, out=None):
    """Logical right shift of int32 bit patterns (the arithmetic shift, masked): a new
    tensor, or ``out``'s memory where the framework allows."""
    shifted = bk.into(out, "rshift", x, s)
    return bk.into(shifted, "band", shifted, (1 << (32 - s)) - 1)


def _mix(bk, x):
    """The same avalanche as :func:`_mix_py`, on int32 tensors of 32-bit patterns; it
    overwrites x where the framework allows, with one scratch tensor (instead of eleven
    new tensors)."""
    scratch = _lsr(bk, x, 16, bk.scratch("rng.mix", bk.size(x), "int32", x))
    x = bk.into(x, "xor", x, scratch)
    x = bk.mul_(x, _C1)
    x = bk.into(x, "xor", x, _lsr(bk, x, 15, scratch))
    x = bk.mul_(x, _C2)
    return bk.into(x, "xor", x, _lsr(bk, x, 16, scratch))


def random_bits(bk, n: int, key: Key, like, salt: int = 0, out=None, start: int = 0):
    """n pseudo-random 32-bit patterns (int32) for positions start..start+n-1; in
    ``out``'s memory (n int32 entries) where the framework allows, block by block where
    the backend works in blocks (:meth:`~hvd_compress.core.ops.Backend.blocks`)."""
    if isinstance(n, int) and n >= (1 << 31):
        raise HvdCompressError(f"random draws over {n} entries: at most 2**31 - 1 per tensor")
    stream = key.stream(salt)
    step = key.step
    try:  # a Python or numpy integer, or an eager 0-d tensor: its value
        step = operator.index(step)
    except TypeError:  # a step tensor inside a graph
        pass
    if isinstance(step, int):  # a Python scalar: no tensor copied to the device per step
        base = _signed(_mix_py(stream ^ _mix_py(step)))
    else:  # a step tensor inside a graph
        s = bk.copy(bk.astype(step, "int32"))  # _mix overwrites it
        base = _mix(bk, bk.xor(_mix(bk, s), bk.constant(_signed(stream), "int32", like)))
    if out is None or not bk.mutable:
        return _hash_counter(bk, n, like, out, start, base)
    for a, b in bk.blocks(n, like):
        _hash_counter(bk, b - a, like, out[a:b], start + a, base)
    return out


def _hash_counter(bk, n, like, out, start, base):
    counter = bk.arange(n, like, "int32", out, start)
    counter = bk.mul_(counter, _GOLD)
    return _mix(bk, bk.into(counter, "xor", counter, base))


def uniform(bk, n: int, key: Key, like, salt: int = 0, dtype: str = "float32", out=None,
            start: int = 0):
    """n uniforms in [0, 1) with 24 random bits each (exact in float32), identical on
    every backend for the same key, for positions start..start+n-1; in ``out``'s memory
    (n entries of ``dtype``) where the framework allows."""
    bits = random_bits(bk, n, key, like, salt,
                       None if out is None else bk.scratch("rng.bits", n, "int32", like),
                       start)
    bits = _lsr(bk, bits, 8, bits)
    return bk.mul_(bk.cast_into(out, bits, dtype), 1.0 / (1 << 24))


def normal(bk, n: int, key: Key, like, salt: int = 0, dtype: str = "float32"):
    """n standard normals (Box-Muller on two streams of the same key)."""
    u1 = uniform(bk, n, key, like, salt=2 * salt + 1, dtype="float64")
    u2 = uniform(bk, n, key, like, salt=2 * salt + 2, dtype="float64")
    r = (-2.0 * bk.log(1.0 - u1)) ** 0.5       # 1 - u1 lies in (0, 1]
    return bk.astype(r * bk.cos(u2 * (2.0 * 3.141592653589793)), dtype)
