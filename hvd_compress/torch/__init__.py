"""PyTorch frontend: pass ``compression(spec)`` to ``hvd.DistributedOptimizer``.

    import horovod.torch as hvd
    import hvd_compress.torch as hc

    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                   compression=hc.compression("topk:0.01"))

Casts (fp16, bf16, none) and shared-mask rand-k travel through Horovod's allreduce. Every
other compressor sends packed (index, value) or bit-packed payloads through Horovod's
allgather, one named collective per parameter, so the bytes on the wire shrink with k.
"""
from .compression import Compression, DistributedOptimizer, compression

__all__ = ["Compression", "DistributedOptimizer", "compression"]
