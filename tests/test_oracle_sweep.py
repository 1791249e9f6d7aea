"""Every spec, in one process: the exchange the frontends run, across simulated ranks,
against the simulator.

For each spec the multi-rank files used to sweep, simulated ranks each run the
frontend's own :class:`Exchange` (``begin``, the packed buffer or summable values it hands
to Horovod or MPI, ``finish_gathered`` / ``finish_allreduced`` with every header checked),
with the buffers concatenated as an allgather would or summed in rank order and averaged
as an allreduce would, on each frontend's route:

* ``torch``: PyTorch tensors, casts summed by allreduce (the Horovod + torch frontend);
* ``mpi4py``: NumPy buffers, everything gathered (``SparseAllreduce``);
* ``tensorflow``: every rank's step inside one ``tf.function`` with the state in
  variables (two ranks, one tensor: tracing is what costs), or eagerly for ranks that
  agree on k (their allgathers mid-step need a graph per rank).

Every rank must decode the same update, equal to the simulator's on the payload objects,
and hand over the bits the simulator's payloads take. Under mpirun (tests/mpi) a few specs
per route remain, with real collectives and independent NumPy oracles
(tests/mpi/test_oracles.py).
"""
import numpy as np
import pytest
import tensorflow as tf
import torch

import hvd_compress as hc
from hvd_compress.core.exchange import Exchange
from hvd_compress.core.ops import ITEMSIZE, backend_for, backend_named
from hvd_compress.core.pipeline import resolve_pipeline
from hvd_compress.core.simulate import Workers, run_ranks
from hvd_compress.tensorflow.exchange import VariableExchange

N, STEPS, SEED = 3, 3, 7  # three ranks: 1/n is inexact, and a sum of three has an order
N_GRAPH = 2  # tracing every rank's step into one graph is what costs
SHAPES = {"layer/kernel": (40, 25), "layer/bias": (7,)}
GRAPH_SHAPES = {"layer/kernel": (40, 25)}  # and one tensor
MODEL_SIZE = 1007  # what perturb spreads its noise over (the frontends' whole model)
COMPRESSORS = hc.available("compressor")
SWEEPS = {  # route -> the specs its multi-rank file used to sweep
    "torch": COMPRESSORS + [
        "randk:0.2,shared=true", "topk:k=3", "topk:0.1+ef14", "topk:0.1+ef21sgdm:eta=0.5",
        "topk:0.2+ef21sgd2m", "randk:0.3,scaled=true+diana", "topk:0.1+ef21+warmup:1",
        "topk+ef14+dynamic:c0=2000", "topk:0.1,indices=varint,values=float16+ef14",
        "topk+ef21sgdm+dynamic:c0=2000,agree=true"],
    "mpi4py": COMPRESSORS + [
        "randk:0.1,shared=true", "randk:0.2,scaled=true", "threshold:lam=1.0", "topk:k=1",
        "topk:0.1+ef14", "topk:0.1+ef21", "topk:0.1+ef21sgdm", "topk:0.1+ef21sgd2m",
        "natural+diana", "threshold:lam=1.5+ef14", "topk:0.1+ef21sgdm+warmup:1",
        "topk+ef14+dynamic:c0=2000", "topk+ef21sgdm+dynamic:cost=packet,packet=2048",
        "topk:0.05,indices=varint+ef21sgdm", "threshold:lam=1.0,indices=varint",
        "qsgd:bucket=128+dynamic:c0=30000", "qsgd+dynamic:cost=linear",
        "bernoulli:0.1", "bernoulli+dynamic:c0=5000",
        "topk+ef14+dynamic:c0=2000,agree=true"],
    "tensorflow": COMPRESSORS + [
        "randk:0.2,shared=true", "topk:k=3", "topk:0.1+ef14", "topk:0.1+ef21sgdm:eta=0.5",
        "topk:0.2+ef21sgd2m", "randk:0.3,scaled=true+diana", "topk:0.1+ef21+warmup:1",
        "topk:0.1,indices=varint,values=float16+ef14", "threshold:lam=0.05+ef14",
        "topk:0.1+ef21+perturb:radius=0.01", "topk+ef14+dynamic:c0=2000", "qsgd+dynamic",
        "topk+ef21sgdm+dynamic:c0=2000,agree=true", "bernoulli:0.2+dynamic"],
}
ROUTES = {  # what each frontend hands to its allreduce (the rest is gathered)
    "torch": ("float16", "float32", "float64"),
    "mpi4py": (),
    "tensorflow": ("float16", "float32", "float64"),
}
TOL = {"fp16": 2e-3, "bf16": 2e-2}
TF = backend_named("tensorflow")


def grads(step, shapes, n):
    """Every rank's gradient of every tensor at ``step`` (float32 numpy)."""
    out = {}
    for i, (name, shape) in enumerate(shapes.items()):
        rs = np.random.RandomState(1000 * step + i)
        out[name] = [(rs.standard_normal(shape) * (1 + r)).astype(np.float32)
                     for r in range(n)]
    return out


def to_backend(route, a):
    if route == "torch":
        return torch.from_numpy(np.ascontiguousarray(a))
    if route == "tensorflow":
        return tf.constant(a)
    return a


def numpy(t):
    return t.numpy() if hasattr(t, "numpy") else np.asarray(t)


