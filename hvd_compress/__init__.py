"""hvd_compress: gradient compression for data-parallel training on Horovod and MPI.

Pass ``hvd_compress.torch.compression("topk:0.01")`` (or the TensorFlow twin) as the
``compression=`` argument of Horovod's distributed optimizer. Importing this package needs
only numpy: torch, TensorFlow, mpi4py and Horovod are imported when first used.
"""
from .core import (
    Compressor,
    Feedback,
    Key,
    Payload,
    Pipeline,
    available,
    pack,
    parse,
    register,
    resolve,
    unpack,
)
from .errors import HvdCompressError

__version__ = "0.1.0"

__all__ = ["Compressor", "Feedback", "HvdCompressError", "Key", "Payload", "Pipeline",
           "available", "pack", "parse", "register", "resolve", "unpack", "__version__"]
