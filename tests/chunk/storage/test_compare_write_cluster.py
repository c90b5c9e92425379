"""VMware's ATS on a shared datastore, end to end: two hosts, each logged in to a different
chunk server's target (as the redirector spreads them), swap one lock block with COMPARE AND
WRITE at the same moment, round after round. Real etcd, meta and three chunk server processes.
Before COMPARE AND WRITE ran under the volume's ownership epoch, each server compared under a
lock of its own and both hosts could win the same round."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from tests.chunk.iscsi.raw_initiator import Initiator
from tests.chunk.scsi.helpers import caw, read10
from tests.chunk.storage.test_replication import INIT, digests, serving_volume
from tests.cluster import cluster

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not shutil.which("iscsi-inq"), reason="libiscsi-bin is not installed")]

BS = 512
WAIT = 60                       # seconds each PDU from the cluster may take


def test_two_hosts_on_two_chunk_servers_swapping_one_lock_block_never_both_win(tmp_path, etcd_server):
    with cluster(tmp_path, etcd_server, metas=1, chunks=3) as c:
        vol = serving_volume(c, 3, "ats", "64Mi", 3, served_on=(0, 1))
        lun = vol["lun"]

        async def main():
            hosts = [await Initiator.connect(c.portals[k], vol["target_iqn"], INIT) for k in (0, 1)]
            try:
                for h in hosts:                 # the power-on unit attention first
                    for _ in range(4):
                        if (await h.command(lun, bytes(6), timeout=WAIT))[0] == 0:
                            break
                cur = bytes(BS)
                for rnd in range(20):
                    mine = [bytes([1 + rnd]) * BS, bytes([101 + rnd]) * BS]
                    got = await asyncio.gather(*(h.command(lun, caw(8, 1), cur + m, timeout=WAIT)
                                                 for h, m in zip(hosts, mine)))
                    outcome = sorted((status, sense and sense[0]) for status, sense in got)
                    assert outcome == [(0x00, None), (0x02, 0x0E)], (rnd, got)   # GOOD + MISCOMPARE
                    cur = mine[0] if got[0][0] == 0 else mine[1]
                    for h in hosts:
                        status, _, data = await h.transfer(lun, read10(8, 1), read=BS, timeout=WAIT)
                        assert status == 0 and data == cur, rnd
            finally:
                for h in hosts:
                    h.close()
        asyncio.run(main())
        for idx, per in digests(c, vol["volume_id"]).items():
            assert len(per) == 3 and len(set(per.values())) == 1, (idx, per)
