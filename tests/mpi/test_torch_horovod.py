"""PyTorch + Horovod: compression= on hvd.DistributedOptimizer, against an oracle."""
import copy
import os

import numpy as np
import pytest
import torch
import horovod.torch as hvd

import hvd_compress.torch as hct
from hvd_compress import HvdCompressError
from hvd_compress.core.simulate import Workers

os.environ["HOROVOD_DYNAMIC_PROCESS_SETS"] = "1"  # for the process-set test
hvd.init()
torch.set_num_threads(1)
rank, size = hvd.rank(), hvd.size()
# 3 ranks (read by tests/test_multirank.py): odd and even ranks both run (hook orders and
# gradients that differ by parity), sums of three have an order and 1/3 is inexact; one
# launch instead of two keeps the suite in budget (test_oracles.py and test_mpi4py.py
# still run with 2 and 4 ranks).
MPI_RANKS = (3,)
# One spec per route a gradient can take; every spec is swept in one process by
# tests/test_oracle_sweep.py, and tests/mpi/test_oracles.py checks the feedback rules
# against NumPy restatements.
SPECS = ["fp16",                                          # cast, allreduce
         "bf16",                                          # cast, gathered (no bf16 allreduce)
         "randk:0.2,shared=true",                         # sparse values, allreduce
         "qsgd",                                          # quantizer: scales and codes
         "topk:0.1+ef21sgdm:eta=0.5",                     # fixed-size sparse, feedback
         "topk:0.1,indices=varint,values=float16+ef14",   # variable-size sparse, varint
         "topk:0.1+ef21+warmup:1"]                        # dense allreduce, then gathered
# the binding moment (eagerly, or on Horovod's first step) does not depend on the spec
CASES = [(spec, "plain") for spec in SPECS] + \
    [("topk:0.1+ef21sgdm:eta=0.5", "eager"), ("fp16", "eager")]
TOL = {"fp16": 2e-3, "bf16": 2e-2}


def model_and_data(step):
    torch.manual_seed(0)  # identical initial weights on every rank
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    g = torch.Generator().manual_seed(1000 * rank + step)
    return model, torch.randn(32, 12, generator=g), torch.randint(0, 3, (32,), generator=g)


def loss_fn(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


def local_grads(model, x, y):
    shadow = copy.deepcopy(model)  # same weights, no Horovod hooks
    loss_fn(shadow, x, y).backward()
    return {name: p.grad.detach().reshape(-1) for name, p in shadow.named_parameters()}


def oracle_step(oracles, grads, tag):
    """Every rank's gradients, fed to the single-process simulator of each parameter."""
    out = {}
    for name, g in grads.items():
        everyone = hvd.allgather(g.reshape(1, -1), name=f"oracle.{tag}.{name}")
        out[name] = oracles[name].step(list(everyone))
    return out


def check_synchronized_grads(dopt, model, x, y, expected, spec, step):
    """One backward pass and Horovod's synchronize; every gradient equals ``expected``."""
    dopt.zero_grad()  # set_to_none=True: state must not hang on grad tensors
    loss_fn(model, x, y).backward()
    dopt.synchronize()
    tol = TOL.get(spec, 1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.reshape(-1), expected[name], rtol=tol, atol=tol,
                                   msg=f"{spec} step {step} {name}")


def wire_bits(oracle, spec, step):
    """Bits this rank hands to Horovod: summable values by allreduce (no header), bf16 and
    everything else as a packed buffer by allgather."""
    p, codec = oracle.last[rank], oracle.last_codec
    if codec.summable and p.values.dtype != torch.bfloat16:
        return 8 * p.values.numel() * p.values.element_size()
    return oracle.bits[step][rank]


@pytest.mark.parametrize("spec,binding", CASES)
def test_gradients_match_oracle(spec, binding):
    model, _, _ = model_and_data(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    if binding == "plain":  # unmodified hvd.DistributedOptimizer, one argument
        comp = hct.compression(spec, seed=7)
        dopt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                        compression=comp)
    else:
        dopt = hct.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                        compression=hct.compression(spec, seed=7))
        comp = dopt.compression
    oracles = {name: Workers(spec, size, seed=7, name=name)
               for name, _ in model.named_parameters()}
    for step in range(3):
        _, x, y = model_and_data(step)
        expected = oracle_step(oracles, local_grads(model, x, y), f"{spec}.{binding}.{step}")
        check_synchronized_grads(dopt, model, x, y, expected, spec, step)
        rows = {r.name: r.bits for r in comp.telemetry.rows if r.step == step}
        assert rows == {name: wire_bits(w, spec, step) for name, w in oracles.items()}
        with dopt.skip_synchronize():
            dopt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = hvd.allgather(flat.reshape(1, -1), name=f"final.{spec}.{binding}")
    assert torch.equal(everyone, flat.expand(size, -1)), "parameters differ across ranks"


