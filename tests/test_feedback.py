"""Feedback rules: exact invariants, class checks, and the same trajectory on every backend."""
import numpy as np
import pytest

import hvd_compress as hc
from hvd_compress import Key
from hvd_compress.core.exchange import Exchange
from hvd_compress.core.ops import backend_for, backend_named
from hvd_compress.core.payload import HEADER_BYTES
from hvd_compress.core.pipeline import resolve_pipeline
from hvd_compress.core.simulate import Workers

from conftest import XP

RULES = ["topk:0.1+ef14", "topk:0.1+ef21", "topk:0.1+ef21sgdm:eta=0.3",
         "topk:0.1+ef21sgd2m:eta=0.3", "randk:0.2,scaled=true+diana", "qsgd+diana:alpha=0.2",
         "threshold:lam=0.8+ef14", "sign+ef14", "topk:0.1+ef21+warmup:2"]


def grads(n, d, step, seed=0):
    return [np.random.RandomState(seed + 1000 * r + step).standard_normal(d).astype(np.float32)
            for r in range(n)]


def test_ef14_conserves_everything(xp):
    """sent + new residual == old residual + gradient, exactly, at every step."""
    pipe = resolve_pipeline("topk:0.05+ef14")
    bk = backend_named(xp.name)
    g0 = xp.asarray(grads(1, 400, 0)[0])
    state = pipe.init(bk, g0)
    for step in range(5):
        g = xp.asarray(grads(1, 400, step)[0])
        payload, codec, new, _ = pipe.encode(bk, g, state, Key(0, 0, "w", step))
        sent = xp.numpy(codec.decode_flat(bk, payload))
        np.testing.assert_array_equal(sent + xp.numpy(new.residual),
                                      xp.numpy(state.residual) + xp.numpy(g))
        assert int(payload.count) == 20
        state = new


@pytest.mark.parametrize("spec", RULES)
def test_sparse_state_moves_equal_the_dense_restatement(spec):
    """The rules move residuals and estimates by the sent entries only; the result is the
    dense formula's, bit for bit (every other entry adds an exact zero)."""
    bk = backend_named("numpy")
    pipe = resolve_pipeline(spec)
    state = pipe.init(bk, grads(1, 500, 0)[0])
    for step in range(4):
        g = grads(1, 500, step)[0]
        payload, codec, new, _ = pipe.encode(bk, g, state, Key(0, 0, "w", step))
        sent = codec.decode_flat(bk, payload).astype(np.float32)
        if hasattr(state, "residual"):
            np.testing.assert_array_equal(new.residual, (state.residual + g) - sent)
        elif hasattr(state, "shift"):
            np.testing.assert_array_equal(new.shift, state.shift + sent * state.alpha)
        elif step >= 2 or "warmup" not in spec:
            target = new.momentum2 if hasattr(new, "momentum2") else \
                getattr(new, "momentum", None)
            target = g if target is None else target
            np.testing.assert_array_equal(new.local, state.local + sent)
            np.testing.assert_array_equal(sent, codec.decode_flat(
                bk, codec.compress(target - state.local, Key(0, 0, "w", step))))
        state = new


@pytest.mark.parametrize("backend", ["numpy", "torch"])  # TF tensors are immutable
@pytest.mark.parametrize("spec", RULES)
def test_the_update_shares_no_memory_with_the_state(backend, spec):
    """Frameworks hand the update to the user as the gradient, which may be clipped or
    zeroed in place: that must not reach the feedback state."""
    xp = XP(backend)
    bk = backend_named(xp.name)
    pipe = resolve_pipeline(spec)
    g = xp.asarray(grads(1, 300, 0)[0])
    state = pipe.init(bk, g)
    for step in range(3):
        payload, codec, state, _ = pipe.encode(bk, g, state, Key(0, 0, "w", step))
        mean, _ = codec.mean(bk, [payload], 1)
        update, state = pipe.decode(bk, bk.astype(mean, "float32"), state)
        before = [xp.numpy(t).copy() for t in state if hasattr(t, "shape")]
        update *= 0  # what optimizer.zero_grad(set_to_none=False) or clipping does
        after = [xp.numpy(t) for t in state if hasattr(t, "shape")]
        for a, b in zip(before, after):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("spec", ["topk:0.1+ef21", "topk:0.1+ef21sgdm", "topk:0.1+ef21sgd2m",
                                  "randk:0.2,scaled=true+diana:alpha=1.0"])
