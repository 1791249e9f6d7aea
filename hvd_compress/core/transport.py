"""What every frontend's transports share: how a collective's result becomes an update,
and how ``auto`` times the collectives on the training's own ranks (each transport runs
its own kind of collective in :meth:`Transport._timed` and agrees on numbers in
:meth:`Transport.over_ranks`). Framework-neutral: nothing here imports a framework."""
from __future__ import annotations

import time


class Transport:
    """What every transport shares: how its results become updates, and how auto times
    its collectives (each transport's ``_timed`` runs one kind, ``over_ranks`` agrees)."""

    sums_float16 = True  # its allreduce sums float16 (auto's cast route needs it)

    def new_step(self):
        """A new step's first gradient is launched: forget what the last one held."""

    def finish(self, exchange, bk, result, out, n: int, summed: bool):
        """The update from what ``wait()`` returned for ``out``."""
        read = exchange.finish_allreduced if out.by_allreduce else exchange.finish_gathered
        return read(bk, result, out, n, summed)

    def time_link(self, sizes, gather_sizes, name: str, device) -> list:
        """Seconds of a whole allreduce of float32 (of each of ``sizes``, in bytes handed
        in by every rank), of a whole allgather (``gather_sizes``: every rank receives
        all ranks' parts) and of a whole allreduce of float16 (``sizes``; those of
        float32 where this transport sums no float16), the best of two after one more;
        blocking, so every rank must call it at the same point of its sequence of
        collectives."""
        times: list[float] = []
        for kind in ("allreduce", "allgather", "allreduce16"):
            if kind == "allreduce16" and not self.sums_float16:
                times += times[:len(sizes)]
                continue
            for nbytes in gather_sizes if kind == "allgather" else sizes:
                times.append(self._timed(kind, nbytes, f"{name}.{kind}.{nbytes}", device))
        return times

    def link_size(self, nbytes: int, seconds: float, largest: int, name: str,
                  device) -> int:
        """The first of ``nbytes``, 4 ``nbytes``, 16 ``nbytes``, ... whose float32
        allreduce takes at least ``seconds`` on some rank, or that is not below some
        rank's ``largest``; blocking, and every rank returns the same (any rank's reason
        to stop stops every rank)."""
        while True:
            took = self._timed("allreduce", nbytes, f"{name}.{nbytes}", device)
            if self.over_ranks([float(took >= seconds or nbytes >= largest)],
                               f"{name}.{nbytes}.stop")[0]:
                return nbytes
            nbytes *= 4

    def _timed(self, kind: str, nbytes: int, name: str, device) -> float:
        """Seconds of one whole collective of ``kind`` ("allreduce" of float32,
        "allreduce16", "allgather" of bytes) of ``nbytes`` per rank."""
        raise NotImplementedError

    def over_ranks(self, values, name: str, op: str = "max") -> list:
        """Every rank's float ``values``, elementwise ``op`` ("max" or "sum") over the
        ranks, the same numbers on every rank (blocking; float64)."""
        raise NotImplementedError


def best_of(repeats, fn):
    """The shortest wall time of ``fn(i)`` over ``repeats`` calls, after one more."""
    best = float("inf")
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        fn(i)
        if i:
            best = min(best, time.perf_counter() - t0)
    return best
