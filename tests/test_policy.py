"""The dynamic level of seed 000: k* = argmax S_k / C(k), checked against brute force."""
import numpy as np
import pytest

import hvd_compress as hc
from hvd_compress.core.ops import backend_named
from hvd_compress.core.payload import HEADER_BYTES
from hvd_compress.core.policy import Dynamic, calibrate
from hvd_compress.core.simulate import Workers

bk = backend_named("numpy")


def decaying(d, scale, seed=0):
    rs = np.random.RandomState(seed)
    return (rs.standard_normal(d) * np.exp(-np.arange(d) / scale)).astype(np.float32)[
        rs.permutation(d)]


def brute_force(policy, v):
    s = np.cumsum(np.sort(v.astype(np.float64) ** 2)[::-1])
    ks = np.arange(1, v.size + 1)
    eff = s / policy.costs(ks)
    eff[:policy.kmin - 1] = -np.inf
    return int(np.argmax(eff)) + 1


@pytest.mark.parametrize("spec", ["dynamic:cost=affine,c0=1000", "dynamic:cost=affine,c0=200000",
                                  "dynamic:cost=packet,packet=1024,header=160",
                                  "dynamic:cost=allgather,alpha=1e-4,beta=1e-8,n=8",
                                  "dynamic:cost=affine,c0=100,kmin=40"])
@pytest.mark.parametrize("scale", [30, 3000])
def test_choice_equals_brute_force(spec, scale):
    p = hc.resolve("topk+" + spec).policy
    v = decaying(20_000, scale)
    assert p.choose_k(bk, v) == brute_force(p, v)


@pytest.mark.parametrize("spec", ["dynamic:cost=affine,c0=1000", "dynamic:cost=affine,c0=1e7",
                                  "dynamic:cost=packet,packet=1024,header=160",
                                  "dynamic:cost=allgather,alpha=1e-4,beta=1e-8,n=8",
                                  "dynamic:cost=linear", "dynamic:c0=100,kmin=40,kmax=300"])
def test_the_choice_inside_a_graph_equals_brute_force(spec):
    """TensorFlow graphs choose k with graph operations (a while loop over the growing
    window): the same k, including where the window grows past its first 256 entries."""
    import tensorflow as tf
    p = hc.resolve("topk+" + spec).policy
    choose = tf.function(lambda v: p.choose_k(backend_named("tensorflow"), v))
    for scale in (30, 3000):
        v = decaying(20_000, scale)
        assert int(choose(tf.constant(v))) == brute_force(p, v) == p.choose_k(bk, v)
    assert not hc.resolve("topk+" + spec).host_stages()
    assert hc.resolve("qsgd+dynamic").host_stages() == ["dynamic"]
    assert hc.resolve("topk+dynamic:agree=true").host_stages() == ["dynamic:agree=true"]


def test_linear_cost_picks_one_coordinate():
    p = Dynamic(cost="linear")
    assert all(p.choose_k(bk, decaying(500, 50, s)) == 1 for s in range(5))


def test_linear_cost_is_greedy_coordinate_descent():
    """Under linear cost the rule reduces to Gauss-Southwell coordinate descent."""
    rs = np.random.RandomState(0)
    A = rs.standard_normal((40, 20))
    H = A.T @ A / 40
    L = np.linalg.eigvalsh(H).max()
    b = rs.standard_normal(20)
    x_dyn, x_cd = np.zeros(20), np.zeros(20)
    w = Workers("topk+dynamic:cost=linear", 1)
    for _ in range(30):
        x_dyn = x_dyn - w.step([(H @ x_dyn - b).astype(np.float32)]) / L
        g = H @ x_cd - b
        j = np.argmax(np.abs(g))
        x_cd[j] -= g[j] / L
    np.testing.assert_allclose(x_dyn, x_cd, rtol=1e-4, atol=1e-6)


def test_packet_cost_fills_whole_packets():
    p = Dynamic(cost="packet", packet=1024, header=160)
    per = (1024 - 160) // 64
    for s in range(5):
        k = p.choose_k(bk, decaying(5000, 400, s))
        assert k % per == 0 or k == 5000


