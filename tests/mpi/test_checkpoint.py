"""Checkpoints of per-rank compression state under mpirun: bit-exact resumes through
``compression=`` on Horovod's own optimizer (one file per rank, and one file for all with
hvd_compress.checkpoint), refusals that every rank takes alike, mpi4py, and TensorFlow's
tf.train.Checkpoint. Tiny models: the file runs in seconds."""
import functools
import os
import shutil
import tempfile

import numpy as np
import pytest
import tensorflow as tf
import torch
import horovod.tensorflow as hvdtf
import horovod.torch as hvd
from mpi4py import MPI

import hvd_compress.tensorflow as hctf
import hvd_compress.torch as hct
from hvd_compress import HvdCompressError, checkpoint
from hvd_compress.comm.mpi import SparseAllreduce

MPI_RANKS = (3,)  # one launch: an odd world size, so "another rank" is never the only other one

hvd.init()  # Horovod for TensorFlow starts in its test, once this one has stopped
torch.set_num_threads(1)
comm = MPI.COMM_WORLD
rank, size = hvd.rank(), hvd.size()
assert (rank, size) == (comm.Get_rank(), comm.Get_size())
NEXT = (rank + 1) % size  # a rank that is not this one


@pytest.fixture(scope="module")
def shared_dir():
    """A directory every rank sees (one machine), removed at the end."""
    path = comm.bcast(tempfile.mkdtemp(prefix="hvd_compress_ckpt.") if rank == 0 else None)
    yield path
    comm.Barrier()
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)


# -- PyTorch: compression= on hvd.DistributedOptimizer -------------------------------------


