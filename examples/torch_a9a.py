"""Data-parallel training with compressed gradients: PyTorch + Horovod on LIBSVM a9a.

The README's first command (`make demo`) runs it on 4 ranks:

    mpirun -np 4 python examples/torch_a9a.py [--specs ...] [--epochs 4] [--out demo-out]

Each spec trains the same MLP (123-256-256-1) from the same initial weights on the same
shards with SGD + momentum; the only change is the `compression=` argument of
`hvd.DistributedOptimizer`: none (dense fp32, Horovod's default), Horovod's own
`hvd.Compression.fp16`, and hvd_compress specs (`auto` plans each tensor dense, cast to
float16 or top-k at 1% or more + EF14 from the link, compute and gradients it
measures). Rank 0 prints per spec the bytes each rank handed to Horovod per step (exact
for hvd_compress, headers included, from its telemetry; the tensor sizes for Horovod's),
the bytes all ranks sent in all, the wall time, the held-out accuracy, and the step
time *projected* to slower links (see `projected`). It writes two plots into --out:
training loss against the bits each rank sent, and the entries sent per step.
"""
import argparse
import os
import time

import numpy as np
import torch
import horovod.torch as hvd

import hvd_compress.torch as hct
from hvd_compress.datasets import load_libsvm

SPECS = ["none", "horovod-fp16", "auto", "topk:0.01+ef14", "topk:0.01+ef21sgdm:eta=0.5",
         "topk+ef14+dynamic:cost=affine,c0=20000"]
LINKS = {"100 Mbit/s": 100e6, "1 Gbit/s": 1e9, "10 Gbit/s": 10e9}
LATENCY_S = 25e-6  # per message per ring hop


def projected(compute_s, messages, n, bits_per_s):
    """Step time on a link of ``bits_per_s``: the step time measured here (compute, and
    this machine's own communication, so the projection errs high) plus a ring
    (alpha-beta) model of the wire. An allreduce of S bytes per rank costs
    2 (n - 1) / n * S / B + 2 (n - 1) alpha; an allgather of s bytes from each rank
    (n - 1) s / B + (n - 1) alpha; alpha = 25 us. A projection, not a measurement: `make
    bench-link` times real steps on shaped links."""
    wire = 0.0
    for kind, nbytes in messages:
        if kind == "allreduce":
            wire += 2 * (n - 1) / n * 8 * nbytes / bits_per_s + 2 * (n - 1) * LATENCY_S
        else:
            wire += (n - 1) * 8 * nbytes / bits_per_s + (n - 1) * LATENCY_S
    return compute_s + wire


