"""The tree transport (global top-k) against a NumPy restatement of its merge rule, fed
with every rank's gradient, at 2, 3, 4 and 8 ranks (powers of two and not).

Gradients are small integers, so every sum is exact and the oracle must agree bit for
bit, ties at the k-th magnitude included (they go to lower positions)."""
import numpy as np
import pytest
import torch
import horovod.torch as hvd
from mpi4py import MPI

import hvd_compress.torch as hct
from hvd_compress import HvdCompressError
from hvd_compress.comm.mpi import SparseAllreduce

from gtopk_oracle import gtopk

hvd.init()
torch.set_num_threads(1)
comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
# read by tests/test_multirank.py: odd sizes leave ranks without a partner in some round
MPI_RANKS = (2, 3, 4, 8)


class Oracle:
    def __init__(self, d, k):
        self.k, self.e = k, np.zeros((size, d), np.float32)

    def step(self, grads):
        compensated = self.e + grads
        G, self.e = gtopk(compensated, self.k)
        np.testing.assert_array_equal(self.e.sum(0) + G, compensated.sum(0))  # nothing lost
        return (G * (1.0 / size)).astype(np.float32)


def integers(d, seed, high=20):
    return np.random.RandomState(seed).randint(-high, high + 1, d).astype(np.float32)


def everyone(x):
    out = np.empty((size, x.size), x.dtype)
    comm.Allgather(np.ascontiguousarray(x), out)
    return out


# -- SparseAllreduce ------------------------------------------------------------------------
@pytest.mark.parametrize("spec,k", [("topk:k=5+ef14", 5),
                                     ("topk:k=7,indices=varint,values=float16+ef14", 7)])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_matches_the_merge_rule_and_loses_nothing(spec, k, kind):
    d = 64
    red = SparseAllreduce(spec, comm, transport="tree")
    oracle = Oracle(d, k)
    for step in range(4):
        g = integers(d, 100 * rank + step)
        out = red.allreduce(torch.from_numpy(g) if kind == "torch" else g, name="w")
        got = out.numpy() if kind == "torch" else out
        want = oracle.step(everyone(g))
        np.testing.assert_array_equal(got, want)
        assert (everyone(got) == got).all(), "replicas differ"
        residual = red.exchange.states["w"].residual
        np.testing.assert_array_equal(np.asarray(residual), oracle.e[rank])
        assert np.count_nonzero(want) <= k  # k entries applied, not k n


def test_bytes_per_rank_are_one_payload_up():
    """Each rank hands one payload of k pairs to the tree (rank 0 none); telemetry counts
    what this rank compressed, the same k pairs an allgather would send."""
    red = SparseAllreduce("topk:k=10+ef14", comm, transport="tree")
    red.allreduce(integers(1000, rank), name="b")
    assert red.telemetry.rows[-1].bits == 8 * (24 + 10 * 8)


def test_ranks_that_compress_differently_all_raise():
    k = 5 if rank != size - 1 else 6  # the last rank keeps another k
    red = SparseAllreduce(f"topk:k={k}+ef14", comm, transport="tree")
    with pytest.raises(HvdCompressError, match="ranks disagree on the compression spec"):
        red.allreduce(integers(64, rank), name="x")
    # caught by the first call's fingerprint check: nothing began, and the next tensor
    # still pairs up
    assert "x" not in red.exchange.states
    ok = SparseAllreduce("topk:k=5+ef14", comm, transport="tree")
    assert ok.allreduce(integers(64, rank), name="y").shape == (64,)


@pytest.mark.parametrize("transport", ["tree", "allgather"])
def test_a_rank_with_another_shape_raises_everywhere_before_compressing(transport):
    """k = 5 does not fit the last rank's 4 entries: compressing would raise on that rank
    only and leave the others waiting; the first call's fingerprints stop every rank."""
    red = SparseAllreduce("topk:k=5+ef14", comm, transport=transport)
    with pytest.raises(HvdCompressError, match=r"name, shape or dtype of tensor 's'"):
        red.allreduce(integers(4 if rank == size - 1 else 64, rank), name="s")


def test_a_rank_that_changes_dtype_later_makes_every_rank_raise():
    """Past the first call the fingerprints travel in the headers: rank 0 (the root, whose
    payload every rank would unpack) sends float64 at step 2; every rank raises the same
    error and keeps its state."""
    red = SparseAllreduce("topk:k=4+ef14", comm, transport="tree")
    red.allreduce(integers(32, rank), name="t")
    before = np.asarray(red.exchange.states["t"].residual).copy()
    g = integers(32, 7 + rank)
    with pytest.raises(HvdCompressError, match="ranks disagree on the name, shape or dtype"):
        red.allreduce(g.astype(np.float64) if rank == 0 else g, name="t")
    np.testing.assert_array_equal(np.asarray(red.exchange.states["t"].residual), before)


