"""The compressor protocol shared by every codec.

A compressor is a stateless codec: ``compress(x, key) -> Payload`` and
``decompress(payload) -> tensor``. State (error feedback, shifts, momentum) lives in the
feedback rules, never in a compressor, so one compressor object can serve every tensor.

Each compressor declares its class, because convergence guarantees depend on it and the
feedback rules check it:

* ``"exact"``       -- lossless up to a cast (identity, fp16, bf16);
* ``"unbiased"``    -- E[C(x)] = x and E||C(x) - x||^2 <= omega ||x||^2 (``omega(d)``);
* ``"contractive"`` -- E||C(x) - x||^2 <= (1 - alpha) ||x||^2 (``alpha(d)``);
* ``"absolute"``    -- ||C(x) - x||^2 <= kappa^2 for every x (hard threshold).

``summable`` compressors produce payloads that a sum-allreduce can add elementwise before
decompression (casts, shared-mask rand-k); the others travel through an allgather.
``fixed_size`` says every rank's payload for a tensor has the same length, so gathered
buffers split without reading their headers.
"""
from __future__ import annotations

import math
import numbers

from ..errors import HvdCompressError
from .algorithm import Algorithm
from .ops import FLOAT_DTYPES, backend_for
from .payload import Payload, index_dtype_for
from .rng import Key


class Compressor(Algorithm):
    kind = "compressor"
    bias = "exact"
    summable = False
    stochastic = False
    fixed_size = True  # payload size depends only on the tensor size (equal on every rank)
    decodes_into = False  # mean() may build the average in the memory of its ``out``

    # -- the codec ---------------------------------------------------------------------
    def compress(self, x, key: Key = Key()) -> Payload:
        raise NotImplementedError

    def decompress(self, p: Payload):
        """The dense tensor a payload stands for, in its original shape and dtype."""
        bk = backend_for(_any_segment(p))
        return bk.reshape(bk.astype(self.decode_flat(bk, p), p.dtype), p.shape)

    def decode_flat(self, bk, p: Payload):
        """The payload as a flat dense tensor (in the payload's compute dtype)."""
        raise NotImplementedError

    def aggregate(self, bk, payloads, out=None):
        """Sum of the dense tensors the payloads stand for (flat, in the compute dtype);
        ``out``: a flat tensor whose memory the sum may take (its values are lost)."""
        total = None
        for p in payloads:
            v = self.decode_flat(bk, p)
            total = v if total is None else total + v
        return total

    def mean(self, bk, payloads, n: int, out=None):
        """(the sum of the payloads' dense tensors times 1/n, whether it is finite): what
        every rank applies. The second is a boolean scalar of the framework, left on the
        device (on a CPU it may already be a bool). ``out``: see :meth:`aggregate`."""
        total = self.aggregate(bk, payloads)
        if n != 1:
            total = total * (1.0 / n)
        return total, bk.finite_flag(total)

    def add_sent(self, bk, x, p: Payload, scale: float = 1.0, owned: bool = False):
        """``x + scale * (the flat tensor p stands for)``, in x's dtype: how feedback rules
        move their residuals and estimates by what was sent. ``owned`` says x is a fresh
        tensor that may be overwritten (sparse payloads then touch only their entries)."""
        sent = bk.astype(self.decode_flat(bk, p), bk.dtype(x))
        if scale == -1.0:
            return x - sent
        return x + (sent if scale == 1.0 else sent * scale)

    def touched(self, p: Payload):
        """The positions :meth:`add_sent` changes where it changes only those (sparse
        payloads), else None (it adds a dense tensor)."""
        return None

    # -- class constants ---------------------------------------------------------------
    def omega(self, d: int) -> float:
        """Variance bound of an unbiased compressor on d entries."""
        raise HvdCompressError(f"{self.spec()} is {self.bias}, not unbiased: it has no omega")

    def alpha(self, d: int) -> float:
        """Contraction parameter: E||C(x) - x||^2 <= (1 - alpha) ||x||^2 on d entries.

        An unbiased compressor has E||C(x) - x||^2 <= omega ||x||^2, so it is contractive
        with alpha = 1 - omega only when omega < 1 (natural compression: 7/8); otherwise
        it is not contractive at all and this raises. (Its scaled form C / (1 + omega) is
        contractive with alpha = 1 / (1 + omega), but that is another compressor.)"""
        if self.bias == "exact":
            return 1.0
        if self.bias == "unbiased":
            omega = self.omega(d)
            if omega < 1.0:
                return 1.0 - omega
            raise HvdCompressError(
                f"{self.spec()} is unbiased with omega={omega:g} >= 1 on {d} entries: "
                f"E||C(x) - x||^2 may exceed ||x||^2, so it is not contractive (C/(1 + omega) "
                f"would be, with alpha = 1/(1 + omega) = {1.0 / (1.0 + omega):g})")
        raise HvdCompressError(f"{self.spec()} is {self.bias}: it has no contraction parameter")

    # -- helpers for subclasses --------------------------------------------------------
    def _flat(self, x, name: str = ""):
        """(backend, flat tensor, d, original shape, dtype) after validating ``x``."""
        bk = backend_for(x)
        dtype = bk.dtype(x)
        if dtype not in FLOAT_DTYPES:
            raise HvdCompressError(
                f"{self.spec()}: tensor {name or '<unnamed>'} has dtype {dtype}; "
                f"compressors take floating tensors ({', '.join(FLOAT_DTYPES)})")
        shape = bk.shape(x)
        flat = bk.flatten(bk.detached(x))
        return bk, flat, bk.size(flat), shape, dtype

    def _index_dtype(self, d) -> str:
        return index_dtype_for(d) if isinstance(d, int) else "int64"


