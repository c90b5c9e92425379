"""A snapshot left ``creating`` with no op, against a real etcd.

If the meta server that created the snapshot record dies before it made the op (or
committed it), and nobody repeats the create, the snapshot stays ``creating`` for ever: its
name stays taken, and a deleted volume under it is never reclaimed. The garbage collection
now removes such a snapshot once it is far older than any live create waits; never one
whose op exists, nor one waiting for its volume's revert, and a commit racing the removal
either wins (the snapshot is ready) or loses (it is gone), never half of each.
"""

import time

import pytest

from meta import volops, volumes
from tests.meta.helpers import Executor, make_ctx, own, register_zones
from zstore.errors import Unavailable
from zstore.records import Snapshot, Volume, VolumeOp

LONG_AGO = 3600.0               # far past the age a stranded snapshot is removed at (600 s)


class MetaDied(Exception):
    """The meta server serving the create stops after the snapshot record's txn."""


@pytest.fixture
async def ctx(etcd_client, etcd_config):
    return await register_zones(make_ctx(etcd_client, etcd_config), {"c0": "a", "c1": "b", "c2": "c"})


async def _stranded(ctx, monkeypatch, volume, name, ago=LONG_AGO, unique=False):
    """A ``creating`` snapshot with no op, made ``ago`` seconds back (the record as the create's
    first txn wrote it, its clock set back)."""
    async def die(*_):
        raise MetaDied()

    with monkeypatch.context() as m:
        m.setattr(volops, "_finish", die)
        with pytest.raises(MetaDied):
            await volops.create_snapshot(ctx, volume, name, unique=unique)
    vol, _ = await volumes.find_volume(ctx, volume)
    sid = (await ctx.get_raw(ctx.keys.snapshot_name(vol.volume_id, name))).decode()
    snap, _ = await ctx.get(ctx.keys.snapshot(sid), Snapshot)
    assert snap.state == "creating"
    snap.created = time.time() - ago
    await ctx.etcd.put(ctx.keys.snapshot(sid), snap.encode())
    return snap


async def _snapshot(ctx, sid):
    return (await ctx.get(ctx.keys.snapshot(sid), Snapshot))[0]


async def test_a_stranded_snapshot_is_removed_and_its_deleted_volume_reclaimed(ctx, monkeypatch):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    old = await _stranded(ctx, monkeypatch, "v", "old", unique=True)
    young = await _stranded(ctx, monkeypatch, "v", "young", ago=5)
    await volumes.delete_volume(ctx, "v")                         # a tombstone, for both
    await volumes.collect_garbage(ctx)
    assert await _snapshot(ctx, old.snapshot_id) is None
    assert await ctx.get_raw(ctx.keys.snapshot_name(vol.volume_id, "old")) is None
    assert await ctx.get_raw(ctx.keys.snapshot_unique_name("old")) is None
    assert (await _snapshot(ctx, young.snapshot_id)).state == "creating"     # a live create may drive it
    assert (await ctx.get(ctx.keys.volume(vol.volume_id), Volume))[0] is not None
    # Once the young one is stranded long enough too, the volume goes with it.
    young.created = time.time() - LONG_AGO
    await ctx.etcd.put(ctx.keys.snapshot(young.snapshot_id), young.encode())
    await volumes.collect_garbage(ctx)
    assert await _snapshot(ctx, young.snapshot_id) is None
    assert (await ctx.get(ctx.keys.volume(vol.volume_id), Volume))[0] is None


async def test_the_name_of_a_removed_stranded_snapshot_can_be_used_again(ctx, monkeypatch):
    await volumes.create_volume(ctx, "v", "1Gi", 3)
    old = await _stranded(ctx, monkeypatch, "v", "s", unique=True)
    await volumes.collect_garbage(ctx)
    snap, created = await volops.create_snapshot(ctx, "v", "s", unique=True)
    assert created and snap.snapshot_id != old.snapshot_id and snap.state == "ready"


async def test_a_creating_snapshot_whose_op_exists_is_never_touched(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    await own(ctx, vol.volume_id, "c0")
    with pytest.raises(Unavailable):
        await volops.create_snapshot(ctx, "v", "s", timeout=0.2)   # its op waits for c0
    [(sid, snap)] = [(s.snapshot_id, s) for s in await volumes.list_snapshots(ctx, "v")]
    snap.created = time.time() - LONG_AGO
    await ctx.etcd.put(ctx.keys.snapshot(sid), snap.encode())
    await volumes.collect_garbage(ctx)
    await volops.tidy_ops(ctx, now=time.time() + LONG_AGO)
    assert (await _snapshot(ctx, sid)).state == "creating"
    [op] = [op for _, op in await ctx.list(ctx.keys.volops(vol.volume_id), VolumeOp)]
    assert (op.kind, op.state) == ("snapshot", "pending")
    async with Executor(ctx, "c0"):
        done, _ = await volops.create_snapshot(ctx, "v", "s", timeout=5)
    assert done.snapshot_id == sid and done.state == "ready"


async def test_a_creating_snapshot_waiting_for_a_revert_is_kept(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    await volops.create_snapshot(ctx, "v", "base")
    with pytest.raises(Unavailable):
        await volops.revert_volume(ctx, "v", "base", timeout=0.2)   # pending: no executor runs
    with pytest.raises(Unavailable, match="waits for a revert"):
        await volops.create_snapshot(ctx, "v", "s", timeout=0.2)   # creating, no op
    snap = await volumes.snapshot_named(ctx, "v", "s")
    snap.created = time.time() - LONG_AGO
    await ctx.etcd.put(ctx.keys.snapshot(snap.snapshot_id), snap.encode())
    await volumes.collect_garbage(ctx)
    assert (await _snapshot(ctx, snap.snapshot_id)).state == "creating"


async def test_a_commit_racing_the_removal_wins_it(ctx, monkeypatch):
    """The create is repeated (no coordinator: the meta commits the snapshot) after the
    collection read the stranded snapshot and before its removal commits: the removal fails
    its compare and the snapshot stays, ready, with its name."""
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    stranded = await _stranded(ctx, monkeypatch, "v", "s")
    real_removal, committed = volumes.creating_snapshot_removal, []

    async def commit_then_removal(c, snap, srev):
        committed.append((await volops.create_snapshot(c, "v", "s"))[0])
        return await real_removal(c, snap, srev)

    monkeypatch.setattr(volumes, "creating_snapshot_removal", commit_then_removal)
    await volumes.collect_garbage(ctx)
    assert [s.snapshot_id for s in committed] == [stranded.snapshot_id]
    snap = await _snapshot(ctx, stranded.snapshot_id)
    assert snap.state == "ready" and snap.seq == 1
    assert await volumes.snapshot_named(ctx, "v", "s") == snap


async def test_an_op_record_that_does_not_decode_does_not_stop_the_collection(ctx, monkeypatch):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    stranded = await _stranded(ctx, monkeypatch, "v", "s")
    await ctx.etcd.put(ctx.keys.volop(vol.volume_id, "garbled"), b"{}")
    await volumes.collect_garbage(ctx)
    assert await _snapshot(ctx, stranded.snapshot_id) is None
