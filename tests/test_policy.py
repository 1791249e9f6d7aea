"""The dynamic level of seed 000: k* = argmax S_k / C(k), checked against brute force."""
import numpy as np
import pytest

import hvd_compress as hc
from hvd_compress.core.ops import backend_for, backend_named
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


def test_allgather_policy_from_noisy_timings_errs_toward_fewer_bits():
    """Timings that do not grow with the bits (a busy machine) fit no slope: the policy
    takes the largest Allgather's seconds per bit instead of refusing beta=0; clean
    timings give the ring model's alpha and beta."""
    from hvd_compress.comm.mpi import allgather_policy
    noisy = [(8 << 10, 3e-3), (8 << 16, 9e-3), (8 << 20, 2e-3)]
    policy = allgather_policy(noisy, 4, kmin=1)
    assert policy.beta == pytest.approx(2e-3 / (8 << 20) / 3) and policy.alpha >= 0
    clean = [(b, 2e-5 + 3e-9 * b) for b in (8 << 10, 8 << 16, 8 << 20)]
    policy = allgather_policy(clean, 4)
    assert (policy.alpha, policy.beta) == pytest.approx((2e-5 / 3, 1e-9))


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
        assert p.choose_s(bk, v, q) == best[1] == graph_choice(p, v, q), spec


def graph_choice(policy, v, q):
    """The level ``policy`` chooses inside a TensorFlow graph."""
    import tensorflow as tf
    tfb = backend_named("tensorflow")
    return int(tf.function(lambda v: policy.choose_s(tfb, v, q))(tf.constant(v)))


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
        assert p.choose_budget(bk, v, c) == max(effs, key=effs.get) == \
            graph_budget(p, v, c)
    small = hc.resolve("bernoulli+dynamic:c0=10").policy.choose_budget(bk, v, Bernoulli())
    large = hc.resolve("bernoulli+dynamic:c0=1e7").policy.choose_budget(bk, v, Bernoulli())
    assert small < large


def graph_budget(policy, v, c):
    """The budget ``policy`` chooses inside a TensorFlow graph."""
    import tensorflow as tf
    tfb = backend_named("tensorflow")
    return float(tf.function(lambda v: policy.choose_budget(tfb, v, c))(tf.constant(v)))


