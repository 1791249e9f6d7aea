"""Every rank's fingerprints of a whole set of tensors, compared before anything moves.

Ranks that reduce different tensors, or the same ones differently, issue different
collectives, and the collective library waits forever for a partner that never comes. So
before a set's first exchange (a PyTorch optimizer's parameters, a TensorFlow tape's
variables), every rank contributes :func:`rows` to one allgather that every rank issues
alike, and :func:`compare` raises on every rank where they differ, naming the tensor and
what differs. The rows are int64: one ``[count, settings, 0, 0]`` row (``settings``: a
digest of how the frontend reduces the set: Horovod's op, predivide factor, groups...),
then per tensor (in name order) its :class:`~hvd_compress.core.payload.Stamp` and how its
gradient travels.

At the first exchange after that, every rank also compares its step counters
(:func:`steps_row`), which a checkpoint loaded on some ranks only would set apart.
"""
from __future__ import annotations

import zlib

from ..errors import HvdCompressError
from .payload import Stamp, check_stamps

NONE, SPARSE, COMPRESSED = 0, 1, 2  # how a tensor's gradient travels
_HOW = {NONE: "no gradient (None)", SPARSE: "IndexedSlices through Horovod's allgather",
        COMPRESSED: "through the compression"}
WIDTH = 4  # int64 entries per row


def rows(exchange, names, layouts, hows, settings: str = "") -> list:
    """This rank's rows for tensors ``names`` with ``layouts`` ((shape, dtype name) each)
    and ``hows`` (NONE, SPARSE or COMPRESSED each), in name order; ``settings`` says how
    the frontend reduces them (ranks that reduce with another op or other groups issue
    other collectives, or sum other numbers)."""
    order = sorted(range(len(names)), key=lambda i: names[i])
    return [[len(names), zlib.crc32(settings.encode()), 0, 0]] + \
        [[*exchange.stamp(names[i], *layouts[i]), hows[i]] for i in order]


def op_name(hvd, op) -> str:
    """The name of Horovod reduction op ``op`` (Horovod's ops are small ints), from
    Horovod's module ``hvd`` (torch's or TensorFlow's)."""
    for name in ("Average", "Sum", "Adasum", "Min", "Max", "Product"):
        if getattr(hvd, name, None) == op:
            return name
    return str(op)


def compare(gathered, exchange, names, layouts, hows, what: str = "variable",
            settings: str = "") -> bool:
    """Raise :class:`HvdCompressError`, identically on every rank, where the ranks'
    ``gathered`` rows (every rank's :func:`rows`, concatenated in rank order) differ;
    ``names``, ``layouts``, ``hows`` and ``settings`` are this rank's, for the message.
    ``what`` names a tensor ("variable", "parameter")."""
    ranks, digests, i = [], [], 0
    while i < len(gathered):
        n = int(gathered[i][0])
        digests.append(int(gathered[i][1]))
        ranks.append([tuple(int(x) for x in r) for r in gathered[i + 1:i + 1 + n]])
        i += 1 + n
    if len(set(digests)) > 1:
        apart = [k for k, dg in enumerate(digests) if dg != digests[0]]
        raise HvdCompressError(
            f"ranks reduce their {what}s with different settings (this rank: {settings}; "
            f"rank(s) {apart} differ from rank 0): every rank must pass the same reduction "
            "settings to its optimizer or tape")
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


def steps_row(steps, names) -> list:
    """This rank's ``[tensors, least step, largest step, digest]`` (WIDTH ints) for the
    step counters ``steps`` of ``names``: what ranks compare at their first exchange,
    after any checkpoint was loaded. Ranks that resume from different steps (a state
    loaded on some ranks only) would draw other random masks, leave the warm-up at other
    steps and hold other running estimates, diverging silently or issuing different
    collectives."""
    if not names:
        return [0] * WIDTH
    digest = sum(int(s) * (zlib.crc32(n.encode()) | 1) for s, n in zip(steps, names))
    return [len(names), int(min(steps)), int(max(steps)), digest % (1 << 62)]


def compare_steps(gathered, what: str = "variable") -> bool:
    """Raise :class:`HvdCompressError`, identically on every rank, unless every rank's
    :func:`steps_row` (``gathered``: one row per rank, in rank order) is the same."""
    gathered = [tuple(int(x) for x in r) for r in gathered]
    if len(set(gathered)) > 1:
        held = "; ".join(f"rank {r}: " + ("no steps yet" if hi == 0 else
                                          f"{n} {what}s at steps {lo}..{hi}")
                         for r, (n, lo, hi, _) in enumerate(gathered))
        raise HvdCompressError(
            f"ranks start from different compression states ({held}): a checkpoint's "
            "compression state was loaded on some ranks only, or different ones. Every rank "
            "loads its own state (compression.load_state_dict(state) on every rank, with "
            "the state that rank saved) before the first step")
    return True
