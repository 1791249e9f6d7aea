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
for it. Where the ranks differ, every rank raises :class:`HvdCompressError` naming the
variable and what differs, before any payload moves.

The flag that says "checked" is a ``tf.Variable`` outside any checkpoint, so a resumed
run checks again, on every rank alike. Checks and ``auto``'s measurements (eager Horovod
collectives inside the graph) run one after another in the order they were traced, the
same on every rank (:func:`in_trace_order`).
"""
from __future__ import annotations

import weakref

from ..core.payload import Stamp, check_stamps
from ..errors import HvdCompressError

NONE, SPARSE, COMPRESSED = 0, 1, 2  # how a variable's gradient travels
_HOW = {NONE: "no gradient (None)", SPARSE: "IndexedSlices through Horovod's allgather",
        COMPRESSED: "through the compression"}

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

    def gate(self, names, variables, hows, process_set):
        """An op that every op of this site's step must wait for (None eagerly, where
        the check has already run by the time this returns). ``hows``: per variable, how
        its gradient travels (NONE, SPARSE or COMPRESSED). Inside one traced graph the
        check is made once per site."""
        import tensorflow as tf
        key = (tuple(names), process_set.process_set_id)
        graph = None if tf.executing_eagerly() else tf.compat.v1.get_default_graph()
        made = {} if graph is None else self._made.setdefault(graph, {})
        if key in made:
            return made[key]
        checked = self._checked.get(key)
        if checked is None:
            with tf.init_scope():
                checked = self._checked[key] = tf.Variable(False, trainable=False)
        layouts = [(tuple(v.shape), tf.as_dtype(v.dtype).name) for v in variables]
        rows = [[len(names), 0, 0, 0]] + [[*self.exchange.stamp(name, *layout), how]
                                          for name, layout, how in zip(names, layouts, hows)]
        describe = [self.exchange.describe(*layout) for layout in layouts]

        def check():
            import horovod.tensorflow as hvd
            everyone = hvd.allgather(tf.constant(rows, tf.int64), name="hvd_compress.agree",
                                     process_set=process_set, ignore_name_scope=True)
            ok = tf.numpy_function(lambda r: _compare(r, list(names), hows, describe),
                                   [everyone], tf.bool, stateful=True,
                                   name="hvd_compress_agree")
            with tf.control_dependencies([ok]):
                return checked.assign(True, read_value=True)

        done = in_trace_order(lambda: tf.cond(checked, lambda: checked.read_value(), check))
        made[key] = None if graph is None else done
        return made[key]


def _compare(rows, names, hows, describe) -> bool:
    """Raise, identically on every rank, where the gathered ``rows`` (each rank's count,
    then one row per variable) differ across ranks; ``names``, ``hows`` and ``describe``
    are this rank's, for the message."""
    ranks, i = [], 0
    while i < len(rows):
        n = int(rows[i][0])
        ranks.append([tuple(int(x) for x in r) for r in rows[i + 1:i + 1 + n]])
        i += 1 + n
    counts = [len(r) for r in ranks]
    if len(set(counts)) > 1:
        raise HvdCompressError(
            f"ranks reduce different numbers of variables in one call: {counts} by rank "
            f"(this rank: {len(names)}, {', '.join(map(repr, names[:8]))}"
            f"{', ...' if len(names) > 8 else ''}); every rank must reduce the same "
            "variables together")
    for j, name in enumerate(names):
        check_stamps(f"variable {name!r}", [Stamp(*r[j][:3]) for r in ranks], describe[j])
        seen = {r[j][3] for r in ranks}
        if len(seen) > 1:
            by = {h: [k for k, r in enumerate(ranks) if r[j][3] == h] for h in sorted(seen)}
            raise HvdCompressError(
                f"ranks reduce the gradient of variable {name!r} differently: "
                + "; ".join(f"{_HOW[h]} on rank(s) {rs}" for h, rs in by.items())
                + f" (this rank: {_HOW[hows[j]]}); every rank must have a gradient of "
                "the same kind for every variable")
    return True
