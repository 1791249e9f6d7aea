"""The wire format: a checked, versioned, little-endian header; decoding never trusts the
bytes it is handed; sums of gathered payloads are taken in rank order."""
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hvd_compress as hc
from hvd_compress import HvdCompressError
from hvd_compress.core.ops import backend_for, backend_named
from hvd_compress.core.payload import (
    HEADER_BYTES,
    MAGIC,
    VERSION,
    Stamp,
    pack,
    split_gathered,
    unpack,
)
from hvd_compress.core.rng import Key
from hvd_compress.core.simulate import Workers
from hvd_compress.core.varint import decode_sorted, encode_sorted

NP = backend_named("numpy")
SPECS = ["topk:0.1", "randk:0.2", "threshold:0.5", "qsgd", "terngrad", "sign", "natural",
         "fp16", "bf16", "none", "topk:0.1,indices=varint", "topk:0.1,values=bfloat16",
         "bernoulli:0.2"]
STAMP = Stamp.of("spec", "w", (64,), "float32", 0, "test")


def payload(spec, d=64, seed=0):
    x = np.random.RandomState(seed).standard_normal(d).astype(np.float32)
    c = hc.resolve(spec)
    return c, c.compress(x, Key(0, 0, "w", 0))


def test_header_layout_is_little_endian_and_versioned():
    _, p = payload("topk:k=5")
    buf = pack(NP, p, STAMP, flags=1)
    magic, version, flags, width, vcode, code_bits, level, count, *stamp = \
        struct.unpack("<BBBBBBHIIII", buf[:HEADER_BYTES].tobytes())
    assert (magic, version, flags, width, vcode, count) == (MAGIC, VERSION, 1, 4, 3, 5)
    assert tuple(stamp) == tuple(STAMP)
    assert len(buf) * 8 == p.wire_bits(NP)


@pytest.mark.parametrize("field, byte, value, message", [
    ("magic", 0, 0x00, "not an hvd_compress payload"),
    ("version", 1, 7, "wire format version 7"),
    ("flags", 2, 0x80, "unknown header flags"),
    ("index width", 3, 8, "index width"),
    ("value dtype", 4, 1, "value dtype"),
    ("count", 8, 200, "do not fit a tensor of 64"),
    ("spec fingerprint", 12, 0, "ranks disagree on the compression spec"),
    ("layout fingerprint", 16, 0, "name, shape or dtype"),
    ("origin fingerprint", 20, 0, "seed, transport or nonfinite"),
])
def test_every_header_field_is_checked(field, byte, value, message):
    _, p = payload("topk:k=5")
    buf = pack(NP, p, STAMP).copy()
    buf[byte] = value
    with pytest.raises(HvdCompressError, match=message):
        unpack(NP, buf, p, STAMP, name="w")


def test_counts_past_the_uint32_limit_are_refused_clearly():
    _, p = payload("topk:k=5")
    with pytest.raises(HvdCompressError, match="uint32 count"):
        pack(NP, p._replace(count=1 << 32))


