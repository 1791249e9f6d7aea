"""Framework-agnostic core: the math, written once for numpy, torch and TensorFlow."""
from . import auto, casts, feedback, perturbation, policy, quantizers, sparsifiers  # noqa: F401  (register algorithms)
from .compressor import Compressor
from .feedback import Feedback
from .payload import Payload, pack, unpack
from .pipeline import Pipeline, resolve, resolve_pipeline
from .registry import available, register
from .rng import Key
from .spec import parse, resolve_compressor

__all__ = ["Compressor", "Feedback", "Key", "Payload", "Pipeline", "available", "pack", "parse",
           "register", "resolve", "resolve_compressor", "resolve_pipeline", "unpack"]
