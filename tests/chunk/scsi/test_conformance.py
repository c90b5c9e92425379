"""libiscsi's conformance suite (iscsi-test-cu, SCSI family) against a live chunk server.

The unit tests pin bytes; this pins behaviour as a third party reads the
standards.  The run goes through the real iSCSI target of a chunk server, so
the two initiators libiscsi uses are put on the volume's ACL.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.cluster import cluster, port_open, wait_for

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not shutil.which("iscsi-test-cu"),
                                 reason="libiscsi-bin is not installed")]

INITIATORS = ("iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test",
              "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test-2")


@pytest.fixture
def lun_url(tmp_path, etcd_server):
    with cluster(tmp_path, etcd_server, metas=1, chunks=1) as c:
        wait_for(lambda: c.api("GET", "/cluster")[1]["chunks"]["up"] == 1, 30, "chunk server up")
        wait_for(lambda: port_open(c.portals[0]), 20, "iSCSI portal")
        status, vol = c.api("POST", "/volumes", {"name": "conf", "size": "64Mi", "replicas": 1})
        assert status == 201, vol
        for iqn in INITIATORS:
            assert c.api("PUT", f"/volumes/conf/acl/{iqn}")[0] == 200
        url = f"iscsi://127.0.0.1:{c.portals[0]}/{vol['target_iqn']}/{vol['lun']}"
        wait_for(lambda: subprocess.run(["iscsi-inq", "-i", INITIATORS[0], url],
                                        capture_output=True).returncode == 0,
                 15, "the LUN to be served")
        yield url


def test_iscsi_test_cu_scsi_family(lun_url):
    # --dataloss: the volume is scratch; the suite writes, unmaps and reserves
    p = subprocess.run(["iscsi-test-cu", "--dataloss", "--silent", "--test", "SCSI", lun_url],
                       capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    m = re.search(r"tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", out)
    assert m, out[-3000:]
    total, ran, passed, failed = map(int, m.groups())
    failures = [line for line in out.splitlines() if "[FAILED]" in line]
    assert failed == 0 and p.returncode == 0, "\n".join(failures) or out[-3000:]
    assert ran == total >= 200, out[-3000:]
