"""Deleting a volume with many exported snapshots, against a real etcd (default --max-txn-ops 128).

The delete dropped every snapshot export (~5 operations each) in the transaction that
deleted the volume: from ~25 exported snapshots on etcd refused it ("too many operations in
txn request") on every try, and the volume could not be deleted at all. The exports are now
dropped each in its own transaction after the volume's, which compares the volume and the guard
of its exports.
"""

import pytest

from meta import exports, snapshot_exports, volops, volumes
from tests.meta.helpers import make_ctx, register_zones
from zstore.errors import Conflict
from zstore.records import Volume

EXPORTS = 30                    # 30 x ~6 operations: past etcd's default 128 in one txn
H1 = "iqn.2004-10.com.example:h1"


@pytest.fixture
async def ctx(etcd_client, etcd_config):
    return await register_zones(make_ctx(etcd_client, etcd_config), {"c0": "a", "c1": "b", "c2": "c"})


async def _volume_with_exported_snapshots(ctx, count):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    for i in range(count):
        await volops.create_snapshot(ctx, "v", f"s{i}")
        await snapshot_exports.export_snapshot(ctx, f"v@s{i}")
    assert len(await snapshot_exports.exported_slots(ctx)) == count
    return vol


async def test_a_volume_with_many_exported_snapshots_is_deleted(ctx):
    vol = await _volume_with_exported_snapshots(ctx, EXPORTS)
    assert await volumes.delete_volume(ctx, "v") == vol.volume_id
    tomb, _ = await ctx.get(ctx.keys.volume(vol.volume_id), Volume)
    assert tomb is not None and tomb.state == "deleted"             # kept for its snapshots
    assert await snapshot_exports.exported_slots(ctx) == {}
    assert len(await volumes.list_snapshots(ctx)) == EXPORTS


async def test_without_force_one_initiator_refuses_and_drops_nothing(ctx):
    vol = await _volume_with_exported_snapshots(ctx, EXPORTS)
    await exports.add_snapshot_acl(ctx, f"v@s{EXPORTS - 1}", H1)
    with pytest.raises(Conflict, match="exported to 1 initiator"):
        await volumes.delete_volume(ctx, "v")
    assert (await ctx.get(ctx.keys.volume(vol.volume_id), Volume))[0].state != "deleted"
    assert len(await snapshot_exports.exported_slots(ctx)) == EXPORTS
    # With force the initiator's export goes too.
    assert await volumes.delete_volume(ctx, "v", force=True) == vol.volume_id
    assert await snapshot_exports.exported_slots(ctx) == {}
    assert await snapshot_exports.export_acl(ctx, (await volumes.list_snapshots(ctx))[-1].snapshot_id) == []


async def test_an_initiator_added_before_the_delete_commits_refuses_it_and_drops_nothing(ctx, monkeypatch):
    """The delete found no initiator on any export; before its transaction an initiator is put
    on the last one: that moves the guard of the volume's exports, the delete's compare fails,
    and on its second look it refuses without force, every export intact (a refused delete
    changes nothing: the exports are dropped only after the volume's transaction)."""
    vol = await _volume_with_exported_snapshots(ctx, 3)
    last = max(s.snapshot_id for s in await volumes.list_snapshots(ctx, "v"))     # the delete goes in id order
    real_acl, reads = snapshot_exports.export_acl, []

    async def acl_then_add_initiator(c, sid):
        got = await real_acl(c, sid)
        if sid == last:
            reads.append(got)
            if len(reads) == 1:                 # the delete's check, before its transaction
                await exports.add_snapshot_acl(c, sid, H1)
        return got

    monkeypatch.setattr(snapshot_exports, "export_acl", acl_then_add_initiator)
    with pytest.raises(Conflict, match="exported to 1 initiator"):
        await volumes.delete_volume(ctx, "v")
    assert len(reads) == 2
    assert (await ctx.get(ctx.keys.volume(vol.volume_id), Volume))[0].state != "deleted"
    assert len(await snapshot_exports.exported_slots(ctx)) == 3       # none dropped
    assert [e.initiator for e in await real_acl(ctx, last)] == [H1]
