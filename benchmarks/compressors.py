"""Time of the shipped compression path as a ratio to one memory pass, measured in one run.

For each spec and size d: the time of one step of what every frontend runs per tensor,
``Exchange.begin`` (finiteness check, feedback, compression, packing) then
``finish_gathered`` / ``finish_allreduced`` (header checks, decoding, averaging, the
feedback rule's decode), on one float32 torch tensor with this rank's own payload standing
in for the gathered ones (CPU unless --device says otherwise). It is divided by the time
of ``torch.abs(x)`` on the same tensor (one read and one write of d floats). A GRACE-style
top-k + EF14 (``torch.topk`` on |g + e|, a dense decompression and a dense residual) is
timed beside it as a baseline.

    python benchmarks/compressors.py                 # d = 1e5 .. 1e8
    python benchmarks/compressors.py --max-d 1e7     # quicker

Ratios, not seconds: absolute times on a shared machine are noise; ratios measured in the
same run on the same tensor are not.

Each step gets a fresh gradient (the same entries, rotated: every step's differs), made
outside the timing as backward makes it, and may write the average into it, as the
PyTorch frontend does (``overwrite=True``).
"""
import argparse
import time

import torch

from hvd_compress.core.exchange import Exchange
from hvd_compress.core.ops import backend_named

SPECS = ["none", "fp16", "bf16", "topk:0.001", "topk:0.01", "topk:0.001+ef14",
         "topk:0.01+ef14", "topk:0.01+ef21", "topk:0.01+ef21sgdm", "randk:0.01",
         "randk:0.01+ef14", "threshold:lam=2.5+ef14", "qsgd", "terngrad", "sign+ef14",
         "natural"]


def best_time(fn, repeats, x=None):
    """Minimum wall time of fn() over repeats (after one warm-up call), or of fn(g), g a
    fresh tensor made before the clock starts: x rotated by another shift at each call,
    so that every step's gradient differs, as a training run's do (a residual grows as it
    would, and a hard threshold sends what it would)."""
    shifts = iter(range(0, 7919 * (repeats + 1), 7919))
    fresh = (lambda: ()) if x is None else (lambda: (torch.roll(x, next(shifts)),))
    fn(*fresh())
    best = float("inf")
    for _ in range(repeats):
        args = fresh()
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best


def shipped_step(spec):
    """One step of the frontends' per-tensor path for ``spec``, on a single rank."""
    bk = backend_named("torch")
    ex = Exchange(spec)

    def step(g):
        out = ex.begin(bk, "w", g, 0, overwrite=True)
        if out.by_allreduce:
            return ex.finish_allreduced(bk, out.wire, out, 1, False)
        return ex.finish_gathered(bk, out.wire, out, 1, False)
    return step


def grace_topk_ef14(g, e, k):
    """GRACE-style: torch.topk on |g + e|, dense decompress, dense residual."""
    comp = g + e
    _, idx = torch.topk(comp.abs(), k, sorted=False)
    values = comp[idx]
    dense = torch.zeros_like(comp).scatter_(0, idx, values)
    e.copy_(comp - dense)
    return dense


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-d", type=float, default=1e8)
    ap.add_argument("--min-d", type=float, default=1e5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--specs", nargs="*", default=SPECS)
    args = ap.parse_args()
    sizes = [int(10 ** e) for e in range(2, 9) if args.min_d <= 10 ** e <= args.max_d]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    print("one step of the shipped path (Exchange.begin + finish) / one memory pass "
          "(torch.abs) on the same tensor\n")
    head = f"{'spec':<24}" + "".join(f"{f'd=1e{len(str(d)) - 1}':>10}" for d in sizes)
    print(head)
    g = torch.Generator().manual_seed(0)
    xs = {d: torch.randn(d, generator=g).to(args.device) for d in sizes}
    rep = {d: max(1, args.repeats if d < 1e8 else 2) for d in sizes}

    def one_pass(d):  # timed beside each ratio: a shared machine drifts during a run
        return best_time(lambda: torch.abs(xs[d]), rep[d])

    for spec in args.specs:
        row = []
        for d in sizes:
            step = shipped_step(spec)
            row.append(best_time(step, rep[d], xs[d]) / one_pass(d))
        print(f"{spec:<24}" + "".join(f"{r:>10.1f}" for r in row))

    print("\nbaseline: GRACE-style top-k 0.1% + EF14, and the shipped topk:0.001+ef14")
    print(head)
    ours, grace = [], []
    for d in sizes:
        k = max(1, d // 1000)
        e = torch.zeros_like(xs[d])
        grace.append(best_time(lambda g: grace_topk_ef14(g, e, k), rep[d], xs[d]) / one_pass(d))
        step = shipped_step("topk:0.001+ef14")
        ours.append(best_time(step, rep[d], xs[d]) / one_pass(d))
    for name, r in (("GRACE-style", grace), ("hvd_compress", ours),
                    ("speed-up", [a / b for a, b in zip(grace, ours)])):
        print(f"{name:<24}" + "".join(f"{v:>10.1f}" for v in r))


if __name__ == "__main__":
    main()
