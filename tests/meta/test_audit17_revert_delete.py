"""Revert racing a delete of its volume, against a real etcd.

A revert that read the volume live before another meta server deleted it (kept as a
tombstone for its snapshots) must not hand a revert of the deleted volume to a chunk
server and answer it as done: it answers 404, and leaves no op behind.
"""

import pytest

from meta import volops, volumes
from tests.meta.helpers import make_ctx, register_zones
from zstore.errors import NotFound
from zstore.records import Volume, VolumeOp


@pytest.fixture
async def ctx(etcd_client, etcd_config):
    return await register_zones(make_ctx(etcd_client, etcd_config), {"c0": "a", "c1": "b", "c2": "c"})


async def test_a_revert_whose_volume_is_deleted_after_it_read_it_makes_no_op(ctx, monkeypatch):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    await volops.create_snapshot(ctx, "v", "s")
    real_resolve, raced = volops._revert_snapshot, []

    async def resolve_then_delete(c, v, ref):
        snap = await real_resolve(c, v, ref)
        raced.append(await volumes.delete_volume(c, "v"))       # another meta server's delete
        return snap

    monkeypatch.setattr(volops, "_revert_snapshot", resolve_then_delete)
    with pytest.raises(NotFound, match="deleted"):
        await volops.revert_volume(ctx, "v", "s", timeout=1)
    assert raced == [vol.volume_id]
    tomb, _ = await ctx.get(ctx.keys.volume(vol.volume_id), Volume)
    assert tomb is not None and tomb.state == "deleted"             # kept for its snapshot
    assert [op for _, op in await ctx.list(ctx.keys.volops(vol.volume_id), VolumeOp)] == []
    # Nothing holds the snapshot any more: it deletes, and the volume goes with it.
    await volumes.delete_snapshot_by_id(ctx, (await volumes.list_snapshots(ctx))[0].snapshot_id)
    assert (await ctx.get(ctx.keys.volume(vol.volume_id), Volume))[0] is None
