"""What travels: the :class:`Payload` of one compressed tensor and its wire format.

A payload holds up to four segments, all 1-D tensors on the gradient's device:

* ``scales``  -- a few float32 scalars (norms, per-bucket scales);
* ``indices`` -- int64 positions of the kept entries (int32, int64, or delta + varint
  bytes on the wire, see :mod:`hvd_compress.core.varint`);
* ``values``  -- the kept values, in the gradient dtype or a cast of it;
* ``codes``   -- bit-packed integer codes (signs, quantization levels) as uint8.

On the wire a payload is one contiguous uint8 buffer, little-endian throughout: a
24-byte header, then (for varint indices) the int64 byte length of the index stream, then
the segments ordered by item size, largest first, so every segment is naturally aligned
and no padding is needed. ``wire_bits`` is exactly ``8 * len(buffer)``: what a collective
moves, header included.

The header (version 1)::

    byte  0      magic 0xC5
    byte  1      format version (1)
    byte  2      flags: bit 0 = the sender's tensor held a NaN or an infinity
    byte  3      index width: 4 (int32), 8 (int64), 1 (varint)
    byte  4      value dtype code (0 none, 1 float16, 2 bfloat16, 3 float32, 4 float64, 5 uint8)
    byte  5      code width in bits (0 without codes)
    bytes 6-7    level, uint16 (a per-rank level such as QSGD's s; 0 when fixed)
    bytes 8-11   entry count, uint32 (tensors of 2**32 entries or more are refused)
    bytes 12-23  the sender's :class:`Stamp`: three uint32 fingerprints of its spec,
                 the tensor's name, shape and dtype, and its seed and transport

A receiver checks every field against its own layout for the same tensor and raises
:class:`HvdCompressError` naming the tensor and the ranks that differ: ranks that disagree
on the spec, the seed or the shape fail loudly on every rank instead of decoding
garbage. Hosts must be little-endian (every platform Horovod runs on is).
"""
from __future__ import annotations

import struct
import sys
import zlib
from typing import Any, NamedTuple

import numpy as np

from ..errors import HvdCompressError
from .ops import ITEMSIZE
from .varint import check_stream, decode_sorted

MAGIC = 0xC5
VERSION = 1
HEADER_BYTES = 24
FLAG_NONFINITE = 1
MAX_COUNT = (1 << 32) - 1
_DTYPE_CODE = {None: 0, "float16": 1, "bfloat16": 2, "float32": 3, "float64": 4, "uint8": 5}
_HEAD = struct.Struct("<BBBBBBHIIII")  # the header layout above

if sys.byteorder != "little":  # segments are bitcast in place, so the host order is the wire's
    raise HvdCompressError("hvd_compress's wire format is little-endian; this host is not")


STAMP_FIELDS = ("compression spec", "name, shape or dtype",
                 "seed, transport or nonfinite policy")


class Stamp(NamedTuple):
    """Fingerprints a receiver compares with its own: (spec; tensor name, shape and dtype;
    seed and transport, including the non-finite policy), each a CRC-32 of its text."""
    spec: int = 0
    layout: int = 0
    origin: int = 0

    @classmethod
    def of(cls, spec: str, name: str, shape, dtype: str, seed: int, transport: str) -> "Stamp":
        crc = lambda s: zlib.crc32(s.encode())  # noqa: E731
        return cls(crc(spec), crc(f"{name}:{tuple(int(s) for s in shape)}:{dtype}"),
                   crc(f"{int(seed)}:{transport}"))


def check_stamps(what: str, stamps, mine: str):
    """Raise :class:`HvdCompressError` (identically on every rank that calls it with the
    same gathered ``stamps``, one per rank) when the ranks' fingerprints differ; ``mine``
    describes this rank's configuration for the message."""
    if all(s == stamps[0] for s in stamps):
        return
    differ = [f for i, f in enumerate(STAMP_FIELDS) if len({s[i] for s in stamps}) > 1]
    groups: dict = {}
    for r, s in enumerate(stamps):
        groups.setdefault(tuple(s), []).append(r)
    raise HvdCompressError(
        f"ranks disagree on the {' and '.join(differ)} of {what}: ranks "
        f"{' vs '.join(str(g) for g in sorted(groups.values()))} (this rank: {mine}); "
        "every rank must compress it the same way")