def test_sparse_bytes_shrink_with_k():
    bits = {}
    for ratio in (0.01, 0.1, 1.0):
        model, x, y = model_and_data(0)
        comp = hct.compression(f"topk:{ratio}")
        dopt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                        named_parameters=model.named_parameters(),
                                        compression=comp)
        loss_fn(model, x, y).backward()
        dopt.step()
        bits[ratio] = comp.telemetry.total_bits()
    assert bits[0.01] < bits[0.1] < bits[1.0]


@pytest.mark.parametrize("spec", ["topk:0.5", "fp16+perturb:radius=0.1", "none+warmup:1"])
def test_bare_allreduce_refuses_what_it_cannot_carry(spec):
    with pytest.raises(HvdCompressError, match="needs each tensor's name"):
        hvd.allreduce(torch.ones(4), compression=hct.compression(spec))


def test_fp16_through_bare_allreduce():
    out = hvd.allreduce(torch.full((4,), float(rank)), compression=hct.compression("fp16"),
                        op=hvd.Sum)
    assert torch.equal(out, torch.full((4,), float(sum(range(size)))))


def test_one_compression_per_optimizer():
    comp = hct.compression("topk:0.5")
    m1, _, _ = model_and_data(0)
    hct.DistributedOptimizer(torch.optim.SGD(m1.parameters(), lr=0.1),
                             named_parameters=m1.named_parameters(), compression=comp)
    m2, _, _ = model_and_data(0)
    with pytest.raises(HvdCompressError, match="already bound to another optimizer"):
        hct.DistributedOptimizer(torch.optim.SGD(m2.parameters(), lr=0.1),
                                 named_parameters=m2.named_parameters(), compression=comp)


def run_and_compare(spec, tag, steps=2, passes=1, scale=1.0, comm=None, **hvd_kwargs):
    """Train with Horovod's options; compare every gradient with the simulator."""
    model, _, _ = model_and_data(0)
    dopt = hct.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5),
                                    named_parameters=model.named_parameters(),
                                    compression=hct.compression(spec, seed=7, comm=comm),
                                    backward_passes_per_step=passes, **hvd_kwargs)
    ps = hvd_kwargs.get("process_set", hvd.global_process_set)
    n = ps.size()
    size_of_model = sum(p.numel() for p in model.parameters())  # what perturb spreads over
    oracles = {name: Workers(spec, n, seed=7, name=name, model_size=size_of_model)
               for name, _ in model.named_parameters()}
    for step in range(steps):
        local = {name: 0 for name, _ in model.named_parameters()}
        dopt.zero_grad()
        for micro in range(passes):
            _, x, y = model_and_data(10 * step + micro)
            for name, g in local_grads(model, x, y).items():
                local[name] = local[name] + g
            loss_fn(model, x, y).backward()
        dopt.synchronize()
        for name, p in model.named_parameters():
            everyone = hvd.allgather(local[name].reshape(1, -1), name=f"{tag}.{step}.{name}",
                                     process_set=ps)
            want = oracles[name].step(list(everyone)) * scale
            tol = TOL.get(spec, 1e-5)
            torch.testing.assert_close(p.grad.reshape(-1), want, rtol=tol, atol=tol)
        with dopt.skip_synchronize():
            dopt.step()


@pytest.mark.parametrize("spec", ["topk:0.2+ef21sgdm", "fp16", "qsgd"])
def test_op_sum(spec):
    run_and_compare(spec, f"sum.{spec}", op=hvd.Sum, scale=size)


@pytest.mark.parametrize("spec", ["topk:0.2+ef14", "none"])
def test_gradient_predivide_factor(spec):
    run_and_compare(spec, f"predivide.{spec}", gradient_predivide_factor=2.0)


def test_backward_passes_per_step():
    run_and_compare("topk:0.2+ef21", "bpps", passes=3)


@pytest.mark.parametrize("spec", ["topk:0.2+ef21sgdm", "fp16", "randk:0.3,shared=true"])
def test_groups_fuse_collectives(spec):
    run_and_compare(spec, f"groups.{spec}", groups=2)


