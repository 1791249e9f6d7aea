"""PyTorch + Horovod: compression= on hvd.DistributedOptimizer, against an oracle."""
import copy

import numpy as np
import pytest
import torch
import horovod.torch as hvd

import hvd_compress as hc
import hvd_compress.torch as hct
from hvd_compress import HvdCompressError
from hvd_compress.core.simulate import Workers

hvd.init()
torch.set_num_threads(1)
rank, size = hvd.rank(), hvd.size()
SPECS = hc.available("compressor") + [
    "randk:0.2,shared=true", "topk:k=3", "topk:0.1+ef14", "topk:0.1+ef21sgdm:eta=0.5",
    "topk:0.2+ef21sgd2m", "randk:0.3,scaled=true+diana", "topk:0.1+ef21+warmup:1",
    "topk+ef14+dynamic:c0=2000"]
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


def wire_bits(oracle, spec, step):
    """Bits this rank hands to Horovod: summable values by allreduce (no header), bf16 and
    everything else as a packed buffer by allgather."""
    p, codec = oracle.last[rank], oracle.last_codec
    if codec.summable and p.values.dtype != torch.bfloat16:
        return 8 * p.values.numel() * p.values.element_size()
    return oracle.bits[step][rank]


@pytest.mark.parametrize("binding", ["plain", "eager"])
@pytest.mark.parametrize("spec", SPECS)
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
        dopt.zero_grad()  # set_to_none=True: state must not hang on grad tensors
        loss_fn(model, x, y).backward()
        dopt.synchronize()
        tol = TOL.get(spec, 1e-5)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad.reshape(-1), expected[name], rtol=tol, atol=tol,
                                       msg=f"{spec} step {step} {name}")
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


def test_bare_allreduce_of_a_sparse_compressor_is_refused():
    with pytest.raises(HvdCompressError, match="needs each tensor's name"):
        hvd.allreduce(torch.ones(4), compression=hct.compression("topk:0.5"))


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