def train(spec, args, data, fuse_below):
    """Train one model with ``spec``; returns (accuracy, losses, bits per step, entries
    per step, messages of one step, wall seconds, steps)."""
    from tqdm import tqdm

    X, y, shard, Xt, yt = data
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(X.shape[1], args.hidden), torch.nn.ReLU(),
                                torch.nn.Linear(args.hidden, args.hidden), torch.nn.ReLU(),
                                torch.nn.Linear(args.hidden, 1))
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    if spec == "none":
        comp = hvd.Compression.none
    elif spec == "horovod-fp16":
        comp = hvd.Compression.fp16
    else:
        comp = hct.compression(spec, fuse_below=fuse_below)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=args.lr,
                                                   momentum=0.9),
                                   named_parameters=model.named_parameters(),
                                   compression=comp)
    order = np.random.RandomState(1 + hvd.rank())
    per_epoch = len(shard) // args.batch
    if args.max_steps:
        per_epoch = min(per_epoch, args.max_steps)
    bar = tqdm(total=args.epochs * per_epoch, desc=f"{spec:<40}", leave=True,
               disable=hvd.rank() != 0, ncols=100, mininterval=0.5)
    losses, steps, t0 = [], 0, time.perf_counter()
    for _ in range(args.epochs):
        idx = shard[order.permutation(len(shard))]
        for i in range(per_epoch):
            b = idx[i * args.batch:(i + 1) * args.batch]
            opt.zero_grad()
            out = model(torch.from_numpy(X[b])).squeeze(1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                out, torch.from_numpy(y[b]))
            loss.backward()
            opt.step()
            losses.append(loss.item())
            steps += 1
            bar.update()
    wall = time.perf_counter() - t0
    bar.close()
    with torch.no_grad():
        acc = ((model(Xt).squeeze(1) > 0).float() == yt).float().mean().item()
    sizes = [p.numel() for p in model.parameters()]
    if spec in ("none", "horovod-fp16"):
        width = 4 if spec == "none" else 2
        # Horovod fuses the allreduces of a step into one buffer
        bits = [8 * width * sum(sizes)] * steps
        entries = [sum(sizes)] * steps
        messages = [("allreduce", width * sum(sizes))]
    else:
        rows = comp.telemetry.rows
        bits = [0] * steps
        entries = [0] * steps
        for r in rows:
            bits[r.step] += r.bits
            entries[r.step] += r.count
        last = [r for r in rows if r.step == steps - 1]
        # auto's dense routes are plain allreduces, which Horovod fuses into one buffer
        dense = sum(r.bits // 8 for r in last if r.count == r.numel and
                    r.bits == r.dense_bits)
        messages = [("allgather", r.bits // 8) for r in last
                    if not (r.count == r.numel and r.bits == r.dense_bits)]
        messages += [("allreduce", dense)] if dense else []
    return acc, losses, bits, entries, messages, wall, steps


def plot(results, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def figure(name, xlabel, ylabel, curves):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for spec, (xs, ys) in curves.items():
            ax.plot(xs, ys, label=spec)
        ax.set_xscale("log" if name == "loss_vs_bits" else "linear")
        ax.set_yscale("log" if name == "entries_per_step" else "linear")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"{name}.png"), dpi=120)

    curves = {}
    for spec, r in results.items():
        w = min(20, len(r["losses"]))
        smooth = np.convolve(r["losses"], np.ones(w) / w, mode="valid")
        curves[spec] = (np.cumsum(r["bits"])[w - 1:], smooth)
    figure("loss_vs_bits", "bits sent by each rank (log)",
           "training loss (moving average of 20 steps, rank 0)", curves)
    figure("entries_per_step", "step", "entries sent per step by rank 0 (log)",
           {spec: (np.arange(len(r["entries"])), r["entries"]) for spec, r in results.items()})


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", nargs="+", default=SPECS)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64, help="per-rank batch size")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--max-steps", type=int, default=0, help="cap the steps per epoch")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--fuse-below", type=int, default=65536,
                    help="hvd_compress fuses tensors with fewer entries into one message")
    ap.add_argument("--out", default="demo-out", help="where the plots go ('' for none)")
    args = ap.parse_args()

    hvd.init()
    torch.set_num_threads(1)
    X, y = load_libsvm("a9a")
    perm = np.random.RandomState(0).permutation(len(y))
    test, train_rows = perm[:4000], perm[4000:]
    shard = train_rows[hvd.rank()::hvd.size()]
    data = (X, y, shard, torch.from_numpy(X[test]), torch.from_numpy(y[test]))
    n = hvd.size()
    if hvd.rank() == 0:
        print(f"a9a: {len(train_rows)} training rows over {n} ranks, {len(test)} held out; "
              f"MLP {X.shape[1]}-{args.hidden}-{args.hidden}-1, SGD momentum 0.9")
    results = {}
    for spec in args.specs:
        acc, losses, bits, entries, messages, wall, steps = train(spec, args, data,
                                                                  args.fuse_below)
        results[spec] = dict(acc=acc, losses=losses, bits=bits, entries=entries,
                             messages=messages, wall=wall, steps=steps)
    if hvd.rank() != 0:
        return
    dense = np.mean(results["none"]["bits"]) if "none" in results else None
    print(f"\n{'compression':<40}{'bits/step/rank':>15}{'saving':>8}{'MB in all':>10}"
          f"{'wall s':>8}{'accuracy':>9}")
    for spec, r in results.items():
        per_step = np.mean(r["bits"])
        saving = f"{dense / per_step:.1f}x" if dense else "-"
        total_mb = n * sum(r["bits"]) / 8e6
        print(f"{spec:<40}{per_step:>15,.0f}{saving:>8}{total_mb:>10.2f}{r['wall']:>8.1f}"
              f"{r['acc']:>9.4f}")
    print(f"\nstep time projected to slower links (ms): the step time measured here on {n} "
          "ranks of one machine (its own communication included, so this errs high), plus "
          "a ring alpha-beta model of the bytes of the last step "
          f"(alpha {LATENCY_S * 1e6:.0f} us); a projection, not a measurement")
    print(f"{'compression':<40}{'here':>10}" + "".join(f"{k:>12}" for k in LINKS))
    for spec, r in results.items():
        compute = r["wall"] / r["steps"]
        row = [f"{1e3 * projected(compute, r['messages'], n, rate):>12.1f}"
               for rate in LINKS.values()]
        if "auto" in spec:  # it measures the link it runs on and routes for it
            row = [f"{'(re-routes)':>12}"] * len(LINKS)
        print(f"{spec:<40}{1e3 * compute:>10.1f}" + "".join(row))
    if any("auto" in spec for spec in results):
        print("auto measures the link it runs on and routes each tensor for it, so the "
              "routes taken here say little about a slower link: `make bench-link` times "
              "it on shaped links")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        plot(results, args.out)
        print(f"\nplots: {args.out}/loss_vs_bits.png, {args.out}/entries_per_step.png")


if __name__ == "__main__":
    main()
