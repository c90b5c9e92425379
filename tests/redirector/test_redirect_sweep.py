"""The VIP holder deletes sticky redirect records no login can use; live ones stay.

A real redirector process on 127.0.0.2 and real etcd. Records used to stay for ever:
for initiators without an ACL entry left, for deleted targets, for removed chunk servers
and under mixed-case names written before names were lower-cased.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.cluster import Cluster, async_wait_for
from tests.redirector.portal_helpers import INIT, TARGET, put_target
from tests.redirector.test_members import add_chunk
from zstore.keys import Keys
from zstore.records import RedirectRecord

pytestmark = pytest.mark.timeout(90)

GONE_TARGET = "iqn.2026-01.io.zstore:abcd1234.t0002"
INIT2 = "iqn.1994-05.com.example:host2"
INIT3 = "iqn.1994-05.com.example:host3"
NO_ACL = "iqn.1994-05.com.example:host4"


async def test_stale_records_of_each_kind_are_deleted_and_live_ones_are_kept(
        tmp_path, etcd_server, etcd_client, etcd_config):
    keys, e = Keys(etcd_config.prefix), etcd_client
    await put_target(e, keys, (INIT, INIT2, INIT3))
    await add_chunk(e, keys, "c1", 4001)
    await add_chunk(e, keys, "c2", 4002, live=False)       # down, not removed: it may come back

    async def put(target: str, initiator: str, chunk: str) -> bytes:
        key = keys.redirect(target, initiator)
        await e.put(key, RedirectRecord(target=target, initiator=initiator, chunk_id=chunk).encode())
        return key
    live = {await put(TARGET, INIT, "c1"), await put(TARGET, INIT2, "c2")}
    stale = {await put(TARGET, NO_ACL, "c1"),                     # no ACL entry on the target
             await put(GONE_TARGET, INIT, "c1"),                  # target deleted
             await put(TARGET, INIT.upper(), "c1"),               # written before lower-casing
             await put(TARGET, INIT3, "c9")}                      # chunk server c9 removed

    c = Cluster(workdir=tmp_path, etcd=etcd_server, prefix=etcd_config.prefix)
    try:
        await asyncio.to_thread(c.start_redirector, "127.0.0.2")

        async def only_live_left() -> bool:
            return {kv.key for kv in await e.get_prefix(keys.redirects())} == live
        await async_wait_for(only_live_left, 15, "the stale records deleted")
    finally:
        await asyncio.to_thread(c.stop)
