"""Compressors: oracles, invariants and exact bit counts, over numpy, torch and TF."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hvd_compress as hc
from hvd_compress import HvdCompressError, Key
from hvd_compress.core.ops import backend_for, backend_named
from hvd_compress.core.payload import HEADER_BYTES, pack, unpack
from hvd_compress.core.select import largest_magnitudes, topk_indices

ALL = hc.available("compressor")
STOCHASTIC = ["randk:0.1,scaled=true", "qsgd", "qsgd:s=1,bucket=16", "terngrad", "natural",
              "bernoulli:0.1"]
DTYPES = ["float16", "bfloat16", "float32", "float64"]


def data(d, seed=0, dtype=np.float32):
    return np.random.RandomState(seed).standard_normal(d).astype(dtype)


def as_backend(xp, a, dtype):
    """numpy array -> tensor of dtype on backend xp (bf16 via the framework's own cast)."""
    if dtype == "bfloat16":
        t = xp.asarray(a.astype(np.float32))
        return backend_for(t).astype(t, "bfloat16")
    return xp.asarray(a.astype(dtype))


def dense(c, p):
    t = c.decompress(p)
    bk = backend_for(t)
    return bk.to_numpy(bk.astype(t, "float64")) if bk.dtype(t) == "bfloat16" else \
        bk.to_numpy(t).astype(np.float64)


# -- one oracle per property, run on every backend -------------------------------------

def topk_oracle(x, k):
    order = np.argsort(-np.abs(x), kind="stable")  # ties: lower position first
    return np.sort(order[:k])


@pytest.mark.parametrize("d, k", [(1, 1), (7, 7), (100, 1), (1000, 10), (200_000, 37),
                                  (300_000, 15_000)])
def test_topk_keeps_exactly_the_k_largest(xp, d, k):
    x = data(d, seed=d)
    x[::3] = np.round(x[::3], 1)  # plenty of ties
    p = hc.resolve(f"topk:k={k}").compress(xp.asarray(x))
    np.testing.assert_array_equal(xp.numpy(p.indices), topk_oracle(x, k))
    np.testing.assert_array_equal(xp.numpy(p.values), x[topk_oracle(x, k)])


def test_threshold_keeps_every_entry_at_or_above_lam(xp):
    """|x| >= lam, both signs and the entries at exactly +-lam included, over several of
    the blocks a CPU selects in and a ragged end."""
    d = 3 * backend_named("numpy").block_size(None) + 1001
    x = data(d, seed=6)
    x[::1000] = 2.0 * np.sign(x[::1000])
    p = hc.resolve("threshold:lam=2.0").compress(xp.asarray(x))
    want = np.flatnonzero(np.abs(x) >= 2.0)
    np.testing.assert_array_equal(xp.numpy(p.indices), want)
    np.testing.assert_array_equal(xp.numpy(p.values), x[want])


def test_topk_tie_rule_on_constant_input(xp):
    x = np.ones(100_000, np.float32)
    p = hc.resolve("topk:k=1000").compress(xp.asarray(x))
    np.testing.assert_array_equal(xp.numpy(p.indices), np.arange(1000))


def test_sampled_selection_falls_back_when_sample_misleads():
    # a spike pattern the strided sample never sees: candidates are too few, fallback runs
    x = np.zeros(1 << 17, np.float32)
    x[1::2] = 1.0
    bk = backend_named("numpy")
    idx = topk_indices(bk, x, 1000)
    np.testing.assert_array_equal(idx, np.arange(1, 2000, 2))


@pytest.mark.parametrize("spec", ALL)
def test_backends_agree(spec):
    """Same input and key: identical payloads on numpy, torch and TF."""
    import tensorflow as tf
    import torch
    x = data(3000, seed=1)
    key = Key(seed=5, rank=2, name="layer.weight", step=9)
    c = hc.resolve(spec)
    outs = [c.compress(t, key) for t in (x, torch.from_numpy(x), tf.constant(x))]
    ref = outs[0]
    for p in outs[1:]:
        bk = backend_for(p.values if p.values is not None else p.codes)
        for field in ("indices", "values", "codes"):
            a, b = getattr(ref, field), getattr(p, field)
            assert (a is None) == (b is None)
            if a is None:
                continue
            if field == "values" and spec == "bernoulli":
                # values are x_j / p_j with lam from a reduction: equal up to its rounding
                np.testing.assert_allclose(bk.to_numpy(b), a, rtol=1e-6)
            else:
                np.testing.assert_array_equal(bk.to_numpy(b), a, err_msg=f"{spec} {field}")
        if ref.scales is not None:  # reductions may round differently in the last bit
            np.testing.assert_allclose(bk.to_numpy(p.scales), ref.scales, rtol=1e-6)


# numpy has no bfloat16 dtype: bf16 inputs are tested on torch and TF
BACKEND_DTYPES = [(b, d) for b in ("numpy", "torch", "tensorflow") for d in DTYPES
                  if (b, d) != ("numpy", "bfloat16")]


@pytest.mark.parametrize("spec", ALL)
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_pack_unpack_round_trip_and_exact_bits(spec, backend, dtype):
    from conftest import XP
    xp = XP(backend)
    x = as_backend(xp, data(1037, seed=3), dtype)
    c = hc.resolve(spec)
    p = c.compress(x, Key(1, 0, "w", 0))
    bk = backend_for(x)
    buf = pack(bk, p)
    assert bk.dtype(buf) == "uint8"
    assert 8 * int(bk.size(buf)) == p.wire_bits(bk)
    q = unpack(bk, buf, p)
    assert int(q.count) == int(p.count)
    np.testing.assert_array_equal(dense(c, q), dense(c, p))
    y = c.decompress(q)
    assert bk.dtype(y) == dtype and bk.shape(y) == (1037,)


def test_bit_counts_match_the_wire_formats():
    d = 10_000
    x = data(d)
    bk = backend_named("numpy")
    bits = {s: hc.resolve(s).compress(x, Key()).wire_bits(bk) for s in ALL}
    h = 8 * HEADER_BYTES
    assert bits["none"] == h + 32 * d
    assert bits["fp16"] == bits["bf16"] == h + 16 * d
    assert bits["topk"] == h + 100 * (32 + 32)              # int32 index + fp32 value
    assert hc.resolve("topk:values=float16").compress(x).wire_bits(bk) == h + 100 * 48
    assert bits["randk"] == h + 100 * 64
    assert bits["sign"] == h + 32 + 8 * math.ceil(d / 8)      # 1 bit per sign
    assert bits["terngrad"] == h + 32 + 2 * 8 * math.ceil(d / 8)
    assert bits["natural"] == h + 8 * d + 8 * math.ceil(d / 8)  # 8-bit exponent + sign bit
    width = 1 + math.ceil(math.log2(7 + 1))                  # qsgd s=7: sign + 3 level bits
    assert bits["qsgd"] == h + 32 * math.ceil(d / 512) + width * 8 * math.ceil(d / 8)


def test_large_tensors_use_int64_indices():
    from hvd_compress.core.payload import index_dtype_for
    assert index_dtype_for((1 << 31) - 1) == "int32"
    assert index_dtype_for(1 << 31) == "int64"


# -- classes: contraction, unbiasedness, variance -------------------------------------

def test_topk_contraction(xp):
    x = data(5000, seed=2)
    for k in (1, 50, 2500, 5000):
        c = hc.resolve(f"topk:k={k}")
        y = dense(c, c.compress(xp.asarray(x)))
        assert np.sum((y - x) ** 2) <= (1 - k / 5000) * np.sum(x.astype(np.float64) ** 2) + 1e-9
        assert c.alpha(5000) == k / 5000


def test_scaled_sign_error_identity(xp):
    x = data(4001, seed=4).astype(np.float64)
    c = hc.resolve("sign")
    y = dense(c, c.compress(xp.asarray(x)))
    l1, l2 = np.abs(x).sum(), (x ** 2).sum()
    assert np.sum((y - x) ** 2) == pytest.approx(l2 - l1 ** 2 / x.size, rel=1e-5)


def monte_carlo(c, x, n, name="t"):
    """n decompressed draws of c(x), each with its own step."""
    return np.stack([dense(c, c.compress(x, Key(7, 0, name, s))) for s in range(n)])


@pytest.mark.parametrize("spec", STOCHASTIC)
def test_unbiased_compressors_are_unbiased_with_bounded_variance(spec):
    x = data(256, seed=8)
    c = hc.resolve(spec)
    n = 4000
    draws = monte_carlo(c, x, n)
    x2 = np.sum(x.astype(np.float64) ** 2)
    mse = np.mean(np.sum((draws - x) ** 2, axis=1))
    omega = c.omega(x.size)
    assert mse <= 1.1 * omega * x2, (mse / x2, omega)
    # E||mean - x||^2 = mse / n; allow 3x for the fixed-seed draw
    assert np.sum((draws.mean(0) - x) ** 2) <= 3 * mse / n


def test_qsgd_variance_matches_the_exact_formula():
    x = data(64, seed=9)
    s = 3
    c = hc.resolve(f"qsgd:s={s},bucket=64")
    draws = monte_carlo(c, x, 6000)
    nrm = np.linalg.norm(x.astype(np.float64))
    f = (s * np.abs(x) / nrm) % 1.0
    exact = nrm ** 2 / s ** 2 * np.sum(f * (1 - f))
    assert np.mean(np.sum((draws - x) ** 2, 1)) == pytest.approx(exact, rel=0.05)
    nnz = np.mean(np.count_nonzero(draws, axis=1))
    assert nnz <= s * (s + math.sqrt(64))


def test_natural_second_moment():
    x = data(512, seed=10)
    draws = monte_carlo(hc.resolve("natural"), x, 2000)
    assert np.mean(np.sum(draws ** 2, 1)) <= 9 / 8 * np.sum(x.astype(np.float64) ** 2)
    # every output is a signed power of two or zero
    m = np.abs(draws[draws != 0])
    assert np.all(np.log2(m) == np.round(np.log2(m)))


def test_unscaled_randk_contracts_in_expectation():
    x = data(200, seed=11)
    c = hc.resolve("randk:k=20")
    draws = monte_carlo(c, x, 2000)
    mse = np.mean(np.sum((draws - x) ** 2, 1))
    assert mse <= (1 - 20 / 200) * np.sum(x.astype(np.float64) ** 2) * 1.03


def test_randk_masks_independent_across_ranks_unless_shared():
    x = data(1000)
    ind, sh = hc.resolve("randk:k=50"), hc.resolve("randk:k=50,shared=true")
    a = ind.compress(x, Key(0, 0, "w", 3)).indices
    b = ind.compress(x, Key(0, 1, "w", 3)).indices
    assert len(np.intersect1d(a, b)) < 20
    np.testing.assert_array_equal(sh.compress(x, Key(0, 0, "w", 3)).indices,
                                  sh.compress(x, Key(0, 1, "w", 3)).indices)
    # each mask is k distinct positions, and masks move with the step
    assert len(np.unique(a)) == 50
    assert not np.array_equal(a, ind.compress(x, Key(0, 0, "w", 4)).indices)


def test_randk_positions_are_uniform():
    counts = np.zeros(100)
    c = hc.resolve("randk:k=10")
    for s in range(3000):
        counts[c.compress(np.ones(100, np.float32), Key(0, 0, "u", s)).indices] += 1
    # 300 expected hits per position; a chi-square-like bound
    assert np.max(np.abs(counts - 300)) < 5 * math.sqrt(300)


def test_compressors_do_not_touch_global_rngs():
    import torch
    torch.manual_seed(123)
    np.random.seed(123)
    before = (torch.rand(1).item(), np.random.rand())
    torch.manual_seed(123)
    np.random.seed(123)
    for spec in STOCHASTIC:
        hc.resolve(spec).compress(torch.randn(50, generator=torch.Generator().manual_seed(1)))
        hc.resolve(spec).compress(data(50))
    assert (torch.rand(1).item(), np.random.rand()) == before


# -- bad input -------------------------------------------------------------------------

def test_integer_tensors_are_refused_by_name(xp):
    x = xp.asarray(np.arange(10, dtype=np.int32))
    with pytest.raises(HvdCompressError, match="tensor fc.bias has dtype int32"):
        hc.resolve("topk:0.5").compress(x, Key(name="fc.bias"))


def test_k_larger_than_the_tensor_is_refused():
    with pytest.raises(HvdCompressError, match="k=20 exceeds the 10 entries of tensor emb"):
        hc.resolve("topk:k=20").compress(data(10), Key(name="emb"))


def test_unbiased_only_constants():
    with pytest.raises(HvdCompressError, match="not unbiased"):
        hc.resolve("topk").omega(10)
    assert hc.resolve("randk:k=10,scaled=true").omega(100) == 9.0
    assert hc.resolve("natural").alpha(10) == pytest.approx(1 - 0.125)


CONTRACTION = ["topk:0.1", "randk:0.1", "sign", "natural", "none", "fp16",
               "randk:0.1,scaled=true", "qsgd", "terngrad", "bernoulli:0.1"]


@pytest.mark.parametrize("spec", CONTRACTION)
def test_alpha_is_what_its_docstring_promises(spec):
    """alpha(d) promises E||C(x) - x||^2 <= (1 - alpha) ||x||^2: checked by Monte Carlo on
    Gaussian and spiky vectors. Unbiased compressors with omega >= 1 are not contractive
    and say so instead of returning 1/(1 + omega), which holds only for C/(1 + omega)."""
    d = 1000
    c = hc.resolve(spec)
    try:
        alpha = c.alpha(d)
    except HvdCompressError as e:
        assert c.bias == "unbiased" and c.omega(d) >= 1 and "not contractive" in str(e)
        return
    spiky = data(d, 5)
    spiky[:3] *= 100
    for x in (data(d, 4), spiky):
        x2 = np.sum(x.astype(np.float64) ** 2)
        err = np.mean([np.sum((dense(c, c.compress(x, Key(0, 0, "x", t))) - x) ** 2)
                       for t in range(200 if c.stochastic else 1)])
        assert err <= 1.05 * (1 - alpha) * x2 + 1e-3 * x2, (err / x2, alpha)


def test_terngrad_variance_bound_is_tight():
    """omega = (sqrt(d) - 1) / 2, reached by one entry 1 beside d - 1 entries 1/(sqrt(d) + 1):
    E||C(x) - x||^2 = ||x||_inf ||x||_1 - ||x||^2 exactly."""
    d = 400
    c = hc.resolve("terngrad")
    assert c.omega(d) == (math.sqrt(d) - 1) / 2
    x = np.full(d, 1 / (math.sqrt(d) + 1))
    x[0] = 1.0
    x2 = np.sum(x ** 2)
    exact = np.abs(x).max() * np.abs(x).sum() - x2
    assert exact / x2 == pytest.approx(c.omega(d))
    mc = np.mean([np.sum((dense(c, c.compress(x.astype(np.float32), Key(0, 0, "x", t))) - x) ** 2)
                  for t in range(2000)])
    assert mc == pytest.approx(exact, rel=0.05)


def test_terngrad_clips_at_a_multiple_of_the_standard_deviation(xp):
    """Wen et al.: entries are clipped to [-c sigma, c sigma] before ternarising, so the
    scale is c sigma and the result is unbiased for the clipped tensor, not the tensor."""
    x = np.random.RandomState(0).standard_t(2, 5000).astype(np.float32)
    c = hc.resolve("terngrad:clip=2.5")
    assert c.bias == "clipped" and c.spec() == "terngrad:clip=2.5"
    p = c.compress(xp.asarray(x), Key(0, 0, "x", 0))
    assert float(xp.numpy(p.scales)[0]) == pytest.approx(2.5 * x.std(), rel=1e-4)
    clipped = np.clip(x, -2.5 * x.std(), 2.5 * x.std()).astype(np.float64)
    mean = np.mean([dense(c, c.compress(xp.asarray(x), Key(0, 0, "x", t))) for t in range(300)], 0)
    assert np.abs(mean - clipped).mean() < 0.1 * np.abs(clipped).mean()
    flat = np.full(10, 3.0, np.float32)  # sigma = 0: left as it is, not clipped to zero
    np.testing.assert_array_equal(dense(c, c.compress(xp.asarray(flat))), flat)
    with pytest.raises(HvdCompressError, match="diana needs an unbiased compressor, but "
                                               "terngrad:clip=2.5 is clipped"):
        hc.resolve("terngrad:clip=2.5+diana")


# -- properties over shapes and dtypes -------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(d=st.integers(1, 3000), ratio=st.floats(1e-4, 1.0), seed=st.integers(0, 2 ** 16),
       dtype=st.sampled_from(["float16", "float32", "float64"]))