class Payload(NamedTuple):
    """One compressed tensor.

    Attributes:
      shape: the original tensor shape.
      dtype: the original dtype name (decompression restores it).
      count: number of entries encoded (k for sparse payloads, d for dense ones).
      values, indices, codes, scales: the segments described in the module docstring;
        ``None`` where a compressor does not use one.
      code_bits: bits per code in ``codes`` (0 if unused); codes travel as that many
        bit planes of ``ceil(count / 8)`` bytes each (see :mod:`hvd_compress.core.bits`).
      index_dtype: "int32", "int64" or "varint": how indices travel.
      index_code: the varint bytes of ``indices`` when ``index_dtype == "varint"``.
      level: a compressor's level when it can change per step and per rank (QSGD's s under
        the dynamic policy), 0 otherwise; travels in the header with ``code_bits``.

    The segments are tensors of whichever framework the gradient came from (numpy, torch
    or TensorFlow), hence ``Any``; so is ``count``, an int or, inside a graph, a tensor.
    """
    shape: tuple
    dtype: str
    count: Any
    values: Any = None
    indices: Any = None
    codes: Any = None
    scales: Any = None
    code_bits: int = 0
    index_dtype: str = "int32"
    index_code: Any = None
    level: int = 0

    @property
    def varint(self) -> bool:
        return self.index_dtype == "varint"

    def segments(self, bk):
        """(name, tensor, wire dtype) in wire order: largest item size first."""
        segs = []
        if self.varint:
            segs.append(("indices", self.index_code, "uint8"))
        elif self.indices is not None:
            segs.append(("indices", self.indices, self.index_dtype))
        if self.values is not None:
            segs.append(("values", self.values, bk.dtype(self.values)))
        if self.scales is not None:
            segs.append(("scales", self.scales, "float32"))
        if self.codes is not None:
            segs.append(("codes", self.codes, "uint8"))
        segs.sort(key=lambda s: -_itemsize(s[2]))
        return segs

    def wire_bytes(self, bk) -> Any:
        """Bytes this payload occupies on the wire, header included."""
        total = _header_bytes(self)
        for _, t, dt in self.segments(bk):
            total = total + bk.size(t) * _itemsize(dt)
        return total

    def wire_bits(self, bk) -> Any:
        return 8 * self.wire_bytes(bk)


def _header_bytes(p: Payload) -> int:
    return HEADER_BYTES + (8 if p.varint else 0)


def _itemsize(dtype: str) -> int:
    # numpy keeps bfloat16 as its uint16 bit pattern
    return ITEMSIZE[dtype]


def _index_width(p: Payload) -> int:
    return 1 if p.varint else ITEMSIZE[p.index_dtype]


def index_dtype_for(d: int) -> str:
    """int32 indices when every position fits, int64 otherwise."""
    return "int32" if d < (1 << 31) else "int64"


