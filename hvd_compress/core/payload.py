"""What travels: the :class:`Payload` of one compressed tensor and its wire format.

A payload holds up to four segments, all 1-D tensors on the gradient's device:

* ``scales``  -- a few float32 scalars (norms, per-bucket scales);
* ``indices`` -- int64 positions of the kept entries (int32, int64, or delta + varint
  bytes on the wire, see :mod:`hvd_compress.core.varint`);
* ``values``  -- the kept values, in the gradient dtype or a cast of it;
* ``codes``   -- bit-packed integer codes (signs, quantization levels) as uint8.

On the wire a payload is one contiguous uint8 buffer: an 8-byte header (entry count as
uint32, index width, value dtype, code width, level) followed by the segments ordered by item size, largest
first, so every segment is naturally aligned and no padding is needed. Varint indices add
an 8-byte length after the header. ``wire_bits`` is exactly ``8 * len(buffer)``: what a
collective moves, header included.
"""
from __future__ import annotations

from typing import NamedTuple

from ..errors import HvdCompressError
from .ops import ITEMSIZE
from .varint import decode_sorted

HEADER_BYTES = 8
_DTYPE_CODE = {None: 0, "float16": 1, "bfloat16": 2, "float32": 3, "float64": 4, "uint8": 5}


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
    """
    shape: tuple
    dtype: str
    count: object
    values: object = None
    indices: object = None
    codes: object = None
    scales: object = None
    code_bits: int = 0
    index_dtype: str = "int32"
    index_code: object = None
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

    def wire_bytes(self, bk) -> object:
        """Bytes this payload occupies on the wire, header included."""
        total = _header_bytes(self)
        for _, t, dt in self.segments(bk):
            total = total + bk.size(t) * _itemsize(dt)
        return total

    def wire_bits(self, bk) -> object:
        return 8 * self.wire_bytes(bk)


def _header_bytes(p: Payload) -> int:
    return HEADER_BYTES + (8 if p.varint else 0)


def _itemsize(dtype: str) -> int:
    # numpy keeps bfloat16 as its uint16 bit pattern
    return ITEMSIZE[dtype]


def index_dtype_for(d: int) -> str:
    """int32 indices when every position fits, int64 otherwise."""
    return "int32" if d < (1 << 31) else "int64"


def pack(bk, p: Payload):
    """Serialise a payload into one contiguous uint8 buffer on its device."""
    like = p.values if p.values is not None else (p.codes if p.codes is not None else p.scales)
    value_code = _DTYPE_CODE[None if p.values is None else _value_dtype_name(bk, p.values)]
    count = bk.astype(bk.reshape(bk.constant([0], "int64", like) + p.count, (1,)), "int32") \
        if not isinstance(p.count, int) else bk.constant([p.count], "int32", like)
    width = 0 if p.varint else ITEMSIZE[p.index_dtype]
    flags = bk.constant([width, value_code, p.code_bits, p.level], "uint8", like)
    parts = [bk.bitcast(count, "uint8"), flags]
    if p.varint:
        parts.append(bk.bitcast(bk.reshape(bk.astype(bk.constant([0], "int64", like) +
                                                     bk.size(p.index_code), "int64"), (1,)),
                                "uint8"))
    for name, t, dt in p.segments(bk):
        if name == "indices" and not p.varint:
            t = bk.astype(t, p.index_dtype)
        parts.append(bk.bitcast(bk.flatten(t), "uint8"))
    return bk.concat(parts)


def unpack(bk, buf, template: Payload, count=None):
    """Rebuild a payload from a buffer made by :func:`pack`.

    ``template`` is the receiver's own payload layout for the same tensor (shape, dtypes,
    which segments exist and their lengths as a function of the count). ``count`` is read
    from the header when not given.
    """
    if count is None:
        count = _read_count(bk, buf)
    if template.level:  # per-rank level: its code width and level are in the header
        head = bk.to_numpy(buf[6:8])
        template = template._replace(code_bits=int(head[0]), level=int(head[1]))
    sizes = template_sizes(template, count)
    if template.varint:
        sizes["indices"] = _read_int(bk, buf[HEADER_BYTES:HEADER_BYTES + 8], "int64")
    fields = {}
    offset = _header_bytes(template)
    for name, _, dt in template.segments(bk):
        n = sizes[name]
        nbytes = n * _itemsize(dt)
        raw = buf[offset:offset + nbytes]
        t = bk.bitcast(raw, dt)
        if name == "indices" and template.varint:
            fields["index_code"] = t
            t = decode_sorted(bk, t, count)
        elif name == "indices":
            t = bk.astype(t, "int64")
        fields[name] = t
        offset = offset + nbytes
    return template._replace(count=count, **{k: fields.get(k) for k in
                                             ("values", "indices", "codes", "scales",
                                              "index_code")})


def split_gathered(bk, gathered, template: Payload, n: int, fixed_size: bool):
    """Cut the concatenation of n ranks' buffers into n payloads shaped like ``template``.

    Equal-size payloads (``fixed_size``) are cut at multiples of the local length; for
    variable-size ones each rank's length is read from its header in turn.
    """
    payloads = []
    if fixed_size:
        nbytes = template.wire_bytes(bk)
        for r in range(n):
            payloads.append(unpack(bk, gathered[r * nbytes:(r + 1) * nbytes], template,
                                   template.count))
        return payloads
    offset = 0
    for _ in range(n):
        count = _read_count(bk, gathered[offset:offset + 4])
        code_bits = int(bk.to_numpy(gathered[offset + 6:offset + 7])[0]) if template.level \
            else template.code_bits
        sizes = template_sizes(template._replace(code_bits=code_bits), count)
        if template.varint:
            sizes["indices"] = _read_int(bk, gathered[offset + HEADER_BYTES:
                                                      offset + HEADER_BYTES + 8], "int64")
        nbytes = _header_bytes(template) + sum(sizes[name] * _itemsize(dt)
                                               for name, _, dt in template.segments(bk))
        payloads.append(unpack(bk, gathered[offset:offset + nbytes], template, count))
        offset += nbytes
    return payloads


def _read_count(bk, buf):
    return _read_int(bk, buf[:4], "int32")


def _read_int(bk, buf, dtype):
    c = bk.reshape(bk.bitcast(buf, dtype), ())
    return int(c) if bk.eager() else bk.astype(c, "int64")


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


def _value_dtype_name(bk, v):
    name = bk.dtype(v)
    if name == "uint16":  # numpy's bfloat16 bit pattern
        return "bfloat16"
    if name not in _DTYPE_CODE:
        raise HvdCompressError(f"payload values have unsupported dtype {name}")
    return name
