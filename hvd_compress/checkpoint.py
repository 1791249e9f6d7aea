"""Checkpoints of compression state when every rank holds its own.

Feedback state (EF residuals, EF21's local estimates, DIANA's shifts) differs from rank
to rank, so a compression's ``state_dict()`` says who wrote it (``format``, ``rank``,
``world_size``, ``spec``, ``seed``) and ``load_state_dict`` refuses, with
:class:`~hvd_compress.HvdCompressError`, a state holding another rank's feedback state or
written with another number of ranks. A state without feedback state (casts, top-k,
quantizers without a feedback stage) holds only step counters, which every rank shares,
and loads anywhere. The rules are in ``Exchange._check_checkpoint``.

One file per rank needs nothing from this module::

    torch.save({"model": model.state_dict(), "compression": comp.state_dict()},
               f"ckpt.rank{hvd.rank()}.pt")
    comp.load_state_dict(torch.load(f"ckpt.rank{hvd.rank()}.pt", weights_only=True)["compression"])

One file for all ranks (rank 0 writes, every rank reads)::

    from hvd_compress import checkpoint
    gathered = checkpoint.gather(comp)                  # collective: every rank calls it
    if hvd.rank() == 0:
        torch.save({"model": model.state_dict(), "compression": gathered}, "ckpt.pt")
    ...
    checkpoint.restore(comp, torch.load("ckpt.pt", weights_only=True)["compression"])

``gather`` works with ``hvd_compress.torch.Compression`` (over Horovod, or its mpi4py
``comm``), ``hvd_compress.tensorflow.Compression`` and ``comm.mpi.SparseAllreduce``.
TensorFlow's ``tf.train.Checkpoint`` takes ``comp.checkpointable()`` (see
:func:`trackable`). Importing this module needs only numpy.
"""
from __future__ import annotations

import functools
import io
import json
import pickle

import numpy as np

from .errors import HvdCompressError


def gather(compression, process_set=None) -> dict:
    """Every rank's ``compression.state_dict()``, as ``{rank: state}``, on every rank.

    Collective: every rank of the compression's group calls it (Horovod's allgather of
    pickled bytes, or the mpi4py comm's). Tensors come back on the host. Each rank ends up
    holding every rank's state: for large models, prefer one file per rank.

    Args:
      compression: a torch or TensorFlow ``Compression`` or a ``SparseAllreduce``.
      process_set: the Horovod process set it averages over, where the compression cannot
        tell (TensorFlow; torch before it is bound to its optimizer). Default: the
        optimizer's, else Horovod's global set.
    """
    group = _group_of(compression, process_set)
    if group is None:
        raise HvdCompressError(
            f"{compression!r} cannot tell its ranks: initialize Horovod (hvd.init()) or give "
            "the compression an mpi4py comm before gathering its state")
    states = group[2](map_tensors(compression.state_dict(), to_host))
    return dict(enumerate(states))


def restore(compression, saved, process_set=None, map_location=None):
    """Load this rank's part of what :func:`gather` returned (or one ``state_dict()``).

    A state with feedback state loads only on the rank and world size that wrote it. A
    state without loads anywhere, so ranks beyond those saved take the lowest saved
    rank's (every rank holds the same step counters). Every rank reading the same
    ``saved`` takes the same branch: all load, or all raise HvdCompressError.

    Args:
      compression: a torch or TensorFlow ``Compression``, a ``SparseAllreduce`` or an
        ``Exchange`` (whose rank is known).
      saved: ``{rank: state}`` from :func:`gather`, or one state.
      process_set: as in :func:`gather`.
      map_location: a torch device to move the state's tensors to (gathered tensors
        are on the CPU).
    """
    if isinstance(saved, dict) and "spec" not in saved:
        parts = saved
        if not parts or not all(isinstance(k, int) and isinstance(v, dict) and "spec" in v
                                for k, v in parts.items()):
            raise HvdCompressError(
                "restore() takes a state_dict() or gather()'s {rank: state_dict}, got a dict "
                f"with keys {sorted(map(repr, saved))[:5]}")
        ex = _exchange(compression, process_set)
        rank = getattr(ex, "rank", None)
        if rank is None:
            raise HvdCompressError(
                f"{compression!r} cannot tell which rank this is: initialize Horovod "
                "(hvd.init()) or give the compression an mpi4py comm before restoring")
        if rank in parts:
            saved = parts[rank]
        elif not any(s is not None for p in parts.values() for s in p["states"].values()):
            saved = parts[min(parts)]  # only step counters, the same on every rank
        else:
            raise HvdCompressError(
                f"the checkpoint holds the per-rank feedback state of ranks {sorted(parts)} "
                f"(of {parts[min(parts)].get('world_size')}); this is rank {rank} of "
                f"{getattr(ex, 'world_size', None)}: feedback state does not carry over to "
                "another number of ranks (resume with the saved number, or keep only the "
                "step counters by loading dict(state, states={}) of any rank)")
    if map_location is not None:
        saved = map_tensors(saved, lambda t: t.to(map_location) if hasattr(t, "to") else t)
    if process_set is None:
        compression.load_state_dict(saved)
    else:
        compression.load_state_dict(saved, process_set=process_set)


