"""Case variants of one allowed InitiatorName are one initiator: one record, one chunk server.

Real etcd, the real Catalog, Members and portal: before any authentication, each variant
used to get its own sticky record (never deleted) and its own hash, so a client could
write 2^letters records to etcd and fill its quota for the whole cluster.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest

from chunk.catalog import Catalog
from chunk.iscsi.constants import LoginStatus
from redirector.members import Members
from redirector.portal import RedirectPortal
from tests.cluster import async_wait_for
from tests.redirector.iscsi_client import RawInitiator
from tests.redirector.test_members import add_chunk
from zstore.keys import Keys
from zstore.records import AclEntry, LunMapping, RedirectRecord, Target, Volume

pytestmark = pytest.mark.timeout(120)

TARGET = "iqn.2026-01.io.zstore:abcd1234.t0001"
INIT = "iqn.1994-05.com.example:host1"


def case_variants(name: str, n: int) -> list[str]:
    letters = [i for i, ch in enumerate(name) if ch.isalpha()]
    out = []
    for bits in itertools.islice(itertools.product((0, 1), repeat=len(letters)), n):
        chars = list(name)
        for b, i in zip(bits, letters):
            if b:
                chars[i] = chars[i].upper()
        out.append("".join(chars))
    return out


async def test_case_variants_of_an_allowed_name_share_one_record_and_one_chunk_server(
        etcd_client, etcd_config):
    keys, e = Keys(etcd_config.prefix), etcd_client
    await e.put(keys.volume("v1"), Volume(volume_id="v1", name="v", size=1 << 26, replicas=1,
                                          target_index=1, lun=1).encode())
    await e.put(keys.target(1), Target(index=1, iqn=TARGET).encode())
    await e.put(keys.lun(1, 1), LunMapping(target_index=1, lun=1, volume_id="v1").encode())
    await e.put(keys.acl("v1", INIT), AclEntry(volume_id="v1", initiator=INIT).encode())
    for i, cid in enumerate(("c1", "c2", "c3")):
        await add_chunk(e, keys, cid, 4000 + i)
    stop = asyncio.Event()
    cat, mem = Catalog(e, keys), Members(e, keys)
    await asyncio.wait_for(asyncio.gather(cat.start(stop), mem.start(stop)), 10)
    p = RedirectPortal(cat, mem, login_timeout=2.0, max_connections=64, holding=lambda: True)
    await p.open("127.0.0.2", 0)
    port = p._server.sockets[0].getsockname()[1]
    try:
        portals = set()
        for name in case_variants(INIT, 200):
            c = await RawInitiator.connect("127.0.0.2", port)
            try:
                resp, kv = await c.login(name, TARGET)
            finally:
                c.close()
            assert resp.status == LoginStatus.TARGET_MOVED_TEMPORARILY
            portals.add(kv["TargetAddress"])
        assert len(portals) == 1
        await async_wait_for(lambda: not mem._pending, 10, "the record written")
        await asyncio.sleep(0.5)                # any further write would have landed by now
        recs = [RedirectRecord.decode(kv.value) for kv in await e.get_prefix(keys.redirects())]
        assert [r.initiator for r in recs] == [INIT]
    finally:
        stop.set()
        await p.close()
        await mem.close()
        await cat.close()
