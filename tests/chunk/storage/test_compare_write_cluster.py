"""VMware's ATS on a shared datastore, end to end: two hosts, each logged in to a different
chunk server's target (as the redirector spreads them), swap one lock block with COMPARE AND
WRITE at the same moment, round after round. Real etcd, meta and three chunk server processes.
Before COMPARE AND WRITE ran under the volume's ownership epoch, each server compared under a
lock of its own and both hosts could win the same round."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from chunk.iscsi import pdu as P
from chunk.iscsi.constants import TARGET_OPCODES
from tests.chunk.iscsi.raw_login import normal_login
from tests.chunk.scsi.helpers import caw, read10
from tests.chunk.storage.test_replication import INIT, digests, serving_volume
from tests.cluster import cluster

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not shutil.which("iscsi-inq"), reason="libiscsi-bin is not installed")]

BS = 512


class _Host:
    """One session to one chunk server's target; commands one at a time."""

    def __init__(self, r, w) -> None:
        self.r, self.w, self.itt, self.cmdsn = r, w, 1, 1

    async def command(self, lun: int, cdb: bytes, out: bytes = b"", expected_in: int = 0):
        """(status, sense key or None, data-in); data-out goes as immediate data."""
        self.itt += 1
        self.w.write(P.ScsiCommand(itt=self.itt, cmdsn=self.cmdsn, lun=P.encode_lun(lun),
                                   write=bool(out), read=expected_in > 0,
                                   expected_length=len(out) or expected_in,
                                   cdb=cdb.ljust(16, b"\0"), data=out).to_bytes())
        self.cmdsn += 1
        data = b""
        while True:
            pdu = await asyncio.wait_for(
                P.read_pdu(self.r, max_recv_data_segment_length=1 << 20, opcodes=TARGET_OPCODES), 60)
            if isinstance(pdu, P.DataIn):
                data += pdu.data
                if pdu.status_present:
                    return pdu.status, None, data
            elif isinstance(pdu, P.ScsiResponse):
                s = pdu.sense
                return pdu.status, (s[2] & 0x0F if s else None), data


def test_two_hosts_on_two_chunk_servers_swapping_one_lock_block_never_both_win(tmp_path, etcd_server):
    with cluster(tmp_path, etcd_server, metas=1, chunks=3) as c:
        vol = serving_volume(c, 3, "ats", "64Mi", 3, served_on=(0, 1))
        lun = vol["lun"]

        async def main():
            hosts = [_Host(*await normal_login(c.portals[k], vol["target_iqn"], INIT)) for k in (0, 1)]
            try:
                for h in hosts:                 # the power-on unit attention first
                    for _ in range(4):
                        if (await h.command(lun, bytes(6)))[0] == 0:
                            break
                cur = bytes(BS)
                for rnd in range(20):
                    mine = [bytes([1 + rnd]) * BS, bytes([101 + rnd]) * BS]
                    got = await asyncio.gather(*(h.command(lun, caw(8, 1), cur + m)
                                                 for h, m in zip(hosts, mine)))
                    outcome = sorted((status, key) for status, key, _ in got)
                    assert outcome == [(0x00, None), (0x02, 0x0E)], (rnd, got)   # GOOD + MISCOMPARE
                    cur = mine[0] if got[0][0] == 0 else mine[1]
                    for h in hosts:
                        status, _, data = await h.command(lun, read10(8, 1), expected_in=BS)
                        assert status == 0 and data == cur, rnd
            finally:
                for h in hosts:
                    h.w.close()
        asyncio.run(main())
        for idx, per in digests(c, vol["volume_id"]).items():
            assert len(per) == 3 and len(set(per.values())) == 1, (idx, per)
