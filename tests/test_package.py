"""The package surface: light import, one registry, one error type."""
import subprocess
import sys

import hvd_compress


def test_import_needs_no_framework():
    code = ("import sys, hvd_compress, hvd_compress.core, hvd_compress.torch, "
            "hvd_compress.tensorflow, hvd_compress.comm.mpi\n"
            "heavy = [m for m in ('torch', 'tensorflow', 'horovod', 'mpi4py')"
            " if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registry_lists_every_compressor():
    assert hvd_compress.available("compressor") == [
        "bernoulli", "bf16", "fp16", "natural", "none", "qsgd", "randk", "sign", "terngrad",
        "threshold", "topk"]


def test_registry_lists_every_feedback_rule():
    assert hvd_compress.available("feedback") == ["diana", "ef14", "ef21", "ef21sgd2m",
                                                  "ef21sgdm"]


def test_public_names():
    assert set(hvd_compress.__all__) == {
        "Compressor", "Feedback", "HvdCompressError", "Key", "Payload", "Pipeline", "available",
        "pack", "parse", "register", "resolve", "unpack", "__version__"}
    assert issubclass(hvd_compress.HvdCompressError, ValueError)