def test_ranks_that_move_payloads_differently_all_raise():
    transport = "tree" if rank == 0 else "allgather"
    red = SparseAllreduce("topk:k=4+ef14", comm, transport=transport)
    with pytest.raises(HvdCompressError, match="seed, transport"):
        red.allreduce(integers(32, rank), name="m")


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # numpy says so too
@pytest.mark.parametrize("nonfinite", ["propagate", "raise"])
def test_a_partial_sum_past_the_casts_range_voids_the_step_everywhere(nonfinite):
    """float16 values on the wire: 40,000 fits, the sum of two does not. The step is void
    on every rank (NaN, or the error) and the residuals stay as they were."""
    red = SparseAllreduce("topk:k=3,values=float16+ef14", comm, transport="tree",
                          nonfinite=nonfinite)
    red.allreduce(integers(16, rank), name="o")
    before = np.asarray(red.exchange.states["o"].residual).copy()
    g = integers(16, 3 + rank)
    g[5] = 40000.0
    if nonfinite == "raise":
        with pytest.raises(HvdCompressError, match="not finite"):
            red.allreduce(g, name="o")
    else:
        assert np.isnan(red.allreduce(g, name="o")).all()
    np.testing.assert_array_equal(np.asarray(red.exchange.states["o"].residual), before)
    assert np.isfinite(red.allreduce(integers(16, 9 + rank), name="o")).all()


@pytest.mark.parametrize("nonfinite", ["propagate", "raise"])
def test_a_nan_on_one_rank_reaches_every_rank_alike(nonfinite):
    red = SparseAllreduce("topk:k=4+ef14", comm, transport="tree", nonfinite=nonfinite)
    red.allreduce(integers(32, rank), name="n")
    before = np.asarray(red.exchange.states["n"].residual).copy()
    g = integers(32, 50 + rank)
    if rank == size - 1:
        g[3] = np.nan
    if nonfinite == "raise":
        with pytest.raises(HvdCompressError, match=rf"rank\(s\) \[{size - 1}\]"):
            red.allreduce(g, name="n")
    else:
        assert np.isnan(red.allreduce(g, name="n")).all()
    np.testing.assert_array_equal(np.asarray(red.exchange.states["n"].residual), before)


# -- compression= on Horovod's optimizer ------------------------------------------------
def test_horovod_optimizer_with_the_tree_matches_the_oracle():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)   # weight 24 entries, bias 4
    dopt = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters(),
        compression=hct.compression("topk:k=3+ef14", transport="tree"))
    oracles = {name: Oracle(p.numel(), 3) for name, p in model.named_parameters()}
    for step in range(3):
        dopt.zero_grad()
        grads = {name: torch.from_numpy(integers(p.numel(), 10 * rank + step)).reshape(p.shape)
                 for name, p in model.named_parameters()}
        # d/dp sum(p * g) = g exactly: integer gradients through Horovod's hooks
        sum((p * grads[name]).sum() for name, p in model.named_parameters()).backward()
        dopt.synchronize()
        for name, p in model.named_parameters():
            want = oracles[name].step(everyone(grads[name].numpy().reshape(-1)))
            np.testing.assert_array_equal(p.grad.numpy().reshape(-1), want)
        with dopt.skip_synchronize():
            dopt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert (everyone(flat.numpy()) == flat.numpy()).all(), "replicas differ"


