"""``auto``: per tensor, a dense allreduce, a float16 cast, or top-k at the k that sends
the most of the gradient per second, from the measured costs of this network and machine.

Compression pays on a slow link and costs on a fast one: top-k saves bytes but spends
memory passes and a per-message allgather, which on a link as fast as memory is slower
than Horovod's dense ring allreduce. ``auto`` measures both sides and plans each tensor:

* the link: the frontend times real allreduces (of float32 and of float16) and
  allgathers of two sizes on the training's own process set and fits
  ``t = alpha + beta * bits`` to each (:func:`hvd_compress.core.policy.calibrate`): 1 KiB,
  and the first of 256 KiB, 1 MiB, 4 MiB, 16 MiB whose allreduce takes 10 ms, or that is
  not below the largest gradient, so that the slope is measured where bytes, not
  latency, decide the time (the allgather's part at most 16 MiB / ranks, as every rank
  receives them all);
* the compression: it times this package's own per-tensor path (the ``Exchange`` every
  frontend runs) at two sizes on the gradients' device, ``t = a + b * d``, and the
  cast route's scaling and casts the same way;
* the gradients: on the step before each measurement every rank records, per tensor, the
  energy of its k largest entries for each candidate k (:data:`RATIOS`, from the spec's
  ratio up), the total energy and the largest magnitude (:meth:`Auto.profile`);
* every rank takes the slowest rank's times (an allreduce with op max) and the sum of the
  profiles (an allreduce), so every rank plans every tensor alike, and re-measures every
  ``every`` steps.

The plan (:meth:`Auto.plan`) has two parts. The level follows the rule of the
``dynamic`` policy (the level that improves the objective most per unit of cost;
Khirirat et al., AAAI 2021) with seconds as the cost: among the candidate k, the one whose
share E(k) = (energy of the k largest entries) / (energy of all), summed over the ranks,
is largest per second of top-k's time. E(k) is the raw gradient's: with error feedback
the vector top-k selects from also holds the residual, so it sends more than E(k) says
and the rule errs toward larger k. The route then takes the fastest of, for a tensor of
d entries,

* dense: ``beta_r 32 d`` (its bytes in an allreduce of fp32);
* cast: ``c + e d + beta_h 16 d`` (scaling by a power of two and casting to float16 and
  back, and its bytes in an allreduce of float16, timed apart: on a CPU Horovod converts
  each entry to sum it); float32 tensors only, where Horovod allreduces float16;
* top-k at that k: ``a + b d + alpha_g + beta_g bits(k)`` (compress, then an allgather
  of every rank's payload of bits(k) = 192 + k (index + value bits));

dense on ties, then top-k. Dense and cast tensors are charged their bytes only: Horovod
fuses a step's allreduces of one dtype into a few messages, so their alpha is paid per
step, not per tensor (charged per tensor, it sent mid-sized tensors of small models
through top-k, whose per-tensor compute and allgather then made steps slower than
dense). The casts then keep their float16 message only where what they save together
pays for its alpha (less float32's, where no tensor stays dense). Each top-k payload is
its own allgather (fused buckets share one, see ``fuse_below``), so it pays alpha_g.

Time alone decides between dense and top-k because error feedback keeps what top-k
leaves out of a step and sends it in later ones (the level decides how soon). Without
feedback (``topk:0.01+auto``) the rest is lost, and top-k's time counts as 1 / E(k)
times longer. A cast is what Horovod's ``Compression.fp16`` sends, except that it first
scales the tensor by the power of two that puts the ranks' summed largest magnitude (in
the profile before the last measurement) between 32 and 65504 / 1024: gradients of any size
keep float16's 11 bits of precision instead of flushing to zero, and may grow 1024x
before the float16 sum overflows. If it does (or some rank's gradient is not finite),
every rank sees the same non-finite sum and sends the tensor again as it is, in one more
allreduce that step (logged as a row of its own; every rank starts all of a step's
resends before it waits on one); so it does where the sum holds zeros only (the
gradient is zero, or fell below float16's range, which would otherwise hand every rank
a zero update until the next measurement); reading the sum's finiteness costs a wait
per cast tensor and step on an accelerator. Its rounding is not kept for later steps. Between
measurements the scale follows the gradient, from the float16 sum every rank holds
alike: after an overflow it shrinks 2^10 for the next steps (the sum would overflow at
every step otherwise), and once the sum's largest entry falls 2^10 below the first seen
since the plan, it grows back by the power of two between them (float16 would
otherwise flush the small entries of a shrinking gradient: 1e8 times smaller, most of
them); after a sum of zeros only, the dense sum sent in its place sets the scale
afresh (as a measurement would, from its largest entry), unless it is zero too (a
zero gradient, which leaves the scale as it was); a scale past 2^100 sends the tensor
dense until the next measurement.

The TensorFlow frontend keeps the plan (and each cast's scale) in variables that its
compiled steps read and the same rule moves (see :mod:`hvd_compress.tensorflow.auto`):
there step 0 goes top-k at the spec's k. A tensor of a dtype Horovod cannot allreduce
(bfloat16) always goes top-k. In PyTorch, until the first measurement (the first
step) every tensor goes dense; a tensor without a profile (one seen first after it) is
planned alone from the costs (dense, or top-k at the spec's k). Costs and profiles are
measurements, not training state: they are not checkpointed, and a resumed run routes
dense for one step, then measures again. The dense and cast routes leave the feedback
state untouched, so EF14's residual still holds what was not sent and goes out with
the next top-k step; routes can change at every measurement without losing it.

The top-k route is the spec's pipeline at the planned k (``topk:0.01+ef14+auto``:
candidates from 1% up with EF14; bare ``auto`` means that): the spec's ratio is the
least share auto sends, so a larger ratio trades bits for accuracy, a smaller one
accuracy for speed. On a9a at 100 Mbit/s (README's demo, 4 ranks, SGD with momentum, 4
epochs) auto planned top-k 1% + EF14 for every tensor, sent 44.8x fewer bits than dense
and ended 0.08 points below dense's held-out accuracy (0.8397 against 0.8405); after 2
epochs it was still 1.05 points behind (0.8335 against 0.8440): what error feedback
holds back arrives late, so a short run shows the lag.

Args:
  every: steps between measurements (500). Each measurement costs a few collectives of
    up to 256 KiB on a slow link (about 2 s in all at 100 Mbit/s shared by 4 ranks), of
    up to 16 MiB (and allgathers of up to 16 MiB in all) on a fast one (tenths of a
    second on the 4 ranks of docs/BENCHMARKS.md), two timed compressions and casts,
    and on the step before it one top-k of a tenth of each
    tensor (the profile: a top-k of the largest candidate k, a tenth of the tensor or
    less, over a float64 copy of it, one tensor at a time).
"""
from __future__ import annotations

