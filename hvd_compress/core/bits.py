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
    c = bk.astype(codes, "int32")
    if not isinstance(pad, int) or pad:
        c = bk.concat([c, bk.zeros(pad, "int32", c)])
    rows = bk.reshape(c, (-1, 8))
    weights = bk.constant(_WEIGHTS, "int32", c)
    planes = []
    for j in range(width):
        bit = (rows // (1 << j)) % 2 if j else rows % 2
        planes.append(bk.astype(bk.sum_rows(bit * weights), "uint8"))
    return planes[0] if width == 1 else bk.concat(planes)


def unpack_codes(bk, packed, width: int, n):
    """Inverse of :func:`pack_codes`: n int32 codes."""
    nb = plane_bytes(n)
    weights = bk.constant(_WEIGHTS, "int32", packed)
    codes = None
    for j in range(width):
        plane = bk.astype(packed[j * nb:(j + 1) * nb], "int32")
        bits = (bk.reshape(plane, (-1, 1)) // weights) % 2
        bits = bk.reshape(bits, (-1,))[:n]
        codes = bits if codes is None else codes + bits * (1 << j)
    return codes
