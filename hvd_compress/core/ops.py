"""Backend adapters: the few array operations the compression math needs.

The math in :mod:`hvd_compress.core` is written once against :class:`Backend` and runs on
numpy arrays, torch tensors (any device) and TensorFlow tensors (eager or inside
``tf.function``). A backend is chosen from the tensor's type by looking only at modules
that are already imported, so the core never imports a framework the user did not.

Conventions shared by every backend:

* indices are int64 inside the core (cast to int32 only on the wire);
* dtypes are named by strings (``"float32"``, ``"bfloat16"``, ...). numpy has no bfloat16,
  so the numpy backend stores bfloat16 as its raw ``uint16`` bit pattern;
* nothing leaves the tensor's device: no host copies on the hot path.
"""
from __future__ import annotations

import functools
import sys
import threading
from typing import Any, Callable

import numpy as np

from ..errors import HvdCompressError

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
_NP_DTYPES = {
    "float16": np.float16, "float32": np.float32, "float64": np.float64,
    "bfloat16": np.uint16, "uint8": np.uint8, "int32": np.int32, "int64": np.int64,
    "uint16": np.uint16, "bool": np.bool_,
}
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "uint8": 1,
            "int32": 4, "int64": 8, "uint16": 2}


class Backend:
    """Array operations for one framework. Subclasses implement every method."""

    name = "abstract"
    #: whether tensors change in place (numpy, torch); TensorFlow's are immutable, so the
    #: ``_``/``_into`` methods below return new tensors there
    mutable = False

    def eager(self) -> bool:
        """Whether Python control flow may look at tensor values (false in tf.function)."""
        return True

    def cond(self, pred, if_true, if_false):
        """``if_true()`` or ``if_false()`` by ``pred``: a Python branch eagerly, a graph
        conditional inside ``tf.function``."""
        return if_true() if pred else if_false()

    # -- shape and dtype -------------------------------------------------------------
    def shape(self, x): raise NotImplementedError
    def dtype(self, x) -> str: raise NotImplementedError
    def reshape(self, x, shape): raise NotImplementedError
    def astype(self, x, dtype: str): raise NotImplementedError
    def bitcast(self, x, dtype: str): raise NotImplementedError
    def scaled(self, x, factor: float, dtype: str):
        """``x * factor``, computed in x's dtype and stored as ``dtype``, in one call
        that writes the product into a tensor of ``dtype`` where the framework can."""
        return self.astype(x * factor, dtype)

    def power_of_two(self, n):
        """2**n, exactly: a float for an int ``n`` (a graph's int32 tensor ``n`` gives a
        float32 tensor, exact from -126 to 127 and meaningless outside, which auto's cast
        never leaves: its shifts stay within 2^±100; see TensorflowBackend)."""
        return float(2.0 ** n)

    def size(self, x) -> int:
        n = 1
        for s in self.shape(x):
            n *= int(s)
        return n

    def flatten(self, x):
        return self.reshape(x, (-1,))
    def detached(self, x):
        """x without its autograd history (compression is not differentiated)."""
        return x

    # -- construction ----------------------------------------------------------------
    def zeros(self, n: int, dtype: str, like): raise NotImplementedError
    def arange(self, n: int, like, dtype: str = "int64", out=None, start: int = 0):
        """start, start + 1, ..., start + n - 1; in ``out``'s memory where the framework
        allows."""
        raise NotImplementedError
    def constant(self, values, dtype: str, like):
        """A tensor of ``values`` (host data) on ``like``'s device. On an accelerator it is
        made once and shared (a copy from the host waits for the device): never modify a
        constant in place."""
        raise NotImplementedError
    def concat(self, xs): raise NotImplementedError

    # -- elementwise and reductions ----------------------------------------------------
    def abs(self, x): raise NotImplementedError
    def floor(self, x): raise NotImplementedError
    def log(self, x): raise NotImplementedError
    def cos(self, x): raise NotImplementedError
    def where(self, cond, a, b): raise NotImplementedError
    def sum(self, x): raise NotImplementedError
    def sum_rows(self, x): raise NotImplementedError
    def row_norms(self, x):
        """The l2 norm of each row of the 2-D x, read in one pass where the framework can."""
        return self.sum_rows(x * x) ** 0.5
    def max(self, x): raise NotImplementedError
    def min(self, x): raise NotImplementedError

    # -- non-finite values -------------------------------------------------------------
    def all_finite(self, x):
        """Whether no entry is NaN or infinite: a Python bool eagerly (a read on the host),
        a tensor in a graph."""
        return bool(self.finite_flag(x)) if self.eager() else self.finite_flag(x)
    def finite_flag(self, x):
        """Whether no entry is NaN or infinite, as a boolean scalar of the framework left
        on the device (reading it is the caller's choice; on a CPU it may be a bool
        already). One pass over x."""
        raise NotImplementedError
    def finite_or_zero(self, x):
        """x with every NaN and infinity replaced by 0."""
        raise NotImplementedError
    def isfinite(self, x): raise NotImplementedError
    def nan_like(self, x):
        """A tensor shaped like x, every entry NaN."""
        return x * float("nan")

    # -- selection -------------------------------------------------------------------
    def nonzero(self, mask): raise NotImplementedError
    def nonzero_exactly(self, mask, k: int):
        """Ascending positions of the true entries of a mask made to hold exactly k of
        them: an output size known in advance, so a GPU need not report it to the host.
        Where a NaN left fewer (its step is void), the rest are position 0."""
        pos = self.nonzero(mask)
        n = self.size(pos)
        return pos if n == k else pos[:k] if n > k else \
            self.concat([pos, self.zeros(k - n, "int64", pos)])
    def extremes(self, x) -> tuple:
        """(least, largest) entry of x as Python floats, in one read (NaN where x holds
        one; (0.0, 0.0) for an empty x)."""
        if self.size(x) == 0:
            return 0.0, 0.0
        return float(self.min(x)), float(self.max(x))
    def contiguous(self, x) -> bool:
        """Whether x's entries lie in its memory in order (an in-place result then has
        the layout a collective needs)."""
        return True
    def in_order(self, x):
        """x, or a copy of it whose entries lie in memory in order (collectives need it:
        a channels_last gradient's do not)."""
        return x
    def avoids_syncs(self, x) -> bool:
        """Whether work on x should take the branch without host synchronisations where
        one exists (values read on the host, outputs sized by the data): true for tensors
        on an accelerator, where each such read stalls the host until the device is done.
        """
        return False
    def unique(self, x):
        """(the sorted distinct values of the 1-D int tensor x, each entry's position
        among them)."""
        raise NotImplementedError
    def gather(self, x, idx): raise NotImplementedError
    def topk_values(self, x, k: int): raise NotImplementedError
    def topk_positions(self, x, k: int):
        """Ascending positions of the k largest entries, ties toward lower positions, from
        the framework's own top-k; None where it does not promise that tie rule (for
        this input: a tie at the k-th value or a NaN, where torch checks)."""
        return None
    def cumsum(self, x): raise NotImplementedError
    def scatter_add(self, n: int, idx, values): raise NotImplementedError
    def zeros_in(self, x):
        """Zeros shaped like x, in x's memory where the framework allows (else fresh)."""
        raise NotImplementedError
    def scatter_add_into(self, out, idx, values):
        """out + the values scattered at idx (positions distinct); may reuse out."""
        raise NotImplementedError
    def scale_at(self, out, idx, factor: float):
        """out with the entries at idx multiplied by factor (idx may repeat); may reuse out."""
        raise NotImplementedError
    def copy(self, x):
        """A tensor equal to x that shares no memory with it (immutable tensors: x)."""
        raise NotImplementedError
    def count(self, mask) -> int: raise NotImplementedError

    # -- integer bit ops (int64, values kept in [0, 2**32)) ----------------------------
    def xor(self, a, b): raise NotImplementedError
    def band(self, a, b): raise NotImplementedError
    def bor(self, a, b): raise NotImplementedError
    def rshift(self, a, s): raise NotImplementedError   # s: an int or a tensor of shifts
    def lshift(self, a, s: int): raise NotImplementedError

    # -- in the first argument's memory, where the framework allows (see also :meth:`into`):
    # -- callers pass only tensors they made (a fresh tensor of the model's size costs a pass)
    def mul_(self, a, c): return a * c
    def add_(self, a, b): return a + b
    def overwrite(self, a, b):
        """b's values in a's memory where the framework allows (else a copy of b)."""
        return self.copy(b)
    def put_(self, out, idx, values):
        """out with ``values`` written at the distinct positions idx, in its memory (only
        for mutable backends)."""
        raise NotImplementedError

    # -- working memory: a chain of elementwise steps over a few reused tensors ----------
    def keeps_memory(self, like) -> bool:
        """Whether memory is worth keeping from step to step on ``like``'s device: where
        fresh memory costs (a CPU maps and zeroes each new tensor above 32 MB, which
        costs as much as five passes over it), not where an accelerator's caching
        allocator reuses memory already, nor where tensors are immutable."""
        return False
    def scratch(self, slot: str, n, dtype: str, like):
        """Memory for n entries of ``dtype`` on ``like``'s device, with undefined values,
        for a computation to write and read back before it returns. Where the backend
        :meth:`keeps_memory`, every call with the same ``slot`` on a thread gets the same
        memory, kept at the largest size asked for; elsewhere a new tensor. None where
        tensors are immutable: :meth:`into` ignores it there. Whatever returns to a
        caller must not share it, and two tensors alive at once need two slots."""
        return None
    def block_size(self, like):
        """Entries per block where a chain of elementwise steps runs block by block (on a
        CPU: blocks whose working tensors stay in a core's cache between the steps; the
        random draws run 2x faster in blocks of 2**18 entries than over 10M at once),
        or None: the whole tensor at once (accelerators, graphs)."""
        return None
    def blocks(self, n, like, align: int = 1) -> list:
        """The (start, stop) ranges, in order, that such a chain over n entries runs
        over: blocks of :meth:`block_size` entries (a multiple of ``align``, so that no
        group of ``align`` entries straddles two), or the whole (0, n)."""
        size = self.block_size(like)
        if size is None or not isinstance(n, int) or n <= size:
            return [(0, n)]
        size = max(align, size - size % align)
        return [(a, min(a + size, n)) for a in range(0, n, size)]
    def into(self, out, op: str, *args):
        """The elementwise ``op`` of :data:`ELEMENTWISE` applied to args, written into
        ``out``'s memory where the framework allows (out may be an argument; None: a new
        tensor), with out's dtype."""
        return ELEMENTWISE[op](self, *args)
    def cast_into(self, out, x, dtype: str):
        """x converted to ``dtype``, in ``out``'s memory where the framework allows."""
        return self.astype(x, dtype)

    def to_numpy(self, x) -> np.ndarray: raise NotImplementedError
    def from_numpy(self, a, like): raise NotImplementedError
    def host_view(self, x):
        """A numpy array over x's own memory where selecting there is faster than in the
        framework (see :meth:`TorchBackend.host_view`), else None."""
        return None
    def from_host(self, a, like):
        """The framework's tensor over the numpy array ``a``'s memory (no copy)."""
        return self.from_numpy(a, like)


