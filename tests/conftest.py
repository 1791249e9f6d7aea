"""Shared fixtures. Files under tests/mpi run only under mpirun (see test_multirank.py)."""
import os

import numpy as np
import pytest

# tests/mpi and tests/cuda run under mpirun only (tests/test_multirank.py, tests/test_cuda.py)
collect_ignore = [] if os.environ.get("HVD_COMPRESS_UNDER_MPI") else ["mpi", "cuda"]

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


if os.environ.get("HVD_COMPRESS_UNDER_MPI"):
    def pytest_runtest_logreport(report):
        """Under mpirun a failing test on one rank would leave the others waiting in a
        collective forever: abort the whole job at the first failure, after printing it."""
        if report.failed:
            import sys

            from mpi4py import MPI
            sys.stderr.write(f"\n[rank {MPI.COMM_WORLD.Get_rank()}] FAILED {report.nodeid}\n"
                             f"{report.longreprtext}\n")
            sys.stderr.flush()
            MPI.COMM_WORLD.Abort(1)


def pytest_configure(config):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