import math
from typing import NamedTuple

from ..errors import HvdCompressError
from .algorithm import Algorithm
from .compressor import check_int
from .ops import ITEMSIZE
from .payload import HEADER_BYTES, index_dtype_for
from .registry import register
from .sparsifiers import TopK

# the shares of a tensor top-k may send, from the spec's ratio up
RATIOS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)
# a cast scales by a power of two that puts the ranks' summed largest magnitude at
# float16's largest / CAST_HEADROOM: room for gradients to grow that much before the
# next measurement, and entries down to about 2^-30 of the largest still nonzero
FLOAT16_MAX = 65504.0
HEADROOM_BITS = 10   # ... as a power of two: how far the scale moves when the gradient does
CAST_HEADROOM = 2.0 ** HEADROOM_BITS
SHIFT_CLAMP = 100    # scales of 2^100 or more are refused (a gradient of 0, or near it)
# what the frontends time: collective sizes in bytes (the larger one grows, by 4x up to
# LINK_MAX_BYTES and the largest gradient, until a float32 allreduce takes LINK_SECONDS on
# the slowest rank: on a fast link a small one is all latency and noise, and its slope
# was off by 10x), and tensor sizes for the compute
LINK_BYTES = (1 << 10, 1 << 18)
LINK_SECONDS = 0.01
LINK_MAX_BYTES = 1 << 24
COMPUTE_SIZES = (1 << 12, 1 << 20)