def test_topk_property(d, ratio, seed, dtype):
    x = data(d, seed, dtype)
    c = hc.resolve(f"topk:ratio={ratio}")
    k = max(1, int(ratio * d))
    p = c.compress(x)
    np.testing.assert_array_equal(p.indices, topk_oracle(x, k))
    bk = backend_named("numpy")
    q = unpack(bk, pack(bk, p), p)
    np.testing.assert_array_equal(c.decompress(q), np.where(np.isin(np.arange(d), p.indices), x, 0))


@settings(max_examples=25, deadline=None)
@given(d=st.integers(1, 2000), spec=st.sampled_from(ALL), seed=st.integers(0, 1000))
def test_round_trip_property(d, spec, seed):
    x = data(d, seed)
    c = hc.resolve(spec)
    p = c.compress(x, Key(seed, 1, "p", seed))
    bk = backend_named("numpy")
    buf = pack(bk, p)
    assert buf.size * 8 == p.wire_bits(bk)
    np.testing.assert_array_equal(c.decompress(unpack(bk, buf, p)), c.decompress(p))


# -- delta + varint indices ------------------------------------------------------------

@pytest.mark.parametrize("spec", ["topk:0.01,indices=varint", "randk:0.3,indices=varint",
                                  "threshold:lam=2.0,indices=varint",
                                  "topk:k=1,indices=varint", "topk:1.0,indices=varint"])
