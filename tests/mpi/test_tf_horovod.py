"""TensorFlow 2 + Horovod: pipelines inside tf.function, one per route, through Horovod's
own DistributedGradientTape (compression=) and through hvd_compress's tape, against the
single-process oracle (every spec is swept in one process by tests/test_oracle_sweep.py)."""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # horovod.tensorflow.keras is tf_keras
os.environ["HOROVOD_DYNAMIC_PROCESS_SETS"] = "1"  # for the process-set test

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
import horovod.tensorflow as hvd  # noqa: E402

import hvd_compress.tensorflow as hctf  # noqa: E402
from hvd_compress import HvdCompressError  # noqa: E402
from hvd_compress.core.simulate import Workers  # noqa: E402
from hvd_compress.tensorflow.compression import collective_name  # noqa: E402
from hvd_compress.tensorflow.transport import HorovodTransport  # noqa: E402

hvd.init()
rank, size = hvd.rank(), hvd.size()
# 3 ranks (read by tests/test_multirank.py): sums of three have an order and 1/3 is
# inexact, the process-set test gets a two-rank and a one-rank set at once, and one
# launch instead of two keeps this file (TF traces every graph on every rank) in budget.
MPI_RANKS = (3,)
# A few specs per route through hvd_compress's tape; every spec is swept in one process
# (every rank's graph in one tf.function) by tests/test_oracle_sweep.py.
SPECS = ["sign",                                              # quantizer, in graph
         "randk:0.3,scaled=true+diana",                       # fixed-size sparse, in graph
         "topk:0.1,indices=varint,values=float16+ef14",       # variable-size, in graph
         "topk+ef21sgdm+dynamic:c0=2000,agree=true",          # k agreed in the graph
         "bernoulli:0.2+dynamic"]                             # budget in graph, sizes vary
# Horovod's own tape finds each gradient's variable in its frames: one spec per route
THROUGH_HOROVOD = ["threshold:lam=0.05+ef14+perturb:radius=0.05",  # packed, sizes vary
                   "fp16",                                     # cast, allreduce
                   "bf16",                                     # cast, gathered
                   "topk:0.1+ef21+warmup:1",                   # dense, then packed (tf.cond)
                   "topk+ef14+dynamic:c0=2000",                # k chosen in graph, per rank
                   "qsgd:bucket=64+dynamic:c0=1000"]           # s chosen in graph, per rank
TOL = {"fp16": 2e-3, "bf16": 2e-2}


class Model:
    """Two dense layers as plain tf.Variables (names as a user would give them)."""

    def __init__(self):
        rs = np.random.RandomState(0)  # identical initial weights on every rank
        self.vars = [tf.Variable(rs.standard_normal((12, 16)).astype(np.float32) * 0.3,
                                 name="dense/kernel"),
                     tf.Variable(np.zeros(16, np.float32), name="dense/bias"),
                     tf.Variable(rs.standard_normal((16, 3)).astype(np.float32) * 0.3,
                                 name="out/kernel")]

    def loss(self, x, y):
        h = tf.tanh(x @ self.vars[0] + self.vars[1])
        logits = h @ self.vars[2]
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))


def data(step):
    rs = np.random.RandomState(1000 * rank + step)
    return (tf.constant(rs.standard_normal((32, 12)).astype(np.float32)),
            tf.constant(rs.randint(0, 3, 32)))


def local_grads(model, x, y):
    with tf.GradientTape() as tape:
        loss = model.loss(x, y)
    return tape.gradient(loss, model.vars)


def wire_bits(oracle, me, step):
    """Bits rank ``me`` hands to Horovod: summable values by allreduce (no header), bf16
    and everything else as a packed buffer by allgather."""
    p, codec = oracle.last[me], oracle.last_codec
    if codec.summable and p.values.dtype != tf.bfloat16:
        return 8 * int(tf.size(p.values)) * p.values.dtype.size
    return oracle.bits[step][me]


def distributed_tape(tape, binding, comp, **kwargs):
    if binding == "horovod":  # Horovod's tape, unmodified, one argument
        return hvd.DistributedGradientTape(tape, compression=comp, **kwargs)
    return hctf.DistributedGradientTape(tape, compression=comp, **kwargs)


