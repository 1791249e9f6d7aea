"""Exact per-step, per-tensor accounting of what compression sent.

Every frontend records one :class:`Record` per tensor per step: the bits its payload took
on the wire (header included), the entries it encoded, the tensor's size, and the seconds
spent compressing. Totals and ratios against dense fp32 come from these records, and they
can be written as CSV for plotting.
"""
from __future__ import annotations

import csv
import threading
from typing import NamedTuple


class Record(NamedTuple):
    step: int
    name: str
    bits: int          # bits this rank handed to the collective for this tensor
    count: int         # entries encoded (k for sparse payloads)
    numel: int         # entries of the dense tensor
    dense_bits: int    # bits the uncompressed tensor would take
    seconds: float     # time spent compressing (host wall clock)


class Telemetry:
    """A thread-safe log of :class:`Record` rows (autograd hooks may run on threads)."""

    def __init__(self):
        self._rows: list[Record] = []
        self._lock = threading.Lock()

    def record(self, row: Record):
        with self._lock:
            self._rows.append(row)

    @property
    def rows(self) -> list[Record]:
        with self._lock:
            return list(self._rows)

    def total_bits(self) -> int:
        return sum(r.bits for r in self.rows)

    def dense_bits(self) -> int:
        return sum(r.dense_bits for r in self.rows)

    def ratio(self) -> float:
        """Dense bits over sent bits (how many times fewer bits went on the wire)."""
        sent = self.total_bits()
        return self.dense_bits() / sent if sent else float("nan")

    def by_step(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for r in self.rows:
            out[r.step] = out.get(r.step, 0) + r.bits
        return out

    def clear(self):
        with self._lock:
            self._rows.clear()

    def to_csv(self, path: str):
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(Record._fields)
            w.writerows(self.rows)
