"""Every rank's fingerprints of a whole set of tensors, compared before anything moves.

Ranks that reduce different tensors, or the same ones differently, issue different
collectives, and the collective library waits forever for a partner that never comes. So
before a set's first exchange (a PyTorch optimizer's parameters, a TensorFlow tape's
variables), every rank contributes :func:`rows` to one allgather that every rank issues
alike, and :func:`compare` raises on every rank where they differ, naming the tensor and
what differs. The rows are int64: one ``[count, 0, 0, 0]`` row, then per tensor (in name
order) its :class:`~hvd_compress.core.payload.Stamp` and how its gradient travels.
"""
from __future__ import annotations

from ..errors import HvdCompressError
from .payload import Stamp, check_stamps

NONE, SPARSE, COMPRESSED = 0, 1, 2  # how a tensor's gradient travels
_HOW = {NONE: "no gradient (None)", SPARSE: "IndexedSlices through Horovod's allgather",
        COMPRESSED: "through the compression"}
WIDTH = 4  # int64 entries per row


def rows(exchange, names, layouts, hows) -> list:
    """This rank's rows for tensors ``names`` with ``layouts`` ((shape, dtype name) each)
    and ``hows`` (NONE, SPARSE or COMPRESSED each), in name order."""
    order = sorted(range(len(names)), key=lambda i: names[i])
    return [[len(names), 0, 0, 0]] + [[*exchange.stamp(names[i], *layouts[i]), hows[i]]
                                      for i in order]


def compare(gathered, exchange, names, layouts, hows, what: str = "variable") -> bool:
    """Raise :class:`HvdCompressError`, identically on every rank, where the ranks'
    ``gathered`` rows (every rank's :func:`rows`, concatenated in rank order) differ;
    ``names``, ``layouts`` and ``hows`` are this rank's, for the message. ``what`` names
    a tensor ("variable", "parameter")."""
    ranks, i = [], 0
    while i < len(gathered):
        n = int(gathered[i][0])
        ranks.append([tuple(int(x) for x in r) for r in gathered[i + 1:i + 1 + n]])
        i += 1 + n
    counts = [len(r) for r in ranks]
    if len(set(counts)) > 1:
        shown = sorted(names)
        raise HvdCompressError(
            f"ranks reduce different numbers of {what}s together: {counts} by rank (this "
            f"rank: {len(names)}, {', '.join(map(repr, shown[:8]))}"
            f"{', ...' if len(names) > 8 else ''}); every rank must reduce the same {what}s")
    order = sorted(range(len(names)), key=lambda i: names[i])
    for j, i in enumerate(order):
        check_stamps(f"{what} {names[i]!r}", [Stamp(*r[j][:3]) for r in ranks],
                     exchange.describe(*layouts[i]))
        seen = {r[j][3] for r in ranks}
        if len(seen) > 1:
            by = {h: [k for k, r in enumerate(ranks) if r[j][3] == h] for h in sorted(seen)}
            raise HvdCompressError(
                f"ranks reduce the gradient of {what} {names[i]!r} differently: "
                + "; ".join(f"{_HOW[h]} on rank(s) {rs}" for h, rs in by.items())
                + f" (this rank: {_HOW[hows[i]]}); every rank must have a gradient of the "
                "same kind for it")
    return True