def run_and_compare(spec, binding, steps=3, compiled=True, scale=1.0, **kwargs):
    model, comp = Model(), hctf.compression(spec, seed=7)
    names = ["dense/kernel", "dense/bias", "out/kernel"]
    ps = kwargs.get("process_set", hvd.global_process_set)
    oracles = {n: Workers(spec, ps.size(), seed=7, name=n, model_size=256)  # every variable
               for n in names}

    def step_fn(x, y):
        with tf.GradientTape() as tape:
            loss = model.loss(x, y)
        return distributed_tape(tape, binding, comp, **kwargs).gradient(loss, model.vars)

    fn = tf.function(step_fn) if compiled else step_fn
    for step in range(steps):
        x, y = data(step)
        local = local_grads(model, x, y)
        got = fn(x, y)
        for name, g_local, g in zip(names, local, got):
            everyone = hvd.allgather(tf.reshape(g_local, (1, -1)), process_set=ps)
            want = oracles[name].step([everyone[r] for r in range(ps.size())]) * scale
            tol = TOL.get(spec, 1e-5)
            np.testing.assert_allclose(tf.reshape(g, -1).numpy(), want.numpy(), rtol=tol,
                                       atol=tol, err_msg=f"{spec} step {step} {name}")
        rows = {r.name: r.bits for r in comp.telemetry.rows if r.step == step}
        assert rows == {n: wire_bits(w, ps.rank(), step) for n, w in oracles.items()}, rows
        for v, g in zip(model.vars, got):
            v.assign_sub(0.5 * g)
    flat = tf.concat([tf.reshape(v, -1) for v in model.vars], 0)
    everyone = hvd.allgather(tf.reshape(flat, (1, -1)), process_set=ps).numpy()
    assert (everyone == everyone[0]).all(), "weights differ across ranks"
    return comp


@pytest.mark.parametrize("spec", SPECS)
def test_gradients_match_oracle(spec):
    run_and_compare(spec, "ours")


@pytest.mark.parametrize("spec", THROUGH_HOROVOD)
def test_horovods_tape_with_compression_argument(spec):
    run_and_compare(spec, "horovod")


@pytest.mark.parametrize("spec", ["topk:0.1+ef21sgdm", "fp16"])
def test_eager_tape(spec):
    run_and_compare(spec, "ours", compiled=False)


# both tapes hand op= to the same reduction: each tape once, each route (gathered and
# summed by allreduce) once
@pytest.mark.parametrize("spec,binding", [("topk:0.2+ef21sgdm", "horovod"), ("fp16", "ours")])
def test_op_sum(spec, binding):
    run_and_compare(spec, binding, steps=2, op=hvd.Sum, scale=size)


@pytest.mark.parametrize("spec", ["topk:0.2+ef14", "none"])
def test_gradient_predivide_factor(spec):
    run_and_compare(spec, "ours", steps=2, gradient_predivide_factor=2.0)


def test_process_set():
    """Every rank but the last forms one set (not the global one), the last rank another:
    with 3 ranks or more the first is a multi-rank set, compressed as usual, and the second
    a one-rank set, whose gradients pass through, as in Horovod's tape."""
    sets = [hvd.add_process_set(list(range(size - 1))), hvd.add_process_set([size - 1])]
    ps = sets[0] if rank < size - 1 else sets[1]
    if ps.size() > 1:
        run_and_compare("topk:0.2+ef21sgdm", "ours", steps=2, process_set=ps)
    else:
        model, (x, y) = Model(), data(0)
        with tf.GradientTape() as tape:
            loss = model.loss(x, y)
        got = hctf.DistributedGradientTape(tape, compression=hctf.compression("topk:0.2+ef14"),
                                           process_set=ps).gradient(loss, model.vars)
        for want, g in zip(local_grads(model, x, y), got):
            np.testing.assert_array_equal(g.numpy(), want.numpy())
    for s in sets:
        hvd.remove_process_set(s)


