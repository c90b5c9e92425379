"""A chunk server that is shutting down gets no new logins, though its live key stays.

Real etcd, the real Registration (as the chunk server runs it: ``revoke_on_stop=False``, the
lease kept until ``unregister``) and the redirector's Members mirror.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from chunk.registration import Registration
from meta import chunks as meta_chunks
from redirector.members import Members
from tests.cluster import async_wait_for
from tests.meta.helpers import make_ctx
from zstore.keys import Keys
from zstore.records import ChunkInfo, ChunkLive

pytestmark = pytest.mark.timeout(60)

TARGET = "iqn.2026-01.io.zstore:abcd1234.t0000"
INIT = "iqn.1994-05.com.example:host1"
PORTAL = "127.0.0.1:3261"


async def test_a_stopping_chunk_server_gets_no_redirects_while_its_lease_holds(etcd_client, etcd_config):
    keys = Keys(etcd_config.prefix)

    def info(disks):
        return ChunkInfo(chunk_id="c1", hostname="h", address="127.0.0.1", data_port=1, portal=PORTAL,
                         disks=disks)

    async def disks():
        return []
    reg = Registration(etcd_client, keys, "c1", lease_ttl=3, build_info=info, probe_disks=disks,
                       revoke_on_stop=False)
    m, mstop = Members(etcd_client, keys), asyncio.Event()
    await asyncio.wait_for(m.start(mstop), 10)
    stop = asyncio.Event()
    task = asyncio.ensure_future(reg.run(stop))
    try:
        await asyncio.wait_for(reg.registered.wait(), 10)
        await async_wait_for(lambda: m.choose(INIT, TARGET, record=False) == PORTAL, 10,
                             "the redirector to send logins to c1")

        # SIGTERM: the chunk server's run ends, then its listener closes and its engine stops,
        # which can take tens of seconds. No new login may be sent there meanwhile.
        t0 = time.monotonic()
        stop.set()
        await asyncio.wait_for(task, 10)
        await async_wait_for(lambda: m.choose(INIT, TARGET, record=False) is None, 1.0,
                             "the redirector to stop sending logins to the stopping chunk server")
        assert time.monotonic() - t0 < 1.0
        assert m.usable() == []

        # It still owns its volumes until its writes have stopped: the live key stays under the
        # same lease, and the meta (fencing, snapshots) sees it up.
        got = await etcd_client.get(keys.chunk_live("c1"))
        assert got is not None and got.lease == reg.lease.id and ChunkLive.decode(got.value).stopping
        views = await meta_chunks.list_chunks(make_ctx(etcd_client, etcd_config))
        assert [(v.chunk_id, v.up) for v in views] == [("c1", True)]
        await asyncio.sleep(1.5)                   # the keepalive keeps it; nothing rewrites it
        assert ChunkLive.decode((await etcd_client.get(keys.chunk_live("c1"))).value).stopping
        assert m.choose(INIT, TARGET, record=False) is None
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)
        await reg.unregister()
        mstop.set()
        await m.close()
    assert await etcd_client.get(keys.chunk_live("c1")) is None


def test_a_live_record_without_the_field_is_not_stopping_and_old_readers_ignore_it():
    """Compatibility both ways: records written before the field decode as not stopping; the
    schema stays 1, so a reader that predates the field drops it instead of refusing the record."""
    old = b'{"chunk_id":"c1","pid":1,"started":0.0,"lease_ttl":3,"schema":1}'
    assert ChunkLive.decode(old).stopping is False
    new = ChunkLive(chunk_id="c1", pid=1, started=0.0, lease_ttl=3, stopping=True)
    assert new.schema == 1 and b'"stopping":true' in new.encode()
