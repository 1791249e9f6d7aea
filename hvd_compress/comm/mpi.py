"""Sparse allgather over mpi4py: compressed training without Horovod.

Every rank packs its payload into one uint8 buffer; fixed-size payloads travel with one
``Allgather``, variable-size ones with an ``Allgather`` of the byte counts and then one
``Allgatherv``. Only mpi4py's buffer methods are used, never the pickling ones.

Buffers are handed to MPI without copies when it can read them in place: numpy arrays and
CPU torch tensors directly, GPU tensors through ``__cuda_array_interface__`` when
``cuda_aware=True`` (a CUDA-aware MPI). Otherwise a GPU buffer is staged through host
memory and the result copied back to the device.

    from mpi4py import MPI
    from hvd_compress.comm.mpi import SparseAllreduce

    reducer = SparseAllreduce("topk:0.01", MPI.COMM_WORLD)
    for name, p in model.named_parameters():
        p.grad = reducer.allreduce(p.grad, name=name)   # the average
"""
from __future__ import annotations

import numpy as np

from ..core.auto import refuse_unmeasured
from ..core.exchange import Exchange
from ..core.gtopk import check_pipeline
from ..core.ops import backend_for
from ..core.payload import Stamp, check_stamps
from ..errors import HvdCompressError


class SparseAllreduce:
    """Average (or sum) tensors over an MPI communicator through compressed payloads.

    Args:
      spec: spec string (``"topk:0.01+ef21sgdm"``), compressor or pipeline.
      comm: an mpi4py communicator (default ``MPI.COMM_WORLD``).
      average: divide the sum by the communicator size (default true).
      seed: seed of the stochastic compressors.
      cuda_aware: hand device buffers to MPI directly (needs a CUDA-aware MPI).
      nonfinite: "propagate" (a NaN or infinity on any rank gives every rank a NaN
        result and leaves the state as it was) or "raise" (HvdCompressError everywhere).
      model_size: entries of the whole model (all the tensors reduced per step), which
        ``perturb`` spreads its noise over; required with it.
      transport: ``"allgather"`` (default: every rank receives every rank's payload,
        O(k n) bytes per rank) or ``"tree"``: global top-k merged up a binomial tree and
        broadcast, O(k log n) bytes at most per rank, for many ranks; needs
        ``topk:RATIO+ef14`` (see :mod:`hvd_compress.core.gtopk`).

    Feedback state is kept per tensor ``name`` (required); ``state_dict()`` checkpoints it.
    Every rank must call :meth:`allreduce` for the same names in the same order. On a
    name's first call every rank's fingerprint (spec, seed, transport, non-finite policy,
    name, shape, dtype) is gathered before anything of it moves, so ranks configured apart,
    or calling names in another order, raise on every rank instead of waiting on each
    other; afterwards each payload's header carries them, and is checked on arrival.
    """

    def __init__(self, spec, comm=None, average=True, seed=0, cuda_aware=False,
                 nonfinite="propagate", model_size=None, transport="allgather"):
        if transport not in ("allgather", "tree"):
            raise HvdCompressError(
                f"SparseAllreduce: transport={transport!r} must be 'allgather' or 'tree'")
        if comm is None:
            from mpi4py import MPI
            comm = MPI.COMM_WORLD
        self.exchange = Exchange(spec, seed, allreduce_dtypes=(), nonfinite=nonfinite,
                                 transport="mpi4py" + ("/tree" if transport == "tree" else ""),
                                 model_size=model_size)
        refuse_unmeasured(self.exchange.pipeline, "SparseAllreduce (mpi4py)")
        self.tree = transport == "tree"
        if self.tree:
            check_pipeline(self.exchange.pipeline, "SparseAllreduce")
        if self.exchange.pipeline.perturbation is not None and model_size is None:
            raise HvdCompressError(
                f"{self.exchange.pipeline.spec()}: perturb spreads its noise over the whole "
                "model; pass SparseAllreduce(..., model_size=<entries of every tensor you "
                "reduce per step>)")
        self.telemetry = self.exchange.telemetry
        self.comm, self.average = comm, bool(average)
        self.cuda_aware = bool(cuda_aware)
        self._agreed: set = set()  # names whose first-call fingerprints every rank shares
        self._tree_comm = None     # the tree's own duplicate of comm, made at its first call

    def state_dict(self) -> dict:
        """Feedback state and step counters, and who wrote them (format, rank, world
        size, spec, seed). For one file for all ranks see :mod:`hvd_compress.checkpoint`."""
        from ..checkpoint import sync_group
        return sync_group(self).state_dict()

    def load_state_dict(self, state: dict):
        """Resume from :meth:`state_dict`. Raises HvdCompressError (changing nothing)
        where ``state`` holds feedback state of another rank, world size or feedback
        rule."""
        from ..checkpoint import sync_group
        sync_group(self).load_state_dict(state)

    def _group(self, process_set=None):
        """(rank, size, allgather of picklable objects) of the communicator."""
        if process_set is not None:
            raise HvdCompressError("SparseAllreduce runs over its comm: process_set does not apply")
        return self.comm.Get_rank(), self.comm.Get_size(), self.comm.allgather

    def allreduce(self, tensor, name: str | None = None):
        """The compressed average (or sum) of ``tensor`` over all ranks; each call for a
        given ``name`` is one step of that tensor's pipeline."""
        if not isinstance(name, str) or not name:
            raise HvdCompressError(
                "SparseAllreduce.allreduce needs name=: each tensor's feedback state, random "
                "stream and payload check are keyed by it (e.g. the parameter's name)")
        bk = backend_for(tensor)
        if name not in self._agreed:
            self._agree(bk, name, tensor)
        out = self.exchange.begin(bk, name, tensor, self.comm.Get_rank(),
                                  gather=lambda row: gather_rows(self.comm, row))
        if self.tree:
            from .tree import tree_allreduce
            if self._tree_comm is None:  # every rank is here: they agreed on the transport
                self._tree_comm = self.comm.Dup()  # messages never meet the user's
            merged = tree_allreduce(self._tree_comm, out, self.cuda_aware)
            return self.exchange.finish_merged(bk, merged, out, self.comm.Get_size(),
                                               summed=not self.average)
        gathered = allgather_bytes(self.comm, out.wire, out.codec.fixed_size, self.cuda_aware)
        return self.exchange.finish_gathered(bk, gathered, out, self.comm.Get_size(),
                                             summed=not self.average)

    def _agree(self, bk, name, tensor):
        """Raise on every rank unless every rank's fingerprint of tensor ``name`` equals
        this rank's (one small Allgather, on the name's first call only)."""
        ex = self.exchange
        shape, dtype = bk.shape(tensor), bk.dtype(tensor)
        rows = gather_rows(self.comm, np.array(ex.stamp(name, shape, dtype), np.float64))
        check_stamps(f"tensor {name!r}", [Stamp(*map(int, row)) for row in rows],
                     ex.describe(shape, dtype))
        self._agreed.add(name)


