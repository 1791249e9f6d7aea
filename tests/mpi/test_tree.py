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

hvd.init()
torch.set_num_threads(1)
comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
# read by tests/test_multirank.py: odd sizes leave ranks without a partner in some round
MPI_RANKS = (2, 3, 4, 8)


# -- the oracle: gTop-k with EF14, restated ------------------------------------------------
def top(v, k):
    """Sorted positions of the k largest |v| (ties to lower positions)."""
    order = np.lexsort((np.arange(v.size), -np.abs(v)))
    return np.sort(order[:k])


def keep(v, k):
    out = np.zeros_like(v)
    pos = top(v, k)
    out[pos] = v[pos]
    return out


def gtopk(compensated, k):
    """(G, residuals): the global sum every rank applies and each rank's new EF14
    residual, from every rank's compensated gradient (rows)."""
    n = compensated.shape[0]
    current = np.stack([keep(c, k) for c in compensated])
    residual = compensated - current
    bit = 1
    while bit < n:
        for r in range(0, n, 2 * bit):
            if r + bit < n:
                total = current[r] + current[r + bit]
                current[r] = keep(total, k)
                residual[r] += total - current[r]
        bit *= 2
    return current[0], residual


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
    # the state is as before the failed step, and the next tensor still pairs up
    assert float(np.abs(np.asarray(red.exchange.states["x"].residual)).sum()) == 0.0
    ok = SparseAllreduce("topk:k=5+ef14", comm, transport="tree")
    assert ok.allreduce(integers(64, rank), name="y").shape == (64,)


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


def test_the_tree_needs_topk_with_ef14():
    for spec in ("topk:0.1", "topk:0.1+ef21sgdm", "randk:0.1+ef14", "topk+ef14+dynamic"):
        with pytest.raises(HvdCompressError, match="tree transport"):
            SparseAllreduce(spec, comm, transport="tree")
        with pytest.raises(HvdCompressError, match="tree transport"):
            hct.compression(spec, transport="tree")
