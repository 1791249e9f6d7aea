"""The object passed as ``compression=`` to Horovod's TensorFlow APIs, and the named
exchange behind :func:`DistributedGradientTape` and :func:`DistributedOptimizer`.

Horovod's TF ``allreduce`` calls ``compress(tensor)`` without the variable's name and
allreduces what comes back. When that call comes from Horovod's gradient reduction
(``DistributedGradientTape`` or the tf_keras ``DistributedOptimizer``), :class:`Compression`
finds the variable the gradient belongs to in the caller's frames, runs the whole exchange
itself (sparse and quantized payloads travel as packed bytes through ``hvd.allgather``
named after the variable) and hands Horovod an empty tensor, whose allreduce moves no
payload. ``hvd_compress.tensorflow.DistributedGradientTape`` and ``DistributedOptimizer``
route gradients to :meth:`Compression.reduce` directly, without that empty allreduce;
they also work with Keras 3, where Horovod's own wrappers do not.

Everything runs inside ``tf.function`` (and eagerly): state lives in ``tf.Variable``s
keyed by variable name (see :mod:`.exchange`); ``dynamic`` top-k chooses its k in the graph
and QSGD's s and bernoulli's budget too, ``dynamic:agree=true`` agrees on k by two
allgathers in the graph, and ``auto`` reads its plan from variables that its
measurements write (see :mod:`.auto`).
"""
from __future__ import annotations

import re
import sys
import zlib
from typing import cast

from ..core.agreement import COMPRESSED, NONE, SPARSE
from ..core.auto import Auto
from ..core.ops import TensorflowBackend, backend_named
from ..core.pipeline import resolve_pipeline
from ..core.rng import Key
from ..errors import HvdCompressError
from .agree import SiteCheck
from .auto import GraphAuto
from .exchange import VariableExchange
from .transport import HorovodTransport

_PREFIX = "hvd_compress."


class _Handled:
    """ctx of a gradient whose exchange already ran: ``decompress`` returns ``update``."""
    __slots__ = ("update",)

    def __init__(self, update):
        self.update = update


class _Allreduced:
    """ctx of a cast payload that Horovod's allreduce carries: ``finish(output)``."""
    __slots__ = ("finish",)

    def __init__(self, finish):
        self.finish = finish


