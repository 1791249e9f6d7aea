"""Delta + varint coding of sorted positions, vectorised on every backend.

Top-k positions are sorted, so the gaps between them are small: at 1% density the typical
gap is about 100, which fits one 7-bit varint byte instead of a 32-bit index. Each gap is
written as little-endian groups of 7 bits, the high bit of a byte saying "more follows".
Encoding and decoding are a handful of whole-array operations (no per-entry loop):
lengths, an exclusive prefix sum for byte offsets, and one scatter per byte position.
"""
from __future__ import annotations

MAX_BYTES = 5  # 35 bits of gap: every tensor with fewer than 2**35 entries


def encode_sorted(bk, idx):
    """uint8 varint stream of the gaps of sorted int64 positions ``idx``."""
    n = bk.size(idx)
    if isinstance(n, int) and n == 0:
        return bk.zeros(0, "uint8", idx)
    zero = bk.zeros(1, "int64", idx)
    gaps = idx - bk.concat([zero, idx[:-1]])
    nbytes = bk.astype(gaps >= 0, "int64")  # every gap takes at least one byte
    for b in range(1, MAX_BYTES):
        nbytes = nbytes + bk.astype(gaps >= (1 << (7 * b)), "int64")
    ends = bk.cumsum(nbytes)
    starts = ends - nbytes
    total = ends[-1]
    out = None
    for b in range(MAX_BYTES):
        sel = bk.nonzero(nbytes > b)
        group = bk.rshift(bk.gather(gaps, sel), 7 * b) & 0x7F
        more = bk.astype(bk.gather(nbytes, sel) > b + 1, "int64") * 0x80
        part = bk.scatter_add(_int(bk, total), bk.gather(starts, sel) + b, group + more)
        out = part if out is None else out + part
    return bk.astype(out, "uint8")


def decode_sorted(bk, code, count):
    """The int64 positions an :func:`encode_sorted` stream of ``count`` gaps stands for."""
    b = bk.astype(code, "int64")
    last = bk.astype(b < 0x80, "int64")                 # the final byte of each gap
    entry = bk.cumsum(last) - last                       # which gap each byte belongs to
    first = bk.concat([bk.constant([1], "int64", b), last[:-1]])
    start_of = bk.gather(bk.nonzero(first > 0), entry)   # where that gap's bytes begin
    shift = bk.arange(bk.size(b), b) - start_of          # byte position inside the gap
    weights = bk.constant([1 << (7 * i) for i in range(MAX_BYTES)], "int64", b)
    gaps = bk.scatter_add(count, entry, (b & 0x7F) * bk.gather(weights, shift))
    return bk.cumsum(gaps)


def _int(bk, t):
    return int(t) if bk.eager() else t