class Costs(NamedTuple):
    """Measured costs every rank agrees on (seconds; bits). Each link pair is fitted to
    whole collectives on the training's process set against the bits each rank hands in,
    so it already holds whatever the collective does with the ranks (a ring's 2 (n-1)/n,
    an allgather's n - 1 parts)."""
    allreduce: tuple          # (alpha s, beta s per bit handed in) of its allreduce
    allgather: tuple          # (alpha s, beta s per bit handed in) of its allgather
    compute: tuple            # (a s, b s per entry) of the top-k route's per-tensor path
    cast: tuple | None = None  # (c s, e s per entry) of the cast to float16 and back
    allreduce16: tuple | None = None  # (alpha, beta) of an allreduce of float16

    def dense_seconds(self, d: int, item_bits: int) -> float:
        """A tensor's share of the step's fused allreduces: its bytes, not alpha."""
        return self.allreduce[1] * item_bits * d

    def sparse_seconds(self, d: int, wire_bits: int) -> float:
        a, b = self.compute
        alpha, beta = self.allgather
        return a + b * d + alpha + beta * wire_bits

    def cast_seconds(self, d: int) -> float:
        """The cast and back, and the tensor's bytes in a float16 allreduce (whose sums
        can cost more per byte than float32's: on a CPU Horovod converts each entry)."""
        assert self.cast is not None
        c, e = self.cast
        return c + e * d + self.half[1] * 16 * d

    @property
    def half(self) -> tuple:
        """(alpha, beta) of an allreduce of float16 (float32's where not timed apart)."""
        return self.allreduce16 or self.allreduce


class Route(NamedTuple):
    """How one tensor travels: ``kind`` "dense" (allreduce as it is), "cast" (allreduce
    in float16, scaled by 2**shift on the way) or "topk" (the spec's pipeline at ``k``)."""
    kind: str
    k: int = 0
    shift: int = 0


DENSE = Route("dense")


def cast_to_wire(bk, x, shift, in_place: bool = False):
    """The cast route's payload: ``x * 2**shift`` in float16 (the scaling is exact). With
    ``in_place`` x is scaled in its own memory first (one pass in place, then the plain
    cast); else the product is written into float16 directly where the framework can
    (no scaled copy of x, but on a CPU torch's mixed-dtype multiply is about twice the
    cost of the cast). Inside a TensorFlow graph ``shift`` is an int32 tensor (the
    variable the plan wrote)."""
    if isinstance(shift, int) and not shift:
        return bk.astype(x, "float16")
    if in_place:
        return bk.astype(bk.mul_(x, bk.power_of_two(shift)), "float16")
    return bk.scaled(x, bk.power_of_two(shift), "float16")


def cast_from_wire(bk, y, dtype: str, shift, into=None):
    """The inverse of :func:`cast_to_wire` on a (summed) payload: in ``dtype`` (float32),
    scaled back there (float16 would underflow), in ``into``'s memory where given (the
    tensor the payload was cast from), else in a new tensor; ``shift`` as there."""
    y = bk.astype(y, dtype) if into is None else bk.overwrite(into, y)
    return y if isinstance(shift, int) and not shift else bk.mul_(y, bk.power_of_two(-shift))


def cast_shift(largest: float) -> int:
    """The power of two a cast scales by, from the ranks' summed largest magnitude: the
    one that puts it in [32, 64] (exact: frexp, not a logarithm that libraries round
    differently, so every rank computes the same)."""
    return max(-SHIFT_CLAMP, min(SHIFT_CLAMP,
                                 math.frexp(FLOAT16_MAX / CAST_HEADROOM / largest)[1] - 1))