def test_varint_indices_round_trip(xp, spec):
    x = data(20_000, seed=5)
    c = hc.resolve(spec)
    p = c.compress(xp.asarray(x), Key(0, 0, "w", 0))
    plain = hc.resolve(spec.replace(",indices=varint", "")).compress(xp.asarray(x),
                                                                        Key(0, 0, "w", 0))
    bk = backend_for(p.values)
    q = unpack(bk, pack(bk, p), p)
    np.testing.assert_array_equal(xp.numpy(q.indices), xp.numpy(plain.indices))
    np.testing.assert_array_equal(dense(c, q), dense(c, plain))
    assert 8 * int(bk.size(pack(bk, p))) == p.wire_bits(bk)
    assert not c.fixed_size


def test_varint_indices_cost_about_a_byte_at_one_percent():
    x = data(1_000_000, seed=6)
    bk = backend_named("numpy")
    p = hc.resolve("topk:0.01,indices=varint").compress(x)
    index_bits = p.wire_bits(bk) - 8 * HEADER_BYTES - 64 - 32 * p.count
    assert index_bits / p.count < 11.0  # about 10.3 (gaps of ~100 need 1-2 bytes); int32: 32


def test_bernoulli_keeps_large_entries_and_meets_the_budget():
    bk = backend_named("numpy")
    x = (data(4000, seed=12) * np.exp(-np.arange(4000) / 200)).astype(np.float32)
    c = hc.resolve("bernoulli:0.05")
    p = c.probabilities(bk, np.abs(x), 200.0)
    assert p.sum() == pytest.approx(200.0, rel=1e-5)
    assert np.all(p[np.argsort(-np.abs(x))[:20]] == 1.0)      # the largest always go
    counts = [c.compress(x, Key(0, 0, "b", t)).count for t in range(300)]
    assert np.mean(counts) == pytest.approx(200, rel=0.05)


