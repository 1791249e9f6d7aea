"""Shared fixtures. Files under tests/mpi run only under mpirun (see test_multirank.py)."""
import os

import numpy as np
import pytest

collect_ignore = [] if os.environ.get("HVD_COMPRESS_UNDER_MPI") else ["mpi"]

BACKENDS = ("numpy", "torch", "tensorflow")


class XP:
    """Moves numpy test data to one backend and back."""

    def __init__(self, name):
        self.name = name
        if name == "torch":
            import torch
            self.mod = torch
        elif name == "tensorflow":
            import tensorflow as tf
            self.mod = tf
        else:
            self.mod = np

    def asarray(self, a):
        if self.name == "torch":
            return self.mod.from_numpy(np.ascontiguousarray(a))
        if self.name == "tensorflow":
            return self.mod.constant(a)
        return np.asarray(a)

    def numpy(self, t):
        from hvd_compress.core.ops import backend_for
        return backend_for(t).to_numpy(t)


@pytest.fixture(params=BACKENDS)
def xp(request):
    return XP(request.param)


def pytest_configure(config):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
