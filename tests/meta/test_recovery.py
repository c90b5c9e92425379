"""The recovery scheduler against a real etcd: one ``step`` at a time, with a chosen clock."""

import time

import pytest

from meta import chunks, extents, recovery, volumes
from meta.recovery import Recovery
from tests.meta.helpers import chunk_down as down, make_ctx, register_chunk, register_zones
from zstore.records import ExtentRecord, RecoveryTask, VolumeOwner

GRACE = 60.0
ZONES = {"c0": "a", "c1": "b", "c2": "c", "c3": "d", "c4": "a"}


@pytest.fixture
async def ctx(etcd_client, etcd_config):
    return await register_zones(make_ctx(etcd_client, etcd_config), ZONES)




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
    # The dead copy stays listed while the rebuild is only planned; it goes once c3 has joined.
    assert rec.stale == {"c1": 1} and rec.replicas == ["c0", "c2"]
    await extents.join(ctx, vid, 0, "c3", rec.generation)
    await Recovery(ctx, grace=GRACE).step()
    rec, _ = await extents.get_extent(ctx, vid, 0)
    assert rec.stale == {} and rec.replicas == ["c0", "c2", "c3"]


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
    task.error = "replica on c0: no_space: disk full"     # the target's own failure
    await ctx.etcd.put(ctx.keys.recovery_task(vid, 0), task.encode())
    assert (await rec.step())["deleted"] == []
    assert (await rec.step())["deleted"] == []
    assert (await rec.step())["deleted"] == [(vid, 0)]
    got, _ = await extents.get_extent(ctx, vid, 0)
    assert got.stale == {} and got.replicas == ["c1", "c2"]
    did = await rec.step()
    assert [(k, t) for _, _, k, t in did["created"]] == [("rebuild", (await task_of(ctx, vid)).target)]



# --- extents without a live source; stale copies kept until the extent is whole again ---


async def test_extents_without_a_live_source_leave_the_slots_to_others(ctx):
    """A 2-replica volume whose extents are down to [c0], and c0 dead for good: nothing can be
    copied from them. They used to sort first (fewest listed copies), take every slot with a
    rebuild that could only fail, be deleted after a few passes and planned again in the same
    pass, for ever, while an extent with a live source stayed degraded."""
    dead = await extent_on(ctx, "dead", ["c0", "c1"])
    for index in range(4):
        await extent_on(ctx, "dead", ["c0"], index=index)      # c1 was dropped by the writes
    ok = await extent_on(ctx, "ok", ["c1", "c2", "c3"])
    await extents.drop(ctx, ok.volume_id, 0, "c3", 1, "test")
    await down(ctx, "c3", ago=GRACE * 2)
    await down(ctx, "c0", ago=GRACE * 2)
    # A task planned for one of them before c0 died holds a slot: it goes.
    await ctx.etcd.put(ctx.keys.recovery_task(dead.volume_id, 3), RecoveryTask(
        volume_id=dead.volume_id, index=3, target="c2", kind="rebuild", executor="c2", generation=1,
        error="extent 3: no in-sync replica exports 0+67108864: replica on c0: unavailable").encode())
    rec = Recovery(ctx, grace=GRACE, concurrency=4)
    for _ in range(4):                                    # also past FAILING_PASSES
        did = await rec.step()
        assert all(v == ok.volume_id for v, *_ in did["created"]), did
        if did["created"]:
            break
    assert did["created"] == [(ok.volume_id, 0, "rebuild", "c4")]
    assert did["deleted"] == [(dead.volume_id, 3)]
    assert await task_of(ctx, dead.volume_id, 3) is None
    status = await recovery.cluster_status(ctx)
    assert status["degraded_extents"] == 5                # listed copies: meaning unchanged
    assert status["unavailable_extents"] == 4             # no in-sync copy on an up server
    assert status["degraded_live_extents"] == 5
    # c0 is back: they have a source again and are planned as usual.
    await up(ctx, "c0")
    did = await rec.step()
    assert sorted(i for v, i, *_ in did["created"] if v == dead.volume_id) == [0, 1, 2]
    assert (await recovery.cluster_status(ctx))["unavailable_extents"] == 0


async def test_fewest_live_copies_first(ctx):
    """Two extents each list 2 of 3 replicas; one of them has only one on an up server (the
    other's is down, within the grace): it goes first, whatever the order of their keys."""
    vol = await extent_on(ctx, "v", ["c2", "c3", "c4"], index=0)
    vid = vol.volume_id
    await ctx.etcd.put(ctx.keys.extent(vid, 0), ExtentRecord(
        volume_id=vid, index=0, replicas=["c2", "c3"]).encode())
    await ctx.etcd.put(ctx.keys.extent(vid, 1), ExtentRecord(
        volume_id=vid, index=1, replicas=["c0", "c1"]).encode())
    await ctx.etcd.put(ctx.keys.extent(vid, 2), ExtentRecord(
        volume_id=vid, index=2, replicas=["c1", "c2", "c3"]).encode())
    await down(ctx, "c0", ago=1)                          # within the grace: not dropped
    did = await Recovery(ctx, grace=GRACE, concurrency=1).step()
    assert [(v, i) for v, i, *_ in did["created"]] == [(vid, 1)]
    assert did["dropped"] == []
    status = await recovery.cluster_status(ctx)
    assert status["degraded_extents"] == 2 and status["degraded_live_extents"] == 2
    assert status["unavailable_extents"] == 0
    await down(ctx, "c1", ago=1)
    status = await recovery.cluster_status(ctx)
    assert status["degraded_extents"] == 2 and status["degraded_live_extents"] == 3
    assert status["unavailable_extents"] == 1


