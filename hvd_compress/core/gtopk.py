"""Global top-k (gTop-k): k-sparse payloads merged up a tree, so that the bytes each rank
moves grow like k log n instead of the allgather's k n.

Shi, Wang, Chu, Li, Zhang, "A Distributed Synchronous SGD Algorithm with Global Top-k
Sparsification for Low Bandwidth Networks" (ICDCS 2019). An allgather of top-k payloads
hands every rank the k pairs of every other rank: each rank receives k (n - 1) pairs per
tensor, which at 32 ranks and 1% is a third of a dense ring allreduce, and more than it at
100. gTop-k reduces up a binomial tree instead (:func:`schedule`): in round j = 0, 1, ...
every rank r with r mod 2^(j+1) = 2^j sends its current k pairs to rank r - 2^j, which adds
them to its own and keeps the k entries of largest magnitude of the sum (:func:`merge`).
After ceil(log2 n) rounds rank 0 holds k pairs, which it broadcasts. Every rank but 0
sends k pairs up once, and receives one payload per rank that merges into it (rank 0:
one per round) and the broadcast's; on average a rank sends about 2k pairs per tensor
whatever n (rank 0 forwards the broadcast ceil(log2 n) times). Any n works: a rank whose
partner would be n or beyond skips that round.

Nothing is lost. A merge drops entries of the sum that several ranks contributed to; the
merging rank adds what it dropped (the whole sum at those positions, and the rounding of a
``values=`` cast) to its own EF14 residual, where it goes out with a later step. So every
step keeps the conservation EF14's analysis rests on,

    sum_i e_i(after) + G = sum_i (e_i(before) + g_i),

exactly in exact arithmetic (in floating point, up to the rounding of the sums, as for
any sum over ranks),
G being the k-sparse sum every rank applies (divided by n for the average): the virtual
iterate x - step * sum_i e_i / n moves by the true average gradient. The residuals are
not those of per-rank EF14 (a merging rank holds mass of the ranks below it); their sum is.
This is why the tree needs top-k with ``ef14`` and refuses other pipelines
(:func:`check_pipeline`).

Ties at the k-th magnitude go to lower positions, as in local top-k, and a merge adds the
receiver's vector and then the sender's, so G is a deterministic function of the ranks'
gradients, identical on every rank. Partial sums travel in the tensor's dtype (or the
``values=`` cast): with float16 gradients a partial sum can overflow where the allgather,
which adds in float32, would not; the step is then void on every rank, as for a NaN.

Tune k as for top-k + EF14; the global k is the same k, so a step applies k entries where
the allgather applies up to k n.

The transport that moves the messages is :mod:`hvd_compress.comm.tree` (mpi4py
point-to-point).
"""
from __future__ import annotations

from ..errors import HvdCompressError
from .feedback import EF14
from .select import largest_magnitudes
from .sparsifiers import TopK, _wide


def schedule(rank: int, n: int) -> list:
    """This rank's part of the reduction, in order: ``("recv", peer)`` for each round in
    which it merges a partner's payload, then ``("send", peer)`` once (every rank but 0)."""
    steps: list = []
    bit = 1
    while bit < n:
        if rank & bit:
            return steps + [("send", rank - bit)]
        if rank + bit < n:
            steps.append(("recv", rank + bit))
        bit <<= 1
    return steps


def rounds(n: int) -> int:
    """Rounds of the reduction: ceil(log2 n)."""
    return max(n - 1, 0).bit_length()


def merge(bk, codec: TopK, mine, theirs):
    """(the k largest entries of the sum of two payloads, as a payload like ``mine``; the
    rest of the sum as (positions, values)) -- what the merging rank forwards and what it
    keeps in its residual. Forwarded plus kept is exactly ``decode(mine) + decode(theirs)``
    (in the payloads' compute dtype). Only the at most 2k positions the payloads hold are
    touched: a merge costs O(k log k), not a pass over the tensor."""
    k = codec.k_for(_numel(mine.shape))
    positions, where = bk.unique(bk.concat([mine.indices, theirs.indices]))
    total = bk.scatter_add(bk.size(positions), where,  # the receiver's values, then the sender's
                           bk.concat([_wide(bk, mine.values), _wide(bk, theirs.values)]))
    keep = largest_magnitudes(bk, total, k)  # positions are sorted: ties go low, as in top-k
    # in the tensor's dtype, then the codec's wire cast, as a local payload is formed
    forward = codec.pack_at(bk, bk.astype(bk.gather(total, keep), mine.dtype),
                            bk.gather(positions, keep), mine.shape, mine.dtype,
                            _numel(mine.shape))
    sent = bk.astype(_wide(bk, forward.values), bk.dtype(total))
    return forward, (positions, bk.scatter_add_into(total, keep, -sent))


def check_pipeline(pipeline, where: str):
    """Refuse what the tree cannot carry: anything but top-k under EF14, at a fixed k."""
    ok = isinstance(pipeline.compressor, TopK) and isinstance(pipeline.feedback, EF14) \
        and pipeline.policy is None and not pipeline.dense_steps
    if not ok:
        raise HvdCompressError(
            f"{where}: the tree transport (gTop-k) merges top-k payloads on the way and puts "
            f"what a merge drops into the merging rank's EF14 residual, so it needs "
            f"'topk:RATIO+ef14' (optionally with values=, indices= and perturb), at a fixed k "
            f"and without warmup; {pipeline.spec()!r} is not that")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
