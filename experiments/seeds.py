"""Reproduce the seed papers' claims on real data with the library's own code.

    python experiments/seeds.py --out docs/img        # or: make experiments

Every run goes through ``hvd_compress.core.simulate.Workers``: n simulated workers running
exactly the pipelines the frontends run (same compressors, feedback rules, policy and wire
bit counts). Writes one PNG per claim and prints a Markdown table of the results.

1. Dynamic top-k (Khirirat et al., AAAI 2021) against fixed k, under linear, affine and
   packet costs: cost to reach a fixed suboptimality.
2. EF21-SGD against EF21-SGDM at batch size 1 (Fatkhullin et al., NeurIPS 2023).
3. DIANA and ADIANA with independent against shared rand-k masks (He et al., NeurIPS 2023).
4. Hard threshold against top-k at equal total bits, with EF14 (Sahu et al., NeurIPS 2021).
5. Escape from a strict saddle with and without perturbation (Avdiukhin et al., 2021).
6. Dynamic top-k on a neural network, whose gradient spectrum changes during training:
   does the per-step rule beat every fixed k?
"""
import argparse
import os
import time

import numpy as np

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import hvd_compress as hc  # noqa: E402
from hvd_compress.core.simulate import Workers, adiana  # noqa: E402
from hvd_compress.datasets import load_libsvm  # noqa: E402


# -- problems -------------------------------------------------------------------------

class Logistic:
    """f(x) = mean log(1 + exp(-b a.x)) + reg(x); b in {-1, 1}.

    reg = lam/2 ||x||^2 (convex) or lam sum x^2 / (1 + x^2) (nonconvex, the EF21 benchmark).
    """

    def __init__(self, A, y, lam, nonconvex=False):
        self.A, self.b = A.astype(np.float64), 2.0 * y - 1.0
        self.lam, self.nonconvex = lam, nonconvex
        m = len(y)
        self.L = np.linalg.eigvalsh(self.A.T @ self.A / m).max() / 4 + (2 if nonconvex else 1) * lam

    def loss(self, x, rows=slice(None)):
        z = -self.b[rows] * (self.A[rows] @ x)
        reg = self.lam * np.sum(x * x / (1 + x * x)) if self.nonconvex else self.lam / 2 * x @ x
        return np.mean(np.logaddexp(0, z)) + reg

    def grad(self, x, rows=slice(None)):
        A, b = self.A[rows], self.b[rows]
        s = -b / (1 + np.exp(b * (A @ x)))
        reg = self.lam * 2 * x / (1 + x * x) ** 2 if self.nonconvex else self.lam * x
        return A.T @ s / len(b) + reg

    def minimum(self):
        """f* by Newton's method (convex case)."""
        x = np.zeros(self.A.shape[1])
        for _ in range(50):
            p = 1 / (1 + np.exp(-self.A @ x))
            H = (self.A.T * (p * (1 - p))) @ self.A / len(p) + self.lam * np.eye(len(x))
            x -= np.linalg.solve(H, self.grad(x))
        return self.loss(x)


