"""The tree transport: gTop-k's reduction and broadcast over mpi4py point-to-point messages.

:func:`tree_allreduce` runs one tensor's exchange (see :mod:`hvd_compress.core.gtopk` for
the algorithm and why nothing is lost): each rank receives its children's messages in
:func:`~hvd_compress.core.gtopk.schedule` order, merges their payloads into its own, sends
the result to its parent, and rank 0 broadcasts the final payload. Each message is a small
int64 status followed by a packed payload (24-byte header with the sender's fingerprints).

Every rank takes the same branch. A rank that finds its child's fingerprints differ from
its own (another spec, seed, shape or name: ranks that call tensors in another order) or
a malformed payload does not merge it, and passes the finding up in its status; a rank
whose gradient held a NaN or an infinity is listed there too, and so is a merge whose
sum was not finite (inf - inf, or a partial sum past the range of the tensor's dtype or
of a ``values=`` cast: partial sums travel in those). Rank 0 broadcasts the status with
the payload, so every rank raises the same error, or applies the same NaN update, at the
same tensor and step, and no rank stops moving its other tensors while others wait. (A
rank that raises before it reaches the tree, on input only it has, still leaves the
others waiting; the frontends check the ranks' fingerprints before anything moves.)

Messages travel on a duplicate of the user's communicator, so they never match the
user's own receives. Buffers go to MPI as in :mod:`hvd_compress.comm.mpi`: numpy arrays
and CPU tensors in place, device tensors through ``__cuda_array_interface__`` with
``cuda_aware=True``, staged through host memory otherwise.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..core.gtopk import merge, schedule
from ..core.ops import backend_for
from ..core.payload import FLAG_NONFINITE, HEADER_BYTES, STAMP_FIELDS, pack, read_header, unpack
from ..errors import HvdCompressError
from .mpi import _host_view

_TAG_STATUS, _TAG_PAYLOAD = 71, 72
_FOREIGN = 1 << len(STAMP_FIELDS)   # status bit: a payload that could not be read


class Merged(NamedTuple):
    """One tensor's result of the tree, the same on every rank except ``leftover``."""
    payload: object        # the merged k-sparse sum, as a payload like this rank's (None
    #                        when ranks disagree)
    leftover: list         # what merges on this rank dropped: (positions, values) pairs
    nonfinite: list        # ranks whose gradient held a NaN or an infinity
    overflow: bool         # a merge's sum was not finite (the step is void, as for a NaN)
    disagree: object       # None, or the error every rank raises (ranks configured apart)


class _Status:
    """What travels up with each payload and down with the result: the first pair of
    ranks found to disagree (child, parent, which fingerprints), the first rank whose
    merge overflowed, and the ranks whose gradient was not finite."""

    def __init__(self):
        self.child = self.parent = self.what = self.overflow = -1
        self.nonfinite: list = []

    def array(self):
        return np.array([self.child, self.parent, self.what, self.overflow,
                         *sorted(self.nonfinite)], np.int64)

    def absorb(self, a):
        if self.child < 0 and a[0] >= 0:
            self.child, self.parent, self.what = int(a[0]), int(a[1]), int(a[2])
        if self.overflow < 0 and a[3] >= 0:
            self.overflow = int(a[3])
        self.nonfinite += [int(r) for r in a[4:]]

    @property
    def void(self) -> bool:
        """Nothing more can be merged meaningfully (every rank raises or applies NaN)."""
        return self.child >= 0 or self.overflow >= 0


