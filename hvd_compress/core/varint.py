"""Delta + varint coding of sorted positions, vectorised on every backend.

Top-k positions are sorted, so the gaps between them are small: at 1% density the typical
gap is about 100, which fits one 7-bit varint byte instead of a 32-bit index. Each gap is
written as little-endian groups of 7 bits, the high bit of a byte saying "more follows".
Encoding and decoding are a handful of whole-array operations (no per-entry loop):
lengths, an exclusive prefix sum for byte offsets, and one scatter per byte position.
"""
from __future__ import annotations

import numpy as np

from ..errors import HvdCompressError

MAX_BYTES = 9  # 63 bits of gap: any int64 position


def max_bytes(d) -> int:
    """Bytes the largest gap inside a tensor of d entries can take."""
    if not isinstance(d, int):
        return MAX_BYTES
    return max(1, -(-max(d - 1, 1).bit_length() // 7))


def encode_sorted(bk, idx, d=None):
    """uint8 varint stream of the gaps of sorted int64 positions ``idx`` into a tensor of
    ``d`` entries (which bounds the gaps; any int64 position when None)."""
    n = bk.size(idx)
    if isinstance(n, int) and n == 0:
        return bk.zeros(0, "uint8", idx)
    zero = bk.zeros(1, "int64", idx)
    gaps = idx - bk.concat([zero, idx[:-1]])
    nbytes = bk.astype(gaps >= 0, "int64")  # every gap takes at least one byte
    width = max_bytes(d)
    for b in range(1, width):
        nbytes = nbytes + bk.astype(gaps >= (1 << (7 * b)), "int64")
    ends = bk.cumsum(nbytes)
    starts = ends - nbytes
    total = ends[-1]
    out = None
    for b in range(width):
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


def check_stream(code: np.ndarray, count: int, numel: int, where: str):
    """Refuse a received varint stream that would not decode to ``count`` positions inside
    a tensor of ``numel`` entries (host-side, on the stream's bytes)."""
    code = np.asarray(code, np.uint8)
    ends = np.flatnonzero(code < 0x80)
    if ends.size != count or (count and ends[-1] != code.size - 1):
        raise HvdCompressError(f"{where}: the varint stream holds {ends.size} complete "
                               f"positions, its header says {count}")
    if count == 0:
        return
    lengths = np.diff(np.concatenate([[-1], ends]))
    if lengths.max() > max_bytes(numel):
        raise HvdCompressError(f"{where}: a varint gap of {lengths.max()} bytes exceeds a "
                               f"tensor of {numel} entries")
    pos = decode_numpy(code)
    last = int(pos[-1])
    if np.any(pos[1:] <= pos[:-1]) or last >= numel:
        raise HvdCompressError(f"{where}: varint positions must increase and end inside the "
                               f"tensor's {numel} entries (last: {last})")


def decode_numpy(code: np.ndarray) -> np.ndarray:
    """Positions of a well-formed stream, in numpy (object-free, 63-bit safe)."""
    b = code.astype(np.uint64)
    ends = np.flatnonzero(code < 0x80)
    entry = np.repeat(np.arange(ends.size), np.diff(np.concatenate([[-1], ends])))
    starts = np.concatenate([[0], ends[:-1] + 1])
    shift = np.arange(code.size) - starts[entry]
    gaps = np.zeros(ends.size, np.uint64)
    np.add.at(gaps, entry, (b & np.uint64(0x7F)) << (np.uint64(7) * shift.astype(np.uint64)))
    return np.cumsum(gaps)