def test_affine_overhead_moves_k_up():
    v = decaying(10_000, 500)
    ks = [Dynamic(cost="affine", c0=c0).choose_k(bk, v) for c0 in (0, 1e3, 1e5, 1e7)]
    assert ks == sorted(ks) and ks[0] == 1 and ks[-1] > 100


def test_calibrate_recovers_alpha_beta():
    bits = np.array([1e3, 1e4, 1e5, 1e6])
    assert calibrate(bits, 2e-5 + 3e-9 * bits) == pytest.approx((2e-5, 3e-9))


def test_each_rank_picks_its_own_k():
    w = Workers("topk+ef14+dynamic:c0=3000", 2)
    w.step([decaying(4000, 20, 1), decaying(4000, 2000, 2)])
    k0, k1 = (p.count for p in w.last)
    assert k0 < k1


def test_qsgd_level_maximises_improvement_per_bit():
    """s* against brute force: the descent at step 1/L, ||v||^2 - Var_s(v) = 2 ||v||^2 -
    E||Q_s(v)||^2 (the second moment by Monte Carlo), per bit."""
    import math

    from hvd_compress.core.quantizers import QSGD
    v = decaying(3000, 300)
    for spec in ("dynamic:cost=affine,c0=1000", "dynamic:cost=affine,c0=1e6",
                 "dynamic:cost=linear"):
        p = hc.resolve("qsgd:bucket=256+" + spec).policy
        q = QSGD(bucket=256)
        best = None
        for s in (1, 3, 7, 15, 31, 63, 127, 255):
            draws = [QSGD(s, 256).decompress(QSGD(s, 256).compress(v, hc.Key(0, 0, "v", t)))
                     for t in range(300)]
            second = np.mean([np.sum(x.astype(np.float64) ** 2) for x in draws])
            width = 1 + max(1, math.ceil(math.log2(s + 1)))
            bits = 8 * HEADER_BYTES + 32 * math.ceil(3000 / 256) + 8 * width * 375
            eff = (2 * np.sum(v.astype(np.float64) ** 2) - second) / p.bits_cost(bits)
            best = max(best or (eff, s), (eff, s))
        assert p.choose_s(bk, v, q) == best[1], spec


def test_qsgd_level_rises_with_the_per_message_overhead():
    v = decaying(3000, 300)
    s = [hc.resolve(f"qsgd+dynamic:cost=affine,c0={c0}").policy.choose_s(
        bk, v, hc.resolve("qsgd")) for c0 in (0, 1e5, 1e7)]
    assert s == sorted(s) and s[-1] > s[0]


def test_bernoulli_budget_against_brute_force():
    from hvd_compress.core.sparsifiers import Bernoulli
    v = decaying(4096, 100)
    for spec in ("dynamic:cost=affine,c0=1000", "dynamic:cost=affine,c0=1e6"):
        p = hc.resolve("bernoulli+" + spec).policy
        c = Bernoulli()
        a = np.abs(v)
        effs = {}
        for j in range(13):
            B = 4096 / 2 ** j
            q = c.probabilities(bk, a, B)
            second = np.sum(np.where(q > 0, a.astype(np.float64) ** 2 / np.where(q > 0, q, 1), 0))
            effs[B] = (2 * np.sum(a.astype(np.float64) ** 2) - second) / p.costs([B])[0]
        assert p.choose_budget(bk, v, c) == max(effs, key=effs.get)
    small = hc.resolve("bernoulli+dynamic:c0=10").policy.choose_budget(bk, v, Bernoulli())
    large = hc.resolve("bernoulli+dynamic:c0=1e7").policy.choose_budget(bk, v, Bernoulli())
    assert small < large


def heavy_tailed(d, seed=0):
    return np.random.RandomState(seed).standard_t(1.5, d).astype(np.float32)


