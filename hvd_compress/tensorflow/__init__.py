"""TensorFlow 2 frontend: pass ``compression(spec)`` to ``hvd.DistributedGradientTape``
or to the tf_keras ``hvd.DistributedOptimizer``.

    import horovod.tensorflow as hvd
    import hvd_compress.tensorflow as hc

    tape = hvd.DistributedGradientTape(tape, compression=hc.compression("fp16"))

Works inside ``tf.function``. Today ``none`` and ``fp16`` travel through Horovod's
allreduce; the allgather path for bf16, sparse and quantized payloads is not built yet and
those specs raise a clear error.
"""
from .compression import Compression, compression

__all__ = ["Compression", "compression"]