def test_aggregate_is_the_mean_of_the_local_estimates(spec):
    w = Workers(spec, n=4)
    for step in range(6):
        w.step(grads(4, 300, step))
        local = np.mean([s.local if hasattr(s, "local") else s.shift for s in w.states], 0)
        for s in w.states:
            np.testing.assert_allclose(s.aggregate, local, rtol=1e-5, atol=1e-6)


def test_ef21sgdm_with_eta_one_is_ef21():
    a, b = Workers("topk:0.1+ef21", 3), Workers("topk:0.1+ef21sgdm:eta=1.0", 3)
    for step in range(5):
        g = grads(3, 200, step)
        np.testing.assert_array_equal(a.step(g), b.step(g))


def test_diana_shifts_learn_the_local_gradients():
    """Fixed, heterogeneous gradients: the shifts converge to them and the update to the
    mean, although each step sends a fifth of the entries."""
    fixed = grads(4, 100, 0)
    w = Workers("randk:0.2,scaled=true+diana", 4, seed=1)
    for _ in range(300):
        update = w.step(fixed)
    for s, g in zip(w.states, fixed):
        assert np.linalg.norm(s.shift - g) < 1e-3 * np.linalg.norm(g)
    np.testing.assert_allclose(update, np.mean(fixed, 0), atol=1e-3)


def test_warmup_sends_dense_then_compresses():
    w = Workers("topk:k=5+ef21+warmup:2", 2)
    first = w.step(grads(2, 100, 0))
    np.testing.assert_allclose(first, np.mean(grads(2, 100, 0), 0), rtol=1e-6)  # exact init
    w.step(grads(2, 100, 1))
    w.step(grads(2, 100, 2))
    bits = [b[0] for b in w.bits]
    h = 8 * HEADER_BYTES
    assert bits[0] == bits[1] == h + 100 * 32 and bits[2] == h + 5 * 64


@pytest.mark.parametrize("spec", RULES)
def test_backends_follow_the_same_trajectory(spec):
    import tensorflow as tf
    import torch
    runs = {}
    for name, conv in (("numpy", np.asarray), ("torch", torch.from_numpy),
                       ("tensorflow", tf.constant)):
        w = Workers(spec, 3, seed=2)
        updates = []
        for step in range(4):
            u = w.step([conv(g) for g in grads(3, 500, step)])
            updates.append(backend_for(u).to_numpy(u))
        runs[name] = np.stack(updates)
    tol = 1e-6 if "qsgd" in spec else 0
    np.testing.assert_allclose(runs["torch"], runs["numpy"], rtol=tol, atol=tol)
    np.testing.assert_allclose(runs["tensorflow"], runs["numpy"], rtol=tol, atol=tol)


def test_pipeline_specs_round_trip():
    for spec in RULES:
        pipe = hc.resolve(spec)
        assert hc.resolve(pipe.spec()) == pipe
    assert hc.resolve("topk:0.05+ef21sgdm:eta=0.1").spec() == "topk:ratio=0.05+ef21sgdm"
    assert isinstance(hc.resolve("topk:0.01"), hc.Compressor)


def test_perturbation_noise_is_isotropic_over_the_model_and_private(xp):
    """Avdiukhin & Yaroslavtsev's xi ~ N(0, (r^2 / D) I) over the whole model of D entries:
    a small bias and a large weight get the same per-entry variance, and the model's noise
    has E||xi||^2 = r^2 in all (not r^2 per tensor)."""
    from hvd_compress.core.ops import backend_named
    pipe = hc.resolve("none+perturb:radius=0.5")
    bk = backend_named(xp.name)
    sizes = {"bias": 64, "weight": 40000}
    D = sum(sizes.values())
    draws = [{name: xp.numpy(pipe.encode(bk, xp.asarray(np.zeros(d, np.float32)), None,
                                         Key(0, r, name, 0), model_size=D)[0].values)
              for name, d in sizes.items()} for r in range(3)]
    for noise in draws:
        total = sum(np.sum(x.astype(np.float64) ** 2) for x in noise.values())
        assert total == pytest.approx(0.25, rel=0.05)
        assert np.var(noise["weight"]) == pytest.approx(0.25 / D, rel=0.05)
    bias = np.concatenate([noise["bias"] for noise in draws])  # 192 draws
    assert np.var(bias) == pytest.approx(0.25 / D, rel=0.35)
    assert not np.allclose(draws[0]["weight"], draws[1]["weight"])  # independent across ranks
    with pytest.raises(hc.HvdCompressError, match="needs the model's size"):
        pipe.encode(bk, xp.asarray(np.zeros(4, np.float32)), None, Key(0, 0, "w", 0))
    from hvd_compress.core.simulate import Workers
    for bad in (0, -3, 2.5):
        with pytest.raises(hc.HvdCompressError, match="model_size"):
            Workers("none+perturb", 2, model_size=bad)