def test_bernoulli_probabilities_inside_a_graph_are_the_eager_ones():
    """lam solved with graph operations (a top-k of data-sized k, a prefix sum): the
    same probabilities as eagerly, saturated entries, zeros and a budget at or above the
    nonzero count included; and the same again from one selection shared by every
    budget (``ranked``, as the dynamic policy solves them)."""
    import tensorflow as tf

    from hvd_compress.core.sparsifiers import Bernoulli
    tfb = backend_named("tensorflow")
    v = decaying(4096, 100)
    v[::7] = 0.0
    a = np.abs(v)
    c = Bernoulli()
    solve = tf.function(lambda a, b: c.probabilities(tfb, a, b))
    shared = tf.function(lambda a, b: c.probabilities(tfb, a, b, c.ranked(tfb, a)))
    ranked = c.ranked(bk, a)
    for budget in (1.0, 3.5, 100.0, 2000.0, 3510.0, 4096.0):
        want = c.probabilities(bk, a, budget)
        for got in (solve(tf.constant(a), tf.constant(budget, tf.float64)),
                    shared(tf.constant(a), tf.constant(budget, tf.float64)),
                    c.probabilities(bk, a, budget, ranked)):
            np.testing.assert_array_equal(got, want, err_msg=str(budget))


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
    assert pipe.policy.choose_s(bk, v, pipe.compressor) == 255 == \
        graph_choice(pipe.policy, v, pipe.compressor)


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
    """Without a profile: dense costs beta_r 32 d (its bytes in the step's fused
    allreduces); top-k at the spec's k a + b d + alpha_g + beta_g bits(k), bits(k) =
    192 + 64 k (the fits are of whole collectives). A slow link sends large tensors
    top-k and leaves tiny ones dense (the allgather's per-message cost); a fast one keeps
    all dense; a dtype Horovod cannot allreduce always goes top-k."""
    from hvd_compress.core.auto import DENSE, Costs, Route
    from hvd_compress.core.pipeline import resolve_pipeline
    pipe = resolve_pipeline("topk:0.01+ef14+auto")
    topk, auto = pipe.compressor, pipe.policy
    slow = Costs((1e-4, 1e-8), (1e-4, 1e-8), (1e-5, 4e-9))     # 100 Mbit/s
    fast = Costs((2e-5, 1e-11), (2e-5, 1e-11), (1e-5, 4e-9))   # 100 Gbit/s

    def route(d, costs, **kw):
        return auto.route(d, "float32", topk, costs, **kw)
    for d in (10, 1000, 10 ** 5, 10 ** 7):
        k = topk.k_for(d)
        dense = 1e-8 * 32 * d
        sparse = 1e-5 + 4e-9 * d + 1e-4 + 1e-8 * (192 + 64 * k)
        assert slow.dense_seconds(d, 32) == pytest.approx(dense)
        assert slow.sparse_seconds(d, 192 + 64 * k) == pytest.approx(sparse)
        assert route(d, slow) == (DENSE if dense <= sparse else Route("topk", k)), d
        assert route(d, fast) == DENSE
        assert route(d, None) == DENSE  # not measured yet
        assert route(d, None, allreduce=False) == route(d, fast, allreduce=False) == \
            Route("topk", k)
        assert route(d, slow, cast=True) == route(d, slow)  # a cast needs a profile
    assert route(10 ** 7, slow) == Route("topk", 10 ** 5)
    assert route(10, slow) == DENSE
    # an absolute k above a tensor's size, and an empty tensor, plan without raising
    absolute = resolve_pipeline("topk:k=50+ef14+auto").compressor
    assert auto.route(10, "float32", absolute, slow) == DENSE
    assert auto.route(10, "float32", absolute, slow, allreduce=False) == Route("topk", 10)
    assert route(0, slow) == DENSE
    # fits that came out free (a noisy machine clamps a negative slope to 0) still plan
    free = Costs((0.0, 0.0), (0.0, 0.0), (0.0, 0.0), (0.0, 0.0))
    profile = [1.0, 2.0, 4.0, 4.0, 1.0]  # k = 10, 30, 100, then the total and the largest
    assert route(1000, free, profile=profile, cast=True) == DENSE
    assert route(1000, free, profile=profile, allreduce=False, feedback=False) == \
        Route("topk", 10)


def auto_plan(d, costs, grads, least, feedback=True):
    """NumPy restatement of one tensor's plan: the k whose share of the ranks' energy is
    the largest per second of top-k's time, then the fastest route (with feedback;
    without, top-k's time divided by its share), ties to dense, then top-k, then the
    cast, which scales the summed largest magnitude to the power of two at or below 64."""
    (_, br), (ag, bg), (a, b), cast, half = costs
    bh = br if half is None else half[1]  # float16 allreduces, where timed apart
    ks = [least] + sorted({k for k in (max(1, int(r * d)) for r in
                                       (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1))
                           if least < k <= d})
    energy = [np.cumsum(np.sort(g.astype(np.float64) ** 2)[::-1]) for g in grads]
    shares = np.array([sum(e[k - 1] for e in energy) for k in ks]) / sum(e[-1] for e in energy)
    times = np.array([a + b * d + ag + bg * 8 * (24 + 8 * k) for k in ks])
    i = int(np.argmax(shares / times))
    largest = sum(float(np.abs(g).max()) for g in grads)
    shift = int(np.floor(np.log2(65504 / 1024 / largest)))
    assert largest * 2.0 ** shift <= 65504 / 1024 < largest * 2.0 ** (shift + 1)
    return min([(br * 32 * d, 0, ("dense", 0, 0)),
                (times[i] / (1.0 if feedback else shares[i]), 1, ("topk", ks[i], 0)),
                (cast[0] + cast[1] * d + bh * 16 * d, 2, ("cast", 0, shift))])[2]


