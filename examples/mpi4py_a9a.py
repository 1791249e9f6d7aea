"""Compressed data-parallel training with plain PyTorch and mpi4py (no Horovod).

    mpirun -np 2 python examples/mpi4py_a9a.py --spec topk:0.01+ef21sgdm
    mpirun -np 8 python examples/mpi4py_a9a.py --spec topk:0.01+ef14 --transport tree

Each rank computes its gradient on its shard; ``SparseAllreduce`` averages every
parameter's gradient through packed payloads (one Allgather, or Allgatherv when sizes
differ; with ``--transport tree``, global top-k merged up a binomial tree), keeping the
feedback state per parameter name.
"""
import argparse

import numpy as np
import torch
from mpi4py import MPI

from hvd_compress.comm.mpi import SparseAllreduce
from hvd_compress.datasets import load_libsvm


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="topk:0.01+ef21sgdm:eta=0.2")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--transport", choices=["allgather", "tree"], default="allgather")
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    torch.set_num_threads(1)

    X, y = load_libsvm("a9a")
    perm = np.random.RandomState(0).permutation(len(y))
    test, shard = perm[:4000], perm[4000:][rank::size]
    torch.manual_seed(0)  # the same initial weights everywhere
    model = torch.nn.Sequential(torch.nn.Linear(123, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    reducer = SparseAllreduce(args.spec, comm, transport=args.transport)
    order = np.random.RandomState(1 + rank)
    for _ in range(args.epochs):
        idx = shard[order.permutation(len(shard))]
        for i in range(0, len(idx) - 31, 32):
            b = idx[i:i + 32]
            opt.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(
                model(torch.from_numpy(X[b])).squeeze(1), torch.from_numpy(y[b])).backward()
            for name, p in model.named_parameters():
                p.grad = reducer.allreduce(p.grad, name=name)
            opt.step()
    with torch.no_grad():
        acc = ((model(torch.from_numpy(X[test])).squeeze(1) > 0).float()
               == torch.from_numpy(y[test])).float().mean().item()
    tel = reducer.telemetry
    if rank == 0:
        print(f"{args.spec} ({args.transport}, {size} ranks): {tel.total_bits():,} bits "
              f"compressed by rank 0 "
              f"({tel.ratio():.1f}x fewer than dense fp32), held-out accuracy {acc:.4f}")


if __name__ == "__main__":
    main()
