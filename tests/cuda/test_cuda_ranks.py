"""The multi-rank paths with the tensors on a GPU: SparseAllreduce (allgather and tree)
and compression= on hvd.DistributedOptimizer, against the single-process simulator or a
NumPy restatement fed with every rank's gradient (copied to the host by the test, never by
the code under test), and updates that stay on the gradient's device.

Launched by tests/test_cuda.py under mpirun with 2 ranks: on a CUDA device where one is
present, and on the CPU everywhere (the device comes from HVD_COMPRESS_TEST_DEVICE,
default "cuda"), so everything here but the device is checked on machines without one. On
the CPU the torch backend takes the branch it takes on a GPU (no sampled top-k candidates,
a non-finite tensor compressed as it is, every check on the device and read once)."""
import os

import numpy as np
import pytest
import torch
import horovod.torch as hvd
from mpi4py import MPI

import hvd_compress.torch as hct
from hvd_compress.comm.mpi import SparseAllreduce
from hvd_compress.core.ops import backend_named
from hvd_compress.core.simulate import Workers

from gtopk_oracle import gtopk

hvd.init()
torch.set_num_threads(1)
comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
DEVICE = torch.device(os.environ.get("HVD_COMPRESS_TEST_DEVICE", "cuda"),
                      rank % max(torch.cuda.device_count(), 1)
                      if os.environ.get("HVD_COMPRESS_TEST_DEVICE", "cuda") == "cuda" else None)
backend_named("torch").avoid_syncs_on_cpu = True  # on the CPU: the branch a GPU takes


def local(d, step):
    return np.random.RandomState(100 * rank + step).standard_normal(d).astype(np.float32)


def integers(d, seed):
    return np.random.RandomState(seed).randint(-20, 21, d).astype(np.float32)


def everyone(x):
    out = np.empty((size, x.size), x.dtype)
    comm.Allgather(np.ascontiguousarray(x), out)
    return out


def host(t):
    return t.detach().cpu().numpy()


@pytest.mark.parametrize("spec", ["topk:0.1+ef14", "topk:0.1+ef21sgdm", "qsgd",
                                  "randk:0.1,scaled=true+diana",
                                  "threshold:lam=1.0,indices=varint"])
def test_sparse_allreduce_on_the_device_matches_the_simulator(spec):
    red = SparseAllreduce(spec, comm, seed=4)
    oracle = Workers(spec, size, seed=4, name="w")
    for step in range(3):
        x = local(1000, step)
        out = red.allreduce(torch.from_numpy(x).to(DEVICE), name="w")
        assert out.device == DEVICE
        want = oracle.step(list(everyone(x)))
        np.testing.assert_allclose(host(out), want, rtol=1e-5, atol=1e-6)
        assert (everyone(host(out)) == host(out)).all(), "replicas differ"


def test_the_tree_on_the_device_matches_the_merge_rule():
    red = SparseAllreduce("topk:k=5+ef14", comm, transport="tree")
    e = np.zeros((size, 64), np.float32)
    for step in range(3):
        g = integers(64, 10 * rank + step)
        out = red.allreduce(torch.from_numpy(g).to(DEVICE), name="t")
        assert out.device == DEVICE
        G, e = gtopk(e + everyone(g), 5)
        np.testing.assert_array_equal(host(out), (G * (1.0 / size)).astype(np.float32))
        np.testing.assert_array_equal(host(red.exchange.states["t"].residual), e[rank])


@pytest.mark.parametrize("spec", ["topk:0.2+ef14", "topk:0.2+ef21sgdm", "fp16"])
def test_horovod_optimizer_on_the_device_matches_the_simulator(spec):
    torch.manual_seed(0)
    model = torch.nn.Linear(12, 4).to(DEVICE)
    dopt = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters(),
        compression=hct.compression(spec, seed=7))
    oracles = {n: Workers(spec, size, seed=7, name=n) for n, _ in model.named_parameters()}
    for step in range(3):
        dopt.zero_grad()
        grads = {n: torch.from_numpy(local(p.numel(), 10 * step + i)).reshape(p.shape)
                 for i, (n, p) in enumerate(model.named_parameters())}
        sum((p * grads[n].to(DEVICE)).sum() for n, p in model.named_parameters()).backward()
        dopt.synchronize()
        for n, p in model.named_parameters():
            assert p.grad.device == DEVICE
            want = oracles[n].step(list(everyone(grads[n].numpy().reshape(-1))))
            tol = 2e-3 if spec == "fp16" else 1e-5
            np.testing.assert_allclose(host(p.grad).reshape(-1), want, rtol=tol, atol=tol)
        with dopt.skip_synchronize():
            dopt.step()
    flat = host(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert (everyone(flat) == flat).all(), "replicas differ"


@pytest.mark.parametrize("spec", ["topk:0.1+ef14", "topk:0.1+ef21sgdm", "qsgd", "fp16+ef14"])
def test_a_nan_on_one_rank_voids_the_step_on_the_device(spec):
    """A NaN on the last rank, never read on the host there: every rank gets the same NaN
    update and keeps the state it had, then trains on as the simulator does."""
    red = SparseAllreduce(spec, comm, seed=4)
    oracle = Workers(spec, size, seed=4, name="w")
    for step in range(3):
        x = local(20000, step)
        if step == 1 and rank == size - 1:
            x[[3, 17]] = [np.nan, np.inf]
        out = red.allreduce(torch.from_numpy(x).to(DEVICE), name="w")
        assert out.device == DEVICE
        if step == 1:
            assert torch.isnan(out).all()
            oracle.step_count += 1  # the void step still drew its step number
            continue
        np.testing.assert_allclose(host(out), oracle.step(list(everyone(x))),
                                   rtol=1e-5, atol=1e-6)
        assert (everyone(host(out)) == host(out)).all(), "replicas differ"