def test_auto_profile_is_each_candidates_energy(xp):
    """A profile holds, per candidate k (the spec's, then 1e-4 ... 0.1 of d above it),
    the energy of the k largest entries, then the total energy and the largest magnitude;
    a non-finite entry counts as zero."""
    from hvd_compress.core.pipeline import resolve_pipeline
    pipe = resolve_pipeline("topk:0.001+ef14+auto")
    g = decaying(20000, 300, seed=3)
    g[7] = np.nan
    x = xp.asarray(g)
    bk = backend_for(x)
    ks = pipe.policy.candidates(20000, pipe.compressor)
    assert ks == [20, 60, 200, 600, 2000]
    prof = pipe.policy.profile(bk, x, pipe.compressor)
    clean = np.nan_to_num(g.astype(np.float64))
    energy = np.cumsum(np.sort(clean ** 2)[::-1])
    np.testing.assert_allclose(prof, [energy[k - 1] for k in ks] +
                               [energy[-1], np.abs(clean).max()], rtol=1e-12)


def test_auto_profiles_inside_a_graph_as_eagerly():
    """The TensorFlow frontend profiles inside tf.function: the same numbers."""
    import tensorflow as tf

    from hvd_compress.core.pipeline import resolve_pipeline
    pipe = resolve_pipeline("topk:0.001+ef14+auto")
    g = decaying(20000, 300, seed=4)
    bk = backend_named("tensorflow")
    graph = tf.function(lambda x: pipe.policy.profile_tensor(bk, x, pipe.compressor))
    np.testing.assert_array_equal(graph(tf.constant(g)).numpy(),
                                  pipe.policy.profile(bk, tf.constant(g), pipe.compressor))


