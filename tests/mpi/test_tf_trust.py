"""TensorFlow 2 + Horovod, identical or loud: a NaN on one rank reaches every rank and
spares the feedback state; ranks with different specs fail on every rank, inside
tf.function."""
import itertools

import numpy as np
import pytest
import tensorflow as tf
import horovod.tensorflow as hvd

import hvd_compress.tensorflow as hctf
from hvd_compress import HvdCompressError

hvd.init()
rank, size = hvd.rank(), hvd.size()
# TF start-up dominates; the checks are rank-count independent (torch runs 2 and 4)
MPI_RANKS = (2,)
_ids = itertools.count()


def variables():
    """Two tf.Variables whose names are unique to this call (and equal on every rank)."""
    tag = f"trust{next(_ids)}"
    rs = np.random.RandomState(0)
    return [tf.Variable(rs.standard_normal((6, 4)).astype(np.float32), name=f"{tag}/w"),
            tf.Variable(np.zeros(4, np.float32), name=f"{tag}/b")]


def trainer(vs, spec, tape=hctf.DistributedGradientTape, bias=True, **kw):
    """A compiled step's averaged gradients of ``vs`` through ``tape``; without ``bias``
    the loss does not depend on ``vs[1]`` (its gradient is None)."""
    comp = hvd.Compression.none if spec is None else hctf.compression(spec, **kw)

    @tf.function
    def grads(x):
        with tf.GradientTape() as t:
            h = x @ vs[0] + (vs[1] if bias else 0.0)
            loss = tf.reduce_sum(tf.tanh(h) ** 2)
        return tape(t, compression=comp).gradient(loss, vs)
    return grads


def batch(step, poison=None):
    x = np.random.RandomState(10 * rank + step).standard_normal((8, 6)).astype(np.float32)
    if poison is not None and rank == size - 1:
        x[0, 0] = poison
    return tf.constant(x)


def same_on_every_rank(tensors):
    flat = tf.concat([tf.reshape(tf.bitcast(tf.cast(t, tf.float32), tf.int32), [-1])
                      for t in tensors], 0)
    everyone = hvd.allgather(tf.reshape(flat, (1, -1))).numpy()
    return (everyone == flat.numpy()[None]).all()


@pytest.mark.parametrize("spec", ["topk:0.3+ef21sgdm", "qsgd", "fp16+ef14"])
def test_nan_on_one_rank_reaches_every_rank_and_spares_the_state(spec):
    vs = variables()
    grads = trainer(vs, spec)
    grads(batch(0))
    poisoned = grads(batch(1, poison=np.nan))
    assert all(not np.isfinite(g.numpy()).all() for g in poisoned)
    assert same_on_every_rank(poisoned)
    for step in (2, 3):
        assert all(np.isfinite(g.numpy()).all() for g in grads(batch(step)))


def test_raise_on_nan_names_the_variable():
    vs = variables()
    grads = trainer(vs, "topk:0.3+ef14", nonfinite="raise")
    grads(batch(0))
    with pytest.raises((HvdCompressError, tf.errors.InvalidArgumentError),
                       match="holds NaN or infinite values"):
        grads(batch(1, poison=np.nan))


@pytest.mark.parametrize("mine, other", [("topk:0.3+ef14", "topk:0.3+ef21"),
                                         ("topk:0.2", "topk:0.5"), ("fp16+ef21", "fp16")])
def test_different_specs_fail_on_every_rank(mine, other):
    vs = variables()
    grads = trainer(vs, mine if rank == 0 else other)
    with pytest.raises((HvdCompressError, tf.errors.InvalidArgumentError),
                       match="ranks disagree on the compression spec"):
        grads(batch(0))


def test_eager_tape_reraises_our_error():
    vs = variables()
    comp = hctf.compression("topk:0.3+ef14" if rank == 0 else "topk:0.3+ef21")
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.tanh(batch(0) @ vs[0] + vs[1]) ** 2)
    with pytest.raises(HvdCompressError, match="ranks disagree on the compression spec"):
        hctf.DistributedGradientTape(tape, compression=comp).gradient(loss, vs)


OURS, HOROVODS = hctf.DistributedGradientTape, hvd.DistributedGradientTape


@pytest.mark.parametrize("tape, mine, other", [
    (OURS, "topk:0.3", "fp16"), (OURS, "fp16", "none"), (OURS, "none", "qsgd"),
    (OURS, "auto", "none"), (HOROVODS, "topk:0.3", "fp16"), (HOROVODS, "fp16", "none")])
