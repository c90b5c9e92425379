"""The recovery scheduler against a real etcd: one ``step`` at a time, with a chosen clock."""

import time

import pytest

from meta import chunks, extents, recovery, volumes
from meta.recovery import Recovery
from tests.meta.helpers import make_ctx, register_chunk
from zstore.records import ChunkAdmin, ExtentRecord, RecoveryTask, VolumeOwner

GRACE = 60.0
ZONES = {"c0": "a", "c1": "b", "c2": "c", "c3": "d", "c4": "a"}


@pytest.fixture
async def ctx(etcd_client, etcd_config):
    c = make_ctx(etcd_client, etcd_config)
    for cid, zone in ZONES.items():
        await register_chunk(c, cid, labels={"zone": zone})
    return c


async def down(ctx, cid, ago: float = 0.0):
    """The chunk server's lease is gone and the leader recorded it ``ago`` seconds back."""
    await ctx.etcd.delete(ctx.keys.chunk_live(cid))
    admin, _ = await ctx.get(ctx.keys.chunk_admin(cid), ChunkAdmin)
    admin = admin or ChunkAdmin(chunk_id=cid)
    admin.down_since = time.time() - ago
    await ctx.etcd.put(ctx.keys.chunk_admin(cid), admin.encode())


async def up(ctx, cid):
    await register_chunk(ctx, cid, labels={"zone": ZONES[cid]})
    await chunks.mark_liveness(ctx, cid, True)


async def extent_on(ctx, name, replicas, index=0, size="1Gi"):
    """A volume whose extent ``index`` lives on exactly ``replicas``."""
    try:
        vol, _ = await volumes.create_volume(ctx, name, size, len(replicas))
    except Exception:
        vol = (await volumes.find_volume(ctx, name))[0]
    rec = ExtentRecord(volume_id=vol.volume_id, index=index, replicas=list(replicas))
    await ctx.etcd.put(ctx.keys.extent(vol.volume_id, index), rec.encode())
    return vol


async def task_of(ctx, vid, index=0):
    return (await ctx.get(ctx.keys.recovery_task(vid, index), RecoveryTask))[0]


async def test_resync_when_a_dropped_chunk_returns(ctx):
    vol = await extent_on(ctx, "v", ["c0", "c1", "c2"])
    vid = vol.volume_id
    await down(ctx, "c0")
    await extents.drop(ctx, vid, 0, "c0", 1, "write timed out")
    rec = Recovery(ctx, grace=GRACE)
    assert (await rec.step())["created"] == []          # within the grace: wait for c0
    assert await task_of(ctx, vid) is None
    await up(ctx, "c0")
    did = await rec.step()
    assert did["created"] == [(vid, 0, "resync", "c0")]
    task = await task_of(ctx, vid)
    assert task.kind == "resync" and task.target == "c0" and task.executor == "c0"
    assert task.generation == 2 and task.state == "pending" and task.total_bytes == extents.EXTENT_SIZE
    assert (await rec.step())["created"] == []          # one task per extent
    # Done: the target joins, which deletes the task; nothing more to do.
    await extents.join(ctx, vid, 0, "c0", 2)
    assert await task_of(ctx, vid) is None
    assert await rec.step() == {"dropped": [], "deleted": [], "reassigned": [], "created": []}


async def test_rebuild_after_the_grace_on_a_distinct_domain(ctx):
    vol = await extent_on(ctx, "v", ["c0", "c1", "c2"])
    vid = vol.volume_id
    await down(ctx, "c1", ago=GRACE + 5)
    await extents.drop(ctx, vid, 0, "c1", 1, "EIO")
    did = await Recovery(ctx, grace=GRACE).step()
    [(_, _, kind, target)] = did["created"]
    assert kind == "rebuild" and target == "c3"           # zone d; c4 shares zone a with c0
    task = await task_of(ctx, vid)
    assert task.executor == "c3"
    rec, _ = await extents.get_extent(ctx, vid, 0)
    assert rec.stale == {} and rec.replicas == ["c0", "c2"]   # the dead copy is forgotten


