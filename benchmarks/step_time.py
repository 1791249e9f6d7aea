"""Median training step time per compression, measured under mpirun, on whatever network
the ranks talk over (`benchmarks/link.py` runs it on shaped links):

    mpirun -np 4 python benchmarks/step_time.py [--width 2048] [--steps 5] [--json FILE]

An MLP 256-W-W-W-10 (8.9M parameters at W = 2048), batch 32 per rank, random data; each spec
trains through unmodified `hvd.DistributedOptimizer` (forward, backward, exchange, SGD
update), two warm-up steps, then the median of --steps steps. Dense and fp16 are Horovod's
own; the others pass `hvd_compress.torch.compression(spec, fuse_below=65536)`. Rank 0
prints the median seconds and the bits each rank sent per step, and writes them as JSON.
"""
import argparse
import json
import statistics
import time

import torch
import horovod.torch as hvd

import hvd_compress.torch as hct

SPECS = ["none", "horovod-fp16", "topk:0.01+ef21sgdm", "topk:0.001+ef14", "auto"]


def step_times(spec, args):
    torch.manual_seed(0)
    w = args.width
    model = torch.nn.Sequential(torch.nn.Linear(256, w), torch.nn.ReLU(), torch.nn.Linear(w, w),
                                torch.nn.ReLU(), torch.nn.Linear(w, w), torch.nn.ReLU(),
                                torch.nn.Linear(w, 10))
    if spec == "none":
        comp = hvd.Compression.none
    elif spec == "horovod-fp16":
        comp = hvd.Compression.fp16
    else:
        comp = hct.compression(spec, fuse_below=65536)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                   named_parameters=model.named_parameters(),
                                   compression=comp)
    g = torch.Generator().manual_seed(hvd.rank())
    x, y = torch.randn(32, 256, generator=g), torch.randint(0, 10, (32,), generator=g)
    times = []
    for i in range(args.steps + 2):
        t0 = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        # the slowest rank's time is the step's
        times.append(hvd.allreduce(torch.tensor([time.perf_counter() - t0]), op=hvd.Max,
                                   name=f"time.{spec}.{i}").item())
    numel = sum(p.numel() for p in model.parameters())
    if spec in ("none", "horovod-fp16"):
        bits = numel * (32 if spec == "none" else 16)
    else:
        last = max(r.step for r in comp.telemetry.rows)
        bits = sum(r.bits for r in comp.telemetry.rows if r.step == last)
    return statistics.median(times[2:]), bits, numel


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", nargs="+", default=SPECS)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    hvd.init()
    torch.set_num_threads(1)
    out = {}
    for spec in args.specs:
        seconds, bits, numel = step_times(spec, args)
        out[spec] = {"seconds": seconds, "bits": bits}
        if hvd.rank() == 0:
            print(f"{spec:<28}{seconds:>10.3f} s{bits:>16,} bits/step/rank", flush=True)
    if hvd.rank() == 0:
        print(f"{numel:,} parameters, {hvd.size()} ranks")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"ranks": hvd.size(), "parameters": numel, "specs": out}, f)


if __name__ == "__main__":
    main()
