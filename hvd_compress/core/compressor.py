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

    def aggregate(self, bk, payloads):
        """Sum of the dense tensors the payloads stand for (flat, in the compute dtype)."""
        total = None
        for p in payloads:
            v = self.decode_flat(bk, p)
            total = v if total is None else total + v
        return total

    # -- class constants ---------------------------------------------------------------
    def omega(self, d: int) -> float:
        """Variance bound of an unbiased compressor on d entries."""
        raise HvdCompressError(f"{self.spec()} is {self.bias}, not unbiased: it has no omega")

    def alpha(self, d: int) -> float:
        """Contraction parameter: E||C(x) - x||^2 <= (1 - alpha) ||x||^2 on d entries."""
        if self.bias == "exact":
            return 1.0
        if self.bias == "unbiased":
            # C / (1 + omega) is contractive with alpha = 1 / (1 + omega); see papers.md §1.
            return 1.0 / (1.0 + self.omega(d))
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
        flat = bk.flatten(x)
        return bk, flat, bk.size(flat), shape, dtype

    def _index_dtype(self, d) -> str:
        return index_dtype_for(d) if isinstance(d, int) else "int64"


def _any_segment(p: Payload):
    for t in (p.values, p.codes, p.indices, p.scales):
        if t is not None:
            return t
    raise HvdCompressError("empty payload")


def check_ratio(owner: str, ratio):
    if ratio is not None and not (0.0 < float(ratio) <= 1.0):
        raise HvdCompressError(f"{owner}: ratio={ratio!r} must lie in (0, 1]")


def resolve_k(owner: str, d: int, k, ratio, tensor: str = "") -> int:
    """The number of entries to keep: ``k`` if given, else ``max(1, int(ratio * d))``."""
    if k is None:
        k = max(1, int(ratio * d))
    if not isinstance(d, int):
        return k
    if k > d:
        raise HvdCompressError(
            f"{owner}: k={k} exceeds the {d} entries of tensor {tensor or '<unnamed>'}")
    return k
