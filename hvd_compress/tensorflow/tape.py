"""A distributed gradient tape for TensorFlow 2 that works with tf.Variables, tf_keras
and Keras 3 variables alike.

    with tf.GradientTape() as tape:
        loss = loss_fn(model(x), y)
    tape = hc.DistributedGradientTape(tape, compression="topk:0.01+ef21sgdm")
    grads = tape.gradient(loss, model.trainable_variables)   # averaged over ranks

Horovod's own ``DistributedGradientTape`` keys gradients by ``variable.ref()``, which Keras
3 variables lack; this one keys them by name and moves them with Horovod's collectives.
"""
from __future__ import annotations

from ..errors import HvdCompressError
from .compression import compression as _compression


class DistributedGradientTape:
    """Wraps a ``tf.GradientTape``: ``gradient()`` returns gradients averaged (or summed,
    ``op=hvd.Sum``) over the ranks of ``process_set`` through ``compression``.

    Args:
      tape: the tape that recorded the forward pass.
      compression: a :func:`compression` object, made once and reused by every step's
        tape: it holds the feedback state and telemetry. A spec string or compressor is
        accepted only for stateless pipelines (a new tape each step would start afresh).
      op: ``hvd.Average`` (default) or ``hvd.Sum``.
      gradient_predivide_factor, sparse_as_dense, process_set: as in Horovod.

    Every other attribute is the wrapped tape's.
    """

    def __init__(self, tape, compression="none", op=None, gradient_predivide_factor=1.0,
                 sparse_as_dense=False, process_set=None):
        self._tape = tape
        self.compression = _compression(compression)
        pipe = self.compression.pipeline
        if compression is not self.compression and (
                pipe.feedback is not None or pipe.dense_steps):
            raise HvdCompressError(
                f"{pipe.spec()} keeps state across steps: create "
                "hvd_compress.tensorflow.compression(spec) once and pass that object to every "
                "step's tape")
        self._options = dict(op=op, process_set=process_set, sparse_as_dense=sparse_as_dense,
                             gradient_predivide_factor=gradient_predivide_factor)

    def gradient(self, target, sources, output_gradients=None, **kwargs):
        import tensorflow as tf

        grads = self._tape.gradient(target, sources, output_gradients, **kwargs)
        flat_sources = tf.nest.flatten(sources)
        reduced = self.compression.reduce(tf.nest.flatten(grads), flat_sources,
                                          **self._options)
        return tf.nest.pack_sequence_as(grads, reduced)

    def __getattr__(self, name):
        return getattr(self._tape, name)