class Compression:
    """Horovod-compatible TensorFlow compression backed by a hvd_compress pipeline.

    Args:
      spec: ``"topk:0.01"``, ``"topk:0.01+ef21sgdm:eta=0.1"``, a compressor or a Pipeline.
      seed: seed of every stochastic draw (mixed with rank, variable name and step).
      measure_error: also log each step's relative compression error per variable.
      nonfinite: ``"propagate"`` (default: a NaN or infinity in any rank's gradient gives
        every rank a NaN gradient for that variable and leaves the feedback state as it
        was, like dense Horovod, so a ``LossScaleOptimizer`` skips the step) or
        ``"raise"`` (an error on every rank naming the variable and the ranks).

    Ranks configured differently (spec, seed, nonfinite rule, variables, which gradients
    are None) fail on every rank, before anything moves: the first time each tape or
    optimizer call runs, the ranks compare their fingerprints (:mod:`.agree`), and every
    gathered payload's header carries them too. Inside a graph the error surfaces as
    TensorFlow's ``InvalidArgumentError`` carrying the message; this package's own tape
    and optimizer re-raise it as :class:`HvdCompressError`.

    Attributes:
      telemetry: one record per variable per executed step (bits sent, entries kept;
        ``seconds`` is None where the exchange ran inside a graph, which has no host clock).
      pipeline: the resolved pipeline.

    Variables are named by ``variable.path`` (Keras 3) or ``variable.name`` without the
    ``:0`` suffix; a name seen twice in one gradient list gets ``#2``, ``#3``, ... in list
    order. Save :meth:`state_dict` with the model's checkpoint: step counters and feedback
    state are part of training.
    """

    def __init__(self, spec, seed: int = 0, measure_error: bool = False,
                 nonfinite: str = "propagate"):
        self.exchange = VariableExchange(resolve_pipeline(spec), seed,
                                         measure_error=measure_error,
                                         allreduce_dtypes=("float16", "float32", "float64"),
                                         nonfinite=nonfinite, transport="horovod")
        self.pipeline = self.exchange.pipeline
        self.telemetry = self.exchange.telemetry
        codec = self.pipeline.compressor
        self._plain_cast = self.pipeline.spec() == codec.spec() and codec.summable and \
            not codec.stochastic
        self._bk = cast(TensorflowBackend, backend_named("tensorflow"))
        self._compiled: dict = {}
        # auto: the plan in variables, and its measurements (see .auto)
        self.auto = GraphAuto(self) if isinstance(self.pipeline.policy, Auto) else None
        self._check = SiteCheck(self.exchange)  # every rank's variables, before they move

    def __repr__(self):
        return f"hvd_compress.tensorflow.compression({self.pipeline.spec()!r})"

    def state_dict(self) -> dict:
        """Feedback state (numpy arrays) and step counters, and who wrote them (format,
        rank, world size, spec, seed). For ``tf.train.Checkpoint`` see
        :meth:`checkpointable`; for one file for all ranks :mod:`hvd_compress.checkpoint`."""
        from ..checkpoint import map_tensors, sync_group, to_host
        return map_tensors(sync_group(self).state_dict(), to_host)

    def load_state_dict(self, state: dict, process_set=None):
        """Resume from :meth:`state_dict`, now if the state's variables exist, else when
        the first step creates them. Raises HvdCompressError (changing nothing) where
        ``state`` holds feedback state of another rank, world size or feedback rule.
        ``process_set``: the Horovod process set this compression averages over,
        where no step has told it yet (default: Horovod's global set)."""
        from ..checkpoint import sync_group
        sync_group(self, process_set).load_state_dict(state)

    def checkpointable(self, process_set=None):
        """This compression's state as a ``tf.train.Checkpoint`` dependency:
        ``tf.train.Checkpoint(model=model, compression=comp.checkpointable())`` (the same
        object on every call). See :func:`hvd_compress.checkpoint.trackable`."""
        from ..checkpoint import trackable
        held = getattr(self, "_checkpointable", None)
        if held is None or held.process_set is not process_set:
            held = self._checkpointable = trackable(self, process_set)
        return held

    def _group(self, process_set=None):
        """(rank, world size, allgather of picklable objects) of ``process_set`` (default:
        Horovod's global set); None where Horovod is not initialized."""
        import horovod.tensorflow as hvd

        from ..checkpoint import allgather_objects
        if not hvd.is_initialized():
            return None
        ps = hvd.global_process_set if process_set is None else process_set
        tf = self._bk.tf
        return ps.rank(), ps.size(), allgather_objects(lambda a, name: hvd.allgather(
            tf.constant(a), name=name, process_set=ps, ignore_name_scope=True).numpy())

    # -- Horovod's Compressor interface ------------------------------------------------
    def compress(self, tensor):
        found = _horovod_caller(tensor)
        if found is None:
            if self.auto is not None:
                raise HvdCompressError(
                    f"{self.pipeline.spec()}: auto plans every variable together; pass it to "
                    "hvd_compress.tensorflow.DistributedGradientTape or DistributedOptimizer, "
                    "not to a bare hvd.allreduce")
            if not self._plain_cast:
                raise HvdCompressError(
                    f"{self.pipeline.spec()} needs each gradient's variable and an allgather: "
                    "pass it to hvd.DistributedGradientTape or the tf_keras "
                    "hvd.DistributedOptimizer (or use hvd_compress.tensorflow's), not to a "
                    "bare hvd.allreduce")
            p = self.pipeline.compressor.compress(tensor, Key(self.exchange.seed, None, "", 0))
            return p.values, p
        name, op, process_set, variables, grads = found
        if self.auto is not None:
            raise HvdCompressError(
                f"{self.pipeline.spec()}: auto plans every variable together at its "
                "measurements, which Horovod's own tape and optimizer hand over one by one; "
                "use hvd_compress.tensorflow.DistributedGradientTape or DistributedOptimizer")
        self._refuse_xla()
        self.exchange.model_size = model_size(variables)
        tf = self._bk.tf
        transport = self._transport(op, process_set)
        gate, passed = self._check.gate(unique_names(variables), variables,
                                        [how_sent(g, False) for g in grads], transport, grads)
        with tf.control_dependencies([] if gate is None else [gate]):
            return _unconverted(self._compress_named)(name, passed.get(tensor.ref(), tensor),
                                                      transport)

    def _compress_named(self, name, tensor, transport):
        """compress() of the gradient of variable ``name`` within Horovod's reduction,
        after the check of every rank's variables (see :mod:`.agree`)."""
        if self._plain_cast:  # Horovod's allreduce carries cast values it can sum
            bk, ex, t = self._bk, self.exchange, transport
            out = ex.begin(bk, name, tensor, t.rank())
            if out.by_allreduce:
                return out.wire, _Allreduced(lambda red: t.finish(ex, bk, red, out, t.size(),
                                                                  t.summed))
            update = self._move(out, transport)
        else:
            update = self._exchange(name, tensor, transport)
        return self._bk.tf.zeros([0], tensor.dtype), _Handled(update)

    def decompress(self, tensor, ctx):
        if isinstance(ctx, _Handled):
            return ctx.update
        if isinstance(ctx, _Allreduced):
            return ctx.finish(tensor)
        return self.pipeline.compressor.decompress(ctx._replace(values=tensor))

    # -- the named path ----------------------------------------------------------------
    def reduce(self, grads, variables, op=None, process_set=None, sparse_as_dense=False,
               gradient_predivide_factor=1.0):
        """Average (or sum) ``grads`` over the ranks of ``process_set`` through this
        compression; ``variables`` name them. ``None`` gradients stay None; IndexedSlices
        go through Horovod's own sparse allgather unless ``sparse_as_dense``. With one
        rank the gradients come back unchanged, as in Horovod."""
        import horovod.tensorflow as hvd
        tf = self._bk.tf

        process_set = hvd.global_process_set if process_set is None else process_set
        transport = self._transport(op, process_set, gradient_predivide_factor)
        grads = list(grads)
        if len(grads) != len(variables):
            raise HvdCompressError(f"{len(grads)} gradients for {len(variables)} variables")
        if process_set.size() <= 1 or not process_set.included():
            return grads
        self._refuse_xla()
        names = unique_names(variables)
        shapes = [tuple(v.shape) for v in variables]
        self.exchange.model_size = model_size(variables)

        def body(gs):
            gate, passed = self._check.gate(names, variables, [how_sent(g, sparse_as_dense)
                                                               for g in gs], transport, gs)
            with tf.control_dependencies([] if gate is None else [gate]):
                return exchange([g if g is None or isinstance(g, tf.IndexedSlices)
                                 else passed.get(g.ref(), g) for g in gs])

        def exchange(gs):
            out, dense = list(gs), []
            for i, g in enumerate(gs):
                if isinstance(g, tf.IndexedSlices) and not sparse_as_dense:
                    out[i] = hvd.allreduce(g, op=transport.op, process_set=process_set)
                elif g is not None:
                    if isinstance(g, tf.IndexedSlices):  # keep the variable's static shape
                        out[i] = tf.reshape(tf.convert_to_tensor(g), shapes[i])
                    dense.append(i)
            if self.auto is not None and dense:
                updates = self.auto.reduce([names[i] for i in dense],
                                           [out[i] for i in dense], transport)
            else:
                updates = [self._exchange(names[i], out[i], transport) for i in dense]
            for i, u in zip(dense, updates):
                out[i] = u
            return out

        if not tf.executing_eagerly():
            return _unconverted(body)(grads)
        # eagerly, one traced function per variable list lets the collectives overlap
        key = (tuple(names), transport.op, process_set.process_set_id, bool(sparse_as_dense),
               float(gradient_predivide_factor))
        fn = self._compiled.get(key)
        if fn is None:
            fn = self._compiled[key] = tf.function(body, autograph=False)
        try:
            return fn(grads)
        except tf.errors.InvalidArgumentError as e:  # raised by a host check in the graph
            ours = re.search(r"HvdCompressError: (.+)", str(e))
            if ours is None:
                raise
            raise HvdCompressError(ours.group(1)) from e

    def _refuse_xla(self):
        """Raise where the graph being traced is compiled by XLA (``jit_compile=True``):
        Horovod's collectives and this package's host callbacks are no XLA operations,
        and XLA's own error names neither."""
        tf = self._bk.tf
        if tf.executing_eagerly():
            return
        try:
            from tensorflow.python.ops.control_flow_util import GraphOrParentsInXlaContext
        except ImportError:  # another TensorFlow: XLA's own error still stops the step
            return
        if GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
            raise HvdCompressError(
                f"{self.pipeline.spec()}: gradients cannot be averaged inside an XLA-compiled "
                "function (tf.function(jit_compile=True), or Keras' jit_compile=True): "
                "Horovod's collectives are not XLA operations. Compile without jit_compile "
                "(Keras: model.compile(..., jit_compile=False))")

    def _exchange(self, name, tensor, transport):
        """Compress ``tensor``, move every rank's payload, return the update."""
        tf, bk, ex = self._bk.tf, self._bk, self.exchange
        step = ex.next_step(name)

        calls = []

        def gather(row):  # dynamic:agree=true: every rank's row (numpy eagerly)
            calls.append(row)
            rows = transport.gather(tf.reshape(tf.convert_to_tensor(row), (1, -1)),
                                    collective_name(f"{name}.k{len(calls)}"))
            return rows.numpy() if tf.executing_eagerly() else rows

        def run(dense):
            out = ex.begin(bk, name, tensor, transport.rank(), step=step, dense=dense,
                           gather=gather)
            return self._move(out, transport, ".dense" if dense else "")

        if not self.pipeline.dense_steps or isinstance(step, int):
            return run(None)
        return tf.cond(step < self.pipeline.dense_steps, lambda: run(True),
                       lambda: run(False))

    def _transport(self, op, process_set, predivide=1.0) -> HorovodTransport:
        """How this reduction's payloads travel (refusing Adasum, which reduces model
        deltas, not compressed gradients)."""
        import horovod.tensorflow as hvd
        if op == hvd.Adasum:
            raise HvdCompressError(f"op=Adasum is not supported by {self.pipeline.spec()}")
        return HorovodTransport(process_set, op, predivide)

    def _move(self, out, transport, suffix=""):
        """The update of ``out``, moved under a collective named after its variable."""
        return transport.move(self.exchange, self._bk, out, collective_name(out.name + suffix))

    def bind(self, owner, op=None, process_set=None, sparse_as_dense=False,
             gradient_predivide_factor=1.0):
        """Route a Horovod tape's or tf_keras optimizer's gradient reduction to
        :meth:`reduce` (replacing that instance's ``_allreduce_grads``)."""
        def allreduce_grads(grads, vars=None, use_generic_names=False):
            if vars is None:
                raise HvdCompressError("hvd_compress needs the variables of the gradients")
            return self.reduce(grads, vars, op=op, process_set=process_set,
                               sparse_as_dense=sparse_as_dense,
                               gradient_predivide_factor=gradient_predivide_factor)

        owner._allreduce_grads = allreduce_grads
        helper = getattr(owner, "_agg_helper", None)  # backward_passes_per_step > 1
        if helper is not None:
            for attr in ("allreduce_grads", "_allreduce_grads"):
                if hasattr(helper, attr):
                    setattr(helper, attr, allreduce_grads)
        return owner


