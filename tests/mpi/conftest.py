"""Under mpirun, a failing test on one rank would leave the others waiting in a collective
forever. Abort the whole job at the first failure instead, after printing it."""
import sys


def pytest_runtest_logreport(report):
    if report.failed:
        from mpi4py import MPI
        sys.stderr.write(f"\n[rank {MPI.COMM_WORLD.Get_rank()}] FAILED {report.nodeid}\n"
                         f"{report.longreprtext}\n")
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)