def test_agreed_level_is_this_steps_joint_optimum():
    """dynamic:agree=true: every rank uses the k that is best for the sum of the ranks'
    energies, settled at synchronize in name order; the simulator settles it alike."""
    run_and_compare("topk+ef14+dynamic:c0=2000,agree=true", "agree", steps=3)


def test_perturbation_is_isotropic_over_the_whole_model():
    """perturb's noise is N(0, r^2 / D) per entry, D every parameter the optimizer
    reduces: the frontend learns D when it binds, and the oracle draws with it."""
    run_and_compare("topk:0.5+ef14+perturb:radius=0.1", "perturb", steps=2)
    model, _, _ = model_and_data(0)
    comp = hct.compression("topk:0.5+ef14+perturb:radius=0.1")
    hct.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                             named_parameters=model.named_parameters(), compression=comp)
    assert comp.exchange.model_size == sum(p.numel() for p in model.parameters()) == 259


@pytest.mark.parametrize("spec, why", [("topk+ef14+dynamic:c0=2000,agree=true",
                                        "drop groups= or agree=true"),
                                       ("auto", "drop groups= or auto")])
def test_per_tensor_levels_refuse_groups(spec, why):
    with pytest.raises(HvdCompressError, match=why):
        run_and_compare(spec, f"groups.refused.{spec}", groups=2)


@pytest.mark.parametrize("spec, why", [("topk+ef14+dynamic:c0=2000,agree=true",
                                        "drop groups= or agree=true"),
                                       ("auto", "drop groups= or auto")])
def test_horovods_own_optimizer_with_groups_refuses_per_tensor_levels_alike(spec, why):
    """Horovod's own optimizer with groups= hands the compression each group's tensors
    without names: the refusal says what to drop (not to use an optimizer that refuses
    too), on every rank, before anything moves."""
    model, x, y = model_and_data(0)
    hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5),
                             named_parameters=model.named_parameters(),
                             compression=hct.compression(spec), groups=2)
    with pytest.raises(HvdCompressError, match=why):
        loss_fn(model, x, y).backward()


@pytest.mark.parametrize("spec", ["topk:0.2+ef21sgdm", "threshold:lam=0.05+ef14", "fp16"])
def test_mpi4py_carries_the_payloads_under_horovod(spec):
    from mpi4py import MPI
    run_and_compare(spec, f"mpi4py.{spec}", comm=MPI.COMM_WORLD)


@pytest.mark.parametrize("transport", ["horovod", "mpi4py"])
@pytest.mark.parametrize("spec", ["topk:0.05+ef21sgdm", "topk+ef14+dynamic:c0=3000", "fp16"])
def test_whole_model_mode_is_one_vector(spec, transport):
    """One budget across all tensors: the update equals the simulator run on the
    concatenation of every gradient (sorted by parameter name)."""
    from mpi4py import MPI
    model, _, _ = model_and_data(0)
    comp = hct.compression(spec, seed=7, whole_model=True,
                           comm=MPI.COMM_WORLD if transport == "mpi4py" else None)
    dopt = hct.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5),
                                    named_parameters=model.named_parameters(), compression=comp)
    oracle = Workers(spec, size, seed=7, name="model")
    names = sorted(n for n, _ in model.named_parameters())
    for step in range(2):
        _, x, y = model_and_data(step)
        local = local_grads(model, x, y)
        flat = torch.cat([local[n] for n in names])
        everyone = hvd.allgather(flat.reshape(1, -1), name=f"whole.{spec}.{transport}.{step}")
        want = oracle.step(list(everyone)).split([local[n].numel() for n in names])
        dopt.zero_grad()
        loss_fn(model, x, y).backward()
        dopt.synchronize()
        params = dict(model.named_parameters())
        for n, w in zip(names, want):
            tol = TOL.get(spec, 1e-5)
            torch.testing.assert_close(params[n].grad.reshape(-1), w, rtol=tol, atol=tol)
        assert {r.name for r in comp.telemetry.rows} == {"model"}
        with dopt.skip_synchronize():
            dopt.step()


FUSED = [("topk:0.1+ef21sgdm:eta=0.5", "plain", "horovod"),
         ("topk:0.1,indices=varint+ef14", "eager", "horovod"),
         ("qsgd", "plain", "horovod"),
         ("topk:0.1+ef21+warmup:1", "plain", "horovod"),
         ("topk:0.1+ef21sgdm:eta=0.5", "eager", "mpi4py"),
         ("fp16", "plain", "horovod")]


