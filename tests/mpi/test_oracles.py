"""Oracles that owe nothing to the package: unmodified ``hvd.DistributedOptimizer`` with
``compression=``, against NumPy restatements (written here, from the papers' update
rules) of EF14, EF21, EF21-SGDM and DIANA over an exact top-k and a scaled rand-k, and
the casts against Horovod's own allreduce.

Every rank gathers every rank's real gradients (plain ``hvd.allgather``) and runs the
restatement for all ranks. Per rank, the restatement works in float32 with the same
elementwise operations the rules prescribe; IEEE float32 add and multiply are correctly
rounded, so those states (and with them which entries top-k picks) are reproduced
exactly. Across ranks it averages in float64, while the package sums the ranks' float32
contributions in some order: that, and only that, needs a tolerance, which is the
rounding bound of the float32 sum (see ``Oracle.mean``), carried through the running
aggregates of EF21 and DIANA. The final parameters must agree across ranks bit for bit.
"""
import copy

import numpy as np
import pytest
import torch
import horovod.torch as hvd

import hvd_compress.torch as hct

hvd.init()
torch.set_num_threads(1)
rank, size = hvd.rank(), hvd.size()
SEED, STEPS, LR = 7, 4, 0.5
U32, U16 = 2.0 ** -24, 2.0 ** -11  # unit roundoff of float32 and float16


class Net(torch.nn.Module):
    """A small MLP plus ``tied``, whose gradient is a per-rank vector of multiples of 1/4:
    many equal magnitudes, so top-k's tie rule decides which entries travel."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)  # identical initial weights on every rank
        self.body = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(),
                                        torch.nn.Linear(16, 3))
        self.tied = torch.nn.Parameter(torch.zeros(10))

    def loss(self, batch):
        x, y, c = batch
        return torch.nn.functional.cross_entropy(self.body(x), y) + (self.tied * c).sum()


def batch(step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    c = torch.randint(-2, 3, (10,), generator=g).float() * 0.25
    return torch.randn(32, 12, generator=g), torch.randint(0, 3, (32,), generator=g), c


def everyones_grads(model, data, tag):
    """(size, d) float32 arrays of every rank's gradient, by parameter name."""
    shadow = copy.deepcopy(model)  # same weights, no Horovod hooks
    shadow.loss(data).backward()
    return {n: hvd.allgather(p.grad.detach().reshape(1, -1), name=f"{tag}.{n}").numpy()
            for n, p in shadow.named_parameters()}


# -- compressors, restated ------------------------------------------------------------
TIES = {"boundary": 0}  # how often the k-th and (k+1)-th magnitudes were equal


def topk(ratio):
    def compress(x, r, name, step):
        d = x.size
        k = max(1, int(ratio * d))
        # a stable sort of -|x|: larger magnitudes first, equal ones by position
        order = np.argsort(-np.abs(x), kind="stable")
        if k < d and abs(x[order[k - 1]]) == abs(x[order[k]]):
            TIES["boundary"] += 1
        out = np.zeros_like(x)
        out[order[:k]] = x[order[:k]]
        return out, k
    return compress


def randk_scaled(ratio):
    """Scaled rand-k. Which positions a rank keeps is the package's private random stream
    (keyed by seed, rank, tensor name and step), so the positions alone come from its mask
    function; the scaling by d/k and everything after are restated."""
    from hvd_compress.core.ops import backend_named
    from hvd_compress.core.rng import Key
    from hvd_compress.core.sparsifiers import RandK
    mask, bk = RandK(ratio=ratio, scaled=True).mask, backend_named("numpy")

    def compress(x, r, name, step):
        d = x.size
        idx = np.asarray(mask(bk, d, Key(SEED, r, name, step), x))
        k = max(1, int(ratio * d))
        assert idx.size == k and np.unique(idx).size == k
        out = np.zeros_like(x)
        out[idx] = x[idx] * np.float32(d / k)
        return out, k
    return compress


# -- feedback rules, restated ---------------------------------------------------------
class Oracle:
    """One parameter, every rank. ``step(G, name, step)`` takes the (n, d) gradients and
    returns (the update every rank applies, its rounding slack)."""

    def __init__(self, compress):
        self.compress, self.k = compress, None

    def send(self, X, name, step):
        out = [self.compress(X[r], r, name, step) for r in range(len(X))]
        self.k = out[0][1]
        return np.stack([o[0] for o in out])

    @staticmethod
    def mean(S):
        """The float64 mean over ranks, and a bound on how far the package's float32 sum
        (any order) times 1/n (exact: n is a power of two), cast to float32, lies from
        it: at most (n - 1) roundings of partial sums bounded by sum_i |s_i|, plus the
        final cast, so U32 * sum_i |s_i| (for n >= 2)."""
        return S.astype(np.float64).mean(0), U32 * np.abs(S.astype(np.float64)).sum(0)


class EF14(Oracle):
    """Send C(e_i + g_i), keep e_i <- (e_i + g_i) - C(e_i + g_i); apply mean_i C(...)."""

    def step(self, G, name, step):
        if step == 0:
            self.e = np.zeros_like(G)
        P = self.e + G
        S = self.send(P, name, step)
        self.e = P - S
        return self.mean(S)


class EF21(Oracle):
    """g_i <- g_i + C(v_i - g_i) with v_i the gradient; g <- g + mean_i C(v_i - g_i);
    apply g (kept in float64, with the slack of its float32 twin)."""

    def target(self, G, step):
        return G

    def step(self, G, name, step):
        if step == 0:
            self.local = np.zeros_like(G)
            self.agg = np.zeros(G.shape[1])
            self.slack = np.zeros(G.shape[1])
        S = self.send(self.target(G, step) - self.local, name, step)
        self.local = self.local + S
        m, err = self.mean(S)
        self.agg = self.agg + m
        self.slack = self.slack + err + U32 * np.abs(self.agg)
        return self.agg, self.slack