async def test_draining_or_diskless_stale_chunks_are_rebuilt_at_once(ctx):
    vol = await extent_on(ctx, "v", ["c0", "c1", "c2"])
    w = await extent_on(ctx, "w", ["c0", "c1", "c2"])
    await extents.drop(ctx, vol.volume_id, 0, "c1", 1, "test")
    await extents.drop(ctx, w.volume_id, 0, "c2", 1, "test")
    await chunks.set_admin_state(ctx, "c1", "draining")
    await register_chunk(ctx, "c2", labels={"zone": "c"}, used=100 * 2**30)   # its disk is full
    did = await Recovery(ctx, grace=GRACE).step()
    assert sorted((k, t) for _, _, k, t in did["created"]) == [("rebuild", "c3"), ("rebuild", "c3")]


async def test_replicas_of_a_long_dead_chunk_are_dropped_by_the_loop(ctx):
    vol = await extent_on(ctx, "v", ["c0", "c1", "c2"])
    alone = await extent_on(ctx, "alone", ["c1"])
    vid = vol.volume_id
    await down(ctx, "c1", ago=10)
    rec = Recovery(ctx, grace=GRACE)
    assert (await rec.step())["dropped"] == []            # not yet past the grace
    did = await rec.step(now=time.time() + GRACE)
    assert did["dropped"] == [(vid, 0, "c1")]
    got, _ = await extents.get_extent(ctx, vid, 0)
    assert got.replicas == ["c0", "c2"] and got.generation == 2
    assert did["created"] == [(vid, 0, "rebuild", "c3")]
    # The last copy of an extent is never dropped, even on a dead server.
    lone, _ = await extents.get_extent(ctx, alone.volume_id, 0)
    assert lone.replicas == ["c1"] and lone.generation == 1


async def test_no_replica_is_dropped_while_every_replica_server_is_down(ctx):
    """Both servers of a 2-replica extent are down, one past the grace: dropping it would keep
    the other as the only in-sync copy, and if that one never returns while the dropped one
    does, nothing could bring the extent back. Nothing is dropped until a server is up again;
    then the dead one goes as usual."""
    vol = await extent_on(ctx, "v", ["c0", "c1"])
    vid = vol.volume_id
    await down(ctx, "c0", ago=GRACE * 2)
    await down(ctx, "c1", ago=10)
    rec = Recovery(ctx, grace=GRACE)
    assert (await rec.step())["dropped"] == []
    got, _ = await extents.get_extent(ctx, vid, 0)
    assert got.replicas == ["c0", "c1"] and got.generation == 1
    await up(ctx, "c1")
    assert (await rec.step())["dropped"] == [(vid, 0, "c0")]


async def test_fewest_replicas_first_and_concurrency(ctx):
    a = await extent_on(ctx, "a", ["c0", "c1", "c2"])
    b = await extent_on(ctx, "b", ["c0", "c1", "c2"])
    c = await extent_on(ctx, "c", ["c0", "c1", "c2"])
    await extents.drop(ctx, a.volume_id, 0, "c1", 1, "test")
    await extents.drop(ctx, b.volume_id, 0, "c1", 1, "test")
    await extents.drop(ctx, b.volume_id, 0, "c2", 2, "test")
    await extents.drop(ctx, c.volume_id, 0, "c1", 1, "test")
    await down(ctx, "c1", ago=GRACE * 2)
    rec = Recovery(ctx, grace=GRACE, concurrency=1)
    did = await rec.step()
    assert did["created"] == [(b.volume_id, 0, "resync", "c2")]      # b has one copy left
    assert (await rec.step())["created"] == []                       # the limit
    status = await recovery.cluster_status(ctx)
    assert status["degraded_extents"] == 3 and len(status["tasks"]) == 1
    assert status["tasks"][0]["volume"] == "b" and status["bytes_total"] == extents.EXTENT_SIZE
    rec.concurrency = 3
    did = await rec.step()
    assert sorted(v for v, *_ in did["created"]) == sorted([a.volume_id, c.volume_id])
    assert {k for _, _, k, _ in did["created"]} == {"rebuild"}
    assert len(await ctx.list_raw(ctx.keys.all_recovery())) == 3