#: the operations :meth:`Backend.into` knows, as the immutable backends compute them
ELEMENTWISE: dict[str, Callable[..., Any]] = {
    "abs": lambda bk, x: bk.abs(x),
    "floor": lambda bk, x: bk.floor(x),
    "add": lambda bk, a, b: a + b,
    "sub": lambda bk, a, b: a - b,
    "mul": lambda bk, a, b: a * b,
    "div": lambda bk, a, b: a / b,
    "lt": lambda bk, a, b: a < b,
    "clamp_max": lambda bk, a, high: bk.where(a > high, a * 0 + high, a),
    "clamp_min": lambda bk, a, low: bk.where(a < low, a * 0 + low, a),
    "band": lambda bk, a, b: bk.band(a, b),
    "bor": lambda bk, a, b: bk.bor(a, b),
    "xor": lambda bk, a, b: bk.xor(a, b),
    "rshift": lambda bk, a, s: bk.rshift(a, s),
    "lshift": lambda bk, a, s: bk.lshift(a, s),
}


_CPU_BLOCK = 1 << 18


class _Arena(threading.local):
    """Per-thread scratch buffers, keyed by (slot, dtype)."""

    def __init__(self):
        self.buffers: dict = {}

    def get(self, key, n: int, make):
        buf = self.buffers.get(key)
        if buf is None or buf.shape[0] < n:
            buf = self.buffers[key] = make(n)
        return buf[:n]


