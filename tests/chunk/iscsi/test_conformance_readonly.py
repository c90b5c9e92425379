"""iscsi-test-cu's read-only suite (SCSI.ReadOnly) against a snapshot exported as a LUN,
beside tgtd serving a write-protected LUN, in the same run.

The SCSI family run by test_conformance.py uses a writable LUN, where this suite skips
itself ("not write-protected"): only a read-only LU runs it. Acceptance: zstore passes all
of it with none of its checks skipped, UNMAP and WRITE SAME(UNMAP) included: the snapshot LU
no longer advertises them (VPD B2), but answers them DATA PROTECT as the suite expects.
tgtd is printed beside it for reference: Debian's fails the WRITE SAME checks (ILLEGAL REQUEST
instead of DATA PROTECT) and skips UNMAP and COMPARE AND WRITE.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.cluster import cluster, port_open, wait_for
from tests.conformance import INITIATOR, INITIATOR_2, run_family, summary, tgtd

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not shutil.which("iscsi-test-cu"), reason="libiscsi-bin is not installed"),
              pytest.mark.skipif(not shutil.which("tgtd"), reason="tgt (the reference target) is not installed")]

SUITE = "SCSI.ReadOnly"
NOT_PROTECTED = b"not write-protected"


def _ran(workdir) -> bool:
    """The suite ran its tests (it skips them all on a writable LU, saying so)."""
    return NOT_PROTECTED not in (workdir / "output.txt").read_bytes()


def test_a_snapshot_lun_passes_the_read_only_suites_tgtd_passes(tmp_path, etcd_server):
    with tgtd(readonly=True) as ref_url:
        ref = run_family(ref_url, SUITE, tmp_path / "tgtd")
    assert _ran(tmp_path / "tgtd"), "tgtd's LUN is not write-protected"
    with cluster(tmp_path / "zs", etcd_server, metas=1, chunks=1) as c:
        wait_for(lambda: c.api("GET", "/cluster")[1]["chunks"]["up"] == 1, 30, "chunk up")
        wait_for(lambda: port_open(c.portals[0]), 20, "portal")
        assert c.api("POST", "/volumes", {"name": "ro", "size": "64Mi", "replicas": 1})[0] == 201
        status, snap = c.api("POST", "/volumes/ro/snapshots", {"name": "s"})
        assert status == 201, snap
        wait_for(lambda: c.api("GET", f"/snapshots/{snap['snapshot_id']}")[1].get("state") == "ready",
                 20, "snapshot ready")
        status, view = c.api("POST", f"/snapshots/{snap['snapshot_id']}/export")
        assert status == 201, view
        for iqn in (INITIATOR, INITIATOR_2):
            assert c.api("PUT", f"/snapshots/{snap['snapshot_id']}/acl/{iqn}")[0] == 200
        url = f"iscsi://127.0.0.1:{c.portals[0]}/{view['target_iqn']}/{view['lun']}"
        wait_for(lambda: subprocess.run(["iscsi-inq", "-i", INITIATOR, url], capture_output=True).returncode == 0,
                 15, "the snapshot LUN to be served")
        ours = run_family(url, SUITE, tmp_path / "zs")
    output = (tmp_path / "zs" / "output.txt").read_text(errors="replace")
    print(f"iscsi-test-cu {SUITE}: tgtd {summary(ref)}, zstore {summary(ours)}")
    assert ours, "the suite did not run"
    assert _ran(tmp_path / "zs"), "the snapshot LUN is not write-protected"
    assert all(ours.values()), f"zstore fails {sorted(k for k, ok in ours.items() if not ok)}:\n{output}"
    assert "[SKIPPED]" not in output, output