async def test_executor_is_the_live_owner_and_moves_when_it_dies(ctx):
    vol = await extent_on(ctx, "v", ["c0", "c1", "c2"])
    vid = vol.volume_id
    await ctx.etcd.put(ctx.keys.owner(vid), VolumeOwner(volume_id=vid, chunk_id="c2", epoch=3).encode())
    await extents.drop(ctx, vid, 0, "c0", 1, "test")
    await down(ctx, "c0", ago=GRACE * 2)
    rec = Recovery(ctx, grace=GRACE)
    await rec.step()
    task = await task_of(ctx, vid)
    assert task.kind == "rebuild" and task.executor == "c2" and task.target not in ("c0", "c1", "c2")
    # The coordinator made progress, then its server died: the target takes over, progress kept.
    task.done_bytes, task.state = 2**20, "running"
    await ctx.etcd.put(ctx.keys.recovery_task(vid, 0), task.encode())
    await ctx.etcd.delete(ctx.keys.chunk_live("c2"))
    did = await rec.step()
    assert did["reassigned"] == [(vid, 0, task.target)]
    moved = await task_of(ctx, vid)
    assert moved.executor == task.target and moved.state == "pending" and moved.done_bytes == 2**20


async def test_unneeded_tasks_are_deleted(ctx):
    vol = await extent_on(ctx, "v", ["c0", "c1", "c2"])
    vid = vol.volume_id
    await extents.drop(ctx, vid, 0, "c0", 1, "test")
    rec = Recovery(ctx, grace=GRACE)
    await rec.step()
    assert (await task_of(ctx, vid)).target == "c0"
    # The resync target goes down again: the task goes (replanned when it returns or after the grace).
    await down(ctx, "c0")
    assert (await rec.step())["deleted"] == [(vid, 0)]
    # A task whose extent is gone (e.g. written by hand, or left by a crash) goes too.
    await ctx.etcd.put(ctx.keys.recovery_task(vid, 7), RecoveryTask(
        volume_id=vid, index=7, target="c3", kind="rebuild", executor="c3", generation=1).encode())
    assert (await rec.step())["deleted"] == [(vid, 7)]
    # The volume is deleted: its tasks and extents go with the record.
    await up(ctx, "c0")
    await rec.step()
    assert await task_of(ctx, vid) is not None
    await volumes.delete_volume(ctx, "v")
    assert await ctx.list_raw(ctx.keys.all_recovery()) == []


async def test_no_rebuild_without_a_place_for_it(ctx):
    vol = await extent_on(ctx, "v", ["c0", "c1", "c2"])
    for cid in ("c3", "c4"):
        await chunks.set_admin_state(ctx, cid, "draining")
    await extents.drop(ctx, vol.volume_id, 0, "c0", 1, "test")
    await down(ctx, "c0", ago=GRACE * 2)
    assert (await Recovery(ctx, grace=GRACE).step())["created"] == []
    await chunks.set_admin_state(ctx, "c3", "active")
    assert (await Recovery(ctx, grace=GRACE).step())["created"] == [(vol.volume_id, 0, "rebuild", "c3")]


async def test_volume_status_counts_extents_and_tasks(ctx):
    vol = await extent_on(ctx, "v", ["c0", "c1", "c2"], index=0)
    await extent_on(ctx, "v", ["c0", "c1", "c2"], index=5)
    await extents.drop(ctx, vol.volume_id, 5, "c1", 1, "test")
    await Recovery(ctx, grace=GRACE).step()
    st = await recovery.volume_status(ctx, vol)
    assert st["extents"] == {"total": 16, "allocated": 2, "degraded": 1}
    [t] = st["recovery"]["tasks"]
    assert (t["volume"], t["index"], t["kind"], t["target"]) == ("v", 5, "resync", "c1")