def test_auto_plans_by_improvement_per_second():
    """With the ranks' summed profile: each tensor takes dense, a float16 cast or top-k
    at the candidate k with the most energy sent per second (a NumPy restatement); a cast
    only for float32 and where float16 can be allreduced."""
    from hvd_compress.core.auto import DENSE, Costs, Route
    from hvd_compress.core.pipeline import resolve_pipeline
    pipe = resolve_pipeline("topk:0.001+ef14+auto")
    auto, topk = pipe.policy, pipe.compressor
    links = [Costs((1e-4, 1e-8), (1e-4, 1e-8), (1e-3, 4e-9), (1e-5, 1e-9)),   # 100 Mbit/s
             Costs((1e-4, 1e-9), (1e-4, 1e-9), (1e-3, 4e-9), (1e-5, 1e-9)),   # 1 Gbit/s
             Costs((5e-5, 1e-10), (5e-5, 1e-10), (1e-3, 4e-9), (1e-5, 2e-11)),  # 10 Gbit/s
             Costs((2e-5, 1e-12), (2e-5, 1e-12), (1e-4, 4e-9), (1e-5, 1e-9)),  # memory speed
             # 1 Gbit/s where float16 sums cost 4x float32's per bit (Horovod on a CPU)
             Costs((1e-4, 1e-9), (1e-4, 1e-9), (1e-3, 4e-9), (1e-5, 1e-9), (1e-4, 4e-9))]
    seen = set()
    for d in (50, 3000, 100000):
        for scale in (1.0, 1e-9, 1e6):  # a cast scales any magnitude into float16's range
            grads = [scale * decaying(d, max(1, d // 100), seed=s) for s in range(3)]
            prof = [sum(v) for v in zip(*(auto.profile(bk, g, topk) for g in grads))]
            for costs in links:
                got = auto.route(d, "float32", topk, costs, prof, cast=True)
                assert tuple(got) == auto_plan(d, costs, grads, topk.k_for(d)), (d, costs)
                seen.add(got.kind if got.k <= topk.k_for(d) else "topk above the spec's k")
                lossy = auto.route(d, "float32", topk, costs, prof, cast=True, feedback=False)
                assert tuple(lossy) == auto_plan(d, costs, grads, topk.k_for(d), False)
                seen.add(("lossy", lossy.kind))
                if got.kind == "cast":  # not without a float16 allreduce, nor for others
                    for dtype, cast in (("float32", False), ("float16", True),
                                        ("float64", True)):
                        assert auto.route(d, dtype, topk, costs, prof, cast=cast).kind != "cast"
            if d == 3000:  # a cast at 1 Gbit/s, unless float16 allreduces are slow
                assert auto.route(d, "float32", topk, links[1], prof, cast=True).kind == "cast"
                assert auto.route(d, "float32", topk, links[4], prof, cast=True) == DENSE
    assert seen >= {"dense", "cast", "topk above the spec's k", ("lossy", "topk")}
    # a profile of another tensor's size, or with a NaN, is the spec's k alone
    slow = links[0]
    assert auto.route(10 ** 6, "float32", topk, slow, [1.0, 2.0, 1.0], cast=True) == \
        auto.route(10 ** 6, "float32", topk, slow) == Route("topk", 1000)
    assert auto.route(10, "float32", topk, slow) == DENSE


def test_auto_casts_only_where_the_float16_message_pays():
    """Horovod fuses a step's allreduces by dtype: casts keep their float16 message only
    where what they save pays for its alpha (less float32's where no tensor stays dense),
    the same for every tensor."""
    from hvd_compress.core.auto import DENSE, Costs
    from hvd_compress.core.pipeline import resolve_pipeline
    pipe = resolve_pipeline("topk:0.01+ef14+auto")
    auto, topk = pipe.policy, pipe.compressor
    grads = {d: decaying(d, d // 10, seed=d) for d in (5000, 20000)}
    tensors = {f"w{d}": (d, "float32", auto.profile(bk, g, topk)) for d, g in grads.items()}
    tensors["tiny"] = (3, "float32", auto.profile(bk, np.ones(3, np.float32), topk))

    def plan(half_alpha, fp32_alpha=1e-4):
        costs = Costs((fp32_alpha, 1e-9), (1.0, 1e-9), (1.0, 0.0), (1e-6, 1e-10),
                      (half_alpha, 1e-9))
        return auto.plan(tensors, topk, costs, allreduce=("float16", "float32"))
    # the per-tensor plan casts both weights and sends the tiny one dense; the casts
    # save (32 - 16 - 0.1) 1e-9 s per entry over 25,000 entries, less 1 us each: 0.4 ms
    saved = (32 - 16) * 1e-9 * 25000 - 1e-10 * 25000 - 2e-6
    assert {n: r.kind for n, r in plan(0.0).items()} == \
        {"w5000": "cast", "w20000": "cast", "tiny": "dense"}
    assert {r.kind for r in plan(saved * 0.99).values()} == {"cast", "dense"}
    assert plan(saved * 1.01) == {n: DENSE for n in tensors}
    # with no dense tensor left, the float16 message replaces float32's
    del tensors["tiny"]
    assert {r.kind for r in plan(1e-4 + saved * 0.99).values()} == {"cast"}
    assert plan(1e-4 + saved * 1.01) == {n: DENSE for n in tensors}
    # a dropped cast takes its tensor's next best route, here top-k
    fast_topk = Costs((1e-4, 1e-8), (1e-6, 1e-9), (1e-6, 1e-10), (1e-6, 1e-10), (1.0, 1e-11))
    routes = auto.plan(tensors, topk, fast_topk, allreduce=("float16", "float32"))
    assert {r.kind for r in routes.values()} == {"topk"}
    assert {r.kind for r in auto.plan(tensors, topk, fast_topk._replace(allreduce16=(0.0, 1e-11)),
                                      allreduce=("float16", "float32")).values()} == {"cast"}


@pytest.mark.parametrize("scale", [1e-9, 1.0, 1e4])
def test_auto_cast_keeps_small_and_large_gradients(xp, scale):
    """The cast scales by the power of two that puts the ranks' summed largest magnitude
    in [32, 64]: gradients of any size survive float16 (each entry to float16's relative
    precision, 2^-11, or to 2^-24 of 64 for the smallest), and 1024x larger ones still
    fit."""
    from hvd_compress.core.auto import cast_from_wire, cast_shift, cast_to_wire
    g = (scale * decaying(1000, 100, seed=1)).astype(np.float32)
    largest = 2 * float(np.abs(g).max())  # two ranks' sum
    shift = cast_shift(largest)
    assert 32 <= largest * 2.0 ** shift <= 64
    x = xp.asarray(g)
    bk = backend_for(x)
    wire = cast_to_wire(bk, x, shift)
    assert bk.dtype(wire) == "float16"
    np.testing.assert_array_equal(xp.numpy(x), g)  # x as it was
    np.testing.assert_array_equal(  # one pass, the same as scaling then casting
        xp.numpy(wire), (g * np.float32(2.0 ** shift)).astype(np.float16))
    back = xp.numpy(cast_from_wire(bk, wire, "float32", shift))
    np.testing.assert_allclose(back, g, rtol=2 ** -11, atol=64 * 2.0 ** (-24 - shift))
    assert np.abs(back).max() > 0
    spike = xp.numpy(cast_from_wire(bk, cast_to_wire(bk, xp.asarray(1000 * g), shift),
                                    "float32", shift))
    assert np.isfinite(spike).all()


def cast_exchanges(nonfinite, g):
    """Two ranks' Exchanges of ``topk:0.1+ef14+auto`` whose plan casts tensor 'w' (the
    ranks' gradients ``g``)."""
    from hvd_compress.core.auto import Costs
    from hvd_compress.core.exchange import Exchange
    link = Costs((1e-9, 1e-6), (1e-2, 1e-6), (0.0, 0.0), (0.0, 0.0))
    exs = [Exchange("topk:0.1+ef14+auto", nonfinite=nonfinite) for _ in range(2)]
    for ex in exs:
        ex.profiles = {"w": (300, "float32", [sum(v) for v in zip(
            *(ex.pipeline.policy.profile(bk, x, ex.pipeline.compressor) for x in g))])}
        ex.costs = link
    return exs


@pytest.mark.parametrize("overwrite", [False, True])
def test_auto_cast_route_through_the_exchange(overwrite):
    """The cast route hands the allreduce float16(g * 2**shift) and turns the sum back
    into the average in the gradient's dtype, feedback state untouched: with
    ``overwrite`` scaled in the gradient's memory, where the update is written back,
    else in new tensors, the gradient left as it was; a sum that overflowed float16
    anyway (gradients 1024x larger than at the measurement) is named as such with
    nonfinite='raise'."""
    g = [1e-7 * decaying(300, 50, seed=r) for r in range(2)]
    exs = cast_exchanges("raise", g)
    sent = [x.copy() for x in g]
    outs = [ex.begin(bk, "w", sent[r], r, overwrite=overwrite) for r, ex in enumerate(exs)]
    shift = exs[0].route("w", 300, "float32").shift
    assert exs[0].route("w", 300, "float32").kind == "cast" and shift > 20
    assert all(o.wire.dtype == np.float16 and o.dense_route and o.shift == shift for o in outs)
    total = outs[0].wire.astype(np.float32) + outs[1].wire.astype(np.float32)
    mean = (total * 0.5).astype(np.float16)  # what an average in float16 returns
    update = exs[0].finish_allreduced(bk, mean, outs[0], 2, False)
    assert update.dtype == np.float32
    scaled = [(x * np.float32(2.0 ** shift)).astype(np.float16) for x in g]
    np.testing.assert_array_equal(outs[0].wire, scaled[0])
    np.testing.assert_array_equal(update, mean.astype(np.float32) * np.float32(2.0 ** -shift))
    np.testing.assert_allclose(update, (g[0] + g[1]) / 2, rtol=4e-3, atol=1e-12)
    if overwrite:
        assert np.shares_memory(update, sent[0])  # the update takes the gradient's memory
    else:
        np.testing.assert_array_equal(sent[0], g[0])  # the gradient as it was
    assert "w" not in exs[0].states  # the feedback state waits for a top-k step
    with np.errstate(over="ignore"):
        spike = exs[0].begin(bk, "w", 1e4 * g[0], 0, overwrite=overwrite)
    assert not np.isfinite(spike.wire).all()
    with pytest.raises(hc.HvdCompressError, match="overflowed float16.*auto:every"):
        exs[0].finish_allreduced(bk, spike.wire, spike, 2, False)


@pytest.mark.parametrize("overwrite", [False, True])
def test_auto_cast_that_overflows_is_sent_again_in_the_gradients_dtype(overwrite):
    """Where the float16 sum is not finite, every rank sends the tensor again (as it is,
    or as scaled in its memory, then scaled back): the update is the float32 average
    exactly (scaling by a power of two is exact), logged as a row of count 0; a finite
    sum sends nothing again."""
    g = [1e-7 * decaying(300, 50, seed=r) for r in range(2)]
    exs = cast_exchanges("propagate", g)
    spikes = [1e4 * x for x in g]
    sent = [x.copy() for x in spikes]
    with np.errstate(over="ignore"):
        outs = [ex.begin(bk, "w", sent[r], r, overwrite=overwrite)
                for r, ex in enumerate(exs)]
        sum16 = outs[0].wire + outs[1].wire
    assert not np.isfinite(sum16).all()
    again = [ex.resend_dense(bk, sum16, o) for ex, o in zip(exs, outs)]
    assert all(a is not None and a.wire is s and a.wire.dtype == np.float32
               for a, s in zip(again, sent))
    for s_, x in zip(sent, spikes):  # as the gradient was: scaled back where scaled
        np.testing.assert_array_equal(s_, x)
    mean = (again[0].wire + again[1].wire) * np.float32(0.5)  # what the average returns
    update = exs[0].finish_allreduced(bk, mean, again[0], 2, False)
    np.testing.assert_array_equal(update, (spikes[0] + spikes[1]) * np.float32(0.5))
    rows = [r for r in exs[0].telemetry.rows if r.name == "w"]
    assert [(r.count, r.bits) for r in rows] == [(300, 16 * 300), (0, 32 * 300)]
    assert exs[0].resend_dense(bk, np.ones(300, np.float16), outs[0]) is None


def cast_step(exs, grads):
    """One step of two ranks' cast route (Exchanges from :func:`cast_exchanges`), the
    float16 average restated: (the update, or None where the ranks send it again; what
    resend_dense returned on each rank; each rank's shift for the next step)."""
    with np.errstate(over="ignore", invalid="ignore"):  # overflows are what some test
        outs = [ex.begin(bk, "w", x.copy(), r) for r, (ex, x) in enumerate(zip(exs, grads))]
        mean = ((outs[0].wire.astype(np.float32) + outs[1].wire.astype(np.float32))
                * 0.5).astype(np.float16)
    again = [ex.resend_dense(bk, mean, o) for ex, o in zip(exs, outs)]
    update = exs[0].finish_allreduced(bk, mean, outs[0], 2, False) \
        if again[0] is None else None
    return update, again, [ex.route("w", 300, "float32").shift for ex in exs]


def test_auto_cast_scale_follows_the_gradient_between_measurements():
    """From the float16 sum every rank holds alike: once its largest entry is 2^10 below
    the first seen since the plan (the gradient shrank 1e6x), the next steps' scale
    grows by the power of two between them, and the update keeps float16's precision
    (it had flushed to subnormals); after each overflow (then 1e8x larger) the next
    steps' scale is 2^10 smaller, until the same gradient no longer overflows."""
    g = [1e-7 * decaying(300, 50, seed=r) for r in range(2)]
    exs = cast_exchanges("propagate", g)

    def step(grads):
        return cast_step(exs, grads)

    def error(update, grads):
        want = (grads[0] + grads[1]) / 2
        return float(np.abs(update - want).max() / np.abs(want).max())
    _, again, (first, _) = step(g)
    assert again == [None, None]
    small = [np.float32(1e-6) * x for x in g]
    flushed, _, shifts = step(small)
    assert shifts[0] == shifts[1] and 19 <= shifts[0] - first <= 21
    kept, _, _ = step(small)
    assert error(kept, small) < 2 ** -10 < error(flushed, small)
    big = [np.float32(1e8) * x for x in small]  # 2^26.6 larger: past 2^10 of headroom twice
    for overflow in (1, 2):
        _, again, grown = step(big)
        assert again[0] is not None and grown[0] == grown[1] == shifts[0] - 10 * overflow
    _, again, _ = step(big)
    assert again == [None, None]


def test_auto_cast_sum_of_zeros_is_sent_again_and_its_dense_sum_sets_the_scale():
    """A gradient that falls below float16's range after the plan (1e-12x) leaves a
    float16 sum of zeros only: instead of a zero update until the next measurement,
    every rank sends it again as it is (the exact float32 average, a row of count 0),
    and that dense sum sets the next steps' scale afresh (the power of two that puts its
    largest entry, summed over the ranks, in [32, 64)), after which the cast carries the
    gradient again within float16's precision. A gradient that is zero on every rank is
    sent again too, and leaves the scale as it was."""
    import math
    g = [1e-7 * decaying(300, 50, seed=r) for r in range(2)]
    exs = cast_exchanges("propagate", g)
    _, again, (shift, _) = cast_step(exs, g)
    assert again == [None, None]

    def resent(grads):
        update, again, shifts = cast_step(exs, grads)
        assert update is None and all(a is not None for a in again) and shifts == [shift] * 2
        mean = (again[0].wire + again[1].wire) * np.float32(0.5)
        np.testing.assert_array_equal(exs[0].finish_allreduced(bk, mean, again[0], 2, False),
                                      (grads[0] + grads[1]) * np.float32(0.5))
        for ex, a in zip(exs, again):
            ex.rescale_flushed(bk, mean, a, 2)
        return float(np.abs(mean).max()) * 2, [ex.route("w", 300, "float32") for ex in exs]
    tiny = [np.float32(1e-12) * x for x in g]
    largest, routes = resent(tiny)
    shift = math.frexp(65504 / 1024 / largest)[1] - 1
    assert routes == [routes[0]] * 2 and routes[0].kind == "cast" and routes[0].shift == shift
    rows = [(r.count, r.bits) for r in exs[0].telemetry.rows if r.name == "w"]
    assert rows[-2:] == [(300, 16 * 300), (0, 32 * 300)]
    update, again, _ = cast_step(exs, tiny)
    assert again == [None, None]
    want = (tiny[0] + tiny[1]) / 2
    assert np.abs(update - want).max() <= 2 ** -9 * np.abs(want).max()
    _, routes = resent([np.zeros(300, np.float32)] * 2)
    assert [r.shift for r in routes] == [shift] * 2 and routes[0].kind == "cast"


def test_auto_cast_of_a_nan_gradient_raises_with_the_gradient_as_it_was():
    """nonfinite='raise': a NaN on one rank makes the float16 sum NaN, every rank sends
    the tensor again in float32 (the gradient scaled back in its memory first), and the
    dense sum's NaN is named as a gradient's, not as an overflow."""
    g = [1e-7 * decaying(300, 50, seed=r) for r in range(2)]
    exs = cast_exchanges("raise", g)
    bad = g[1].copy()
    bad[7] = np.nan
    sent = [g[0].copy(), bad.copy()]
    outs = [ex.begin(bk, "w", sent[r], r, overwrite=True) for r, ex in enumerate(exs)]
    assert outs[0].into is not None  # scaled in its memory
    again = exs[0].resend_dense(bk, outs[0].wire + outs[1].wire, outs[0])
    np.testing.assert_array_equal(sent[0], g[0])
    mean = (again.wire + exs[1].resend_dense(bk, outs[0].wire + outs[1].wire,
                                             outs[1]).wire) * np.float32(0.5)
    with pytest.raises(hc.HvdCompressError, match="NaN or infinite") as raised:
        exs[0].finish_allreduced(bk, mean, again, 2, False)
    assert "overflowed" not in str(raised.value)


def test_auto_cast_of_a_strided_gradient_is_made_apart():
    """A gradient whose entries are not in order in its memory (a transposed view,
    channels_last) is scaled and cast into a new contiguous float16 tensor, as a
    collective needs, and left as it was; the dense route sends a copy in order."""
    import torch
    g = [1e-7 * decaying(300, 50, seed=r) for r in range(2)]
    exs = cast_exchanges("raise", g)
    for x in (g[0].reshape(20, 15).T, torch.from_numpy(g[0].reshape(20, 15)).T):
        b = backend_for(x)
        out = exs[0].begin(b, "w", x, 0, overwrite=True)
        assert out.into is None and b.contiguous(out.wire) and b.dtype(out.wire) == "float16"
        np.testing.assert_array_equal(np.asarray(x), g[0].reshape(20, 15).T)
        exs[1].costs = None  # before the measurement: dense, in a copy in order
        out = exs[1].begin(b, "w", x, 1, overwrite=True)
        assert out.dense_route and out.shift is None and b.contiguous(out.wire)
        np.testing.assert_array_equal(np.asarray(out.wire), np.asarray(x))


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
    import hvd_compress.torch as hct
    with pytest.raises(hc.HvdCompressError, match="tree transport"):
        hct.compression("auto", comm=object(), transport="tree")
