"""Exact top-k selection with a deterministic tie rule, fast on large tensors.

``topk_indices(bk, score, k)`` returns the positions of the k largest entries of ``score``
in ascending position order. Ties at the k-th value are broken toward lower positions, so
numpy, torch and TensorFlow select the same set.

A full ``topk`` over d entries costs tens of memory passes on a CPU. For large d and small
k we first estimate a threshold from a strided sample, keep the candidates above it (one
compare and one compaction pass), and run the exact top-k on the candidates only. If the
sample was unlucky and fewer than k candidates survive, we fall back to the full top-k, so
the result is always exact. The exact top-k is the framework's own where it promises the
tie rule (TensorFlow) or where no tie sits at the k-th value (PyTorch on a CPU checks),
else a k-th value, a compare and a prefix count of the ties.
``largest_magnitudes(bk, x, k)`` selects by |x| without writing |x| for the whole tensor:
the candidates are the entries with x >= t or x <= -t (``magnitudes_reaching``, which
hard threshold calls too).

A float32 or float64 torch tensor on a CPU is selected from by numpy, over a view of its
own memory (nothing is copied; the positions come back as a tensor over numpy's
result): torch's compare and compaction kernels run 2x to 3x slower than numpy's at the
one or two threads a data-parallel rank usually runs on (see ``TorchBackend.host_view``).

On an accelerator (``bk.avoids_syncs``) the sampled path is skipped: its candidate count is
known only once the device has counted them, which would stall the host. The full top-k
there needs no host read: exactly k entries are kept, so their positions have a size known
in advance. (A NaN in the score can leave fewer; the positions are then padded to k, so
the payload keeps its size, and the step is void anyway: the sender's header says its
tensor was not finite.)
"""
from __future__ import annotations

import math

import numpy as np

from .ops import backend_named

_SAMPLED_MIN_D = 1 << 16      # below this a plain top-k is cheap enough
# the sample: d / 64 entries, at least 4096 and at most 16384 (the sample's own top-k
# costs as much as the compare pass over d at 80k entries with 16384 of them)
_SAMPLE_SHARE, _SAMPLE_MIN, _SAMPLE_MAX = 64, 1 << 12, 1 << 14
_NUMPY = backend_named("numpy")


def kth_largest(bk, score, k: int):
    """The k-th largest value of a 1-D score (k >= 1)."""
    return bk.topk_values(score, k)[k - 1]


def _sampled(bk, x, d: int, k) -> bool:
    """Whether to narrow the candidates by a sampled threshold first."""
    return isinstance(k, int) and bk.eager() and d >= _SAMPLED_MIN_D and k * 16 <= d and \
        not bk.avoids_syncs(x)


def _threshold(bk, sample, k: int, d: int):
    """A value that, by the sample, at least k of the d entries reach (with margin)."""
    m = bk.size(sample)
    r = k * m / d
    return kth_largest(bk, sample, min(m, int(r + 4.0 * math.sqrt(r) + 4)))


def topk_indices(bk, score, k):
    """Sorted positions of the k largest entries of the 1-D tensor ``score``."""
    view = bk.host_view(score) if isinstance(k, int) else None
    if view is not None:
        return bk.from_host(topk_indices(_NUMPY, view, k), score)
    return _select(bk, score, k, lambda s: s, lambda s, t: s >= t)


def largest_magnitudes(bk, x, k):
    """``topk_indices(bk, |x|, k)``, without a pass that writes |x| where the candidates
    are sampled: |x| >= t is x >= t or x <= -t."""
    view = bk.host_view(x) if isinstance(k, int) else None
    if view is not None:
        return bk.from_host(largest_magnitudes(_NUMPY, view, k), x)
    return _select(bk, x, k, bk.abs, _magnitude_reaches)


def magnitudes_reaching(bk, x, t):
    """The ascending positions of the entries of the 1-D x with |x| >= t, without a pass
    that writes |x| (by numpy over x's own memory where :meth:`Backend.host_view`
    allows)."""
    view = bk.host_view(x)
    if view is not None:
        return bk.from_host(magnitudes_reaching(_NUMPY, view, t), x)
    return _reaching(bk, x, t, _magnitude_reaches)


def _magnitude_reaches(v, t):
    return (v >= t) | (v <= -t)


def _select(bk, x, k, score, reaches):
    """The k entries of x with the largest ``score(x)``; ``reaches(v, t)`` is the mask of
    score(v) >= t, computed from a part v of x."""
    d = bk.size(x)
    if not isinstance(k, int):  # chosen inside a graph: the framework's own top-k
        return bk.topk_positions(score(x), k)
    if k >= d:
        return bk.arange(d, x)
    if _sampled(bk, x, d, k):
        m = min(_SAMPLE_MAX, max(_SAMPLE_MIN, d // _SAMPLE_SHARE))
        t = _threshold(bk, score(x[::max(1, d // m)]), k, d)
        cand = _reaching(bk, x, t, reaches)
        if bk.size(cand) >= k:
            return _exact(bk, score(bk.gather(x, cand)), k, cand)
    return _exact(bk, score(x), k)


def _reaching(bk, x, t, reaches):
    """The ascending positions where ``reaches(x, t)``, block by block where the backend
    runs blocks (the masks stay in cache: 1.3 memory passes over 10M entries at once,
    0.85 in blocks)."""
    spans = bk.blocks(bk.size(x), x)
    if len(spans) == 1:
        return bk.nonzero(reaches(x, t))
    return bk.concat([bk.nonzero(reaches(x[a:b], t)) + a for a, b in spans])


def _exact(bk, score, k: int, cand=None):
    """Sorted positions of the k largest entries of ``score`` (positions in ``cand``
    where the score holds only those candidates)."""
    pos = bk.topk_positions(score, k)
    if pos is not None:
        return pos if cand is None else bk.gather(cand, pos)
    v = kth_largest(bk, score, k)
    above = score > v
    ties = score == v
    n_above = bk.sum(bk.astype(above, "int64"))  # stays on the device: no sync here
    tie_rank = bk.cumsum(bk.astype(ties, "int64"))
    keep = above | (ties & (tie_rank <= k - n_above))  # exactly k entries, unless a NaN
    pos = bk.nonzero_exactly(keep, k)
    return pos if cand is None else bk.gather(cand, pos)


def at_least(bk, x, t):
    """(the ascending positions of the entries of the 1-D x that are >= t, those
    entries), by numpy over x's own memory where :meth:`Backend.host_view` allows."""
    view = bk.host_view(x)
    if view is not None:
        pos = np.flatnonzero(view >= t)
        return bk.from_host(pos, x), bk.from_host(view[pos], x)
    pos = bk.nonzero(x >= t)
    return pos, bk.gather(x, pos)
