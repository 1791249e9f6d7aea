"""The object passed as ``compression=`` to Horovod's PyTorch ``DistributedOptimizer``.

Horovod calls ``compress(tensor)`` without the parameter's name and allreduces whatever it
returns. Sparse payloads need an allgather and stateful or seeded compressors need the
name, so on its first call from a Horovod optimizer a :class:`Compression` binds itself to
that optimizer: it replaces the instance's ``_allreduce_grad_async(p)`` (Horovod's own
files are untouched) with one that looks up the parameter's name, compresses, launches a
named collective and returns a callable handle, which Horovod's ``synchronize()`` calls
(supported since Horovod 0.22). The very first tensor of the very first step is already in
flight through Horovod's allreduce when the binding happens: for it a one-element
placeholder is allreduced and the real payload goes through the allgather as usual.

``DistributedOptimizer`` below binds eagerly instead and takes Horovod's arguments.
"""
from __future__ import annotations

import sys
import time

from ..core.ops import ITEMSIZE, backend_named
from ..core.payload import pack, split_gathered
from ..core.rng import Key
from ..core.spec import resolve_compressor
from ..core.telemetry import Record, Telemetry
from ..errors import HvdCompressError

_PREFIX = "hvd_compress."


class _Gathered:
    """ctx marking a gradient that our callable handle already aggregated."""
    __slots__ = ("placeholder_result",)

    def __init__(self):
        self.placeholder_result = None


