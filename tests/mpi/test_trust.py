"""Identical or loud, never silent: non-finite gradients, ranks configured differently,
hook orders that differ, bf16 models, Adasum, across torch + Horovod and mpi4py.

Every test builds its model with parameter names of its own, so a collective left pending
by a deliberately failed exchange can never pair with a later test's.
"""
import collections

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
rank, size = hvd.rank(), hvd.size()
# 3 ranks (read by tests/test_multirank.py): odd and even ranks both run (hook orders and
# gradients that differ by parity), sums of three have an order and 1/3 is inexact; one
# launch instead of two keeps the suite in budget (test_oracles.py and test_mpi4py.py
# still run with 2 and 4 ranks).
MPI_RANKS = (3,)
_tags = collections.Counter()


def model(tag, dtype=torch.float32, width=6):
    """A two-layer MLP whose parameter names are unique to this call."""
    _tags[tag] += 1
    tag = f"{tag}{_tags[tag]}"
    torch.manual_seed(0)
    return torch.nn.Sequential(collections.OrderedDict([
        (f"{tag}_a", torch.nn.Linear(5, width)), (f"{tag}_act", torch.nn.Tanh()),
        (f"{tag}_b", torch.nn.Linear(width, 2))])).to(dtype)


def batch(step, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(16, 5, generator=g).to(dtype), torch.randn(16, 2, generator=g).to(dtype)


def optimizer(m, spec, **kw):
    return hvd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1),
                                    named_parameters=m.named_parameters(),
                                    compression=hct.compression(spec, **kw))


def same_on_every_rank(tensors, tag):
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
    everyone = hvd.allgather(flat.reshape(1, -1), name=f"same.{tag}")
    # NaN != NaN, so compare bit patterns
    return torch.equal(everyone.view(torch.int64), flat.view(torch.int64).expand(size, -1))


def step(m, opt, i, poison=None, dtype=torch.float32):
    x, y = batch(i, dtype)
    if poison is not None and rank == size - 1:
        x = x.clone()
        x[0, 0] = poison
    opt.zero_grad()
    torch.nn.functional.mse_loss(m(x), y).backward()
    opt.synchronize()
    grads = [p.grad.clone() for p in m.parameters()]
    with opt.skip_synchronize():
        opt.step()
    return grads


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
@pytest.mark.parametrize("spec", ["topk:0.2+ef14", "randk:0.2+ef14", "threshold:0.05+ef14",
                                  "topk:0.2+ef21sgdm", "qsgd", "fp16+ef14", "none",
                                  "randk:0.3,scaled=true+diana", "topk:0.2,indices=varint",
                                  "auto"])
def test_nonfinite_gradient_reaches_every_rank_and_spares_the_state(spec, poison):
    m = model("nf")
    opt = optimizer(m, spec)
    step(m, opt, 0)
    before = [p.detach().clone() for p in m.parameters()]
    grads = step(m, opt, 1, poison=poison)
    assert any(not torch.isfinite(g).all() for g in grads), "a non-finite step must show"
    assert same_on_every_rank(grads, f"nf.{spec}.{poison}")
    with torch.no_grad():  # skip the step, as a loss scaler would
        for p, b in zip(m.parameters(), before):
            p.copy_(b)
    for i in (2, 3):  # the feedback state was not poisoned
        assert all(torch.isfinite(g).all() for g in step(m, opt, i))
    assert same_on_every_rank(list(m.parameters()), f"nf.params.{spec}.{poison}")


@pytest.mark.parametrize("spec", ["topk:0.2+ef14", "auto"])
def test_nonfinite_raise_names_the_tensor_on_every_rank(spec):
    m = model("raise")
    opt = optimizer(m, spec, nonfinite="raise")
    if spec == "auto":
        # step 0 comes before auto's first measurement, so every tensor takes the dense
        # route, which sees the allreduced sum only: it cannot tell which rank
        who, poisoned = "some rank", 0
    else:
        who, poisoned = rf"rank\(s\) \[{size - 1}\]", 1
        step(m, opt, 0)
    with pytest.raises(HvdCompressError, match=f"holds NaN or infinite values on {who}"):
        step(m, opt, poisoned, poison=float("nan"))


MISMATCHES = [("topk:0.2+ef14", "topk:0.2+ef21", "compression spec"),
              ("qsgd:s=7", "qsgd:s=5", "compression spec"),
              ("topk:0.1", "topk:0.3", "compression spec"),
              ("topk:0.2", "qsgd", "compression spec"),
              ("topk:0.2", "topk:0.2+warmup:2", "compression spec"),
              ("fp16", "fp16+ef14", "compression spec"),
              ("randk:0.2,shared=true", "randk:0.2,shared=true,seed=3", "compression spec")]