@pytest.fixture
def accelerator_branch():
    """torch takes, on CPU tensors, the branch it takes on a GPU (no host reads)."""
    bk = backend_named("torch")
    type(bk).avoid_syncs_on_cpu = True
    yield bk
    type(bk).avoid_syncs_on_cpu = False


@pytest.mark.parametrize("case", ["normal", "ties", "constant", "spikes"])
def test_the_accelerator_selection_equals_the_sampled_one(accelerator_branch, case):
    """Without the sampled candidates and with a statically sized compaction, top-k
    keeps the same positions, ties toward lower positions included."""
    import torch
    rs = np.random.RandomState(3)
    x = {"normal": rs.standard_normal(1 << 17),
         "ties": np.round(rs.standard_normal(1 << 17), 1),
         "constant": np.ones(1 << 17),
         "spikes": np.where(np.arange(1 << 17) % 2, 1.0, 0.0)}[case].astype(np.float32)
    for k in (1, 1000, 5000):
        want = topk_indices(backend_named("numpy"), np.abs(x), k)
        got = topk_indices(accelerator_branch, torch.from_numpy(np.abs(x)), k)
        np.testing.assert_array_equal(got.numpy(), want)


def test_the_accelerator_selection_of_a_nan_stays_in_the_tensor(accelerator_branch):
    """A NaN makes the k-th value NaN: the k positions still lie in the tensor (the step
    is void anyway, the sender's header says so)."""
    import torch
    x = torch.ones(1 << 17)
    x[7] = float("nan")
    got = topk_indices(accelerator_branch, x, 100)
    assert got.numel() == 100 and 0 <= int(got.min()) and int(got.max()) < x.numel()


