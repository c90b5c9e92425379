"""The installed commands start from anywhere, not only from the source tree.

Python 3.11 and 3.12 ship a stdlib module ``chunk``; an installed ``zstore-chunk`` (and the
redirector, which imports ``chunk.catalog``) once failed with "'chunk' is not a package"
everywhere but the repository root, which is where ``zstore up`` and the tests ran them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


@pytest.mark.parametrize("script", SCRIPTS)
def test_installed_command_starts_outside_the_source_tree(script: str):
    exe = Path(sys.executable).parent / script
    assert exe.exists(), f"{exe} is not installed: run ./dev setup (pip install -e .)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(exe), "--help"], cwd="/", env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith(f"usage: {script}"), out.stdout[:200]


def test_our_chunk_package_wins_over_the_stdlib_module_already_imported():
    """Even when something imported the stdlib's ``chunk`` first, ``prefer_our_chunk`` makes
    ``import chunk.server`` load ours (run in a fresh interpreter outside the tree)."""
    code = ("import sys, warnings; warnings.simplefilter('ignore')\n"
            "try:\n    import chunk as std\nexcept ImportError:\n    std = None\n"   # gone in 3.13
            "from zstore.entrypoints import prefer_our_chunk\n"
            "prefer_our_chunk(); prefer_our_chunk()\n"
            "import chunk.server, chunk.catalog\n"
            "print(chunk.__file__)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip()) == ROOT / "chunk" / "__init__.py"
