"""A snapshot left ``creating`` with its op assigned to a chunk server that is gone, against a real etcd.

The create hands the snapshot's op to the volume's coordinator and waits; if that server
dies for good (removed from the cluster, or down and never back) and nobody repeats the
create, the op stays pending and the snapshot ``creating`` for ever: its name stays taken,
and a deleted volume under it is never reclaimed (4653491 only collected a creating snapshot
with no op at all). The garbage collection now also fails such an op and removes its
snapshot, once the snapshot is ``STRANDED_CREATING_AGE`` old and its op's executor has not
been alive for as long (or is not registered any more); never while the executor is alive,
and a commit racing the removal either wins or loses whole.
"""

import time

import pytest

from meta import chunks, volops, volumes
from tests.meta.helpers import Executor, chunk_down, make_ctx, own, register_chunk, register_zones
from zstore.errors import Unavailable
from zstore.records import Snapshot, Volume, VolumeOp

LONG_AGO = 3600.0               # far past STRANDED_CREATING_AGE (600 s)
ZONES = {"c0": "a", "c1": "b", "c2": "c"}


@pytest.fixture
async def ctx(etcd_client, etcd_config):
    return await register_zones(make_ctx(etcd_client, etcd_config), ZONES)


async def _waiting_for(ctx, executor, name="s", ago=LONG_AGO):
    """Volume v (made on the first call) owned by ``executor``; a snapshot of it whose op waits
    for that server (nobody runs it), its record made ``ago`` seconds back."""
    if await ctx.get_raw(ctx.keys.volume_name("v")) is None:
        await volumes.create_volume(ctx, "v", "1Gi", 3)
    vol, _ = await volumes.find_volume(ctx, "v")
    await own(ctx, vol.volume_id, executor)
    with pytest.raises(Unavailable, match="still waiting for the volume's coordinator"):
        await volops.create_snapshot(ctx, "v", name, timeout=0.2)
    snap = await volumes.snapshot_named(ctx, "v", name)
    snap.created = time.time() - ago
    await ctx.etcd.put(ctx.keys.snapshot(snap.snapshot_id), snap.encode())
    op, _ = await ctx.get(_op_key(ctx, snap), VolumeOp)
    assert (op.executor, op.state) == (executor, "pending")
    return vol, snap


def _op_key(ctx, snap):
    return ctx.keys.volop(snap.volume_id, volumes.snapshot_op_id(snap.snapshot_id))


async def _snapshot(ctx, sid):
    return (await ctx.get(ctx.keys.snapshot(sid), Snapshot))[0]


async def _removed(ctx, snap):
    """Whether the collection removed ``snap`` and its names, its op failed (the receipt the
    leader's tidying removes)."""
    if await _snapshot(ctx, snap.snapshot_id) is not None:
        return False
    assert await ctx.get_raw(ctx.keys.snapshot_name(snap.volume_id, snap.name)) is None
    op, _ = await ctx.get(_op_key(ctx, snap), VolumeOp)
    assert op.state == "failed" and "gone" in op.error
    return True


async def test_a_snapshot_whose_executor_was_removed_from_the_cluster_is_removed(ctx):
    vol, snap = await _waiting_for(ctx, "c0")
    await ctx.etcd.delete(ctx.keys.chunk_live("c0"))
    await chunks.remove_chunk(ctx, "c0", force=False)                   # gone for good
    await volumes.delete_volume(ctx, "v")                               # a tombstone, for it
    await volumes.collect_garbage(ctx)
    assert await _snapshot(ctx, snap.snapshot_id) is None
    # The same run reclaims the volume, and its ops (the failed one too) go with it.
    assert (await ctx.get(ctx.keys.volume(vol.volume_id), Volume))[0] is None
    assert await ctx.list_raw(ctx.keys.volops(vol.volume_id)) == []


async def test_a_snapshot_whose_executor_is_down_past_the_grace_is_removed_and_its_name_freed(ctx):
    await _waiting_for(ctx, "c0", ago=5)                                   # young: kept below
    _, old = await _waiting_for(ctx, "c0", name="old")
    await chunk_down(ctx, "c0", ago=LONG_AGO)
    await volumes.collect_garbage(ctx)
    assert await _removed(ctx, old)
    assert (await volumes.snapshot_named(ctx, "v", "s")).state == "creating"
    later = time.time() + volops.FINISHED_OP_TTL + 1                     # the failed op, a receipt
    assert await volops.tidy_ops(ctx, now=later) == [volumes.snapshot_op_id(old.snapshot_id)]
    await own(ctx, (await volumes.find_volume(ctx, "v"))[0].volume_id, "c1")
    async with Executor(ctx, "c1"):
        again, created = await volops.create_snapshot(ctx, "v", "old", timeout=5)
    assert created and again.snapshot_id != old.snapshot_id and again.state == "ready"


