"""The object passed as ``compression=`` to Horovod's PyTorch ``DistributedOptimizer``.

Horovod calls ``compress(tensor)`` without the parameter's name and allreduces whatever it
returns. Sparse payloads need an allgather and stateful or seeded pipelines need the name,
so on its first call from a Horovod optimizer a :class:`Compression` binds itself to that
optimizer: it replaces the instance's ``_allreduce_grad_async(p)`` (Horovod's own files are
untouched) with one that looks up the parameter's name, compresses, launches a collective
named after the parameter and returns a callable handle, which Horovod's ``synchronize()``
calls (supported since Horovod 0.22). The very first tensor of the very first step is
already inside Horovod's allreduce when the binding happens: for it a one-element
placeholder is allreduced and the real payload travels as usual.

``DistributedOptimizer`` below binds eagerly instead and takes Horovod's arguments.
"""
from __future__ import annotations

import sys

from ..core.exchange import Exchange
from ..core.ops import backend_named
from ..core.rng import Key
from ..errors import HvdCompressError

_PREFIX = "hvd_compress."


class _Handled:
    """ctx of a gradient that our callable handle already aggregated."""
    __slots__ = ("finish",)

    def __init__(self, finish=None):
        self.finish = finish


class _Grouped:
    """ctx of one gradient of a grouped collective: ``finish(output)`` decodes it."""
    __slots__ = ("finish",)

    def __init__(self, finish):
        self.finish = finish


