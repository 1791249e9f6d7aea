"""Checkpoints of per-rank compression state, in one process: several exchanges play the
ranks (each is told its rank and gets every rank's payload), so resuming, refusing and
restoring run through the real exchange code. tests/mpi/test_checkpoint.py repeats the
recipes under mpirun with Horovod and mpi4py."""
import functools
import io
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import torch

import hvd_compress.tensorflow as hctf
from hvd_compress import HvdCompressError, checkpoint
from hvd_compress.core.exchange import Exchange
from hvd_compress.core.ops import backend_named

TORCH, TF = backend_named("torch"), backend_named("tensorflow")
NAMES = ("fc.weight", "fc.bias")
RESUMABLE = ["topk:0.1+ef21sgdm", "randk:0.3,scaled=true+diana", "topk:0.1+ef14",
             "topk:0.1+ef21+warmup:2", "randk:0.3", "qsgd:s=3", "fp16"]


def grad(rank, step, name, d=40):
    seed = 1000 * rank + 10 * step + NAMES.index(name)
    return torch.from_numpy(np.random.RandomState(seed).standard_normal(d).astype(np.float32))


def ranks(spec, n=2, seed=5):
    exs = [Exchange(spec, seed=seed) for _ in range(n)]
    for r, ex in enumerate(exs):
        ex.set_group(r, n)
    return exs


def step_all(exs, step, bk=TORCH, make=grad):
    """One step of every rank: each compresses its gradient, every rank receives all
    payloads (summed for allreduce payloads, concatenated for allgather ones)."""
    n, updates = len(exs), []
    for name in NAMES:
        outs = [ex.begin(bk, name, make(r, step, name), r) for r, ex in enumerate(exs)]
        if outs[0].by_allreduce:
            total = sum(o.wire for o in outs[1:]) + outs[0].wire
            updates += [ex.finish_allreduced(bk, total, o, n, True) for ex, o in zip(exs, outs)]
        else:
            wires = bk.tf.concat([o.wire for o in outs], 0) if bk is TF else \
                torch.cat([o.wire for o in outs])
            updates += [ex.finish_gathered(bk, wires, o, n, False) for ex, o in zip(exs, outs)]
    return updates