@pytest.mark.parametrize("lazy", [True, False])
@pytest.mark.parametrize("mine, other, what", MISMATCHES)
def test_ranks_with_different_specs_fail_loudly_everywhere(mine, other, what, lazy):
    """Horovod's optimizer binds at the first backward hook, ours when it is made: both
    refuse there, before any gradient moves."""
    spec = mine if rank == 0 else other
    m = model("mismatch")
    with pytest.raises(HvdCompressError, match=f"ranks disagree on the {what}"):
        if lazy:
            step(m, optimizer(m, spec), 0)
        else:
            hct.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1),
                                     named_parameters=m.named_parameters(), compression=spec)


@pytest.mark.parametrize("mine, other", [("topk:0.3", "fp16"), ("fp16", "none"),
                                         ("auto", "none")])
def test_ranks_whose_collectives_differ_fail_loudly(mine, other):
    """An allgathered spec against an allreduced one (collectives that would wait for
    each other forever)."""
    m = model("collectives")
    with pytest.raises(HvdCompressError, match="ranks disagree on the compression spec"):
        step(m, optimizer(m, mine if rank == 0 else other), 0)


@pytest.mark.parametrize("setting", [dict(sparse_as_dense=True),
                                     dict(backward_passes_per_step=2), dict(op=hvd.Sum)])
def test_ranks_that_reduce_with_other_settings_fail_loudly(setting):
    """A rank whose optimizer takes another op, sparse_as_dense or number of backward passes
    would sum other numbers or issue other collectives (Horovod alone waits forever)."""
    m = model("settings")
    kw = setting if rank == 0 else {}
    with pytest.raises(HvdCompressError, match=r"ranks reduce their parameters with "
                       r"different settings \(this rank: op=.*; rank\(s\) \[1, 2\] differ"):
        step(m, hvd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1),
                                         named_parameters=m.named_parameters(),
                                         compression=hct.compression("topk:0.3+ef14"), **kw), 0)


@pytest.mark.parametrize("lazy", [True, False])
def test_a_parameter_on_one_rank_only_fails_loudly(lazy):
    """Horovod alone would wait forever for the extra parameter's partners."""
    m = model("extra")
    if rank == size - 1:
        m.append(torch.nn.Linear(2, 2))
    with pytest.raises(HvdCompressError,
                       match=r"ranks reduce different numbers of parameters together: "
                             r"\[4, 4, 6\] by rank"):
        if lazy:
            m(batch(0)[0]).sum().backward()
            optimizer(m, "topk:0.3+ef14").synchronize()
        else:
            hct.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1),
                                     named_parameters=m.named_parameters(),
                                     compression="topk:0.3+ef14")


@pytest.mark.parametrize("kw", [dict(fuse_below=64), dict(whole_model=True)])
def test_ranks_that_fuse_differently_fail_loudly(kw):
    m = model("fuse")
    opt = optimizer(m, "topk:0.3+ef14", **(kw if rank == 0 else {}))
    with pytest.raises(HvdCompressError, match="seed, transport"):
        step(m, opt, 0)


def test_different_seeds_fail_loudly():
    m = model("seed")
    opt = optimizer(m, "randk:0.2", seed=rank)
    with pytest.raises(HvdCompressError, match="seed, transport"):
        step(m, opt, 0)


def test_same_count_other_shape_fails_loudly():
    torch.manual_seed(0)
    tag = f"shape{_tags['shape']}"
    _tags["shape"] += 1
    shape = (3, 4) if rank == 0 else (4, 3)
    w = torch.nn.Parameter(torch.randn(*shape))
    opt = hvd.DistributedOptimizer(torch.optim.SGD([w], lr=0.1), named_parameters=[(tag, w)],
                                   compression=hct.compression("topk:0.5+ef14"))
    with pytest.raises(HvdCompressError, match="shape or dtype"):
        (w.sum() ** 2).backward()
        opt.synchronize()


class TwoBranch(torch.nn.Module):
    def __init__(self, tag, swap):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(5, 2)
        self.b = torch.nn.Linear(5, 2)
        self.unused = torch.nn.Linear(5, 2)
        self.swap = swap
        for n, p in list(self.named_parameters()):
            p._tag = f"{tag}.{n}"

    def forward(self, x):
        out = self.b(x) + self.a(x) if self.swap else self.a(x) + self.b(x)
        return out + (self.unused(x) if not self.swap else 0)  # no gradient on some ranks