async def test_a_resync_failing_on_its_source_keeps_the_stale_copy(ctx):
    """Only a failure of the target itself makes a resync give up its stale copy: when the
    sources fail (unreachable, unreadable), the stale copy is as good as before."""
    vol = await extent_on(ctx, "v", ["c0", "c1", "c2"])
    vid = vol.volume_id
    await extents.drop(ctx, vid, 0, "c0", 1, "test")
    rec = Recovery(ctx, grace=GRACE)
    assert (await rec.step())["created"] == [(vid, 0, "resync", "c0")]
    for error in ("extent 0: no in-sync replica exports 0+67108864: replica on c1: unavailable",
                  "extent 0: no in-sync replica answers DIGEST: replica on c2: io: EIO",
                  "replica on c1: stale_epoch: epoch 3 < 4",
                  "replica on c0: stale_epoch: epoch 3 < 4"):
        for n in range(3):
            task = await task_of(ctx, vid)
            task.error = error
            await ctx.etcd.put(ctx.keys.recovery_task(vid, 0), task.encode())
            did = await rec.step()
        assert did["deleted"] == [(vid, 0)], error        # placed again after 3 failed passes
        assert did["created"] == [(vid, 0, "resync", "c0")], error   # onto the same stale copy
        got, _ = await extents.get_extent(ctx, vid, 0)
        assert got.stale == {"c0": 1}, error
    assert recovery.target_failed(RecoveryTask(vid, 0, target="c0", kind="resync", executor="c1",
                                               generation=2, error="replica on c0: io: EIO"))
    assert recovery.target_failed(RecoveryTask(
        vid, 0, target="c0", kind="resync", executor="c1", generation=2,
        error="target c0 failed during the copy: replica on c0: unavailable"))
    assert not recovery.target_failed(RecoveryTask(
        vid, 0, target="c0", kind="resync", executor="c1", generation=2,
        error="extent 0: no in-sync replica exports 0+4096: replica on c10: io"))


async def test_stale_copies_stay_listed_until_a_rebuild_joins(ctx):
    """[c0, c1, c2]; c0 and c1 lose power past the grace: the pass drops them and plans a rebuild
    from c2. Their stale entries used to be removed in that same pass, before any copy existed:
    c2 dying mid-copy then left c0's and c1's full (older) copies unlisted, and their reclaimers
    deleted them when they came back. They stay listed until the extent is whole again."""
    vol = await extent_on(ctx, "v", ["c0", "c1", "c2"])
    vid = vol.volume_id
    await down(ctx, "c0", ago=GRACE * 2)
    await down(ctx, "c1", ago=GRACE * 2)
    rec = Recovery(ctx, grace=GRACE)
    did = await rec.step()
    assert sorted(did["dropped"]) == [(vid, 0, "c0"), (vid, 0, "c1")]
    [(_, _, kind, target)] = did["created"]
    assert kind == "rebuild"
    got, _ = await extents.get_extent(ctx, vid, 0)
    assert got.replicas == ["c2"] and set(got.stale) == {"c0", "c1"}
    # c2 dies mid-copy: the rebuild has no source left and goes; nothing is planned instead.
    await down(ctx, "c2")
    did = await rec.step()
    assert did["deleted"] == [(vid, 0)] and did["created"] == []
    # c0 and c1 return: their copies are still listed (the reclaimer keeps them).
    await up(ctx, "c0")
    await up(ctx, "c1")
    await rec.step()
    got, _ = await extents.get_extent(ctx, vid, 0)
    assert got.replicas == ["c2"] and set(got.stale) == {"c0", "c1"}
    assert await task_of(ctx, vid) is None
    # c2 is back: resync c0, then c1; the stale map empties as they join.
    await up(ctx, "c2")
    for _ in range(2):
        task = await task_of(ctx, vid) or (await rec.step(), await task_of(ctx, vid))[1]
        assert task.kind == "resync" and task.target in ("c0", "c1")
        got, _ = await extents.get_extent(ctx, vid, 0)
        await extents.join(ctx, vid, 0, task.target, got.generation)
    got, _ = await extents.get_extent(ctx, vid, 0)
    assert sorted(got.replicas) == ["c0", "c1", "c2"] and got.stale == {}


async def test_stale_copies_of_a_whole_extent_are_pruned(ctx):
    """A rebuild joined while another copy was still stale (its server gone): the extent is
    whole again, so the stale entry goes and that copy can be reclaimed."""
    vol = await extent_on(ctx, "v", ["c0", "c1", "c2"])
    vid = vol.volume_id
    await down(ctx, "c1", ago=GRACE * 2)
    rec = Recovery(ctx, grace=GRACE)
    [(_, _, kind, target)] = (await rec.step())["created"]
    got, _ = await extents.get_extent(ctx, vid, 0)
    assert kind == "rebuild" and got.stale == {"c1": 1}
    assert (await rec.step())["created"] == []
    got = await extents.join(ctx, vid, 0, target, got.generation)
    assert got.stale == {"c1": 1}
    await rec.step()
    got, _ = await extents.get_extent(ctx, vid, 0)
    assert got.stale == {} and len(got.replicas) == 3 and got.generation == 3
