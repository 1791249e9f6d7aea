"""Framework-agnostic core: the math, written once for numpy, torch and TensorFlow."""
from . import casts, quantizers, sparsifiers  # noqa: F401  (register the compressors)
from .compressor import Compressor
from .payload import Payload, pack, unpack
from .registry import available, register
from .rng import Key
from .spec import parse, resolve_compressor

__all__ = ["Compressor", "Key", "Payload", "available", "pack", "parse", "register",
           "resolve_compressor", "unpack"]
