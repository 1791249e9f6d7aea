"""Global top-k with EF14, restated in NumPy: the oracle of the tree transport's
multi-rank tests (tests/mpi/test_tree.py, tests/cuda), independent of the package."""
import numpy as np


def top(v, k):
    """Sorted positions of the k largest |v| (ties to lower positions)."""
    order = np.lexsort((np.arange(v.size), -np.abs(v)))
    return np.sort(order[:k])


def keep(v, k):
    out = np.zeros_like(v)
    pos = top(v, k)
    out[pos] = v[pos]
    return out


def gtopk(compensated, k):
    """(G, residuals): the global sum every rank applies and each rank's new EF14
    residual, from every rank's compensated gradient (rows)."""
    n = compensated.shape[0]
    current = np.stack([keep(c, k) for c in compensated])
    residual = compensated - current
    bit = 1
    while bit < n:
        for r in range(0, n, 2 * bit):
            if r + bit < n:
                total = current[r] + current[r + bit]
                current[r] = keep(total, k)
                residual[r] += total - current[r]
        bit *= 2
    return current[0], residual