def allgather_bytes(comm, buf, fixed_size: bool, cuda_aware: bool = False):
    """Gather every rank's uint8 buffer over ``comm``; their concatenation, same backend.

    ``fixed_size``: every rank sends the same length (one Allgather); otherwise the
    lengths are gathered first and the buffers with one Allgatherv.
    """
    from mpi4py import MPI

    bk = backend_for(buf)
    send, restore = _host_view(bk, buf, cuda_aware)
    n = comm.Get_size()
    if fixed_size:
        recv = np.empty(n * send.shape[0], np.uint8)
        comm.Allgather([send, MPI.BYTE], [recv, MPI.BYTE])
    else:
        sizes = np.empty(n, np.int64)
        comm.Allgather([np.array([send.shape[0]], np.int64), MPI.INT64_T], [sizes, MPI.INT64_T])
        displs = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        recv = np.empty(int(sizes.sum()), np.uint8)
        comm.Allgatherv([send, MPI.BYTE], [recv, sizes, displs, MPI.BYTE])
    return restore(recv)


def allreduce_sum(comm, buf):
    """The elementwise sum of every rank's float32 or float64 ``buf`` over ``comm`` (one
    Allreduce through host memory), same backend and shape."""
    bk = backend_for(buf)
    send, restore = _host_view(bk, buf, False)
    recv = np.empty_like(send)
    comm.Allreduce(send, recv)
    return restore(recv)