async def test_replicas_move_off_a_draining_server_after_degraded_ones(ctx):
    full = await extent_on(ctx, "full", ["c0", "c1", "c2"])
    weak = await extent_on(ctx, "weak", ["c0", "c4", "c3"])
    await extents.drop(ctx, weak.volume_id, 0, "c3", 1, "test")
    await chunks.set_admin_state(ctx, "c1", "draining")
    rec = Recovery(ctx, grace=GRACE, concurrency=1)
    assert [v for v, *_ in (await rec.step())["created"]] == [weak.volume_id]     # degraded first
    rec.concurrency = 2
    did = await rec.step()
    assert did["created"] == [(full.volume_id, 0, "rebuild", "c3")]    # zone d: away from c0's a
    assert (await rec.step())["deleted"] == []                          # needed although full
    # The copy is done: it joins in place of the draining replica, in one change.
    got = await extents.join(ctx, full.volume_id, 0, "c3", 1)
    assert got.replicas == ["c0", "c2", "c3"] and got.generation == 2 and got.stale == {}
    assert await task_of(ctx, full.volume_id) is None
    assert (await rec.step())["created"] == []                          # nothing left to move
    # Without a draining replica a full extent takes no one.
    with pytest.raises(Exception) as e:
        await extents.join(ctx, full.volume_id, 0, "c4", 2)
    assert "already has 3 of 3" in str(e.value)


async def test_a_rebuild_that_keeps_failing_is_placed_again(ctx):
    vol = await extent_on(ctx, "v", ["c0", "c1", "c2"])
    vid = vol.volume_id
    await extents.drop(ctx, vid, 0, "c0", 1, "test")
    await down(ctx, "c0", ago=GRACE * 2)
    rec = Recovery(ctx, grace=GRACE)
    await rec.step()
    task = await task_of(ctx, vid)
    task.error = "NO_SPACE on the target"                # as the executing chunk server records it
    await ctx.etcd.put(ctx.keys.recovery_task(vid, 0), task.encode())
    assert (await rec.step())["deleted"] == []
    assert (await rec.step())["deleted"] == []
    did = await rec.step()
    assert did["deleted"] == [(vid, 0)] and len(did["created"]) == 1    # replanned in the same pass
    assert (await task_of(ctx, vid)).error is None


async def test_a_resync_that_keeps_failing_forgets_the_stale_copy_and_rebuilds(ctx):
    """A returned server whose stale copy cannot be brought back (broken, and too little room
    for a fresh one) failed its resync for ever, planned again onto the same copy each time.
    After a few failed passes the stale copy is forgotten and the extent is rebuilt."""
    vol = await extent_on(ctx, "v", ["c0", "c1", "c2"])
    vid = vol.volume_id
    await extents.drop(ctx, vid, 0, "c0", 1, "test")
    rec = Recovery(ctx, grace=GRACE)
    assert (await rec.step())["created"] == [(vid, 0, "resync", "c0")]
    task = await task_of(ctx, vid)
    task.error = "NO_SPACE on the target"
    await ctx.etcd.put(ctx.keys.recovery_task(vid, 0), task.encode())
    assert (await rec.step())["deleted"] == []
    assert (await rec.step())["deleted"] == []
    assert (await rec.step())["deleted"] == [(vid, 0)]
    got, _ = await extents.get_extent(ctx, vid, 0)
    assert got.stale == {} and got.replicas == ["c1", "c2"]
    did = await rec.step()
    assert [(k, t) for _, _, k, t in did["created"]] == [("rebuild", (await task_of(ctx, vid)).target)]