def exact_variance(spec, level, v):
    """Var(v) = E||Q(v) - v||^2 of the level chosen, in closed form."""
    from hvd_compress.core.quantizers import QSGD
    from hvd_compress.core.sparsifiers import Bernoulli
    a = np.abs(v.astype(np.float64))
    if spec.startswith("bernoulli"):
        p = Bernoulli().probabilities(bk, np.abs(v), level).astype(np.float64)
        return float(np.sum(np.where(p > 0, a ** 2 / np.where(p > 0, p, 1), 0)) - np.sum(a ** 2))
    b = QSGD().bucket
    total = 0.0
    for start in range(0, v.size, b):
        row = a[start:start + b]
        norm = np.sqrt(np.sum(row ** 2))
        if norm > 0:
            r = level * row / norm
            f = r - np.floor(r)
            total += norm ** 2 / level ** 2 * np.sum(f * (1 - f))
    return total


@pytest.mark.parametrize("spec", ["bernoulli+dynamic:cost=linear", "bernoulli+dynamic:c0=1000",
                                  "bernoulli+dynamic:c0=1e6", "qsgd+dynamic:cost=linear",
                                  "qsgd+dynamic:c0=1000"])
@pytest.mark.parametrize("gradient", ["decaying", "heavy-tailed", "gaussian"])
def test_unbiased_levels_never_choose_a_step_that_ascends(spec, gradient):
    """The payload is applied unscaled at step 1/L: E f(x+) <= f(x) - (||g||^2 - Var) / (2L).
    The chosen level's variance stays below ||g||^2 (omega(g) < 1), so the guarantee is a
    descent, and it is the best guarantee per bit on the level grid."""
    v = {"decaying": decaying(4096, 100), "heavy-tailed": heavy_tailed(4096),
         "gaussian": np.random.RandomState(2).standard_normal(4096).astype(np.float32)}[gradient]
    pipe = hc.resolve(spec)
    norm2 = float(np.sum(v.astype(np.float64) ** 2))
    if spec.startswith("bernoulli"):
        level = pipe.policy.choose_budget(bk, v, pipe.compressor)
        grid = [4096 / 2 ** j for j in range(13)]
        cost = lambda B: pipe.policy.costs([B])[0]  # noqa: E731
    else:
        import math
        level = pipe.policy.choose_s(bk, v, pipe.compressor)
        grid = [1, 3, 7, 15, 31, 63, 127, 255]
        cost = lambda s: pipe.policy.bits_cost(  # noqa: E731
            64 + 32 * 8 + 8 * (1 + max(1, math.ceil(math.log2(s + 1)))) * 512)
    assert exact_variance(spec, level, v) < norm2
    descent = {x: (norm2 - exact_variance(spec, x, v)) / cost(x) for x in grid}
    assert descent[level] == pytest.approx(max(descent.values()), rel=1e-4)


def test_qsgd_level_where_no_level_descends_is_the_least_noisy():
    """With a 600k-entry bucket even s = 255 has Var > ||g||^2 on a Gaussian vector: no
    level guarantees descent, and the rule takes the least variance, not the dearest."""
    v = np.random.RandomState(0).standard_normal(600_000).astype(np.float32)
    pipe = hc.resolve("qsgd:bucket=1000000+dynamic:c0=1000")
    assert exact_variance_qsgd(v, 255, 1_000_000) > np.sum(v.astype(np.float64) ** 2)
    assert pipe.policy.choose_s(bk, v, pipe.compressor) == 255


def exact_variance_qsgd(v, s, bucket):
    a = np.abs(v.astype(np.float64))[:bucket]
    r = s * a / np.sqrt(np.sum(a ** 2))
    f = r - np.floor(r)
    return np.sum(a ** 2) / s ** 2 * np.sum(f * (1 - f))


@pytest.mark.parametrize("spec", ["qsgd+diana+dynamic", "bernoulli:0.5+diana+dynamic:cost=linear",
                                  "randk:0.1,scaled=true+diana+dynamic"])
def test_dynamic_refuses_diana(spec):
    """DIANA's shift step alpha <= 1/(1 + omega) must follow the level, and ranks choose
    their own levels: refused, with the way out in the message."""
    with pytest.raises(hc.HvdCompressError, match="dynamic|diana"):
        hc.resolve(spec)
    if not spec.startswith("randk"):
        with pytest.raises(hc.HvdCompressError, match="does not combine with diana"):
            hc.resolve(spec)


