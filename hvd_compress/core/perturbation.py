"""Perturbed compressed SGD: isotropic noise that lets compressed methods escape strict
saddle points (Avdiukhin, Yaroslavtsev, "Escaping Saddle Points with Compressed SGD",
NeurIPS 2021).

Each worker adds xi ~ N(0, (radius^2 / d) I) to its gradient before feedback and
compression, drawn from the private stream of (seed, rank, name, step), so E||xi||^2 =
radius^2 whatever the tensor size. At a strict saddle the gradient vanishes and a
compressed method with error feedback stays put; the noise gives it a component along the
negative-curvature direction, which then grows.
"""
from __future__ import annotations

from .algorithm import Algorithm
from .compressor import check_float
from .registry import register
from .rng import Key, normal


@register("perturbation", "perturb")
class Perturb(Algorithm):
    """Add isotropic Gaussian noise of expected norm ``radius`` to each gradient.

    Args:
      radius: expected l2 norm of the noise (> 0). The theory asks for a radius of the
        order of the target gradient norm epsilon; in practice a small fraction of a
        typical gradient norm.
    """

    def __init__(self, radius=1e-3):
        self.radius = check_float("perturb", "radius", radius)

    def apply(self, bk, g, key: Key):
        d = bk.size(g)
        xi = normal(bk, d, key, g, salt=7, dtype=bk.dtype(g))
        return g + xi * (self.radius / d ** 0.5)