@pytest.mark.parametrize("case", ["normal", "signed ties", "zeros", "spikes"])
def test_selection_by_magnitude_equals_top_k_of_the_absolute_values(xp, case):
    """Candidates by x >= t or x <= -t instead of |x| >= t: the same positions, ties
    between v and -v included, and the fallback where the sample misleads."""
    rs = np.random.RandomState(4)
    d = 1 << 17
    x = {"normal": rs.standard_normal(d),
         "signed ties": np.round(rs.standard_normal(d), 1) * rs.choice([-1, 1], d),
         "zeros": np.where(rs.rand(d) < 0.001, rs.standard_normal(d), 0.0),
         "spikes": np.where(np.arange(d) % 2, -1.0, 0.0)}[case].astype(np.float32)
    bk = backend_named(xp.name)
    for k in (1, 1000, 5000):
        want = topk_indices(backend_named("numpy"), np.abs(x), k)
        np.testing.assert_array_equal(xp.numpy(largest_magnitudes(bk, xp.asarray(x), k)),
                                      want)


@pytest.fixture
def torch_kernels():
    """torch selects with its own CPU kernels, not numpy's over the tensor's memory."""
    bk = backend_named("torch")
    type(bk).host_threads = -1
    yield bk
    type(bk).host_threads = 2