def pack(bk, p: Payload, stamp: Stamp = Stamp(), flags=0):
    """Serialise a payload into one contiguous uint8 buffer on its device.

    ``stamp`` identifies the sender's configuration (see :class:`Stamp`); ``flags`` is an
    int or a uint8 scalar tensor (``FLAG_NONFINITE``), which is never read here."""
    like = p.values if p.values is not None else (p.codes if p.codes is not None else p.scales)
    value_code = _DTYPE_CODE[None if p.values is None else _value_dtype_name(bk, p.values)]
    if isinstance(p.count, int) and p.count > MAX_COUNT:
        raise HvdCompressError(f"a payload of {p.count} entries exceeds the wire format's "
                               f"limit of {MAX_COUNT} (a uint32 count); split the tensor")
    if isinstance(p.level, int) and not 0 <= p.level < (1 << 16):
        raise HvdCompressError(f"payload level {p.level} does not fit the header's uint16")
    # fields that are graph tensors (the flags, a count or level chosen in the graph) go
    # in as their low bytes over the constant header's zeros: {offset: (tensor, bytes)}
    fields = {2: (flags, 1), 5: (p.code_bits, 1), 6: (p.level, 2), 8: (p.count, 4)}
    const = {at: t if isinstance(t, int) else 0 for at, (t, _) in fields.items()}
    fixed = list(_HEAD.pack(MAGIC, VERSION, const[2], _index_width(p), value_code, const[5],
                            const[6], const[8], *stamp))
    parts, start = [], 0
    for at, (t, nbytes) in fields.items():  # in offset order
        if not isinstance(t, int):
            if at > start:
                parts.append(bk.constant(fixed[start:at], "uint8", like))
            parts.append(_low_bytes(bk, t, nbytes))
            start = at + nbytes
    parts.append(bk.constant(fixed[start:], "uint8", like))
    if p.varint:
        parts.append(bk.bitcast(bk.reshape(bk.astype(bk.constant([0], "int64", like) +
                                                     bk.size(p.index_code), "int64"), (1,)),
                                "uint8"))
    for name, t, dt in p.segments(bk):
        if name == "indices" and not p.varint:
            t = bk.astype(t, p.index_dtype)
        parts.append(bk.bitcast(bk.flatten(t), "uint8"))
    return bk.concat(parts)


def _low_bytes(bk, t, nbytes: int):
    """The ``nbytes`` low bytes of the integer scalar tensor t, little-endian."""
    if nbytes == 1:
        return bk.reshape(bk.astype(t, "uint8"), (1,))
    return bk.bitcast(bk.reshape(bk.astype(t, "int64"), (1,)), "uint8")[:nbytes]


def levels_vary(p: Payload) -> bool:
    """Whether payloads like p carry a level (and code width) that may differ per rank
    and step, in each header (a level chosen eagerly, or a tensor inside a graph)."""
    return not isinstance(p.level, int) or p.level != 0


def _at_level(template: Payload, code_bits, level) -> Payload:
    """``template`` with a sender's code width and level, where they may differ."""
    return template._replace(code_bits=code_bits, level=level) if levels_vary(template) \
        else template


class Header(NamedTuple):
    """A decoded header (see the module docstring)."""
    flags: int
    index_width: int
    value_code: int
    code_bits: int
    level: int
    count: int  # type: ignore[assignment]  # the field shadows tuple.count on purpose
    stamp: Stamp
    varint_bytes: int = 0


def read_header(raw, name: str = "", rank=None) -> Header:
    """Parse the header bytes (numpy uint8, 24 or 32 for varint) of one rank's buffer;
    refuses anything that is not a version-1 hvd_compress header."""
    raw = np.asarray(raw, np.uint8)
    where = _where(name, rank)
    if raw.size < HEADER_BYTES:
        raise HvdCompressError(f"{where}: {raw.size} bytes cannot hold a {HEADER_BYTES}-byte "
                               "payload header (a truncated or foreign buffer)")
    magic, version, flags, width, vcode, code_bits, level, count, *stamp = \
        _HEAD.unpack(raw[:HEADER_BYTES].tobytes())
    if magic != MAGIC:
        raise HvdCompressError(f"{where}: not an hvd_compress payload (magic byte {magic:#04x}, "
                               f"expected {MAGIC:#04x})")
    if version != VERSION:
        raise HvdCompressError(f"{where}: wire format version {version}, this hvd_compress "
                               f"reads version {VERSION}; run one hvd_compress version on "
                               "every rank")
    varint_bytes = 0
    if width == 1:
        if raw.size < HEADER_BYTES + 8:
            raise HvdCompressError(f"{where}: truncated varint length")
        varint_bytes = int(raw[HEADER_BYTES:HEADER_BYTES + 8].view("<i8")[0])
    return Header(flags, width, vcode, code_bits, level, count, Stamp(*stamp), varint_bytes)