def train_in_another_hook_order(tag, spec, **kw):
    """Three steps of TwoBranch, whose branches run in another order on odd ranks (and
    whose third layer has no gradient there); True if the parameters end identical."""
    _tags[tag] += 1
    net = TwoBranch(f"{tag}{_tags[tag]}", swap=rank % 2 == 1)
    named = [(p._tag, p) for p in net.parameters()]
    opt = hvd.DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1),
                                   named_parameters=named,
                                   compression=hct.compression(spec, **kw))
    for i in range(3):
        x, y = batch(i)
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    return same_on_every_rank(list(net.parameters()), f"{tag}.{spec}")


@pytest.mark.parametrize("spec", ["topk:0.5+ef14", "fp16", "bf16", "qsgd",
                                  "topk+ef14+dynamic:agree=true"])
def test_lazy_binding_whatever_the_hook_order(spec):
    """The first gradient hook differs across ranks, and one parameter has no gradient on
    odd ranks: no deadlock, identical parameters."""
    assert train_in_another_hook_order("order", spec)


@pytest.mark.parametrize("spec", ["topk:0.5+ef14", "topk+ef14+dynamic:agree=true"])
def test_mpi4py_moves_everything_in_one_order_whatever_the_hook_order(spec):
    """MPI pairs collectives by the order ranks issue them: with hook orders that differ,
    fused buckets beside per-tensor payloads and agreed levels, everything still moves in
    one sorted order on every rank (no hang, identical parameters)."""
    assert train_in_another_hook_order("mpiorder", spec, comm=MPI.COMM_WORLD, fuse_below=3)


@pytest.mark.parametrize("spec", ["topk:0.3+ef14", "bf16", "fp16", "qsgd"])
def test_bf16_model_through_the_lazy_binding(spec):
    m = model("bf16", dtype=torch.bfloat16)
    opt = optimizer(m, spec)
    for i in range(3):
        step(m, opt, i, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert same_on_every_rank(list(m.parameters()), f"bf16.{spec}")


def test_adasum_is_refused_clearly():
    m = model("adasum")
    # bound to a name so the optimizer, whose hooks raise, lives through backward()
    _opt = hvd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1),
                                    named_parameters=m.named_parameters(),
                                    compression=hct.compression("topk:0.2"), op=hvd.Adasum)
    x, y = batch(0)
    with pytest.raises(HvdCompressError, match="op=Adasum is not supported"):
        torch.nn.functional.mse_loss(m(x), y).backward()


# -- mpi4py, without Horovod's collectives ------------------------------------------------
def test_sparse_allreduce_needs_names():
    reducer = SparseAllreduce("topk:0.5+ef14", MPI.COMM_WORLD)
    with pytest.raises(HvdCompressError, match="name"):
        reducer.allreduce(np.ones(8, np.float32))


def test_sparse_allreduce_needs_the_model_size_for_perturb():
    with pytest.raises(HvdCompressError, match="model_size="):
        SparseAllreduce("topk:0.5+ef14+perturb:radius=0.1", MPI.COMM_WORLD)
    with pytest.raises(HvdCompressError, match="model_size=0 must be a positive integer"):
        SparseAllreduce("topk:0.5+ef14+perturb:radius=0.1", MPI.COMM_WORLD, model_size=0)


def test_sparse_allreduce_mismatch_is_loud_on_every_rank():
    spec = "topk:0.5+ef14" if rank == 0 else "topk:0.5+ef21"
    reducer = SparseAllreduce(spec, MPI.COMM_WORLD)
    with pytest.raises(HvdCompressError, match="ranks disagree on the compression spec"):
        reducer.allreduce(np.ones(8, np.float32), name="w")


def test_sparse_allreduce_nan_reaches_every_rank():
    reducer = SparseAllreduce("topk:0.5+ef14", MPI.COMM_WORLD)
    g = np.arange(8, dtype=np.float32)
    if rank == 0:
        g[3] = np.nan
    out = reducer.allreduce(g, name="w")
    assert np.isnan(out).all()
    after = reducer.allreduce(np.ones(8, np.float32), name="w")
    assert np.isfinite(after).all()
    everyone = MPI.COMM_WORLD.allgather(after.tobytes())
    assert len(set(everyone)) == 1

