"""Runs the files in tests/mpi under ``mpirun`` with 2 and 4 ranks.

Each launch is ``mpirun -np N python -m mpi4py -m pytest FILE``: mpi4py's runner aborts the
whole job when one rank raises, so a failure cannot leave the others waiting, and a time
limit turns any hang into a failure. Every rank must report the same number of passed
tests and no skips.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
FILES = ["test_mpi4py.py", "test_torch_horovod.py", "test_tf_horovod.py", "test_tf_keras.py"]
TIME_LIMIT_S = 420


def mpirun_command(np_, target):
    mpirun = shutil.which("mpirun")
    assert mpirun, "mpirun not found: run scripts/setup.sh (it installs OpenMPI)"
    cmd = [mpirun, "-np", str(np_), "--oversubscribe", "--bind-to", "none",
           "--mca", "btl", "self,tcp", "--mca", "btl_tcp_if_include", "lo",
           "--mca", "oob_tcp_if_include", "lo"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    for var in ("HVD_COMPRESS_UNDER_MPI", "OMP_NUM_THREADS", "TF_CPP_MIN_LOG_LEVEL",
                "PYTHONPATH", "HOROVOD_CYCLE_TIME"):
        cmd += ["-x", var]
    return cmd + [sys.executable, "-m", "mpi4py", "-m", "pytest", "-q", "--color=no", "-p",
                  "no:cacheprovider", "-o", "addopts=", str(target)]


@pytest.mark.parametrize("np_", [2, 4])
@pytest.mark.parametrize("name", FILES)
def test_under_mpirun(name, np_):
    env = dict(os.environ, HVD_COMPRESS_UNDER_MPI="1", OMP_NUM_THREADS="1",
               TF_CPP_MIN_LOG_LEVEL="3", HOROVOD_CYCLE_TIME="1",
               PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(mpirun_command(np_, HERE / "mpi" / name), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=HERE.parent)
    try:
        out, _ = proc.communicate(timeout=TIME_LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"mpirun -np {np_} {name} hung for {TIME_LIMIT_S}s:\n{out[-6000:]}")
    summaries = re.findall(r"(\d+) passed in [\d.]+s", out)
    assert proc.returncode == 0, f"mpirun -np {np_} {name} exited {proc.returncode}:\n{out[-8000:]}"
    assert len(summaries) == np_, f"expected one summary per rank:\n{out[-4000:]}"
    assert len(set(summaries)) == 1 and int(summaries[0]) > 0, out[-4000:]
    assert not re.search(r"\d+ (skipped|xfailed|failed|error)", out), out[-4000:]
    print(f"mpirun -np {np_} {name}: {summaries[0]} passed on each of {np_} ranks")
