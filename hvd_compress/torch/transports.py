"""How compressed payloads travel between ranks, for the PyTorch frontend.

A transport takes this rank's :class:`~hvd_compress.core.exchange.Outgoing` (a summable
payload for an allreduce, or packed bytes for an allgather) and a collective name, and
starts moving it: :meth:`start` returns ``wait()``, which gives the collective's output.
:meth:`gather_rows` is a blocking allgather of a few float64s (how dynamic:agree=true
settles k within a step). The frontend decides what to send and when (per tensor, in
fused buckets, as one model vector); the transport only moves it, so the two vary
independently.

* :class:`HorovodTransport`: Horovod's asynchronous collectives, matched across ranks by
  name, so each starts from its gradient hook and overlaps the backward pass.
* :class:`MpiTransport`: an mpi4py communicator. MPI matches collectives by the order
  ranks issue them, and hook order differs across ranks, so everything waits until the
  first ``wait()`` of a step and then moves in sorted name order, the same on every rank.
* :class:`TreeTransport`: like :class:`MpiTransport`, but each payload is merged up a
  binomial tree and broadcast (global top-k, :mod:`hvd_compress.core.gtopk`) instead of
  gathered: O(k log n) bytes per rank at most instead of O(k n), for many ranks.

:meth:`finish` turns what ``wait()`` gave into the update, through the
:class:`~hvd_compress.core.exchange.Exchange` method that reads that kind of result.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..core.transport import Transport, best_of
from ..errors import HvdCompressError


class HorovodTransport(Transport):
    """Horovod's collectives on the optimizer's process set, with its op and scaling."""

    name = "horovod"

    def __init__(self, opt):
        self.opt = opt
        self._casts: dict = {}    # this step's casts: name -> (their wait, once; Outgoing)
        self._settled: dict = {}  # ... name -> (result, Outgoing), resent where it must

    def new_step(self):
        self._casts.clear()
        self._settled.clear()

    def rank(self) -> int:
        return self.opt.process_set.rank()

    def size(self) -> int:
        return self.opt.process_set.size()

    def scale_factors(self):
        return scale_factors(self.opt)

    def finish(self, exchange, bk, result, out, n: int, summed: bool):
        """As every transport's, except that a cast whose float16 sum is not finite, or
        holds zeros only, goes again as it is (:meth:`Exchange.resend_dense`, the same
        on every rank): see :meth:`_settle`; the dense sum of a cast that held zeros
        then sets its scale (:meth:`Exchange.rescale_flushed`)."""
        if out.shift is not None:  # a cast
            if out.name not in self._settled:
                # registered at start, unless a step that failed halfway dropped it
                self._casts.setdefault(out.name, (lambda: result, out))
                self._settle(exchange, bk)
            result, out = self._settled.pop(out.name)
            exchange.rescale_flushed(bk, result, out, 1 if summed else n)
        return super().finish(exchange, bk, result, out, n, summed)

    def _settle(self, exchange, bk):
        """Wait for every cast this step started, then start every resend they need before
        waiting on any. Horovod matches collectives by name, but ranks finish their
        gradients in orders of their own (a parameter unused on one rank is filled in at
        synchronize and comes last there): a rank that waited on one resend before
        starting the next would wait forever on a rank that needs them the other way
        round. Every cast a step sends is started before any is waited on: Horovod's
        synchronize launches the missing ones first, and the frontend starts its fused
        buckets before a rank's first wait. The settling relies on every rank holding the
        same float16 sums, as Horovod's allreduce gives them (ring results are
        broadcast; other reductions add in a commutative order)."""
        casts, self._casts = self._casts, {}
        again = {}
        try:
            for name, (wait, out) in casts.items():
                result = wait()
                resend = exchange.resend_dense(bk, result, out)
                if resend is None:
                    self._settled[name] = (result, out)
                else:
                    again[name] = (self.start(resend, f"hvd_compress.resend:{name}"),
                                   resend)
        finally:  # what was started is waited on, even where another wait failed
            for name, (wait, resend) in again.items():
                self._settled[name] = (wait(), resend)

    def start(self, out, name: str):
        import horovod.torch as hvd
        ps = self.opt.process_set
        if out.by_allreduce:
            pre, post = self.scale_factors()
            handle = hvd.allreduce_async_(out.wire, name=name, op=self.opt.op,
                                          prescale_factor=pre, postscale_factor=post,
                                          process_set=ps)
        else:
            handle = hvd.allgather_async(out.wire, name=name, process_set=ps)
        wait = lambda: horovod_result(out.name, lambda: hvd.synchronize(handle))  # noqa: E731
        if out.shift is not None:  # a cast, waited on by _settle, then by its finish
            wait = _once(wait)
            self._casts[out.name] = (wait, out)
        return wait

    def start_group(self, outs, name: str):
        """One grouped collective (``groups=``): Horovod negotiates and fuses it once.
        Returns Horovod's handle, which its optimizer waits on."""
        import horovod.torch as hvd
        kinds = {out.by_allreduce for out in outs}
        if len(kinds) > 1:
            raise HvdCompressError(
                f"group {[o.name for o in outs]} mixes gradients sent by allreduce and by "
                "allgather (different dtypes); group them apart")
        wires, ps = [out.wire for out in outs], self.opt.process_set
        if kinds == {True}:
            pre, post = self.scale_factors()
            return hvd.grouped_allreduce_async_(wires, name=name, op=self.opt.op,
                                                prescale_factor=pre, postscale_factor=post,
                                                process_set=ps)
        return hvd.grouped_allgather_async(wires, name=name, process_set=ps)

    def gather_rows(self, row, name: str):
        """Every rank's float64 ``row`` (numpy), stacked in rank order (blocking)."""
        import torch
        import horovod.torch as hvd
        return hvd.allgather(torch.from_numpy(row.reshape(1, -1)), name=name,
                             process_set=self.opt.process_set).numpy()

    def _timed(self, kind: str, nbytes: int, name: str, device) -> float:
        import torch
        import horovod.torch as hvd
        ps = self.opt.process_set
        if kind == "allgather":
            buf = torch.zeros(nbytes, dtype=torch.uint8, device=device)
            run = lambda tag: hvd.allgather(buf, name=tag, process_set=ps)  # noqa: E731
        else:
            dtype = torch.float32 if kind == "allreduce" else torch.float16
            buf = torch.zeros(nbytes // dtype.itemsize, dtype=dtype, device=device)
            run = lambda tag: hvd.allreduce(buf, name=tag, process_set=ps)  # noqa: E731
        return best_of(2, lambda i: run(f"{name}.{i}"))

    def over_ranks(self, values, name: str, op: str = "max") -> list:
        """Every rank's float ``values``, elementwise ``op`` ("max" or "sum") over the
        ranks, the same numbers on every rank (blocking; float64)."""
        import torch
        import horovod.torch as hvd
        return hvd.allreduce(torch.tensor(values, dtype=torch.float64),
                             op=hvd.Max if op == "max" else hvd.Sum, name=name,
                             process_set=self.opt.process_set).tolist()


class MpiTransport(Transport):
    """An mpi4py communicator: every payload of a step moves at the step's first
    ``wait()``, in sorted name order on every rank.

    ``before_flush()``, when given, runs first: the frontend starts the payloads it holds
    back until then (fused buckets, agreed levels), so they move in the same flush."""

    name = "mpi4py"

    def __init__(self, comm, before_flush=None) -> None:
        self.comm = comm
        self.before_flush = before_flush
        self._pending: dict[str, Any] = {}   # name -> Outgoing
        self._arrived: dict[str, Any] = {}   # name -> the gathered bytes

    def rank(self) -> int:
        return self.comm.Get_rank()

    def size(self) -> int:
        return self.comm.Get_size()

    sums_float16 = False  # MPI has no float16 sum

    def start(self, out, name: str):
        if name in self._pending or name in self._arrived:
            raise HvdCompressError(f"{name!r} is already on its way over mpi4py this step")
        self._pending[name] = out
        return lambda: self._take(name)

    def gather_rows(self, row, name: str):
        """Every rank's float64 ``row`` (numpy), stacked in rank order (blocking, now:
        the frontend calls it where every rank is at the same point, in the flush)."""
        from ..comm.mpi import gather_rows
        return gather_rows(self.comm, row)

    def _take(self, name):
        if name not in self._arrived:
            self._flush()
        return self._arrived.pop(name)

    def _flush(self):
        try:
            if self.before_flush is not None:
                self.before_flush()
            for name in sorted(self._pending):
                self._arrived[name] = self._move(self._pending[name])
        except BaseException:  # a failed step leaves nothing behind for the next one
            self._arrived.clear()
            raise
        finally:
            self._pending.clear()

    def _move(self, out):
        from ..comm.mpi import allgather_bytes, allreduce_sum
        if out.by_allreduce:  # auto's dense route: the sum, averaged in finish
            return allreduce_sum(self.comm, out.wire)
        return allgather_bytes(self.comm, out.wire, out.codec.fixed_size)

    def finish(self, exchange, bk, result, out, n: int, summed: bool):
        """As every transport's; an allreduced sum becomes the average unless ``summed``
        (as Horovod's average divides its sum)."""
        if out.by_allreduce and not summed:
            result = bk.mul_(result, 1.0 / n)
        return super().finish(exchange, bk, result, out, n, summed)

    def _timed(self, kind, nbytes, name, device):
        import torch

        from ..comm.mpi import allgather_bytes, allreduce_sum
        if kind == "allgather":
            buf = torch.zeros(nbytes, dtype=torch.uint8, device=device)
            return best_of(2, lambda i: allgather_bytes(self.comm, buf, True))
        buf = torch.zeros(nbytes // 4, dtype=torch.float32, device=device)
        return best_of(2, lambda i: allreduce_sum(self.comm, buf))

    def over_ranks(self, values, name, op="max"):
        from mpi4py import MPI
        send = np.asarray(values, np.float64)
        recv = np.empty_like(send)
        self.comm.Allreduce(send, recv, op=MPI.MAX if op == "max" else MPI.SUM)
        return recv.tolist()


class TreeTransport(MpiTransport):
    """Global top-k over an mpi4py communicator (a duplicate of the one given, so its
    point-to-point messages never meet the user's): each payload is merged up a binomial
    tree and broadcast (see :mod:`hvd_compress.comm.tree`), at the step's first
    ``wait()``, in sorted name order on every rank."""

    name = "tree"

    def __init__(self, comm, before_flush=None):
        super().__init__(comm, before_flush)
        self._own = None  # the duplicate, made at the first flush, where every rank is

    def _move(self, out):
        from ..comm.tree import tree_allreduce
        if self._own is None:
            self._own = self.comm.Dup()
        return tree_allreduce(self._own, out)

    def finish(self, exchange, bk, result, out, n: int, summed: bool):
        return exchange.finish_merged(bk, result, out, n, summed)


def scale_factors(opt):
    """(prescale, postscale) of Horovod's allreduce for a Horovod optimizer's op."""
    from horovod.torch.mpi_ops import Average
    f = opt.gradient_predivide_factor
    return (1.0 / f, f) if opt.op == Average else (1.0, 1.0)


def _once(fn):
    """``fn``, called at most once: later calls return the first call's result, or
    raise its error again."""
    got: list = []

    def call():
        if not got:
            try:
                got.append((True, fn()))
            except BaseException as error:
                got.append((False, error))
        ok, value = got[0]
        if not ok:
            raise value
        return value
    return call


def horovod_result(name, wait):
    """``wait()``, with Horovod's refusal of a collective that ranks issued differently
    (an allreduce on one rank, an allgather on another) turned into our error. Other
    failures (a rank died: what elastic Horovod recovers from) pass through unchanged."""
    try:
        return wait()
    except RuntimeError as e:  # HorovodInternalError
        if "Mismatched" not in str(e):
            raise
        raise HvdCompressError(
            f"the collective of parameter {name!r} failed: {e}. Ranks that compress it "
            "differently (spec, dtype, shape) cannot exchange it; use one compression spec "
            "on every rank") from e
