"""The catalog's "confirmed current" probe and a watch that stays open but stops delivering
(chunk/catalog.py).

The probe proves etcd answered a linearizable read while every section's watch was open,
not that the watches delivered everything up to that read's revision. A section whose
stream stalls while staying open (here: its events are dropped before the mirror) keeps
an ACL revoked in etcd, and the mirror still counted as current. Now the probe reads
each section's key count at its revision and confirms only once every section's mirror
caught up with it: the catalog goes stale instead.
"""

from __future__ import annotations

import asyncio

from chunk.catalog import Catalog
from meta import exports, volumes
from tests.cluster import async_wait_for
from tests.meta.helpers import make_ctx, register_chunk

H1 = "iqn.2004-10.com.example:h1"
BOUND = 1.0


async def test_a_stalled_open_acl_watch_does_not_keep_a_revoked_acl_served(etcd_client, etcd_config):
    ctx = make_ctx(etcd_client, etcd_config)
    await register_chunk(ctx, "c0")
    stop = asyncio.Event()
    cat = Catalog(etcd_client, ctx.keys, stale_after=BOUND)
    await cat.start(stop)
    try:
        vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 1)
        iqn = (await exports.list_targets(ctx))[0]["iqn"]
        await exports.add_acl(ctx, "v", H1)
        await async_wait_for(lambda: cat.lun_access(iqn, H1, vol.lun), 5, "ACL mirrored")

        real = cat._event                                           # noqa: SLF001

        def stalled(kind, ev):
            if kind != "acl":                                       # the ACL stream delivers nothing
                real(kind, ev)
        cat._event = stalled                                        # noqa: SLF001
        await exports.remove_acl(ctx, "v", H1)                      # revoked in etcd

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3 * BOUND
        while loop.time() < deadline and cat.synced and cat.lun_access(iqn, H1, vol.lun) is not None:
            await asyncio.sleep(0.05)
        assert not cat.synced or cat.lun_access(iqn, H1, vol.lun) is None, \
            "the revoked initiator is still served by a mirror counted as current"
    finally:
        stop.set()
        await cat.close()


async def test_a_busy_section_whose_watch_delivers_stays_current(etcd_client, etcd_config):
    """Events committed just before a probe and delivered just after it are waited for, not
    taken for a stall: ACLs added and removed all along, the catalog never goes stale."""
    ctx = make_ctx(etcd_client, etcd_config)
    await register_chunk(ctx, "c0")
    stop = asyncio.Event()
    cat = Catalog(etcd_client, ctx.keys, stale_after=BOUND)
    went_stale: list[bool] = []
    cat.on_stale(went_stale.append)
    await cat.start(stop)
    try:
        await volumes.create_volume(ctx, "v", "1Gi", 1)
        loop = asyncio.get_running_loop()
        deadline, i = loop.time() + 3 * BOUND, 0
        while loop.time() < deadline:
            ini = f"iqn.2004-10.com.example:churn{i % 5}"
            await exports.add_acl(ctx, "v", ini)
            await exports.remove_acl(ctx, "v", ini)
            i += 1
        assert went_stale == [] and cat.synced
    finally:
        stop.set()
        await cat.close()
