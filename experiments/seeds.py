"""Reproduce the seed papers' claims on real data with the library's own code.

    python experiments/seeds.py --out docs/img        # or: make experiments

Every run goes through ``hvd_compress.core.simulate.Workers``: n simulated workers running
exactly the pipelines the frontends run (same compressors, feedback rules, policy and wire
bit counts). Writes one PNG per claim and prints a Markdown table of the results.

1. Dynamic top-k (Khirirat et al., AAAI 2021) against every fixed k and against the k
   carried over from another dataset or cost model, under linear, affine and packet
   costs: cost to reach a fixed suboptimality, checked after every step.
2. EF21-SGD against EF21-SGDM at batch size 1 (Fatkhullin et al., NeurIPS 2023).
3. DIANA and ADIANA with independent against shared rand-k masks on one problem split n
   ways, beside uncompressed and accelerated gradient descent (He et al., NeurIPS 2023).
4. Hard threshold against top-k at equal total entries, with EF14, from x* + 1e-4 and by
   the total error, as Sahu et al. (NeurIPS 2021) compare them.
5. Escape from a strict saddle with and without perturbation (Avdiukhin et al., 2021).
6. Dynamic top-k on a neural network, whose gradient spectrum changes during training:
   does the per-step rule beat every fixed k?
"""
import argparse
import os
import time

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import hvd_compress as hc  # noqa: E402
from hvd_compress.core.simulate import Workers, adiana, threshold_for_budget  # noqa: E402
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

    def loss_grad(self, x):
        """(f(x), grad f(x)) over all rows from one product A x."""
        ax = self.A @ x
        z = -self.b * ax
        reg = self.lam * np.sum(x * x / (1 + x * x)) if self.nonconvex else self.lam / 2 * x @ x
        s = -self.b / (1 + np.exp(self.b * ax))
        dreg = self.lam * 2 * x / (1 + x * x) ** 2 if self.nonconvex else self.lam * x
        return np.mean(np.logaddexp(0, z)) + reg, self.A.T @ s / len(self.b) + dreg

    def grad(self, x, rows=slice(None)):
        A, b = self.A[rows], self.b[rows]
        s = -b / (1 + np.exp(b * (A @ x)))
        reg = self.lam * 2 * x / (1 + x * x) ** 2 if self.nonconvex else self.lam * x
        return A.T @ s / len(b) + reg

    def argmin(self):
        """x* by Newton's method (convex case)."""
        x = np.zeros(self.A.shape[1])
        for _ in range(50):
            p = 1 / (1 + np.exp(-self.A @ x))
            H = (self.A.T * (p * (1 - p))) @ self.A / len(p) + self.lam * np.eye(len(x))
            x -= np.linalg.solve(H, self.grad(x))
        return x

    def minimum(self):
        """f* (convex case)."""
        return self.loss(self.argmin())