def check_header(h: Header, template: Payload, expect, name: str = "", rank=None, bk=None):
    """Compare a received header with the receiver's own layout for the same tensor.

    ``expect`` is the receiver's :class:`Stamp` (None skips the fingerprints)."""
    where = _where(name, rank)
    if expect is not None and h.stamp != expect:
        differ = [what for what, a, b in zip(STAMP_FIELDS, h.stamp, expect) if a != b]
        raise HvdCompressError(
            f"{where}: ranks disagree on the {' and '.join(differ)} of this tensor; every "
            f"rank must compress it with the same spec, seed and shape")
    if h.flags & ~FLAG_NONFINITE:
        raise HvdCompressError(f"{where}: unknown header flags {h.flags:#04x}")
    mine = (_index_width(template), _DTYPE_CODE[None if template.values is None else
                                                _value_dtype_name(bk, template.values)])
    if (h.index_width, h.value_code) != mine:
        raise HvdCompressError(f"{where}: index width / value dtype code "
                               f"{h.index_width, h.value_code} differ from this rank's {mine}")
    if template.level:
        if not 1 <= h.level or not 2 <= h.code_bits <= 16 or (1 << (h.code_bits - 1)) <= h.level:
            raise HvdCompressError(f"{where}: level {h.level} does not fit {h.code_bits}-bit codes")
    elif (h.code_bits, h.level) != (template.code_bits, template.level):
        raise HvdCompressError(f"{where}: code width {h.code_bits} and level {h.level} differ "
                               f"from this rank's {template.code_bits} and {template.level}")
    numel = _numel(template.shape)
    sparse = template.indices is not None or template.varint
    dense_count = template.count if isinstance(template.count, int) else h.count
    if (sparse and h.count > numel) or (not sparse and h.count != dense_count):
        raise HvdCompressError(f"{where}: {h.count} entries do not fit a tensor of {numel}")
    if template.varint and not h.count <= h.varint_bytes <= 9 * h.count:
        raise HvdCompressError(f"{where}: a varint stream of {h.varint_bytes} bytes cannot hold "
                               f"{h.count} positions")


def unpack(bk, buf, template: Payload, expect=None, name: str = ""):
    """Rebuild a payload from a buffer made by :func:`pack`, checking its header against
    ``template`` (the receiver's own payload for the same tensor) and ``expect`` (a
    :class:`Stamp`, or None to skip the fingerprints).

    Eagerly every field, length and index is checked, so a malformed buffer raises
    :class:`HvdCompressError` and is never read out of bounds. Inside a graph the sizes
    come from the header as tensors and the checks run as a host callback when the step
    runs."""
    return unpack_flagged(bk, buf, template, expect, name)[0]


