"""Training step time on real shaped links, every figure measured in one run (`make
bench-link`; needs root, for network namespaces):

    python benchmarks/link.py [--ranks 4] [--rates unshaped 1gbit 100mbit] [--write-docs]
    python benchmarks/link.py --tf [--ranks 2] [--only auto fp16]

For each link rate it makes a network namespace whose loopback is shaped with a token
bucket (tc tbf; the ranks then talk over TCP through it, and the rate caps their combined
traffic, so it is not the per-node rate of a switched cluster), runs
`benchmarks/step_time.py` there under mpirun, and deletes the namespace. It prints the
step-time table (dense and fp16 are Horovod's own) with each spec's speed against dense
on the same link and the bits each rank sent per step, plots step time against link rate
(docs/img/step_time_vs_link.png) and, with --write-docs, replaces the table in
docs/BENCHMARKS.md between its markers. With --tf it runs `benchmarks/tf_routes.py` on
each link instead (TensorFlow's routes as ratios to Horovod's uncompressed tape; --only
picks routes by label) and prints its tables.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from docs_section import replace_between

ROOT = Path(__file__).resolve().parent.parent
MARK = ("<!-- bench-link: begin -->", "<!-- bench-link: end -->")
RATE_BITS = {"unshaped": None, "10gbit": 10e9, "1gbit": 1e9, "100mbit": 100e6}
LABEL = {"unshaped": "not shaped", "10gbit": "10 Gbit/s", "1gbit": "1 Gbit/s",
         "100mbit": "100 Mbit/s"}


def refuse(why):
    print(f"bench-link: {why}", file=sys.stderr)
    sys.exit(2)


def sh(*cmd, check=True):
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True)


def run_on_link(rate, args, out_json):
    """step_time.py (with --tf, tf_routes.py) under mpirun in a namespace shaped to
    ``rate`` (None: not shaped): step_time.py's JSON, or tf_routes.py's printed table."""
    ns = f"hvdc-bench-{os.getpid()}"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "mtu", "9000")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        if rate is not None:
            # tbf drops packets above its burst: keep the burst well above the MTU
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", "tbf",
               "rate", rate, "burst", "256kb", "latency", "100ms")
        mpirun = ["mpirun", "-np", str(args.ranks), "--oversubscribe", "--bind-to", "none",
                  "--allow-run-as-root", "--mca", "btl", "tcp,self",
                  "--mca", "btl_tcp_if_include", "lo", "--mca", "oob_tcp_if_include", "lo",
                  "-x", "OMP_NUM_THREADS=1", "-x", "HOROVOD_CYCLE_TIME=1"]
        if args.tf:
            script, options = "tf_routes.py", ["--only", *args.only] if args.only else []
        else:
            script, options = "step_time.py", ["--width", str(args.width), "--json",
                                               out_json, "--specs", *args.specs]
        cmd = ["ip", "netns", "exec", ns, "env", f"PATH={os.environ['PATH']}"] + mpirun + [
            "-x", "TF_CPP_MIN_LOG_LEVEL=3", sys.executable,
            str(ROOT / "benchmarks" / script), "--steps", str(args.steps), *options]
        done = subprocess.run(cmd, text=True, capture_output=True, timeout=args.timeout)
        if done.returncode:
            raise RuntimeError(f"{script} failed on {rate or 'unshaped'}:\n"
                               f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
        if args.tf:
            return done.stdout.strip()
        with open(out_json) as f:
            return json.load(f)
    finally:
        sh("ip", "netns", "del", ns, check=False)


def table(results, specs):
    """Markdown: per spec and link, the median step time, its speed against dense on
    that link, and the bits each rank sent per step there (auto's routes differ by link)."""
    rates = list(results)
    lines = ["| spec | " + " | ".join(LABEL[r] for r in rates) + " |",
             "|---|" + "---:|" * len(rates)]
    for spec in specs:
        cells = []
        for rate in rates:
            got = results[rate]["specs"][spec]
            dense = results[rate]["specs"].get("none", {}).get("seconds")
            s = got["seconds"]
            vs = "" if dense is None or spec == "none" else \
                (f", {dense / s:.2f}x faster" if s <= dense else f", {s / dense:.2f}x slower")
            cells.append(f"{s:.3f} s{vs} ({got['bits'] / 1e6:,.2f} Mbit)")
        lines.append(f"| {spec} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results, specs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shaped = [r for r in results if RATE_BITS[r] is not None]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for spec in specs:
        ax.plot([RATE_BITS[r] for r in shaped],
                [results[r]["specs"][spec]["seconds"] for r in shaped], "o-", label=spec)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("link rate (bits/s, tc tbf on the namespace's loopback)")
    ax.set_ylabel("median step time (s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=None, help="4 (--tf: 2)")
    ap.add_argument("--rates", nargs="+", default=["unshaped", "1gbit", "100mbit"],
                    choices=list(RATE_BITS))
    ap.add_argument("--specs", nargs="+",
                    default=["none", "horovod-fp16", "topk:0.01+ef21sgdm", "topk:0.001+ef14",
                             "auto"])
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=None, help="10 (--tf: 30)")
    ap.add_argument("--tf", action="store_true",
                    help="time benchmarks/tf_routes.py's TensorFlow routes on each link")
    ap.add_argument("--only", nargs="+", metavar="WORDS",
                    help="--tf: only the routes whose label holds one of these")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per link")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    args.ranks = args.ranks or (2 if args.tf else 4)
    args.steps = args.steps or (30 if args.tf else 10)
    if args.write_docs and args.tf:
        refuse("--write-docs rewrites the step-time table of step_time.py, not --tf's")
    if os.geteuid() != 0:
        refuse("needs root: it creates network namespaces and shapes their loopback with tc "
               "(run it as root, e.g. sudo make bench-link)")
    for tool in ("ip", "tc", "mpirun"):
        if shutil.which(tool) is None:
            refuse(f"needs {tool!r} on PATH (Debian: apt-get install iproute2 openmpi-bin)")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rate in args.rates:
            print(f"link {rate} ...", flush=True)
            results[rate] = run_on_link(None if rate == "unshaped" else rate, args,
                                        os.path.join(tmp, f"{rate}.json"))
            if args.tf:
                print(f"{LABEL[rate]}: {results[rate]}", flush=True)
    if args.tf:
        return
    first = next(iter(results.values()))
    text = (f"{first['ranks']} ranks, MLP 256-{args.width}-{args.width}-{args.width}-10 "
            f"({first['parameters']:,} parameters), batch 32 per rank, median of "
            f"{args.steps} steps; `python benchmarks/link.py` (`make bench-link`)\n\n"
            + table(results, args.specs))
    print("\n" + text)
    img = ROOT / "docs" / "img" / "step_time_vs_link.png"
    if any(RATE_BITS[r] for r in results):
        plot(results, args.specs, img)
        print(f"\nplot: {img.relative_to(ROOT)}")
    if args.write_docs:
        replace_between(MARK, text)


if __name__ == "__main__":
    main()