@pytest.mark.parametrize("spec,binding,transport", FUSED)
def test_small_tensors_travel_fused(spec, binding, transport):
    """fuse_below=64: the three small tensors (16, 48 and 3 entries) travel as one vector
    in sorted name order, the 192-entry weight alone; each equals the simulator run on
    the same vector. Casts are never fused (Horovod fuses allreduces itself)."""
    from mpi4py import MPI
    model, _, _ = model_and_data(0)
    comp = hct.compression(spec, seed=7, fuse_below=64,
                           comm=MPI.COMM_WORLD if transport == "mpi4py" else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    if binding == "plain":
        dopt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                        compression=comp)
    else:
        dopt = hct.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                        compression=comp)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    cast = spec == "fp16"
    small = [] if cast else sorted(n for n in sizes if sizes[n] < 64)
    bucket = f"fused.{small[0]}+{len(small) - 1}" if small else None
    alone = sorted(n for n in sizes if n not in small)
    oracles = {n: Workers(spec, size, seed=7, name=n) for n in alone}
    if bucket:
        oracles[bucket] = Workers(spec, size, seed=7, name=bucket)
    for step in range(3):
        _, x, y = model_and_data(step)
        local = local_grads(model, x, y)
        vectors = {n: local[n] for n in alone}
        if bucket:
            vectors[bucket] = torch.cat([local[n] for n in small])
        want = {}
        for key, v in vectors.items():
            everyone = hvd.allgather(v.reshape(1, -1), name=f"fused.{spec}.{binding}.{step}.{key}")
            want[key] = oracles[key].step(list(everyone))
        if bucket:
            for n, part in zip(small, want.pop(bucket).split([sizes[n] for n in small])):
                want[n] = part
        check_synchronized_grads(dopt, model, x, y, want, spec, step)
        assert {r.name for r in comp.telemetry.rows if r.step == step} == set(oracles)
        with dopt.skip_synchronize():
            dopt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = hvd.allgather(flat.reshape(1, -1), name=f"fused.final.{spec}.{binding}")
    assert torch.equal(everyone, flat.expand(size, -1)), "parameters differ across ranks"


AUTO_RATIOS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)


def auto_profile(grads, least):
    """NumPy restatement of a tensor's profile summed over the ranks: per candidate k
    (the spec's, then AUTO_RATIOS of d above it) the energy of each rank's k largest
    entries, then the total energy and the largest magnitudes, each summed."""
    d = grads[0].size
    ks = [least] + sorted({k for k in (max(1, int(r * d)) for r in AUTO_RATIOS)
                           if least < k <= d})
    energy = [np.cumsum(np.sort(g.astype(np.float64) ** 2)[::-1]) for g in grads]
    return ks, [sum(e[k - 1] for e in energy) for k in ks] + \
        [sum(e[-1] for e in energy), sum(float(np.abs(g).max()) for g in grads)]


def auto_plan(costs, profiled, least):
    """NumPy restatement of auto's plan (with error feedback), every tensor together.
    Per tensor: the k whose share of the ranks' energy is the largest per second of
    top-k's time, then the fastest of dense, top-k at that k and a cast (scaled so the
    summed largest magnitude lands just under 65504 / 1024); then, if what the casts save
    against each tensor's next best route does not pay for the float16 message's alpha
    (less float32's where no tensor stays dense but some would without the casts), each
    cast takes its next best route. Returns name -> the routes within rounding of the
    best, best first. Every parameter here is float32."""
    (ar, br), (ag, bg), (a, b), cast, half = costs
    ah, bh = (ar, br) if half is None else half  # float16 allreduces, where timed apart
    plans, fallback, saved = {}, {}, 0.0
    for n, grads in profiled.items():
        d = grads[0].size
        ks, profile = auto_profile(grads, max(1, int(least * d)))
        shares = np.array(profile[:-2]) / profile[-2]
        times = np.array([a + b * d + ag + bg * 8 * (24 + 8 * k) for k in ks])
        per_second = shares / times
        options = {("topk", k, 0): t for k, t, e in zip(ks, times, per_second)
                   if e >= per_second.max() * (1 - 1e-9)}
        options[("dense", 0, 0)] = br * 32 * d
        order = ["dense", "topk", "cast"]
        fallback[n] = min(options, key=lambda r: (options[r], order.index(r[0])))
        if cast is not None:
            shift = int(np.floor(np.log2(65504 / 1024 / profile[-1])))
            options[("cast", 0, shift)] = cast[0] + cast[1] * d + bh * 16 * d
        fastest = min(options.values())
        plans[n] = sorted((r for r, t in options.items() if t <= fastest * (1 + 1e-9)),
                          key=lambda r: (options[r], order.index(r[0])))
        if plans[n][0][0] == "cast":
            saved += options[fallback[n]] - options[plans[n][0]]
    casts = [n for n, p in plans.items() if p[0][0] == "cast"]
    if casts:
        message = ah
        if all(p[0][0] != "dense" for p in plans.values()) and \
                any(fallback[n][0] == "dense" for n in casts):
            message -= ar
        if saved <= message:
            plans.update({n: [fallback[n]] for n in casts})
    return plans


