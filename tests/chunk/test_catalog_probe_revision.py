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

from meta import exports, volumes
from tests.chunk.catalog_setup import H1, acl_mirrored, churn_acls, running_catalog, stall

BOUND = 1.0


async def test_a_stalled_open_acl_watch_does_not_keep_a_revoked_acl_served(etcd_client, etcd_config):
    async with running_catalog(etcd_client, etcd_config, BOUND) as (ctx, cat, _):
        vol, iqn = await acl_mirrored(ctx, cat)
        stall(cat, "acl")                                           # the ACL stream delivers nothing
        await exports.remove_acl(ctx, "v", H1)                      # revoked in etcd

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3 * BOUND
        while loop.time() < deadline and cat.synced and cat.lun_access(iqn, H1, vol.lun) is not None:
            await asyncio.sleep(0.05)
        assert not cat.synced or cat.lun_access(iqn, H1, vol.lun) is None, \
            "the revoked initiator is still served by a mirror counted as current"


async def test_a_busy_section_whose_watch_delivers_stays_current(etcd_client, etcd_config):
    """Events committed just before a probe and delivered just after it are waited for, not
    taken for a stall: ACLs added and removed all along, the catalog never goes stale."""
    async with running_catalog(etcd_client, etcd_config, BOUND) as (ctx, cat, went_stale):
        await volumes.create_volume(ctx, "v", "1Gi", 1)
        await churn_acls(ctx, 3 * BOUND)
        assert went_stale == [] and cat.synced