def _save(fig, ax, out, name, xlabel, ylabel, **legend):
    """Label, save as out/name and close a one-axis figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(**legend)
    fig.tight_layout()
    fig.savefig(os.path.join(out, name), dpi=90)
    plt.close(fig)


def _fmt(v):
    return "not reached in 4000 steps" if v is None else f"{v:,}"


def shards(m, n):
    return np.array_split(np.arange(m), n)


# -- 1. dynamic k ---------------------------------------------------------------------

COSTS = {"linear": "dynamic:cost=linear",
         "affine (c0 = 1000 bits)": "dynamic:cost=affine,c0=1000",
         "packet (P = 1024, H = 160 bits)": "dynamic:cost=packet,packet=1024,header=160"}


def cost_of(label, k):
    return hc.resolve("topk+" + COSTS[label]).policy.costs(np.asarray(k))


def run_topk_gd(prob, spec, fstar, tol, max_steps):
    """Single-node compressed GD with step 1/L; returns (ks per step, gaps per step)."""
    x = np.zeros(prob.A.shape[1])
    w = Workers(spec, 1)
    gap0 = prob.loss(x) - fstar
    ks, gaps = [], []
    for t in range(max_steps):
        x = x - w.step([prob.grad(x)]) / prob.L
        ks.append(int(w.last[0].count))
        if t % 10 == 9:  # the loss costs as much as a gradient: check every 10 steps
            gaps.append((prob.loss(x) - fstar) / gap0)
            if gaps[-1] <= tol:
                break
    return np.array(ks), np.array(gaps)


def exp_dynamic(out, rows):
    tol, max_steps = 1e-3, 20000
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for di, name in enumerate(("mushrooms", "a9a")):
        A, y = load_libsvm(name)
        prob = Logistic(A, y, lam=1e-2)
        fstar = prob.minimum()
        d = A.shape[1]
        grid = sorted({1, 2, 4, 8, 16, 32, 64, max(1, d // 100), d // 10, d})
        fixed = {k: run_topk_gd(prob, f"topk:k={k}", fstar, tol, max_steps) for k in grid}
        for ci, label in enumerate(COSTS):
            ax = axes[di, ci]
            best = None
            for k, (ks, gaps) in fixed.items():
                c = np.cumsum(cost_of(label, ks))[9::10]
                ax.semilogy(c, gaps, lw=0.8, label=f"k={k}")
                if gaps[-1] <= tol and (best is None or c[-1] < best[1]):
                    best = (k, c[-1])
            ks, gaps = run_topk_gd(prob, "topk+" + COSTS[label], fstar, tol, max_steps)
            c = np.cumsum(cost_of(label, ks))[9::10]
            ax.semilogy(c, gaps, "k", lw=2, label="dynamic")
            ax.set_title(f"{name}: {label}")
            ax.set_xlabel("cost (bits)")
            ax.set_ylabel("(f - f*) / (f0 - f*)")
            ax.set_xscale("log")
            ax.legend(fontsize=6)
            reached = gaps[-1] <= tol
            rows.append(("dynamic k vs best fixed k", f"{name}, {label}",
                         f"dynamic {c[-1]:,.0f} bits (k {ks.min()}..{ks.max()}), best fixed "
                         f"k={best[0]} {best[1]:,.0f} bits: ratio "
                         f"{c[-1] / best[1]:.2f}x" + ("" if reached else " (not reached)")))
    fig.tight_layout()
    fig.savefig(os.path.join(out, "1_dynamic_k.png"), dpi=90)
    plt.close(fig)


# -- 2. EF21-SGD vs EF21-SGDM at batch size 1 -----------------------------------------

def exp_momentum(out, rows):
    A, y = load_libsvm("mushrooms")
    prob = Logistic(A, y, lam=0.1, nonconvex=True)
    n, steps = 10, 3000
    parts = shards(len(y), n)
    fig, ax = plt.subplots(figsize=(6, 4))
    for spec, label in (("topk:k=1+ef21", "EF21-SGD"),
                        ("topk:k=1+ef21sgdm:eta=0.1", "EF21-SGDM (eta=0.1)"),
                        ("topk:k=1+ef21sgd2m:eta=0.1", "EF21-SGD2M (eta=0.1)")):
        rs = np.random.RandomState(0)
        x = np.zeros(A.shape[1])
        w = Workers(spec, n)
        curve = []
        for t in range(steps):
            batch = [p[rs.randint(len(p))] for p in parts]  # one sample per worker
            x = x - 0.5 / prob.L * w.step([prob.grad(x, [i]) for i in batch])
            if t % 20 == 0:
                curve.append(np.sum(prob.grad(x) ** 2))
        ax.semilogy(np.arange(len(curve)) * 20, curve, label=label)
        rows.append(("batch size 1, top-1, n=10 (mushrooms, nonconvex)", label,
                     f"mean ||grad f||^2 over the last 500 steps: {np.mean(curve[-25:]):.2e}"))
    _save(fig, ax, out, "2_ef21_sgdm.png", "step", "||grad f(x)||^2")


# -- 3. DIANA: independent vs shared masks ---------------------------------------------

def exp_diana(out, rows):
    d, tol = 100, 1e-6
    fig, ax = plt.subplots(figsize=(6, 4))
    for n in (4, 16, 64):
        rs = np.random.RandomState(n)
        As = [rs.standard_normal((20, d)) * (1 + i % 4) for i in range(n)]  # heterogeneous
        bs = [rs.standard_normal(20) for _ in range(n)]
        H = sum(a.T @ a for a in As) / (20 * n) + 0.1 * np.eye(d)
        c = sum(a.T @ b for a, b in zip(As, bs)) / (20 * n)
        xstar = np.linalg.solve(H, c)
        f = lambda x: 0.5 * x @ H @ x - c @ x  # noqa: E731
        fstar = f(xstar)
        L = np.linalg.eigvalsh(H).max()
        omega = max(1.0, np.sqrt(n))
        k = int(round(d / (1 + omega)))
        sent = {}
        for shared in (False, True):
            spec = f"randk:k={k},scaled=true,shared={str(shared).lower()}+diana"
            # the step each variant's variance allows: shared masks do not average out
            gamma = 1 / (L * (1 + 4 * omega / (1 if shared else n)))
            w = Workers(spec, n, seed=1)
            x = np.zeros(d)
            floats, gaps = 0, []
            for _ in range(20000):
                grads = [a.T @ (a @ x) / 20 + 0.1 * x - a.T @ b / 20 for a, b in zip(As, bs)]
                x = x - gamma * w.step(grads)
                floats += k
                gaps.append((f(x) - fstar) / (f(np.zeros(d)) - fstar))
                if gaps[-1] <= tol:
                    break
            sent[shared] = floats
            ax.semilogy(np.arange(1, len(gaps) + 1) * k, gaps,
                        ls="--" if shared else "-", label=f"n={n} {'shared' if shared else 'independent'}")
            # ADIANA: two messages of k floats per step
            grads = lambda i, x: As[i].T @ (As[i] @ x - bs[i]) / 20 + 0.1 * x  # noqa: E731
            hit = []

            def stop(step, y, bits, hit=hit):
                if not hit and (f(y) - fstar) / (f(np.zeros(d)) - fstar) <= tol:
                    hit.append(2 * k * (step + 1))
            adiana(grads, np.zeros(d), L, np.linalg.eigvalsh(H).min(),
                   f"randk:k={k},scaled=true,shared={str(shared).lower()}", n, 4000, seed=1,
                   callback=stop)
            sent[("adiana", shared)] = hit[0] if hit else None
        rows.append(("DIANA, scaled rand-k, omega = sqrt(n)", f"n = {n}, k = {k} of {d}",
                     f"floats per worker to 1e-6: independent {sent[False]:,}, shared "
                     f"{sent[True]:,}: saving {sent[True] / sent[False]:.1f}x"))
        ai, ash = sent[("adiana", False)], sent[("adiana", True)]
        rows.append(("ADIANA, scaled rand-k, omega = sqrt(n)", f"n = {n}, k = {k} of {d}",
                     f"floats per worker to 1e-6: independent {_fmt(ai)}, shared {_fmt(ash)}"
                     + (f": saving {ash / ai:.1f}x" if ai and ash else "")))
    _save(fig, ax, out, "3_diana_independent.png", "floats sent per worker",
          "relative suboptimality", fontsize=7)


# -- 4. hard threshold vs top-k at equal total bits ------------------------------------

def run_ef14(prob, spec, parts, fstar, steps):
    w = Workers(spec, len(parts))
    x = np.zeros(prob.A.shape[1])
    bits, gaps, nnz = [], [], 0
    total = 0
    for _ in range(steps):
        x = x - w.step([prob.grad(x, p) for p in parts]) / prob.L
        total += sum(w.bits[-1]) / len(parts)
        nnz += sum(int(p.count) for p in w.last)
        bits.append(total)
        gaps.append(prob.loss(x) - fstar)
    return np.array(bits), np.array(gaps), nnz


def exp_threshold(out, rows):
    A, y = load_libsvm("a9a")
    prob = Logistic(A, y, lam=1e-3)
    fstar = prob.minimum()
    parts = shards(len(y), 20)
    steps = 600
    bt, gt, nnz_top = run_ef14(prob, "topk:k=1+ef14", parts, fstar, steps)
    lo, hi = 1e-6, 1.0
    for _ in range(14):  # bisection: the threshold sending as many entries in total
        lam = np.sqrt(lo * hi)
        _, _, nnz = run_ef14(prob, f"threshold:lam={lam}+ef14", parts, fstar, steps)
        lo, hi = (lam, hi) if nnz > nnz_top else (lo, lam)
    bh, gh, nnz_thr = run_ef14(prob, f"threshold:lam={lam}+ef14", parts, fstar, steps)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(bt, gt, label="top-1 + EF14")
    ax.semilogy(bh, gh, label=f"hard threshold {lam:.2e} + EF14")
    _save(fig, ax, out, "4_threshold_vs_topk.png", "bits sent per worker", "f - f*")
    rows.append(("hard threshold vs top-1, EF14, a9a, n=20", f"{steps} steps, equal entries "
                 f"({nnz_thr:,} vs {nnz_top:,})",
                 f"final f - f*: threshold {gh[-1]:.2e}, top-1 {gt[-1]:.2e}; "
                 f"bits {bh[-1]:,.0f} vs {bt[-1]:,.0f}"))


# -- 5. escaping a strict saddle -------------------------------------------------------

def exp_saddle(out, rows):
    """f(u, v) = u^2 / 2 + v^4 / 4 - v^2 / 2: a strict saddle at 0, minima at v = +-1."""
    f = lambda z: z[0] ** 2 / 2 + z[1] ** 4 / 4 - z[1] ** 2 / 2  # noqa: E731
    grad = lambda z: np.array([z[0], z[1] ** 3 - z[1]])  # noqa: E731
    fig, ax = plt.subplots(figsize=(6, 4))
    for spec, label in (("topk:k=1+ef14", "top-1 + EF14"),
                        ("topk:k=1+ef14+perturb:radius=0.01", "top-1 + EF14 + perturbation")):
        z = np.array([1.0, 0.0])
        w = Workers(spec, 1, seed=3)
        curve = []
        for _ in range(300):
            z = z - 0.2 * w.step([grad(z)])
            curve.append(f(z))
        ax.plot(curve, label=label)
        rows.append(("strict saddle, start on the stable manifold", label,
                     f"f after 300 steps: {curve[-1]:.4f} (saddle 0, minimum -0.25)"))
    _save(fig, ax, out, "5_saddle.png", "step", "f")


# -- 6. dynamic k on a neural network ---------------------------------------------------

def exp_network(out, rows):
    """MLP 123-64-1 on a9a, 4 workers, whole-model top-k + EF14, plain SGD: bits (affine
    cost, c0 = 20,000 bits per message) to reach a training-loss target."""
    import torch
    torch.set_num_threads(1)
    A, y = load_libsvm("a9a")
    X, Y = torch.from_numpy(A), torch.from_numpy(y)
    n, steps, batch, target = 4, 1500, 32, 0.345
    evalset = np.random.RandomState(1).choice(len(y), 4000, replace=False)
    parts = shards(len(y), n)
    c0 = 20000

    def run(spec):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(123, 64), torch.nn.ReLU(),
                                    torch.nn.Linear(64, 1))
        params = list(model.parameters())
        w = Workers(spec, n, seed=0)
        rs = np.random.RandomState(0)
        bits, curve, reached = 0.0, [], None
        for t in range(steps):
            grads = []
            for p_ in parts:
                b = p_[rs.randint(0, len(p_), batch)]
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    model(X[b]).squeeze(1), Y[b])
                grads.append(torch.cat([g.reshape(-1) for g in
                                        torch.autograd.grad(loss, params)]).detach())
            update = w.step(grads)
            bits += c0 + sum(w.bits[-1]) / n
            with torch.no_grad():
                for p_, u in zip(params, update.split([q.numel() for q in params])):
                    p_ -= 0.2 * u.reshape(p_.shape)
            if t % 25 == 24:
                with torch.no_grad():
                    ev = torch.nn.functional.binary_cross_entropy_with_logits(
                        model(X[evalset]).squeeze(1), Y[evalset]).item()
                curve.append((bits, ev))
                if reached is None and ev <= target:
                    reached = bits
        return curve, reached

    fig, ax = plt.subplots(figsize=(6, 4))
    results = {}
    d = 123 * 64 + 64 + 64 + 1
    for label, spec in (("k = d/1000", f"topk:k={d // 1000}+ef14"),
                        ("k = d/100", f"topk:k={d // 100}+ef14"),
                        ("k = d/10", f"topk:k={d // 10}+ef14"), ("k = d", "none"),
                        ("dynamic", f"topk+ef14+dynamic:c0={c0}")):
        curve, reached = run(spec)
        results[label] = reached
        ax.semilogx([c for c, _ in curve], [e for _, e in curve], label=label,
                    lw=2 if label == "dynamic" else 1)
    ax.axhline(target, color="gray", lw=0.5)
    _save(fig, ax, out, "6_network_dynamic_k.png",
          "cost per worker (bits, c0 = 20,000 per message)", "training loss (4,000 samples)")
    fixed = {k: v for k, v in results.items() if k != "dynamic" and v is not None}
    best = min(fixed, key=fixed.get) if fixed else None
    dyn = results["dynamic"]
    rows.append(("dynamic k on an MLP (a9a, n = 4, EF14, affine cost)",
                 f"bits to training loss {target}",
                 ", ".join(f"{k}: {_fmt_bits(v)}" for k, v in results.items())
                 + (f"; dynamic / best fixed ({best}) = {dyn / fixed[best]:.2f}x"
                    if best and dyn else "")))


def _fmt_bits(v):
    return "not reached" if v is None else f"{v:,.0f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results")
    ap.add_argument("--only", default="123456")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for key, fn in (("1", exp_dynamic), ("2", exp_momentum), ("3", exp_diana),
                    ("4", exp_threshold), ("5", exp_saddle), ("6", exp_network)):
        if key in args.only:
            t0 = time.time()
            fn(args.out, rows)
            print(f"[experiment {key}: {time.time() - t0:.0f}s]", flush=True)
    print("\n| experiment | case | result |\n|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