def test_bytes_on_the_wire_are_the_payloads(monkeypatch):
    """What Horovod's allgather moved for a variable is every rank's packed payload: its
    length is the sum over ranks of the bytes the telemetry recorded, and those are the
    bytes of the oracle's payloads."""
    spec = "topk:0.1,indices=varint+ef14"
    comp, model = hctf.compression(spec), Model()
    moved, allgather = {}, hvd.allgather

    def spy(tensor, name=None, **kwargs):
        out = allgather(tensor, name=name, **kwargs)
        moved[name] = int(tf.size(out))
        return out

    monkeypatch.setattr(hvd, "allgather", spy)
    x, y = data(0)
    local = local_grads(model, x, y)
    names = ["dense/kernel", "dense/bias", "out/kernel"]
    for name, g in zip(names, local):  # eagerly: the spy sees concrete sizes
        comp._exchange(name, g, HorovodTransport(hvd.global_process_set))
    monkeypatch.undo()
    for name, g in zip(names, local):
        everyone = hvd.allgather(tf.reshape(g, (1, -1)))
        oracle = Workers(spec, size, name=name)
        oracle.step([everyone[r] for r in range(size)])
        mine = [r.bits for r in comp.telemetry.rows if r.name == name]
        assert mine == [oracle.bits[0][rank]]
        coll = collective_name(name)
        assert 8 * moved[coll] == sum(oracle.bits[0]), (name, moved)


def test_sparse_bytes_shrink_with_k():
    bits = {}
    for ratio in (0.01, 0.1, 1.0):
        bits[ratio] = run_and_compare(f"topk:{ratio}", "ours", steps=1).telemetry.total_bits()
    assert bits[0.01] < bits[0.1] < bits[1.0]


def test_unused_variable_and_indexed_slices():
    """A variable without gradient keeps None; embedding gradients (IndexedSlices) take
    Horovod's own sparse allgather, uncompressed, unless sparse_as_dense."""
    emb = tf.Variable(tf.zeros((10, 3)), name="emb")
    unused = tf.Variable(tf.zeros(2), name="unused")
    comp = hctf.compression("topk:0.5+ef14")
    for sparse_as_dense in (False, True):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.gather(emb, [rank % 10]))
        tape = hctf.DistributedGradientTape(tape, compression=comp,
                                            sparse_as_dense=sparse_as_dense)
        g_emb, g_unused = tape.gradient(loss, [emb, unused])
        assert g_unused is None
        want = np.zeros((10, 3))
        for r in range(size):
            want[r % 10] += 1.0 / size
        if not sparse_as_dense:
            assert isinstance(g_emb, tf.IndexedSlices)
            np.testing.assert_allclose(tf.convert_to_tensor(g_emb).numpy(), want)
        else:  # top-50% with feedback on a one-hot row: the kept entries are exact
            assert not isinstance(g_emb, tf.IndexedSlices)


def test_duplicate_variable_names_keep_their_own_state():
    a, b = tf.Variable([1.0, 2.0]), tf.Variable([3.0, 4.0])  # both "Variable:0"
    comp = hctf.compression("topk:0.5+ef14")
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(a * 2.0) + tf.reduce_sum(b * 3.0)
    hctf.DistributedGradientTape(tape, compression=comp).gradient(loss, [a, b])
    assert sorted(comp.exchange.variables) == ["Variable", "Variable#2"]


