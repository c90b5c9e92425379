"""Snapshot exports and the volume record, against a real etcd.

Since 8df3435 ``export_snapshot`` put the volume record back unchanged, so that a volume
delete which listed the exports before it failed its compare on the volume and looked again.
Every export of one of a volume's snapshots then moved the volume record's revision, which the
coordinator's snapshot commit compares (8 attempts, then the snapshot fails): heavy export
churn on one volume could exhaust them. The export now moves the volume's name key instead
(written only by the volume's create and delete), which the delete compares as well.
"""

import pytest

from meta import snapshot_exports, volops, volumes
from tests.meta.helpers import make_ctx, own, register_zones
from zstore.errors import Conflict, Unavailable
from zstore.records import Snapshot, Volume, VolumeOp, VolumeOwner

ATTEMPTS = 8                    # the coordinator's (chunk/storage/coordinator.py _commit_snapshot)


@pytest.fixture
async def ctx(etcd_client, etcd_config):
    return await register_zones(make_ctx(etcd_client, etcd_config), {"c0": "a", "c1": "b", "c2": "c"})


async def _volume_with_snapshots(ctx, count):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    for i in range(count):
        await volops.create_snapshot(ctx, "v", f"s{i}")
    return vol


async def test_exporting_and_unexporting_leaves_the_volume_record_alone(ctx):
    vol = await _volume_with_snapshots(ctx, 3)
    before = (await ctx.etcd.get(ctx.keys.volume(vol.volume_id))).mod_revision
    for i in range(3):
        await snapshot_exports.export_snapshot(ctx, f"v@s{i}")
        await snapshot_exports.unexport_snapshot(ctx, f"v@s{i}")
        await snapshot_exports.export_snapshot(ctx, f"v@s{i}")
    assert (await ctx.get(ctx.keys.volume(vol.volume_id), Volume))[1] == before
    assert len(await snapshot_exports.exported_slots(ctx)) == 3


async def test_a_coordinator_commit_is_not_starved_by_export_churn(ctx):
    """The coordinator's commit, as chunk/storage/coordinator.py makes it: read the volume,
    then one txn comparing the owner, the volume, the snapshot and the op, 8 attempts. An
    export and an unexport of another snapshot land between each read and its txn."""
    vol = await _volume_with_snapshots(ctx, 1)
    vid = vol.volume_id
    await own(ctx, vid, "c0")
    with pytest.raises(Unavailable):
        await volops.create_snapshot(ctx, "v", "new", timeout=0.2)      # its op waits for c0
    snap = await volumes.snapshot_named(ctx, "v", "new")
    t = ctx.etcd.transactions
    okey, vkey, skey = ctx.keys.owner(vid), ctx.keys.volume(vid), ctx.keys.snapshot(snap.snapshot_id)
    op_key = ctx.keys.volop(vid, volumes.snapshot_op_id(snap.snapshot_id))
    for attempt in range(ATTEMPTS):
        _, orev = await ctx.get(okey, VolumeOwner)
        v, vrev = await ctx.get(vkey, Volume)
        s, srev = await ctx.get(skey, Snapshot)
        op, op_rev = await ctx.get(op_key, VolumeOp)
        await snapshot_exports.export_snapshot(ctx, "v@s0")           # the churn
        await snapshot_exports.unexport_snapshot(ctx, "v@s0")
        s.seq, s.state = v.snap_seq, "ready"
        v.snap_seq += 1
        op.state = "done"
        ok, _ = await ctx.etcd.transaction(
            compare=[t.mod(okey) == orev, t.mod(vkey) == vrev, t.mod(skey) == srev, t.mod(op_key) == op_rev],
            success=[t.put(vkey, v.encode()), t.put(skey, s.encode()), t.put(op_key, op.encode())], failure=[])
        if ok:
            break
    else:
        pytest.fail(f"the snapshot commit lost all {ATTEMPTS} attempts to the export churn")
    assert (await volumes.snapshot_named(ctx, "v", "new")).state == "ready"


async def test_an_export_made_after_the_delete_listed_the_exports_goes_with_the_volume(ctx, monkeypatch):
    """What the volume's put protected: the delete read no export, one is made before it
    commits; the delete's compare fails, it looks again and takes the export along (the
    collection after the delete, which would drop it as an orphan anyway, is left out)."""
    vol = await _volume_with_snapshots(ctx, 1)
    real_state, raced = snapshot_exports.export_state, []

    async def state_then_export(c, sid):
        got = await real_state(c, sid)
        if not raced:                       # the delete read s0 unexported
            raced.append(True)
            await snapshot_exports.export_snapshot(c, sid)
        return got

    async def no_collection(*_):
        pass

    monkeypatch.setattr(snapshot_exports, "export_state", state_then_export)
    monkeypatch.setattr(volumes, "_collect_garbage_after", no_collection)
    assert await volumes.delete_volume(ctx, "v") == vol.volume_id
    assert raced
    assert await snapshot_exports.exported_slots(ctx) == {}
    assert (await ctx.get(ctx.keys.volume(vol.volume_id), Volume))[0].state == "deleted"


async def test_an_export_racing_the_delete_of_its_volume_is_refused(ctx, monkeypatch):
    """The export read the volume live; the volume is deleted before the export commits: the
    export fails its compare and, looking again, refuses (no export of a deleted volume)."""
    await _volume_with_snapshots(ctx, 1)
    sid = (await volumes.snapshot_named(ctx, "v", "s0")).snapshot_id
    real_state, raced = snapshot_exports.export_state, []

    async def state_then_delete(c, sid):
        got = await real_state(c, sid)
        if not raced:
            raced.append(True)
            await volumes.delete_volume(c, "v")
        return got

    async def no_collection(*_):
        pass

    monkeypatch.setattr(snapshot_exports, "export_state", state_then_delete)
    monkeypatch.setattr(volumes, "_collect_garbage_after", no_collection)
    with pytest.raises(Conflict, match="deleted volume"):
        await snapshot_exports.export_snapshot(ctx, sid)            # by id: CSI's way
    assert raced and await snapshot_exports.exported_slots(ctx) == {}