def unpack_flagged(bk, buf, template: Payload, expect=None, name: str = "", rank=None,
                   raw=None, check_indices: bool = True):
    """:func:`unpack`, also returning the header's flags (``rank`` names the sender in
    errors). ``raw``: the header's bytes, already on the host (numpy); ``check_indices``
    false leaves the bounds of plain indices to the caller (:func:`split_gathered` checks
    every rank's at once)."""
    if not bk.eager():
        return _unpack_graph(bk, buf, template, expect, name, rank)
    if raw is None:
        raw = bk.to_numpy(buf[:HEADER_BYTES + 8]) if bk.size(buf) >= HEADER_BYTES + 8 \
            else bk.to_numpy(buf)
    h = read_header(raw, name, rank)
    check_header(h, template, expect, name, rank, bk)
    t = _at_level(template, h.code_bits, h.level)
    sizes = template_sizes(t, h.count)
    if t.varint:
        sizes["indices"] = h.varint_bytes
    total = _header_bytes(t) + sum(sizes[s] * _itemsize(dt) for s, _, dt in t.segments(bk))
    if bk.size(buf) != total:
        raise HvdCompressError(f"{_where(name, rank)}: buffer of {bk.size(buf)} bytes, its header "
                               f"describes {total}")
    fields = _segments(bk, buf, t, sizes, h.count)
    numel = _numel(t.shape)
    if t.varint:
        check_stream(bk.to_numpy(fields["index_code"]), h.count, numel, _where(name, rank))
    elif check_indices and fields["indices"] is not None and h.count:
        _check_bounds(bk, [fields["indices"]], numel, name, [rank])
    if t.varint:
        fields["indices"] = decode_sorted(bk, fields["index_code"], h.count)
    return t._replace(count=h.count, **fields), h.flags


def _segments(bk, buf, t: Payload, sizes, count):
    fields = {k: None for k in ("values", "indices", "codes", "scales", "index_code")}
    offset = _header_bytes(t)
    for name, _, dt in t.segments(bk):
        nbytes = sizes[name] * _itemsize(dt)
        seg = bk.bitcast(buf[offset:offset + nbytes], dt)
        if name == "indices" and t.varint:
            fields["index_code"] = seg
        elif name == "indices":
            fields["indices"] = bk.astype(seg, "int64")
        else:
            fields[name] = seg
        offset = offset + nbytes
    return fields


def _unpack_graph(bk, buf, template, expect, name, rank):
    """Graph-mode unpack: sizes are tensors read from the header; a host callback checks
    the header when the step runs (its result, the flags, feeds the update)."""
    tf = bk.tf
    head = buf[:HEADER_BYTES + (8 if template.varint else 0)]
    # the host compares fields with ints; a level chosen in the graph is any level there
    host = template._replace(level=1) if levels_vary(template) else template

    def check(raw):
        h = read_header(raw, name, rank)
        check_header(h, host, expect, name, rank, bk)
        return np.uint8(h.flags)

    flags = tf.numpy_function(check, [head], tf.uint8, stateful=True,
                              name="hvd_compress_check_header")
    template = _sender_level(bk, buf, template)
    dense = template.indices is None and not template.varint
    count = template.count if dense and isinstance(template.count, int) else \
        _read_uint(bk, buf[8:12], 4)  # a dense payload's count is the tensor's size
    sizes = template_sizes(template, count)
    if template.varint:
        sizes["indices"] = _read_uint(bk, buf[HEADER_BYTES:HEADER_BYTES + 8], 8)
    with tf.control_dependencies([flags]):
        buf = tf.identity(buf)
    fields = _segments(bk, buf, template, sizes, count)
    if template.varint:
        fields["indices"] = decode_sorted(bk, fields["index_code"], count)
    return template._replace(count=count, **fields), flags


