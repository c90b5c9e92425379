"""Smoke test of bench/pagecache_bench.py at a tiny size: every line printed with numbers,
the temp dir removed. The numbers are not judged (bench/README.md has them)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "pagecache_bench.py"


def test_tiny_run_prints_every_line_and_cleans_up(tmp_path: Path):
    r = subprocess.run([sys.executable, str(BENCH), "--files", "1", "--writes", "200",
                        "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = re.findall(r"^ +(\d+) KiB +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+)", r.stdout, re.M)
    assert [int(k) for k, *_ in rows] == [1024, 256, 64, 32, 16, 4], r.stdout
    assert "<- WRITE_PIECE" in r.stdout
    assert re.search(r"with readahead +[\d.]+\n +POSIX_FADV_RANDOM +[\d.]+", r.stdout), r.stdout
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_exit_2(tmp_path: Path):
    r = subprocess.run([sys.executable, str(BENCH), "--files", "0", "--workdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--files" in r.stderr
