"""How payloads travel between ranks, for the TensorFlow frontend: Horovod's collectives
on one process set, with the reduction's op and predivide factor.

The same object moves a step's payloads inside the graph being traced (:meth:`start`:
an allreduce for summable payloads, an allgather of packed bytes otherwise, named after
the variable) and, eagerly, times the link for ``auto``'s measurements (the
:class:`~hvd_compress.core.transport.Transport` base). Inside a graph a collective's
result is a tensor the step waits for on its own, so ``start`` returns a ``wait()`` that
hands it over, as the PyTorch transports' do once their handle completes.
"""
from __future__ import annotations

from ..core.transport import Transport, best_of


class HorovodTransport(Transport):
    """Horovod's TensorFlow collectives on ``process_set``, reducing with ``op`` (Average
    by default) after dividing by ``predivide``."""

    name = "horovod"

    def __init__(self, process_set, op=None, predivide: float = 1.0):
        import horovod.tensorflow as hvd
        self.process_set = process_set
        self.op = hvd.Average if op is None else op
        self.predivide = float(predivide)
        self.summed = self.op == hvd.Sum

    def rank(self) -> int:
        return self.process_set.rank()

    def size(self) -> int:
        return self.process_set.size()

    def start(self, out, name: str):
        """Start moving every rank's ``out.wire`` under collective ``name``; returns
        ``wait()``, which gives the collective's output."""
        import horovod.tensorflow as hvd
        ps = self.process_set
        if out.by_allreduce:
            average = self.op == hvd.Average
            pre, post = (1.0 / self.predivide, self.predivide) if average else (1.0, 1.0)
            result = hvd.allreduce(out.wire, op=self.op, name=name, process_set=ps,
                                   prescale_factor=pre, postscale_factor=post,
                                   ignore_name_scope=True)
        else:
            result = hvd.allgather(out.wire, name=name, process_set=ps,
                                   ignore_name_scope=True)
        return lambda: result

    def move(self, exchange, bk, out, name: str):
        """The update of ``out``: :meth:`start`, then :meth:`finish`."""
        return self.finish(exchange, bk, self.start(out, name)(), out, self.size(),
                           self.summed)

    def gather(self, tensor, name: str):
        """Every rank's ``tensor``, concatenated along its first axis in rank order."""
        import horovod.tensorflow as hvd
        return hvd.allgather(tensor, name=name, process_set=self.process_set,
                             ignore_name_scope=True)

    def _timed(self, kind, nbytes, name, device):
        import tensorflow as tf
        import horovod.tensorflow as hvd
        ps = self.process_set
        if kind == "allgather":
            buf = tf.zeros([nbytes], tf.uint8)
            return best_of(2, lambda i: self.gather(buf, f"{name}.{i}").numpy())
        dtype = tf.float32 if kind == "allreduce" else tf.float16
        buf = tf.zeros([nbytes // dtype.size], dtype)
        return best_of(2, lambda i: hvd.allreduce(buf, name=f"{name}.{i}", process_set=ps,
                                                  ignore_name_scope=True).numpy())

    def over_ranks(self, values, name, op="max"):
        import tensorflow as tf
        import horovod.tensorflow as hvd
        return [float(v) for v in hvd.allreduce(
            tf.constant(values, tf.float64), op=hvd.Max if op == "max" else hvd.Sum,
            name=name, process_set=self.process_set, ignore_name_scope=True).numpy()]
