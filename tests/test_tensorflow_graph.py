"""The shared core inside tf.function: the same payloads, bits and updates as eager
TensorFlow and as PyTorch, with state in tf.Variables."""
import numpy as np
import pytest
import tensorflow as tf
import torch

import hvd_compress as hc
from hvd_compress import HvdCompressError, Key
from hvd_compress.core.exchange import Exchange
from hvd_compress.core.ops import backend_named
from hvd_compress.core.payload import pack, unpack
from hvd_compress.tensorflow.exchange import VariableExchange

GRAPH_SAFE = hc.available("compressor")
PIPELINES = ["topk:0.05+ef14", "topk:0.05+ef21", "topk:0.05+ef21sgdm:eta=0.3",
             "topk:0.05+ef21sgd2m", "randk:0.1,scaled=true+diana", "qsgd:s=3+diana",
             "threshold:lam=1.5+ef14", "topk:0.05,indices=varint,values=float16+ef14",
             "topk:0.05+ef21+warmup:2", "topk:0.05+ef14+perturb:radius=0.1", "fp16", "bf16",
             "topk+ef14+dynamic:c0=20000", "topk+ef21sgdm+dynamic:cost=packet",
             "topk:indices=varint+dynamic:c0=5000,kmin=3", "qsgd+dynamic",
             "qsgd:bucket=64+dynamic:cost=packet", "qsgd:bucket=100+dynamic:c0=1e6",
             "topk+ef14+dynamic:c0=20000,agree=true", "bernoulli:0.1",
             "bernoulli+dynamic:c0=5000", "bernoulli:values=float16+dynamic:cost=linear"]
TF = backend_named("tensorflow")
TORCH = backend_named("torch")


def grads(step, d=2000):
    return np.random.RandomState(step).standard_normal(d).astype(np.float32) * (1 + step)


@pytest.mark.parametrize("spec", GRAPH_SAFE)
def test_graph_payload_equals_eager(spec):
    c = hc.resolve(spec)
    x = tf.constant(grads(1))
    compiled = tf.function(lambda x, step: pack(TF, c.compress(x, Key(5, 2, "w", step))))
    got = compiled(x, tf.constant(9, tf.int64)).numpy()
    eager = c.compress(x, Key(5, 2, "w", 9))
    want = pack(TF, eager).numpy()
    assert got.shape == want.shape
    if spec in ("qsgd", "terngrad", "sign"):  # a norm or scale may round in its last bit
        np.testing.assert_allclose(c.decompress(unpack(TF, tf.constant(got), eager)),
                                   c.decompress(eager), rtol=1e-6, atol=1e-7)
    else:
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("spec", PIPELINES)
def test_tensorflow_sends_the_bits_pytorch_sends(spec):
    """Same spec, same gradients: the same bits per step and the same updates, with the
    TF state in variables inside tf.function and the torch state in Python."""
    tfx = VariableExchange(spec, seed=3, model_size=4096)
    thx = Exchange(spec, seed=3, model_size=4096)
    dense_steps = tfx.pipeline.dense_steps

    @tf.function
    def tf_step(x):
        step = tfx.next_step("layer/kernel")

        def phase(dense):  # one rank: gathering a row gives it back as the only row
            out = tfx.begin(TF, "layer/kernel", x, 0, step=step, dense=dense,
                            gather=lambda row: tf.reshape(row, (1, -1)))
            if out.by_allreduce:
                return tfx.finish_allreduced(TF, out.wire, out, 1, False)
            return tfx.finish_gathered(TF, out.wire, out, 1, False)
        if not dense_steps:
            return phase(None)
        return tf.cond(step < dense_steps, lambda: phase(True), lambda: phase(False))

    for step in range(4):
        g = grads(step).reshape(40, 50)
        got = tf_step(tf.constant(g)).numpy()
        out = thx.begin(TORCH, "layer/kernel", torch.from_numpy(g), 0,
                        gather=lambda row: row.reshape(1, -1))
        want = (thx.finish_allreduced if out.by_allreduce else thx.finish_gathered)(
            TORCH, out.wire, out, 1, False).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"step {step}")
    assert [r.bits for r in tfx.telemetry.rows] == [r.bits for r in thx.telemetry.rows]
    assert [r.count for r in tfx.telemetry.rows] == [r.count for r in thx.telemetry.rows]
    assert [r.step for r in tfx.telemetry.rows] == [0, 1, 2, 3]


def test_state_variables_are_created_once_and_checkpointed():
    ex = VariableExchange("topk:0.05+ef21sgdm", seed=1)

    @tf.function
    def step(x):
        out = ex.begin(TF, "w", x, 0)
        return ex.finish_gathered(TF, out.wire, out, 1, False)

    for s in range(3):
        step(tf.constant(grads(s)))
    assert set(ex.variables) == {"w"} and int(ex.step_vars["w"].numpy()) == 3
    sd = ex.state_dict()
    assert sd["steps"] == {"w": 3} and sd["states"]["w"]["count"] == 3
    resumed = VariableExchange("topk:0.05+ef21sgdm", seed=1)
    resumed.load_state_dict(sd)

    @tf.function
    def step2(x):
        out = resumed.begin(TF, "w", x, 0)
        return resumed.finish_gathered(TF, out.wire, out, 1, False)

    np.testing.assert_array_equal(step2(tf.constant(grads(3))).numpy(),
                                  step(tf.constant(grads(3))).numpy())
    with pytest.raises(HvdCompressError, match="was written with compression"):
        VariableExchange("topk:0.05+ef14").load_state_dict(sd)