def ef14_route_oracle(everyone, residuals, route):
    """NumPy restatement of EF14 over auto's routes: top-k, every rank sends the k largest
    of its compensated gradient (ties to the lower position) and keeps the rest; dense
    and cast, the gradients (scaled by 2**shift and cast to float16) are averaged as they
    are and the residuals wait. The update is the mean."""
    kind, k, shift = route
    if kind == "dense":
        return np.mean(everyone, 0, dtype=np.float32)
    if kind == "cast":
        half = (everyone * np.float32(2.0 ** shift)).astype(np.float16).astype(np.float32)
        return np.mean(half, 0, dtype=np.float32) * np.float32(2.0 ** -shift)
    sent = []
    for r, g in enumerate(everyone):
        p = residuals[r] + g
        s = np.zeros_like(p)
        keep = np.argsort(-np.abs(p), kind="stable")[:k]
        s[keep] = p[keep]
        residuals[r] = p - s
        sent.append(s)
    return np.sum(sent, 0) * np.float32(1.0 / len(everyone))


@pytest.mark.parametrize("fuse_below", [0, 64])
def test_cast_resends_never_wait_on_each_other_when_ranks_finish_in_other_orders(fuse_below):
    """'side' is used on rank 0 only: the other ranks' Horovod fills its gradients in at
    synchronize, so the ranks finish their gradients in different orders (rank 0: b,
    side, a; the others: b, a, side), and with ``fuse_below`` a rank may wait on its
    bucket (the biases and b's weight) first. At step 3 every cast's
    float16 sum overflows: every rank starts every resend before waiting on one (one
    resend at a time used to wait forever), and the update is every rank's mean gradient
    (a NumPy sum of the gradients plain autograd gives each rank); every rank then
    scales each tensor 2^10 smaller for the next steps, alike."""
    from hvd_compress.core.auto import Costs
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(8, 8), "side": torch.nn.Linear(8, 8),
                                 "b": torch.nn.Linear(8, 8), "c": torch.nn.Linear(8, 1)})
    comp = hct.compression("topk:0.01+ef14+auto:every=1000", fuse_below=fuse_below)
    dopt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0),
                                    named_parameters=model.named_parameters(),
                                    compression=comp)

    def loss(m, step):
        h = m["a"](torch.full((1, 8), float(rank + 1)))
        if rank == 0:
            h = h + m["side"](h)
        # rank 1 makes the tiny "c" last, so its (bucketed) gradients come first there;
        # the others make it first, so b's weight comes first there
        parts = [lambda: m["b"](h).sum(), lambda: m["c"](h.detach()).sum()]
        out = sum(f() for f in (parts if rank == 1 else parts[::-1]))
        return out * (1e8 if step == 3 else 1.0)
    for step in range(4):
        if step == 2:  # every tensor cast from here
            comp.exchange.costs = Costs((1e-9, 1e-6), (1e-2, 1e-6), (0.0, 0.0), (0.0, 0.0))
        shadow = copy.deepcopy(model)
        loss(shadow, step).backward()
        mean = {n: hvd.allgather(torch.zeros_like(p).reshape(1, -1) if p.grad is None else
                                 p.grad.reshape(1, -1), name=f"resend.{step}.{n}")
                .double().mean(0).numpy() for n, p in shadow.named_parameters()}
        dopt.zero_grad()
        loss(model, step).backward()
        dopt.synchronize()
        sent = {r.name for r in comp.telemetry.rows if r.step == step and r.count}
        resent = {r.name for r in comp.telemetry.rows if r.step == step and not r.count}
        assert resent == (sent if step == 3 else set())
        assert (sent == set(mean)) == (fuse_below == 0)  # else buckets of the small ones
        shifts = torch.tensor([[route.shift for _, route in sorted(comp.exchange._routes.items())]]
                              if comp.exchange._routes else [[]])
        everyone = hvd.allgather(shifts, name=f"resend.shifts.{step}")
        assert torch.equal(everyone, shifts.expand(size, -1)), "ranks scale apart"
        if step == 2:
            before = shifts
        elif step == 3:  # after the overflow, 2^10 smaller for the next steps
            assert torch.equal(shifts, before - 10)
        for n, p in model.named_parameters():
            tol = 2e-3 if step == 2 else 1e-6  # float16 sums at step 2; float32 resends
            np.testing.assert_allclose(p.grad.reshape(-1).double().numpy(), mean[n],
                                       rtol=tol, atol=tol * np.abs(mean[n]).max())
        with dopt.skip_synchronize():
            dopt.step()


