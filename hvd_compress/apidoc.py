"""Writes the API reference, generated from the docstrings with pdoc:
``python -m hvd_compress.apidoc OUT`` (``make docs`` writes build/api)."""
from __future__ import annotations

import pkgutil
import sys


def modules() -> list:
    """Every module of the package, by name (the package first)."""
    import hvd_compress
    return ["hvd_compress"] + sorted(m.name for m in pkgutil.walk_packages(
        hvd_compress.__path__, "hvd_compress.") if not m.name.endswith(".apidoc"))


def write(out: str) -> list:
    """Write the HTML reference into ``out``; the modules documented."""
    import warnings
    from pathlib import Path

    import pdoc
    names = modules()
    with warnings.catch_warnings():
        # pdoc notes modules it reached twice (a package lists some of its submodules)
        # and annotations it cannot resolve; neither changes a page
        warnings.simplefilter("ignore", UserWarning)
        pdoc.pdoc(*names, output_directory=Path(out))
    return names


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m hvd_compress.apidoc OUT_DIR")
    print(f"{len(write(sys.argv[1]))} modules documented in {sys.argv[1]}")
