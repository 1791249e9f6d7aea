"""Exact per-step, per-tensor accounting of what compression sent.

Every frontend records one :class:`Record` per tensor per step: the bits its payload took
on the wire (header included), the entries it encoded, the tensor's size, the seconds
spent compressing and, when asked for, the compression error. Totals and ratios
against the dense tensor come from these records; they can be written as CSV or as
TensorBoard scalars.
"""
from __future__ import annotations

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
    """A thread-safe log of :class:`Record` rows (autograd hooks may run on threads)."""

    def __init__(self) -> None:
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

    def summed_error(self) -> float:
        """sum over steps and tensors of ||e_t||^2 = ||C(v_t) - v_t||^2, the total error
        that Sahu et al. (NeurIPS 2021) show governs convergence with error feedback
        (needs ``measure_error=True``; nan if nothing was measured)."""
        measured = [r.error_sq for r in self.rows if r.error_sq is not None]
        return float(sum(measured)) if measured else float("nan")

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
