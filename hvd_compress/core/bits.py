"""Bit packing of small integer codes (signs, ternary values, quantization levels).

Codes of width w travel as w *bit planes*: plane j holds bit j of every code, eight codes
per byte (little-endian bit order inside a byte). A plane costs ``ceil(n / 8)`` bytes, so
n codes of width w cost ``w * ceil(n / 8)`` bytes: within w - 1 bytes of the information
bound, and packing is one cheap vectorised pass per plane on every backend.
"""
from __future__ import annotations

_WEIGHTS = [1, 2, 4, 8, 16, 32, 64, 128]


def plane_bytes(n: int) -> int:
    return (n + 7) // 8


def pack_codes(bk, codes, width: int):
    """Pack non-negative integer codes (< 2**width) into a uint8 tensor of bit planes."""
    pad = (-bk.size(codes)) % 8  # a tensor when the length is dynamic (inside a graph)
    c = bk.astype(codes, "int32" if width > 8 else "uint8")
    if not isinstance(pad, int) or pad:
        c = bk.concat([c, bk.zeros(pad, bk.dtype(c), c)])
    rows = bk.reshape(c, (-1, 8))
    cols = [rows[:, i] for i in range(8)]
    planes = []
    for j in range(width):
        byte = None
        for i, col in enumerate(cols):  # bit j of code i lands at bit i of the byte
            bit = bk.band(bk.rshift(col, j), 1)
            bit = bk.lshift(bit, i) if i else bit
            byte = bit if byte is None else bk.bor(byte, bit)
        planes.append(bk.astype(byte, "uint8"))
    return planes[0] if width == 1 else bk.concat(planes)


def unpack_codes(bk, packed, width: int, n):
    """Inverse of :func:`pack_codes`: n integer codes (uint8 up to 8 bits, else int32)."""
    nb = plane_bytes(n)
    dtype = "uint8" if width <= 8 else "int32"
    shifts = bk.constant(list(range(8)), dtype, packed)
    codes = None
    for j in range(width):
        plane = bk.reshape(bk.astype(packed[j * nb:(j + 1) * nb], dtype), (-1, 1))
        bits = bk.reshape(bk.band(bk.rshift(plane, shifts), 1), (-1,))[:n]
        codes = bits if codes is None else bk.bor(codes, bk.lshift(bits, j))
    return codes
