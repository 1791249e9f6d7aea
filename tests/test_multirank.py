"""Runs every tests/mpi/test_*.py under ``mpirun``, with 2 and 4 ranks.

Each launch is ``mpirun -np N python -m mpi4py -m pytest FILE``: mpi4py's runner aborts the
whole job when one rank raises, so a failure cannot leave the others waiting.

Time limits are per test. Inside each launch pytest-timeout gives every test
``PER_TEST_S`` seconds with its thread method, which fires even while a rank waits inside
a collective (in C, where a signal handler would never run): it prints every thread's
stack and ends that rank, and mpirun then ends the job. Tests print their names as they
start (``-v``), so the failure names the test that hung. The launch as a whole has a
generous limit, ``FILE_LIMIT_S``, as a last resort (a hang at import, before any test).

Rank counts: a file runs with 2 and 4 ranks unless it sets ``MPI_RANKS`` to a tuple
literal at module level (read here without importing the file), saying why (8, the
most, only for the tree transport, whose rounds need it).
Every rank must report the same number of passed tests and no skips.
"""
import ast
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
FILES = sorted(p.name for p in (HERE / "mpi").glob("test_*.py"))
# The slowest test (a9a epochs in test_tf_keras.py) takes about 35 s on 2 idle cores and
# has taken 112 s on 2 cores shared with a dozen other processes.
PER_TEST_S = 300
FILE_LIMIT_S = 900


def ranks(name):
    """The file's ``MPI_RANKS = (...)``, else (2, 4)."""
    for node in ast.parse((HERE / "mpi" / name).read_text()).body:
        if isinstance(node, ast.Assign) and \
                any(isinstance(t, ast.Name) and t.id == "MPI_RANKS" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    return (2, 4)


CASES = [(name, np_) for name in FILES for np_ in ranks(name)]


def mpirun_command(np_, target):
    mpirun = shutil.which("mpirun")
    assert mpirun, "mpirun not found: run scripts/setup.sh (it installs OpenMPI)"
    cmd = [mpirun, "-np", str(np_), "--oversubscribe", "--bind-to", "none",
           "--mca", "btl", "self,tcp", "--mca", "btl_tcp_if_include", "lo",
           "--mca", "oob_tcp_if_include", "lo"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    for var in ("HVD_COMPRESS_UNDER_MPI", "OMP_NUM_THREADS", "TF_CPP_MIN_LOG_LEVEL",
                "PYTHONPATH", "HOROVOD_CYCLE_TIME", "HVD_COMPRESS_TEST_DEVICE"):
        cmd += ["-x", var]
    return cmd + [sys.executable, "-m", "mpi4py", "-m", "pytest", "-v", "--color=no", "-p",
                  "no:cacheprovider", "-o", "addopts=", f"--timeout={PER_TEST_S}",
                  "--timeout-method=thread", str(target)]


def last_started(out):
    """The last test named in ``-v`` output (the one running if the output stops there)."""
    starts = list(re.finditer(r"test_\w+\.py::", out))
    if not starts:
        return None
    line = out[starts[-1].start():].split("\n", 1)[0]  # ids may hold spaces
    return re.split(r" (?:PASSED|FAILED|ERROR|SKIPPED)|\s*\+{3,}", line)[0].strip()


def hung_test(out):
    """The test a rank was running when its per-test limit fired (None if none fired)."""
    marker = re.search(r"\+{3,} Timeout \+{3,}", out)
    if marker is None:
        return None
    return last_started(out[:marker.start()]) or "<unknown test>"


def test_every_mpi_file_is_run():
    assert FILES and {name for name, _ in CASES} == set(FILES)
    assert all(set(ranks(name)) <= {2, 3, 4, 8} for name in FILES)


@pytest.mark.parametrize("name,np_", CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_under_mpirun(name, np_):
    run_file(np_, HERE / "mpi" / name)


def run_file(np_, path, extra_env=None):
    """Run the test file ``path`` under ``mpirun -np np_``; fail unless every rank passed
    the same tests, none skipped."""
    name = path.name
    env = dict(os.environ, HVD_COMPRESS_UNDER_MPI="1", OMP_NUM_THREADS="1",
               TF_CPP_MIN_LOG_LEVEL="3", HOROVOD_CYCLE_TIME="1",
               PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **(extra_env or {}))
    proc = subprocess.Popen(mpirun_command(np_, path), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=HERE.parent)
    try:
        out, _ = proc.communicate(timeout=FILE_LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"mpirun -np {np_} {name} ran past the {FILE_LIMIT_S}s limit of a whole "
                    f"file (last test started: {last_started(out)}):\n{out[-6000:]}")
    hung = hung_test(out)
    assert hung is None, \
        f"mpirun -np {np_} {name}: {hung} ran past {PER_TEST_S}s (per-test limit):\n{out[-8000:]}"
    assert proc.returncode == 0, f"mpirun -np {np_} {name} exited {proc.returncode}:\n{out[-8000:]}"
    summaries = re.findall(r"(\d+) passed(?:, \d+ \w+)* in [\d.]+s", out)
    assert len(summaries) == np_, f"expected one summary per rank:\n{out[-4000:]}"
    assert len(set(summaries)) == 1 and int(summaries[0]) > 0, out[-4000:]
    assert not re.search(r"\d+ (skipped|xfailed|failed|error)", out), out[-4000:]
    print(f"mpirun -np {np_} {name}: {summaries[0]} passed on each of {np_} ranks")