def test_measured_error_is_the_compression_error():
    from hvd_compress.core.exchange import Exchange
    ex = Exchange("topk:k=10", measure_error=True)
    x = grads(1, 100, 0)[0]
    ex.begin(backend_named("numpy"), "w", x, rank=0)
    kept = np.sort(np.abs(x))[-10:]
    lost = np.sum(x.astype(np.float64) ** 2) - np.sum(kept.astype(np.float64) ** 2)
    assert ex.telemetry.rows[0].error == pytest.approx(lost / np.sum(x.astype(np.float64) ** 2),
                                                       rel=1e-5)
    assert ex.telemetry.rows[0].error_sq == pytest.approx(lost, rel=1e-5)


def test_summed_error_is_the_total_error_of_the_run():
    """Sahu et al.'s total error sum_t ||e_t||^2, with e_t = C(v_t) - v_t of the vector
    compressed (under EF14, v_t = e_{t-1} + g_t), over steps and tensors."""
    from hvd_compress.core.exchange import Exchange
    ex = Exchange("topk:k=10+ef14", measure_error=True)
    residual, total = {"a": 0.0, "b": 0.0}, 0.0
    for step in range(3):
        for name in ("a", "b"):
            g = grads(1, 100, step + (name == "b"))[0].astype(np.float64)
            ex.begin(backend_named("numpy"), name, g.astype(np.float32), rank=0)
            v = residual[name] + g
            keep = np.argsort(-np.abs(v), kind="stable")[:10]
            e = v.copy()
            e[keep] = 0
            residual[name], total = e, total + np.sum(e ** 2)
    assert ex.telemetry.summed_error() == pytest.approx(total, rel=1e-5)
    assert np.isnan(Exchange("topk:k=10").telemetry.summed_error())


def test_telemetry_to_tensorboard_and_csv(tmp_path):
    from hvd_compress.core.exchange import Exchange
    ex = Exchange("topk:k=10+ef14", measure_error=True)
    for step in range(2):
        for name in ("a", "b"):
            ex.begin(backend_named("numpy"), name, grads(1, 100, step)[0], rank=0)
    seen = []
    ex.telemetry.to_tensorboard(lambda tag, v, s: seen.append((tag, v, s)))
    assert ("hvd_compress/bits", 2 * (8 * HEADER_BYTES + 10 * 64), 1) in seen
    assert ("hvd_compress/a/k", 10, 0) in seen
    assert sum(1 for t, _, _ in seen if t.endswith("/error")) == 4
    ex.telemetry.to_csv(tmp_path / "t.csv")
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert lines[0].split(",")[:3] == ["step", "name", "bits"] and len(lines) == 5


def test_telemetry_keeps_the_latest_rows_and_counts_every_one():
    """A bounded log: the oldest rows fall out (counted), the totals keep every row, and
    a larger bound or None keeps what comes next."""
    from hvd_compress.core.exchange import Exchange
    ex = Exchange("topk:k=10+ef14", measure_error=True)
    t = ex.telemetry
    t.max_rows = 3
    for step in range(4):
        for name in ("a", "b"):
            ex.begin(backend_named("numpy"), name, grads(1, 100, step)[0], rank=0)
    every = Exchange("topk:k=10+ef14", measure_error=True)
    for step in range(4):
        for name in ("a", "b"):
            every.begin(backend_named("numpy"), name, grads(1, 100, step)[0], rank=0)
    assert [(r.step, r.name) for r in t.rows] == [(2, "b"), (3, "a"), (3, "b")]
    assert t.dropped == 5
    assert (t.total_bits(), t.dense_bits(), t.summed_error()) == (
        every.telemetry.total_bits(), every.telemetry.dense_bits(),
        every.telemetry.summed_error())
    assert t.total_bits() == sum(r.bits for r in every.telemetry.rows)
    t.max_rows = 2
    assert [r.step for r in t.rows] == [3, 3] and t.dropped == 6
    t.max_rows = None
    ex.begin(backend_named("numpy"), "a", grads(1, 100, 4)[0], rank=0)
    assert len(t.rows) == 3 and t.dropped == 6
    t.clear()
    assert (t.rows, t.total_bits(), t.dropped) == ([], 0, 0) and np.isnan(t.summed_error())


