"""Exact per-step, per-tensor accounting of what compression sent.

Every frontend records one :class:`Record` per tensor per step: the bits its payload took
on the wire (header included), the entries it encoded, the tensor's size, the seconds
spent compressing and, when asked for, the compression error. Totals and ratios
against the dense tensor count every record; the most recent rows are kept (a bounded
log: a row takes about 220 bytes, and a model of 160 tensors trained for 100,000 steps
would otherwise hold 3.5 GB of them per rank) and can be written as CSV or as
TensorBoard scalars.
"""
from __future__ import annotations

import collections
import csv
import threading
from typing import NamedTuple


class Record(NamedTuple):
    step: int
    name: str
    bits: int          # bits this rank handed to the collective for this tensor
    # entries encoded (k for sparse payloads). The name shadows tuple.count on purpose
    # (rows are read as r.count); mypy flags any field that overrides a tuple method.
    count: int  # type: ignore[assignment]
    numel: int         # entries of the dense tensor
    dense_bits: int    # bits the uncompressed tensor would take
    seconds: float | None  # time spent compressing (host wall clock); None inside a TF graph
    error: float | None = None  # ||C(v) - v||^2 / ||v||^2 when measured, else None
    error_sq: float | None = None  # ||C(v) - v||^2 when measured, else None


class Telemetry:
    """A thread-safe log of :class:`Record` rows (autograd hooks may run on threads).

    Args:
      max_rows: how many of the most recent rows :attr:`rows`, :meth:`by_step`,
        :meth:`to_csv` and :meth:`to_tensorboard` see (100,000 by default, about 22 MB;
        None keeps every row). The totals (:meth:`total_bits`, :meth:`dense_bits`,
        :meth:`ratio`, :meth:`summed_error`) count every row recorded since the start
        or the last :meth:`clear`, kept or not; :attr:`dropped` says how many fell out.
        To keep a whole long run, write the rows out as they come (``to_csv`` or
        ``to_tensorboard`` every few thousand steps, then ``clear()``), or set it to
        None.
    """

    def __init__(self, max_rows: int | None = 100_000) -> None:
        self._lock = threading.Lock()
        self._rows: collections.deque[Record] = collections.deque(maxlen=max_rows)
        self.clear()

    @property
    def max_rows(self) -> int | None:
        return self._rows.maxlen

    @max_rows.setter
    def max_rows(self, max_rows: int | None):
        with self._lock:
            kept = collections.deque(self._rows, maxlen=max_rows)
            self.dropped += len(self._rows) - len(kept)
            self._rows = kept

    def record(self, row: Record):
        with self._lock:
            if len(self._rows) == self._rows.maxlen:
                self.dropped += 1
            self._rows.append(row)
            self._bits += row.bits
            self._dense += row.dense_bits
            if row.error_sq is not None:
                self._error_sq += row.error_sq
                self._measured += 1

    @property
    def rows(self) -> list[Record]:
        """The kept rows, oldest first (see ``max_rows``)."""
        with self._lock:
            return list(self._rows)

    def total_bits(self) -> int:
        return self._bits

    def dense_bits(self) -> int:
        return self._dense

    def ratio(self) -> float:
        """Dense bits over sent bits (how many times fewer bits went on the wire)."""
        sent = self.total_bits()
        return self.dense_bits() / sent if sent else float("nan")

    def summed_error(self) -> float:
        """sum over steps and tensors of ||e_t||^2 = ||C(v_t) - v_t||^2, the total error
        that Sahu et al. (NeurIPS 2021) show governs convergence with error feedback
        (needs ``measure_error=True``; nan if nothing was measured)."""
        return float(self._error_sq) if self._measured else float("nan")

    def by_step(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for r in self.rows:
            out[r.step] = out.get(r.step, 0) + r.bits
        return out

    def clear(self):
        """Forget every row and every total."""
        with self._lock:
            self._rows.clear()
            self._bits = self._dense = self.dropped = self._measured = 0
            self._error_sq = 0.0

    def to_csv(self, path: str):
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(Record._fields)
            w.writerows(self.rows)

    def to_tensorboard(self, writer, prefix: str = "hvd_compress"):
        """Write per-step totals and per-tensor bits, k and error as scalars.

        ``writer`` is a torch ``SummaryWriter`` (anything with ``add_scalar(tag, value,
        step)``) or a callable ``(tag, value, step)``, e.g. ``lambda t, v, s:
        tf.summary.scalar(t, v, step=s)`` inside a TF writer's ``as_default()``.
        """
        put = writer if callable(writer) else writer.add_scalar
        for step, bits in sorted(self.by_step().items()):
            put(f"{prefix}/bits", bits, step)
        for r in self.rows:
            put(f"{prefix}/{r.name}/bits", r.bits, r.step)
            put(f"{prefix}/{r.name}/k", r.count, r.step)
            if r.error is not None:
                put(f"{prefix}/{r.name}/error", r.error, r.step)
