"""The object passed as ``compression=`` to Horovod's TensorFlow APIs."""
from __future__ import annotations

from ..core.rng import Key
from ..core.spec import resolve_compressor
from ..errors import HvdCompressError


class Compression:
    """Horovod-compatible TensorFlow compression backed by a hvd_compress compressor.

    Horovod's TF ``compress(tensor)`` receives no name and allreduces the result, so only
    the casts Horovod's TF allreduce can sum (``none``, ``fp16``) are accepted here for now;
    others (including ``bf16``, which Horovod's TF kernels lack) raise
    :class:`~hvd_compress.HvdCompressError` instead of sending dense zeros.
    """

    def __init__(self, compressor, seed: int = 0):
        self.compressor = resolve_compressor(compressor)
        self.seed = int(seed)
        if self.compressor.name not in ("none", "fp16"):
            raise HvdCompressError(
                f"{self.compressor.spec()} needs the allgather path, which the TensorFlow "
                "frontend does not provide yet; use none or fp16 with TensorFlow")

    def __repr__(self):
        return f"hvd_compress.tensorflow.compression({self.compressor.spec()!r})"

    def compress(self, tensor):
        p = self.compressor.compress(tensor, Key(self.seed, None, "", 0))
        return p.values, p

    def decompress(self, tensor, ctx):
        return self.compressor.decompress(ctx._replace(values=tensor))


def compression(spec_or_object, seed: int = 0) -> Compression:
    """What to pass as ``compression=`` to Horovod's TensorFlow tape or optimizer."""
    if isinstance(spec_or_object, Compression):
        return spec_or_object
    return Compression(spec_or_object, seed=seed)