def _host_view(bk, buf, cuda_aware):
    """(buffer MPI can read, function mapping a numpy result back to buf's kind)."""
    if bk.name == "numpy":
        return np.ascontiguousarray(buf), lambda r: r
    if bk.name == "torch":
        import torch
        if buf.device.type == "cpu":
            return buf.contiguous().numpy(), torch.from_numpy
        if cuda_aware:
            return buf.contiguous(), lambda r: torch.from_numpy(r).to(buf.device)
        return buf.cpu().numpy(), lambda r: torch.from_numpy(r).to(buf.device)
    return bk.to_numpy(buf), lambda r: bk.from_numpy(r, buf)


def gather_rows(comm, row):
    """Every rank's float64 ``row`` over ``comm``, stacked in rank order (a buffer
    Allgather, no pickling)."""
    from mpi4py import MPI
    send = np.ascontiguousarray(row, np.float64).reshape(-1)
    recv = np.empty((comm.Get_size(), send.size), np.float64)
    comm.Allgather([send, MPI.DOUBLE], [recv, MPI.DOUBLE])
    return recv


def measure_allgather(comm, sizes_bytes=(1 << 10, 1 << 14, 1 << 17, 1 << 20), repeats=5):
    """Time an Allgather of each per-rank size on ``comm``; every rank gets the same
    (bits per rank, seconds) pairs (rank 0's median timings, broadcast)."""
    from mpi4py import MPI

    n = comm.Get_size()
    out = []
    for size in sizes_bytes:
        send = np.zeros(size, np.uint8)
        recv = np.empty(n * size, np.uint8)
        times = []
        for _ in range(repeats):
            comm.Barrier()
            t0 = MPI.Wtime()
            comm.Allgather([send, MPI.BYTE], [recv, MPI.BYTE])
            times.append(MPI.Wtime() - t0)
        out.append((8 * size, float(np.median(times))))
    flat = np.array(out, np.float64)
    comm.Bcast(flat, root=0)
    return [(int(b), float(t)) for b, t in flat]


def calibrated_policy(comm, **kwargs):
    """A ``dynamic`` policy whose allgather cost was measured on ``comm`` (see
    :func:`allgather_policy`)."""
    return allgather_policy(measure_allgather(comm), comm.Get_size(), **kwargs)


def allgather_policy(timings, n: int, **kwargs):
    """A ``dynamic`` policy from measured (bits per rank, seconds) Allgathers of ``n``
    ranks: the fitted t = a + b * bits gives alpha = a / (n - 1) and beta = b / (n - 1)
    for the ring model (n - 1)(alpha + beta * bits). Where noise left no growth with the
    bits to fit (a busy machine), b is the largest Allgather's seconds per bit, the most
    the data allow: the policy then errs toward fewer bits, instead of refusing."""
    from ..core.policy import Dynamic, calibrate

    bits, seconds = zip(*timings)
    a, b = calibrate(bits, seconds)
    if b <= 0:
        largest = max(range(len(bits)), key=lambda i: bits[i])
        b = seconds[largest] / bits[largest]
    m = max(n - 1, 1)
    return Dynamic(cost="allgather", alpha=a / m, beta=b / m, n=n, **kwargs)
