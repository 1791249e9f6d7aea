"""Host synchronisations per step on the shipped path: what a GPU would wait for.

    python benchmarks/host_syncs.py [--d 100000] [--ranks 4] [--write-docs]

For each spec it runs one step of what every frontend runs per tensor (``Exchange.begin``,
then ``finish_gathered`` or ``finish_allreduced`` on this rank's payload standing in for
``--ranks`` ranks'), after one step of warm-up, and counts, through a torch dispatch mode
and the backend's host reads, the operations that make the host wait for the device when
the tensors live on a GPU:

* values read on the host (``aten::_local_scalar_dense``: ``bool()``, ``int()``,
  ``float()``, ``.item()`` of a tensor);
* operations whose output size depends on the data (``nonzero``, ``unique``,
  ``masked_select``), which CUDA must finish before it can size the result;
* tensors made from host data (``aten::lift_fresh``: ``torch.tensor(list)``), which on a
  GPU is a copy to the device that waits for it (headers and shifts are made once per
  tensor and kept on the device, so a step after the first makes none);
* buffers copied to host memory (the backend's ``to_numpy``: payload headers, mostly).

The counts are exact and the same on every machine: they are read on CPU tensors that
take the branch CUDA tensors take (``TorchBackend.avoid_syncs_on_cpu``), where the same
code runs the same operations. The target of a GPU-ready path is one read per tensor and
step, the verdict that every rank's header and indices were sound and the average
finite; the table says how far each spec is from it.
"""
import argparse
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hvd_compress.core.exchange import Exchange
from hvd_compress.core.ops import backend_named

from docs_section import replace_between

MARK = ("<!-- bench-syncs: begin -->", "<!-- bench-syncs: end -->")
SIZED_BY_DATA = {"aten::nonzero", "aten::masked_select", "aten::_unique", "aten::_unique2",
                 "aten::unique_dim", "aten::unique_consecutive"}  # not nonzero_static
SPECS = ["fp16", "topk:0.01", "topk:0.01+ef14", "topk:0.01+ef21sgdm", "randk:0.01+ef14",
         "threshold:lam=2.5+ef14", "qsgd", "sign+ef14"]


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func._schema.name] += 1
        return func(*args, **(kwargs or {}))


def count(spec, d, ranks):
    """(host reads, data-sized ops, copies to the device, copies to the host) of one step
    of ``spec`` on ``d`` entries."""
    bk = backend_named("torch")
    type(bk).avoid_syncs_on_cpu = True  # the branch a GPU takes
    ex = Exchange(spec, allreduce_dtypes=("float16", "float32"))
    x = torch.randn(d, generator=torch.Generator().manual_seed(0))

    def step():
        out = ex.begin(bk, "w", x, 0)
        if out.by_allreduce:
            return ex.finish_allreduced(bk, out.wire * ranks, out, ranks, summed=True)
        return ex.finish_gathered(bk, torch.cat([out.wire] * ranks), out, ranks, False)

    step()  # the first step makes state and fingerprints
    copies = Counter()
    original = type(bk).to_numpy

    def to_numpy(self, t):
        copies["to_numpy"] += 1
        return original(self, t)

    type(bk).to_numpy = to_numpy
    try:
        with _Count() as mode:
            step()
    finally:
        type(bk).to_numpy = original
    sized = sum(n for op, n in mode.ops.items() if op in SIZED_BY_DATA)
    return (mode.ops["aten::_local_scalar_dense"], sized, mode.ops["aten::lift_fresh"],
            copies["to_numpy"])


def table(rows, d, ranks):
    lines = [f"one step per tensor, d = {d:,} float32, {ranks} ranks' payloads; "
             "`python benchmarks/host_syncs.py`", "",
             "| spec | values read on the host | sizes that depend on data | tensors made "
             "from host data | buffers copied to the host | in all |",
             "|---|---:|---:|---:|---:|---:|"]
    for spec, counts in rows.items():
        lines.append(f"| {spec} | {' | '.join(map(str, counts))} | {sum(counts)} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=100_000)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--specs", nargs="+", default=SPECS)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    text = table({s: count(s, args.d, args.ranks) for s in args.specs}, args.d, args.ranks)
    print(text)
    if args.write_docs:
        replace_between(MARK, text)


if __name__ == "__main__":
    main()
