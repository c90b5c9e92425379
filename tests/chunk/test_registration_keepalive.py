"""Keepalives run on their own schedule: a live-record write that hangs (etcd's disk slow)
while initiators log in and out must not cost the chunk server its lease."""

from __future__ import annotations

import asyncio
import time

from chunk.registration import Registration
from zstore.keys import Keys
from zstore.records import ChunkInfo

TTL = 3


async def test_a_hanging_live_record_write_never_delays_the_keepalives(etcd_client, etcd_config):
    keys = Keys(etcd_config.prefix)

    def info(disks):
        return ChunkInfo(chunk_id="slow-put", hostname="h", address="127.0.0.1", data_port=1,
                         portal="127.0.0.1:3260", disks=disks)

    async def disks():
        return []

    reg = Registration(etcd_client, keys, "slow-put", lease_ttl=TTL, build_info=info, probe_disks=disks)
    stop = asyncio.Event()
    task = asyncio.create_task(reg.run(stop))
    real_put = etcd_client.put
    try:
        await asyncio.wait_for(reg.registered.wait(), 10)
        lease_id, gen = reg.lease.id, reg.lease_gen

        async def slow_put(*a, **kw):       # etcd's disk stalls writes; keepalives still answer
            await asyncio.sleep(10)
            return await real_put(*a, **kw)
        etcd_client.put = slow_put

        end = time.monotonic() + 8          # well over two TTLs of logins and logouts
        while time.monotonic() < end:
            reg.sessions_changed()
            await asyncio.sleep(0.4)
            assert reg.lease_gen == gen and reg.lease is not None and reg.lease.id == lease_id
            assert reg.lease_valid(), "the keepalives stopped while the live record was written"
            ttl = await asyncio.wait_for(etcd_client.get_lease_info(lease_id, keys=False), 3)
            assert ttl.TTL > 0, "etcd expired the lease"
    finally:
        etcd_client.put = real_put
        stop.set()
        await asyncio.wait_for(task, 15)