def test_adiana_converges_on_a_strongly_convex_problem():
    from hvd_compress.core.simulate import adiana
    rs = np.random.RandomState(0)
    n, d = 8, 30
    As = [rs.standard_normal((15, d)) for _ in range(n)]
    bs = [rs.standard_normal(15) for _ in range(n)]
    H = sum(a.T @ a for a in As) / (15 * n) + 0.05 * np.eye(d)
    c = sum(a.T @ b for a, b in zip(As, bs)) / (15 * n)
    xstar = np.linalg.solve(H, c)
    L_max = max(np.linalg.eigvalsh(a.T @ a / 15).max() + 0.05 for a in As)
    grads = lambda i, x: As[i].T @ (As[i] @ x - bs[i]) / 15 + 0.05 * x  # noqa: E731
    # a step 70x the theorem's (which is conservative): converges here, without guarantee
    eta = 1 / (2 * L_max * (1 + 4 * 2.0 / n))
    y = adiana(grads, np.zeros(d), L_max, np.linalg.eigvalsh(H).min(),
               "randk:k=10,scaled=true", n, 1500, eta=eta)
    assert np.linalg.norm(y - xstar) < 1e-4 * np.linalg.norm(xstar)


def test_adiana_default_step_is_the_theorems():
    """Li et al., strongly convex theorem: eta = min{1/(2 L_max),
    n / (64 omega (2p(omega+1)+1)^2 L_max)}, p = 1/(1+omega); shared masks are not
    independent, so n counts as 1."""
    from hvd_compress.core.simulate import adiana, adiana_step
    omega = 30 / 10 - 1
    assert adiana_step(4.0, omega, 8) == pytest.approx(8 / (64 * omega * 9 * 4.0))
    assert adiana_step(4.0, 0.0, 8) == 1 / 8    # no compression: plain 1/(2 L_max)
    assert adiana_step(4.0, 1e-3, 10 ** 6) == 1 / 8
    rs = np.random.RandomState(1)
    b = rs.standard_normal(30)
    grads = lambda i, x: x - b * (i + 1)  # noqa: E731
    for shared, spread in (("false", 8), ("true", 1)):
        spec = f"randk:k=10,scaled=true,shared={shared}"
        by_default = adiana(grads, np.zeros(30), 4.0, 1.0, spec, 8, 5, seed=3)
        explicit = adiana(grads, np.zeros(30), 4.0, 1.0, spec, 8, 5, seed=3,
                          eta=adiana_step(4.0, omega, spread))
        assert np.array_equal(by_default, explicit)


def test_threshold_for_budget_matches_a_runs_total():
    """Sahu et al.'s setting: the hard threshold sending, over a whole EF14 run, as many
    entries as top-1 does."""
    from hvd_compress.core.simulate import Workers, threshold_for_budget
    rs = np.random.RandomState(0)
    gs = [rs.standard_normal(50) * np.exp(-np.arange(50) / 10) for _ in range(40)]

    def sent(lam):
        w = Workers(f"threshold:lam={lam}+ef14", 1)
        return sum(w.step([g]) is not None and int(w.last[0].count) for g in gs)

    lam = threshold_for_budget(sent, 40, rtol=0.0, rounds=30)
    assert abs(sent(lam) - 40) <= 2
    with pytest.raises(hc.HvdCompressError, match="outside, widen"):
        threshold_for_budget(sent, 10 ** 6)


