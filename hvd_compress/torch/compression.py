"""The object passed as ``compression=`` to Horovod's PyTorch ``DistributedOptimizer``.

Horovod calls ``compress(tensor)`` without the parameter's name and allreduces whatever it
returns. Sparse payloads need an allgather and stateful or seeded pipelines need the name,
so on its first call from a Horovod optimizer a :class:`Compression` binds itself to that
optimizer: it replaces the instance's ``_allreduce_grad_async(p)`` (Horovod's own files are
untouched) with one that looks up the parameter's name, compresses, launches a collective
named after the parameter and returns a callable handle, which Horovod's ``synchronize()``
calls (supported since Horovod 0.22). The very first tensor of the very first step is
already inside Horovod's allreduce when the binding happens: Horovod allreduces a
one-element float32 placeholder under that parameter's name. Which parameter comes first
differs across ranks (hook order, parameters without gradients), so on its first exchange
*every* parameter allreduces such a placeholder under its name, whichever way it was
bound: every rank then issues the same collectives and none waits for a partner that
never comes.

When it binds, the compression gathers every rank's fingerprints of the optimizer's
parameters (names, shapes, dtypes) and of its spec, seed and transport, in one allgather
(:mod:`hvd_compress.core.agreement`) before any of them moves, so ranks configured
differently, or with a parameter only some of them have, raise :class:`HvdCompressError`
on every rank, naming the parameter and what differs, instead of diverging or hanging.

What to send and when (per tensor from its hook, fused buckets and whole-model vectors
at Horovod's synchronize) is decided here; moving it is a transport's job
(:mod:`hvd_compress.torch.transports`: Horovod's collectives, or an mpi4py communicator).

``DistributedOptimizer`` below binds eagerly instead and takes Horovod's arguments.
"""
from __future__ import annotations

import sys
from typing import Any

