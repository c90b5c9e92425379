"""The stopping mark on the live record is not undone by a write that was still in flight.

Real etcd and the real Registration. A live-record write abandoned at stop (``_call`` stops
awaiting it) may still be applied by etcd after the stopping mark is written; here etcd is
made to apply it late on purpose (the call is shielded and delayed), as a slow etcd can.
"""

from __future__ import annotations

import asyncio

import pytest

from chunk.registration import Registration
from tests.cluster import async_wait_for
from zstore.keys import Keys
from zstore.records import ChunkInfo, ChunkLive

pytestmark = pytest.mark.timeout(60)


async def test_a_late_publish_does_not_clear_the_stopping_mark(etcd_client, etcd_config, monkeypatch):
    keys = Keys(etcd_config.prefix)
    live_key = keys.chunk_live("c9")

    def info(disks):
        return ChunkInfo(chunk_id="c9", hostname="h", address="127.0.0.1", data_port=1,
                         portal="127.0.0.1:3262", disks=disks)

    async def disks():
        return []
    reg = Registration(etcd_client, keys, "c9", lease_ttl=3, build_info=info, probe_disks=disks,
                       revoke_on_stop=False, debounce=0.05)
    armed = {"on": False, "late": []}
    real_put, real_txn = etcd_client.put, etcd_client.transaction

    def late(real, *a, **kw):
        async def applied_later():
            await asyncio.sleep(0.6)             # etcd applies it after the client gave up
            return await real(*a, **kw)
        task = asyncio.ensure_future(applied_later())
        armed["late"].append(task)
        return asyncio.shield(task)

    async def put(key, value, *a, **kw):
        if armed["on"] and key == live_key and not ChunkLive.decode(value).stopping:
            return await late(real_put, key, value, *a, **kw)
        return await real_put(key, value, *a, **kw)

    async def transaction(*a, **kw):
        if armed["on"]:
            return await late(real_txn, *a, **kw)
        return await real_txn(*a, **kw)
    monkeypatch.setattr(etcd_client, "put", put)
    monkeypatch.setattr(etcd_client, "transaction", transaction)

    stop = asyncio.Event()
    task = asyncio.ensure_future(reg.run(stop))
    try:
        await asyncio.wait_for(reg.registered.wait(), 10)
        armed["on"] = True
        reg.sessions_changed()                   # a login: the record is written again...
        await async_wait_for(lambda: armed["late"], 5, "the live record's write to be sent")
        stop.set()                               # ...and SIGTERM while that write is in flight
        await asyncio.wait_for(task, 10)
        got = await etcd_client.get(live_key)
        assert got is not None and ChunkLive.decode(got.value).stopping
        await asyncio.wait_for(asyncio.gather(*armed["late"], return_exceptions=True), 5)
        got = await etcd_client.get(live_key)    # the late write has been applied (or refused)
        assert got is not None and ChunkLive.decode(got.value).stopping, \
            "a live-record write applied after the stopping mark cleared it"
    finally:
        stop.set()
        armed["on"] = False
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if reg.lease is not None:
            await reg.unregister()
