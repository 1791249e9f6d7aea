"""Bytes per rank and step time against the number of ranks, for the allgather of top-k
payloads and the tree (global top-k), beside MPI's dense allreduce:

    python benchmarks/tree.py [--ranks 2 4 8 16] [--d 1000000] [--write-docs]

For each rank count it makes a network namespace (needs root), runs this file's worker
there under mpirun (oversubscribed: ranks share the cores, compute is one top-k), and reads
the namespace's loopback byte counter around each phase, so the bytes are what crossed
the wire (TCP and MPI framing included) divided by the ranks and the steps. Each phase
averages one float32 vector of ``d`` entries per step: MPI's ``Allreduce`` (dense),
``SparseAllreduce("topk:RATIO+ef14")`` with the allgather, and the same with
``transport="tree"`` -- the code users run. ``--no-netns`` runs without a namespace (no
root needed; the counts then include whatever else uses the loopback).

Beside the measurements it plots an alpha-beta model of both transports to 1,024 ranks,
stated as a model (ring allgather: each rank sends (n - 1) m bytes; binomial tree: each
rank sends its m bytes up once and the broadcast forwards them, 2 m (n - 1) / n on
average, rank 0 receiving ceil(log2 n) m), and with ``--accuracy`` trains the a9a example
at 8 ranks (``--accuracy-ranks``) with dense, allgather and tree, printing held-out
accuracy.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from docs_section import replace_between

ROOT = Path(__file__).resolve().parent.parent
MARK = ("<!-- bench-tree: begin -->", "<!-- bench-tree: end -->")


def lo_bytes():
    """Bytes sent on this namespace's loopback so far (/proc/net/dev)."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[8])
    return 0


def worker(args):
    import numpy as np
    from mpi4py import MPI

    from hvd_compress.comm.mpi import SparseAllreduce

    comm = MPI.COMM_WORLD
    rank, n = comm.Get_rank(), comm.Get_size()
    spec = f"topk:{args.ratio}+ef14"
    phases = {
        "dense": lambda x, _: _dense(comm, x),
        "allgather": SparseAllreduce(spec, comm).allreduce,
        "tree": SparseAllreduce(spec, comm, transport="tree").allreduce,
    }
    out = {"ranks": n, "d": args.d, "spec": spec}
    for phase, reduce in phases.items():
        times = []
        for step in range(args.steps + 1):   # the first step warms up, uncounted
            x = np.random.RandomState(1000 * rank + step).standard_normal(args.d) \
                .astype(np.float32)
            comm.Barrier()
            if step == 1:
                before = lo_bytes()
            t0 = time.perf_counter()
            reduce(x, "x")
            comm.Barrier()
            if step:
                times.append(time.perf_counter() - t0)
        sent = lo_bytes() - before
        out[phase] = {"bytes_per_rank": sent / (args.steps * n),
                      "seconds": float(np.median(times))}
    if rank == 0:
        with open(args.json, "w") as f:
            json.dump(out, f)


def _dense(comm, x):
    import numpy as np
    out = np.empty_like(x)
    comm.Allreduce(x, out)
    return out / comm.Get_size()