def test_auto_grows_the_link_measurement_alike_on_every_rank():
    """The link's larger size grows 4x at a time until its allreduce takes long enough on
    some rank, or reaches some rank's largest gradient: every rank returns the same size
    whatever its own times and limits."""
    from hvd_compress.torch.transports import HorovodTransport
    model, _, _ = model_and_data(0)
    t = HorovodTransport(hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters(),
        compression=hct.compression("topk:0.01+ef14+auto")))
    assert t.link_size(1024, 0.0, 1 << 20, "grow.0", "cpu") == 1024  # long enough at once
    # never long enough: up to the least largest (rank 0's), through 4 KiB ... 1 MiB
    largest = (1 << 18) + 1 if rank == 0 else 1 << 30
    assert t.link_size(1024, float("inf"), largest, "grow.1", "cpu") == 1 << 20
    # one rank slow enough (a limit of 0 seconds) stops every rank
    seconds = 0.0 if rank == size - 1 else float("inf")
    assert t.link_size(1024, seconds, 1 << 20, "grow.2", "cpu") == 1024


def test_cast_of_a_gradient_below_float16_is_sent_again_and_rescaled_alike():
    """Every tensor cast (forced costs from step 2); from step 3 the gradients are 1e-12x
    smaller, so every float16 sum holds zeros only: every rank sends each tensor again
    as it is (the update is Horovod's float32 average, a NumPy mean to float32
    rounding), and that dense sum plans each tensor's scale afresh, alike on every rank
    (the power of two that puts its largest entry, times the ranks, in [32, 64)); at
    step 4 the casts carry the small gradients again."""
    import math

    from hvd_compress.core.auto import Costs, Route
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    comp = hct.compression("topk:0.01+ef14+auto:every=1000")
    dopt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0),
                                    named_parameters=model.named_parameters(),
                                    compression=comp)
    x = torch.full((2, 8), float(rank + 1))
    for step in range(5):
        if step == 2:
            comp.exchange.costs = Costs((1e-9, 1e-6), (1e-2, 1e-6), (0.0, 0.0), (0.0, 0.0))
        scale = 1e-12 if step >= 3 else 1.0
        shadow = copy.deepcopy(model)
        (shadow(x).sum() * scale).backward()
        mean = {n: hvd.allgather(p.grad.reshape(1, -1), name=f"flush.{step}.{n}")
                .double().mean(0).numpy() for n, p in shadow.named_parameters()}
        dopt.zero_grad()
        (model(x).sum() * scale).backward()
        dopt.synchronize()
        resent = {r.name for r in comp.telemetry.rows if r.step == step and not r.count}
        assert resent == (set(mean) if step == 3 else set()), step
        for n, p in model.named_parameters():
            got = p.grad.reshape(-1).numpy()
            if step == 3:
                np.testing.assert_allclose(got, mean[n], rtol=1e-6)
                largest = float(np.abs(got).max()) * size
                want = Route("cast", shift=math.frexp(65504 / 1024 / largest)[1] - 1)
                assert comp.exchange.route(n, p.numel(), "float32") == want
            elif step >= 2:
                np.testing.assert_allclose(got, mean[n], rtol=2e-3,
                                           atol=2e-3 * float(np.abs(mean[n]).max()))
        shifts = torch.tensor([[r.shift for _, r in sorted(comp.exchange._routes.items())]])
        everyone = hvd.allgather(shifts, name=f"flush.shifts.{step}")
        assert torch.equal(everyone, shifts.expand(size, -1)), "ranks scale apart"