@pytest.mark.parametrize("case", ["normal", "signed ties", "spikes"])
def test_torch_kernels_select_what_numpy_selects(torch_kernels, case):
    """Where torch runs on more threads than numpy's selection wins at, its own kernels
    select: the same positions, ties toward lower positions included."""
    import torch
    rs = np.random.RandomState(5)
    d = 1 << 17
    x = {"normal": rs.standard_normal(d),
         "signed ties": np.round(rs.standard_normal(d), 1) * rs.choice([-1, 1], d),
         "spikes": np.where(np.arange(d) % 2, -1.0, 0.0)}[case].astype(np.float32)
    assert torch_kernels.host_view(torch.from_numpy(x)) is None
    for k in (1, 1000, 5000):
        want = topk_indices(backend_named("numpy"), np.abs(x), k)
        got = largest_magnitudes(torch_kernels, torch.from_numpy(x), k)
        np.testing.assert_array_equal(got.numpy(), want)
        np.testing.assert_array_equal(
            topk_indices(torch_kernels, torch.from_numpy(np.abs(x)), k).numpy(), want)


def test_torch_selects_on_numpy_views_of_its_own_memory_only():
    """The numpy view shares the tensor's memory, and is refused where it cannot (a
    16-bit or strided tensor, one that needs its autograd graph)."""
    import torch
    bk = backend_named("torch")
    x = torch.randn(100)
    view = bk.host_view(x)
    view[3] = 7.0
    assert float(x[3]) == 7.0
    for refused in (x.half(), x[::2], x.clone().requires_grad_()):
        assert bk.host_view(refused) is None


