"""Deleting a volume with many snapshots, against a real etcd (default --max-txn-ops 128).

The delete compared every snapshot's export pointer in its one transaction: past 127
snapshots etcd refused it ("too many operations in txn request") on every try, and the
volume could not be deleted at all. Now only the exports read are compared; an export made
meanwhile moves the volume's revision instead.
"""

import pytest

from meta import exports, snapshot_exports, volops, volumes
from tests.meta.helpers import make_ctx, register_zones
from zstore.errors import Conflict
from zstore.records import Snapshot, Volume

ETCD_MAX_TXN_OPS = 128          # etcd's default
H1 = "iqn.2004-10.com.example:h1"


@pytest.fixture
async def ctx(etcd_client, etcd_config):
    return await register_zones(make_ctx(etcd_client, etcd_config), {"c0": "a", "c1": "b", "c2": "c"})


async def test_a_volume_with_more_snapshots_than_a_txn_holds_ops_is_deleted(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    count = ETCD_MAX_TXN_OPS + 2
    for i in range(count):
        await volops.create_snapshot(ctx, "v", f"s{i}")
    await snapshot_exports.export_snapshot(ctx, "v@s7")            # one exported: taken along
    assert await volumes.delete_volume(ctx, "v") == vol.volume_id
    tomb, _ = await ctx.get(ctx.keys.volume(vol.volume_id), Volume)
    assert tomb is not None and tomb.state == "deleted"             # kept for its snapshots
    assert await snapshot_exports.exported_slots(ctx) == {}
    snaps = await volumes.list_snapshots(ctx)
    assert len(snaps) == count and {s.volume_id for s in snaps} == {vol.volume_id}


async def test_an_export_made_while_the_delete_reads_fails_its_compare(ctx, monkeypatch):
    """The delete read the snapshot unexported; before it commits the snapshot is exported
    and an initiator put on its ACL: the delete looks again and, without force, refuses."""
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    snap, _ = await volops.create_snapshot(ctx, "v", "s")
    real_state, raced = snapshot_exports.export_state, []

    async def state_then_export(c, sid):
        got = await real_state(c, sid)
        if not raced:
            raced.append(True)
            await snapshot_exports.export_snapshot(c, sid)
            await exports.add_snapshot_acl(c, sid, H1)
        return got

    monkeypatch.setattr(snapshot_exports, "export_state", state_then_export)
    with pytest.raises(Conflict, match="exported to 1 initiator"):
        await volumes.delete_volume(ctx, "v")
    assert raced
    assert (await ctx.get(ctx.keys.volume(vol.volume_id), Volume))[0].state != "deleted"
    assert list(await snapshot_exports.exported_slots(ctx)) == [snap.snapshot_id]
    assert (await ctx.get(ctx.keys.snapshot(snap.snapshot_id), Snapshot))[0].state == "ready"
