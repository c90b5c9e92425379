"""Smoke test of bench/floor_target.py (the minimal replicated Python target beside tgtd) at
its --quick size: both floors and tgtd measured, each floor's replica files identical to its
target's (the replication hop really wrote), every process stopped and the temp dir removed.
The numbers are not judged (bench/README.md has them)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "floor_target.py"

pytestmark = pytest.mark.skipif(not (shutil.which("tgtd") and shutil.which("iscsi-inq")),
                                reason="needs tgt and libiscsi-bin (.ci/run installs them)")


def test_quick_run_measures_every_column_and_cleans_up(tmp_path: Path):
    r = subprocess.run([sys.executable, str(BENCH), "--quick", "--replicas", "1,3", "--checksums",
                        "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = dict(re.findall(r"^  (\S+) +([\d,]+) IOPS", r.stdout, re.M))
    assert set(rows) == {"tgtd", "floor-r1", "floor-r3"}, r.stdout
    assert all(int(v.replace(",", "")) > 0 for v in rows.values()), r.stdout
    assert r.stdout.count("replicas identical: yes") == 2, r.stdout
    r3 = next(line for line in r.stdout.splitlines() if line.startswith("  floor-r3"))
    assert re.search(r"replica0 \d+", r3) and re.search(r"replica1 \d+", r3), r3
    assert list(tmp_path.iterdir()) == []
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert leftover.stdout == "", leftover.stdout


@pytest.mark.parametrize("args", [["--replicas", "4"], ["--replicas", "x"], ["--repeat", "0"]])
def test_bad_arguments_exit_2(tmp_path: Path, args: list[str]):
    r = subprocess.run([sys.executable, str(BENCH), *args, "--workdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert list(tmp_path.iterdir()) == []