def test_numpy_and_tensor_step_numbers_draw_what_ints_draw():
    """A step given as a numpy integer, a 0-d array or an eager 0-d tensor is its value."""
    import torch

    from hvd_compress.core.rng import random_bits
    bk, like = backend_named("numpy"), np.zeros(3, np.float32)
    want = random_bits(bk, 1000, Key(1, 2, "w", 5), like)
    for step in (np.int64(5), np.array(5), np.array(5, np.int32), torch.tensor(5)):
        np.testing.assert_array_equal(random_bits(bk, 1000, Key(1, 2, "w", step), like), want)



QUANTIZERS = ["qsgd", "qsgd:s=300,bucket=1000", "terngrad", "sign", "natural"]


@pytest.mark.parametrize("spec", QUANTIZERS)
def test_quantizers_agree_over_many_blocks(spec):
    """numpy and torch on a CPU run a quantizer's chain block by block; TensorFlow runs it
    over the whole tensor: the payloads and what they decode to are the same."""
    import tensorflow as tf
    import torch
    d = 3 * backend_named("numpy").block_size(None) + 1001  # blocks and a ragged end
    x = data(d, seed=4)
    x[::97] = 0.0
    key = Key(seed=2, rank=1, name="w", step=5)
    c = hc.resolve(spec)
    ref = c.compress(tf.constant(x), key)
    want = dense(c, ref)
    for t in (x, torch.from_numpy(x)):
        p = c.compress(t, key)
        bk = backend_for(t)
        for field in ("values", "codes"):
            if getattr(ref, field) is not None:
                np.testing.assert_array_equal(bk.to_numpy(getattr(p, field)),
                                              getattr(ref, field).numpy(), err_msg=field)
        if ref.scales is not None:  # reductions may round differently in the last bit
            np.testing.assert_allclose(bk.to_numpy(p.scales), ref.scales.numpy(), rtol=1e-6)
        np.testing.assert_allclose(dense(c, p), want, rtol=1e-6)


def test_bit_planes_match_their_definition(xp):
    """Plane j holds bit j of every code, code i at bit i % 8 of byte i // 8 of the plane
    (a restatement of the format with numpy's own bit packing)."""
    from hvd_compress.core.bits import pack_codes, unpack_codes
    rng = np.random.RandomState(0)
    for width in (1, 2, 4, 8, 9, 16):
        for n in (1, 8, 13, 1000):
            codes = rng.randint(0, 1 << width, n).astype(np.uint8 if width <= 8 else np.int32)
            want = np.concatenate([np.packbits((codes.astype(np.int64) >> j) & 1,
                                               bitorder="little") for j in range(width)])
            bk = backend_for(xp.asarray(codes))
            packed = pack_codes(bk, xp.asarray(codes), width)
            np.testing.assert_array_equal(xp.numpy(packed), want, err_msg=f"{width} {n}")
            back = xp.numpy(unpack_codes(bk, packed, width, n))
            np.testing.assert_array_equal(back.astype(np.int64), codes.astype(np.int64))