def split_gathered(bk, gathered, template: Payload, n: int, fixed_size: bool, expect=None,
                   name: str = "", defer: bool = False):
    """Cut the concatenation of n ranks' buffers into n payloads shaped like ``template``.

    Returns ``(payloads, flags)``: flags per rank (ints, or a tensor inside a graph).
    Equal-size payloads (``fixed_size``) are cut at multiples of the local length; other
    ones (and equal-size ones whose total length is off) by reading each rank's header in
    turn. Every header is checked (see :func:`unpack`).

    ``defer``: where the payloads are equal-size, check them on the device instead
    (:func:`_split_on_device`) and return the verdict as ``flags``, an int64 tensor that
    the caller reads when it likes and hands to :func:`raise_for_verdict` before it uses
    anything; elsewhere ``flags`` are ints as without it."""
    nbytes = template.wire_bytes(bk)
    total = bk.size(gathered)
    raws = None  # the headers, where reading them on the host found the cuts
    if defer and bk.eager() and fixed_size and total == n * nbytes and expect is not None \
            and not template.varint and not template.level and isinstance(template.count, int):
        return _split_on_device(bk, gathered, template, n, expect)
    if bk.eager() and fixed_size and total == n * nbytes and not template.varint and \
            not template.level and isinstance(template.count, int):
        return _split_equal(bk, gathered, template, n, nbytes, expect, name)
    if fixed_size and (not bk.eager() or total == n * nbytes):
        cuts = [(r * nbytes, (r + 1) * nbytes) for r in range(n)]
    elif bk.eager():
        cuts, raws = _walk(bk, gathered, template, n, name)
    else:
        cuts = _walk_graph(bk, gathered, template, n)
    payloads, flags = [], []
    if not bk.eager():
        for r, (a, b) in enumerate(cuts):
            p, f = unpack_flagged(bk, gathered[a:b], template, expect, name, r)
            payloads.append(p)
            flags.append(f)
        return payloads, bk.tf.stack(flags)
    if raws is None:  # every header in one copy to the host
        heads = [(a, min(b, a + HEADER_BYTES + 8)) for a, b in cuts]
        raw = bk.to_numpy(bk.concat([gathered[a:b] for a, b in heads]))
        offsets = np.cumsum([0] + [b - a for a, b in heads])
        raws = [raw[offsets[r]:offsets[r + 1]] for r in range(n)]
    for r, (a, b) in enumerate(cuts):  # every rank's indices are checked at once, below
        p, f = unpack_flagged(bk, gathered[a:b], template, expect, name, r, raw=raws[r],
                              check_indices=False)
        payloads.append(p)
        flags.append(f)
    plain = [(r, p.indices) for r, p in enumerate(payloads)
             if not p.varint and p.indices is not None and p.count]
    if plain:
        _check_bounds(bk, [i for _, i in plain], _numel(template.shape), name,
                      [r for r, _ in plain])
    return payloads, flags


def _split_equal(bk, gathered, template: Payload, n: int, nbytes: int, expect, name: str):
    """Eagerly, n equal-size payloads: every header checked on the host (one copy of
    them all), then each segment cut for all ranks at once (:func:`_cut_rows`)."""
    rows, flags = bk.reshape(gathered, (n, nbytes)), []
    heads = bk.to_numpy(rows[:, :HEADER_BYTES])
    for r in range(n):
        h = read_header(heads[r], name, r)
        check_header(h, template, expect, name, r, bk)
        if h.count != template.count:
            raise HvdCompressError(f"{_where(name, r)}: buffer of {nbytes} bytes, its header "
                                   f"describes {h.count} entries, this rank's {template.count}")
        flags.append(h.flags)
    fields = _cut_rows(bk, rows, template, n)
    every, numel = fields["indices"], _numel(template.shape)
    if every is not None and template.count and \
            bool((bk.min(every) < 0) | (bk.max(every) >= numel)):
        _check_bounds(bk, [every[r] for r in range(n)], numel, name, list(range(n)))
    return _by_rank(template, fields, n), flags


#: bits of a device verdict (see :func:`_split_on_device`) beside the header's flags
VERDICT_HEADER = 64    # the header differs from this rank's, flags aside
VERDICT_BOUNDS = 128   # an index lies outside the tensor


