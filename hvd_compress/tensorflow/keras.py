"""Keras optimizers that average compressed gradients over Horovod ranks.

``DistributedOptimizer(optimizer, compression=spec)`` accepts

* a **Keras 3** optimizer (``keras.optimizers.*``, the default ``keras`` of TF >= 2.16):
  the instance's ``apply`` (which ``apply_gradients`` and ``model.fit`` call) first
  reduces the gradients through the compression. Horovod's own Keras wrapper cannot take
  Keras 3 optimizers;
* a **tf_keras** optimizer (``TF_USE_LEGACY_KERAS=1``): it is wrapped by
  ``horovod.tensorflow.keras.DistributedOptimizer`` with the same arguments
  (``backward_passes_per_step``, ``op``, ``groups`` ...), whose gradient reduction is then
  routed to the compression.

The bound compression is ``optimizer.compression`` (its ``telemetry``, ``state_dict()``).
"""
from __future__ import annotations

import sys
import types

from ..errors import HvdCompressError
from .compression import compression as _compression


def DistributedOptimizer(optimizer, compression="none", op=None, gradient_predivide_factor=1.0,
                         sparse_as_dense=False, process_set=None, **horovod_kwargs):
    """``optimizer`` with gradients averaged over ranks through ``compression``.

    Args:
      optimizer: a Keras 3 or a tf_keras optimizer.
      compression: a spec string, compressor, pipeline or ``compression(...)`` object.
      op, gradient_predivide_factor, sparse_as_dense, process_set: as in Horovod.
      horovod_kwargs: further arguments of ``horovod.tensorflow.keras.DistributedOptimizer``
        (tf_keras only).
    """
    comp = _compression(compression)
    options = dict(op=op, process_set=process_set, sparse_as_dense=sparse_as_dense,
                   gradient_predivide_factor=gradient_predivide_factor)
    if type(optimizer).__module__.startswith("tf_keras"):
        return _tf_keras(optimizer, comp, options, horovod_kwargs)
    if hasattr(optimizer, "apply") and hasattr(optimizer, "_backend_apply_gradients"):
        if horovod_kwargs:
            raise HvdCompressError(
                f"{sorted(horovod_kwargs)}: not supported with Keras 3 optimizers")
        return _keras3(optimizer, comp, options)
    raise HvdCompressError(f"{type(optimizer).__module__}.{type(optimizer).__name__} is "
                           "neither a Keras 3 nor a tf_keras optimizer")


def _tf_keras(optimizer, comp, options, horovod_kwargs):
    import horovod.tensorflow.keras as hvd_keras

    kwargs = {k: v for k, v in options.items() if v is not None}
    opt = hvd_keras.DistributedOptimizer(optimizer, compression=comp, **kwargs,
                                         **horovod_kwargs)
    comp.bind(opt, **options)
    opt.compression = comp
    return opt


def _keras3(optimizer, comp, options):
    if getattr(optimizer, "compression", None) is not None:
        raise HvdCompressError("this optimizer already averages through a compression")
    if hasattr(optimizer, "inner_optimizer"):
        raise HvdCompressError(_LOSS_SCALING)
    if getattr(optimizer, "gradient_accumulation_steps", None):
        raise HvdCompressError(
            "gradient_accumulation_steps: Keras 3 applies every micro-batch, so each would be "
            "compressed and exchanged; accumulate in your training step instead")
    apply = optimizer.apply

    def reduced_apply(self, grads, trainable_variables=None):
        if _inside_loss_scaling():
            raise HvdCompressError(_LOSS_SCALING)
        variables = self._trainable_variables if trainable_variables is None \
            else list(trainable_variables)
        grads = comp.reduce(list(grads), variables, **options)
        return apply(grads, trainable_variables)

    optimizer.apply = types.MethodType(reduced_apply, optimizer)
    optimizer.compression = comp
    return optimizer


_LOSS_SCALING = (
    "Keras 3 loss scaling (LossScaleOptimizer, added by compile() under the mixed_float16 "
    "policy) applies only on ranks whose gradients are finite, which would leave the others "
    "waiting in the exchange, and scales the feedback state with the loss: not supported; "
    "use the mixed_bfloat16 policy, which needs no loss scaling")


def _inside_loss_scaling() -> bool:
    frame: types.FrameType | None = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return False
        if type(frame.f_locals.get("self")).__name__ == "LossScaleOptimizer":
            return True
        frame = frame.f_back
    return False