@register("policy", "auto")
class Auto(Algorithm):
    __doc__ = __doc__

    # the plan is made on the host between steps; inside a graph (TensorFlow) the steps
    # read it from variables (see hvd_compress.tensorflow)
    agree = False

    def __init__(self, every=500):
        self.every = check_int("auto", "every", every, 1)
        self._codecs: dict = {}  # (k, formats) -> its TopK, made once

    def check(self, compressor, feedback=None):
        if not isinstance(compressor, TopK):
            raise HvdCompressError(
                f"auto routes each tensor dense, cast or through top-k; {compressor.spec()} "
                "is not top-k (write e.g. 'topk:0.01+ef14+auto', or just 'auto')")

    def candidates(self, d: int, compressor) -> list:
        """The k top-k may take for a tensor of ``d`` entries: the spec's, then each of
        :data:`RATIOS` above it (the same on every rank)."""
        least = min(compressor.k, d) if compressor.k is not None else compressor.k_for(d)
        more = {max(1, int(r * d)) for r in RATIOS}
        return [least] + sorted(k for k in more if least < k <= d)

    def profile(self, bk, flat, compressor) -> list:
        """This rank's measurements of a tensor for the plan, as floats: the energy of its
        k largest entries for each of :meth:`candidates`, its total energy and its
        largest magnitude (non-finite entries count as zeros). Summed over the ranks by
        the frontend; one top-k of the largest candidate (float64 squares: a copy of the
        tensor in float64 and one of a tenth of it, on profiling steps only)."""
        return [float(v) for v in bk.to_numpy(self.profile_tensor(bk, flat, compressor))]

    def profile_tensor(self, bk, flat, compressor):
        """:meth:`profile` as a float64 tensor of the framework (inside a graph too)."""
        ks = self.candidates(bk.size(flat), compressor)
        x = bk.finite_or_zero(bk.astype(flat, "float64"))
        sq = x * x
        prefix = bk.cumsum(bk.topk_values(sq, max(ks)))
        at = bk.gather(prefix, bk.constant([k - 1 for k in ks], "int64", flat))
        return bk.concat([at, bk.reshape(bk.sum(sq), (1,)),
                          bk.reshape(bk.max(bk.abs(x)), (1,))])

    def route(self, d: int, dtype: str, compressor, costs: Costs | None, profile=None,
              allreduce: bool = True, cast: bool = False, feedback: bool = True) -> Route:
        """The plan for one tensor of ``d`` entries of ``dtype`` (see the module
        docstring): ``profile`` is the sum over ranks of :meth:`profile` (None: the
        spec's k); ``allreduce``: the tensor's dtype can be allreduced; ``cast``: float16
        can; ``feedback``: the pipeline keeps what top-k does not send."""
        return self._timed(d, dtype, compressor, costs, profile, allreduce, cast,
                           feedback)[0]

    def _timed(self, d, dtype, compressor, costs, profile, allreduce, cast, feedback):
        """(:meth:`route`, its seconds)."""
        if costs is None or d == 0:
            return (DENSE if allreduce else Route("topk", compressor.k_for(d))), 0.0
        ks = self.candidates(d, compressor)
        valid = profile is not None and len(profile) == len(ks) + 2 and \
            all(map(math.isfinite, profile)) and profile[-2] > 0
        shares = [t / profile[-2] for t in profile[:-2]] if valid else [1.0]
        value = ITEMSIZE[compressor.values or dtype]
        times = [costs.sparse_seconds(
            d, 8 * (HEADER_BYTES + k * (ITEMSIZE[index_dtype_for(d)] + value)))
            for k in ks[:len(shares)]]
        # the level: the most share per second (the first of equals: the smaller k)
        best = 0
        for i in range(1, len(times)):
            if shares[i] * times[best] > shares[best] * times[i]:
                best = i
        route, seconds = Route("topk", ks[best]), times[best]
        if not feedback:  # what top-k leaves out is lost: it takes 1 / E(k) as many steps
            seconds = seconds / shares[best] if shares[best] > 0 else math.inf
        # the route: the least time, dense on ties, then top-k
        if allreduce:
            dense = costs.dense_seconds(d, 8 * ITEMSIZE[dtype])
            if dense <= seconds:
                route, seconds = DENSE, dense
            shift = cast_shift(profile[-1]) if valid else None
            if cast and shift is not None and abs(shift) < SHIFT_CLAMP and costs.cast is not None \
                    and dtype == "float32" and costs.cast_seconds(d) < seconds:
                route, seconds = Route("cast", shift=shift), costs.cast_seconds(d)
        return route, seconds

    def plan(self, tensors: dict, compressor, costs: Costs | None, allreduce=(),
             feedback: bool = True) -> dict:
        """Every tensor's route together: ``tensors`` maps names to (d, dtype, profile).
        Each takes :meth:`route`; then, since Horovod fuses a step's allreduces by dtype,
        the casts keep their float16 message only where what they save against each
        tensor's next best route pays for that message's alpha (none where a float16
        tensor goes dense anyway; less float32's where the casts leave no float32 tensor
        dense that would be dense without them)."""
        def timed(d, dtype, profile, cast):
            return self._timed(d, dtype, compressor, costs, profile, dtype in allreduce,
                               cast and "float16" in allreduce, feedback)
        routes = {name: timed(d, dtype, profile, True)[0]
                  for name, (d, dtype, profile) in tensors.items()}
        casts = [name for name, r in routes.items() if r.kind == "cast"]
        if not casts or costs is None:
            return routes
        saved, fallback = 0.0, {}
        for name in casts:
            d, dtype, profile = tensors[name]
            fallback[name], seconds = timed(d, dtype, profile, False)
            saved += seconds - costs.cast_seconds(d)
        dense = {tensors[n][1] for n, r in routes.items() if r.kind == "dense"}
        message = 0.0 if "float16" in dense else costs.half[0]
        if "float32" not in dense and any(r.kind == "dense" for r in fallback.values()):
            message -= costs.allreduce[0]  # the casts leave no float32 message to send
        if saved <= message:
            routes.update(fallback)
        return routes

    def codec(self, k, like: TopK) -> TopK:
        """Top-k at ``k`` in ``like``'s wire formats (one object per k; inside a graph k
        is a tensor, and the payload's size follows it)."""
        if not isinstance(k, int):
            c = TopK(values=like.values, indices=like.indices)
            c.k, c.size_fixed = k, False
            return c
        key = (k, like.values, like.indices)
        if key not in self._codecs:
            self._codecs[key] = TopK(k=k, values=like.values, indices=like.indices)
        return self._codecs[key]

    def choose(self, bk, v, compressor):
        """The spec's compressor (the planned k comes from the frontend, see
        :meth:`route`)."""
        return compressor