def test_auto_routes_every_variable_by_one_plan_on_every_rank(monkeypatch):
    """auto inside tf.function: step 0 is top-k at the spec's k; the measurements (steps
    1, 3, 5) plan from the costs (forced here: dense cheap, then top-k cheap) and every
    rank reads the same plan. The dense route is Horovod's plain average, bit for bit,
    and leaves EF14's residual as it was; the top-k route at the planned k sends what
    the residual gives up (conservation, exact); replicas stay identical. The loss is
    linear, so each gradient is known exactly outside the graph."""
    from hvd_compress.core.auto import Costs
    from hvd_compress.tensorflow import auto as graph_auto

    dense_cheap = Costs((0.0, 1e-15), (1.0, 1e-3), (1.0, 1e-3))
    topk_cheap = Costs((0.0, 1.0), (0.0, 1e-15), (0.0, 1e-15))
    costs = {"now": dense_cheap}
    monkeypatch.setattr(graph_auto, "fit_costs", lambda *a: costs["now"])
    model, comp = Model(), hctf.compression("topk:0.1+ef14+auto:every=2")
    names = ["dense/kernel", "dense/bias", "out/kernel"]

    @tf.function
    def step_fn(cs):
        with tf.GradientTape() as tape:
            loss = tf.add_n([tf.reduce_sum(v * c) for v, c in zip(model.vars, cs)])
        return hctf.DistributedGradientTape(tape, compression=comp).gradient(loss,
                                                                             model.vars)
    oracle = {n: Workers("topk:0.1+ef14", size, name=n) for n in names}
    for step in range(6):
        if step == 3:
            costs["now"] = topk_cheap
        rs = np.random.RandomState(100 * rank + step)
        local = [rs.standard_normal(v.shape).astype(np.float32) for v in model.vars]
        before = {n: comp.exchange.variables[n].residual.numpy().copy()
                  for n in names if n in comp.exchange.variables}
        got = step_fn([tf.constant(c) for c in local])
        plan = {n: (int(r.numpy()), int(k.numpy())) for n, (r, k, *_) in comp.auto._vars.items()}
        assert all(p == plan for p in hvd.allgather_object(plan))
        for name, g_local, g in zip(names, local, got):
            route, k = plan[name]
            residual = comp.exchange.variables[name].residual.numpy()
            flat = g_local.reshape(-1)
            if step == 0:  # top-k at the spec's k, as the plain spec sends it
                gathered = hvd.allgather(tf.constant(flat[None]))
                want = oracle[name].step([gathered[r] for r in range(size)])
                np.testing.assert_allclose(tf.reshape(g, -1).numpy(), want.numpy(),
                                           rtol=1e-6, atol=1e-7)
            elif route == graph_auto.DENSE:
                assert 1 <= step < 3, (step, name)
                np.testing.assert_array_equal(g.numpy(),
                                              hvd.allreduce(tf.constant(g_local)).numpy())
                np.testing.assert_array_equal(residual, before[name])
            else:
                assert step >= 3, (step, name, plan)
                sent = (before[name] + flat) - residual
                assert 1 <= np.count_nonzero(sent) <= k
                parts = hvd.allgather(tf.constant(sent[None])).numpy()
                want = np.zeros_like(sent)
                for r in range(size):  # rank order, float32, as the exchange sums
                    want = want + parts[r]
                np.testing.assert_array_equal(tf.reshape(g, -1).numpy(),
                                              want * np.float32(1.0 / size))
        for v, g in zip(model.vars, got):
            v.assign_sub(0.5 * g)
    assert {r.kind for r in comp.auto.routes.values()} == {"topk"}
    flat = tf.concat([tf.reshape(v, -1) for v in model.vars], 0)
    everyone = hvd.allgather(tf.reshape(flat, (1, -1))).numpy()
    assert (everyone == everyone[0]).all(), "weights differ across ranks"
    with tf.GradientTape() as tape:
        loss = model.loss(*data(0))
    with pytest.raises(Exception, match="auto plans every variable together"):
        hvd.DistributedGradientTape(tape, compression=hctf.compression("auto")).gradient(
            loss, model.vars)