def _unconverted(fn):
    """``fn``, which AutoGraph calls as it is from a converted caller (a user's
    ``tf.function`` or Keras' train step): this package builds its graphs with explicit
    ``tf.cond`` and ``tf.while_loop``, and having AutoGraph rewrite its code costs about
    ten times the tracing (22 s instead of 2 s for one variable of qsgd+dynamic)."""
    import tensorflow as tf
    return tf.autograph.experimental.do_not_convert(fn)


def how_sent(grad, sparse_as_dense: bool) -> int:
    """How a gradient travels, as :class:`~.agree.SiteCheck` compares it across ranks."""
    import tensorflow as tf
    if grad is None:
        return NONE
    return SPARSE if isinstance(grad, tf.IndexedSlices) and not sparse_as_dense else COMPRESSED


def collective_name(name: str) -> str:
    """A Horovod op name for ``name``: TF op names allow few characters and Horovod keeps
    only what follows the last ``/``, so the name is flattened and a checksum of the
    original keeps flattened names apart."""
    flat = re.sub(r"[^A-Za-z0-9_.]", "_", name)
    return f"{_PREFIX}{flat}.{zlib.crc32(name.encode()):08x}"


def variable_name(var) -> str:
    """A variable's name for state keys and collective names: Keras 3's ``path``, else
    ``name`` without the ``:0`` suffix."""
    path = getattr(var, "path", None)
    name = path if isinstance(path, str) else getattr(var, "name", None)
    if not isinstance(name, str):
        raise HvdCompressError(f"cannot name {type(var).__name__} {var!r}")
    return name[:-2] if name.endswith(":0") else name


