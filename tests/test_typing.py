"""The package is typed and lint-clean: it ships ``py.typed``, and mypy and ruff, configured
in pyproject.toml, pass here, so CI (``make test``) keeps them so. scripts/setup.sh
installs both at the versions the configuration was written for."""
import configparser
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINTED = ["hvd_compress", "tests", "benchmarks", "examples", "experiments"]


def check(tool, *args):
    """Run ``python -m tool args`` from the repository root with this interpreter (the
    venv's); fail with the tool's own report. Caches live in build/ (pyproject.toml)."""
    proc = subprocess.run([sys.executable, "-m", tool, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    if f"No module named {tool}" in proc.stderr:
        pytest.fail(f"{tool} is not installed: scripts/setup.sh installs it", pytrace=False)
    if proc.returncode != 0:
        pytest.fail(f"{tool} {' '.join(args)} exited {proc.returncode}:\n"
                    f"{proc.stdout}{proc.stderr}", pytrace=False)


def test_mypy_is_clean():
    check("mypy", "hvd_compress")


def test_ruff_is_clean():
    check("ruff", "check", *LINTED)


def test_the_package_ships_py_typed():
    assert (ROOT / "hvd_compress" / "py.typed").is_file()
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert "py.typed" in cfg["options.package_data"]["hvd_compress"]