@pytest.mark.parametrize("spec", QUANTIZERS)
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_working_memory_never_leaks_into_payloads(spec, backend):
    """Quantizers reuse working memory across calls: a payload and what it decodes to
    stay as they were after the next tensor is compressed and decoded, and decoding into
    memory the caller hands over gives the same sum."""
    from conftest import XP
    xp = XP(backend)
    d = 2 * backend_named("numpy").block_size(None) + 5
    c = hc.resolve(spec)
    x1, x2 = xp.asarray(data(d, seed=1)), xp.asarray(data(d, seed=2))
    p1 = c.compress(x1, Key(name="a"))
    fields = {f: xp.numpy(getattr(p1, f)).copy() for f in ("values", "codes", "scales")
              if getattr(p1, f) is not None}
    first = dense(c, p1)
    p2 = c.compress(x2, Key(name="b"))
    dense(c, p2)
    for f, v in fields.items():
        np.testing.assert_array_equal(xp.numpy(getattr(p1, f)), v, err_msg=f)
    np.testing.assert_array_equal(dense(c, p1), first)
    bk = backend_for(x1)
    fresh, _ = c.mean(bk, [p1, p2], 2)
    out = xp.asarray(np.full(d, np.nan, np.float32))
    into, _ = c.mean(bk, [p1, p2], 2, out)
    np.testing.assert_array_equal(xp.numpy(into), xp.numpy(fresh))
    np.testing.assert_array_equal(xp.numpy(out), xp.numpy(fresh))  # built in out's memory


@pytest.mark.parametrize("shared", [False, True])
def test_randk_drawn_block_by_block_keeps_what_all_keys_keep(shared):
    """On a CPU rand-k draws its keys block by block and keeps only those above a
    threshold; the k largest of them are the k largest of all d keys (TF selects among
    all d keys at once)."""
    import tensorflow as tf
    import torch

    from hvd_compress.core.rng import random_bits
    d, k = 3 * backend_named("numpy").block_size(None) + 17, 1500
    c = hc.resolve(f"randk:k={k},shared={'true' if shared else 'false'}")
    key = Key(seed=3, rank=1, name="w", step=7)
    stream = key._replace(seed=key.seed ^ c.seed, rank=None if shared else key.rank)
    keys = random_bits(backend_named("numpy"), d, stream, np.zeros(1, np.float32))
    want = np.sort(np.argsort(-keys.astype(np.int64), kind="stable")[:k])  # ties: lower first
    for t in (np.zeros(d, np.float32), torch.zeros(d), tf.zeros(d)):
        got = c.mask(backend_for(t), d, key, t)
        np.testing.assert_array_equal(backend_for(t).to_numpy(got), want)


@pytest.mark.parametrize("spec", ["qsgd:bucket=7", "qsgd", "terngrad", "sign", "natural"])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_decoding_into_a_view_of_another_buffer(spec, backend):
    """The average may be built in the memory of a gradient that is a view: at an offset
    that no 8-byte word starts at, or strided; it equals the average built afresh."""
    from conftest import XP
    xp = XP(backend)
    d = 2 * backend_named("numpy").block_size(None) + 5
    c = hc.resolve(spec)
    p = c.compress(xp.asarray(data(d, seed=5)), Key(name="w"))
    bk = backend_for(p.codes)
    want, _ = c.mean(bk, [p, p], 2)
    big = xp.asarray(np.zeros(2 * d + 1, np.float32))
    for out in (big[1:d + 1], big[::2][:d]):
        got, _ = c.mean(bk, [p, p], 2, out)
        np.testing.assert_array_equal(xp.numpy(got), xp.numpy(want))


@pytest.mark.parametrize("spec", QUANTIZERS)
def test_quantizers_take_tensors_that_require_grad(spec):
    import torch
    x = torch.from_numpy(data(1000)).requires_grad_()
    c = hc.resolve(spec)
    got = dense(c, c.compress(x, Key(name="w")))
    np.testing.assert_array_equal(got, dense(c, c.compress(x.detach(), Key(name="w"))))


def test_sign_decodes_the_largest_floats(xp):
    c = hc.resolve("sign")
    x = np.array([3e38, -3e38], np.float32)
    np.testing.assert_array_equal(dense(c, c.compress(xp.asarray(x))), x.astype(np.float64))
