"""Smoke test of bench/storage_bench.py: the whole bench runs at tiny sizes, prints both columns,
and leaves no process or file behind. The numbers themselves are not judged here (a timed test
only measures how busy the box is); bench/README.md says where they are."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "storage_bench.py"
TOOLS = ("tgtd", "tgtadm", "iscsi-perf", "iscsi-inq", "qemu-img", "qemu-io", "etcd")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180),
              pytest.mark.skipif(os.geteuid() != 0 or not all(shutil.which(t) for t in TOOLS),
                                 reason="needs root and tgt, libiscsi-bin, qemu-utils, etcd")]


def run_bench(*args: str, timeout: float) -> subprocess.CompletedProcess:
    """The bench to completion; if it overruns, SIGTERM (its clean-up path) rather than
    subprocess.run's SIGKILL, which would leave its zstore cluster and tgtd running."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZSTORE_")}
    p = subprocess.Popen([sys.executable, str(BENCH), *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.terminate()
        out, err = p.communicate(timeout=60)
        pytest.fail(f"storage_bench.py {' '.join(args)} overran {timeout:.0f}s\n{out}\n{err}")
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def number(cell: str) -> float:
    return float(cell.rstrip("x").replace(",", ""))


@pytest.fixture
def short_dir():
    """zstore up puts unix sockets in its state dir: pytest's tmp_path is too long for them."""
    d = Path(tempfile.mkdtemp(prefix="sbt-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_quick_run_prints_both_columns_and_cleans_up(short_dir):
    tmp_path = short_dir
    r = run_bench("--quick", "--size", "16Mi", "--duration", "0.5", "--snapshots", "2", "--repeat", "2",
                  "--workdir", str(tmp_path), timeout=150)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout

    assert "(median of 2, alternated)" in out, out
    # every timed line twice per column (the first pass once), in both orders
    for col in ("tgtd", "zstore-r1", "zstore-r2", "zstore-r3"):
        assert len(re.findall(rf"^  {col} +4 KiB random write, QD32 ", r.stderr, re.M)) == 2, r.stderr
        assert len(re.findall(rf"^  {col} +1 MiB seq write, QD8 \(first pass\) ", r.stderr, re.M)) == 1

    # Snapshots: both sizes timed, a ratio and the flatness verdict.
    snap = re.search(r"^median ms\s+([\d.,]+)\s+([\d.,]+)\s+([\d.]+)x$", out, re.M)
    assert snap, out
    assert number(snap[1]) > 0 and number(snap[2]) > 0
    assert re.search(r"^flat \(metadata only\): (yes|NO) ", out, re.M), out

    # I/O: tgtd beside 1, 2 and 3 replicas, a value in every cell and every ratio.
    header = next(l for l in out.splitlines() if l.startswith("metric "))
    assert header.split()[2:6] == ["tgtd", "zstore-r1", "zstore-r2", "zstore-r3"], header
    for label in ("4 KiB random write, QD1", "4 KiB random write, QD32", "1 MiB seq write, QD8 (overwrite)",
                  "4 KiB random read, QD32"):
        row = next(l for l in out.splitlines() if l.startswith(label))
        cells = row[len(label):].split()[1:]              # after the unit
        assert len(cells) == 7, row
        assert all(number(c) > 0 for c in cells), row
    assert re.search(r"^goal zstore-r2 .*: (MET|NOT MET) \(", out, re.M), out
    assert re.search(r"^goal zstore-r3 .*: (MET|NOT MET) \(", out, re.M), out
    # Where a QD32 write's CPU went, per column, and how idle the machine was meanwhile.
    for col in ("tgtd", "zstore-r1", "zstore-r2", "zstore-r3"):
        assert re.search(rf"^  {col} +initiator \d+; .*; all \d+; machine \d+% idle$", out, re.M), out

    # Nothing left behind: the work dir is gone and no process still runs from it.
    assert list(tmp_path.iterdir()) == []
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", leftover.stdout


def test_bad_arguments_exit_2():
    r = run_bench("--duration", "0", timeout=30)
    assert r.returncode == 2
    assert "--duration" in r.stderr
    r = run_bench("--repeat", "0", timeout=30)
    assert r.returncode == 2 and "--repeat" in r.stderr