def test_auto_shared_by_two_tapes_plans_each_from_its_own_gradients(monkeypatch):
    """One compression object, two call sites (two variable sets): each measures on its
    own schedule and plans its own variables from its own profiles; with every=1 the
    profiles follow the gradients; warm-up steps go dense; a spec's k above a tensor's
    size is clamped to it."""
    from hvd_compress.core.auto import Costs, Route
    from hvd_compress.tensorflow import auto as graph_auto
    monkeypatch.setattr(graph_auto, "fit_costs",
                        lambda *a: Costs((0.0, 1.0), (0.0, 1e-15), (0.0, 1e-15)))
    comp = hctf.compression("topk:k=20+ef14+auto:every=1+warmup:2")
    a, b = tf.Variable(tf.zeros([40]), name="a"), tf.Variable(tf.zeros([8]), name="b")

    def trainer(var):
        @tf.function
        def step_fn(c):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(var * c)
            return hctf.DistributedGradientTape(tape, compression=comp).gradient(loss,
                                                                                 [var])[0]
        return step_fn
    steps = {"a": trainer(a), "b": trainer(b)}
    for step in range(4):
        for var, scale in ((a, 1.0), (b, 100.0)):
            c = np.full(var.shape, scale * (step + 1) * (rank + 1), np.float32)
            got = steps[var.name[:-2]](tf.constant(c))
            profile = comp.auto._vars[var.name[:-2]][2].numpy()
            if step >= 1:  # measured this step: this rank's gradient of this step
                assert profile[-1] == scale * (step + 1) * (rank + 1)
            if step < 2:   # warm-up: dense, Horovod's own average
                np.testing.assert_array_equal(got.numpy(),
                                              hvd.allreduce(tf.constant(c)).numpy())
    assert set(comp.auto.routes) == {"a", "b"}
    assert comp.auto.routes["b"] == Route("topk", 8)  # k=20 clamped to the 8 entries
    rows = [r for r in comp.telemetry.rows if r.name == "b"]
    assert [r.count for r in rows] == [8, 8, 8, 8]


def test_auto_takes_bfloat16_and_a_retrace_with_fewer_gradients(monkeypatch):
    """A bfloat16 variable (Horovod's TF allreduce has no bf16) always goes top-k; a
    variable without entries goes dense, unplanned; a step retraced with a variable left
    out (a None gradient) plans what it reduces; two tapes in one function measure one
    after the other."""
    from hvd_compress.core.auto import Costs
    from hvd_compress.tensorflow import auto as graph_auto
    monkeypatch.setattr(graph_auto, "fit_costs",
                        lambda *a: Costs((0.0, 1e-15), (1.0, 1e-3), (1.0, 1e-3)))
    comp, other = hctf.compression("auto:every=2"), hctf.compression("auto:every=2")
    w = tf.Variable(tf.ones([50]), name="w")
    h = tf.Variable(tf.ones([50], tf.bfloat16), name="h")
    u = tf.Variable(tf.ones([30]), name="u")
    e = tf.Variable(tf.ones([0]), name="e")

    @tf.function
    def step_fn(c, with_h):
        with tf.GradientTape(persistent=True) as tape:
            loss = tf.reduce_sum(w * c) + tf.reduce_sum(e)
            if with_h:
                loss += tf.cast(tf.reduce_sum(h * tf.cast(c, tf.bfloat16)), tf.float32)
            loss2 = tf.reduce_sum(u * c[:30])
        got = hctf.DistributedGradientTape(tape, compression=comp).gradient(loss, [w, h, e])
        return got, hctf.DistributedGradientTape(tape, compression=other).gradient(loss2,
                                                                                   [u])
    for step in range(4):
        (gw, gh, ge), _ = step_fn(tf.fill([50], float(rank + 1)), step % 2 == 0)
        assert (gh is None) == (step % 2 == 1) and ge.shape == (0,)
    assert comp.auto.routes["w"].kind == "dense" and comp.auto.routes["h"].kind == "topk"
    assert "e" not in comp.auto.routes
    assert other.auto.routes["u"].kind == "dense"
    np.testing.assert_array_equal(gw.numpy(), np.full(50, (size + 1) / 2, np.float32))


def test_auto_with_nonfinite_raise_stops_every_rank_on_a_dense_step(monkeypatch):
    from hvd_compress.core.auto import Costs
    from hvd_compress.tensorflow import auto as graph_auto
    monkeypatch.setattr(graph_auto, "fit_costs",
                        lambda *a: Costs((0.0, 1e-15), (1.0, 1e-3), (1.0, 1e-3)))
    comp = hctf.compression("auto", nonfinite="raise")
    v = tf.Variable(tf.zeros([300]), name="v")

    @tf.function
    def step_fn(c):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(v * c)
        return hctf.DistributedGradientTape(tape, compression=comp).gradient(loss, [v])[0]
    for step in range(2):
        step_fn(tf.ones([300]))
    assert comp.auto.routes["v"].kind == "dense"
    bad = np.ones(300, np.float32)
    if rank == 1:
        bad[5] = np.nan
    with pytest.raises(Exception, match="gradient 'v' holds NaN or infinite"):
        step_fn(tf.constant(bad))