def torch_model():
    torch.manual_seed(0)  # identical initial weights on every rank
    return torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def batch(step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(16, 10, generator=g), torch.randint(0, 3, (16,), generator=g)


def train(model, comp, steps, optim_state=None):
    """Steps of plain SGD through Horovod's own optimizer, given ``comp`` as compression=;
    returns the optimizer (for its state)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    dopt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                    compression=comp)
    if optim_state is not None:
        dopt.load_state_dict(optim_state)
    for step in steps:
        x, y = batch(step)
        dopt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        dopt.step()
    return dopt


def assert_same_everywhere(model, want):
    for (name, p), q in zip(model.named_parameters(), want.parameters()):
        assert torch.equal(p.data, q.data), f"{name} differs from the straight run"
    flat = torch.cat([p.data.reshape(-1) for p in model.parameters()])
    everyone = hvd.allgather(flat.reshape(1, -1), name="ckpt.params")
    assert (everyone == everyone[0]).all(), "parameters differ across ranks"


@functools.lru_cache(maxsize=None)
def straight(spec):
    """The model after six steps without interruption (computed once per spec)."""
    model = torch_model()
    train(model, hct.compression(spec, seed=3), range(6))
    return model


SPECS = ["topk:0.1+ef21sgdm", "randk:0.3,scaled=true+diana"]


@pytest.mark.parametrize("spec", SPECS)
def test_torch_resumes_bit_exactly_from_one_file_per_rank(spec, shared_dir):
    want = straight(spec)
    model, comp = torch_model(), hct.compression(spec, seed=3)
    dopt = train(model, comp, range(3))
    path = os.path.join(shared_dir, f"{spec}.rank{rank}.pt")
    torch.save({"model": model.state_dict(), "optim": dopt.state_dict(),
                "compression": comp.state_dict()}, path)
    saved = torch.load(path, weights_only=True)
    assert (saved["compression"]["rank"], saved["compression"]["world_size"]) == (rank, size)
    model, comp = torch_model(), hct.compression(spec, seed=3)  # a fresh process would
    model.load_state_dict(saved["model"])
    comp.load_state_dict(saved["compression"])
    train(model, comp, range(3, 6), saved["optim"])
    assert_same_everywhere(model, want)


@pytest.mark.parametrize("spec", SPECS)
def test_torch_resumes_bit_exactly_from_one_gathered_file(spec, shared_dir):
    """Rank 0 writes one file; rank 0 reads it and broadcasts it (Horovod's recipe), and
    every rank restores its own part."""
    want = straight(spec)
    model, comp = torch_model(), hct.compression(spec, seed=3)
    dopt = train(model, comp, range(3))
    gathered = checkpoint.gather(comp)
    assert sorted(gathered) == list(range(size))
    assert [gathered[r]["rank"] for r in range(size)] == list(range(size))
    path = os.path.join(shared_dir, f"{spec}.all.pt")
    if rank == 0:
        torch.save({"model": model.state_dict(), "optim": dopt.state_dict(),
                    "compression": gathered}, path)
    comm.Barrier()
    saved = torch.load(path, weights_only=True) if rank == 0 else None
    saved = hvd.broadcast_object(saved, root_rank=0, name="ckpt.bcast")
    model, comp = torch_model(), hct.compression(spec, seed=3)
    model.load_state_dict(saved["model"])
    checkpoint.restore(comp, saved["compression"])
    train(model, comp, range(3, 6), saved["optim"])
    assert_same_everywhere(model, want)


def test_torch_state_of_another_rank_is_refused_on_every_rank():
    comp = hct.compression("topk:0.1+ef21sgdm", seed=3)
    train(torch_model(), comp, range(2))
    gathered = checkpoint.gather(comp)
    fresh = hct.compression("topk:0.1+ef21sgdm", seed=3)
    with pytest.raises(HvdCompressError, match=f"of rank {NEXT}, but this is rank {rank} "
                       f"\\(of {size}\\).*every rank must load its own state"):
        fresh.load_state_dict(gathered[NEXT])
    assert fresh.state_dict()["steps"] == {}  # nothing loaded
    # rank 0's file on every rank, the drifting recipe: only rank 0 may load it
    if rank == 0:
        fresh.load_state_dict(gathered[0])
    else:
        with pytest.raises(HvdCompressError, match="of rank 0, but this is rank"):
            fresh.load_state_dict(gathered[0])


@pytest.mark.parametrize("spec", ["topk:0.1+ef21sgdm", "randk:0.3,shared=true",
                                  "topk:0.2+ef14+warmup:4"])
def test_torch_state_loaded_on_some_ranks_only_fails_on_every_rank(spec):
    """Rank 0 restores and broadcasts the model, as Horovod's recipe does, but loads the
    compression state alone: the first step raises on every rank instead of drifting
    apart (running estimates, shared masks) or hanging (rank 0 past the warm-up)."""
    model, comp = torch_model(), hct.compression(spec, seed=3)
    train(model, comp, range(3))
    saved = comp.state_dict()
    model, comp = torch_model(), hct.compression(spec, seed=3)
    if rank == 0:
        comp.load_state_dict(saved)
    with pytest.raises(HvdCompressError, match=r"ranks start from different compression "
                       r"states \(rank 0: \d+ tensors at steps 3..3; rank 1: no steps yet"):
        train(model, comp, range(3, 4))


def test_torch_state_without_feedback_loads_on_every_rank(shared_dir):
    """Only step counters (rand-k keys its masks by rank and step): rank 0's file
    resumes every rank exactly."""
    spec = "randk:0.3"
    want = straight(spec)
    model, comp = torch_model(), hct.compression(spec, seed=3)
    dopt = train(model, comp, range(3))
    saved = hvd.broadcast_object({"model": model.state_dict(), "optim": dopt.state_dict(),
                                  "compression": comp.state_dict()},
                                 root_rank=0, name="ckpt.bcast0")
    model, comp = torch_model(), hct.compression(spec, seed=3)
    model.load_state_dict(saved["model"])
    comp.load_state_dict(saved["compression"])
    train(model, comp, range(3, 6), saved["optim"])
    assert_same_everywhere(model, want)


# -- mpi4py ---------------------------------------------------------------------------------


def test_mpi4py_gather_restore_and_refusal():
    spec = "topk:0.2+ef14"
    grads = [np.random.RandomState(100 * rank + s).standard_normal(64).astype(np.float32)
             for s in range(4)]
    ref = SparseAllreduce(spec, comm)
    want = [ref.allreduce(g, name="w") for g in grads][-1]
    first = SparseAllreduce(spec, comm)
    for g in grads[:2]:
        first.allreduce(g, name="w")
    gathered = checkpoint.gather(first)
    resumed = SparseAllreduce(spec, comm)
    with pytest.raises(HvdCompressError, match=f"of rank {NEXT}, but this is rank {rank}"):
        resumed.load_state_dict(gathered[NEXT])
    checkpoint.restore(resumed, gathered)
    got = [resumed.allreduce(g, name="w") for g in grads[2:]][-1]
    np.testing.assert_array_equal(got, want)


# -- TensorFlow: tf.train.Checkpoint ------------------------------------------------------


@pytest.fixture(scope="module")
def tf_horovod():
    """Horovod for TensorFlow, started once Horovod for PyTorch has stopped: an idle
    Horovod still coordinates over MPI every cycle, and two would share the cores."""
    hvd.shutdown()
    hvdtf.init()
    assert (hvdtf.rank(), hvdtf.size()) == (rank, size)
    return hvdtf


class Model(tf.Module):
    def __init__(self):
        super().__init__()
        rs = np.random.RandomState(0)  # identical initial weights on every rank
        self.vars = [tf.Variable(rs.standard_normal((10, 3)).astype(np.float32) * 0.3,
                                 name="dense/kernel"),
                     tf.Variable(np.zeros(3, np.float32), name="dense/bias")]


def tf_step(model, comp):
    """One training step inside tf.function (autograph off: it only slows the trace)."""
    @tf.function(autograph=False)
    def step(x, y):
        with tf.GradientTape() as tape:
            logits = x @ model.vars[0] + model.vars[1]
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
        tape = hctf.DistributedGradientTape(tape, compression=comp)
        for v, g in zip(model.vars, tape.gradient(loss, model.vars)):
            v.assign_sub(0.2 * g)
    return step


def tf_run(step, steps):
    for s in steps:
        rs = np.random.RandomState(1000 * rank + s)
        step(tf.constant(rs.standard_normal((16, 10)).astype(np.float32)),
             tf.constant(rs.randint(0, 3, 16)))


def test_tf_train_checkpoint_resumes_bit_exactly_and_refuses_other_ranks(shared_dir,
                                                                         tf_horovod):
    spec = "topk:0.2+ef21sgdm"
    model, comp = Model(), hctf.compression(spec, seed=3)
    step = tf_step(model, comp)
    tf_run(step, range(3))
    ckpt = tf.train.Checkpoint(model=model, compression=comp.checkpointable())
    path = ckpt.write(os.path.join(shared_dir, f"tf.rank{rank}"))  # one per rank
    gathered = checkpoint.gather(comp)  # TF's gather, over Horovod's TF allgather
    assert [gathered[r]["rank"] for r in range(size)] == list(range(size))
    np.testing.assert_array_equal(gathered[rank]["states"]["dense/bias"]["local"],
                                  comp.state_dict()["states"]["dense/bias"]["local"])
    one = os.path.join(shared_dir, "tf.all")  # one for all ranks, written by rank 0
    comp.checkpointable().gather()
    assert (comp.checkpointable()._gathered is None) == (rank != 0)
    if rank == 0:
        ckpt.write(one)
    tf_run(step, range(3, 6))
    want = [v.numpy() for v in model.vars]
    comm.Barrier()  # every file is written
    # every rank restores its part of rank 0's file into the live objects (the variables
    # exist) and runs the same three steps again
    ckpt.read(one).assert_consumed()
    assert comp.state_dict()["steps"] == {"dense/kernel": 3, "dense/bias": 3}
    tf_run(step, range(3, 6))
    for v, w in zip(model.vars, want):
        np.testing.assert_array_equal(v.numpy(), w)
    # fresh objects, as in a new process: another rank's file is refused on every rank
    model, comp = Model(), hctf.compression(spec, seed=3)
    ckpt = tf.train.Checkpoint(model=model, compression=comp.checkpointable())
    with pytest.raises(HvdCompressError, match=f"of rank {NEXT}, but this is rank {rank}"):
        ckpt.read(os.path.join(shared_dir, f"tf.rank{NEXT}"))
    # restored before the compression's variables exist: they take the restored values
    ckpt.read(path).assert_consumed()
    tf_run(tf_step(model, comp), range(3, 6))
    for v, w in zip(model.vars, want):
        np.testing.assert_array_equal(v.numpy(), w)
    flat = tf.concat([tf.reshape(v, [-1]) for v in model.vars], 0)
    everyone = hvdtf.allgather(tf.reshape(flat, (1, -1)), name="ckpt.tfparams").numpy()
    assert (everyone == everyone[0]).all(), "weights differ across ranks"
