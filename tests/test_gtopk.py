"""Global top-k's schedule and merge, in one process, over numpy, torch and TensorFlow."""
import numpy as np
import pytest

from hvd_compress import HvdCompressError
from hvd_compress.core.gtopk import check_pipeline, merge, rounds, schedule
from hvd_compress.core.ops import backend_for
from hvd_compress.core.pipeline import resolve_pipeline
from hvd_compress.core.spec import resolve_compressor


@pytest.mark.parametrize("n", range(1, 41))
def test_every_rank_but_0_sends_once_to_a_rank_that_expects_it(n):
    plans = {r: schedule(r, n) for r in range(n)}
    sends = {r: [p for op, p in plan if op == "send"] for r, plan in plans.items()}
    assert sends[0] == [] and all(len(sends[r]) == 1 for r in range(1, n))
    for r, plan in plans.items():
        assert all(op == "recv" for op, _ in plan[:-1])  # merges first, then the send
        for op, peer in plan:
            if op == "recv":
                assert sends[peer] == [r]           # the partner sends here, once
    # rank 0 merges once per round; nobody merges more often
    assert rounds(n) == (int(np.ceil(np.log2(n))) if n > 1 else 0) == len(plans[0])
    assert max(sum(op == "recv" for op, _ in p) for p in plans.values()) == rounds(n)


def dense_merge(a, b, k):
    total = a + b
    order = np.lexsort((np.arange(total.size), -np.abs(total)))
    kept = np.zeros_like(total)
    kept[order[:k]] = total[order[:k]]
    return kept, total - kept


@pytest.mark.parametrize("spec", ["topk:k=6", "topk:k=6,indices=varint", "topk:k=9,values=float16"])
def test_merge_keeps_the_top_k_of_the_sum_and_returns_the_rest(xp, spec):
    codec = resolve_compressor(spec)
    rng = np.random.RandomState(3)
    a, b = (rng.randint(-9, 10, 50).astype(np.float32) for _ in range(2))  # many ties
    pa, pb = (codec.compress(xp.asarray(v)) for v in (a, b))
    bk = backend_for(pa.values)
    forward, (positions, values) = merge(bk, codec, pa, pb)
    want_kept, want_rest = dense_merge(xp.numpy(codec.decompress(pa)).reshape(-1),
                                       xp.numpy(codec.decompress(pb)).reshape(-1), codec.k)
    np.testing.assert_array_equal(xp.numpy(codec.decompress(forward)).reshape(-1), want_kept)
    positions = xp.numpy(positions)
    assert positions.size <= 2 * codec.k and (np.diff(positions) > 0).all()  # sparse, sorted
    rest = np.zeros(50, np.float32)
    rest[positions] = xp.numpy(values)
    np.testing.assert_array_equal(rest, want_rest)
    assert forward.index_dtype == pa.index_dtype and forward.count == codec.k


@pytest.mark.parametrize("spec", ["topk:0.1", "topk:0.1+ef21sgdm", "randk:0.1+ef14",
                                  "threshold:lam=1+ef14", "topk+ef14+dynamic",
                                  "topk+ef14+warmup:2"])
def test_the_tree_refuses_what_it_cannot_carry(spec):
    with pytest.raises(HvdCompressError, match="tree transport"):
        check_pipeline(resolve_pipeline(spec), "here")
    check_pipeline(resolve_pipeline("topk:0.1,values=bfloat16+ef14+perturb:radius=0.1"), "ok")
