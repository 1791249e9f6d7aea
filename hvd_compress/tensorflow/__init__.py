"""TensorFlow 2 frontend: the same compressors, feedback rules and telemetry as PyTorch.

    import horovod.tensorflow as hvd
    import hvd_compress.tensorflow as hc

    comp = hc.compression("topk:0.01+ef21sgdm")
    tape = hvd.DistributedGradientTape(tape, compression=comp)     # Horovod's tape
    tape = hc.DistributedGradientTape(tape, compression=comp)      # any variables, Keras 3
    opt = hc.DistributedOptimizer(keras.optimizers.SGD(0.1), compression=comp)  # Keras 3
    opt = hvd.keras.DistributedOptimizer(opt, compression=comp)    # tf_keras

Works inside ``tf.function`` and in ``model.fit``. Sparse and quantized payloads travel as
packed bytes through ``hvd.allgather``; ``none`` and ``fp16`` through Horovod's allreduce
(bf16 is gathered: Horovod's TF allreduce has no bf16 kernel). ``dynamic`` chooses top-k's
k (agreed across ranks or not), QSGD's s and bernoulli's budget inside the graph, and
``auto`` routes each variable by a plan held in variables (see :mod:`.auto`).
"""
from .compression import Compression, compression
from .keras import DistributedOptimizer
from .tape import DistributedGradientTape

__all__ = ["Compression", "compression", "DistributedGradientTape", "DistributedOptimizer"]
