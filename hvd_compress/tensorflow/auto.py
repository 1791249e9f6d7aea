"""``auto`` inside TensorFlow graphs: the plan lives in variables that the steps read.

The rule is PyTorch's (:mod:`hvd_compress.core.auto`); what differs is where it runs.
Inside ``tf.function`` (and so inside ``model.fit``) Python runs only when the step is
traced, so every tensor's route is a set of ``tf.Variable``s (dense, top-k or cast; k;
the cast's shift) and the step branches on them (``tf.switch_case``: every rank reads
the same plan, so every rank takes the same branch and issues the same collectives):

* dense: the gradient goes by Horovod's allreduce as it is (named ``<variable>.dense``);
* top-k: the spec's pipeline at the planned k, a tensor (``tf.math.top_k`` takes one),
  its payload gathered as every top-k payload is (named after the variable);
* cast (float32 only): the gradient scaled by 2**shift goes by Horovod's allreduce in
  float16 (``<variable>.cast``). Every rank holds the same float16 sum, so every rank
  makes the same decisions from it, in the graph: where it is not finite (it
  overflowed, or some rank's gradient was not) or holds zeros only (the gradient is
  zero, or fell below float16's range), the gradient goes again as it is
  (``<variable>.resend``, a telemetry row of count 0); and its extremes move the shift
  for the next steps, as in PyTorch (2^10 smaller after an overflow, larger once the
  sum's largest entry falls 2^10 below the first one seen since the plan, planned
  afresh from the dense sum sent in place of a sum of zeros unless that is zero too,
  dense until the next measurement past 2^±100).

At a measurement (step 1, then every ``every`` steps), before the step's first
exchange, every rank writes each gradient's profile of this step (the energy of its
largest entries for each candidate k, in the graph) into a variable; then one
``tf.py_function`` times Horovod's allreduce (of float32 and of float16) and allgather
eagerly on the training's process set, takes the slowest rank's times (and of the top-k
and cast routes, timed compiled when the step was first traced) and the sum of the
profiles, plans every tensor and writes the plan. Each place that reduces a set of
variables (a tape's or an optimizer's call) keeps its own step count and schedule, so
one compression object can serve several. Step 0, before any plan, sends every tensor
through top-k at the spec's k (its feedback keeps the rest). Ranks whose spec, seed,
nonfinite rule or variables differ are refused before anything moves (:mod:`.agree`).
Warm-up steps (``+warmup:N``) go dense, and a dtype Horovod's TF allreduce cannot sum
(bfloat16) always goes top-k. Two measurements traced into one step (two tapes) run one
after the other, in the order they were traced.

A tensor planned dense or cast keeps its feedback residual (what step 0's top-k left,
about all of that step's gradient at 1%) until a later plan sends it through top-k
again, as in PyTorch when a plan turns a tensor from top-k to dense. Costs, plans and
shifts are measurements, not training state: a restored model measures again (step 1
of the restored run).
"""
from __future__ import annotations

import zlib

from ..core.auto import (
    CAST_HEADROOM,
    COMPUTE_SIZES,
    FLOAT16_MAX,
    HEADROOM_BITS,
    LINK_BYTES,
    LINK_MAX_BYTES,
    LINK_SECONDS,
    SHIFT_CLAMP,
    Auto,
    Costs,
    cast_from_wire,
    cast_to_wire,
    fit_costs,
)
from ..core.exchange import Exchange
from ..core.ops import ITEMSIZE
from ..core.pipeline import Pipeline
from ..core.transport import best_of
from ..errors import HvdCompressError
from .agree import in_trace_order

DENSE, TOPK, CAST = 0, 1, 2  # a route variable's values
ROUTES = {"dense": DENSE, "topk": TOPK, "cast": CAST}
ALLREDUCED = ("float16", "float32", "float64")  # what Horovod's TF allreduce sums


def _floor_log2(x):
    """floor(log2(x)) of a positive normal float64 tensor, read from its exponent bits
    (``math.frexp(x)[1] - 1`` exactly, where a logarithm rounds), as int32."""
    import tensorflow as tf
    bits = tf.bitwise.right_shift(tf.bitcast(x, tf.int64), tf.constant(52, tf.int64))
    return tf.cast(tf.bitwise.bitwise_and(bits, tf.constant(0x7FF, tf.int64)), tf.int32) - 1023


class _Site:
    """One place that reduces a set of variables together (a tape's or an optimizer's
    call, over one process set). Its step count and measurement schedule are those of its
    first variable by name (that variable's own counters: no variable is made for the
    site, so a step retraced with another set of gradients can plan them too), so that a
    compression object shared by two of them plans each from its own gradients."""

    def __init__(self, names, process_set):
        self.names = sorted(names)
        self.tag = f"{zlib.crc32(repr((self.names, process_set.process_set_id)).encode()):08x}"
        self.measured = 0


