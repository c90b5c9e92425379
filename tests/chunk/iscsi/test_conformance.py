"""iscsi-test-cu against a chunk server's LUN and against tgtd, in the same run.

Acceptance: every SCSI.* and iSCSI.* test that tgtd passes on this machine
passes against zstore too. The counts are printed (pytest -s, or -rA) so they
can be quoted.
"""

from __future__ import annotations

import shutil

import pytest

from tests.cluster import cluster, port_open, wait_for
from tests.conformance import FAMILIES, INITIATOR, INITIATOR_2, run_family, summary, tgtd

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not shutil.which("iscsi-test-cu"), reason="libiscsi-bin is not installed"),
              pytest.mark.skipif(not shutil.which("tgtd"), reason="tgt (the reference target) is not installed")]


def test_zstore_passes_everything_tgtd_passes(tmp_path, etcd_server):
    with tgtd() as ref_url:
        ref = {fam: run_family(ref_url, fam, tmp_path / f"tgtd-{fam}") for fam in FAMILIES}
    with cluster(tmp_path / "zs", etcd_server, metas=1, chunks=1) as c:
        wait_for(lambda: c.api("GET", "/cluster")[1]["chunks"]["up"] == 1, 30, "chunk up")
        wait_for(lambda: port_open(c.portals[0]), 20, "portal")
        status, vol = c.api("POST", "/volumes", {"name": "cu", "size": "256Mi", "replicas": 1})
        assert status == 201
        for iqn in (INITIATOR, INITIATOR_2):
            assert c.api("PUT", f"/volumes/cu/acl/{iqn}")[0] == 200
        url = f"iscsi://127.0.0.1:{c.portals[0]}/{vol['target_iqn']}/{vol['lun']}"
        import subprocess
        wait_for(lambda: subprocess.run(["iscsi-inq", "-i", INITIATOR, url], capture_output=True).returncode == 0,
                 15, "the LUN to be served")
        ours = {fam: run_family(url, fam, tmp_path / f"zs-{fam}") for fam in FAMILIES}
    for fam in FAMILIES:
        print(f"iscsi-test-cu {fam}: tgtd {summary(ref[fam])}, zstore {summary(ours[fam])}")
    missing = sorted(k for fam in FAMILIES for k, ok in ref[fam].items() if ok and not ours[fam].get(k))
    assert ref["SCSI"] and ours["SCSI"], "the suite did not run"
    assert not missing, f"tgtd passes but zstore fails: {missing}"
