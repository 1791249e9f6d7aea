"""TensorFlow 2 + Horovod: compression= on DistributedGradientTape inside tf.function."""
import numpy as np
import pytest
import tensorflow as tf
import horovod.tensorflow as hvd

import hvd_compress as hc
import hvd_compress.tensorflow as hctf
from hvd_compress import HvdCompressError, Key

hvd.init()
rank, size = hvd.rank(), hvd.size()
TOL = {"none": 1e-6, "fp16": 2e-3}


def batch(step):
    rs = np.random.RandomState(1000 * rank + step)
    return (tf.constant(rs.standard_normal((32, 6)), tf.float32),
            tf.constant(rs.standard_normal((32, 1)), tf.float32))


@pytest.mark.parametrize("spec", ["none", "fp16"])
def test_tape_matches_oracle(spec):
    w = tf.Variable(tf.ones((6, 1)), name="w")
    b = tf.Variable(tf.zeros((1,)), name="b")
    comp = hctf.compression(spec)

    @tf.function
    def grads(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((x @ w + b - y) ** 2)
        dtape = hvd.DistributedGradientTape(tape, compression=comp)
        return dtape.gradient(loss, [w, b])

    c = hc.resolve(spec)
    for step in range(3):
        x, y = batch(step)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((x @ w + b - y) ** 2)
        local = tape.gradient(loss, [w, b])
        got = grads(x, y)
        for g_local, g in zip(local, got):
            everyone = hvd.allgather(tf.reshape(g_local, (1, -1))).numpy()
            dense = [np.asarray(c.decompress(c.compress(tf.constant(everyone[r]), Key())),
                                np.float64) for r in range(size)]
            np.testing.assert_allclose(np.reshape(g.numpy(), -1), np.mean(dense, 0),
                                       rtol=TOL[spec], atol=TOL[spec])
        for v, g in zip((w, b), got):
            v.assign_sub(0.1 * g)
    final = hvd.allgather(tf.reshape(w, (1, -1))).numpy()
    assert (final == final[0]).all(), "weights differ across ranks"


@pytest.mark.parametrize("spec", ["topk:0.01", "bf16", "qsgd"])
def test_specs_needing_the_allgather_path_are_refused(spec):
    with pytest.raises(HvdCompressError, match="needs the allgather path"):
        hctf.compression(spec)