class Compression:
    """Horovod-compatible compression backed by a hvd_compress pipeline.

    Args:
      spec: ``"topk:0.01"``, ``"topk:0.01+ef21sgdm:eta=0.1"``, a compressor or a Pipeline.
      seed: seed of every stochastic draw (mixed with rank, parameter name and step).
      measure_error: also log each step's relative compression error per parameter.
      comm: an mpi4py communicator to move payloads with instead of Horovod's collectives
        (its ranks must be the optimizer's process set). Exchanges then run when Horovod
        synchronises, in sorted parameter-name order, so they pair up on every rank.
      whole_model: compress all gradients as one vector (one budget across tensors, one
        message per step: the per-message overhead is paid once). The exchange runs when
        Horovod synchronises, so it no longer overlaps the backward pass.

    Attributes:
      telemetry: one record per parameter per step (bits sent, entries kept, time).
      pipeline: the resolved pipeline (``pipeline.compressor``, ``pipeline.feedback``).

    Save :meth:`state_dict` beside the optimizer's in checkpoints: feedback state and step
    counters are part of what training learned.
    """

    def __init__(self, spec, seed: int = 0, measure_error: bool = False, comm=None,
                 whole_model: bool = False):
        # Horovod's torch allreduce has no bfloat16 kernel: bf16 payloads are gathered;
        # over mpi4py everything is gathered
        dtypes = () if comm is not None else ("float16", "float32", "float64")
        self.exchange = Exchange(spec, seed, allreduce_dtypes=dtypes, measure_error=measure_error)
        self.comm = comm
        self._pending: dict[str, object] = {}   # name -> outgoing, awaiting the mpi4py flush
        self._arrived: dict[str, object] = {}   # name -> gathered bytes
        self.whole_model = bool(whole_model)
        self._model_grads: dict[str, object] = {}    # name -> gradient, whole-model mode
        self._model_updates: dict[str, object] = {}  # name -> its slice of the update
        self.pipeline = self.exchange.pipeline
        self.telemetry = self.exchange.telemetry
        self._optimizer = None
        self._bk = backend_named("torch")

    def __repr__(self):
        return f"hvd_compress.torch.compression({self.pipeline.spec()!r})"

    def state_dict(self) -> dict:
        return self.exchange.state_dict()

    def load_state_dict(self, state: dict):
        self.exchange.load_state_dict(state)

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
        original = optimizer._allreduce_grad_async

        def _allreduce_grad_async(p):
            if p.grad is not None and p.grad.is_sparse and not optimizer.sparse_as_dense:
                return original(p)  # Horovod's own sparse allgather path
            return self._launch(optimizer, *_named_grad(optimizer, p)), _Handled()

        def _grouped_allreduce_grad_async(ps):
            return self._launch_group(optimizer, [_named_grad(optimizer, p) for p in ps])

        optimizer._allreduce_grad_async = _allreduce_grad_async
        optimizer._grouped_allreduce_grad_async = _grouped_allreduce_grad_async
        self._optimizer = optimizer
        return optimizer

    # -- Horovod's Compressor interface ------------------------------------------------
    def compress(self, tensor):
        caller = sys._getframe(1)
        opt = caller.f_locals.get("self")
        if caller.f_code.co_name == "_allreduce_grad_async" and hasattr(opt, "_parameter_names"):
            self.bind(opt)
            finish = self._launch(opt, caller.f_locals.get("name"), tensor)
            # Horovod allreduces what we return; later calls bypass this entirely
            return tensor.new_zeros(1), _Handled(finish)
        codec = self.pipeline.compressor
        plain_cast = self.pipeline.spec() == codec.spec() and codec.summable and \
            not codec.stochastic
        if not plain_cast:
            raise HvdCompressError(
                f"{self.pipeline.spec()} needs each tensor's name and an allgather: use "
                "hvd_compress.torch.DistributedOptimizer (required with groups=), or pass "
                "this object as compression= to hvd.DistributedOptimizer; a bare allreduce "
                "cannot carry it")
        p = codec.compress(tensor, Key(self.exchange.seed, None, "", 0))
        return p.values, p

    def decompress(self, tensor, ctx):
        if ctx is None:  # Horovod's own sparse path: already aggregated
            return tensor
        if isinstance(ctx, _Grouped):
            return ctx.finish(tensor)
        if isinstance(ctx, _Handled):
            return tensor if ctx.finish is None else ctx.finish()
        return self.pipeline.compressor.decompress(ctx._replace(values=tensor))

    # -- the named path ----------------------------------------------------------------
    def _begin(self, opt, name, tensor):
        """(outgoing, finish(output) -> update) for one gradient."""
        from horovod.torch.mpi_ops import Adasum, Sum

        if opt.op == Adasum:
            raise HvdCompressError(f"op=Adasum is not supported by {self.pipeline.spec()} "
                                   f"(parameter {name})")
        bk, ps = self._bk, opt.process_set
        if self.comm is not None:
            n, rank = self.comm.Get_size(), self.comm.Get_rank()
        else:
            n, rank = ps.size(), ps.rank()
        summed = opt.op == Sum
        out = self.exchange.begin(bk, name, tensor, rank)
        finish = self.exchange.finish_allreduced if out.by_allreduce \
            else self.exchange.finish_gathered
        return out, lambda output: finish(bk, output, out, n, summed)

    @staticmethod
    def _scale_factors(opt):
        from horovod.torch.mpi_ops import Average
        if opt.op == Average:
            return 1.0 / opt.gradient_predivide_factor, opt.gradient_predivide_factor
        return 1.0, 1.0

    def _launch(self, opt, name, tensor):
        """Compress ``tensor`` and start its collective; return a callable that finishes it."""
        if self.whole_model:
            self._model_grads[name] = tensor
            return lambda: self._model_update(opt, name)
        out, finish = self._begin(opt, name, tensor)
        agreed = self._agree(opt, out)
        if self.comm is not None:
            self._pending[name] = out
            return lambda: agreed(finish(self._gathered(name)))
        wait = self._start(opt, out, _PREFIX + name)
        return lambda: agreed(finish(wait()))

    def _agree(self, opt, out):
        """With dynamic:agree=true, average this rank's proposed k over the ranks beside
        the payload; the returned function records it for the next step and passes the
        update through."""
        if out.proposal is None:
            return lambda update: update
        if self.comm is not None:
            from ..comm.mpi import average_number
            mean = average_number(self.comm, out.proposal)
            wait = lambda: mean  # noqa: E731
        else:
            import horovod.torch as hvd
            import torch
            handle = hvd.allreduce_async(torch.tensor([float(out.proposal)]), op=hvd.Average,
                                         name=f"{_PREFIX}k.{out.name}",
                                         process_set=opt.process_set)
            wait = lambda: hvd.synchronize(handle).item()  # noqa: E731

        def record(update):
            self.exchange.agree(out.name, wait())
            return update
        return record

    def _start(self, opt, out, coll_name):
        """Launch ``out``'s Horovod collective; returns a function waiting for its output."""
        import horovod.torch as hvd

        if out.by_allreduce:
            pre, post = self._scale_factors(opt)
            handle = hvd.allreduce_async_(out.wire, name=coll_name, op=opt.op,
                                          prescale_factor=pre, postscale_factor=post,
                                          process_set=opt.process_set)
        else:
            handle = hvd.allgather_async(out.wire, name=coll_name, process_set=opt.process_set)
        return lambda: hvd.synchronize(handle)

    def _model_update(self, opt, name):
        """Whole-model mode: the first call of a step compresses and exchanges every
        gradient as one vector (sorted by name); each call returns its parameter's slice."""
        import torch

        if name not in self._model_updates:
            names = sorted(self._model_grads)
            grads = [self._model_grads[n] for n in names]
            if len({g.dtype for g in grads}) > 1:
                raise HvdCompressError("whole_model=True needs gradients of one dtype, got "
                                       f"{sorted({str(g.dtype) for g in grads})}")
            flat = torch.cat([g.reshape(-1) for g in grads])
            out, finish = self._begin(opt, "model", flat)
            agreed = self._agree(opt, out)
            if self.comm is not None:
                from ..comm.mpi import allgather_bytes
                update = finish(allgather_bytes(self.comm, out.wire, out.codec.fixed_size))
            else:
                update = finish(self._start(opt, out, _PREFIX + "model")())
            update = agreed(update)
            for n, part, g in zip(names, update.split([g.numel() for g in grads]), grads):
                self._model_updates[n] = part.reshape(g.shape)
            self._model_grads.clear()
        return self._model_updates.pop(name)

    def _gathered(self, name):
        """This rank's view of every rank's payload for ``name`` (mpi4py transport): the
        first call moves every pending payload, in sorted name order on every rank."""
        from ..comm.mpi import allgather_bytes

        if name not in self._arrived:
            for key in sorted(self._pending):
                out = self._pending[key]
                self._arrived[key] = allgather_bytes(self.comm, out.wire, out.codec.fixed_size)
            self._pending.clear()
        return self._arrived.pop(name)

    def _launch_group(self, opt, named):
        """One grouped collective for ``groups=``: Horovod negotiates and fuses them once."""
        import horovod.torch as hvd

        if self.comm is not None or self.whole_model:
            raise HvdCompressError("groups= needs per-tensor Horovod collectives; drop groups= "
                                   "or comm= / whole_model=")

        begun = [self._begin(opt, name, t) for name, t in named]
        kinds = {out.by_allreduce for out, _ in begun}
        if len(kinds) > 1:
            raise HvdCompressError(
                f"group {[n for n, _ in named]} mixes gradients that {self.pipeline.spec()} "
                "sends by allreduce and by allgather (different dtypes); group them apart")
        wires = [out.wire for out, _ in begun]
        name = _PREFIX + "group." + named[0][0]
        if kinds == {True}:
            pre, post = self._scale_factors(opt)
            handle = hvd.grouped_allreduce_async_(wires, name=name, op=opt.op,
                                                  prescale_factor=pre, postscale_factor=post,
                                                  process_set=opt.process_set)
        else:
            handle = hvd.grouped_allgather_async(wires, name=name, process_set=opt.process_set)
        return handle, [_Grouped(_then(finish, self._agree(opt, out))) for out, finish in begun]