def test_measured_error_is_recorded_when_the_step_runs():
    ex = VariableExchange("topk:k=10", measure_error=True)

    @tf.function
    def step(x):
        out = ex.begin(TF, "w", x, 0)
        return ex.finish_gathered(TF, out.wire, out, 1, False)

    x = grads(0)
    step(tf.constant(x))
    step(tf.constant(x))
    kept = np.sort(np.abs(x))[-10:]
    want = 1 - np.sum(kept ** 2) / np.sum(x.astype(np.float64) ** 2)
    assert [r.step for r in ex.telemetry.rows] == [0, 1]
    assert all(r.seconds is None for r in ex.telemetry.rows)  # not timed inside a graph
    np.testing.assert_allclose([r.error for r in ex.telemetry.rows], [want, want], rtol=1e-5)
    lost = np.sum(x.astype(np.float64) ** 2) - np.sum(kept.astype(np.float64) ** 2)
    np.testing.assert_allclose(ex.telemetry.summed_error(), 2 * lost, rtol=1e-5)


@pytest.mark.parametrize("d, k", [(1000, 10), (262144, 2621), (300000, 150000)])
def test_graph_topk_keeps_the_tie_rule(d, k):
    """Inside a graph top-k is TF's own, which keeps lower positions among equal values."""
    from hvd_compress.core.select import topk_indices
    x = np.random.RandomState(1).randint(0, 5, d).astype(np.float32)  # many ties
    got = tf.function(lambda s: topk_indices(TF, s, k))(tf.constant(x)).numpy()
    np.testing.assert_array_equal(got, np.sort(np.argsort(-x, kind="stable")[:k]))


def test_graph_decodes_ranks_that_chose_different_levels():
    """Under ``qsgd+dynamic`` each rank picks its own s every step, inside the graph too:
    the payload carries its level and code width in the header, the graph cuts the
    gathered bytes by each header's width and decodes each rank's codes at its level.
    The bytes a graph sends (but for a norm's last bit) and the mean it decodes are the
    eager ones."""
    from hvd_compress.core.payload import split_gathered
    q = hc.resolve("qsgd:bucket=64")
    xs = [tf.constant(grads(r, d=1000)) for r in range(3)]
    levels = [1, 31, 255]  # codes of 2, 6 and 9 bits
    sent = [pack(TF, q.at_level(s).compress(x, Key(0, r, "w", 0)))
            for r, (s, x) in enumerate(zip(levels, xs))]
    gathered = tf.concat(sent, 0)
    mine = q.at_level(31)
    parts, _ = split_gathered(TF, gathered, mine.compress(xs[1], Key(0, 1, "w", 0)), 3, False)
    want, _ = mine.mean(TF, parts, 3)

    @tf.function
    def graph(gathered, s):
        codec = q.at_level(s)
        template = codec.compress(xs[1], Key(0, 1, "w", 0))
        parts, flags = split_gathered(TF, gathered, template, 3, False)
        return pack(TF, template), codec.mean(TF, parts, 3)[0], flags

    wire, got, flags = graph(gathered, tf.constant(31))
    assert wire.shape == sent[1].shape
    np.testing.assert_array_equal(wire.numpy()[:24], sent[1].numpy()[:24])  # the header
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6)
    assert flags.numpy().tolist() == [0, 0, 0]
    with pytest.raises(tf.errors.InvalidArgumentError, match="rank 2: level 255 does not fit"):
        broken = tf.concat(sent[:2] + [sent[2][:5], tf.constant([3], tf.uint8), sent[2][6:]], 0)
        graph(broken, tf.constant(31))
    with pytest.raises(tf.errors.InvalidArgumentError, match="code width exceeds the 9 bits"):
        wider = tf.concat(sent[:2] + [sent[2][:5], tf.constant([10], tf.uint8), sent[2][6:]], 0)
        graph(wider, tf.constant(31))


def test_graph_cast_scales_by_a_shift_tensor_exactly():
    """auto's cast route inside a graph, its shift an int32 tensor: 2**n is exact for
    every float32 exponent, and the payload and the update scaled back are numpy's bit
    for bit."""
    from hvd_compress.core.auto import cast_from_wire, cast_to_wire
    n = tf.range(-126, 128, dtype=tf.int32)
    np.testing.assert_array_equal(tf.function(TF.power_of_two)(n).numpy(),
                                  np.ldexp(np.float32(1), np.arange(-126, 128)))
    x = grads(3) * np.float32(1e-6)
    np_bk = backend_named("numpy")
    for shift in (-7, 0, 21):
        wire = tf.function(lambda x, s: cast_to_wire(TF, x, s))(tf.constant(x), tf.constant(shift))
        np.testing.assert_array_equal(wire.numpy(), cast_to_wire(np_bk, x, shift))
        back = tf.function(lambda y, s: cast_from_wire(TF, y, "float32", s))(wire,
                                                                           tf.constant(shift))
        np.testing.assert_array_equal(back.numpy(),
                                      cast_from_wire(np_bk, wire.numpy(), "float32", shift))
