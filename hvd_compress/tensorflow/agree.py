"""Before a call site's first payload moves, every rank checks that the others reduce the
same variables the same way.

A call site is one tape's or optimizer's reduction of a list of variables over a process
set. Ranks that disagree on it would otherwise issue different collectives, and Horovod
waits forever for a partner that never comes: a rank with ``topk`` allgathers what a rank
with ``fp16`` allreduces, a rank with one more variable or one more ``None`` gradient
launches one more collective. So the first time a site runs in this process, one
allgather (named ``hvd_compress.agree``, the same on every rank whatever its
configuration) carries every rank's fingerprints of each variable (its name, shape and
dtype; the spec, seed, transport and nonfinite rule; how its gradient travels: None,
Horovod's sparse allgather, or this compression), and everything the site does next waits
for it; a second allgather compares the variables' step counters as they are then (a
checkpoint restored on some ranks only would set them apart). Where the ranks differ,
every rank raises :class:`HvdCompressError` naming the variable and what differs, before
any payload moves.

The flag that says "checked" is a ``tf.Variable`` outside any checkpoint, so a resumed
run checks again, on every rank alike. Checks and ``auto``'s measurements (eager Horovod
collectives inside the graph) run one after another in the order they were traced, the
same on every rank (:func:`in_trace_order`).
"""
from __future__ import annotations

import weakref

import numpy as np

from ..core.agreement import WIDTH, compare, compare_steps, op_name, rows, steps_row

#: per graph being traced, the last host-driven collective made in it
_LAST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def in_trace_order(make):
    """``make()``'s op, run after the previous one made this way in the graph being
    traced: Horovod's eager collectives of two at once would meet each other's."""
    import tensorflow as tf
    if tf.executing_eagerly():
        return make()
    graph = tf.compat.v1.get_default_graph()
    before = _LAST.get(graph)
    with tf.control_dependencies([] if before is None else [before]):
        done = make()
    _LAST[graph] = done
    return done


class SiteCheck:
    """The first-run check of each call site of one compression (see the module
    docstring)."""

    def __init__(self, exchange):
        self.exchange = exchange
        self._checked: dict = {}  # (names, process set id) -> bool tf.Variable
        self._made: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def gate(self, names, variables, hows, transport, grads=()):
        """(an op every op of this site's step must wait for, {``g.ref()``: g as it comes
        out of the check} for each dense tensor of ``grads``); eagerly, where the check
        has already run by the time this returns, (None, {}). ``hows``: per variable, how
        its gradient travels (see :mod:`hvd_compress.core.agreement`). Inside one traced
        graph the check is made once per site.

        A control dependency alone does not hold the collectives back: ops made under
        it whose inputs were made under it too get none of their own, and the graph
        optimizer drops the reshapes and identities that carried it (a cast that needs
        no cast reached Horovod's allreduce unchecked). So the gradients themselves pass
        through the conditional that checks, and whatever is made from them waits."""
        import tensorflow as tf
        key = (tuple(names), transport.process_set.process_set_id)
        graph = None if tf.executing_eagerly() else tf.compat.v1.get_default_graph()
        made = {} if graph is None else self._made.setdefault(graph, {})
        if key in made:
            return made[key]
        checked = self._checked.get(key)
        if checked is None:
            with tf.init_scope():
                checked = self._checked[key] = tf.Variable(False, trainable=False)
        ex, names = self.exchange, list(names)
        layouts = [(tuple(v.shape), tf.as_dtype(v.dtype).name) for v in variables]
        import horovod.tensorflow as hvd
        settings = f"op={op_name(hvd, transport.op)}, " \
            f"gradient_predivide_factor={transport.predivide}"
        mine = tf.constant(rows(ex, names, layouts, hows, settings), tf.int64,
                           [len(names) + 1, WIDTH])
        dense = [g for g in grads if isinstance(g, tf.Tensor)]

        def check():
            everyone = transport.gather(mine, "hvd_compress.agree")
            ok = tf.numpy_function(lambda r: compare(r, ex, names, layouts, hows,
                                                     settings=settings),
                                   [everyone], tf.bool, stateful=True, name="hvd_compress_agree")
            with tf.control_dependencies([ok]):  # then the steps, as they are when it runs
                steps = tf.numpy_function(
                    lambda: np.array(steps_row(ex.step_counts(names), names), np.int64),
                    [], tf.int64, stateful=True, name="hvd_compress_steps_row")
                steps = transport.gather(tf.reshape(steps, (1, WIDTH)), "hvd_compress.steps")
                ok = tf.numpy_function(compare_steps, [steps], tf.bool, stateful=True,
                                       name="hvd_compress_steps")
            with tf.control_dependencies([ok]):
                return [checked.assign(True, read_value=True)] + \
                    [tf.identity(g) for g in dense]

        out = in_trace_order(lambda: tf.cond(
            checked, lambda: [checked.read_value()] + [tf.identity(g) for g in dense], check))
        if graph is None:
            return None, {}
        made[key] = out[0], {g.ref(): p for g, p in zip(dense, out[1:])}
        return made[key]