def _any_segment(p: Payload):
    for t in (p.values, p.codes, p.indices, p.scales):
        if t is not None:
            return t
    raise HvdCompressError("empty payload")


# -- constructor argument checks -------------------------------------------------------
# Spec strings hand constructors whatever they parsed (an int, a float, true/false, none or
# a word), so every knob is checked for its type as well as its range; the checks return
# plain Python numbers, which the canonical spec writes back exactly. Bools are refused
# where numbers are expected (``True`` would pass for 1), and so are nan and inf.

def check_ratio(owner: str, ratio, k=None):
    """``ratio`` as a float in (0, 1]; None is allowed only when an exact ``k`` replaces it."""
    if ratio is None and k is not None:
        return None
    return check_float(owner, "ratio", ratio, high=1.0)


def check_float(owner: str, name: str, value, high=math.inf, zero_ok=False) -> float:
    """``value`` as a finite float in (0, high], or in [0, high] when ``zero_ok``."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    try:
        v = float(value) if real else math.nan
    except OverflowError:  # an int beyond float range
        v = math.inf
    if not real:
        problem = "be a number"
    elif not math.isfinite(v):
        problem = "be finite"
    elif (v < 0 if zero_ok else v <= 0) or v > high:
        problem = f"lie in {'[' if zero_ok else '('}0, {high:g}]" if high < math.inf else \
            "be >= 0" if zero_ok else "be positive"
    else:
        return v
    raise HvdCompressError(f"{owner}: {name}={value!r} must {problem}")


def check_int(owner: str, name: str, value, low=-math.inf, high=math.inf) -> int:
    """``value`` as an int in [low, high]. Integral floats (``5.0``) count; bools,
    fractions, nan, inf and words do not."""
    if high < math.inf:
        what = f"an integer in [{low}, {high}]"
    else:
        what = "a positive integer" if low == 1 else \
            "an integer" if low == -math.inf else f"an integer >= {low}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value % 1 != 0 \
            or not low <= value <= high:  # nan % 1 and inf % 1 are nan
        raise HvdCompressError(f"{owner}: {name}={value!r} must be {what}")
    # int() takes any real number, but typeshed's numbers.Real declares no __int__
    return int(value)  # type: ignore[call-overload]


def check_bool(owner: str, name: str, value) -> bool:
    """``value`` if it is a bool: a spec's ``true``/``false`` (numbers and words are refused
    rather than read by their truth value)."""
    if not isinstance(value, bool):
        raise HvdCompressError(f"{owner}: {name}={value!r} must be true or false")
    return value


def resolve_k(owner: str, d: int, k, ratio, tensor: str = "") -> int:
    """The number of entries to keep: ``k`` if given, else ``max(1, int(ratio * d))``."""
    if k is None:
        k = max(1, int(ratio * d))
    if not isinstance(d, int) or not isinstance(k, int):
        return k  # a graph's size, or a k chosen in the graph (within [1, d])
    if k > d:
        raise HvdCompressError(
            f"{owner}: k={k} exceeds the {d} entries of tensor {tensor or '<unnamed>'}")
    return k