class NumpyBackend(Backend):
    name = "numpy"
    mutable = True

    def shape(self, x): return tuple(x.shape)
    def dtype(self, x): return np.dtype(x.dtype).name
    def reshape(self, x, shape): return np.reshape(x, shape)
    def astype(self, x, dtype):
        if dtype == "bfloat16":
            return _np_to_bf16(x)
        if self.dtype(x) == "uint16" and dtype in FLOAT_DTYPES:
            # numpy stores bfloat16 as uint16 bits
            return (x.astype(np.uint32) << 16).view(np.float32).astype(_NP_DTYPES[dtype])
        return x.astype(_NP_DTYPES[dtype], copy=False)
    def bitcast(self, x, dtype): return np.ascontiguousarray(x).view(_NP_DTYPES[dtype])
    def scaled(self, x, factor, dtype):
        return np.multiply(x, x.dtype.type(factor), out=np.empty(x.shape, _NP_DTYPES[dtype]),
                           casting="same_kind")
    def zeros(self, n, dtype, like): return np.zeros(n, _NP_DTYPES[dtype])
    def arange(self, n, like, dtype="int64", out=None, start=0):
        if out is None:
            return np.arange(start, start + n, dtype=_NP_DTYPES[dtype])
        out[:] = np.arange(start, start + n, dtype=out.dtype)
        return out
    def constant(self, values, dtype, like): return np.asarray(values, _NP_DTYPES[dtype])
    def concat(self, xs): return np.concatenate(xs)
    def abs(self, x): return np.abs(x)
    def floor(self, x): return np.floor(x)
    def log(self, x): return np.log(x)
    def cos(self, x): return np.cos(x)
    def where(self, cond, a, b): return np.where(cond, a, b)
    def sum(self, x): return x.sum()
    def sum_rows(self, x): return x.sum(axis=1)
    def max(self, x): return x.max()
    def min(self, x): return x.min()
    def finite_flag(self, x):
        # one read: a sum is finite exactly when no entry is NaN or infinite, unless
        # finite entries overflow it; only then look at every entry
        wide = np.float32 if x.dtype.itemsize < 4 else None  # 16-bit sums overflow early
        with np.errstate(over="ignore", invalid="ignore"):
            return np.bool_(np.isfinite(x.sum(dtype=wide)) or np.isfinite(x).all())
    def isfinite(self, x): return np.isfinite(x)
    def finite_or_zero(self, x): return np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    def nonzero(self, mask): return np.flatnonzero(mask).astype(np.int64, copy=False)
    def unique(self, x):
        values, inverse = np.unique(x, return_inverse=True)
        return values, inverse.reshape(-1).astype(np.int64)
    def gather(self, x, idx): return x.take(idx, axis=0)
    def topk_values(self, x, k):
        return -np.sort(-np.partition(x, len(x) - k)[len(x) - k:])
    def cumsum(self, x): return np.cumsum(x)
    def scatter_add(self, n, idx, values):
        out = np.zeros(n, values.dtype)
        np.add.at(out, idx, values)
        return out
    def zeros_in(self, x):
        x.fill(0)
        return x
    def scatter_add_into(self, out, idx, values):
        np.add.at(out, idx, values)
        return out
    def scale_at(self, out, idx, factor):
        out[idx] = out[idx] * out.dtype.type(factor)
        return out
    def copy(self, x): return x.copy()
    def count(self, mask): return int(np.count_nonzero(mask))
    def xor(self, a, b): return np.bitwise_xor(a, b)
    def band(self, a, b): return np.bitwise_and(a, np.asarray(b, a.dtype))
    def bor(self, a, b): return np.bitwise_or(a, b)
    def rshift(self, a, s): return np.right_shift(a, np.asarray(s, a.dtype))
    def lshift(self, a, s): return np.left_shift(a, np.asarray(s, a.dtype))
    def mul_(self, a, c): return np.multiply(a, np.asarray(c, a.dtype), out=a)
    def add_(self, a, b): return np.add(a, b, out=a)
    def overwrite(self, a, b):
        np.copyto(a, b)
        return a
    def contiguous(self, x): return bool(x.flags.c_contiguous)
    def in_order(self, x): return np.ascontiguousarray(x)
    def put_(self, out, idx, values):
        out[idx] = values
        return out
    def to_numpy(self, x): return np.asarray(x)
    def from_numpy(self, a, like): return np.asarray(a)
    _arena = _Arena()
    def block_size(self, like): return _CPU_BLOCK
    def keeps_memory(self, like): return True
    def scratch(self, slot, n, dtype, like):
        t = _NP_DTYPES[dtype]
        return self._arena.get((slot, dtype), n, lambda m: np.empty(m, t))
    _UFUNCS = {"abs": np.abs, "floor": np.floor, "add": np.add, "sub": np.subtract,
               "mul": np.multiply, "div": np.divide, "lt": np.less,
               "clamp_max": np.minimum, "clamp_min": np.maximum,
               "band": np.bitwise_and, "bor": np.bitwise_or, "xor": np.bitwise_xor,
               "rshift": np.right_shift, "lshift": np.left_shift}
    def into(self, out, op, *args):
        if out is None:
            return self._UFUNCS[op](*args)
        return self._UFUNCS[op](*args, out=out, casting="unsafe")
    def cast_into(self, out, x, dtype):
        if out is None:
            return self.astype(x, dtype)
        np.copyto(out, x, casting="unsafe")
        return out