def test_auto_cast_route_in_the_graph_follows_its_sum_and_resends_what_overflowed(monkeypatch):
    """auto's cast route inside tf.function (forced costs: a cast is cheapest). From the
    measurement of step 1 the float32 variable travels scaled by 2**shift in float16 (the
    power of two that puts the ranks' summed largest magnitude in [32, 64)), and the
    update is the float16 average scaled back (within float16's rounding of a NumPy
    average); the float64 variable goes dense, Horovod's average bit for bit. The shift
    then follows a NumPy restatement of the rule on each step's sum: a gradient 2^14.6
    smaller grows it by the power of two between the sums' largest entries, rounded down;
    one rank's gradient 2.5e6x larger overflows the sum, so every rank sends the variable
    again as it is (Horovod's float32 average, bit for bit, a telemetry row of count 0)
    and the shift drops 2^10; a NaN on one rank does the same, and a shift past 2^-100
    sends the variable dense until the next measurement (step 8), which plans the cast
    afresh: its shift and the first sum the rule compares with are step 8's. A gradient
    1e12x smaller leaves a sum of zeros only: it is sent again as it is, and the shift
    is planned afresh from that dense sum, so that the next step's cast carries it; a
    zero gradient is sent again too, and keeps its shift. Every rank holds the same plan
    and update, bit for bit, at every step. The loss is linear, so each gradient is
    known exactly outside the graph."""
    import math

    from hvd_compress.core.auto import Costs
    from hvd_compress.tensorflow import auto as graph_auto
    monkeypatch.setattr(graph_auto, "fit_costs",
                        lambda *a: Costs((1e-9, 1e-6), (1e-2, 1e-6), (0.0, 0.0), (0.0, 0.0)))
    comp = hctf.compression("topk:0.1+ef14+auto:every=7")
    v = tf.Variable(tf.zeros([300]), name="v")
    u = tf.Variable(tf.zeros([20], tf.float64), name="u")

    @tf.function
    def step_fn(c, c64):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(v * c) + tf.cast(tf.reduce_sum(u * c64), tf.float32)
        return hctf.DistributedGradientTape(tape, compression=comp).gradient(loss, [v, u])
    rs = np.random.RandomState(rank)
    base = (rs.standard_normal(300) * 3.0).astype(np.float32)
    scales = [1.0, 1.0] + [4e-5] * 6 + [1e-3, 3e-7, 3e-19, 3e-19, 0.0]  # this rank's
    if rank == 0:
        scales[3] = 1e2  # 2.5e6x the others' at step 3: the sum overflows
    shift = first = None
    for step, scale in enumerate(scales):
        c = base * np.float32(scale)
        if step == 5 and rank == 1:
            c[7] = np.nan
        if step == 5:  # next to the clamp: this step's NaN moves it past
            comp.auto._vars["v"][4].assign(-95)
            shift = -95
        c64 = np.full(20, rank + 1.0)
        got, got64 = step_fn(tf.constant(c), tf.constant(c64))
        plan = [int(x.numpy()) for x in comp.auto._vars["v"][:2] + comp.auto._vars["v"][4:5]]
        assert all(p == plan for p in hvd.allgather_object(plan)), "ranks hold other plans"
        everyone = hvd.allgather(tf.constant(c[None])).numpy()
        updates = hvd.allgather(tf.reshape(got, (1, -1))).numpy().view(np.int32)
        assert (updates == updates[0]).all(), "ranks got other updates"
        rows = [r for r in comp.telemetry.rows if r.step == step and r.name == "v"]
        if step == 0:
            continue  # top-k at the spec's k before any plan
        np.testing.assert_array_equal(got64.numpy(), hvd.allreduce(tf.constant(c64)).numpy())
        if step in (1, 8):  # measured: a plan from this step's gradients
            assert comp.auto.routes["v"].kind == "cast" and comp.auto.routes["u"].kind == "dense"
            largest = float(np.abs(everyone).max(1).astype(np.float64).sum())
            shift, first = math.frexp(65504 / 1024 / largest)[1] - 1, None
            assert comp.auto.routes["v"].shift == shift
        if step in (6, 7):  # past the clamp: dense until the next measurement
            assert plan[0] == graph_auto.DENSE
            assert [(r.bits, r.count) for r in rows] == [(32 * 300, 300)]
            np.testing.assert_array_equal(got.numpy(), hvd.allreduce(tf.constant(c)).numpy())
            continue
        if step in (3, 5, 10, 12):  # not finite, or zeros only: sent again as it is
            assert [(r.bits, r.count) for r in rows] == [(16 * 300, 300), (32 * 300, 0)]
            np.testing.assert_array_equal(got.numpy(), hvd.allreduce(tf.constant(c)).numpy())
            if step == 10:  # planned afresh from the dense sum (the average, times size)
                largest = float(np.abs(got.numpy()).max()) * size
                shift, first = math.frexp(65504 / 1024 / largest)[1] - 1, None
            elif step != 12:  # (a zero gradient keeps its shift)
                shift -= 10
        else:
            assert [(r.bits, r.count) for r in rows] == [(16 * 300, 300)]
            half = (everyone * np.float32(2.0 ** shift)).astype(np.float16).astype(np.float32)
            want = half.mean(0) * np.float32(2.0 ** -shift)
            np.testing.assert_allclose(got.numpy(), want, rtol=2e-3,
                                       atol=2e-3 * float(np.abs(want).max()))
            largest = float(np.abs(got.numpy()).max()) * 2.0 ** shift  # the float16 sum's
            first = first or largest
            if 0 < largest and largest * 2.0 ** 10 < first:
                grown = math.log2(first / largest)
                if step in (2, 9):
                    assert grown % 1 > 0.5, "the rule rounds down: test it where that matters"
                shift += math.floor(grown)
        if step in (2, 9):
            assert plan[2] > comp.auto.routes["v"].shift + 10, "a smaller gradient grows it"
        assert plan[0] == (graph_auto.DENSE if abs(shift) >= 100 else graph_auto.CAST)
        assert plan[2] == shift, (step, plan, shift)