def test_ranks_whose_collectives_differ_fail_before_anything_moves(tape, mine, other):
    """An allgathered spec against an allreduced one (different Horovod collectives,
    which would wait for each other forever) is refused on every rank at the first step,
    through this package's tape and through Horovod's."""
    vs = variables()
    grads = trainer(vs, mine if rank == 0 else other, tape=tape)
    with pytest.raises((HvdCompressError, tf.errors.InvalidArgumentError),
                       match="ranks disagree on the compression spec of variable"):
        grads(batch(0))


@pytest.mark.parametrize("tape", [OURS, HOROVODS])
def test_a_refused_step_leaves_no_collective_behind(tape):
    """Where the ranks disagree, no rank's payload has gone out: the same variables, then
    reduced alike on every rank, average exactly as Horovod's own allreduce does (a
    collective left pending by the refused step would pair with theirs, or wait forever).
    'none' sends the gradient as it is: nothing but reshapes between it and the
    allreduce, which the graph optimizer removes."""
    vs = variables()
    refused = trainer(vs, "fp16" if rank == 0 else "none", tape=tape)
    with pytest.raises((HvdCompressError, tf.errors.InvalidArgumentError),
                       match="ranks disagree on the compression spec of variable"):
        refused(batch(0))
    got = trainer(vs, "none", tape=tape)(batch(1))
    want = trainer(vs, None, tape=HOROVODS)(batch(1))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.numpy(), w.numpy())


def test_state_restored_on_some_ranks_only_fails_on_every_rank():
    """The compression state restored on rank 0 alone: the restored run's first step
    raises on every rank (its running estimates and steps would drift apart)."""
    vs = variables()
    comp = hctf.compression("topk:0.3+ef21")
    step = trainer(vs, comp)
    for i in range(3):
        step(batch(i))
    saved = comp.state_dict()
    comp = hctf.compression("topk:0.3+ef21")
    if rank == 0:
        comp.load_state_dict(saved)
    with pytest.raises((HvdCompressError, tf.errors.InvalidArgumentError),
                       match=r"ranks start from different compression states \(rank 0: "
                             r"2 variables at steps 3..3; rank 1: no steps yet"):
        trainer(vs, comp)(batch(3))


def test_ranks_reducing_different_variables_fail_on_every_rank():
    vs = variables()
    extra = tf.Variable(np.zeros(4, np.float32), name=vs[1].name.split(":")[0] + "_extra")
    mine = vs if rank == 0 else vs + [extra]
    comp = hctf.compression("topk:0.3+ef14")

    @tf.function
    def grads(x):
        with tf.GradientTape() as t:
            loss = tf.reduce_sum(tf.tanh(x @ vs[0] + vs[1]) ** 2) + tf.reduce_sum(extra)
        return hctf.DistributedGradientTape(t, compression=comp).gradient(loss, mine)
    with pytest.raises((HvdCompressError, tf.errors.InvalidArgumentError),
                       match=r"ranks reduce different numbers of variables together: "
                             r"\[2, 3\]"):
        grads(batch(0))


def test_a_none_gradient_on_one_rank_fails_on_every_rank():
    vs = variables()
    grads = trainer(vs, "fp16", bias=rank == 0)
    with pytest.raises((HvdCompressError, tf.errors.InvalidArgumentError),
                       match=r"ranks reduce the gradient of variable '.*/b' differently: "
                             r"no gradient \(None\) on rank\(s\) \[1\]"):
        grads(batch(0))


def test_agreeing_ranks_check_once_and_train_alike():
    """Every rank agrees at the first step; later steps (and a retrace) go on alike."""
    vs = variables()
    grads = trainer(vs, "fp16+ef14")
    for step in range(3):
        assert same_on_every_rank(grads(batch(step)))
    assert same_on_every_rank(grads(tf.concat([batch(3), batch(4)], 0)))  # retraced


def test_an_xla_compiled_step_is_refused_clearly():
    vs = variables()
    comp = hctf.compression("topk:0.3+ef14")

    @tf.function(jit_compile=True)
    def grads(x):
        with tf.GradientTape() as t:
            loss = tf.reduce_sum(tf.tanh(x @ vs[0] + vs[1]) ** 2)
        return hctf.DistributedGradientTape(t, compression=comp).gradient(loss, vs)
    with pytest.raises(HvdCompressError, match="inside an XLA-compiled function"):
        grads(batch(0))