def _then(first, second):
    return lambda output: second(first(output))


def _named_grad(opt, p):
    """(name, dense gradient) of parameter p, as Horovod would send it."""
    if p.grad is None:
        # Horovod's convention: a rank without this gradient contributes zeros
        p.grad = p.data.new(p.size()).zero_()
    tensor = p.grad.to_dense() if p.grad.is_sparse else p.grad
    return opt._parameter_names.get(p), tensor


def compression(spec_or_object, seed: int = 0, measure_error: bool = False,
                comm=None, whole_model: bool = False) -> Compression:
    """What to pass as ``compression=`` to ``horovod.torch.DistributedOptimizer``.

    Args:
      spec_or_object: a spec string (``"topk:0.01+ef21sgdm"``, ``"fp16"``, ``"qsgd:s=7"``),
        a compressor or pipeline object, or an existing :class:`Compression` (returned as is).
      seed: seed of the stochastic compressors' private random stream.
      measure_error: also log the relative compression error (costs two passes per tensor).
      comm: an mpi4py communicator to carry the payloads instead of Horovod.
      whole_model: one budget and one message across all gradients (see Compression).
    """
    if isinstance(spec_or_object, Compression):
        return spec_or_object
    return Compression(spec_or_object, seed=seed, measure_error=measure_error, comm=comm,
                       whole_model=whole_model)


def DistributedOptimizer(optimizer, named_parameters=None, compression="none", **kwargs):
    """``horovod.torch.DistributedOptimizer`` with a hvd_compress compression bound eagerly.

    Takes Horovod's arguments (``backward_passes_per_step``, ``op``,
    ``gradient_predivide_factor``, ``groups``, ``sparse_as_dense``, ``process_set``); ``compression``
    may be a spec string, a compressor, a pipeline or a :class:`Compression`. The bound
    compression is available as ``optimizer.compression``.
    """
    import horovod.torch as hvd

    comp = globals()["compression"](compression)
    opt = hvd.DistributedOptimizer(optimizer, named_parameters=named_parameters,
                                   compression=comp, **kwargs)
    comp.bind(opt)
    opt.compression = comp
    return opt
