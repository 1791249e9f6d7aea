"""Exact top-k selection with a deterministic tie rule, fast on large tensors.

``topk_indices(bk, score, k)`` returns the positions of the k largest entries of ``score``
in ascending position order. Ties at the k-th value are broken toward lower positions, so
numpy, torch and TensorFlow select the same set.

A full ``topk`` over d entries costs tens of memory passes on a CPU. For large d and small
k we first estimate a threshold from a strided sample, keep the candidates above it (one
compare and one compaction pass), and run the exact top-k on the candidates only. If the
sample was unlucky and fewer than k candidates survive, we fall back to the full top-k, so
the result is always exact. The full top-k is the framework's own where it promises the tie
rule (TensorFlow), else a k-th value, a compare and a prefix count of the ties.

On an accelerator (``bk.avoids_syncs``) the sampled path is skipped: its candidate count is
known only once the device has counted them, which would stall the host. The full top-k
there needs no host read: exactly k entries are kept, so their positions have a size known
in advance. (A NaN in the score can leave fewer; the positions are then padded to k, so
the payload keeps its size, and the step is void anyway: the sender's header says its
tensor was not finite.)
"""
from __future__ import annotations

import math

_SAMPLED_MIN_D = 1 << 16      # below this a plain top-k is cheap enough
_SAMPLE_SIZE = 1 << 14


def kth_largest(bk, score, k: int):
    """The k-th largest value of a 1-D score (k >= 1)."""
    return bk.topk_values(score, k)[k - 1]


def _candidates(bk, score, k: int, d: int):
    """Positions that surely include the top k (None if the sample says otherwise)."""
    stride = max(1, d // _SAMPLE_SIZE)
    sample = score[::stride]
    m = bk.size(sample)
    r = k * m / d
    r = min(m, int(r + 4.0 * math.sqrt(r) + 4))
    t = kth_largest(bk, sample, r)
    cand = bk.nonzero(score >= t)
    if bk.size(cand) < k:
        return None
    return cand


def topk_indices(bk, score, k: int):
    """Sorted positions of the k largest entries of the 1-D tensor ``score``."""
    d = bk.size(score)
    if not isinstance(k, int):  # chosen inside a graph: the framework's own top-k
        return bk.topk_positions(score, k)
    if k >= d:
        return bk.arange(d, score)
    cand = None
    sync_free = bk.avoids_syncs(score)
    if bk.eager() and d >= _SAMPLED_MIN_D and k * 16 <= d and not sync_free:
        cand = _candidates(bk, score, k, d)
    if cand is None:
        pos = bk.topk_positions(score, k)
        if pos is not None:
            return pos
        sub = score
    else:
        sub = bk.gather(score, cand)
    v = kth_largest(bk, sub, k)
    above = sub > v
    ties = sub == v
    n_above = bk.sum(bk.astype(above, "int64"))  # stays on the device: no sync here
    tie_rank = bk.cumsum(bk.astype(ties, "int64"))
    keep = above | (ties & (tie_rank <= k - n_above))  # exactly k entries, unless a NaN
    pos = bk.nonzero_exactly(keep, k)
    return pos if cand is None else bk.gather(cand, pos)