def unique_names(variables) -> list:
    """Names of ``variables``; repeats get ``#2``, ``#3``, ... in list order."""
    seen: dict[str, int] = {}
    out = []
    for v in variables:
        name = variable_name(v)
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


def model_size(variables):
    """Entries of all ``variables`` together: what ``perturb`` spreads its noise over
    (None where a shape is not fully known, which perturb then refuses)."""
    sizes = [v.shape.num_elements() for v in variables]
    return None if any(s is None for s in sizes) else (sum(sizes) or None)


def _horovod_caller(tensor):
    """(variable name, op, process set, every variable reduced, their gradients) when
    Horovod's gradient reduction is compressing ``tensor``, from its frames; None for any
    other caller."""
    op = process_set = None
    frame = sys._getframe(2)
    while frame is not None:
        loc = frame.f_locals
        if op is None and "op" in loc and "process_set" in loc:
            op, process_set = loc["op"], loc["process_set"]
        grads, variables = loc.get("grads"), loc.get("vars")
        if op is not None and isinstance(grads, (list, tuple)) and \
                isinstance(variables, (list, tuple)) and len(grads) == len(variables):
            for i, g in enumerate(grads):
                if g is tensor:
                    return unique_names(variables)[i], op, process_set, variables, grads
        frame = frame.f_back
    return None


def compression(spec_or_object, seed: int = 0, measure_error: bool = False,
                nonfinite: str = "propagate") -> Compression:
    """What to pass as ``compression=`` to Horovod's TensorFlow tape or tf_keras optimizer,
    or to this package's :func:`DistributedGradientTape` and :func:`DistributedOptimizer`.

    Args:
      spec_or_object: a spec string (``"topk:0.01+ef21sgdm"``, ``"fp16"``, ``"qsgd:s=7"``),
        a compressor or pipeline object, or an existing :class:`Compression` (returned as is).
      seed: seed of the stochastic compressors' private random stream.
      measure_error: also log the relative compression error (two passes per tensor).
      nonfinite: "propagate" (like dense Horovod) or "raise" (see Compression).
    """
    if isinstance(spec_or_object, Compression):
        return spec_or_object
    return Compression(spec_or_object, seed=seed, measure_error=measure_error,
                       nonfinite=nonfinite)
