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
        p.grad = reducer.allreduce(p.grad, name=name, step=step)   # the average
"""
from __future__ import annotations

import time

import numpy as np

from ..core.ops import ITEMSIZE, backend_for
from ..core.payload import pack, split_gathered
from ..core.rng import Key
from ..core.spec import resolve_compressor
from ..core.telemetry import Record, Telemetry


class SparseAllreduce:
    """Average (or sum) a tensor over an MPI communicator through compressed payloads.

    Args:
      compressor: spec string or compressor object.
      comm: an mpi4py communicator (default ``MPI.COMM_WORLD``).
      average: divide the sum by the communicator size (default true).
      seed: seed of the stochastic compressors.
      cuda_aware: hand device buffers to MPI directly (needs a CUDA-aware MPI).
    """

    def __init__(self, compressor, comm=None, average=True, seed=0, cuda_aware=False):
        if comm is None:
            from mpi4py import MPI
            comm = MPI.COMM_WORLD
        self.compressor = resolve_compressor(compressor)
        self.comm, self.average, self.seed = comm, bool(average), int(seed)
        self.cuda_aware = bool(cuda_aware)
        self.telemetry = Telemetry()

    def allgather_bytes(self, buf):
        """Gather every rank's uint8 buffer; returns their concatenation (same backend)."""
        from mpi4py import MPI

        bk = backend_for(buf)
        send, restore = self._host_view(bk, buf)
        n = self.comm.Get_size()
        if self.compressor.fixed_size:
            recv = np.empty(n * send.shape[0], np.uint8)
            self.comm.Allgather([send, MPI.BYTE], [recv, MPI.BYTE])
        else:
            sizes = np.empty(n, np.int64)
            self.comm.Allgather([np.array([send.shape[0]], np.int64), MPI.INT64_T],
                                [sizes, MPI.INT64_T])
            displs = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            recv = np.empty(int(sizes.sum()), np.uint8)
            self.comm.Allgatherv([send, MPI.BYTE], [recv, sizes, displs, MPI.BYTE])
        return restore(recv)

    def _host_view(self, bk, buf):
        """(buffer MPI can read, function mapping a numpy result back to buf's kind)."""
        if bk.name == "numpy":
            return np.ascontiguousarray(buf), lambda r: r
        if bk.name == "torch":
            import torch
            if buf.device.type == "cpu":
                return buf.contiguous().numpy(), torch.from_numpy
            if self.cuda_aware:
                return buf.contiguous(), lambda r: torch.from_numpy(r).to(buf.device)
            return buf.cpu().numpy(), lambda r: torch.from_numpy(r).to(buf.device)
        return bk.to_numpy(buf), lambda r: bk.from_numpy(r, buf)

    def allreduce(self, tensor, name: str = "", step: int = 0):
        """The compressed average (or sum) of ``tensor`` over all ranks."""
        bk = backend_for(tensor)
        rank, n = self.comm.Get_rank(), self.comm.Get_size()
        t0 = time.perf_counter()
        payload = self.compressor.compress(tensor, Key(self.seed, rank, name, step))
        buf = pack(bk, payload)
        seconds = time.perf_counter() - t0
        d = bk.size(bk.flatten(tensor))
        self.telemetry.record(Record(step, name, 8 * int(bk.size(buf)), int(payload.count), d,
                                     8 * d * ITEMSIZE[bk.dtype(tensor)], seconds))
        gathered = self.allgather_bytes(buf)
        parts = split_gathered(bk, gathered, payload, n, self.compressor.fixed_size)
        dense = self.compressor.aggregate(bk, parts)
        if self.average:
            dense = dense * (1.0 / n)
        return bk.reshape(bk.astype(dense, bk.dtype(tensor)), bk.shape(tensor))