@pytest.mark.parametrize("route", ["measured", "topk", "dense", "cast"])
def test_auto_plans_every_tensor_alike_on_every_rank(route):
    """auto profiles every tensor at step 0, measures at step 1 and plans each tensor
    dense, cast or top-k at some k + EF14 from the slowest rank's times and the ranks'
    summed profiles. Every rank holds the same costs and profiles (the sums of a NumPy
    restatement of every rank's) and makes the same choice, a NumPy restatement's; the
    gradients equal a NumPy restatement of EF14 over the routes taken. 'topk', 'dense'
    and 'cast' set the costs every rank uses from step 2, so every route runs; at step 3
    of 'cast' one rank's gradient is 1e6x larger, so the float16 sum overflows and every
    rank sends the tensor again as it is."""
    from hvd_compress.core.auto import Costs
    model, _, _ = model_and_data(0)
    comp = hct.compression("topk:0.01+ef14+auto:every=1000", seed=7)
    dopt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5),
                                    named_parameters=model.named_parameters(),
                                    compression=comp)
    names = [n for n, _ in model.named_parameters()]
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    residuals = {n: [np.zeros(sizes[n], np.float32) for _ in range(size)] for n in names}
    slow, free = (1e-3, 1e-6), (0.0, 0.0)
    # top-k: an allgather whose bytes cost, so the k taken depends on the profiles
    forced = {"topk": Costs(slow, (1e-6, 1e-8), free), "dense": Costs((1e-9, 1e-15), slow, free),
              "cast": Costs((1e-9, 1e-6), (1e-2, 1e-6), free, free)}.get(route)
    profiled, plans = None, None
    for step in range(4):
        if step == 2 and forced is not None:  # after the measurement of step 1
            comp.exchange.costs = forced
        _, x, y = model_and_data(step)
        overflow = route == "cast" and step == 3
        scale = 1e6 if overflow and rank == 0 else 1.0
        shadow = copy.deepcopy(model)  # the same gradients, without Horovod's hooks
        (loss_fn(shadow, x, y) * scale).backward()
        everyone = {n: hvd.allgather(p.grad.reshape(1, -1), name=f"auto.{route}.{step}.{n}")
                    .numpy() for n, p in shadow.named_parameters()}
        profiled = profiled or everyone
        dopt.zero_grad()
        (loss_fn(model, x, y) * scale).backward()
        dopt.synchronize()
        if step >= 1:
            for n in names:  # the ranks' profiles, summed
                d, dtype, got = comp.exchange.profiles[n]
                want = auto_profile(list(profiled[n]), max(1, int(0.01 * d)))[1]
                assert (d, dtype) == (sizes[n], "float32")
                np.testing.assert_allclose(got, want, rtol=1e-9)
            plans = auto_plan(comp.exchange.costs, {n: list(profiled[n]) for n in names}, 0.01)
        rows = {r.name: r for r in comp.telemetry.rows if r.step == step and r.count}
        resent = {r.name: r.bits for r in comp.telemetry.rows if r.step == step and not r.count}
        assert set(rows) == set(names)
        assert resent == ({n: 32 * sizes[n] for n in names} if overflow else {})
        taken = {}
        for n, p in model.named_parameters():
            d, row = sizes[n], rows[n]
            taken[n] = ("dense", 0, 0) if row.bits == 32 * d else \
                ("cast", 0) if row.bits == 16 * d and row.count == d else \
                ("topk", row.count, 0)
            if step == 0:
                assert taken[n] == ("dense", 0, 0), "before the first measurement: dense"
                want = ef14_route_oracle(everyone[n], residuals[n], taken[n])
            else:
                assert taken[n] in [r[:len(taken[n])] for r in plans[n]], (n, taken[n], plans)
                taken[n] = next(r for r in plans[n] if r[:len(taken[n])] == taken[n])
                # sent again as it is after an overflow: the dense mean
                want = ef14_route_oracle(everyone[n], residuals[n],
                                         ("dense", 0, 0) if overflow else taken[n])
            if step >= 2 and forced is not None:
                assert taken[n][0] == route, (n, taken[n])
            assert np.isfinite(want).all()
            if taken[n][0] == "cast" and not overflow:  # Horovod sums float16 its own way
                torch.testing.assert_close(p.grad.reshape(-1).numpy(), want, rtol=2e-3,
                                           atol=2e-3 * float(np.abs(want).max()))
            else:
                torch.testing.assert_close(p.grad.reshape(-1).numpy(), want, rtol=1e-6,
                                           atol=1e-6)
        if step >= 2 and route == "topk":  # neither end of [1, 5, 19]: the profile chose
            assert taken["0.weight"] == ("topk", 5, 0)
        routes = torch.tensor([[rows[n].bits for n in names]])
        assert torch.equal(hvd.allgather(routes, name=f"auto.routes.{route}.{step}"),
                           routes.expand(size, -1)), "ranks routed a tensor differently"
        with dopt.skip_synchronize():
            dopt.step()
    costs = torch.tensor([[v for part in comp.exchange.costs if part is not None
                           for v in part]], dtype=torch.float64)
    assert torch.equal(hvd.allgather(costs, name=f"auto.costs.{route}"),
                       costs.expand(size, -1)), "ranks measured different costs"