class EF21SGDM(EF21):
    """EF21 on the momentum v_i <- (1 - eta) v_i + eta g_i, starting from v_i = g_i."""

    def __init__(self, compress, eta):
        super().__init__(compress)
        self.eta = eta

    def target(self, G, step):
        self.v = G.copy() if step == 0 else self.v * np.float32(1.0 - self.eta) + \
            G * np.float32(self.eta)
        return self.v


class DIANA(Oracle):
    """m_i = C(g_i - h_i); apply h + mean_i m_i; h_i <- h_i + alpha m_i, h <- h + alpha
    mean_i m_i, with alpha = 1 / (1 + omega) and omega = d/k - 1 for scaled rand-k."""

    def step(self, G, name, step):
        if step == 0:
            self.h_local = np.zeros_like(G)
            self.h = np.zeros(G.shape[1])
            self.h_slack = np.zeros(G.shape[1])
        M = self.send(G - self.h_local, name, step)
        alpha = 1.0 / (1.0 + (G.shape[1] / self.k - 1.0))
        self.h_local = self.h_local + M * np.float32(alpha)
        m, err = self.mean(M)
        update = self.h + m
        slack = self.h_slack + err + U32 * np.abs(update)
        self.h = self.h + alpha * m
        self.h_slack = self.h_slack + alpha * err + U32 * (alpha * np.abs(m) + np.abs(self.h))
        return update, slack


ORACLES = {
    "topk:0.2+ef14": lambda: EF14(topk(0.2)),
    "topk:0.2,indices=varint+ef14": lambda: EF14(topk(0.2)),  # variable-size payloads
    "topk:0.2+ef21": lambda: EF21(topk(0.2)),
    "topk:0.2+ef21sgdm:eta=0.2": lambda: EF21SGDM(topk(0.2), eta=0.2),
    "randk:0.3,scaled=true+diana": lambda: DIANA(randk_scaled(0.3)),
}


def train(spec, expected, tag):
    """Run STEPS steps of unmodified hvd.DistributedOptimizer(compression=spec); before
    each, ``expected(grads, step)`` gives {name: (want, slack)} from every rank's
    gradients. Returns the compression object."""
    model = Net()
    comp = hct.compression(spec, seed=SEED)
    dopt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=LR),
                                    named_parameters=model.named_parameters(),
                                    compression=comp)
    for step in range(STEPS):
        data = batch(step)
        want = expected(everyones_grads(model, data, f"{tag}.{step}"), step)
        dopt.zero_grad()
        model.loss(data).backward()
        dopt.synchronize()
        for name, p in model.named_parameters():
            got = p.grad.detach().reshape(-1).numpy().astype(np.float64)
            w, slack = want[name]
            excess = np.abs(got - w) - 2 * slack
            assert (excess <= 0).all(), (
                f"{spec} step {step} {name}: off by {np.abs(got - w).max():.3g} at "
                f"{int(np.argmax(excess))}, beyond the float32 summation slack")
        with dopt.skip_synchronize():
            dopt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = hvd.allgather(flat.reshape(1, -1), name=f"{tag}.final")
    assert torch.equal(everyone, flat.expand(size, -1)), "parameters differ across ranks"
    return comp


@pytest.mark.parametrize("spec", ORACLES)
def test_feedback_rules_match_numpy_restatements(spec):
    oracles = {}

    def expected(grads, step):
        if step == 0:
            oracles.update({n: ORACLES[spec]() for n in grads})
        return {n: oracles[n].step(G, n, step) for n, G in grads.items()}

    ties_before = TIES["boundary"]
    comp = train(spec, expected, f"oracle.{spec}")
    if spec.startswith("topk"):
        assert TIES["boundary"] > ties_before, "no tie at the k-th magnitude: tie rule untested"
    if "varint" not in spec:
        # fixed-size payloads: k (int32 index, float32 value) pairs plus one header whose
        # size is the same for every tensor and step
        k = {n: o.k for n, o in oracles.items()}
        headers = {r.bits - 64 * k[r.name] for r in comp.telemetry.rows}
        assert len(headers) == 1 and headers.pop() > 0, headers
        assert [r.count for r in comp.telemetry.rows] == [k[r.name] for r in comp.telemetry.rows]


@pytest.mark.parametrize("spec", ["none", "fp16"])
def test_casts_match_horovods_allreduce(spec):
    """``none`` and ``fp16`` go through Horovod's allreduce: they equal a plain
    hvd.allreduce (Average) of the same gradients, cast the same way. Both sum float32 (or
    float16) values in an order MPI picks per message size, which with more than two
    ranks need not be the same for the fused and the plain call: the slack is the
    rounding bound of two such sums."""
    half = spec == "fp16"
    u = U16 if half else U32

    def expected(grads, step):
        out = {}
        for n, G in grads.items():
            x = torch.from_numpy(G[rank])
            x = x.half() if half else x
            want = hvd.allreduce(x, op=hvd.Average, name=f"plain.{spec}.{step}.{n}")
            wide = np.abs(G.astype(np.float16 if half else np.float32)).astype(np.float64)
            slack = size * u * wide.sum(0) + (size * 2.0 ** -24 if half else 0.0)
            out[n] = want.float().numpy().astype(np.float64), slack
        return out

    comp = train(spec, expected, f"cast.{spec}")
    params = dict(Net().named_parameters())
    # no header on the allreduce route: the dense tensor in its wire dtype
    assert [r.bits for r in comp.telemetry.rows] == \
        [params[r.name].numel() * (16 if half else 32) for r in comp.telemetry.rows]
