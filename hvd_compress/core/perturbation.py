"""Perturbed compressed SGD: isotropic noise that lets compressed methods escape strict
saddle points (Avdiukhin, Yaroslavtsev, "Escaping Saddle Points with Compressed SGD",
NeurIPS 2021).

Each worker adds xi ~ N(0, (radius^2 / D) I) to its gradient before feedback and
compression, D the number of entries of the whole model: the noise is isotropic over the
model, E||xi||^2 = radius^2 in all, and each tensor's entries get the same variance
whatever the tensor's size (a 64-entry bias and a 1M-entry weight alike). It is drawn
tensor by tensor from the private stream of (seed, rank, name, step). The frontends know
D from the parameters they are bound to; ``SparseAllreduce`` and ``Exchange`` take it as
``model_size``. At a strict saddle the gradient vanishes and a compressed method with
error feedback stays put; the noise gives it a component along the negative-curvature
direction, which then grows.
"""
from __future__ import annotations

from .algorithm import Algorithm
from .compressor import check_float
from .registry import register
from .rng import Key, normal


@register("perturbation", "perturb")
class Perturb(Algorithm):
    """Add Gaussian noise, isotropic over the model, of expected squared norm radius^2.

    Args:
      radius: the noise's expected l2 norm over the whole model (E||xi||^2 = radius^2;
        > 0). The theory asks for a radius of the order of the target gradient norm
        epsilon; in practice a small fraction of the model's gradient norm.
    """

    def __init__(self, radius=1e-3):
        self.radius = check_float("perturb", "radius", radius)

    def apply(self, bk, g, key: Key, model_size: int):
        """g plus this tensor's part of the noise: each entry N(0, radius^2 / model_size)."""
        xi = normal(bk, bk.size(g), key, g, salt=7, dtype=bk.dtype(g))
        return g + xi * (self.radius / model_size ** 0.5)
