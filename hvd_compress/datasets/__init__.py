"""Two small real datasets shipped with the package, for examples, tests and experiments.

``mushrooms`` (8,124 samples, 112 binary features) and ``a9a`` (32,561 samples, 123
features) from the LIBSVM binary classification collection, stored gzipped.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from ..errors import HvdCompressError

_HERE = Path(__file__).parent
_FEATURES = {"mushrooms": 112, "a9a": 123}


def load_libsvm(name: str):
    """(X, y): X float32 of shape (m, d) dense, y float32 labels in {0, 1}."""
    if name not in _FEATURES:
        raise HvdCompressError(f"unknown dataset {name!r}; shipped: {sorted(_FEATURES)}")
    rows, labels = [], []
    with gzip.open(_HERE / f"{name}.txt.gz", "rt") as f:
        for line in f:
            parts = line.split()
            labels.append(float(parts[0]))
            rows.append([int(t.split(":")[0]) - 1 for t in parts[1:]])
    X = np.zeros((len(rows), _FEATURES[name]), np.float32)
    for i, cols in enumerate(rows):
        X[i, cols] = 1.0  # both datasets are binary-valued
    y = np.asarray(labels, np.float32)
    y = (y == y.max()).astype(np.float32)  # {1,2} or {-1,+1} -> {0,1}
    return X, y
