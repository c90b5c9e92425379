"""libiscsi's conformance suite (iscsi-test-cu) and Debian's tgtd as the reference.

Used by the conformance test and by hand::

    python -m tests.conformance iscsi://127.0.0.1:3260/iqn.../1   # prints per-family counts
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator

INITIATOR = "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test"
INITIATOR_2 = "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test-2"
FAMILIES = ("SCSI", "iSCSI")


def run_family(url: str, family: str, workdir: Path, timeout: float = 600) -> dict[str, bool]:
    """{"Suite.Test": passed} for one family or suite (destructive tests allowed: -d). The
    suite's output is kept in ``workdir/output.txt`` (skipped tests count as passed in the
    XML; their reason is only there)."""
    workdir.mkdir(parents=True, exist_ok=True)
    run = subprocess.run(["iscsi-test-cu", "-d", "-x", "-i", INITIATOR, "-I", INITIATOR_2, "-t", family, url],
                         cwd=workdir, capture_output=True, timeout=timeout)
    (workdir / "output.txt").write_bytes(run.stdout + run.stderr)
    results: dict[str, bool] = {}
    root = ET.parse(workdir / "CUnitAutomated-Results.xml").getroot()
    for suite in root.iter("CUNIT_RUN_SUITE"):
        sname = (suite.findtext(".//SUITE_NAME") or "").strip()
        for rec in suite.iter("CUNIT_RUN_TEST_RECORD"):
            for outcome in rec:
                name = (outcome.findtext("TEST_NAME") or "").strip()
                key = f"{sname}.{name}"
                ok = outcome.tag == "CUNIT_RUN_TEST_SUCCESS"
                results[key] = results.get(key, True) and ok
    return results


@contextlib.contextmanager
def tgtd(size: int = 256 << 20, port: int | None = None, readonly: bool = False) -> Iterator[str]:
    """A private tgtd (own control port, loopback only) serving one file LUN; yields its URL.
    ``readonly``: the LUN is write-protected (tgtadm's ``readonly=1``)."""
    from tests.cluster import free_port, port_open, wait_for
    port = port or free_port()
    ctl = str(20000 + os.getpid() % 10000)
    d = Path(tempfile.mkdtemp(prefix="zstore-tgtd-"))
    img = d / "lun1.img"
    with open(img, "wb") as f:
        f.truncate(size)
    iqn = "iqn.2026-01.io.zstore.reference:tgtd"
    p = subprocess.Popen(["tgtd", "-f", "-C", ctl, "--iscsi", f"portal=127.0.0.1:{port}"],
                         stdout=open(d / "tgtd.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    adm = ["tgtadm", "-C", ctl, "--lld", "iscsi"]
    try:
        wait_for(lambda: subprocess.run(adm + ["--mode", "target", "--op", "show"],
                                        capture_output=True).returncode == 0, 10, "tgtd control socket")
        for args in (["--mode", "target", "--op", "new", "--tid", "1", "--targetname", iqn],
                     ["--mode", "logicalunit", "--op", "new", "--tid", "1", "--lun", "1", "--backing-store", str(img)],
                     ["--mode", "target", "--op", "bind", "--tid", "1", "--initiator-address", "ALL"],
                     *([["--mode", "logicalunit", "--op", "update", "--tid", "1", "--lun", "1",
                         "--params", "readonly=1"]] if readonly else [])):
            subprocess.run(adm + args, check=True, capture_output=True)
        wait_for(lambda: port_open(port), 10, "tgtd portal")
        yield f"iscsi://127.0.0.1:{port}/{iqn}/1"
    finally:
        subprocess.run(adm + ["--mode", "target", "--op", "delete", "--force", "--tid", "1"], capture_output=True)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        shutil.rmtree(d, ignore_errors=True)


def summary(results: dict[str, bool]) -> str:
    return f"{sum(results.values())}/{len(results)} passed"


if __name__ == "__main__":
    target = sys.argv[1]
    for fam in FAMILIES:
        t0 = time.monotonic()
        r = run_family(target, fam, Path(tempfile.mkdtemp()))
        print(f"{fam}: {summary(r)} in {time.monotonic() - t0:.0f}s")
        for k, ok in sorted(r.items()):
            if not ok:
                print(f"  FAILED {k}")