class GraphAuto:
    """A :class:`~hvd_compress.tensorflow.Compression`'s auto plan and its measurements.

    Attributes:
      costs: the last measurement's :class:`~hvd_compress.core.auto.Costs`, every rank's
        alike (None before the first).
      routes: name -> the :class:`~hvd_compress.core.auto.Route` the last plan of its
        variable chose (a cast's shift as planned; the steps since may have moved it).
    """

    def __init__(self, compression):
        self.compression = compression
        self.auto: Auto = compression.pipeline.policy
        self.costs: Costs | None = None
        self.routes: dict = {}
        # name -> (route, k, profile, the step of its next measurement, the cast's shift,
        # the largest entry of its first float16 sum since the plan) variables
        self._vars: dict[str, tuple] = {}
        self._shapes: dict[str, tuple] = {}  # name -> (entries, dtype)
        self._sites: dict[tuple, _Site] = {}
        self._compute: dict[int, list] = {}  # ranks -> the top-k route's seconds per size
        self._cast_compute: list | None = None  # the cast route's seconds per size

    def reduce(self, names, grads, transport):
        """The updates of ``grads`` (named ``names``) by their planned routes, inside the
        graph being traced; a gradient without entries goes dense, unplanned."""
        kept = [i for i, g in enumerate(grads) if g.shape.num_elements() != 0]
        planned = dict(zip(kept, self._reduce([names[i] for i in kept],
                                              [grads[i] for i in kept], transport))) \
            if kept else {}
        return [planned[i] if i in planned else
                self._dense(m, g, self.compression.exchange.next_step(m), transport)
                for i, (m, g) in enumerate(zip(names, grads))]

    def _dense(self, name, g, at, transport):
        """The dense route: Horovod's allreduce of ``g`` as it is (``<variable>.dense``)."""
        c = self.compression
        return c._move(c.exchange.begin_dense(c._bk, name, g, at), transport, ".dense")

    def _reduce(self, names, grads, transport):
        import tensorflow as tf
        c = self.compression
        bk, ex, compressor = c._bk, c.exchange, c.pipeline.compressor
        site = self._create(names, grads, transport.process_set)
        n = transport.size()
        if n not in self._compute:  # timed where the step is traced (see _time_route)
            with tf.init_scope():
                self._compute[n] = [self._time_route(d, n) for d in COMPUTE_SIZES]
        if self._cast_compute is None:
            with tf.init_scope():
                self._cast_compute = [self._time_cast(d) for d in COMPUTE_SIZES]
        ats = {name: ex.next_step(name) for name in names}
        step, measure_at = ats[site.names[0]], self._vars[site.names[0]][3]

        def measure():
            """This step's profiles, then the measurement (it reads them)."""
            written = [self._vars[name][2].assign(self.auto.profile_tensor(
                bk, tf.reshape(g, [-1]), compressor)) for name, g in zip(names, grads)]
            with tf.control_dependencies(written):
                return tf.py_function(lambda s: self._measure(int(s), site, transport),
                                      [step], tf.int64, name="hvd_compress_auto_measure")
        done = in_trace_order(lambda: tf.cond(step >= measure_at, measure, lambda: step))
        warmup = c.pipeline.dense_steps
        updates = []
        with tf.control_dependencies([done]):
            for name, g in zip(names, grads):
                route, k, shift = (self._vars[name][i].read_value() for i in (0, 1, 4))
                at = ats[name]

                def dense(name=name, g=g, at=at):
                    return self._dense(name, g, at, transport)

                def topk(name=name, g=g, at=at, k=k):
                    out = ex.begin(bk, name, g, transport.rank(), step=at,
                                   dense=False if warmup else None,
                                   level=self.auto.codec(k, compressor))
                    return c._move(out, transport)

                def cast(name=name, g=g, at=at, shift=shift):
                    return self._cast(name, g, at, shift, transport)
                if g.dtype.name not in ALLREDUCED:  # Horovod cannot allreduce it: top-k
                    updates.append(topk())
                    continue
                if warmup:  # warm-up steps are dense whatever the plan
                    route = tf.where(at < warmup, tf.constant(DENSE, tf.int32), route)
                # only float32 is ever planned cast (CAST reaches no other dtype's branches)
                updates.append(tf.switch_case(route, [dense, topk, cast])
                               if g.dtype.name == "float32" else
                               tf.cond(tf.equal(route, DENSE), dense, topk))
        return updates

    def _cast(self, name, g, at, shift, transport):
        """The cast route's update of ``g`` inside the graph: the float16 sum scaled back,
        or where it is not finite or all zeros the sum of ``g`` sent again as it is (see
        the module docstring)."""
        import tensorflow as tf

        from .compression import collective_name
        c = self.compression
        bk, ex = c._bk, c.exchange
        out = ex.begin_dense(bk, name, g, at, shift)
        summed = transport.start(out, collective_name(name + ".cast"))()
        finite = bk.finite_flag(summed)
        largest = tf.where(finite, tf.cast(tf.reduce_max(tf.abs(summed)), tf.float64),
                           tf.constant(0.0, tf.float64))

        def scaled_back():
            return transport.finish(ex, bk, summed, out, transport.size(), transport.summed)

        def resend():
            update = c._move(ex.resent(bk, out), transport, ".resend")
            with tf.control_dependencies(self._rescale_flushed(
                    name, finite, update, 1 if transport.summed else transport.size())):
                return tf.identity(update)
        with tf.control_dependencies(self._follow_scale(name, shift, finite, largest)):
            return tf.cond(largest > 0, scaled_back, resend)

    def _follow_scale(self, name, shift, finite, largest) -> list:
        """The assignments that move the cast's shift for the next steps from this step's
        float16 sum, the rule of PyTorch's (see
        :meth:`~hvd_compress.core.exchange.Exchange._follow_scale`), in the graph: the
        power of two between the first sum's largest entry and this one's is read from
        their quotient's exponent bits (frexp's exactly, where a logarithm rounds)."""
        import tensorflow as tf
        route, _, _, _, shift_var, first = self._vars[name]
        seen = tf.where(first > 0, first, largest)  # the first sum's, since the plan
        power = _floor_log2(seen / tf.where(largest > 0, largest,
                                            tf.constant(1.0, tf.float64)))
        shrank = tf.logical_and(largest > 0, largest * 2.0 ** HEADROOM_BITS < seen)
        moved = tf.where(finite, tf.where(shrank, shift + power, shift),
                         shift - HEADROOM_BITS)
        return [shift_var.assign(moved),
                first.assign(tf.where(finite, seen, first)),
                route.assign(tf.where(tf.abs(moved) < SHIFT_CLAMP,
                                      tf.constant(CAST, tf.int32),
                                      tf.constant(DENSE, tf.int32)))]

    def _rescale_flushed(self, name, finite, update, ranks) -> list:
        """The assignments that plan the cast's shift afresh from the dense ``update`` sent
        in place of a float16 sum of zeros only (``finite``; the average over ``ranks``
        ranks where ``ranks`` > 1), PyTorch's rule (see
        :meth:`~hvd_compress.core.exchange.Exchange.rescale_flushed`) in the graph:
        :func:`~hvd_compress.core.auto.cast_shift` of its largest entry, summed over the
        ranks, unless that is zero (a zero gradient keeps its shift)."""
        import tensorflow as tf
        route, _, _, _, shift_var, first = self._vars[name]
        largest = tf.cast(tf.reduce_max(tf.abs(update)), tf.float64) * float(ranks)
        flushed = tf.logical_and(finite, tf.logical_and(largest > 0,
                                                         tf.math.is_finite(largest)))
        planned = tf.clip_by_value(_floor_log2(
            FLOAT16_MAX / CAST_HEADROOM / tf.where(flushed, largest,
                                                   tf.constant(1.0, tf.float64))),
            -SHIFT_CLAMP, SHIFT_CLAMP)
        return [shift_var.assign(tf.where(flushed, planned, shift_var.read_value())),
                first.assign(tf.where(flushed, tf.constant(0.0, tf.float64),
                                      first.read_value())),
                route.assign(tf.where(tf.logical_and(flushed, tf.abs(planned) >= SHIFT_CLAMP),
                                      tf.constant(DENSE, tf.int32), route.read_value()))]

    def _create(self, names, grads, process_set) -> _Site:
        """Each tensor's plan variables (top-k at the spec's k until the first plan, the
        step of its next measurement, and the cast's shift and first sum), made once
        outside the graph, and the call site (plain Python: see :class:`_Site`)."""
        import tensorflow as tf
        c = self.compression
        key = (tuple(names), process_set.process_set_id)
        if key not in self._sites:
            self._sites[key] = _Site(names, process_set)
        with tf.init_scope():
            for name, g in zip(names, grads):
                if name in self._vars:
                    continue
                d = g.shape.num_elements()
                if d is None:
                    raise HvdCompressError(
                        f"gradient {name!r} has shape {g.shape} inside the graph: auto plans "
                        "by each tensor's size, which must be static")
                ks = self.auto.candidates(d, c.pipeline.compressor)
                self._shapes[name] = (d, g.dtype.name)
                self._vars[name] = (
                    tf.Variable(TOPK, dtype=tf.int32, trainable=False),
                    tf.Variable(ks[0], dtype=tf.int32, trainable=False),
                    tf.Variable(tf.zeros([len(ks) + 2], tf.float64), trainable=False),
                    tf.Variable(1, dtype=tf.int64, trainable=False),  # next measurement
                    tf.Variable(0, dtype=tf.int32, trainable=False),
                    tf.Variable(0.0, dtype=tf.float64, trainable=False))
        return self._sites[key]

    def _measure(self, step: int, site: _Site, link) -> int:
        """Eagerly, inside the step: time the link and the routes, agree with every
        rank, plan every tensor of ``site`` and write the plan (see the module
        docstring)."""
        c = self.compression
        tag = f"hvd_compress.auto:{site.tag}:{site.measured}"
        n = link.size()
        order = sorted(site.names)
        largest = max(d * ITEMSIZE[dt] for d, dt in (self._shapes[m] for m in order))
        big = link.link_size(LINK_BYTES[1], LINK_SECONDS, min(largest, LINK_MAX_BYTES),
                             f"{tag}.size", None)
        sizes = (LINK_BYTES[0], big)
        gather_sizes = (LINK_BYTES[0], max(LINK_BYTES[1], min(big, LINK_MAX_BYTES // n)))
        times = link.time_link(sizes, gather_sizes, tag, None)
        floats = [float(v) for m in order for v in self._vars[m][2].numpy()]
        agreed = link.over_ranks(times + self._compute[n] + self._cast_compute,
                                 f"{tag}.agree")
        m, k = 3 * len(sizes), len(COMPUTE_SIZES)
        self.costs = fit_costs(sizes, gather_sizes, agreed[:m], agreed[m:m + k],
                               agreed[m + k:m + 2 * k])
        sums = iter(link.over_ranks(floats, f"{tag}.profiles", op="sum"))
        tensors = {name: (*self._shapes[name],
                          [next(sums) for _ in range(self._vars[name][2].shape[0])])
                   for name in order}
        routes = self.auto.plan(tensors, c.pipeline.compressor, self.costs,
                                allreduce=ALLREDUCED,
                                feedback=c.pipeline.feedback is not None)
        self.routes.update(routes)
        for name, route in routes.items():
            kind, k, _, _, shift, first = self._vars[name]
            kind.assign(ROUTES[route.kind])
            if route.kind == "topk":
                k.assign(route.k)
            shift.assign(route.shift)
            first.assign(0.0)
        for name in order:
            self._vars[name][3].assign(step + self.auto.every)
        site.measured += 1
        return step

    def _time_route(self, d: int, n: int) -> float:
        """Seconds of the top-k route's own work on a tensor of ``d`` entries (compress
        and the decoding of n ranks' payloads), compiled as the steps run it. Timed once,
        eagerly, when the step is first traced: inside the measurement's
        ``tf.py_function`` a compiled function whose host callbacks need the Python lock
        that function holds would wait forever, and the compute, unlike the link, does
        not change while training runs."""
        import tensorflow as tf
        c = self.compression
        bk = c._bk
        scratch = Exchange(Pipeline(c.pipeline.compressor, c.pipeline.feedback),
                           transport="scratch")
        x = tf.random.stateless_normal([d], seed=[d, 0])

        @tf.function(autograph=False)
        def route(x):
            out = scratch.begin(bk, f"x{d}", x, 0, step=0)
            return scratch.finish_gathered(bk, tf.concat([out.wire] * n, 0), out, n, False)
        route(x)  # traced here, not timed
        return best_of(3, lambda i: route(x).numpy())

    def _time_cast(self, d: int) -> float:
        """Seconds of the cast route's own work on a tensor of ``d`` entries, compiled as
        the steps run it (scale and cast, the sum's finiteness and largest entry, cast
        back and scale); timed once, eagerly, as :meth:`_time_route`."""
        import tensorflow as tf
        bk = self.compression._bk
        x = tf.random.stateless_normal([d], seed=[d, 1])

        @tf.function(autograph=False)
        def route(x, shift):
            wire = cast_to_wire(bk, x, shift)
            return (cast_from_wire(bk, wire, "float32", shift)[-1], bk.finite_flag(wire),
                    tf.reduce_max(tf.abs(wire)))
        shift = tf.constant(4, tf.int32)
        route(x, shift)  # traced here, not timed
        return best_of(3, lambda i: route(x, shift)[0].numpy())
