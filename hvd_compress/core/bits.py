"""Bit packing of small integer codes (signs, ternary values, quantization levels).

Codes of width w travel as w *bit planes*: plane j holds bit j of every code, eight codes
per byte (little-endian bit order inside a byte). A plane costs ``ceil(n / 8)`` bytes, so
n codes of width w cost ``w * ceil(n / 8)`` bytes: within w - 1 bytes of the information
bound, and packing is one cheap vectorised pass per plane on every backend.
"""
from __future__ import annotations

# Eight codes at a time, as the eight bytes of one int64 word (little-endian: code i is
# byte i), so each plane costs a few word operations instead of eight per byte:
_BYTE_LSBS = 0x0101010101010101  # bit 0 of every byte; times a byte: that byte in all 8
_GATHER = 0x0102040810204080     # times bit 0 of each byte: bit 0 of byte i at bit 56 + i
_DIAGONAL = 0x8040201008040201 - (1 << 64)  # bit i of byte i (as an int64 value)
_CARRY = 0x00406070787C7E7F      # byte i: 0x80 - 2**i, so bit 7 is set iff bit i was


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= (1 << 63) else v


def plane_bytes(n: int) -> int:
    return (n + 7) // 8


def pack_codes(bk, codes, width: int):
    """Pack non-negative integer codes (< 2**width) into a uint8 tensor of bit planes.
    Codes already padded to a multiple of 8 with zeros pack as the unpadded ones do."""
    pad = (-bk.size(codes)) % 8  # a tensor when the length is dynamic (inside a graph)
    nb = plane_bytes(bk.size(codes))
    packed = bk.zeros(width * nb, "uint8", codes) if bk.mutable else None
    planes = []
    for low in range(0, width, 8):  # wider codes: eight planes per byte of the code
        c = codes if width <= 8 else bk.band(bk.rshift(codes, low), 0xFF)
        c = bk.astype(c, "uint8")
        if not isinstance(pad, int) or pad:
            c = bk.concat([c, bk.zeros(pad, "uint8", c)])
        words = bk.bitcast(c, "int64")
        work = bk.scratch("bits.pack", bk.size(words), "int64", words)
        for j in range(low, min(low + 8, width)):
            w = bk.into(work, "rshift", words, j - low)
            w = bk.into(w, "band", w, _BYTE_LSBS)   # bit j of code i at bit 8i
            w = bk.into(w, "mul", w, _GATHER)       # ... and at bit 56 + i
            w = bk.into(w, "rshift", w, 56)         # the low byte (a cast keeps it)
            plane = None if packed is None else packed[j * nb:(j + 1) * nb]
            planes.append(bk.cast_into(plane, w, "uint8"))
    if packed is not None:
        return packed
    return planes[0] if width == 1 else bk.concat(planes)


def unpack_codes(bk, packed, width: int, n, scratch: bool = False):
    """Inverse of :func:`pack_codes`: n integer codes (uint8 up to 8 bits, else int32).
    ``scratch``: codes of up to 8 bits may lie in working memory that the next call
    reuses (the caller reads them before it unpacks again)."""
    nb = plane_bytes(n)
    groups = []
    for low in range(0, width, 8):
        words = bk.scratch("bits.words", nb, "int64", packed) if scratch and width <= 8 \
            else None
        for j in range(low, min(low + 8, width)):
            plane = packed[j * nb:(j + 1) * nb]  # one byte per word:
            w = bk.cast_into(bk.scratch("bits.plane", nb, "int64", packed) if j > low
                             else words, plane, "int64")
            w = bk.into(w, "mul", w, _BYTE_LSBS)
            w = bk.into(w, "band", w, _DIAGONAL)
            w = bk.into(w, "add", w, _CARRY)
            w = bk.into(w, "rshift", w, 7 - (j - low))
            w = bk.into(w, "band", w, _signed64(_BYTE_LSBS << (j - low)))
            words = w if j == low else bk.into(words, "bor", words, w)
        groups.append(bk.bitcast(words, "uint8")[:n])
    if width <= 8:
        return groups[0]
    return bk.bor(bk.astype(groups[0], "int32"), bk.lshift(bk.astype(groups[1], "int32"), 8))