def through_torch_save(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("spec", RESUMABLE)
def test_resume_from_one_gathered_file_is_bit_exact(spec):
    straight = ranks(spec)
    for step in range(6):
        want = step_all(straight, step)
    first = ranks(spec)
    for step in range(3):
        step_all(first, step)
    saved = through_torch_save({r: ex.state_dict() for r, ex in enumerate(first)})
    resumed = ranks(spec)
    for ex in resumed:
        checkpoint.restore(ex, saved)
    for step in range(3, 6):
        got = step_all(resumed, step)
    assert all(torch.equal(a, b) for a, b in zip(got, want)), spec
    assert resumed[1].state_dict()["steps"] == {n: 6 for n in NAMES}


def test_state_dict_says_who_wrote_it():
    fresh = Exchange("topk:0.1+ef14", seed=3).state_dict()
    assert {k: fresh[k] for k in ("format", "rank", "world_size", "spec", "seed")} == \
        {"format": 2, "rank": None, "world_size": None, "spec": "topk:ratio=0.1+ef14",
         "seed": 3}
    exs = ranks("topk:0.1+ef14", n=3)
    step_all(exs, 0)
    sd = exs[2].state_dict()
    assert (sd["rank"], sd["world_size"], sd["steps"]) == (2, 3, {n: 1 for n in NAMES})
    assert set(sd["states"]) == set(NAMES) and torch.is_tensor(sd["states"]["fc.bias"]["residual"])


def test_another_ranks_feedback_state_is_refused_and_nothing_changes():
    exs = ranks("topk:0.1+ef21sgdm")
    step_all(exs, 0)
    before = exs[0].state_dict()
    with pytest.raises(HvdCompressError, match=r"ef21sgdm.*for 2 tensor\(s\) \(fc.bias, "
                       r"fc.weight\) of rank 1, but this is rank 0 \(of 2\).*checkpoint.gather"):
        exs[0].load_state_dict(exs[1].state_dict())
    after = exs[0].state_dict()
    assert after["steps"] == before["steps"]
    assert all(torch.equal(after["states"][n]["local"], before["states"][n]["local"])
               for n in NAMES)


def test_state_keyed_for_another_transport_is_refused():
    """Fused buckets keep their state under their own names: a state written with other
    fuse_below= / whole_model= / comm= settings would not reach its tensors."""
    exs = ranks("topk:0.1+ef14")
    step_all(exs, 0)
    sd = exs[0].state_dict()
    assert sd["transport"] == "horovod"
    other = Exchange("topk:0.1+ef14", seed=5, transport="horovod/fuse-below=64")
    other.set_group(0, 2)
    with pytest.raises(HvdCompressError, match="keyed for transport 'horovod'.*fuse_below="):
        other.load_state_dict(sd)
    exs[1].load_state_dict(dict(sd, rank=1))  # same transport: loads


def test_another_world_size_is_refused_unless_only_step_counters_are_kept():
    exs = ranks("topk:0.1+ef14")
    step_all(exs, 0)
    sd = exs[0].state_dict()
    bigger = ranks("topk:0.1+ef14", n=4)
    with pytest.raises(HvdCompressError, match=r"rank 0 of 2; this run has 4 ranks.*"
                       r"resume on 2 rank\(s\).*states=\{\}"):
        bigger[0].load_state_dict(sd)
    for ex in bigger:  # the documented escape: drop the per-rank part
        ex.load_state_dict(dict(sd, states={}))
    step_all(bigger, 1)
    assert bigger[3].state_dict()["steps"] == {n: 2 for n in NAMES}


@pytest.mark.parametrize("spec", ["randk:0.3", "qsgd:s=3", "randk:0.3,shared=true"])
def test_state_without_feedback_loads_on_any_rank_and_streams_stay_exact(spec):
    """Only step counters: rank 0's file on every rank (and on more ranks) resumes the
    random streams exactly, since they are keyed by this run's rank."""
    straight = ranks(spec, n=3)
    for step in range(4):
        want = step_all(straight, step)
    first = ranks(spec, n=2)
    for step in range(2):
        step_all(first, step)
    rank0 = through_torch_save(first[0].state_dict())
    resumed = ranks(spec, n=3)
    for ex in resumed:
        ex.load_state_dict(rank0)
    for step in range(2, 4):
        got = step_all(resumed, step)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_format_1_loads_only_without_feedback_state():
    exs = ranks("topk:0.1+ef14")
    step_all(exs, 0)
    legacy = {k: v for k, v in exs[1].state_dict().items()
              if k not in ("format", "rank", "world_size")}
    with pytest.raises(HvdCompressError, match="does not say which rank wrote it.*"
                       r"state.update\(format=2, rank=..., world_size=...\)"):
        ranks("topk:0.1+ef14")[1].load_state_dict(legacy)
    ranks("topk:0.1+ef14")[1].load_state_dict(dict(legacy, format=2, rank=1, world_size=2))
    plain = ranks("randk:0.3")
    step_all(plain, 0)
    legacy = {k: v for k, v in plain[0].state_dict().items() if k != "format"}
    other = ranks("randk:0.3")[1]
    other.load_state_dict(legacy)
    assert other.steps == {n: 1 for n in NAMES}


def test_unknown_format_and_another_feedback_rule_are_refused():
    exs = ranks("topk:0.1+ef14")
    step_all(exs, 0)
    sd = exs[0].state_dict()
    with pytest.raises(HvdCompressError, match="format 3 is unknown.*reads 1 and 2"):
        ranks("topk:0.1+ef14")[0].load_state_dict(dict(sd, format=3))
    with pytest.raises(HvdCompressError, match="written with compression "
                       "'topk:ratio=0.1\\+ef14', this run uses 'topk:ratio=0.1\\+ef21': its "
                       "feedback state \\(ef14\\) is not state of ef21"):
        ranks("topk:0.1+ef21")[0].load_state_dict(sd)
    with pytest.raises(HvdCompressError, match="\\(ef14\\) is not state of no feedback rule"):
        ranks("topk:0.1")[0].load_state_dict(sd)
    ranks("topk:0.1+ef21")[0].load_state_dict(dict(sd, states={}))  # the counters only


@pytest.mark.parametrize("saved, resumed", [
    ("topk:0.1+ef14", "topk:0.3+ef14+warmup:1"), ("topk:0.1+ef21sgdm:eta=0.5", "topk:0.2+ef21sgdm"),
    ("randk:0.3,scaled=true+diana", "randk:0.5,scaled=true+diana"),
    ("topk:0.1+ef14", "topk+ef14+auto:every=7")])
def test_another_level_of_the_same_feedback_rule_resumes_its_state(saved, resumed):
    """Changing k, the level policy, the warm-up or the rule's parameters keeps the
    feedback state (a residual is a residual whatever k sent the rest) and the step
    counters; a rule's constants (DIANA's alpha) are this run's."""
    exs = ranks(saved)
    for i in range(2):
        step_all(exs, i)
    back = ranks(resumed)
    for ex, old in zip(back, exs):
        ex.load_state_dict(old.state_dict())
        assert ex.steps == old.steps
        for name in NAMES:
            fresh = ex.pipeline.init(TORCH, grad(0, 0, name))
            for field, value in old.states[name]._asdict().items():
                mine = getattr(ex.states[name], field)
                if isinstance(value, float):
                    assert mine == getattr(fresh, field)
                else:
                    assert torch.equal(torch.as_tensor(mine), torch.as_tensor(value))


def test_an_exchange_that_does_not_know_its_rank_takes_the_states():
    exs = ranks("topk:0.1+ef14")
    step_all(exs, 0)
    fresh = Exchange("topk:0.1+ef14", seed=5)
    fresh.load_state_dict(exs[1].state_dict())
    assert (fresh.rank, fresh.world_size) == (1, 2)


def test_restore_picks_this_ranks_part_or_refuses_on_every_rank():
    exs = ranks("topk:0.1+ef21")
    step_all(exs, 0)
    gathered = {r: ex.state_dict() for r, ex in enumerate(exs)}
    more = ranks("topk:0.1+ef21", n=3)
    for ex in more[:2]:  # ranks 0 and 1 have their parts, but the world size differs
        with pytest.raises(HvdCompressError, match="this run has 3 ranks"):
            checkpoint.restore(ex, gathered)
    with pytest.raises(HvdCompressError, match=r"of ranks \[0, 1\] \(of 2\); this is rank 2 "
                       "of 3"):
        checkpoint.restore(more[2], gathered)
    with pytest.raises(HvdCompressError, match="takes a state_dict"):
        checkpoint.restore(exs[0], {"steps": {}})
    plain = ranks("randk:0.3")
    step_all(plain, 0)
    gathered = {r: ex.state_dict() for r, ex in enumerate(plain)}
    more = ranks("randk:0.3", n=3)
    checkpoint.restore(more[2], gathered)  # step counters only: the lowest rank's
    assert more[2].steps == {n: 1 for n in NAMES}


def test_checkpoint_module_imports_no_framework():
    code = ("import sys, hvd_compress.checkpoint\n"
            "heavy = [m for m in ('torch', 'tensorflow', 'horovod', 'mpi4py')\n"
            "         if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_encoding_round_trips_without_pickle():
    obj = {0: {"format": 2, "rank": 0, "spec": "x", "alpha": 0.1, "none": None,
               "states": {"w": {"a": np.arange(5, dtype=np.float32), "count": 3}}},
           1: {"inf": float("inf"), "t": torch.ones(2), "flag": True}}
    data = checkpoint.encode(obj)
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        assert sorted(npz.files) == ["arr_0", "arr_1", "meta"]
    back = checkpoint.decode(data)
    assert set(back) == {0, 1} and back[0]["states"]["w"]["count"] == 3
    np.testing.assert_array_equal(back[0]["states"]["w"]["a"], np.arange(5, dtype=np.float32))
    assert back[1]["inf"] == float("inf") and back[0]["none"] is None
    assert back[1]["t"].dtype == np.float32 and back[1]["flag"] is True
    with pytest.raises(HvdCompressError, match="cannot checkpoint a set"):
        checkpoint.encode({"x": {1, 2}})


# -- TensorFlow: tf.train.Checkpoint ------------------------------------------------------


def tf_grad(rank, step, name):
    return tf.constant(grad(rank, step, name).numpy())


def tf_ranks(spec, n=2):
    comps = [hctf.compression(spec, seed=5) for _ in range(n)]
    for r, c in enumerate(comps):
        c.exchange.set_group(r, n)
    return comps


def tf_steps(comps, steps):
    """Run ``steps`` of the ranks ``comps`` inside one tf.function (traced once per list)."""
    fn = _compiled.get(id(comps))
    if fn is None:
        fn = _compiled[id(comps)] = (comps, tf.function(
            lambda s: step_all([c.exchange for c in comps], s, TF, tf_grad_at),
            autograph=False))
    return [fn[1](tf.constant(s)) for s in steps][-1]


_compiled: dict = {}


def tf_grad_at(rank, step, name):
    base = tf.cast(step, tf.float32)
    return tf_grad(rank, 0, name) * (1.0 + base) + tf.sin(base + rank)


@functools.lru_cache(maxsize=None)
def tf_straight(spec, steps=6):
    return [u.numpy() for u in tf_steps(tf_ranks(spec), range(steps))]


@pytest.mark.parametrize("spec, when", [
    ("topk:0.1+ef21sgdm", "before the variables exist"), ("topk:0.1+ef21sgdm", "after"),
    ("randk:0.3,scaled=true+diana", "before the variables exist")])
def test_tf_train_checkpoint_resumes_bit_exactly(spec, when, tmp_path):
    first = tf_ranks(spec)
    tf_steps(first, range(3))
    paths = [tf.train.Checkpoint(compression=c.checkpointable()).write(
        str(tmp_path / f"rank{r}")) for r, c in enumerate(first)]
    resumed = tf_ranks(spec)
    if when == "after":  # the variables exist (and hold other values) when restoring
        tf_steps(resumed, range(1))
    for c, path in zip(resumed, paths):
        tf.train.Checkpoint(compression=c.checkpointable()).read(path).assert_consumed()
    got = tf_steps(resumed, range(3, 6))
    for a, b in zip(got, tf_straight(spec)):
        np.testing.assert_array_equal(a.numpy(), b)
    sd = resumed[1].state_dict()
    assert (sd["rank"], sd["world_size"], sd["steps"]) == (1, 2, {n: 6 for n in NAMES})
    assert all(isinstance(v, np.ndarray) for v in sd["states"]["fc.bias"].values()
               if not isinstance(v, (int, float)))


def test_tf_checkpoint_of_another_rank_is_refused_when_restoring(tmp_path):
    comps = tf_ranks("topk:0.1+ef14")
    tf_steps(comps, range(2))
    path = tf.train.Checkpoint(compression=comps[1].checkpointable()).write(
        str(tmp_path / "rank1"))
    with pytest.raises(HvdCompressError, match="of rank 1, but this is rank 0"):
        tf.train.Checkpoint(compression=tf_ranks("topk:0.1+ef14")[0].checkpointable()).read(
            path)


def test_tf_gathered_checkpoint_restores_each_ranks_part(tmp_path):
    spec = "topk:0.1+ef21sgdm"
    first = tf_ranks(spec)
    tf_steps(first, range(3))
    holder = first[0].checkpointable()
    assert first[0].checkpointable() is holder  # one object per compression
    holder._gathered = {r: c.state_dict() for r, c in enumerate(first)}  # what gather() holds
    path = tf.train.Checkpoint(compression=holder).write(str(tmp_path / "all"))
    assert holder._gathered is None  # used by this save only
    resumed = tf_ranks(spec)
    for c in resumed:
        tf.train.Checkpoint(compression=c.checkpointable()).read(path)
    got = tf_steps(resumed, range(3, 6))
    for a, b in zip(got, tf_straight(spec)):
        np.testing.assert_array_equal(a.numpy(), b)


def test_tf_host_stage_state_round_trips_as_numpy():
    spec = "topk+ef14+dynamic:c0=2000"
    straight = tf_ranks(spec)
    for s in range(3):
        want = step_all([c.exchange for c in straight], s, TF, tf_grad)
    first = tf_ranks(spec)
    step_all([c.exchange for c in first], 0, TF, tf_grad)
    saved = [checkpoint.decode(checkpoint.encode(c.state_dict())) for c in first]
    resumed = tf_ranks(spec)
    for c, sd in zip(resumed, saved):
        c.load_state_dict(sd)
    for s in range(1, 3):
        got = step_all([c.exchange for c in resumed], s, TF, tf_grad)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_a_state_of_another_model_is_refused_naming_the_tensor():
    """Resumed into a model whose tensor has another size: a clear error at its first
    step, not the framework's shape error."""
    bk = TORCH
    ex = Exchange("topk:0.5+ef14")
    out = ex.begin(bk, "w", torch.ones(16), 0)
    ex.finish_gathered(bk, out.wire, out, 1, False)
    other = Exchange("topk:0.5+ef14")
    other.load_state_dict(ex.state_dict())
    with pytest.raises(HvdCompressError, match=r"feedback state of 'w' \(residual\) holds "
                       r"16 entries, its gradient 12: the compression state was saved for "
                       r"another model"):
        other.begin(bk, "w", torch.ones(12), 0)
