"""Compressor throughput as a ratio to one memory pass, measured in one run.

For each size d and each compressor: the time of compress + decompress on a float32 torch
tensor (CPU unless --device says otherwise), divided by the time of ``torch.abs(x)`` on the
same tensor (one read and one write of d floats). Then top-k 0.1% with the EF14 residual
update, ours against a GRACE-style baseline (``torch.topk`` on |g + e| and a dense residual
``e = (g + e) - decompress(...)``), both as ratios to the same memory pass.

    python benchmarks/compressors.py                 # d = 1e5 .. 1e8
    python benchmarks/compressors.py --max-d 1e7     # quicker

Ratios, not seconds: absolute times on a shared machine are noise; ratios measured in the
same run on the same tensor are not.
"""
import argparse
import time

import torch

import hvd_compress as hc
from hvd_compress.core.ops import backend_named
from hvd_compress.core.select import topk_indices

SPECS = ["none", "fp16", "bf16", "topk:0.001", "topk:0.01", "randk:0.01", "threshold:lam=2.5",
         "qsgd", "terngrad", "sign", "natural"]


def best_time(fn, repeats):
    """Minimum wall time of fn() over repeats (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def ours_topk_ef14(g, e, k, bk):
    """Top-k of the compensated gradient; the residual keeps everything not sent."""
    e.add_(g)                                     # e <- g + e (compensate), in place
    idx = topk_indices(bk, e.abs(), k)
    values = e[idx]
    e[idx] = 0                                    # residual = compensated - sent
    return idx, values


def grace_topk_ef14(g, e, k):
    """GRACE-style: torch.topk on |g + e|, dense decompress, dense residual."""
    comp = g + e
    _, idx = torch.topk(comp.abs(), k, sorted=False)
    values = comp[idx]
    dense = torch.zeros_like(comp).scatter_(0, idx, values)
    e.copy_(comp - dense)
    return idx, values


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-d", type=float, default=1e8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    bk = backend_named("torch")
    sizes = [int(d) for d in (1e5, 1e6, 1e7, 1e8) if d <= args.max_d]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    print("compress + decompress time / one memory pass (torch.abs) on the same tensor\n")
    print(f"{'compressor':<20}" + "".join(f"{f'd=1e{len(str(d)) - 1}':>10}" for d in sizes))
    g = torch.Generator().manual_seed(0)
    xs = {d: torch.randn(d, generator=g).to(args.device) for d in sizes}
    rep = {d: max(1, args.repeats if d < 1e8 else 2) for d in sizes}
    passes = {d: best_time(lambda: torch.abs(xs[d]), rep[d]) for d in sizes}
    for spec in SPECS:
        c = hc.resolve(spec)
        row = []
        for d in sizes:
            x = xs[d]
            t = best_time(lambda: c.decompress(c.compress(x, hc.Key(0, 0, "b", 1))), rep[d])
            row.append(t / passes[d])
        print(f"{spec:<20}" + "".join(f"{r:>10.1f}" for r in row))

    print("\ntop-k 0.1% + EF14 residual update, time / one memory pass")
    print(f"{'':<20}" + "".join(f"{f'd=1e{len(str(d)) - 1}':>10}" for d in sizes))
    rows = {"hvd_compress": [], "GRACE-style": [], "speed-up": []}
    for d in sizes:
        k = max(1, d // 1000)
        x = xs[d]
        e1, e2 = torch.zeros_like(x), torch.zeros_like(x)
        t_ours = best_time(lambda: ours_topk_ef14(x, e1, k, bk), rep[d])
        t_grace = best_time(lambda: grace_topk_ef14(x, e2, k), rep[d])
        rows["hvd_compress"].append(t_ours / passes[d])
        rows["GRACE-style"].append(t_grace / passes[d])
        rows["speed-up"].append(t_grace / t_ours)
    for name, r in rows.items():
        print(f"{name:<20}" + "".join(f"{v:>10.1f}" for v in r))


if __name__ == "__main__":
    main()