def run_ranks(n, args, out_json):
    cmd = ["mpirun", "-np", str(n), "--oversubscribe", "--bind-to", "none",
           "--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", "lo",
           "--mca", "oob_tcp_if_include", "lo", "-x", "OMP_NUM_THREADS=1"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd += [sys.executable, __file__, "--worker", "--d", str(args.d), "--ratio",
            str(args.ratio), "--steps", str(args.steps), "--json", out_json]
    ns = None
    if not args.no_netns:
        ns = f"hvdc-tree-{os.getpid()}-{n}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        cmd = ["ip", "netns", "exec", ns, "env", f"PATH={os.environ['PATH']}"] + cmd
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
        if done.returncode:
            raise RuntimeError(f"{n} ranks failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        with open(out_json) as f:
            return json.load(f)
    finally:
        if ns is not None:
            subprocess.run(["ip", "netns", "del", ns], check=False)


def model_bytes(n, m, d):
    """Per-rank bytes sent per step, alpha-beta model: dense ring allreduce of d float32,
    ring allgather of m-byte payloads, binomial tree reduce + broadcast of m bytes
    (average over ranks, and rank 0's)."""
    return {"dense": 2 * 4 * d * (n - 1) / n, "allgather": (n - 1) * m,
            "tree": 2 * m * (n - 1) / n, "tree_root": _rounds(n) * m}


# the model's link and compute, stated (not fitted to this machine): 50 us per message,
# 10 Gbit/s, and a merge of four passes over the two payloads at 10 GB/s
ALPHA, BETA = 50e-6, 8 / 10e9


def model_seconds(n, m, d):
    """Seconds per step in the same model: ring allreduce 2 (n - 1) messages of 4d/n
    bytes; ring allgather (n - 1) messages of m bytes; the tree ceil(log2 n) rounds up (a
    message and a merge each) and as many down."""
    merge = 4 * 2 * m / 10e9
    return {"dense": 2 * (n - 1) * (ALPHA + 4 * d / n * BETA),
            "allgather": (n - 1) * (ALPHA + m * BETA),
            "tree": _rounds(n) * (2 * (ALPHA + m * BETA) + merge)}


def _rounds(n):
    return math.ceil(math.log2(n)) if n > 1 else 0


def table(results, m):
    lines = ["| ranks | dense allreduce | allgather | tree | tree / allgather "
             "| model (allgather, tree) |", "|---:|---:|---:|---:|---:|---:|"]

    def cell(r):
        return f"{r['bytes_per_rank'] / 1e3:,.1f} kB, {r['seconds'] * 1e3:.1f} ms"

    for n, r in results.items():
        mod = model_bytes(n, m, r["d"])
        tree, gather = r["tree"], r["allgather"]
        lines.append(
            f"| {n} | {cell(r['dense'])} | {cell(gather)} | {cell(tree)} "
            f"| {tree['bytes_per_rank'] / gather['bytes_per_rank']:.2f}x bytes, "
            f"{tree['seconds'] / gather['seconds']:.2f}x time "
            f"| {mod['allgather'] / 1e3:,.1f} kB, {mod['tree'] / 1e3:,.1f} kB |")
    return "\n".join(lines)


def plot(results, m, d, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [2 ** i for i in range(1, 11)]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"dense": "k", "allgather": "C0", "tree": "C1"}
    for kind, c in colors.items():
        ax.plot(ns, [model_bytes(n, m, d)[kind] for n in ns], "-", color=c, alpha=0.6,
                label=f"{kind} (model)")
        ax.plot(list(results), [r[kind]["bytes_per_rank"] for r in results.values()], "o",
                color=c, label=f"{kind} (measured)")
        bx.plot(ns, [model_seconds(n, m, d)[kind] for n in ns], "-", color=c, alpha=0.6,
                label=f"{kind} (model: 50 us, 10 Gbit/s)")
        bx.plot(list(results), [r[kind]["seconds"] for r in results.values()], "o", color=c,
                label=f"{kind} (measured here)")
    ax.plot(ns, [model_bytes(n, m, d)["tree_root"] for n in ns], ":", color="C1",
            label="tree, rank 0 (model)")
    for a in (ax, bx):
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xlabel("ranks")
        a.legend(fontsize=7)
    ax.set_ylabel("bytes sent per rank per step")
    bx.set_ylabel("seconds per step")
    ax.set_title(f"d = {d:,}, top-k payload m = {m:,} bytes", fontsize=9)
    bx.set_title("step time; measured: ranks share 2 cores on loopback", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def accuracy(n, args):
    """Held-out accuracy of the a9a example at n ranks: dense, allgather and tree."""
    lines = []
    for spec, transport in (("none", "allgather"), (f"topk:{args.acc_ratio}+ef14", "allgather"),
                            (f"topk:{args.acc_ratio}+ef14", "tree")):
        cmd = ["mpirun", "-np", str(n), "--oversubscribe", "--bind-to", "none",
               "-x", "OMP_NUM_THREADS=1"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
        cmd += [sys.executable, str(ROOT / "examples" / "mpi4py_a9a.py"), "--spec", spec,
                "--transport", transport, "--epochs", str(args.epochs)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
        if done.returncode:
            raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
        lines.append(done.stdout.strip().splitlines()[-1])
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--d", type=int, default=1_000_000)
    ap.add_argument("--ratio", type=float, default=0.01)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-netns", action="store_true")
    ap.add_argument("--accuracy", action="store_true")
    ap.add_argument("--accuracy-ranks", type=int, default=8)
    ap.add_argument("--acc-ratio", type=float, default=0.01)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"))
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if not args.no_netns and (os.geteuid() != 0 or shutil.which("ip") is None):
        print("bench-tree: counting bytes on the wire needs root and iproute2 (a network "
              "namespace per run); run it as root, or pass --no-netns", file=sys.stderr)
        sys.exit(2)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.ranks:
            print(f"{n} ranks ...", flush=True)
            results[n] = run_ranks(n, args, os.path.join(tmp, f"{n}.json"))
    k = max(1, int(args.ratio * args.d))
    m = 24 + 8 * k   # header + int32 index + float32 value per entry
    text = (f"d = {args.d:,} float32, `topk:{args.ratio}+ef14` (payload {m:,} bytes), median "
            f"of {args.steps} steps, bytes counted on the namespace's loopback per rank per "
            f"step{' (no namespace: other loopback traffic included)' if args.no_netns else ''}"
            f"; `python benchmarks/tree.py`\n\n" + table(results, m))
    if args.accuracy:
        n = args.accuracy_ranks
        text += f"\n\na9a, MLP 123-64-1, {n} ranks, {args.epochs} epochs:\n\n" + \
            "\n".join(f"    {line}" for line in accuracy(n, args))
    print("\n" + text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    img = Path(args.out) / "tree_bytes_vs_ranks.png"
    plot(results, m, args.d, img)
    print(f"\nplot: {img}")
    if args.write_docs:
        replace_between(MARK, text)


if __name__ == "__main__":
    main()