def test_process_set():
    members = list(range(size - 1)) if size > 2 else [0]  # not the global set
    ps = hvd.add_process_set(members)
    if rank in members:
        run_and_compare("topk:0.2+ef21sgdm", "ps", process_set=ps)
    hvd.remove_process_set(ps)


def test_parameter_without_gradient_on_some_ranks():
    """Rank 0 never uses layer b: it contributes zeros, as with Horovod's allreduce."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    named = [("a.weight", a.weight), ("a.bias", a.bias), ("b.weight", b.weight),
             ("b.bias", b.bias)]
    dopt = hct.DistributedOptimizer(torch.optim.SGD([p for _, p in named], lr=0.1),
                                    named_parameters=named, compression="topk:0.5+ef14")
    x = torch.ones(2, 4) * (rank + 1)
    sa, sb = copy.deepcopy(a), copy.deepcopy(b)
    (sa(x) if rank == 0 else sb(sa(x))).sum().backward()
    shadow = dict(zip([n for n, _ in named], [sa.weight, sa.bias, sb.weight, sb.bias]))
    (a(x) if rank == 0 else b(a(x))).sum().backward()
    dopt.synchronize()
    for name, p in named:
        g = shadow[name].grad
        g = torch.zeros_like(p) if g is None else g
        everyone = hvd.allgather(g.reshape(1, -1), name=f"nograd.{name}")
        want = Workers("topk:0.5+ef14", size, name=name).step(list(everyone))
        torch.testing.assert_close(p.grad.reshape(-1), want)


def test_sparse_gradients_keep_horovods_path():
    """Embedding(sparse=True) gradients take Horovod's own sparse allgather, uncompressed."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 3, sparse=True)
    dopt = hvd.DistributedOptimizer(torch.optim.SGD(emb.parameters(), lr=1.0),
                                    named_parameters=emb.named_parameters(),
                                    compression=hct.compression("topk:0.5+ef14"))
    emb(torch.tensor([rank % 10])).sum().backward()
    dopt.synchronize()
    want = torch.zeros(10, 3)
    for r in range(size):
        want[r % 10] += 1.0 / size
    torch.testing.assert_close(emb.weight.grad.to_dense(), want)
    with dopt.skip_synchronize():
        dopt.step()


def test_a9a_topk_ef21sgdm_matches_dense_accuracy():
    """Top-k 1% with EF21-SGDM within 1% accuracy of dense, same steps (real data)."""
    from hvd_compress.datasets import load_libsvm
    X, y = load_libsvm("a9a")
    perm = np.random.RandomState(0).permutation(len(y))
    test, train = perm[:4000], perm[4000:]
    shard = train[rank::size]
    acc = {}
    for spec in ("none", "topk:0.01+ef21sgdm:eta=0.2"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(123, 64), torch.nn.ReLU(),
                                    torch.nn.Linear(64, 1))
        dopt = hct.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.2),
                                        named_parameters=model.named_parameters(),
                                        compression=spec)
        order = np.random.RandomState(1 + rank).permutation(len(shard))
        for i in range(0, len(order) - 32, 32):
            b = shard[order[i:i + 32]]
            dopt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                model(torch.from_numpy(X[b])).squeeze(1), torch.from_numpy(y[b]))
            loss.backward()
            dopt.step()
        with torch.no_grad():
            pred = model(torch.from_numpy(X[test])).squeeze(1) > 0
            acc[spec] = (pred.float() == torch.from_numpy(y[test])).float().mean().item()
    assert acc["topk:0.01+ef21sgdm:eta=0.2"] >= acc["none"] - 0.01, acc