async def test_a_snapshot_whose_executor_is_alive_or_down_only_lately_is_kept(ctx):
    _, snap = await _waiting_for(ctx, "c0")
    await volumes.collect_garbage(ctx)                                  # c0 is alive
    assert (await _snapshot(ctx, snap.snapshot_id)).state == "creating"
    await chunk_down(ctx, "c0", ago=5)                                  # down, but not for long
    await volumes.collect_garbage(ctx)
    assert (await _snapshot(ctx, snap.snapshot_id)).state == "creating"
    await ctx.etcd.delete(ctx.keys.chunk_admin("c0"))                   # down, no outage recorded yet
    await volumes.collect_garbage(ctx)
    assert (await _snapshot(ctx, snap.snapshot_id)).state == "creating"
    op, _ = await ctx.get(_op_key(ctx, snap), VolumeOp)
    assert op.state == "pending"


async def test_a_claimed_op_of_a_dead_executor_goes_too(ctx):
    _, snap = await _waiting_for(ctx, "c0")
    op, _ = await ctx.get(_op_key(ctx, snap), VolumeOp)
    op.state, op.claim_epoch = "running", 1
    await ctx.etcd.put(_op_key(ctx, snap), op.encode())
    await chunk_down(ctx, "c0", ago=LONG_AGO)
    await volumes.collect_garbage(ctx)
    assert await _removed(ctx, snap)


async def test_an_executor_back_before_the_removal_commits_keeps_it(ctx, monkeypatch):
    _, snap = await _waiting_for(ctx, "c0")
    await chunk_down(ctx, "c0", ago=LONG_AGO)
    real_removal, back = volumes.creating_snapshot_removal, []

    async def back_then_removal(c, s, srev):
        back.append(True)
        await register_chunk(c, "c0", labels={"zone": "a"})             # live again
        return await real_removal(c, s, srev)

    monkeypatch.setattr(volumes, "creating_snapshot_removal", back_then_removal)
    await volumes.collect_garbage(ctx)
    assert back and (await _snapshot(ctx, snap.snapshot_id)).state == "creating"
    op, _ = await ctx.get(_op_key(ctx, snap), VolumeOp)
    assert op.state == "pending"


async def test_a_create_repeated_before_the_removal_commits_keeps_it(ctx, monkeypatch):
    """The create is repeated between the collection's read and its removal: it hands the op
    to the volume's coordinator now live (c1); the removal fails its compare on the op."""
    vol, snap = await _waiting_for(ctx, "c0")
    await chunk_down(ctx, "c0", ago=LONG_AGO)
    real_removal, repeated = volumes.creating_snapshot_removal, []

    async def repeat_then_removal(c, s, srev):
        repeated.append(True)
        await own(c, vol.volume_id, "c1", epoch=2)
        with pytest.raises(Unavailable, match="coordinator on chunk server c1"):
            await volops.create_snapshot(c, "v", "s", timeout=0.2)
        return await real_removal(c, s, srev)

    monkeypatch.setattr(volumes, "creating_snapshot_removal", repeat_then_removal)
    await volumes.collect_garbage(ctx)
    assert repeated and (await _snapshot(ctx, snap.snapshot_id)).state == "creating"
    op, _ = await ctx.get(_op_key(ctx, snap), VolumeOp)
    assert (op.executor, op.state) == ("c1", "pending")


async def test_a_commit_racing_the_removal_wins_it_and_one_after_it_fails(ctx, monkeypatch):
    """The coordinator on c0 (its lease lapsed, the process still running) commits the
    snapshot between the collection's read and its removal: the removal fails its compare.
    A commit after the removal fails its own (the op is no longer the one it read)."""
    _, snap = await _waiting_for(ctx, "c0")
    await chunk_down(ctx, "c0", ago=LONG_AGO)
    real_removal, committed = volumes.creating_snapshot_removal, []
    op_key = _op_key(ctx, snap)

    async def commit_then_removal(c, s, srev):
        op, op_rev = await c.get(op_key, VolumeOp)
        ex = Executor(c, "c0")
        await ex.execute(op, op_key, op_rev)
        committed.extend(ex.ran)
        return await real_removal(c, s, srev)

    with monkeypatch.context() as m:
        m.setattr(volumes, "creating_snapshot_removal", commit_then_removal)
        await volumes.collect_garbage(ctx)
    assert len(committed) == 1
    assert (await _snapshot(ctx, snap.snapshot_id)).state == "ready"

    vol, late = await _waiting_for(ctx, "c1", name="late")
    await chunk_down(ctx, "c1", ago=LONG_AGO)
    late_key, skey, vkey = _op_key(ctx, late), ctx.keys.snapshot(late.snapshot_id), ctx.keys.volume(vol.volume_id)
    op, op_rev = await ctx.get(late_key, VolumeOp)                      # read before the removal
    s, srev = await ctx.get(skey, Snapshot)
    v, vrev = await ctx.get(vkey, Volume)
    await volumes.collect_garbage(ctx)
    assert await _removed(ctx, late)
    t = ctx.etcd.transactions
    s.seq, s.state, op.state = v.snap_seq, "ready", "done"
    v.snap_seq += 1
    ok, _ = await ctx.etcd.transaction(                                  # the coordinator's commit
        compare=[t.mod(vkey) == vrev, t.mod(skey) == srev, t.mod(late_key) == op_rev],
        success=[t.put(vkey, v.encode()), t.put(skey, s.encode()), t.put(late_key, op.encode())], failure=[])
    assert not ok and await _snapshot(ctx, late.snapshot_id) is None