from ..core import agreement
from ..core.auto import Auto
from ..core.compressor import check_int
from ..core.exchange import Exchange
from ..core.gtopk import check_pipeline
from ..core.ops import backend_named
from ..core.pipeline import Pipeline, resolve_pipeline
from ..core.rng import Key
from ..errors import HvdCompressError
from .transports import HorovodTransport, MpiTransport, TreeTransport, best_of, scale_factors

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
      fuse_below: gradients with fewer entries than this whose compressor is not a cast
        (sparse and quantized payloads) are fused, like Horovod's fusion buffer:
        concatenated in sorted name order, one bucket per dtype, and compressed and
        exchanged as one vector named ``fused.<first member>+<number of other members>``
        (one budget, one header, one message, one feedback state).
        Biases and normalisation weights then stop paying a collective and a Python
        round each; the large tensors still travel one by one during the backward pass.
        Default 0: every tensor alone. 65536 suits most models; on a slow link with many
        small tensors, larger. Part of the fingerprint: every rank must use the same.
      transport: ``"allgather"`` (default: every rank receives every rank's payload, by
        Horovod's allgather or the ``comm``'s) or ``"tree"``: global top-k (gTop-k,
        :mod:`hvd_compress.core.gtopk`), payloads merged up a binomial tree and broadcast
        over mpi4py point-to-point messages (on ``comm``, default ``MPI.COMM_WORLD``,
        whose ranks must be the optimizer's), so each rank moves O(k log n) bytes at most
        instead of O(k n): for many ranks. Needs ``topk:RATIO+ef14``.
      nonfinite: ``"propagate"`` (default: a NaN or infinity in any rank's gradient gives
        every rank a NaN gradient for that parameter and leaves the feedback state as it
        was, like dense Horovod, so ``torch.amp.GradScaler`` skips the step) or
        ``"raise"`` (HvdCompressError on every rank, naming the parameter and ranks).

    With ``auto`` in the spec (``"auto"``, ``"topk:0.01+ef21sgdm+auto"``), every rank
    profiles its gradients on the step before each measurement, then measures the
    transport's allreduce and allgather (Horovod's, or MPI's with ``comm=``: there no
    float16 cast, which MPI cannot sum), this package's compression and the cast at the
    first launch of step 1 and every ``every`` steps after (see
    :mod:`hvd_compress.core.auto`); each tensor (or fused bucket) takes a dense
    allreduce, a float16 cast or top-k at the k that sends the most of the gradient per
    second. ``exchange.costs`` and ``exchange.profiles`` hold what every rank agreed on,
    ``exchange.route(name, d, dtype)`` each tensor's plan.

    Attributes:
      telemetry: one record per parameter per step (bits sent, entries kept, time).
      pipeline: the resolved pipeline (``pipeline.compressor``, ``pipeline.feedback``).

    Save :meth:`state_dict` beside the optimizer's in checkpoints: feedback state and step
    counters are part of what training learned.
    """

    def __init__(self, spec, seed: int = 0, measure_error: bool = False, comm=None,
                 whole_model: bool = False, nonfinite: str = "propagate", fuse_below: int = 0,
                 transport: str = "allgather"):
        if transport not in ("allgather", "tree"):
            raise HvdCompressError(
                f"compression: transport={transport!r} must be 'allgather' or 'tree'")
        self.tree = transport == "tree"
        if self.tree and comm is None:
            from mpi4py import MPI
            comm = MPI.COMM_WORLD
        pipeline = resolve_pipeline(spec)
        # Horovod's torch allreduce has no bfloat16 kernel: bf16 payloads are gathered;
        # over mpi4py everything is gathered but auto's dense route (MPI sums no float16)
        dtypes = ("float16", "float32", "float64") if comm is None else \
            ("float32", "float64") if isinstance(pipeline.policy, Auto) else ()
        self.fuse_below = check_int("compression", "fuse_below", fuse_below, 0)
        route = ("mpi4py" if comm is not None else "horovod") + \
            ("/tree" if self.tree else "") + \
            ("/whole-model" if whole_model else "") + \
            (f"/fuse-below={self.fuse_below}" if self.fuse_below else "")
        self.exchange = Exchange(pipeline, seed, allreduce_dtypes=dtypes,
                                 measure_error=measure_error, nonfinite=nonfinite,
                                 transport=route)
        if self.tree:
            check_pipeline(self.exchange.pipeline, "compression(transport='tree')")
        self._auto = self.exchange.pipeline.policy if \
            isinstance(self.exchange.pipeline.policy, Auto) else None
        self._round = 0          # steps launched
        self._round_names: set[str] = set()  # ... and this one's names
        self._measure_at = 1     # auto: the step that measures the costs next
        self._measured = 0       # ... and how many measurements ran (collective names)
        self._introduced: set = set()  # parameters whose placeholder allreduce was issued
        self.comm = comm
        self.transport = None  # how payloads travel, chosen when bound to an optimizer
        self.whole_model = bool(whole_model)
        self._model_grads: dict[str, Any] = {}       # name -> gradient, fused or whole-model
        self._buckets: list = []                     # this step's started buckets
        self._agreed_grads: dict[str, Any] = {}      # name -> gradient, dynamic:agree=true
        self._agreed: dict[str, Any] = {}            # name -> wait() of a started one
        self._held_placeholders: list = []  # waits of held gradients' placeholders
        self._model_updates: dict[str, Any] = {}     # name -> its slice of the update
        self.pipeline = self.exchange.pipeline
        self.telemetry = self.exchange.telemetry
        self._optimizer = None
        self._steps_agreed = False  # whether this process's first exchange compared steps
        self._bk = backend_named("torch")

    def __repr__(self):
        return f"hvd_compress.torch.compression({self.pipeline.spec()!r})"

    def state_dict(self) -> dict:
        """Feedback state and step counters, and who wrote them (format, rank, world
        size, spec, seed); ``torch.load(weights_only=True)`` reads it back. Its tensors
        are the live state, which later steps overwrite in place, as a torch
        optimizer's are: save it, or ``copy.deepcopy`` it to keep it in memory. For one
        file for all ranks see :mod:`hvd_compress.checkpoint`."""
        from ..checkpoint import sync_group
        return sync_group(self).state_dict()

    def load_state_dict(self, state: dict, process_set=None):
        """Resume from :meth:`state_dict`. Raises HvdCompressError (changing nothing)
        where ``state`` holds feedback state of another rank, world size or feedback
        rule. ``process_set``: the Horovod process set this compression averages
        over, where it is not bound to its optimizer yet (default: Horovod's global set)."""
        from ..checkpoint import sync_group
        sync_group(self, process_set).load_state_dict(state)

    def _group(self, process_set=None):
        """(rank, world size, allgather of picklable objects) of the ranks this compression
        averages over: its mpi4py comm, else ``process_set``, its optimizer's, or Horovod's
        global set; None where Horovod is not initialized."""
        if self.comm is not None:
            return self.comm.Get_rank(), self.comm.Get_size(), self.comm.allgather
        import torch
        import horovod.torch as hvd

        from ..checkpoint import allgather_objects
        if not hvd.is_initialized():
            return None
        ps = process_set or getattr(self._optimizer, "process_set", None) or \
            hvd.global_process_set
        return ps.rank(), ps.size(), allgather_objects(lambda a, name: hvd.allgather(
            torch.from_numpy(a), name=name, process_set=ps).numpy())

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
        from horovod.torch.mpi_ops import Adasum
        if not hasattr(optimizer, "op") or optimizer.op == Adasum:
            raise _adasum_error(self.pipeline.spec())  # Adasum reduces model deltas
        if self._plans_per_tensor() and getattr(optimizer, "_groups", None):
            raise _groups_error(self.pipeline)
        if self.comm is not None and self.comm.Get_size() != optimizer.process_set.size():
            raise HvdCompressError(
                f"the mpi4py communicator has {self.comm.Get_size()} ranks, the optimizer's "
                f"process set {optimizer.process_set.size()}: payloads must travel between "
                "the ranks the optimizer averages over")
        if self.comm is None:
            self.transport = HorovodTransport(optimizer)
        else:
            kind = TreeTransport if self.tree else MpiTransport
            self.transport = kind(self.comm, before_flush=self._start_buckets)
        original = optimizer._allreduce_grad_async

        def _allreduce_grad_async(p):
            if p.grad is not None and p.grad.is_sparse and not optimizer.sparse_as_dense:
                return original(p)  # Horovod's own sparse allgather path
            name, tensor = _named_grad(optimizer, p)
            return self._launch(optimizer, name, tensor), _Handled()

        def _grouped_allreduce_grad_async(ps):
            return self._launch_group(optimizer, [_named_grad(optimizer, p) for p in ps])

        self._agree_on_parameters(optimizer)
        optimizer._allreduce_grad_async = _allreduce_grad_async
        optimizer._grouped_allreduce_grad_async = _grouped_allreduce_grad_async
        self._optimizer = optimizer
        # what perturb spreads its noise over: every parameter Horovod reduces
        self.exchange.model_size = sum(p.numel() for p in optimizer._parameter_names
                                       if p.requires_grad) or None
        return optimizer

    def _agree_on_parameters(self, optimizer):
        """Raise on every rank unless every rank's optimizer reduces the same parameters
        (names, shapes, dtypes) with the same spec, seed and transport: one allgather,
        waited for here, before any of them moves (see :mod:`hvd_compress.core.agreement`;
        a parameter on one rank only would wait forever for its partners)."""
        import torch
        import horovod.torch as hvd

        named = [(name, p) for p, name in optimizer._parameter_names.items()
                 if p.requires_grad]
        names = [name for name, _ in named]
        layouts = [(tuple(p.shape), str(p.dtype).replace("torch.", "")) for _, p in named]
        hows = [agreement.COMPRESSED] * len(names)
        settings = _settings(optimizer)
        mine = torch.tensor(agreement.rows(self.exchange, names, layouts, hows, settings),
                            dtype=torch.int64).reshape(-1, agreement.WIDTH)
        everyone = hvd.allgather(mine, name=f"{_PREFIX}agree",
                                 process_set=optimizer.process_set)
        agreement.compare(everyone.tolist(), self.exchange, names, layouts, hows,
                          what="parameter", settings=settings)

    def _agree_on_steps(self, optimizer):
        """At this process's first exchange (after any checkpoint was loaded), raise on
        every rank unless every rank holds the same step counters: one allgather of
        :func:`~hvd_compress.core.agreement.steps_row`."""
        import torch
        import horovod.torch as hvd

        self._steps_agreed = True
        names = sorted(self.exchange.steps)
        row = agreement.steps_row(self.exchange.step_counts(names), names)
        if self.comm is not None:
            gathered = self.comm.allgather(row)
        else:
            gathered = hvd.allgather(torch.tensor([row], dtype=torch.int64),
                                     name=f"{_PREFIX}steps",
                                     process_set=optimizer.process_set).tolist()
        agreement.compare_steps(gathered, "tensor")

    # -- Horovod's Compressor interface ------------------------------------------------
    def compress(self, tensor):
        caller = sys._getframe(1)
        opt = caller.f_locals.get("self")
        from_optimizer = caller.f_code.co_name == "_allreduce_grad_async" and \
            hasattr(opt, "_parameter_names")
        if from_optimizer and not hasattr(opt, "op") and not self._plain_cast():
            raise _adasum_error(self.pipeline.spec())
        if from_optimizer and hasattr(opt, "op"):
            self.bind(opt)
            name = caller.f_locals.get("name")
            self._introduced.add(name)  # Horovod allreduces the placeholder we return
            finish = self._launch(opt, name, tensor)
            return _placeholder(tensor), _Handled(finish)
        codec = self.pipeline.compressor
        grouped = any(f.f_code.co_name == "_grouped_allreduce_grad_async"
                      for f in (caller, caller.f_back) if f is not None)
        if grouped and self._plans_per_tensor():
            raise _groups_error(self.pipeline)  # no optimizer of ours takes it either
        if not self._plain_cast():
            raise HvdCompressError(
                f"{self.pipeline.spec()} needs each tensor's name and an allgather: use "
                "hvd_compress.torch.DistributedOptimizer (required with groups=), or pass "
                "this object as compression= to hvd.DistributedOptimizer; a bare allreduce "
                "cannot carry it")
        p = codec.compress(tensor, Key(self.exchange.seed, None, "", 0))
        return p.values, p

    def _plans_per_tensor(self) -> bool:
        """Whether each tensor's level is settled apart (agree=true, auto), which one
        grouped collective cannot carry."""
        return self.pipeline.agrees or self._auto is not None

    def _plain_cast(self) -> bool:
        """Whether the pipeline is a bare deterministic cast that any allreduce can carry."""
        codec = self.pipeline.compressor
        return self.pipeline.spec() == codec.spec() and codec.summable and not codec.stochastic

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
        from horovod.torch.mpi_ops import Sum

        bk, n, summed = self._bk, self.transport.size(), opt.op == Sum
        gather = None
        if self.pipeline.agrees:  # settles k with the other ranks: see _start_buckets
            calls = []

            def gather(row):
                calls.append(row)
                return self.transport.gather_rows(row, f"{_PREFIX}k{len(calls)}:{name}")
        out = self.exchange.begin(bk, name, tensor, self.transport.rank(), gather=gather,
                                  overwrite=True)  # as Horovod's own in-place allreduce
        return out, lambda output: self.transport.finish(self.exchange, bk, output, out, n,
                                                         summed)

    def _send(self, opt, name, tensor):
        """Compress ``tensor`` and hand it to the transport; returns a function that waits
        for every rank's part and returns the update."""
        out, finish = self._begin(opt, name, tensor)
        wait = self.transport.start(out, _PREFIX + name)
        return lambda: finish(wait())

    def _launch(self, opt, name, tensor):
        """Compress ``tensor`` and start its collective, or hold it for its bucket; return
        a callable that finishes it (after the placeholder allreduce of its first
        exchange, where there is one)."""
        if not self._steps_agreed:
            self._agree_on_steps(opt)
        introduce = self._introduce(opt, name, tensor)
        self._count_round(opt, name, tensor)
        if self.whole_model or self._fused(tensor) or self.pipeline.agrees:
            held = self._model_grads if self.whole_model or self._fused(tensor) else \
                self._agreed_grads
            held[name] = tensor
            if introduce is not None:  # run before any bucket forms (see _start_buckets)
                self._held_placeholders.append(introduce)
            return lambda: self._model_update(name)
        if self.comm is not None and introduce is not None:
            # over mpi4py the placeholders are waited for before the flush, which blocks
            # in MPI's collectives
            self._held_placeholders.append(introduce)
            introduce = None
        sent = self._send(opt, name, tensor)
        # the held ones start before this rank waits on anything: a rank that waited
        # first (on a cast's resend) for what another starts only at its first held wait
        # would wait forever
        return _after(introduce, lambda: (self._start_buckets(), sent())[1])

    def _introduce(self, opt, name, tensor):
        """On a parameter's first exchange, the placeholder allreduce under its name (see
        the module docstring) unless Horovod issued it. Returns a function that waits for
        it (None where there is none)."""
        import horovod.torch as hvd

        if name in self._introduced:
            return None
        self._introduced.add(name)
        pre, post = scale_factors(opt)
        held = hvd.allreduce_async_(_placeholder(tensor), name=name, op=opt.op,
                                    prescale_factor=pre, postscale_factor=post,
                                    process_set=opt.process_set)
        return lambda: hvd.synchronize(held)

    def _count_round(self, opt, name, like):
        """Count the steps this compression launched: Horovod launches every parameter
        once per step, so a name seen again opens the next one. With auto, measure the
        costs at the first launch of step 1 and every ``every`` steps after."""
        if name in self._round_names:
            self._round += 1
            self._round_names.clear()
            self.transport.new_step()
        self._round_names.add(name)
        if self._auto is not None and self._round >= self._measure_at:
            self._measure(opt, like)
            self._measure_at = self._round + self._auto.every
        if self._auto is not None:  # the step before a measurement profiles the gradients
            self.exchange.profiling = self._round == self._measure_at - 1

    def _measure(self, opt, like):
        """auto: measure the link, the compression and the cast, and sum the gradients'
        profiles of the step before (see :mod:`hvd_compress.core.auto`). Every rank does
        it at its first launch of the same step, before any tensor of that step is
        compressed, whatever its hook order, and takes the slowest rank's times and the
        same sums: every rank plans every tensor alike."""
        import torch

        from ..core.auto import (
            COMPUTE_SIZES,
            LINK_BYTES,
            LINK_MAX_BYTES,
            LINK_SECONDS,
            cast_from_wire,
            cast_to_wire,
            fit_costs,
        )
        from ..core.ops import ITEMSIZE

        tag, t, ex, bk = f"{_PREFIX}auto:{self._measured}", self.transport, self.exchange, \
            self._bk
        n, rank, casts = t.size(), t.rank(), []
        largest = max([d * ITEMSIZE[dtype] for d, dtype, _ in ex.local_profiles.values()],
                      default=0)
        big = t.link_size(LINK_BYTES[1], LINK_SECONDS, min(largest, LINK_MAX_BYTES),
                          f"{tag}.size", like.device)
        sizes = (LINK_BYTES[0], big)
        gather_sizes = (LINK_BYTES[0], max(LINK_BYTES[1], min(big, LINK_MAX_BYTES // n)))
        times = t.time_link(sizes, gather_sizes, tag, like.device)
        scratch = Exchange(Pipeline(self.pipeline.compressor, self.pipeline.feedback),
                           transport="scratch")
        for d in COMPUTE_SIZES:
            x = torch.randn(d, generator=torch.Generator().manual_seed(d)).to(like.device)

            def compress_and_decode(i):
                out = scratch.begin(bk, f"x{d}", x, rank)
                scratch.finish_gathered(bk, torch.cat([out.wire] * n), out, n, False)

            def cast_route(i):
                """The cast route's own work, as the frontend does it: scale in place and
                cast, read the sum's extremes, write it back scaled (read back, so a
                device finishes it; x ends rounded to float16, which the times do not
                mind)."""
                wire = cast_to_wire(bk, x, 4, in_place=True)
                bk.extremes(wire)
                return float(cast_from_wire(bk, wire, "float32", 4, into=x)[-1])
            times.append(best_of(3, compress_and_decode))
            casts.append(best_of(3, cast_route))
        # the gradients' profiles of the step before, summed over the ranks, in name
        # order; the first collective also tells every rank whether all profiled alike
        names = sorted(ex.local_profiles)
        floats = [v for name in names for v in ex.local_profiles[name][2]]
        agreed = t.over_ranks(times + casts + [len(floats), -len(floats)], f"{tag}.agree")
        m, c = 3 * len(sizes), len(COMPUTE_SIZES)
        if agreed[-2] != -agreed[-1]:
            raise HvdCompressError(
                f"auto: ranks profiled different gradients ({int(-agreed[-1])} to "
                f"{int(agreed[-2])} numbers) on step {self._round - 1}; every rank must "
                "reduce the same parameters, and a step that failed on one rank must fail "
                "on every rank")
        ex.costs = fit_costs(sizes, gather_sizes, agreed[:m], agreed[m:m + c],
                             agreed[m + c:m + 2 * c])
        if floats:
            sums = iter(t.over_ranks(floats, f"{tag}.profiles", op="sum"))
            ex.profiles = {name: (*ex.local_profiles[name][:2],
                                  [next(sums) for _ in ex.local_profiles[name][2]])
                           for name in names}
        ex.local_profiles = {}
        self._measured += 1

    def _fused(self, tensor) -> bool:
        """Whether ``tensor`` travels in a fused bucket: small, and compressed into a
        payload that is gathered (casts are allreduced, and Horovod fuses those itself).
        Every rank decides the same, since the fingerprints make shapes agree."""
        return tensor.numel() < self.fuse_below and not self.pipeline.compressor.summable

    def _model_update(self, name):
        """Held gradients (fused, whole-model, agreed levels): the first call of a step
        starts them all (:meth:`_start_buckets`) and finishes them; each call returns its
        parameter's update (a slice of its bucket's)."""
        if name not in self._model_updates:
            try:
                self._start_buckets()
                buckets, self._buckets = self._buckets, []
                for names, shapes, wait in buckets:
                    update = wait()
                    for n, part, shape in zip(names, update.split([s.numel() for s in shapes]),
                                              shapes):
                        self._model_updates[n] = part.reshape(shape)
                agreed, self._agreed = self._agreed, {}
                for n, wait in agreed.items():
                    self._model_updates[n] = wait()
            except BaseException:
                self._drop_step()
                raise
        return self._model_updates.pop(name)

    def _drop_step(self):
        """Forget everything held for this step: nothing of a failed step may leak into
        the next one (an elastic reset, or a caught error, starts the next step afresh)."""
        for held in (self._model_grads, self._model_updates, self._agreed_grads,
                     self._agreed):
            held.clear()
        self._buckets.clear()
        self._held_placeholders.clear()
        if self.transport is not None:
            self.transport.new_step()

    def _start_buckets(self):
        """Compress and start the held gradients: fused ones as one vector per bucket (one
        per dtype, sorted by name) or the whole model, then those whose k the ranks agree
        on (dynamic:agree=true), one by one in name order: each settles its k with blocking
        gathers, so every rank must reach them in the same order, which hook order does
        not give. Every parameter was launched before Horovod waits on any, so every rank
        holds the same gradients here. Idempotent within a step: the mpi4py transport
        calls it before it moves anything."""
        if not (self._held_placeholders or self._model_grads or self._agreed_grads):
            return  # nothing held (this runs before every wait)
        waits, self._held_placeholders = self._held_placeholders, []
        for wait in waits:  # none stays in flight under a name a bucket reuses
            wait()
        opt = self._optimizer
        self._start_fused(opt)
        agreed, self._agreed_grads = self._agreed_grads, {}
        for name in sorted(agreed):
            self._agreed[name] = self._send(opt, name, agreed[name])

    def _start_fused(self, opt) -> None:
        import torch

        if not self._model_grads:
            return
        by_dtype: dict[Any, list[str]] = {}  # torch dtype -> parameter names
        for n in sorted(self._model_grads):
            by_dtype.setdefault(self._model_grads[n].dtype, []).append(n)
        if self.whole_model and len(by_dtype) > 1:
            raise HvdCompressError(
                "whole_model=True needs gradients of one dtype, got "
                f"{sorted(str(t).replace('torch.', '') for t in by_dtype)}")
        for names in by_dtype.values():
            key = "model" if self.whole_model else f"fused.{names[0]}+{len(names) - 1}"
            grads = [self._model_grads[n] for n in names]
            flat = torch.cat([g.reshape(-1) for g in grads])
            self._buckets.append((names, [g.shape for g in grads],
                                  self._send(opt, key, flat)))
        self._model_grads.clear()

    def _launch_group(self, opt, named):
        """One grouped collective for ``groups=``: Horovod negotiates and fuses them once."""
        if self.comm is not None or self.whole_model:
            raise HvdCompressError("groups= needs per-tensor Horovod collectives; drop groups= "
                                   "or comm= / whole_model=")
        if self._plans_per_tensor():
            raise _groups_error(self.pipeline)
        if not self._steps_agreed:
            self._agree_on_steps(opt)
        placeholders = [self._introduce(opt, name, t) for name, t in named]
        for name, t in named:
            self._count_round(opt, name, t)
        begun = [self._begin(opt, name, t) for name, t in named]
        handle = self.transport.start_group([out for out, _ in begun],
                                            _PREFIX + "group." + named[0][0])
        return handle, [_Grouped(_after_output(first, finish)) for first, (_, finish) in
                        zip(placeholders, begun)]


def _after_output(first, finish):
    """``finish(output)`` once ``first()`` (where there is one) returned."""
    if first is None:
        return finish
    return lambda output: (first(), finish(output))[1]


def _after(first, finish):
    """``finish()`` once ``first()`` (where there is one) returned."""
    if first is None:
        return finish
    return lambda: (first(), finish())[1]


def _placeholder(tensor):
    """What stands in for a gradient in a collective that carries nothing: float32, since
    Horovod's allreduce has no bfloat16 kernel."""
    import torch
    return torch.zeros(1, dtype=torch.float32, device=tensor.device)


def _groups_error(pipeline):
    if pipeline.agrees:
        return HvdCompressError(
            f"{pipeline.spec()}: agree=true settles each tensor's k with the other ranks at "
            "synchronize, one tensor after another in name order, which a grouped "
            "collective launched from its hooks cannot wait for; drop groups= or agree=true")
    return HvdCompressError(
        f"{pipeline.spec()}: auto plans each tensor's route apart (dense, float16 or top-k "
        "at its own k), which one grouped collective cannot carry; drop groups= or auto "
        "(fuse_below= buckets small tensors together)")


def _adasum_error(spec):
    return HvdCompressError(
        f"op=Adasum is not supported by {spec}: Adasum combines whole model deltas that "
        "compressed payloads cannot carry; use op=hvd.Average (the default) or hvd.Sum")


def _settings(opt) -> str:
    """How Horovod's optimizer ``opt`` reduces its gradients, as ranks must agree on it:
    with another op, predivide factor, sparse_as_dense, groups or number of backward
    passes per step, a rank issues other collectives or sums other numbers."""
    import horovod.torch as hvd
    groups = opt._groups
    if isinstance(groups, list):
        groups = [sorted(opt._parameter_names.get(p, "?") for p in g) for g in groups]
    return (f"op={agreement.op_name(hvd, opt.op)}, "
            f"gradient_predivide_factor={opt.gradient_predivide_factor}, "
            f"sparse_as_dense={opt.sparse_as_dense}, groups={groups}, "
            f"backward_passes_per_step={opt.backward_passes_per_step}")


def _named_grad(opt, p):
    """(name, dense gradient) of parameter p, as Horovod would send it."""
    if p.grad is None:
        # Horovod's convention: a rank without this gradient contributes zeros
        p.grad = p.data.new(p.size()).zero_()
    tensor = p.grad.to_dense() if p.grad.is_sparse else p.grad
    return opt._parameter_names.get(p), tensor


def compression(spec_or_object, seed: int = 0, measure_error: bool = False,
                comm=None, whole_model: bool = False, nonfinite: str = "propagate",
                fuse_below: int = 0, transport: str = "allgather") -> Compression:
    """What to pass as ``compression=`` to ``horovod.torch.DistributedOptimizer``.

    Args:
      spec_or_object: a spec string (``"topk:0.01+ef21sgdm"``, ``"fp16"``, ``"qsgd:s=7"``),
        a compressor or pipeline object, or an existing :class:`Compression` (returned as is).
      seed: seed of the stochastic compressors' private random stream.
      measure_error: also log the relative compression error (costs two passes per tensor).
      comm: an mpi4py communicator to carry the payloads instead of Horovod.
      whole_model: one budget and one message across all gradients (see Compression).
      nonfinite: "propagate" (like dense Horovod) or "raise" (see Compression).
      fuse_below: fuse gathered gradients with fewer entries into one message per dtype
        (see Compression).
      transport: "allgather" (default) or "tree", global top-k for many ranks (see
        Compression).
    """
    if isinstance(spec_or_object, Compression):
        return spec_or_object
    return Compression(spec_or_object, seed=seed, measure_error=measure_error, comm=comm,
                       whole_model=whole_model, nonfinite=nonfinite, fuse_below=fuse_below,
                       transport=transport)


def DistributedOptimizer(optimizer, named_parameters=None, compression="none", **kwargs):
    """``horovod.torch.DistributedOptimizer`` with a hvd_compress compression bound eagerly.

    Takes Horovod's arguments (``backward_passes_per_step``, ``op``,
    ``gradient_predivide_factor``, ``groups``, ``sparse_as_dense``, ``process_set``);
    ``compression`` may be a spec string, a compressor, a pipeline or a
    :class:`Compression`. The bound compression is available as ``optimizer.compression``.
    """
    import horovod.torch as hvd

    comp = globals()["compression"](compression)
    opt = hvd.DistributedOptimizer(optimizer, named_parameters=named_parameters,
                                   compression=comp, **kwargs)
    comp.bind(opt)
    opt.compression = comp
    return opt