def trackable(compression, process_set=None):
    """A ``tf.train.Checkpoint`` dependency holding a TensorFlow ``Compression``'s state
    (what ``comp.checkpointable()`` returns)::

        ckpt = tf.train.Checkpoint(model=model, optimizer=opt,
                                   compression=comp.checkpointable())
        ckpt.write(f"ckpt/rank{hvd.rank()}")     # one checkpoint per rank
        ckpt.restore(f"ckpt/rank{hvd.rank()}")   # any time: before the first step too

    It is a ``tf.train.experimental.PythonState``: saving serializes ``state_dict()``
    (numpy arrays and JSON in a string tensor; nothing is pickled), restoring calls
    ``load_state_dict`` with its rank checks, right when ``restore`` runs. Step counters and
    feedback variables not created yet take the restored values when the first step
    creates them, so restoring is bit-exact either way.

    For one checkpoint for all ranks, call ``.gather()`` on every rank right before rank 0
    saves: that save then holds every rank's state, and each rank restores its own part::

        comp.checkpointable().gather()          # every rank
        if hvd.rank() == 0:
            ckpt.write("ckpt/all")
        ckpt.read("ckpt/all")                   # every rank
    """
    return _trackable_class()(compression, process_set)


# -- the group a frontend averages over ----------------------------------------------


def sync_group(frontend, process_set=None):
    """``frontend.exchange``, told its rank and world size by the frontend where no
    exchange has yet (or where ``process_set`` is given)."""
    ex = frontend.exchange
    if process_set is not None or getattr(ex, "rank", None) is None or \
            getattr(ex, "world_size", None) is None:
        group = frontend._group(process_set)
        if group is not None:
            ex.set_group(group[0], group[1])
    return ex


def _group_of(compression, process_set):
    find = getattr(compression, "_group", None)
    if find is None:
        raise HvdCompressError(
            f"{type(compression).__name__} is not a hvd_compress torch or TensorFlow "
            "Compression nor a SparseAllreduce")
    return find(process_set)


def _exchange(compression, process_set):
    """The exchange behind ``compression``, with its rank known where it can be."""
    if hasattr(compression, "_group"):
        return sync_group(compression, process_set)
    return compression  # an Exchange


def allgather_objects(allgather):
    """An allgather of picklable objects built on ``allgather(array, name)``, which
    concatenates every rank's 1-D numpy array (Horovod's allgather): the byte counts
    first, then the pickled bytes."""
    def gathered(obj):
        data = np.frombuffer(pickle.dumps(obj, protocol=4), np.uint8).copy()
        sizes = allgather(np.array([data.size], np.int64), "hvd_compress.checkpoint.sizes")
        flat = allgather(data, "hvd_compress.checkpoint.bytes")
        ends = np.cumsum(sizes)
        return [pickle.loads(flat[e - n:e].tobytes()) for n, e in zip(sizes, ends)]
    return gathered


# -- tensors inside states ----------------------------------------------------------


def map_tensors(obj, fn):
    """``obj`` with ``fn`` applied to every tensor or array in its dicts."""
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return fn(obj) if _is_tensor(obj) else obj


def to_host(t):
    """A tensor on the host: torch tensors on the CPU, TensorFlow tensors as numpy."""
    if hasattr(t, "cpu") and hasattr(t, "detach"):
        return t.detach().cpu()
    return t.numpy() if hasattr(t, "numpy") and not isinstance(t, np.ndarray) else t


def _is_tensor(x):
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, np.generic)


def encode(obj) -> bytes:
    """Nested dicts of arrays, numbers, strings and None as bytes: an ``.npz`` whose
    arrays are the tensors and whose ``meta`` entry is the structure in JSON. Loading it
    runs no pickle."""
    arrays = []

    def walk(x):
        if isinstance(x, dict):  # pairs keep integer keys (gather's ranks) integers
            return {"dict": [[k, walk(v)] for k, v in x.items()]}
        if _is_tensor(x) or isinstance(x, np.generic):
            arrays.append(np.asarray(to_host(x)))
            return {"array": len(arrays) - 1}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise HvdCompressError(f"cannot checkpoint a {type(x).__name__}: {x!r}")

    meta = np.array(json.dumps(walk(obj)))  # fills ``arrays``
    buf = io.BytesIO()
    np.savez(buf, *arrays, meta=meta)
    return buf.getvalue()


def decode(data: bytes):
    """What :func:`encode` was given (arrays as numpy arrays)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        def walk(x):
            if isinstance(x, dict):
                if "array" in x:
                    return npz[f"arr_{x['array']}"]
                return {k: walk(v) for k, v in x["dict"]}
            return x
        return walk(json.loads(str(npz["meta"])))


@functools.lru_cache(maxsize=None)
def _trackable_class():
    import tensorflow as tf

    class CompressionState(tf.train.experimental.PythonState):
        """A Compression's state inside ``tf.train.Checkpoint`` (see :func:`trackable`)."""

        def __init__(self, compression, process_set=None):
            super().__init__()
            self.compression, self.process_set = compression, process_set
            self._gathered = None

        def gather(self, root=0):
            """Collective: every rank's state, now. Rank ``root``, the one that saves,
            keeps it for its next save; the others keep nothing (their own saves stay
            per rank)."""
            gathered = gather(self.compression, self.process_set)
            mine = _exchange(self.compression, self.process_set).rank
            self._gathered = gathered if mine == root else None
            return self

        def serialize(self):
            saved = self._gathered
            self._gathered = None
            return encode(self.compression.state_dict() if saved is None else saved)

        def deserialize(self, string_value):
            restore(self.compression, decode(string_value), self.process_set)

    return CompressionState
