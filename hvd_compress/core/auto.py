"""``auto``: per tensor, a dense allreduce or the sparse route, whichever the measured costs
of this network and this machine say is faster.

Compression pays on a slow link and costs on a fast one: top-k saves bytes but spends
memory passes and a per-message allgather, which on a link as fast as memory is slower
than Horovod's dense ring allreduce. ``auto`` measures both sides and routes each tensor
the faster way:

* the link: the frontend times real allreduces and allgathers of two sizes on the
  training's own process set and fits ``t = alpha + beta * bits`` to each
  (:func:`hvd_compress.core.policy.calibrate`);
* the compression: it times this package's own per-tensor path (the ``Exchange`` every
  frontend runs) at two sizes on the gradients' device, ``t = a + b * d``;
* every rank takes the slowest rank's figures (an allreduce with op max), so every rank
  makes the same choice for every tensor, and re-measures every ``every`` steps.

With those, a tensor of d entries costs ``alpha_r + beta_r 32 d`` dense (an allreduce of
fp32) and ``a + b d + alpha_g + beta_g bits(k)`` sparse (compress, then an allgather of
every rank's payload of bits(k) = 192 + k (index + value bits)). Both fits are of whole
collectives on the training's own ranks, so the ring's factors are in them. A tensor
goes sparse where that is faster; a tensor of a dtype Horovod cannot allreduce
(bfloat16) always does. Until the first measurement (the first step) every tensor goes
dense. The costs are measurements, not training state: they are not checkpointed, and a
resumed run routes dense for one step, then measures again.

The sparse route is the spec's own (``topk:0.01+ef14+auto``: top-k 1% with EF14; bare
``auto`` means that). The dense route is Horovod's uncompressed allreduce of the tensor as
it is: no copy, no pass over it, and the feedback state untouched, so EF14's residual
still holds what was not sent and goes out with the next sparse step. Routes can change
at every measurement without losing anything.

What ``auto`` does not do yet: choose k itself (the spec's ratio is used: the route, not
the level, adapts), or consider fp16. It treats top-k with error feedback as reaching the
dense model in as many steps. That is close, not exact: on a9a at 100 Mbit/s (4 ranks,
SGD with momentum, 2 epochs) ``auto`` sent 40.8x fewer bits than dense and ended 1.05
points below dense's held-out accuracy (fixed top-k 1% + EF14: 0.90 points below). Where
that gap matters, pick a larger ratio (``topk:0.05+ef14+auto``) or a spec by hand.

Args:
  every: steps between measurements (500). Each measurement costs a few collectives
    of up to 256 KiB (1 s in all on a 100 Mbit/s link shared by 4 ranks) and two timed
    compressions.
"""
from __future__ import annotations

from typing import NamedTuple

from ..errors import HvdCompressError
from .algorithm import Algorithm
from .compressor import check_int
from .ops import ITEMSIZE
from .payload import HEADER_BYTES, index_dtype_for
from .registry import register
from .sparsifiers import TopK


class Costs(NamedTuple):
    """Measured costs every rank agrees on (seconds; bits). Each pair is fitted to whole
    collectives on the training's process set against the bits each rank hands in, so it
    already holds whatever the collective does with the ranks (a ring's 2 (n-1)/n, an
    allgather's n - 1 parts)."""
    allreduce: tuple          # (alpha s, beta s per bit handed in) of its allreduce
    allgather: tuple          # (alpha s, beta s per bit handed in) of its allgather
    compute: tuple            # (a s, b s per entry) of the sparse route's per-tensor path

    def dense_seconds(self, d: int, item_bits: int) -> float:
        alpha, beta = self.allreduce
        return alpha + beta * item_bits * d

    def sparse_seconds(self, d: int, wire_bits: int) -> float:
        a, b = self.compute
        alpha, beta = self.allgather
        return a + b * d + alpha + beta * wire_bits


# what the frontends time: collective sizes in bytes, and tensor sizes for the compute
LINK_BYTES = (1 << 10, 1 << 18)
COMPUTE_SIZES = (1 << 12, 1 << 20)


@register("policy", "auto")
class Auto(Algorithm):
    __doc__ = __doc__

    graph_safe = False  # the route is chosen on the host from measured times
    agree = False

    def __init__(self, every=500):
        self.every = check_int("auto", "every", every, 1)

    def check(self, compressor, feedback=None):
        if not isinstance(compressor, TopK):
            raise HvdCompressError(
                f"auto routes each tensor dense or through top-k; {compressor.spec()} is not "
                "top-k (write e.g. 'topk:0.01+ef14+auto', or just 'auto')")

    def dense(self, d: int, dtype: str, compressor, costs: Costs | None) -> bool:
        """Whether a tensor of ``d`` entries of ``dtype`` goes by a dense allreduce of the
        tensor as it is (always, until the costs are measured)."""
        if costs is None:
            return True
        value = compressor.values or dtype
        wire = 8 * (HEADER_BYTES + compressor.k_for(d) *
                    (ITEMSIZE[index_dtype_for(d)] + ITEMSIZE[value]))
        return costs.dense_seconds(d, 8 * ITEMSIZE[dtype]) <= costs.sparse_seconds(d, wire)

    def choose(self, bk, v, compressor):
        """The sparse route is the spec's compressor as it is (the frontend takes the
        dense route itself, see :meth:`dense`)."""
        return compressor


def fit_costs(link_seconds, compute_seconds) -> Costs:
    """Costs from the agreed timings: ``link_seconds`` = allreduce at LINK_BYTES, then
    allgather at LINK_BYTES; ``compute_seconds`` at COMPUTE_SIZES."""
    from .policy import calibrate
    bits = [8 * b for b in LINK_BYTES]
    m = len(LINK_BYTES)
    return Costs(calibrate(bits, link_seconds[:m]), calibrate(bits, link_seconds[m:]),
                 calibrate(list(COMPUTE_SIZES), compute_seconds))


def refuse_unmeasured(pipeline, where: str):
    """Raise where a frontend cannot measure the costs ``auto`` routes by (there it would
    send every tensor dense, silently)."""
    if isinstance(pipeline.policy, Auto):
        raise HvdCompressError(
            f"{pipeline.spec()}: auto measures Horovod's allreduce and allgather, which "
            f"{where} does not use yet; use hvd_compress.torch.compression(...) on "
            "Horovod's optimizer, or a fixed spec such as 'topk:0.01+ef14'")