def test_stateful_spec_strings_need_one_compression_object():
    with tf.GradientTape() as tape:
        pass
    with pytest.raises(HvdCompressError, match="keeps state across steps"):
        hctf.DistributedGradientTape(tape, compression="topk:0.5+ef14")
    hctf.DistributedGradientTape(tape, compression="topk:0.5")  # stateless: fine


def test_bare_allreduce():
    out = hvd.allreduce(tf.fill([4], float(rank)), compression=hctf.compression("fp16"),
                        op=hvd.Sum)
    np.testing.assert_array_equal(out.numpy(), np.full(4, float(sum(range(size)))))
    with pytest.raises(HvdCompressError, match="not to a bare hvd.allreduce"):
        hvd.allreduce(tf.ones(4), compression=hctf.compression("topk:0.5"))


def test_checkpoint_resume_is_exact():
    spec = "topk:0.2+ef21sgdm"

    def train(comp, model, steps):
        @tf.function
        def fn(x, y):
            with tf.GradientTape() as tape:
                loss = model.loss(x, y)
            return hctf.DistributedGradientTape(tape, compression=comp).gradient(
                loss, model.vars)
        for s in steps:
            for v, g in zip(model.vars, fn(*data(s))):
                v.assign_sub(0.5 * g)

    straight = Model()
    train(hctf.compression(spec, seed=3), straight, range(4))
    first, model = hctf.compression(spec, seed=3), Model()
    train(first, model, range(2))
    saved = first.state_dict()
    resumed = hctf.compression(spec, seed=3)
    resumed.load_state_dict(saved)
    train(resumed, model, range(2, 4))
    for a, b in zip(straight.vars, model.vars):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert resumed.state_dict()["steps"] == {n: 4 for n in saved["steps"]}


def test_adasum_is_refused():
    model = Model()
    with tf.GradientTape() as tape:
        loss = model.loss(*data(0))
    with pytest.raises(HvdCompressError, match="Adasum"):
        hctf.DistributedGradientTape(tape, compression="topk:0.5",
                                     op=hvd.Adasum).gradient(loss, model.vars)