def _save(fig, ax, out, name, xlabel, ylabel, **legend):
    """Label, save as out/name and close a one-axis figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(**legend)
    fig.tight_layout()
    fig.savefig(os.path.join(out, name), dpi=90)
    plt.close(fig)


def _fmt(v):
    return "not reached" if v is None else f"{v:,}"


def shards(m, n):
    return np.array_split(np.arange(m), n)


# -- 1. dynamic k ---------------------------------------------------------------------

COSTS = {"linear": "dynamic:cost=linear",
         "affine (c0 = 1000 bits)": "dynamic:cost=affine,c0=1000",
         "packet (P = 1024, H = 160 bits)": "dynamic:cost=packet,packet=1024,header=160"}


def cost_of(label, k):
    return hc.resolve("topk+" + COSTS[label]).policy.costs(np.asarray(k))


def run_topk_gd(prob, spec, fstar, tol, max_steps):
    """Single-node compressed GD with step 1/L, the suboptimality checked after every step
    (from the product A x the next gradient needs anyway): (k of each step, relative
    suboptimality after each step)."""
    x = np.zeros(prob.A.shape[1])
    w = Workers(spec, 1)
    ks, gaps, gap0 = [], [], None
    for t in range(max_steps + 1):
        f, g = prob.loss_grad(x)
        if gap0 is None:
            gap0 = f - fstar
        else:
            gaps.append((f - fstar) / gap0)
            if gaps[-1] <= tol or t == max_steps:
                break
        x = x - w.step([g]) / prob.L
        ks.append(int(w.last[0].count))
    return np.array(ks), np.array(gaps)


def exp_dynamic(out, rows):
    """Cost to (f - f*)/(f0 - f*) = 1e-3 of dynamic k against every fixed k, and against
    the k that was best on the other dataset or under another cost model: the k a user
    would carry over instead of retuning."""
    tol, max_steps = 1e-3, 20000
    names = ("mushrooms", "a9a")
    runs, best = {}, {}  # (dataset, spec) -> (ks, gaps); (dataset, cost) -> best fixed k
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))

    def cost(name, label, spec):
        ks, gaps = runs[name, spec]
        return np.cumsum(cost_of(label, ks))[-1] if gaps[-1] <= tol else None

    problems = {}
    for name in names:
        A, y = load_libsvm(name)
        prob = Logistic(A, y, lam=1e-2)
        problems[name] = (prob, prob.minimum())
        d = A.shape[1]
        for k in sorted({1, 2, 4, 8, 16, 32, 64, d // 10, d}):
            runs[name, f"topk:k={k}"] = run_topk_gd(prob, f"topk:k={k}", problems[name][1],
                                                     tol, max_steps)
        for label in COSTS:
            runs[name, "topk+" + COSTS[label]] = run_topk_gd(
                prob, "topk+" + COSTS[label], problems[name][1], tol, max_steps)
            reached = {spec: cost(name, label, spec) for (nm, spec) in list(runs)
                       if nm == name and spec.startswith("topk:k=")}
            best[name, label] = min((c, spec) for spec, c in reached.items() if c)[1]
    for di, name in enumerate(names):
        for ci, label in enumerate(COSTS):
            ax = axes[di, ci]
            for (nm, spec), (ks, gaps) in runs.items():
                if nm == name and spec.startswith("topk:k="):
                    ax.semilogy(np.cumsum(cost_of(label, ks)), gaps, lw=0.8, label=spec[5:])
            ks, gaps = runs[name, "topk+" + COSTS[label]]
            ax.semilogy(np.cumsum(cost_of(label, ks)), gaps, "k", lw=2, label="dynamic")
            ax.set_title(f"{name}: {label}")
            ax.set_xlabel("cost (bits)")
            ax.set_ylabel("(f - f*) / (f0 - f*)")
            ax.set_xscale("log")
            ax.legend(fontsize=6)
            dyn, hindsight = cost(name, label, "topk+" + COSTS[label]), best[name, label]
            carried = {f"best on {other}": best[other, label] for other in names if other != name}
            carried.update({f"best under {other.split(' ')[0]}": best[name, other]
                            for other in COSTS if other != label})
            for spec in set(carried.values()):  # a k this dataset's grid did not run
                if (name, spec) not in runs:
                    runs[name, spec] = run_topk_gd(problems[name][0], spec, problems[name][1],
                                                   tol, max_steps)

            def times_dynamic(spec):
                c = cost(name, label, spec)
                return "not reached" if c is None or dyn is None else f"{c / dyn:.2f}x"
            summary = "dynamic not reached" if dyn is None else (
                f"dynamic {dyn:,.0f} bits (k {ks.min()}..{ks.max()}) = "
                f"{dyn / cost(name, label, hindsight):.2f}x the hindsight-best fixed "
                f"{hindsight[5:]}")
            rows.append(("dynamic k vs fixed k (checked every step)", f"{name}, {label}",
                         summary + "; k carried over, its cost / dynamic's: " + ", ".join(
                             f"{why} ({spec[5:]}) {times_dynamic(spec)}"
                             for why, spec in carried.items())))
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


# -- 3. DIANA and ADIANA: independent vs shared masks, one problem split n ways --------

def _first_to(gaps, per_step, tol):
    """Floats per worker when the relative suboptimality first reaches tol (or None)."""
    hit = np.flatnonzero(np.asarray(gaps) <= tol)
    return None if hit.size == 0 else int((hit[0] + 1) * per_step)


def exp_diana(out, rows):
    """Ridge regression on the first 6,400 rows of a9a, the same problem for every n, its
    rows split into n contiguous shards; l2 = lambda_max / 100, so kappa ~ 100 >= n.
    Floats each worker sends to reach a relative suboptimality of 1e-4."""
    A, y = load_libsvm("a9a")
    A, b = A[:6400].astype(np.float64), 2.0 * y[:6400] - 1.0
    m, d = A.shape
    H0 = A.T @ A / m
    l2 = np.linalg.eigvalsh(H0).max() / 100
    H, c = H0 + l2 * np.eye(d), A.T @ b / m
    ev = np.linalg.eigvalsh(H)
    L, mu = ev.max(), ev.min()
    xstar = np.linalg.solve(H, c)
    f = lambda x: 0.5 * x @ H @ x - c @ x  # noqa: E731
    fstar, tol = f(xstar), 1e-4
    f0 = f(np.zeros(d)) - fstar
    gap = lambda x: (f(x) - fstar) / f0  # noqa: E731
    # uncompressed baselines (d floats per step, the same for every n)
    x, gd = np.zeros(d), []
    while not gd or gd[-1] > tol:
        x = x - (H @ x - c) / L
        gd.append(gap(x))
    q = (np.sqrt(L / mu) - 1) / (np.sqrt(L / mu) + 1)  # Nesterov, strongly convex
    x = prev = np.zeros(d)
    agd = []
    while not agd or agd[-1] > tol:
        z = x + q * (x - prev)
        prev, x = x, z - (H @ z - c) / L
        agd.append(gap(x))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=True)
    for ax, n in zip(axes, (4, 16, 64)):
        parts = np.array_split(np.arange(m), n)
        grads = lambda i, x, parts=parts: (A[parts[i]].T @ (A[parts[i]] @ x - b[parts[i]])  # noqa: E731
                                           / len(parts[i]) + l2 * x)
        L_max = max(np.linalg.eigvalsh(A[p].T @ A[p] / len(p)).max() for p in parts) + l2
        k = int(round(d / (1 + np.sqrt(n))))
        omega = d / k - 1  # the compressor's own, about sqrt(n)
        ax.semilogy(np.arange(1, len(gd) + 1) * d, gd, "k:", label="GD")
        ax.semilogy(np.arange(1, len(agd) + 1) * d, agd, "k--", label="AGD (Nesterov)")
        floats = {"GD": len(gd) * d, "AGD": len(agd) * d}
        for shared in (False, True):
            mask = "shared" if shared else "independent"
            spec = f"randk:k={k},scaled=true,shared={str(shared).lower()}"
            spread = 1 if shared else n  # shared masks do not average out
            # DIANA at alpha = 1/(1 + omega) and gamma = 1/(L_max (1 + 2 omega/n)), the
            # step of its (kappa + kappa omega/n + omega) log(1/eps) rate
            gamma = 1 / (L_max * (1 + 2 * omega / spread))
            w = Workers(spec + "+diana", n, seed=1)
            x, gaps = np.zeros(d), []
            for _ in range(4000):
                x = x - gamma * w.step([grads(i, x) for i in range(n)])
                gaps.append(gap(x))
                if gaps[-1] <= tol:
                    break
            floats[f"DIANA {mask}"] = _first_to(gaps, k, tol)
            ax.semilogy(np.arange(1, len(gaps) + 1) * k, gaps, label=f"DIANA {mask}")
            # ADIANA, two messages a step: the theorem's parameters (adiana's defaults),
            # and the larger step 1/(2 L (1 + 4 omega/n)) that has no guarantee
            for label, eta in (("theorem", None),
                               ("eta=1/(2L(1+4w/n))", 1 / (2 * L * (1 + 4 * omega / spread)))):
                agaps = []

                def track(step, yk, bits, agaps=agaps):
                    agaps.append(gap(yk))
                    return agaps[-1] <= tol
                adiana(grads, np.zeros(d), L_max, mu, spec, n, 2000, seed=1, eta=eta,
                       callback=track)
                floats[f"ADIANA {label} {mask}"] = _first_to(agaps, 2 * k, tol)
                ax.semilogy(np.arange(1, len(agaps) + 1) * 2 * k, agaps,
                            ls="-." if eta is None else "-", label=f"ADIANA {label} {mask}")
        ax.set_title(f"n = {n}: k = {k} of {d}, omega = {omega:.1f}, L_max / L = {L_max / L:.2f}")
        ax.set_xlabel("floats sent per worker")
        ax.set_xscale("log")
        saving = [f"{name} {floats[f'{name} shared'] / floats[f'{name} independent']:.1f}x"
                  for name in ("DIANA", "ADIANA eta=1/(2L(1+4w/n))")
                  if floats[f"{name} shared"] and floats[f"{name} independent"]]
        rows.append((f"DIANA / ADIANA, one ridge problem (a9a rows, kappa = {L / mu:.0f}) "
                     "split n ways, scaled rand-k", f"n = {n}, k = {k} of {d}",
                     "floats per worker to 1e-4: " + ", ".join(
                         f"{name} {_fmt(v)}" for name, v in floats.items())
                     + ("; shared / independent: " + ", ".join(saving) if saving else "")))
    axes[0].set_ylabel("relative suboptimality")
    axes[-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "3_diana_independent.png"), dpi=90)
    plt.close(fig)


# -- 4. hard threshold vs top-k at equal total entries, in Sahu et al.'s setting -------

def run_ef14(prob, spec, parts, x0, fstar, steps, track=True):
    """EF14 over the shards from x0 at step 1/L: (entries sent by all workers, the total
    error sum_t sum_i ||e_t^i||^2 so far at each step, f - f* at each step)."""
    w = Workers(spec, len(parts))
    x = x0.copy()
    entries, error, errors, gaps = 0, 0.0, [], []
    for _ in range(steps):
        x = x - w.step([prob.grad(x, p) for p in parts]) / prob.L
        entries += sum(int(p.count) for p in w.last)
        if track:
            error += sum(float(np.sum(np.asarray(st.residual, np.float64) ** 2))
                         for st in w.states)
            errors.append(error)
            gaps.append(prob.loss(x) - fstar)
    return entries, np.array(errors), np.array(gaps)


def exp_threshold(out, rows):
    """a9a logistic regression with l2 = L / 1e4, 20 workers, EF14, step 1/L, from
    x* + 1e-4 (every coordinate), as Sahu et al. do; for each top-k and horizon T the
    hard threshold is set (threshold_for_budget) to send as many entries over the T steps
    as top-k does, and the two are compared by the total error and the final f - f*."""
    A, y = load_libsvm("a9a")
    prob = Logistic(A, y, lam=Logistic(A, y, lam=0.0).L / 1e4)
    xstar = prob.argmin()
    fstar, x0 = prob.loss(xstar), xstar + 1e-4
    parts = shards(len(y), 20)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for k in (1, 4):
        for steps in (100, 1000):
            e_top, err_top, gap_top = run_ef14(prob, f"topk:k={k}+ef14", parts, x0, fstar, steps)
            lam = threshold_for_budget(
                lambda lam: run_ef14(prob, f"threshold:lam={lam}+ef14", parts, x0, fstar,
                                     steps, track=False)[0],
                e_top, lo=1e-12, hi=1.0, rtol=0.01, rounds=25)
            e_thr, err_thr, gap_thr = run_ef14(prob, f"threshold:lam={lam}+ef14", parts, x0,
                                               fstar, steps)
            if steps == 1000:
                for ax, top, thr in ((left, gap_top, gap_thr), (right, err_top, err_thr)):
                    ax.semilogy(top, label=f"top-{k} + EF14")
                    ax.semilogy(thr, "--", label=f"threshold {lam:.1e} + EF14 (same entries)")
            rows.append(("hard threshold vs top-k at equal total entries, EF14, a9a, n = 20, "
                         "from x* + 1e-4",
                         f"k = {k}, T = {steps}: {e_thr:,} vs {e_top:,} entries",
                         f"total error sum ||e||^2: threshold {err_thr[-1]:.3g}, top-k "
                         f"{err_top[-1]:.3g} ({err_top[-1] / err_thr[-1]:.2f}x); mean f - f* "
                         f"over the last {steps // 2} steps: threshold "
                         f"{gap_thr[steps // 2:].mean():.2e}, top-k "
                         f"{gap_top[steps // 2:].mean():.2e}"))
    left.set_ylabel("f - f*")
    right.set_ylabel("total error so far, sum_t sum_i ||e_t^i||^2")
    for ax in (left, right):
        ax.set_xlabel("step")
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "4_threshold_vs_topk.png"), dpi=90)
    plt.close(fig)


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