def _np_to_bf16(x):
    """float -> bfloat16 bits (round to nearest even), as numpy uint16."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = np.isnan(np.asarray(x, dtype=np.float32))
    out = rounded.astype(np.uint16)
    out[nan] = 0x7FC0
    return out


class TorchBackend(Backend):
    name = "torch"
    mutable = True

    def __init__(self):
        import torch
        self.t = torch
        self._dt = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                    "float32": torch.float32, "float64": torch.float64,
                    "uint8": torch.uint8, "int32": torch.int32, "int64": torch.int64,
                    "uint16": torch.int16, "bool": torch.bool}
        self._constants: dict = {}  # (values, dtype, device) -> tensor, on accelerators
        # what host_view hands to numpy: gradients, and rand-k's random keys
        self._host_dtypes = (torch.float32, torch.float64, torch.int32)
        self._ops = {"abs": torch.abs, "floor": torch.floor, "add": torch.add,
                     "sub": torch.sub, "mul": torch.mul, "div": torch.div, "lt": torch.lt,
                     "clamp_max": torch.clamp_max, "clamp_min": torch.clamp_min,
                     "band": torch.bitwise_and,
                     "bor": torch.bitwise_or, "xor": torch.bitwise_xor,
                     "rshift": torch.bitwise_right_shift, "lshift": torch.bitwise_left_shift}
        version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
        # torch.nonzero_static: since 2.1 on CPU tensors, 2.6 on CUDA ones
        self._static_nonzero = {"cpu": version >= (2, 1), "cuda": version >= (2, 6)}

    def shape(self, x): return tuple(x.shape)
    def dtype(self, x): return str(x.dtype).replace("torch.", "")
    def reshape(self, x, shape): return x.reshape(shape)
    def detached(self, x): return x.detach()
    def astype(self, x, dtype):
        t = self._dt[dtype]
        return x if x.dtype == t else x.to(t)
    def scaled(self, x, factor, dtype):
        # the product's dtype is x's (a Python float does not promote it); out= casts
        out = self.t.empty(x.shape, dtype=self._dt[dtype], device=x.device)
        return self.t.mul(x, factor, out=out)
    def bitcast(self, x, dtype):
        x = x.contiguous()
        if x.storage_offset() * x.element_size() % ITEMSIZE[dtype]:
            x = x.clone()  # a slice of a gathered byte buffer, at an unaligned byte
        return x.view(self._dt[dtype])
    def zeros(self, n, dtype, like):
        return self.t.zeros(n, dtype=self._dt[dtype], device=like.device)
    def arange(self, n, like, dtype="int64", out=None, start=0):
        if out is not None:
            return self.t.arange(start, start + n, out=out)
        return self.t.arange(start, start + n, dtype=self._dt[dtype], device=like.device)
    def constant(self, values, dtype, like):
        if not self.avoids_syncs(like):
            return self.t.tensor(values, dtype=self._dt[dtype], device=like.device)
        key = (tuple(values) if isinstance(values, list) else values, dtype, like.device)
        made = self._constants.get(key)
        if made is None:  # headers and shifts: a few per tensor, made at its first step
            if len(self._constants) >= 4096:
                self._constants.clear()
            made = self._constants[key] = self.t.tensor(values, dtype=self._dt[dtype],
                                                        device=like.device)
        return made
    def concat(self, xs): return self.t.cat(xs)
    def abs(self, x): return x.abs()
    def floor(self, x): return x.floor()
    def log(self, x): return x.log()
    def cos(self, x): return x.cos()
    def where(self, cond, a, b): return self.t.where(cond, a, b)
    def sum(self, x): return x.sum()
    def sum_rows(self, x): return x.sum(axis=1)
    def row_norms(self, x): return self.t.linalg.vector_norm(x, dim=1)
    def max(self, x): return x.max()
    def min(self, x): return x.min()
    def finite_flag(self, x):
        if not self.avoids_syncs(x) and x.element_size() >= 4:
            # on a CPU a read costs nothing: the fewest operations (a 16-bit sum would
            # overflow early, and widening it costs more than the extremes)
            return bool(self.t.isfinite(x.sum())) or bool(self.t.isfinite(x).all())
        # the extremes: NaN propagates through min and max; no overflow
        if x.numel() == 0:
            return self.t.ones((), dtype=self.t.bool, device=x.device)
        lo, hi = self.t.aminmax(x)
        return self.t.isfinite(lo) & self.t.isfinite(hi)
    def isfinite(self, x): return self.t.isfinite(x)
    def finite_or_zero(self, x): return self.t.nan_to_num(x, 0.0, 0.0, 0.0)
    def nan_like(self, x): return self.t.full_like(x, float("nan"))
    def nonzero(self, mask): return self.t.nonzero(mask).reshape(-1)
    def nonzero_exactly(self, mask, k):
        if not self._static_nonzero.get(mask.device.type, False):
            return super().nonzero_exactly(mask, k)
        return self.t.nonzero_static(mask, size=k, fill_value=0).reshape(-1)
    #: take the accelerator's branch on CPU tensors too (benchmarks/host_syncs.py counts
    #: it there; tests compare it with the CPU branch)
    avoid_syncs_on_cpu = False
    def avoids_syncs(self, x): return x.device.type == "cuda" or self.avoid_syncs_on_cpu
    def unique(self, x): return self.t.unique(x, sorted=True, return_inverse=True)
    def gather(self, x, idx): return x[idx]
    def topk_values(self, x, k): return self.t.topk(x, k, sorted=True).values
    def topk_positions(self, x, k):
        # torch promises no tie rule, but where the (k+1)-th value is below the k-th the
        # k largest are one set whatever it does; finding out is a read on the host,
        # free on a CPU (elsewhere the caller's compare and prefix count need none)
        n = x.numel()
        if self.avoids_syncs(x) or k >= n:
            return None
        values, positions = self.t.topk(x, k + 1, sorted=True)
        if not bool(values[k] < values[k - 1]) or bool(values[0].isnan()):
            return None  # a tie at the edge, or a NaN (which torch ranks first)
        return positions[:k].sort().values
    def cumsum(self, x): return self.t.cumsum(x, 0)
    def scatter_add(self, n, idx, values):
        out = self.t.zeros(n, dtype=values.dtype, device=values.device)
        return out.index_add_(0, idx, values)
    def zeros_in(self, x): return x.zero_()
    def scatter_add_into(self, out, idx, values): return out.index_add_(0, idx, values)
    def scale_at(self, out, idx, factor): return out.index_put_((idx,), out[idx] * factor)
    def copy(self, x): return x.clone()
    def count(self, mask): return int(self.t.count_nonzero(mask))
    def xor(self, a, b): return self.t.bitwise_xor(a, b)
    def band(self, a, b): return self.t.bitwise_and(a, b)
    def bor(self, a, b): return self.t.bitwise_or(a, b)
    def rshift(self, a, s): return self.t.bitwise_right_shift(a, s)
    def lshift(self, a, s): return self.t.bitwise_left_shift(a, s)
    def mul_(self, a, c): return a.mul_(c)
    def add_(self, a, b): return a.add_(b)
    def overwrite(self, a, b): return a.copy_(b)
    def put_(self, out, idx, values): return out.index_put_((idx,), values)
    def contiguous(self, x): return x.is_contiguous()
    def extremes(self, x):
        if x.numel() == 0:
            return 0.0, 0.0
        lo, hi = self.t.aminmax(x.reshape(-1))
        return tuple(self.t.stack([lo, hi]).double().tolist())  # one read
    def in_order(self, x): return x.contiguous()
    def to_numpy(self, x):
        if x.dtype == self.t.bfloat16:
            return x.view(self.t.int16).cpu().numpy().view(np.uint16)
        return x.detach().cpu().numpy()
    def from_numpy(self, a, like):
        return self.t.from_numpy(np.ascontiguousarray(a)).to(like.device)
    #: the most intra-op threads at which numpy's selection beats torch's on a CPU
    host_threads = 2
    def host_view(self, x):
        # on a CPU, torch's compare and nonzero run 2x (80k entries) to 3x (10M) slower
        # than numpy's at one or two threads, where data-parallel ranks usually run (both
        # measured on the CI machine); the view shares x's memory, so nothing is copied
        if x.device.type != "cpu" or x.dtype not in self._host_dtypes or \
                not x.is_contiguous() or x.requires_grad or self.avoid_syncs_on_cpu or \
                self.t.get_num_threads() > self.host_threads:
            return None
        return x.numpy()
    def from_host(self, a, like): return self.t.from_numpy(a)
    _arena = _Arena()
    def block_size(self, like): return _CPU_BLOCK if like.device.type == "cpu" else None
    def keeps_memory(self, like): return like.device.type == "cpu"
    def scratch(self, slot, n, dtype, like):
        def make(m):
            return self.t.empty(m, dtype=self._dt[dtype], device=like.device)
        if not self.keeps_memory(like):
            return make(n)
        return self._arena.get((slot, dtype), n, make)
    def into(self, out, op, *args):
        if op == "lt" and out is not None and out.device.type == "cpu":
            # torch's compares into bool run 2-4x slower than numpy's on a CPU at one or
            # two threads; numpy's work on the tensors' own memory
            views = [a if not isinstance(a, self.t.Tensor) else self.host_view(a)
                     for a in args]
            if all(v is not None for v in views):
                np.less(*views, out=out.numpy())
                return out
        fn = self._ops[op]
        return fn(*args) if out is None else fn(*args, out=out)
    def cast_into(self, out, x, dtype):
        return self.astype(x, dtype) if out is None else out.copy_(x)


class TensorflowBackend(Backend):
    name = "tensorflow"

    def __init__(self):
        import tensorflow as tf
        self.tf = tf
        self._dt = {"float16": tf.float16, "bfloat16": tf.bfloat16, "float32": tf.float32,
                    "float64": tf.float64, "uint8": tf.uint8, "int32": tf.int32,
                    "int64": tf.int64, "uint16": tf.uint16, "bool": tf.bool}

    def eager(self): return self.tf.executing_eagerly()
    def cond(self, pred, if_true, if_false):
        if isinstance(pred, bool):
            return if_true() if pred else if_false()
        return self.tf.cond(pred, if_true, if_false)

    def shape(self, x):
        s = x.shape
        if s.rank is not None and all(d is not None for d in s):
            return tuple(int(d) for d in s)
        return tuple(self.tf.unstack(self.tf.shape(x)))
    def size(self, x):
        if x.shape.is_fully_defined():
            return int(x.shape.num_elements())
        return self.tf.size(x, out_type=self.tf.int64)
    def dtype(self, x): return x.dtype.name
    def reshape(self, x, shape): return self.tf.reshape(x, shape)
    def astype(self, x, dtype): return self.tf.cast(x, self._dt[dtype])
    def power_of_two(self, n):
        if isinstance(n, int):
            return float(2.0 ** n)
        tf = self.tf  # the float32 whose exponent bits are n's: exact, unlike a pow
        return tf.bitcast(tf.bitwise.left_shift(tf.cast(n, tf.int32) + 127, 23), tf.float32)
    def bitcast(self, x, dtype):
        tf = self.tf
        src, dst = ITEMSIZE[x.dtype.name], ITEMSIZE[dtype]
        if src == dst:
            return tf.bitcast(x, self._dt[dtype])
        if src > dst:
            return tf.reshape(tf.bitcast(x, self._dt[dtype]), (-1,))
        return tf.bitcast(tf.reshape(x, (-1, dst // src)), self._dt[dtype])
    def zeros(self, n, dtype, like): return self.tf.zeros((n,), self._dt[dtype])
    def arange(self, n, like, dtype="int64", out=None, start=0):
        return self.tf.range(start, start + n, dtype=self._dt[dtype])
    def constant(self, values, dtype, like): return self.tf.constant(values, self._dt[dtype])
    def concat(self, xs): return self.tf.concat(xs, 0)
    def abs(self, x): return self.tf.abs(x)
    def floor(self, x): return self.tf.floor(x)
    def log(self, x): return self.tf.math.log(x)
    def cos(self, x): return self.tf.math.cos(x)
    def where(self, cond, a, b): return self.tf.where(cond, a, b)
    def sum(self, x): return self.tf.reduce_sum(x)
    def sum_rows(self, x): return self.tf.reduce_sum(x, axis=1)
    def max(self, x): return self.tf.reduce_max(x)
    def min(self, x): return self.tf.reduce_min(x)
    def finite_flag(self, x): return self.tf.reduce_all(self.tf.math.is_finite(x))
    def isfinite(self, x): return self.tf.math.is_finite(x)
    def finite_or_zero(self, x):
        return self.tf.where(self.tf.math.is_finite(x), x, self.tf.zeros_like(x))
    def nan_like(self, x):
        return self.tf.fill(self.tf.shape(x), self.tf.constant(float("nan"), x.dtype))
    def nonzero(self, mask): return self.tf.reshape(self.tf.where(mask), (-1,))
    def unique(self, x):
        tf = self.tf
        values, first = tf.unique(x, out_idx=tf.int64)  # in order of first appearance
        order = tf.cast(tf.argsort(values), tf.int64)
        rank = tf.math.invert_permutation(order)
        return tf.gather(values, order), tf.gather(rank, first)
    def gather(self, x, idx): return self.tf.gather(x, idx)
    def topk_values(self, x, k): return self.tf.math.top_k(x, k, sorted=True).values
    def topk_positions(self, x, k):
        # tf.math.top_k documents that equal values keep the lower index first
        idx = self.tf.math.top_k(x, k, sorted=True).indices
        return self.tf.sort(self.tf.cast(idx, self.tf.int64))
    def cumsum(self, x): return self.tf.cumsum(x)
    def scatter_add(self, n, idx, values):
        return self.tf.math.unsorted_segment_sum(values, idx, n)
    def zeros_in(self, x): return self.tf.zeros_like(x)
    def scatter_add_into(self, out, idx, values):
        return self.tf.tensor_scatter_nd_add(out, self.tf.reshape(idx, (-1, 1)), values)
    def scale_at(self, out, idx, factor):
        idx = self.tf.reshape(idx, (-1, 1))
        return self.tf.tensor_scatter_nd_update(out, idx, self.tf.gather_nd(out, idx) * factor)
    def copy(self, x): return self.tf.identity(x)
    def count(self, mask):
        return self.tf.math.count_nonzero(mask, dtype=self.tf.int64)
    def xor(self, a, b): return self.tf.bitwise.bitwise_xor(a, b)
    def band(self, a, b): return self.tf.bitwise.bitwise_and(a, self.tf.cast(b, a.dtype))
    def bor(self, a, b): return self.tf.bitwise.bitwise_or(a, b)
    def rshift(self, a, s): return self.tf.bitwise.right_shift(a, self.tf.cast(s, a.dtype))
    def lshift(self, a, s): return self.tf.bitwise.left_shift(a, self.tf.cast(s, a.dtype))
    def to_numpy(self, x):
        if x.dtype == self.tf.bfloat16:
            return self.tf.bitcast(x, self.tf.uint16).numpy()
        return x.numpy()
    def from_numpy(self, a, like): return self.tf.convert_to_tensor(a)


_BACKENDS = {"numpy": NumpyBackend, "torch": TorchBackend, "tensorflow": TensorflowBackend}


@functools.lru_cache(maxsize=None)
def _backend_named(name: str) -> Backend:
    return _BACKENDS[name]()


def backend_for(x) -> Backend:
    """The backend of tensor ``x``; imports nothing the caller has not imported already."""
    if isinstance(x, np.ndarray):
        return _backend_named("numpy")
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return _backend_named("torch")
    tf = sys.modules.get("tensorflow")
    if tf is not None and isinstance(x, (tf.Tensor, tf.Variable)):
        return _backend_named("tensorflow")
    raise HvdCompressError(
        f"unsupported tensor type {type(x).__module__}.{type(x).__name__}: "
        "hvd_compress works on numpy arrays, torch tensors and TensorFlow tensors")


def backend_named(name: str) -> Backend:
    if name not in _BACKENDS:
        raise HvdCompressError(f"unknown backend {name!r}; expected one of {sorted(_BACKENDS)}")
    return _backend_named(name)