def fit_costs(link_bytes, gather_bytes, link_seconds, compute_seconds,
              cast_seconds) -> Costs:
    """Costs from the agreed timings: ``link_seconds`` = allreduce of float32 at the
    sizes ``link_bytes``, allgather at ``gather_bytes``, allreduce of float16 at
    ``link_bytes``; ``compute_seconds`` and ``cast_seconds`` at COMPUTE_SIZES (None
    where the frontend plans no cast)."""
    from .policy import calibrate
    bits, sizes, m = [8 * b for b in link_bytes], list(COMPUTE_SIZES), len(link_bytes)
    gathered = [8 * b for b in gather_bytes]
    return Costs(calibrate(bits, link_seconds[:m]), calibrate(gathered, link_seconds[m:2 * m]),
                 calibrate(sizes, compute_seconds),
                 calibrate(sizes, cast_seconds) if cast_seconds is not None else None,
                 calibrate(bits, link_seconds[2 * m:3 * m]))


def refuse_unmeasured(pipeline, where: str):
    """Raise where a frontend cannot measure the costs ``auto`` routes by (there it would
    send every tensor dense, silently)."""
    if isinstance(pipeline.policy, Auto):
        raise HvdCompressError(
            f"{pipeline.spec()}: auto measures Horovod's allreduce and allgather, which "
            f"{where} does not use yet; use hvd_compress.torch.compression(...) on "
            "Horovod's optimizer, hvd_compress.tensorflow's tape or optimizer, or a fixed "
            "spec such as 'topk:0.01+ef14'")