@pytest.mark.parametrize("mode", [{"whole_model": True}, {"fuse_below": 100}])
def test_one_vector_for_the_model_through_the_tree(mode):
    """Whole-model and fused buckets: one vector, the gradients concatenated in sorted
    name order (here both modes make the same single bucket), merged up the tree."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    dopt = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters(),
        compression=hct.compression("topk:k=5+ef14", transport="tree", **mode))
    names = sorted(n for n, _ in model.named_parameters())
    params = dict(model.named_parameters())
    oracle = Oracle(sum(p.numel() for p in model.parameters()), 5)
    for step in range(3):
        dopt.zero_grad()
        grads = {n: torch.from_numpy(integers(params[n].numel(), 20 * rank + step))
                 .reshape(params[n].shape) for n in names}
        sum((params[n] * grads[n]).sum() for n in names).backward()
        dopt.synchronize()
        want = oracle.step(everyone(np.concatenate([grads[n].numpy().reshape(-1)
                                                     for n in names])))
        got = np.concatenate([params[n].grad.numpy().reshape(-1) for n in names])
        np.testing.assert_array_equal(got, want)
        with dopt.skip_synchronize():
            dopt.step()


@pytest.mark.parametrize("transport", ["tree", "allgather"])
def test_a_parameter_of_another_dtype_on_one_rank_raises_before_anything_moves(transport):
    """The ranks' parameters are compared when the compression binds (at the first
    backward hook), before anything moves (over mpi4py the allgather used to fail inside
    MPI, the tree to stop halfway), and no collective is left in flight: a gather left so
    (Horovod keeps a handle until it is waited on) made the next optimizer's first step
    fail on its name."""
    from horovod.torch import mpi_ops
    for _ in range(2):
        pending = len(mpi_ops._handle_map)
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 4)
        if rank == 0:
            model.bias = torch.nn.Parameter(model.bias.detach().double())
        dopt = hvd.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            named_parameters=model.named_parameters(),
            compression=hct.compression("topk:k=3+ef14", comm=comm, transport=transport))
        with pytest.raises(HvdCompressError, match="disagree on the name, shape or dtype of "
                                                   "parameter 'bias'"):
            sum((p * torch.ones_like(p)).sum() for p in model.parameters()).backward()
            dopt.synchronize()
        assert len(mpi_ops._handle_map) == pending, "a check's collective was not waited on"


@pytest.mark.parametrize("route", ["dense", "topk"])
def test_auto_over_mpi4py_plans_alike_on_every_rank(route):
    """auto over comm=: MPI's allreduce and allgather are timed at step 1, every tensor
    goes dense until then, and as the costs forced from step 2 say after: dense is every
    rank's mean gradient exactly (an MPI sum, then 1/n as Horovod's average), top-k +
    EF14 loses nothing (updates plus the ranks' mean residual add up to the mean
    gradients); a float16 cast is never planned, however cheap (MPI sums no float16);
    every rank ends with the same parameters, bit for bit."""
    from hvd_compress.core.auto import Costs
    torch.manual_seed(0)
    model = torch.nn.Linear(40, 3)
    comp = hct.compression("topk:k=2+ef14+auto:every=1000", comm=comm)
    dopt = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01), named_parameters=model.named_parameters(),
        compression=comp)
    free, slow, cheap = (0.0, 0.0), (1e-3, 1e-6), (1e-9, 1e-16)
    forced = {"dense": Costs(cheap, slow, free, free, cheap),
              "topk": Costs(slow, cheap, free, free, cheap)}[route]
    params = dict(model.named_parameters())
    sum_mean = {n: np.zeros(p.numel(), np.float32) for n, p in params.items()}
    sum_update = {n: np.zeros(p.numel(), np.float32) for n, p in params.items()}
    for step in range(4):
        if step == 2:
            assert comp.exchange.costs is not None  # measured at step 1
            comp.exchange.costs = forced
        grads = {n: integers(p.numel(), 10 * rank + step) for n, p in params.items()}
        dopt.zero_grad()
        sum((p * torch.from_numpy(grads[n]).reshape(p.shape)).sum()
            for n, p in params.items()).backward()
        dopt.synchronize()
        for n, p in params.items():
            mean = everyone(grads[n]).sum(0) * np.float32(1.0 / size)
            got = p.grad.numpy().reshape(-1)
            row, = [r for r in comp.telemetry.rows if r.step == step and r.name == n]
            if step == 0 or (step >= 2 and route == "dense"):
                assert row.bits == 32 * p.numel()
                np.testing.assert_array_equal(got, mean)
            elif step >= 2:
                assert row.count < p.numel()  # top-k at its planned k, not a cast (count d)
            sum_mean[n] += mean
            sum_update[n] += got
        with dopt.skip_synchronize():
            dopt.step()
    for n in params:
        residual = everyone(comp.exchange.states[n].residual.numpy()).mean(0) \
            if n in comp.exchange.states else 0
        np.testing.assert_allclose(sum_update[n] + residual, sum_mean[n], rtol=1e-5, atol=1e-4)
    flat = np.concatenate([p.detach().numpy().reshape(-1) for p in model.parameters()])
    np.testing.assert_array_equal(everyone(flat), np.tile(flat, (size, 1)))


def test_the_tree_needs_topk_with_ef14():
    for spec in ("topk:0.1", "topk:0.1+ef21sgdm", "randk:0.1+ef14", "topk+ef14+dynamic"):
        with pytest.raises(HvdCompressError, match="tree transport"):
            SparseAllreduce(spec, comm, transport="tree")
        with pytest.raises(HvdCompressError, match="tree transport"):
            hct.compression(spec, transport="tree")