class Compression:
    """Horovod-compatible compression backed by a hvd_compress compressor.

    Args:
      compressor: a spec string such as ``"topk:0.01"`` or a compressor object.
      seed: seed of every stochastic draw (mixed with rank, parameter name and step).

    Attributes:
      telemetry: a :class:`~hvd_compress.core.telemetry.Telemetry` with one record per
        parameter per step (bits sent, entries kept, compression time).
    """

    def __init__(self, compressor, seed: int = 0):
        self.compressor = resolve_compressor(compressor)
        self.seed = int(seed)
        self.telemetry = Telemetry()
        self._steps: dict[str, int] = {}
        self._optimizer = None
        self._bk = backend_named("torch")

    def __repr__(self):
        return f"hvd_compress.torch.compression({self.compressor.spec()!r})"

    # -- checkpointing ---------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume exactly: save it beside the optimizer's."""
        return {"spec": self.compressor.spec(), "seed": self.seed, "steps": dict(self._steps)}

    def load_state_dict(self, state: dict):
        if state.get("spec") != self.compressor.spec():
            raise HvdCompressError(
                f"checkpoint was written with compression {state.get('spec')!r}, "
                f"this run uses {self.compressor.spec()!r}")
        self.seed = int(state["seed"])
        self._steps = dict(state["steps"])

    # -- binding to an optimizer -----------------------------------------------------
    def bind(self, optimizer):
        """Route ``optimizer``'s gradients through this compression (idempotent)."""
        if self._optimizer is optimizer:
            return optimizer
        if self._optimizer is not None:
            raise HvdCompressError(
                "this compression object is already bound to another optimizer; create one "
                "compression(...) per DistributedOptimizer (their state is per parameter name)")
        if not hasattr(optimizer, "_parameter_names"):
            raise HvdCompressError(
                f"{type(optimizer).__name__} is not a Horovod DistributedOptimizer")
        if getattr(optimizer, "_groups", None) is not None and not self.compressor.summable:
            raise HvdCompressError(
                f"{self.compressor.spec()} travels by allgather and does not support "
                "DistributedOptimizer(groups=...) yet; drop groups or use fp16/bf16")
        original = optimizer._allreduce_grad_async

        def _allreduce_grad_async(p):
            if p.grad is None:
                # Horovod's convention: a rank without this gradient contributes zeros
                p.grad = p.data.new(p.size()).zero_()
            if p.grad.is_sparse and not optimizer.sparse_as_dense:
                return original(p)  # Horovod's own sparse allgather path
            tensor = p.grad.to_dense() if p.grad.is_sparse else p.grad
            name = optimizer._parameter_names.get(p)
            return self._launch(optimizer, name, tensor), _Gathered()

        optimizer._allreduce_grad_async = _allreduce_grad_async
        self._optimizer = optimizer
        return optimizer

    # -- Horovod's Compressor interface ------------------------------------------------
    def compress(self, tensor):
        caller = sys._getframe(1)
        opt = caller.f_locals.get("self")
        if caller.f_code.co_name == "_allreduce_grad_async" and hasattr(opt, "_parameter_names"):
            self.bind(opt)
            ctx = _Gathered()
            finish = self._launch(opt, caller.f_locals.get("name"), tensor)
            ctx.placeholder_result = finish
            # Horovod allreduces what we return; later calls bypass this entirely
            return tensor.new_zeros(1), ctx
        if not self.compressor.summable:
            raise HvdCompressError(
                f"{self.compressor.spec()} needs each tensor's name and an allgather; pass this "
                "object as compression= to hvd.DistributedOptimizer (or use "
                "hvd_compress.torch.DistributedOptimizer), not to a bare allreduce")
        p = self.compressor.compress(tensor, Key(self.seed, None, "", 0))
        return p.values, p

    def decompress(self, tensor, ctx):
        if isinstance(ctx, _Gathered):
            return tensor if ctx.placeholder_result is None else ctx.placeholder_result()
        return self.compressor.decompress(ctx._replace(values=tensor))

    # -- the named path ----------------------------------------------------------------
    def _launch(self, opt, name, tensor):
        """Compress ``tensor`` and start its collective; return a callable that finishes it."""
        import horovod.torch as hvd
        import torch
        from horovod.torch.mpi_ops import Adasum, Average

        if opt.op == Adasum:
            raise HvdCompressError(f"op=Adasum is not supported by {self.compressor.spec()} "
                                   f"(parameter {name})")
        bk = self._bk
        step = self._steps.get(name, 0)
        self._steps[name] = step + 1
        rank = opt.process_set.rank()
        n = opt.process_set.size()
        t0 = time.perf_counter()
        payload = self.compressor.compress(tensor, Key(self.seed, rank, name, step))
        coll_name = _PREFIX + name
        # Horovod's torch allreduce has no bfloat16 kernel: bf16 payloads are gathered
        by_allreduce = self.compressor.summable and payload.values.dtype != torch.bfloat16
        if by_allreduce:
            wire = payload.values
            nbytes = bk.size(wire) * ITEMSIZE[bk.dtype(wire)]
        else:
            wire = pack(bk, payload)
            nbytes = bk.size(wire)
        self.telemetry.record(Record(
            step=step, name=name, bits=8 * nbytes, count=int(payload.count),
            numel=tensor.numel(), dense_bits=8 * tensor.numel() * tensor.element_size(),
            seconds=time.perf_counter() - t0))

        if by_allreduce:
            if opt.op == Average:
                pre, post = 1.0 / opt.gradient_predivide_factor, opt.gradient_predivide_factor
            else:
                pre = post = 1.0
            handle = hvd.allreduce_async_(wire, name=coll_name, op=opt.op, prescale_factor=pre,
                                          postscale_factor=post, process_set=opt.process_set)

            def finish():
                out = hvd.synchronize(handle)
                return self.compressor.decompress(payload._replace(values=out))
            return finish

        handle = hvd.allgather_async(wire, name=coll_name, process_set=opt.process_set)
        scale = 1.0 / n if opt.op == Average else 1.0

        def finish():
            gathered = hvd.synchronize(handle)
            parts = split_gathered(bk, gathered, payload, n, self.compressor.fixed_size)
            dense = self.compressor.aggregate(bk, parts)
            if scale != 1.0:
                dense = dense * scale
            return dense.reshape(tensor.shape).to(tensor.dtype)
        return finish


def compression(spec_or_object, seed: int = 0) -> Compression:
    """What to pass as ``compression=`` to ``horovod.torch.DistributedOptimizer``.

    Args:
      spec_or_object: a spec string (``"topk:0.01"``, ``"fp16"``, ``"qsgd:s=7"``), a
        compressor object, or an existing :class:`Compression` (returned as is).
      seed: seed of the stochastic compressors' private random stream.
    """
    if isinstance(spec_or_object, Compression):
        return spec_or_object
    return Compression(spec_or_object, seed=seed)


def DistributedOptimizer(optimizer, named_parameters=None, compression="none", **kwargs):
    """``horovod.torch.DistributedOptimizer`` with a hvd_compress compression bound eagerly.

    Takes Horovod's arguments (``backward_passes_per_step``, ``op``,
    ``gradient_predivide_factor``, ``groups``, ``sparse_as_dense``, ``process_set``);
    ``compression`` may be a spec string, a compressor or a :class:`Compression`.
    The bound compression is available as ``optimizer.compression``.
    """
    import horovod.torch as hvd

    comp = globals()["compression"](compression)
    opt = hvd.DistributedOptimizer(optimizer, named_parameters=named_parameters,
                                   compression=comp, **kwargs)
    comp.bind(opt)
    opt.compression = comp
    return opt
