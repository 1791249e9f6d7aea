"""Median training step time per compression, measured under mpirun, on whatever network
the ranks talk over (`benchmarks/link.py` runs it on shaped links):

    mpirun -np 4 python benchmarks/step_time.py [--width 2048] [--steps 5] [--json FILE]
    mpirun -np 4 python benchmarks/step_time.py --layers 68,256,256,1 --steps 300

An MLP 256-W-W-W-10 (8.9M parameters at W = 2048), or the one --layers names (a last layer
of 1 trains on a squared error), batch 32 per rank, random data; each spec trains through
unmodified `hvd.DistributedOptimizer` (forward, backward, exchange, SGD update), two
warm-up steps, then the median of --steps steps, and their sum. Dense and fp16 are
Horovod's own; the others pass `hvd_compress.torch.compression(spec,
fuse_below=--fuse-below)`. The specs take turns step by step. Rank 0 prints the median
seconds, the total and the bits each rank sent per step, and writes them as JSON.
"""
import argparse
import json
import statistics
import time

import torch
import horovod.torch as hvd

import hvd_compress.torch as hct

SPECS = ["none", "horovod-fp16", "topk:0.01+ef21sgdm", "topk:0.001+ef14", "auto"]


def trainer(spec, args):
    """One training step of a fresh model under ``spec`` (a closure), and its
    compression."""
    torch.manual_seed(0)
    w = args.width
    sizes = [int(s) for s in args.layers.split(",")] if args.layers else [256, w, w, w, 10]
    layers: list = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1])
    if spec == "none":
        comp = hvd.Compression.none
    elif spec == "horovod-fp16":
        comp = hvd.Compression.fp16
    else:
        comp = hct.compression(spec, fuse_below=args.fuse_below)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                   named_parameters=model.named_parameters(),
                                   compression=comp)
    g = torch.Generator().manual_seed(hvd.rank())
    x = torch.randn(32, sizes[0], generator=g)
    if sizes[-1] == 1:
        y, loss = torch.randn(32, 1, generator=g), torch.nn.functional.mse_loss
    else:
        y = torch.randint(0, sizes[-1], (32,), generator=g)
        loss = torch.nn.functional.cross_entropy

    def step():
        opt.zero_grad()
        loss(model(x), y).backward()
        opt.step()
    return step, comp, sum(p.numel() for p in model.parameters())


def step_times(specs, args):
    """Per spec: (median step seconds, their sum, bits per step and rank, parameters).
    The specs take turns step by step (the ranks' models live side by side), so a
    slower stretch of a shared machine falls on every spec alike."""
    runs = {spec: trainer(spec, args) for spec in specs}
    times: dict = {spec: [] for spec in specs}
    for i in range(args.steps + 2):
        for spec, (step, _, _) in runs.items():
            t0 = time.perf_counter()
            step()
            # the slowest rank's time is the step's
            times[spec].append(hvd.allreduce(torch.tensor([time.perf_counter() - t0]),
                                             op=hvd.Max, name=f"time.{spec}.{i}").item())
    out = {}
    for spec, (_, comp, numel) in runs.items():
        if spec in ("none", "horovod-fp16"):
            bits = numel * (32 if spec == "none" else 16)
        else:
            last = max(r.step for r in comp.telemetry.rows)
            bits = sum(r.bits for r in comp.telemetry.rows if r.step == last)
        out[spec] = statistics.median(times[spec][2:]), sum(times[spec][2:]), bits, numel
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", nargs="+", default=SPECS)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--layers", default="", help="layer widths, e.g. 68,256,256,1")
    ap.add_argument("--fuse-below", type=int, default=65536)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    hvd.init()
    torch.set_num_threads(1)
    out = {}
    for spec, (seconds, total, bits, numel) in step_times(args.specs, args).items():
        out[spec] = {"seconds": seconds, "total": total, "bits": bits}
        if hvd.rank() == 0:
            print(f"{spec:<28}{seconds:>10.4f} s{total:>9.2f} s in all{bits:>14,} "
                  "bits/step/rank", flush=True)
    if hvd.rank() == 0:
        print(f"{numel:,} parameters, {hvd.size()} ranks")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"ranks": hvd.size(), "parameters": numel, "specs": out}, f)


if __name__ == "__main__":
    main()
