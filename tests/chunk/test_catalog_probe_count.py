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

from meta import exports, volumes
from tests.chunk.catalog_setup import H1, acl_mirrored, churn_acls, running_catalog, stall
from tests.cluster import async_wait_for

BOUND = 1.0


async def test_an_acl_revoked_on_a_watch_stalled_inside_etcd_is_listed_afresh(etcd_client, etcd_config):
    async with running_catalog(etcd_client, etcd_config, BOUND) as (ctx, cat, _):
        vol, iqn = await acl_mirrored(ctx, cat)
        stall(cat, "acl", progress=True)
        await exports.remove_acl(ctx, "v", H1)                      # revoked in etcd
        # Old code: the markers kept the mirror confirmed and the entry served, indefinitely.
        await async_wait_for(lambda: cat.lun_access(iqn, H1, vol.lun) is None, 3 * BOUND,
                             "the revoked ACL entry dropped by a fresh listing")
        assert cat.miscounted >= 1
        await async_wait_for(lambda: cat.synced, 3 * BOUND, "the catalog current again")


async def test_a_chap_record_added_on_a_watch_stalled_inside_etcd_is_listed_afresh(etcd_client, etcd_config):
    async with running_catalog(etcd_client, etcd_config, BOUND) as (ctx, cat, _):
        await volumes.create_volume(ctx, "v", "1Gi", 1)
        iqn = (await exports.list_targets(ctx))[0]["iqn"]
        stall(cat, "chap", progress=True)
        await exports.set_chap(ctx, {"target": "*", "initiator": H1, "user": "u",
                                     "secret": "new-secret-456"})      # now required
        await async_wait_for(lambda: cat.chap_for(iqn, H1) is not None, 3 * BOUND,
                             "the new CHAP record picked up by a fresh listing")


async def test_churn_on_a_healthy_catalog_neither_relists_nor_goes_stale(etcd_client, etcd_config):
    """Keys created and deleted all along (each probe's counts race the events): the counts
    are asked again as the mirror moves, so no section is relisted and logins stay allowed."""
    async with running_catalog(etcd_client, etcd_config, BOUND) as (ctx, cat, went_stale):
        await volumes.create_volume(ctx, "v", "1Gi", 1)
        confirmed = cat._confirmed                                  # noqa: SLF001
        await churn_acls(ctx, 3 * BOUND)
        assert went_stale == [] and cat.synced
        assert cat.miscounted == 0
        assert cat._confirmed > confirmed, "never confirmed during the churn"   # noqa: SLF001