def collective(bk, exchanges, name, outs):
    """Move every rank's outgoing as the frontend's collective would; each rank's update."""
    n = len(outs)
    if outs[0].by_allreduce:
        total = outs[0].wire
        for o in outs[1:]:
            total = total + o.wire
        total = total * (1.0 / n)  # Horovod's Average: the sum, scaled after
        return [ex.finish_allreduced(bk, total, o, n, summed=False)
                for ex, o in zip(exchanges, outs)]
    gathered = bk.concat([bk.flatten(o.wire) for o in outs])
    return [ex.finish_gathered(bk, gathered, o, n, summed=False)
            for ex, o in zip(exchanges, outs)]


def eager_exchanges(route, spec):
    exchanges = [Exchange(spec, SEED, allreduce_dtypes=ROUTES[route], model_size=MODEL_SIZE)
                 for _ in range(N)]
    bk = backend_named("numpy" if route == "mpi4py" else route)

    def step(named):
        updates = {}
        for name in sorted(named):  # one tensor after another, in name order
            def begin(r, gather, name=name):
                return exchanges[r].begin(bk, name, named[name][r], r, gather=gather)
            # ranks that settle k together (dynamic:agree=true) meet in gathers mid-begin
            outs = run_ranks(N, begin) if exchanges[0].pipeline.agrees else \
                [begin(r, None) for r in range(N)]
            updates[name] = collective(bk, exchanges, name, outs)
        return updates
    return exchanges, step


def graph_exchanges(spec):
    """Every rank's step in one tf.function, state in variables (the TF frontend's
    graph route)."""
    exchanges = [VariableExchange(spec, SEED, allreduce_dtypes=ROUTES["tensorflow"],
                                  model_size=MODEL_SIZE) for _ in range(N_GRAPH)]
    dense_steps = exchanges[0].pipeline.dense_steps
    names = sorted(GRAPH_SHAPES)

    @tf.function
    def run(*flat):
        updates = []
        for i, name in enumerate(names):
            xs = flat[i * N_GRAPH:(i + 1) * N_GRAPH]
            steps = [ex.next_step(name) for ex in exchanges]

            def phase(dense, name=name, xs=xs, steps=steps):
                outs = [ex.begin(TF, name, x, r, step=s, dense=dense)
                        for r, (ex, x, s) in enumerate(zip(exchanges, xs, steps))]
                return tf.stack(collective(TF, exchanges, name, outs))
            if dense_steps:
                updates.append(tf.cond(steps[0] < dense_steps, lambda: phase(True),
                                       lambda: phase(False)))
            else:
                updates.append(phase(None))
        return updates

    def step(named):
        out = run(*[g for name in names for g in named[name]])
        return {name: list(u) for name, u in zip(names, out)}
    return exchanges, step


def wire_bits(oracle, r, step, route):
    """Bits rank r hands to the collective: summable values of a dtype the route's
    allreduce sums travel bare (no header), everything else as a packed buffer."""
    p, codec = oracle.last[r], oracle.last_codec
    if codec.summable and p.values is not None:
        bk = backend_for(p.values)
        if bk.dtype(p.values) in ROUTES[route]:
            return 8 * int(bk.size(p.values)) * ITEMSIZE[bk.dtype(p.values)]
    return oracle.bits[step][r]


@pytest.mark.parametrize("route,spec", [(r, s) for r, specs in SWEEPS.items() for s in specs])
def test_exchange_across_simulated_ranks_matches_simulator(route, spec):
    # agreeing ranks meet in allgathers mid-step, which one graph of every rank cannot
    # hold: eagerly here, in the graph under mpirun (tests/mpi/test_tf_horovod.py)
    graph = route == "tensorflow" and not resolve_pipeline(spec).agrees
    exchanges, run = graph_exchanges(spec) if graph else eager_exchanges(route, spec)
    shapes, n = (GRAPH_SHAPES, N_GRAPH) if graph else (SHAPES, N)
    oracles = {name: Workers(spec, n, seed=SEED, name=name, model_size=MODEL_SIZE)
               for name in shapes}
    tol, bits = TOL.get(spec, 1e-5), []
    for step in range(STEPS):
        named = grads(step, shapes, n)
        updates = run({n: [to_backend(route, g) for g in gs] for n, gs in named.items()})
        for name, shape in shapes.items():
            want = numpy(oracles[name].step([to_backend(route, g.reshape(-1))
                                             for g in named[name]]))
            got = [numpy(u) for u in updates[name]]
            for r in range(n):
                assert got[r].shape == shape
                if graph:  # one graph holds every rank here, and grappler may rewrite each
                    # rank's copy of the same arithmetic differently (real ranks run
                    # identical graphs): agreement to rounding
                    np.testing.assert_allclose(got[r], got[0], rtol=1e-6, atol=1e-6,
                                               err_msg=f"rank {r} differs")
                else:
                    np.testing.assert_array_equal(got[r], got[0], err_msg=f"rank {r} differs")
            np.testing.assert_allclose(got[0].reshape(-1), want, rtol=tol, atol=tol,
                                       err_msg=f"{spec} {route} step {step} {name}")
            bits += [(r, step, name, wire_bits(oracles[name], r, step, route))
                     for r in range(n)]
    assert sorted((r, row.step, row.name, row.bits) for r, ex in enumerate(exchanges)
                  for row in ex.telemetry.rows) == sorted(bits)