def _split_on_device(bk, gathered, template: Payload, n: int, expect: Stamp):
    """Equal-size payloads cut and checked on the device, with nothing read on the host.

    Every header must equal the one this rank would send (its :class:`Stamp` ``expect``,
    layout and count), flags aside; every plain index must lie in the tensor. Returns
    ``(payloads, verdict)``, the verdict an int64 tensor of one code per rank: the
    header's flags, plus :data:`VERDICT_HEADER` or :data:`VERDICT_BOUNDS`. Indices outside
    the tensor are clamped to 0, so decoding never reads out of bounds; nothing here is
    valid until :func:`raise_for_verdict` has passed on the codes."""
    nbytes = template.wire_bytes(bk)
    rows = bk.reshape(gathered, (n, nbytes))
    mine = list(_HEAD.pack(MAGIC, VERSION, 0, _index_width(template),
                           _DTYPE_CODE[None if template.values is None else
                                       _value_dtype_name(bk, template.values)],
                           template.code_bits, template.level, template.count, *expect))
    flags = rows[:, 2]
    nonfinite = bk.astype(flags == FLAG_NONFINITE, "int64")
    # bytes unlike this rank's header, but for a flags byte saying "not finite" (mine is 0)
    unlike = bk.sum_rows(bk.astype(rows[:, :HEADER_BYTES] !=
                                   bk.constant(mine, "uint8", gathered), "int64")) - nonfinite
    verdict = nonfinite + VERDICT_HEADER * bk.astype(unlike > 0, "int64")
    fields = _cut_rows(bk, rows, template, n)
    every = fields["indices"]
    if every is not None and template.count:
        numel = _numel(template.shape)
        outside = (every < 0) | (every >= numel)
        verdict = verdict + VERDICT_BOUNDS * bk.astype(
            bk.sum_rows(bk.astype(outside, "int64")) > 0, "int64")
        fields["indices"] = bk.where(outside, bk.zeros(1, "int64", every), every)
    return _by_rank(template, fields, n), verdict


def _cut_rows(bk, rows, template: Payload, n: int) -> dict:
    """Each segment of n equal-size payloads (``rows``, one rank's bytes per row) as one
    (n, entries) tensor: one copy per segment, not one per rank and segment (on a small
    tensor the per-rank work outweighs the bytes). Plain payloads only (no varint)."""
    fields: dict[str, Any] = dict.fromkeys(("values", "indices", "codes", "scales",
                                            "index_code"))
    sizes, offset = template_sizes(template, template.count), HEADER_BYTES
    for seg, _, dt in template.segments(bk):
        width = sizes[seg] * _itemsize(dt)
        block = bk.bitcast(bk.flatten(rows[:, offset:offset + width]), dt)
        fields[seg] = bk.reshape(bk.astype(block, "int64") if seg == "indices" else block,
                                 (n, sizes[seg]))
        offset += width
    return fields


def _by_rank(template: Payload, fields: dict, n: int) -> list:
    """The n payloads whose segments are the rows of :func:`_cut_rows`'s tensors."""
    payloads = []
    for r in range(n):
        mine: dict[str, Any] = {k: None if v is None else v[r] for k, v in fields.items()}
        payloads.append(template._replace(**mine))
    return payloads


def raise_for_verdict(bk, codes, gathered, template: Payload, n: int, expect, name: str):
    """Raise, naming the first offending rank and what it sent, where a device verdict's
    ``codes`` (ints, read by the caller) found a header unlike this rank's or an index
    outside the tensor; the error path reads the headers on the host."""
    nbytes = template.wire_bytes(bk)
    for r, code in enumerate(codes):
        if code & VERDICT_HEADER:
            h = read_header(bk.to_numpy(gathered[r * nbytes:r * nbytes + HEADER_BYTES + 8]),
                            name, r)
            check_header(h, template, expect, name, r, bk)
            raise HvdCompressError(f"{_where(name, r)}: its header differs from this rank's "
                                   f"(entry count {h.count}, this rank's {template.count})")
        if code & VERDICT_BOUNDS:
            raise HvdCompressError(f"{_where(name, r)}: an index lies outside the tensor's "
                                   f"{_numel(template.shape)} entries")


def _check_bounds(bk, indices, numel: int, name: str, ranks):
    """Raise, naming the first offending rank, unless every index lies in [0, numel):
    one read on the host for all of them."""
    idx = indices[0] if len(indices) == 1 else bk.concat(indices)
    if bool((bk.min(idx) < 0) | (bk.max(idx) >= numel)):
        for r, i in zip(ranks, indices):
            if bool((bk.min(i) < 0) | (bk.max(i) >= numel)):
                raise HvdCompressError(f"{_where(name, r)}: an index lies outside the "
                                       f"tensor's {numel} entries")


