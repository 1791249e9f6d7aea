"""mpi4py sparse allgather: every compressor, numpy and torch buffers, against an oracle."""
import numpy as np
import pytest
import torch
from mpi4py import MPI

import hvd_compress as hc
from hvd_compress import Key
from hvd_compress.comm.mpi import SparseAllreduce

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
SPECS = hc.available("compressor") + ["randk:0.1,shared=true", "randk:0.2,scaled=true",
                                     "threshold:lam=1.0", "topk:k=1"]


def local(d, step):
    return np.random.RandomState(100 * rank + step).standard_normal(d).astype(np.float32)


def oracle(spec, x, name, step, seed=4):
    """The average of every rank's decompressed payload, computed in one process."""
    everyone = np.empty((size, x.size), np.float32)
    comm.Allgather(x, everyone)
    c = hc.resolve(spec)
    dense = [c.decompress(c.compress(everyone[r], Key(seed, r, name, step))) for r in range(size)]
    return np.mean(np.stack(dense).astype(np.float64), 0)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_allreduce_matches_oracle(spec, kind):
    red = SparseAllreduce(spec, comm, seed=4)
    for step in range(2):
        x = local(1000, step)
        t = torch.from_numpy(x) if kind == "torch" else x
        out = red.allreduce(t, name="w", step=step)
        got = out.numpy() if kind == "torch" else out
        np.testing.assert_allclose(got, oracle(spec, x, "w", step), rtol=1e-5, atol=1e-6)
        # every rank holds bit-identical results
        allout = np.empty((size, 1000), np.float32)
        comm.Allgather(np.ascontiguousarray(got, np.float32), allout)
        assert (allout == allout[0]).all()
    bk = hc.core.ops.backend_named("numpy")
    sent = [r.bits for r in red.telemetry.rows]
    want = [hc.resolve(spec).compress(local(1000, s), Key(4, rank, "w", s)).wire_bits(bk)
            for s in range(2)]
    assert sent == want


def test_variable_sizes_use_allgatherv():
    # threshold payloads differ across ranks: rank r keeps about r-dependent counts
    red = SparseAllreduce("threshold:lam=1.5", comm)
    x = local(3000, 0) * (1 + rank)
    out = red.allreduce(x, name="v")
    np.testing.assert_allclose(out, oracle("threshold:lam=1.5", x, "v", 0), rtol=1e-5, atol=1e-6)