@pytest.mark.parametrize("spec", SPECS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_decoding_hostile_bytes_only_raises_our_error(spec, data):
    """Random bytes, and real buffers with random bytes overwritten, cut or appended:
    decoding either succeeds within the tensor's bounds or raises HvdCompressError."""
    c, p = payload(spec)
    real = pack(NP, p, STAMP)
    how = data.draw(st.sampled_from(["random", "flip", "cut", "grow"]))
    if how == "random":
        buf = np.frombuffer(data.draw(st.binary(max_size=600)), np.uint8)
    elif how == "flip":
        buf = real.copy()
        for _ in range(data.draw(st.integers(1, 6))):
            buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
    elif how == "cut":
        buf = real[:data.draw(st.integers(0, len(real) - 1))]
    else:
        buf = np.concatenate([real, np.frombuffer(data.draw(st.binary(min_size=1, max_size=40)),
                                                  np.uint8)])
    try:
        parts, _ = split_gathered(NP, buf, p, 1, c.fixed_size, STAMP, "w")
    except HvdCompressError:
        return
    dense = c.aggregate(NP, parts)
    assert dense.shape == (64,)


def test_qsgd_levels_never_overflow_their_code_width():
    """With one entry per bucket every |x_j| / ||bucket|| is 1: level s exactly, never s+1."""
    x = np.random.RandomState(3).standard_normal(1000).astype(np.float32)
    for s in (1, 7, 255):
        c = hc.resolve(f"qsgd:s={s},bucket=1")
        for step in range(5):
            np.testing.assert_allclose(c.decompress(c.compress(x, Key(0, 0, "w", step))), x,
                                       rtol=1e-6)


def test_varint_round_trips_gaps_past_two_to_the_35():
    d = 1 << 45
    idx = np.array([0, 5, (1 << 35) + 3, (1 << 44) + 1], np.int64)
    code = encode_sorted(NP, idx, d)
    np.testing.assert_array_equal(decode_sorted(NP, code, idx.size), idx)


def test_bfloat16_values_on_numpy_are_summed_as_numbers():
    w = Workers("topk:k=2,values=bfloat16", 2)
    got = w.step([np.array([1.0, 2.0, 0.0], np.float32)] * 2)
    np.testing.assert_array_equal(got, [1.0, 2.0, 0.0])


@pytest.mark.parametrize("backend", ["numpy", "torch", "tensorflow"])
def test_gathered_payloads_are_summed_in_rank_order(backend):
    """Values chosen so float32 addition order shows: the sum must be rank 0 + rank 1,
    then + rank 2, ..., whatever backend (and, on CUDA, whatever thread schedule)."""
    from conftest import XP
    xp = XP(backend)
    bk = backend_for(xp.asarray(np.zeros(1, np.float32)))
    c = hc.resolve("topk:k=2")
    vals = [np.array([1e8, 3.0], np.float32), np.array([1.0, 1.0], np.float32),
            np.array([-1e8, 1.0], np.float32), np.array([1.0, 7.0], np.float32)]
    parts = [c.compress(xp.asarray(np.array([v[0], 0, 0, v[1]], np.float32)))
             for v in vals]
    got = xp.numpy(c.aggregate(bk, parts))
    want = np.zeros(4, np.float32)
    for v in vals:  # float32, in rank order
        want[0] = np.float32(want[0] + v[0])
        want[3] = np.float32(want[3] + v[1])
    np.testing.assert_array_equal(got, want)


def test_cuda_aggregation_is_bit_identical_across_runs():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the CUDA ordering test runs where a GPU is present")
    bk = backend_named("torch")
    c = hc.resolve("topk:0.5")
    rs = np.random.RandomState(0)
    parts = [c.compress(torch.from_numpy(rs.standard_normal(1 << 16).astype(np.float32))
                        .cuda() * 10 ** r) for r in range(8)]
    first = c.aggregate(bk, parts)
    for _ in range(5):
        assert torch.equal(c.aggregate(bk, parts), first)


@pytest.mark.parametrize("bad", [10, -1])
def test_an_index_outside_the_tensor_names_its_rank(xp, bad):
    """Every rank's indices are checked at once; the error names the rank that sent one
    outside the tensor."""
    c = hc.resolve("topk:k=2")
    x = xp.asarray(np.arange(10, dtype=np.float32))
    p = c.compress(x)
    bk = backend_for(p.values)
    bufs = [np.asarray(xp.numpy(pack(bk, p))) for _ in range(3)]
    bufs[2] = bufs[2].copy()
    bufs[2][24:28] = np.frombuffer(np.int32(bad).tobytes(), np.uint8)  # its first index
    gathered = xp.asarray(np.concatenate(bufs))
    with pytest.raises(HvdCompressError, match="from rank 2: an index lies outside"):
        split_gathered(bk, gathered, p, 3, c.fixed_size)
    parts, _ = split_gathered(bk, xp.asarray(np.concatenate(bufs[:2])), p, 2,
                              c.fixed_size)
    assert [xp.numpy(q.indices).tolist() for q in parts] == [[8, 9], [8, 9]]


def test_a_header_whose_count_differs_names_its_rank(xp):
    """Equal-size buffers whose header claims another entry count are refused, naming
    the rank that sent it."""
    c = hc.resolve("topk:k=2")
    p = c.compress(xp.asarray(np.arange(10, dtype=np.float32)))
    bk = backend_for(p.values)
    bufs = [np.asarray(xp.numpy(pack(bk, p))).copy() for _ in range(3)]
    bufs[1][8:12] = np.frombuffer(np.uint32(3).tobytes(), np.uint8)  # its entry count
    with pytest.raises(HvdCompressError, match="rank 1: buffer of 40 bytes, its header "
                       "describes 3 entries, this rank's 2"):
        split_gathered(bk, xp.asarray(np.concatenate(bufs)), p, 3, c.fixed_size)


@pytest.mark.parametrize("k", [1, 40])
@pytest.mark.parametrize("n", [3, 4])
def test_the_mean_of_sparse_payloads_scales_alike_sparse_or_dense(xp, k, n):
    """Few positions are scaled and checked where they lie, many by a pass over the
    tensor: both give the numpy oracle's float32 mean bit for bit, and both see a NaN."""
    from hvd_compress.core import sparsifiers
    rs = np.random.RandomState(k + n)
    c = hc.resolve(f"topk:k={k}")
    xs = [rs.standard_normal(1000).astype(np.float32) for _ in range(n)]
    parts = [c.compress(xp.asarray(x)) for x in xs]
    bk = backend_for(parts[0].values)
    want = np.zeros(1000, np.float32)
    for p in parts:
        np.add.at(want, xp.numpy(p.indices), xp.numpy(p.values))
    want = want * np.float32(1.0 / n)
    assert (sparsifiers._INDEXED_COST * k * n >= 1000) == (k == 40)
    got, finite = c.mean(bk, parts, n)
    np.testing.assert_array_equal(xp.numpy(got), want)
    assert bool(finite)
    bad = parts[0]._replace(values=parts[0].values * float("nan"))
    assert not bool(c.mean(bk, [bad] + parts[1:], n)[1])


DEVICE_CHECKED = ["topk:k=2", "randk:k=3", "qsgd", "sign", "fp16", "topk:k=2,values=float16"]


def _gathered(xp, spec, n=3):
    c = hc.resolve(spec)
    p = c.compress(xp.asarray(np.arange(10, dtype=np.float32)), Key(0, 0, "w", 0))
    bk = backend_for(next(s for s in (p.values, p.codes) if s is not None))
    stamp = Stamp.of(spec, "w", (10,), "float32", 0, "test")
    bufs = [np.asarray(xp.numpy(pack(bk, p, stamp))).copy() for _ in range(n)]
    return c, p, bk, stamp, bufs


@pytest.mark.parametrize("spec", DEVICE_CHECKED)
def test_equal_size_payloads_are_checked_on_the_device(xp, spec):
    """Deferred, the check of every header and index reads nothing on the host: it
    returns one code per rank (the header's flags, or what is wrong), which
    raise_for_verdict turns into the error the host check gives."""
    from hvd_compress.core.payload import VERDICT_BOUNDS, VERDICT_HEADER, raise_for_verdict
    c, p, bk, stamp, bufs = _gathered(xp, spec)
    bufs[1][2] = 1                                   # rank 1: its tensor was not finite
    parts, verdict = split_gathered(bk, xp.asarray(np.concatenate(bufs)), p, 3, True,
                                    stamp, "w", defer=True)
    assert [int(v) for v in xp.numpy(verdict)] == [0, 1, 0]
    np.testing.assert_array_equal(xp.numpy(c.aggregate(bk, parts)),
                                  3 * xp.numpy(c.decode_flat(bk, p)))
    bufs[2][12] ^= 1                                 # rank 2: another spec
    gathered = xp.asarray(np.concatenate(bufs))
    parts, verdict = split_gathered(bk, gathered, p, 3, True, stamp, "w", defer=True)
    codes = [int(v) for v in xp.numpy(verdict)]
    assert codes == [0, 1, VERDICT_HEADER]
    with pytest.raises(HvdCompressError, match="rank 2: ranks disagree on the compression"):
        raise_for_verdict(bk, codes, gathered, p, 3, stamp, "w")
    with pytest.raises(HvdCompressError, match="rank 2: ranks disagree on the compression"):
        split_gathered(bk, gathered, p, 3, True, stamp, "w")  # the host's check
    for foreign in (0x40, 0xC0, 0xFF):  # flag bits this version does not know
        bufs[0][2] = foreign
        gathered = xp.asarray(np.concatenate(bufs))
        codes = [int(v) for v in xp.numpy(
            split_gathered(bk, gathered, p, 3, True, stamp, "w", defer=True)[1])]
        assert codes == [VERDICT_HEADER, 1, VERDICT_HEADER]
        with pytest.raises(HvdCompressError, match="rank 0: unknown header flags"):
            raise_for_verdict(bk, codes, gathered, p, 3, stamp, "w")
    bufs[0][2] = 0
    if p.indices is None:
        return
    bufs[2][12] ^= 1
    bufs[0][24:28] = np.frombuffer(np.int32(10).tobytes(), np.uint8)  # rank 0: index 10
    gathered = xp.asarray(np.concatenate(bufs))
    parts, verdict = split_gathered(bk, gathered, p, 3, True, stamp, "w", defer=True)
    codes = [int(v) for v in xp.numpy(verdict)]
    assert codes == [VERDICT_BOUNDS, 1, 0]
    assert int(xp.numpy(parts[0].indices).min()) >= 0 and \
        int(xp.numpy(parts[0].indices).max()) < 10  # clamped: decoding stays in bounds
    c.aggregate(bk, parts)
    with pytest.raises(HvdCompressError, match="rank 0: an index lies outside"):
        raise_for_verdict(bk, codes, gathered, p, 3, stamp, "w")


@pytest.mark.parametrize("on_device", [False, True])
def test_a_refused_header_leaves_the_state_as_before_the_step(on_device):
    """Every rank raises on a foreign header, with the feedback state it had before the
    step, whether the headers are checked on the host or on the device."""
    import torch

    from hvd_compress.core.exchange import Exchange
    bk = backend_named("torch")
    type(bk).avoid_syncs_on_cpu = on_device
    try:
        ex = Exchange("topk:k=3+ef14")
        for step in range(2):
            out = ex.begin(bk, "w", torch.arange(10, dtype=torch.float32) - step, 0)
            ex.finish_gathered(bk, torch.cat([out.wire] * 2), out, 2, False)
        before = ex.states["w"].residual.clone()
        out = ex.begin(bk, "w", torch.ones(10), 0)
        other = out.wire.clone()
        other[12] ^= 1  # the other rank's spec fingerprint differs
        with pytest.raises(HvdCompressError, match="rank 1: ranks disagree"):
            ex.finish_gathered(bk, torch.cat([out.wire, other]), out, 2, False)
        assert torch.equal(ex.states["w"].residual, before)
    finally:
        type(bk).avoid_syncs_on_cpu = False


def test_a_collectives_wait_runs_once_and_raises_its_error_again():
    """The torch transports' waits may be called twice (a cast's by the settling of the
    step's resends, then by Horovod's synchronize): the collective is waited on once, and
    an error (Horovod's synchronize drops the handle when it raises) comes back again
    instead of a None."""
    from hvd_compress.torch.transports import _once
    calls = []
    wait = _once(lambda: calls.append(1) or len(calls))
    assert (wait(), wait(), calls) == (1, 1, [1])

    def fail():
        calls.append(2)
        raise hc.HvdCompressError("the collective failed")
    wait = _once(fail)
    for _ in range(2):
        with pytest.raises(hc.HvdCompressError, match="the collective failed"):
            wait()
    assert calls == [1, 2]
