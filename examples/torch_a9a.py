"""Data-parallel training with compressed gradients: PyTorch + Horovod on LIBSVM a9a.

Launch with any number of ranks (the README's `make demo` uses 2):

    mpirun -np 2 python examples/torch_a9a.py --specs none fp16 topk:0.01+ef21sgdm

Each spec trains the same MLP from the same initial weights on the same shards; the only
change is the `compression=` argument of `hvd.DistributedOptimizer`. Rank 0 prints, per
spec, the bits each rank handed to Horovod's collectives per step (exact, headers
included), the saving against dense fp32, and the held-out accuracy.
"""
import argparse

import numpy as np
import torch
import horovod.torch as hvd

import hvd_compress.torch as hct
from hvd_compress.datasets import load_libsvm


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", nargs="+", default=[
        "none", "fp16", "natural", "qsgd", "topk:0.01", "topk:0.01+ef14",
        "topk:0.01+ef21sgdm:eta=0.2", "topk:0.01,indices=varint+ef14",
        "topk+ef14+dynamic:cost=affine,c0=20000"])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64, help="per-rank batch size")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--csv", default="", help="write per-step telemetry of every spec here")
    args = ap.parse_args()

    hvd.init()
    torch.set_num_threads(1)
    X, y = load_libsvm("a9a")
    rs = np.random.RandomState(0)
    perm = rs.permutation(len(y))
    test, train = perm[:4000], perm[4000:]
    shard = train[hvd.rank()::hvd.size()]
    Xt, yt = torch.from_numpy(X[test]), torch.from_numpy(y[test])

    if hvd.rank() == 0:
        print(f"a9a: {len(train)} training rows over {hvd.size()} ranks, {len(test)} held out")
        print(f"{'compression':<40}{'bits/step/rank':>15}{'saving':>8}{'accuracy':>10}")
    for spec in args.specs:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(X.shape[1], 64), torch.nn.ReLU(),
                                    torch.nn.Linear(64, 1))
        comp = hct.compression(spec)
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=args.lr,
                                                       momentum=0.9),
                                       named_parameters=model.named_parameters(),
                                       compression=comp)
        order = np.random.RandomState(1 + hvd.rank())
        steps = 0
        for _ in range(args.epochs):
            idx = shard[order.permutation(len(shard))]
            for i in range(0, len(idx) - args.batch + 1, args.batch):
                b = idx[i:i + args.batch]
                opt.zero_grad()
                out = model(torch.from_numpy(X[b])).squeeze(1)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    out, torch.from_numpy(y[b]))
                loss.backward()
                opt.step()
                steps += 1
        with torch.no_grad():
            acc = ((model(Xt).squeeze(1) > 0).float() == yt).float().mean().item()
        tel = comp.telemetry
        if args.csv:
            tel.to_csv(f"{args.csv}.{spec.replace(':', '_')}.rank{hvd.rank()}.csv")
        if hvd.rank() == 0:
            print(f"{spec:<40}{tel.total_bits() / steps:>15,.0f}{tel.ratio():>7.1f}x"
                  f"{acc:>10.4f}")


if __name__ == "__main__":
    main()