@pytest.mark.parametrize("spec", ["topk:0.1+ef14", "topk:0.1,values=float16+ef21sgdm",
                                  "randk:0.2+ef14", "sign+ef14", "topk:0.1+ef21",
                                  "topk:0.1+ef21sgd2m", "randk:0.2,scaled=true+diana",
                                  "qsgd+diana", "topk:0.1+ef21sgdm+warmup:2"])
def test_overwriting_the_gradient_gives_the_same_update_and_state(spec):
    """Horovod's PyTorch frontend lets the average take the gradient's memory (as Horovod's
    own in-place allreduce does): the same update and state, bit for bit, and for sparse
    payloads no new tensor of the gradient's size."""
    import torch
    bk = backend_named("torch")
    apart, inplace = Exchange(spec), Exchange(spec)
    for step in range(3):
        g = torch.from_numpy(grads(2, 300, step)[0])

        def finish(ex, out):
            if out.by_allreduce:  # the warm-up's dense payload: three ranks' sum
                return ex.finish_allreduced(bk, out.wire * 3, out, 3, True)
            return ex.finish_gathered(bk, torch.cat([out.wire] * 3), out, 3, False)
        want = finish(apart, apart.begin(bk, "w", g.clone(), 0))
        mine = g.clone()
        got = finish(inplace, inplace.begin(bk, "w", mine, 0, overwrite=True))
        assert torch.equal(got, want)
        if spec.startswith("topk:0.1+ef14") or spec.startswith("randk"):
            assert got.data_ptr() == mine.data_ptr()
        for a, b in zip(apart.states["w"], inplace.states["w"]):
            assert not hasattr(a, "shape") or torch.equal(a, b)


@pytest.mark.parametrize("spec", ["topk:0.1+ef14", "topk:0.1+ef21", "topk:0.1+ef21sgdm",
                                  "topk:0.1+ef21sgd2m", "randk:0.2,scaled=true+diana",
                                  "qsgd+diana", "topk:0.1,indices=varint+ef21"])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_a_void_step_leaves_the_state_exactly_as_it_was(spec, backend):
    """The rules move their estimates by a sparse payload in the estimates' own memory;
    where a rank's gradient is not finite every rank voids the step, and the k entries
    overwritten are put back: the state is bit for bit the one before the step, and the
    next step's update is the one it would have been without the void step."""
    xp, bk = XP(backend), backend_named(backend)
    voided, clean = Exchange(spec), Exchange(spec)

    def run(ex, g, n=2):
        out = ex.begin(bk, "w", xp.asarray(g.copy()), 0, overwrite=True)
        wire = bk.concat([out.wire] * n)
        if out.by_allreduce:
            return xp.numpy(ex.finish_allreduced(bk, out.wire, out, 1, False))
        return xp.numpy(ex.finish_gathered(bk, wire, out, n, False))

    for step in range(3):
        g = grads(2, 200, step)[0]
        run(voided, g), run(clean, g)
    before = {k: xp.numpy(v).copy() for k, v in voided.states["w"]._asdict().items()
              if hasattr(v, "shape")}
    poisoned = grads(2, 200, 3)[0]
    poisoned[7] = np.nan
    assert np.isnan(run(voided, poisoned)).all()
    after = voided.states["w"]._asdict()
    for k, v in before.items():
        assert np.array_equal(xp.numpy(after[k]).view(np.uint8), v.view(np.uint8)), k
    assert after.get("count", 0) == clean.states["w"]._asdict().get("count", 0)
    if not spec.startswith(("randk", "qsgd")):  # their draws are keyed by the step number
        g = grads(2, 200, 4)[0]
        assert np.array_equal(run(voided, g), run(clean, g))


