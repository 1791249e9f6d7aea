"""The multi-rank checks on a GPU (tests/cuda, 2 ranks under mpirun).

On a machine with a CUDA device they run there; without one that test is skipped, saying
so (``pytest -ra`` prints the reason), never counted as passing. The same module also runs
on the CPU everywhere, so everything in it but the device is checked in every CI run and
cannot rot."""
import pytest

from test_multirank import HERE, run_file

MODULE = HERE / "cuda" / "test_cuda_ranks.py"


def test_multirank_checks_on_the_gpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: tests/cuda runs on a GPU where one is present (its "
                    "checks also run on the CPU, in the next test)")
    run_file(2, MODULE, extra_env={"HVD_COMPRESS_TEST_DEVICE": "cuda"})


def test_the_gpu_checks_pass_on_the_cpu():
    run_file(2, MODULE, extra_env={"HVD_COMPRESS_TEST_DEVICE": "cpu"})