def test_with_feedback_the_rule_removes_the_most_error_per_bit():
    """Under EF14 the residual left is ||e + g||^2 - S_k, under EF21 the estimate's error
    ||v - g_i||^2 - S_k: the chosen k maximises the error removed per bit, and is at least
    kmin (each step contractive with alpha >= kmin / d)."""
    for fb in ("ef14", "ef21", "ef21sgdm:eta=1"):
        w = Workers(f"topk+{fb}+dynamic:c0=3000,kmin=5", 1)
        g1, g2 = decaying(4000, 40, 1), decaying(4000, 400, 2)
        w.step([g1])
        before = w.states[0]
        vec = (before.residual + g2) if fb == "ef14" else (g2 - before.local)
        w.step([g2])
        after = w.states[0]
        left = after.residual if fb == "ef14" else g2 - after.local
        k = w.last[0].count
        removed = float(np.sum(vec.astype(np.float64) ** 2) - np.sum(left.astype(np.float64) ** 2))
        p = Dynamic(c0=3000, kmin=5)
        assert k == brute_force(p, vec) and k >= 5
        energy = np.cumsum(np.sort(vec.astype(np.float64) ** 2)[::-1])
        assert removed == pytest.approx(energy[k - 1], rel=1e-5)


@pytest.mark.parametrize("spec", ["dynamic:c0=3000", "dynamic:cost=packet,packet=2048",
                                  "dynamic:c0=100,kmin=40", "dynamic:c0=1e6"])
def test_agreeing_ranks_share_the_joint_optimum_of_this_step(spec):
    """agree=true: k* = argmax sum_i S_k^i / C(k) over the ranks, settled in the same step
    (no lag), against brute force over every k; the grid it searches is 4.4% apart, so
    the efficiency it reaches is within a hair of the exact optimum's."""
    w = Workers(f"topk:k=7+ef14+{spec},agree=true", 3)
    g = [decaying(4000, 20, 1), decaying(4000, 2000, 2), decaying(4000, 200, 3)]
    w.step(g)
    k = [p.count for p in w.last]
    p = w.pipe.policy
    energy = sum(np.cumsum(np.sort(x.astype(np.float64) ** 2)[::-1]) for x in g)
    eff = energy / p.costs(np.arange(1, 4001))
    eff[:p.kmin - 1] = -np.inf
    assert k[0] == k[1] == k[2]                           # this step, every rank alike
    assert eff[k[0] - 1] >= 0.995 * eff.max()
    assert w.last_codec.fixed_size                        # equal sizes: the fast path
    own = [p.choose_k(bk, x) for x in g]  # each rank's own optimum (step 1: e = 0)
    assert 0.95 * min(own) <= k[0] <= 1.05 * max(own)


def test_agreement_is_exact_where_the_grid_is():
    """Up to 64 the grid holds every k: the joint optimum is then the exact one."""
    from hvd_compress.core.simulate import run_ranks
    p = Dynamic(c0=500, agree=True)
    g = [decaying(3000, 5, s) for s in range(4)]
    ks = run_ranks(4, lambda r, gather: p.agree_k(bk, g[r], gather))
    energy = sum(np.cumsum(np.sort(x.astype(np.float64) ** 2)[::-1]) for x in g)
    best = int(np.argmax(energy / p.costs(np.arange(1, 3001)))) + 1
    assert best <= 64 and ks == [best] * 4


def test_auto_is_topk_with_ef14_and_round_trips():
    from hvd_compress.core.auto import Auto
    from hvd_compress.core.pipeline import resolve_pipeline
    pipe = resolve_pipeline("auto:every=7")
    assert isinstance(pipe.policy, Auto) and pipe.policy.every == 7
    assert pipe.spec() == "topk+ef14+auto:every=7"
    assert resolve_pipeline(pipe.spec()) == pipe
    with pytest.raises(hc.HvdCompressError, match="not top-k"):
        resolve_pipeline("qsgd+auto")


