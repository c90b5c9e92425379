"""The catalog's "confirmed current" probe and a watch stalled INSIDE etcd while its stream
flows (chunk/catalog.py).

etcd 3.4 (installed here) answers a watch progress request with its store revision whatever
the state of each watch inside it: a watch stalled there gets the progress marker though it
holds back events, so its section looked caught up and the mirror was confirmed current
while serving a revoked ACL entry. Now the probe also compares each section's key count with
etcd's (count-only ranges at the revision the section's mirror is at) and lists a section
that disagrees afresh.

The stall is simulated as in test_catalog_probe_inplace.py, but only the section's events
are dropped before the mirror: its progress markers still arrive (a stream that flows).
"""

from __future__ import annotations

import asyncio

from chunk.catalog import Catalog
from meta import exports, volumes
from tests.cluster import async_wait_for
from tests.meta.helpers import make_ctx, register_chunk
from zstore import etcd as zetcd

H1 = "iqn.2004-10.com.example:h1"
BOUND = 1.0


def _stall_events(cat: Catalog, section: str) -> None:
    """From now on ``section``'s watch delivers no event, but its progress markers go on."""
    real = cat._event                                               # noqa: SLF001

    def event(kind, ev):
        if kind != section or isinstance(ev, zetcd.Progress):
            real(kind, ev)
    cat._event = event                                              # noqa: SLF001


async def _started(etcd_client, etcd_config):
    ctx = make_ctx(etcd_client, etcd_config)
    await register_chunk(ctx, "c0")
    stop = asyncio.Event()
    cat = Catalog(etcd_client, ctx.keys, stale_after=BOUND)
    went_stale: list[bool] = []
    cat.on_stale(went_stale.append)
    await cat.start(stop)
    return ctx, cat, stop, went_stale


async def test_an_acl_revoked_on_a_watch_stalled_inside_etcd_is_listed_afresh(etcd_client, etcd_config):
    ctx, cat, stop, _ = await _started(etcd_client, etcd_config)
    try:
        vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 1)
        iqn = (await exports.list_targets(ctx))[0]["iqn"]
        await exports.add_acl(ctx, "v", H1)
        await async_wait_for(lambda: cat.lun_access(iqn, H1, vol.lun), 5, "ACL mirrored")
        _stall_events(cat, "acl")
        await exports.remove_acl(ctx, "v", H1)                      # revoked in etcd
        # Old code: the markers kept the mirror confirmed and the entry served, indefinitely.
        await async_wait_for(lambda: cat.lun_access(iqn, H1, vol.lun) is None, 3 * BOUND,
                             "the revoked ACL entry dropped by a fresh listing")
        assert cat.miscounted >= 1
        await async_wait_for(lambda: cat.synced, 3 * BOUND, "the catalog current again")
    finally:
        stop.set()
        await cat.close()


async def test_a_chap_record_added_on_a_watch_stalled_inside_etcd_is_listed_afresh(etcd_client, etcd_config):
    ctx, cat, stop, _ = await _started(etcd_client, etcd_config)
    try:
        await volumes.create_volume(ctx, "v", "1Gi", 1)
        iqn = (await exports.list_targets(ctx))[0]["iqn"]
        _stall_events(cat, "chap")
        await exports.set_chap(ctx, {"target": "*", "initiator": H1, "user": "u",
                                     "secret": "new-secret-456"})      # now required
        await async_wait_for(lambda: cat.chap_for(iqn, H1) is not None, 3 * BOUND,
                             "the new CHAP record picked up by a fresh listing")
    finally:
        stop.set()
        await cat.close()


async def test_churn_on_a_healthy_catalog_neither_relists_nor_goes_stale(etcd_client, etcd_config):
    """Keys created and deleted all along (each probe's counts race the events): the counts
    are asked again as the mirror moves, so no section is relisted and logins stay allowed."""
    ctx, cat, stop, went_stale = await _started(etcd_client, etcd_config)
    try:
        await volumes.create_volume(ctx, "v", "1Gi", 1)
        confirmed = cat._confirmed                                  # noqa: SLF001
        loop = asyncio.get_running_loop()
        deadline, i = loop.time() + 3 * BOUND, 0
        while loop.time() < deadline:
            ini = f"iqn.2004-10.com.example:churn{i % 5}"
            await exports.add_acl(ctx, "v", ini)
            await exports.remove_acl(ctx, "v", ini)
            i += 1
        assert went_stale == [] and cat.synced
        assert cat.miscounted == 0
        assert cat._confirmed > confirmed, "never confirmed during the churn"   # noqa: SLF001
    finally:
        stop.set()
        await cat.close()