def _walk(bk, gathered, template, n, name):
    """Eager cut points of n variable-size buffers, read header by header, and the
    headers' bytes (numpy)."""
    cuts, raws, offset, total = [], [], 0, bk.size(gathered)
    for r in range(n):
        raw = bk.to_numpy(gathered[offset:offset + HEADER_BYTES + 8])
        raws.append(raw)
        h = read_header(raw, name, r)
        t = _at_level(template, h.code_bits, h.level)
        sizes = template_sizes(t, h.count)
        if template.varint:
            sizes["indices"] = h.varint_bytes
        nbytes = _header_bytes(t) + sum(sizes[s] * _itemsize(dt) for s, _, dt in t.segments(bk))
        if offset + nbytes > total:
            raise HvdCompressError(f"{_where(name, r)}: its header describes {nbytes} bytes, "
                                   f"only {total - offset} arrived")
        cuts.append((offset, offset + nbytes))
        offset += nbytes
    if offset != total:
        raise HvdCompressError(f"{_where(name, None)}: {total - offset} bytes left after "
                               f"{n} payloads")
    return cuts, raws


def _walk_graph(bk, gathered, template, n):
    """Graph-mode cut points: lengths follow from each header's count (tensors)."""
    cuts, offset = [], 0
    dense = template.indices is None and not template.varint
    for _ in range(n):
        count = template.count if dense and isinstance(template.count, int) else \
            _read_uint(bk, gathered[offset + 8:offset + 12], 4)
        sizes = template_sizes(_sender_level(bk, gathered[offset:offset + HEADER_BYTES],
                                             template), count)
        if template.varint:
            sizes["indices"] = _read_uint(bk, gathered[offset + HEADER_BYTES:
                                                       offset + HEADER_BYTES + 8], 8)
        nbytes = _header_bytes(template) + sum(sizes[s] * _itemsize(dt)
                                               for s, _, dt in template.segments(bk))
        cuts.append((offset, offset + nbytes))
        offset = offset + nbytes
    return cuts


def _read_uint(bk, buf, n: int):
    """The little-endian unsigned integer in the n (1 to 8) bytes of buf (an int
    eagerly, an int64 tensor inside a graph)."""
    if n < 8:
        buf = bk.concat([buf, bk.zeros(8 - n, "uint8", buf)])
    c = bk.reshape(bk.bitcast(buf, "int64"), ())
    return int(c) if bk.eager() else bk.astype(c, "int64")


def _sender_level(bk, head, template: Payload) -> Payload:
    """``template`` with the code width and level of the header ``head``, where they may
    differ per rank (as tensors inside a graph)."""
    if not levels_vary(template):
        return template
    return template._replace(code_bits=_read_uint(bk, head[5:6], 1),
                             level=_read_uint(bk, head[6:8], 2))


def template_sizes(template: Payload, count):
    """Segment lengths of a payload like ``template`` holding ``count`` entries."""
    sizes = {"values": count, "indices": count}
    if template.scales is not None:
        sizes["scales"] = _static_len(template.scales)
    if template.codes is not None:
        sizes["codes"] = template.code_bits * ((count + 7) // 8)
    return sizes


def _static_len(t):
    return int(t.shape[0])


def _numel(shape):
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _where(name, rank) -> str:
    who = f"tensor {name!r}" if name else "payload"
    return who if rank is None else f"{who} from rank {rank}"


def _value_dtype_name(bk, v):
    name = bk.dtype(v)
    if name == "uint16":  # numpy's bfloat16 bit pattern
        return "bfloat16"
    if name not in _DTYPE_CODE:
        raise HvdCompressError(f"payload values have unsupported dtype {name}")
    return name