@pytest.mark.parametrize("spec", ["topk:0.1+ef14", "topk:0.1+ef21sgdm:eta=0.3",
                                  "topk:0.1+ef21sgd2m:eta=0.3", "sign+ef14"])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_state_memory_alternates_between_two_copies(spec, backend):
    """On a CPU the tensors a rule writes anew each step (EF14's residual, the momenta)
    take the memory the state before the last valid step held: two copies alternate. No
    state tensor shares memory with another, with the gradient or with the update, and
    the updates are the pipeline's own, run without the exchange (a void step between)."""
    xp, bk = XP(backend), backend_named(backend)

    def address(t):
        return t.data_ptr() if backend == "torch" else t.__array_interface__["data"][0]
    ex, pipe = Exchange(spec), resolve_pipeline(spec)
    state, seen = pipe.init(bk, xp.asarray(grads(1, 300, 0)[0])), []
    for step in range(7):
        g = grads(1, 300, step)[0]
        if step == 4:
            g[5] = np.nan
        mine = xp.asarray(g.copy())
        out = ex.begin(bk, "w", mine, 0, overwrite=True)
        got = ex.finish_gathered(bk, out.wire, out, 1, False)
        if step != 4:
            payload, codec, state, _ = pipe.encode(bk, xp.asarray(g), state, Key(0, 0, "w", 0))
            mean, _ = codec.mean(bk, [payload], 1)
            want, state = pipe.decode(bk, bk.astype(mean, "float32"), state)
            assert np.array_equal(xp.numpy(got), xp.numpy(want)), step
        held = {f: address(v) for f, v in ex.states["w"]._asdict().items()
                if hasattr(v, "shape")}
        assert len(set(held.values())) == len(held)
        assert not {address(mine), address(got)} & set(held.values())
        seen.append(held)
    # the fields written anew: the momenta, or EF14's residual
    fresh = [f for f in seen[0] if f not in ("local", "aggregate")]
    for f in fresh:
        assert len({s[f] for s in seen[1:]}) == 2, f


@pytest.mark.parametrize("spec", ["topk:0.1+ef14", "topk:0.1+ef21sgd2m", "sign+ef14"])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_a_state_dict_kept_in_memory_keeps_its_values(spec, backend):
    """The tensors a step writes anew (residual, momenta) become spare memory for later
    steps only if no state_dict handed them out: a state_dict kept in memory (to roll
    back, or to save later) still holds the values it was taken with."""
    xp, bk = XP(backend), backend_named(backend)
    ex = Exchange(spec)

    def step(s):
        out = ex.begin(bk, "w", xp.asarray(grads(1, 300, s)[0]), 0, overwrite=True)
        ex.finish_gathered(bk, out.wire, out, 1, False)
    for s in range(2):
        step(s)
    sd = ex.state_dict()
    renewed = ex.pipeline.feedback.renews
    kept = {f: xp.numpy(sd["states"]["w"][f]).copy() for f in renewed}
    for s in range(2, 6):
        step(s)
    for f in renewed:
        np.testing.assert_array_equal(xp.numpy(sd["states"]["w"][f]), kept[f], err_msg=f)


@pytest.mark.parametrize("spec", ["none+ef21", "topk:0.1+ef21+warmup:3",
                                  "topk:0.1+ef21sgdm+warmup:3", "none+diana",
                                  "randk:0.2,scaled=true+diana"])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_a_shared_allreduce_result_is_never_overwritten(spec, backend):
    """The simulator hands every rank the same allreduced tensor: an update may take the
    memory of a mean made for the step, never of the caller's result itself (casts to the
    dtype the result has decode to the result), so every rank decodes the same sum."""
    xp = XP(backend)
    wire, plain = Workers(spec, n=3, wire=True), Workers(spec, n=3)
    for step in range(6):
        g = grads(3, 64, step)
        got = xp.numpy(wire.step([xp.asarray(x) for x in g]))
        np.testing.assert_allclose(got, plain.step(g), rtol=1e-5, atol=1e-6,
                                   err_msg=f"step {step}")
    aggregates = [xp.numpy(ex.states["x"].aggregate) for ex in wire.exchanges]
    assert all((a == aggregates[0]).all() for a in aggregates)


@pytest.mark.parametrize("spec", ["qsgd", "terngrad", "topk:0.1+ef14", "randk:0.2",
                                  "topk+ef14+dynamic", "auto", "natural"])
def test_an_empty_tensor_travels_as_it_is(spec, xp):
    """A parameter with no entries (Horovod reduces it too): no compressor has anything
    to keep, so it goes by allreduce, as dense Horovod sends it."""
    bk, ex = backend_named(xp.name), Exchange(spec)
    out = ex.begin(bk, "empty", xp.asarray(np.zeros((0, 3), np.float32)), 0)
    assert out.by_allreduce and out.dense_route
    got = ex.finish_allreduced(bk, out.wire, out, 2, False)
    assert xp.numpy(got).shape == (0, 3)