def test_auto_routes_by_the_cost_model():
    """Dense costs alpha_r + beta_r 32 d; sparse a + b d + alpha_g + beta_g bits(k),
    bits(k) = 192 + 64 k (the fits are of whole collectives). A slow link sends large
    tensors sparse and leaves tiny ones dense (the allgather's per-message cost); a fast
    one keeps all dense."""
    from hvd_compress.core.auto import Costs
    from hvd_compress.core.pipeline import resolve_pipeline
    pipe = resolve_pipeline("topk:0.01+ef14+auto")
    topk = pipe.compressor
    slow = Costs((1e-4, 1e-8), (1e-4, 1e-8), (1e-5, 4e-9))     # 100 Mbit/s
    fast = Costs((2e-5, 1e-11), (2e-5, 1e-11), (1e-5, 4e-9))   # 100 Gbit/s
    for d in (10, 1000, 10 ** 5, 10 ** 7):
        k = topk.k_for(d)
        dense = 1e-4 + 1e-8 * 32 * d
        sparse = 1e-5 + 4e-9 * d + 1e-4 + 1e-8 * (192 + 64 * k)
        assert slow.dense_seconds(d, 32) == pytest.approx(dense)
        assert slow.sparse_seconds(d, 192 + 64 * k) == pytest.approx(sparse)
        assert pipe.dense_route(d, "float32", slow) == (dense <= sparse), d
        assert pipe.dense_route(d, "float32", fast)
        assert pipe.dense_route(d, "float32", None)  # not measured yet
    assert not pipe.dense_route(10 ** 7, "float32", slow)
    assert pipe.dense_route(10, "float32", slow)
    assert not resolve_pipeline("topk:0.01+ef14").dense_route(10, "float32", None)


def test_auto_dense_route_sends_the_tensor_and_keeps_the_residual():
    """The dense route is a plain allreduce of the tensor (no copy) and leaves EF14's
    residual for the next sparse step: updates plus the mean residual always sum to the
    gradients, whichever routes were taken."""
    from hvd_compress.core.auto import Costs
    from hvd_compress.core.exchange import Exchange
    exs = [Exchange("topk:0.1+ef14+auto") for _ in range(2)]
    slow = Costs((1e-3, 1e-6), (1e-9, 1e-15), (0.0, 0.0))
    total_g, total_u = 0, 0
    for step in range(6):
        for ex in exs:
            ex.costs = slow if step in (1, 2, 4) else None
        g = [decaying(200, 50, seed=10 * step + r) for r in range(2)]
        outs = [ex.begin(bk, "w", g[r], r) for r, ex in enumerate(exs)]
        assert all(o.dense_route == (step not in (1, 2, 4)) for o in outs)
        if outs[0].dense_route:
            assert outs[0].wire is g[0]
            total = outs[0].wire + outs[1].wire
            update = exs[0].finish_allreduced(bk, total * np.float32(0.5), outs[0], 2, False)
            np.testing.assert_array_equal(update, (g[0] + g[1]) * np.float32(0.5))
        else:
            wire = np.concatenate([o.wire for o in outs])
            update = exs[0].finish_gathered(bk, wire, outs[0], 2, False)
            exs[1].finish_gathered(bk, wire, outs[1], 2, False)
        total_g = total_g + (g[0] + g[1]) / 2
        total_u = total_u + update
    residual = (exs[0].states["w"].residual + exs[1].states["w"].residual) / 2
    assert np.abs(residual).max() > 0
    np.testing.assert_allclose(total_u + residual, total_g, rtol=1e-5, atol=1e-5)


def test_auto_is_refused_where_costs_are_not_measured():
    from hvd_compress.comm.mpi import SparseAllreduce
    with pytest.raises(hc.HvdCompressError, match="auto measures"):
        SparseAllreduce("auto", comm=object())
    import hvd_compress.tensorflow as hctf
    with pytest.raises(hc.HvdCompressError, match="auto measures"):
        hctf.compression("auto")
    import hvd_compress.torch as hct
    with pytest.raises(hc.HvdCompressError, match="auto measures"):
        hct.compression("auto", comm=object())