def tree_allreduce(comm, out, cuda_aware: bool = False) -> Merged:
    """Merge every rank's top-k payload ``out.payload`` (an :class:`Outgoing`) up the tree
    and broadcast the result; blocking, and every rank of ``comm`` must call it for the
    same tensor at the same point (the frontends go in sorted name order). Never raises
    for what the ranks sent: disagreements and non-finite values come back in the result,
    the same on every rank, so every rank moves every tensor of its step."""
    bk = backend_for(out.wire)
    rank, n = comm.Get_rank(), comm.Get_size()
    mine = current = out.payload
    status = _Status()
    if read_header(_head(bk, out.wire), out.name, rank).flags & FLAG_NONFINITE:
        status.nonfinite.append(rank)
    leftover = []
    for op, peer in schedule(rank, n):
        if op == "send":
            wire = out.wire if current is mine else pack(bk, current, out.stamp)
            _send(comm, status.array(), peer, _TAG_STATUS)
            _send_buffer(bk, comm, wire, peer, cuda_aware)
            break
        status.absorb(_recv(comm, peer, _TAG_STATUS, np.int64))
        buf = _recv_buffer(bk, comm, peer, out.wire, cuda_aware)
        if status.void:
            continue  # keep the message pattern intact; every rank learns why at the end
        theirs, why = _read(bk, buf, mine, out)
        if theirs is None:
            status.child, status.parent, status.what = peer, rank, why
            continue
        current, dropped = merge(bk, out.codec, current, theirs)
        if not (bk.all_finite(current.values) and bk.all_finite(dropped[1])):
            status.overflow = rank  # e.g. inf - inf, or a sum past a float16 cast's range
        leftover.append(dropped)
    # rank 0 broadcasts the status and the merged payload
    if rank == 0:
        head = status.array()
        final = out.wire if current is mine else pack(bk, current, out.stamp)
        sizes = np.array([head.size, bk.size(final)], np.int64)
    else:
        sizes, final = np.empty(2, np.int64), None
    comm.Bcast(sizes, root=0)
    if rank:
        head = np.empty(int(sizes[0]), np.int64)
    comm.Bcast(head, root=0)
    if rank:
        final = _bcast_buffer(bk, comm, None, int(sizes[1]), out.wire, cuda_aware)
    else:
        _bcast_buffer(bk, comm, final, int(sizes[1]), out.wire, cuda_aware)
    agreed = _Status()
    agreed.absorb(head)
    if agreed.child >= 0:  # rank 0's payload may not even fit this rank's layout
        return Merged(None, [], [], False,
                      _disagreement(out.name, agreed.child, agreed.parent, agreed.what))
    if rank:
        current = unpack(bk, final, mine, None, out.name)
    return Merged(current, leftover, agreed.nonfinite, agreed.overflow >= 0, None)


def _read(bk, buf, template, out):
    """(the child's payload, 0), or (None, status bits saying what differs)."""
    try:
        h = read_header(_head(bk, buf), out.name)
    except HvdCompressError:
        return None, _FOREIGN
    differ = sum(1 << i for i, (a, b) in enumerate(zip(h.stamp, out.stamp)) if a != b)
    if differ:
        return None, differ
    try:
        return unpack(bk, buf, template, None, out.name), 0
    except HvdCompressError:
        return None, _FOREIGN


def _disagreement(name, child, parent, what) -> str:
    fields = [f for i, f in enumerate(STAMP_FIELDS) if what & (1 << i)] or \
        ["payload layout"]
    return (f"tensor {name!r}: ranks disagree on the {' and '.join(fields)} of this tensor "
            f"(found where rank {child}'s payload merges into rank {parent}'s); every rank "
            "must compress it with the same spec, seed and shape, and exchange tensors in "
            "the same order")


def _head(bk, wire):
    return bk.to_numpy(wire[:HEADER_BYTES + 8] if bk.size(wire) >= HEADER_BYTES + 8 else wire)


def _send(comm, array, dest, tag):
    from mpi4py import MPI
    comm.Send([array, MPI.BYTE], dest=dest, tag=tag)


def _recv(comm, source, tag, dtype):
    from mpi4py import MPI
    st = MPI.Status()
    comm.Probe(source=source, tag=tag, status=st)
    buf = np.empty(st.Get_count(MPI.BYTE) // np.dtype(dtype).itemsize, dtype)
    comm.Recv([buf, MPI.BYTE], source=source, tag=tag)
    return buf


def _send_buffer(bk, comm, wire, dest, cuda_aware):
    from mpi4py import MPI
    send, _ = _host_view(bk, wire, cuda_aware)
    comm.Send([send, MPI.BYTE], dest=dest, tag=_TAG_PAYLOAD)


def _recv_buffer(bk, comm, source, like, cuda_aware):
    _, restore = _host_view(bk, like, cuda_aware)
    return restore(_recv(comm, source, _TAG_PAYLOAD, np.uint8))


def _bcast_buffer(bk, comm, wire, nbytes, like, cuda_aware):
    from mpi4py import MPI
    if wire is not None:
        send, _ = _host_view(bk, wire, cuda_aware)
        comm.Bcast([send, MPI.BYTE], root=0)
        return wire
    _, restore = _host_view(bk, like, cuda_aware)
    buf = np.empty(nbytes, np.uint8)
    comm.Bcast([buf, MPI.BYTE], root=0)
    return restore(buf)
