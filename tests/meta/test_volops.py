"""Snapshot barrier and revert against a real etcd.

The chunk-side executor of volume ops lives in chunk/storage; here the test
plays it with the etcd transactions docs/storage.md prescribes, which is a
test of the meta's half of the protocol.
"""

import asyncio

import json

import pytest

from meta import volops, volumes
from tests.meta.helpers import Executor, make_ctx, own, register_chunk
from zstore.errors import Conflict, InvalidArgument, NotFound, Unavailable, ZError
from zstore.records import Volume, VolumeOp


@pytest.fixture
async def ctx(etcd_client, etcd_config):
    c = make_ctx(etcd_client, etcd_config)
    for i, zone in enumerate("abc"):
        await register_chunk(c, f"c{i}", labels={"zone": zone})
    return c


async def ops_of(ctx, vid):
    return [op for _, op in await ctx.list(ctx.keys.volops(vid), VolumeOp)]


async def test_snapshot_without_owner_sets_seq_and_bumps_snap_seq(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    assert vol.snap_seq == 1
    s1, created = await volops.create_snapshot(ctx, "v", "s1")
    assert created and s1.state == "ready" and s1.seq == 1
    s2, _ = await volops.create_snapshot(ctx, "v", "s2")
    assert s2.seq == 2
    again, created = await volops.create_snapshot(ctx, "v", "s1")
    assert not created and again.snapshot_id == s1.snapshot_id and again.seq == 1
    v, _ = await ctx.get(ctx.keys.volume(vol.volume_id), Volume)
    assert v.snap_seq == 3
    assert await ops_of(ctx, vol.volume_id) == []


async def test_released_or_dead_owner_does_not_block_snapshots(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    await own(ctx, vol.volume_id, "c0", released=True)
    assert (await volops.create_snapshot(ctx, "v", "a", timeout=2))[0].seq == 1
    await own(ctx, vol.volume_id, "c1", epoch=2)
    await ctx.etcd.delete(ctx.keys.chunk_live("c1"))                # its chunk server is dead
    assert (await volops.create_snapshot(ctx, "v", "b", timeout=2))[0].seq == 2
    assert await ops_of(ctx, vol.volume_id) == []


async def test_live_owner_runs_the_snapshot_op(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    await own(ctx, vol.volume_id, "c1")
    async with Executor(ctx, "c1") as ex:
        snap, created = await volops.create_snapshot(ctx, "v", "s", timeout=5)
        assert created and snap.state == "ready" and snap.seq == 1
        assert [(op.kind, op.snapshot_id) for op in ex.ran] == [("snapshot", snap.snapshot_id)]
    v, _ = await ctx.get(ctx.keys.volume(vol.volume_id), Volume)
    assert v.snap_seq == 2
    assert await ops_of(ctx, vol.volume_id) == []              # the meta cleans up the done op


async def test_snapshot_times_out_cleanly_and_a_retry_waits_for_the_same_op(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    await own(ctx, vol.volume_id, "c2")
    t0 = asyncio.get_running_loop().time()
    with pytest.raises(Unavailable) as e:
        await volops.create_snapshot(ctx, "v", "s", timeout=0.5)
    assert asyncio.get_running_loop().time() - t0 < 3
    assert "still waiting for the volume's coordinator on chunk server c2" in e.value.message
    snaps = await volumes.list_snapshots(ctx, "v")
    assert [(s.name, s.state) for s in snaps] == [("s", "creating")]
    pending = await ops_of(ctx, vol.volume_id)
    assert [(op.kind, op.executor, op.state) for op in pending] == [("snapshot", "c2", "pending")]
    with pytest.raises(Unavailable):                             # a second timeout: still one op
        await volops.create_snapshot(ctx, "v", "s", timeout=0.3)
    assert len(await ops_of(ctx, vol.volume_id)) == 1
    with pytest.raises(Conflict):                                # no clone of a half-made snapshot
        await volumes.create_volume(ctx, "clone", None, 1, source_snapshot="v@s")
    async with Executor(ctx, "c2") as ex:
        snap, created = await volops.create_snapshot(ctx, "v", "s", timeout=5)
    assert not created and snap.snapshot_id == snaps[0].snapshot_id and snap.seq == 1
    assert len(ex.ran) == 1 and await ops_of(ctx, vol.volume_id) == []


async def test_a_repeated_create_of_a_snapshot_committed_meanwhile_takes_its_done_op_away(ctx):
    """The coordinator committed the snapshot while nobody waited (the create timed out): the
    repeated create finds it ready and removes its done op, as a create that was waiting would
    have (a race of this once left test_snapshot_times_out_cleanly's op behind, now and then)."""
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    await own(ctx, vol.volume_id, "c2")
    with pytest.raises(Unavailable):
        await volops.create_snapshot(ctx, "v", "s", timeout=0.2)
    [(key, rev)] = [(kv.key, kv.mod_revision) for kv in await ctx.etcd.get_prefix(ctx.keys.volops(vol.volume_id))]
    ex = Executor(ctx, "c2")
    await ex.execute(VolumeOp.decode(await ctx.get_raw(key)), key, rev)   # committed, nobody waiting
    assert len(ex.ran) == 1
    snap, created = await volops.create_snapshot(ctx, "v", "s")
    assert not created and snap.state == "ready"
    assert await ops_of(ctx, vol.volume_id) == []


async def test_a_repeated_create_of_a_ready_snapshot_with_a_newer_or_garbled_op_returns_it(ctx):
    """Review of fdcbcc3: the repeated create of a ready snapshot went through _finish, which
    decoded the op: an op record written by a newer zstore (a rolling upgrade: NewerSchemaError)
    or one that does not decode answered 500 on every repeat (CSI's create-after-timeout retry),
    where it had returned the snapshot. The op of a ready snapshot is done, whatever its schema:
    it is removed, compared unchanged, without decoding."""
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    await own(ctx, vol.volume_id, "c2")
    with pytest.raises(Unavailable):
        await volops.create_snapshot(ctx, "v", "s", timeout=0.2)
    [(key, rev)] = [(kv.key, kv.mod_revision) for kv in await ctx.etcd.get_prefix(ctx.keys.volops(vol.volume_id))]
    ex = Executor(ctx, "c2")
    await ex.execute(VolumeOp.decode(await ctx.get_raw(key)), key, rev)   # committed, nobody waiting
    for raw in (json.dumps({**json.loads(await ctx.get_raw(key) or b"{}"), "schema": 99}).encode(),
                b"\xff not a record"):
        await ctx.etcd.put(key, raw)
        snap, created = await volops.create_snapshot(ctx, "v", "s")
        assert not created and snap.state == "ready"
        assert await ctx.get_raw(key) is None


async def test_snapshot_op_moves_when_the_owner_dies_or_changes(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    vid = vol.volume_id
    await own(ctx, vid, "c0")
    with pytest.raises(Unavailable):
        await volops.create_snapshot(ctx, "v", "s", timeout=0.3)
    await own(ctx, vid, "c1", epoch=2)                # another coordinator took over
    async with Executor(ctx, "c1") as ex:
        snap, _ = await volops.create_snapshot(ctx, "v", "s", timeout=5)
    assert snap.seq == 1 and [op.executor for op in ex.ran] == ["c1"]
    # Owner c1 dies mid-wait: the meta takes the snapshot itself.
    waiting = asyncio.ensure_future(volops.create_snapshot(ctx, "v", "t", timeout=5))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    await ctx.etcd.delete(ctx.keys.chunk_live("c1"))
    snap, _ = await waiting
    assert snap.state == "ready" and snap.seq == 2
    assert await ops_of(ctx, vid) == []


async def test_failed_snapshot_frees_the_name(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    await own(ctx, vol.volume_id, "c0")
    async with Executor(ctx, "c0", fail="writes did not drain"):
        with pytest.raises(ZError) as e:
            await volops.create_snapshot(ctx, "v", "s", timeout=5)
    assert "writes did not drain" in e.value.message
    assert await volumes.list_snapshots(ctx, "v") == []
    assert await ops_of(ctx, vol.volume_id) == []
    v, _ = await ctx.get(ctx.keys.volume(vol.volume_id), Volume)
    assert v.snap_seq == 1
    async with Executor(ctx, "c0"):
        assert (await volops.create_snapshot(ctx, "v", "s", timeout=5))[1]


async def test_concurrent_creates_of_one_name_make_one_snapshot(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    await own(ctx, vol.volume_id, "c0")
    async with Executor(ctx, "c0", delay=0.2) as ex:
        got = await asyncio.gather(*[volops.create_snapshot(ctx, "v", "s", timeout=5) for _ in range(5)])
    assert len({s.snapshot_id for s, _ in got}) == 1 and sum(c for _, c in got) == 1
    assert len(ex.ran) == 1
    v, _ = await ctx.get(ctx.keys.volume(vol.volume_id), Volume)
    assert v.snap_seq == 2


async def test_revert_runs_on_the_live_owner(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    s, _ = await volops.create_snapshot(ctx, "v", "s")
    await own(ctx, vol.volume_id, "c2")
    async with Executor(ctx, "c2") as ex:
        v, snap = await volops.revert_volume(ctx, "v", "s", timeout=5)
    assert snap.snapshot_id == s.snapshot_id
    assert [(op.kind, op.snapshot_id, op.executor) for op in ex.ran] == [("revert", s.snapshot_id, "c2")]
    assert [op.state for op in await ops_of(ctx, vol.volume_id)] == ["done"]     # its receipt
    # By id and as VOL@SNAP too.
    for ref in (s.snapshot_id, "v@s"):
        async with Executor(ctx, "c2"):
            assert (await volops.revert_volume(ctx, "v", ref, timeout=5))[1].snapshot_id == s.snapshot_id


async def test_revert_without_owner_goes_to_a_planned_chunk(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 2)
    await register_chunk(ctx, "c3")
    await volops.create_snapshot(ctx, "v", "s")
    with pytest.raises(Unavailable) as e:
        await volops.revert_volume(ctx, "v", "s", timeout=0.3)
    assert "still running" in e.value.message
    [op] = await ops_of(ctx, vol.volume_id)
    assert op.kind == "revert" and op.executor in vol.placement
    await ctx.etcd.delete(ctx.keys.chunk_live(op.executor))         # it dies: the op moves
    other = next(c for c in vol.placement if c != op.executor)
    async with Executor(ctx, other) as ex:
        await volops.revert_volume(ctx, "v", "s", timeout=5)         # the retry waits for the same op
    assert [o.op_id for o in ex.ran] == [op.op_id]


async def test_revert_refuses_another_volumes_snapshot(ctx):
    await volumes.create_volume(ctx, "v", "1Gi", 1)
    await volumes.create_volume(ctx, "w", "1Gi", 1)
    await volops.create_snapshot(ctx, "w", "s")
    with pytest.raises(Conflict) as e:
        await volops.revert_volume(ctx, "v", "w@s", timeout=1)
    assert "not a snapshot of volume 'v'" in e.value.message
    with pytest.raises(NotFound):
        await volops.revert_volume(ctx, "v", "s", timeout=1)
    with pytest.raises(NotFound):
        await volops.revert_volume(ctx, "nope", "w@s", timeout=1)
    assert await ctx.list_raw(ctx.keys.all_volops()) == []


async def test_failed_revert_is_reported(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 1)
    await volops.create_snapshot(ctx, "v", "s")
    await own(ctx, vol.volume_id, "c0")
    async with Executor(ctx, "c0", fail="replica c1 unreachable"):
        with pytest.raises(ZError) as e:
            await volops.revert_volume(ctx, "v", "s", timeout=5)
    assert "replica c1 unreachable" in e.value.message
    assert [op.state for op in await ops_of(ctx, vol.volume_id)] == ["failed"]   # its receipt


async def test_deleting_a_snapshot_being_created_removes_its_op(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 1)
    await own(ctx, vol.volume_id, "c0")
    with pytest.raises(Unavailable):
        await volops.create_snapshot(ctx, "v", "s", timeout=0.2)
    assert len(await ops_of(ctx, vol.volume_id)) == 1
    await volumes.delete_snapshot(ctx, "v", "s")
    assert await ops_of(ctx, vol.volume_id) == []
    assert await volumes.list_snapshots(ctx, "v") == []


async def test_finished_ops_nobody_waited_for_are_tidied(ctx):
    import time
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 1)
    vid = vol.volume_id
    await own(ctx, vid, "c0")
    for name in ("gone", "kept"):
        with pytest.raises(Unavailable):
            await volops.create_snapshot(ctx, "v", name, timeout=0.2)
    by_snap = {}
    for kv in await ctx.etcd.get_prefix(ctx.keys.volops(vid)):
        op = VolumeOp.decode(kv.value)
        by_snap[op.snapshot_id] = (kv.key, op)
    snaps = {s.name: s for s in await volumes.list_snapshots(ctx, "v")}
    key, op = by_snap[snaps["gone"].snapshot_id]
    op.state, op.error = "failed", "disk on fire"
    await ctx.etcd.put(key, op.encode())
    assert await volops.tidy_ops(ctx) == []                       # too recent
    assert await volops.tidy_ops(ctx, now=time.time() + 3600) == [op.op_id]
    assert [s.name for s in await volumes.list_snapshots(ctx, "v")] == ["kept"]   # name free again
    assert len(await ops_of(ctx, vid)) == 1                                       # pending one stays


async def test_a_revert_claimed_by_a_live_executor_is_not_moved_to_the_owner(ctx):
    """A revert marked running by its executor stays with it while that executor is live,
    even when another server now owns the volume: moving it would run the revert twice at
    once, and the first could report done while the second still rolls blocks back."""
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 2)
    await volops.create_snapshot(ctx, "v", "s")
    with pytest.raises(Unavailable):
        await volops.revert_volume(ctx, "v", "s", timeout=0.3)     # handed to a placed chunk
    [op] = await ops_of(ctx, vol.volume_id)
    op.state = "running"                                          # its executor claimed it
    await ctx.etcd.put(ctx.keys.volop(vol.volume_id, op.op_id), op.encode())
    other = next(c for c in ("c0", "c1", "c2") if c != op.executor)
    await own(ctx, vol.volume_id, other)
    with pytest.raises(Unavailable):
        await volops.revert_volume(ctx, "v", "s", timeout=0.3)     # the retry waits for it
    [still] = await ops_of(ctx, vol.volume_id)
    assert (still.executor, still.state) == (op.executor, "running")
    assert await volops.tidy_ops(ctx, now=still.created + 10**6) == []   # never tidied while running
    await ctx.etcd.delete(ctx.keys.chunk_live(op.executor))        # its executor dies: it moves
    async with Executor(ctx, other) as ex:
        await volops.revert_volume(ctx, "v", "s", timeout=5)
    assert [o.op_id for o in ex.ran] == [op.op_id]


async def test_a_snapshot_is_not_deleted_while_a_revert_to_it_runs(ctx):
    """The revert's executor needs the snapshot's block versions until it is done, and the
    chunk servers trim the versions of a deleted snapshot: a delete is refused (409) while
    a revert to it is pending or running, and allowed once it is done."""
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    await volops.create_snapshot(ctx, "v", "s")
    await own(ctx, vol.volume_id, "c1")
    with pytest.raises(Unavailable):
        await volops.revert_volume(ctx, "v", "s", timeout=0.3)         # still pending on c1
    with pytest.raises(Conflict, match="revert still running"):
        await volumes.delete_snapshot(ctx, "v", "s")
    async with Executor(ctx, "c1"):
        await volops.revert_volume(ctx, "v", "s", timeout=5)
    await volumes.delete_snapshot(ctx, "v", "s")
    assert await volumes.list_snapshots(ctx, "v") == []


def revert_after_the_ops_are_listed(ctx, monkeypatch, vid: str, snapshot: str) -> list:
    """Make the next listing of the volume's unfinished reverts (``volumes.unfinished_reverts``,
    the one every caller reads them through) start a revert of "v" to ``snapshot`` (left
    pending: no executor answers) right after it read: a race with whoever listed. The list
    returned holds True once the race ran."""
    real_list, raced = volumes.unfinished_reverts, []

    async def list_then_revert(c, volume_id):
        got = await real_list(c, volume_id)
        if volume_id == vid and not raced:
            raced.append(True)
            assert got == []                    # the listing read before the revert existed
            with pytest.raises(Unavailable):
                await volops.revert_volume(ctx, "v", snapshot, timeout=0.2)
        return got

    monkeypatch.setattr(volumes, "unfinished_reverts", list_then_revert)
    return raced


async def test_a_delete_that_read_the_snapshot_before_a_revert_was_made_looks_again(ctx, monkeypatch):
    """The delete lists the volume's ops, then commits comparing the snapshot's revision: a
    revert made in between puts the snapshot back, so the delete's compare fails and its
    second look finds the revert."""
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    await volops.create_snapshot(ctx, "v", "s")
    await own(ctx, vol.volume_id, "c1")
    raced = revert_after_the_ops_are_listed(ctx, monkeypatch, vol.volume_id, "s")
    with pytest.raises(Conflict, match="revert still running"):
        await volumes.delete_snapshot(ctx, "v", "s")
    assert raced and [s.name for s in await volumes.list_snapshots(ctx, "v")] == ["s"]


async def test_a_retried_snapshot_delete_never_takes_a_new_snapshots_name(ctx, monkeypatch):
    """A delete whose first compare failed because another delete made the snapshot a
    tombstone (a clone keeps it), after which a new snapshot took the name: the retry sees
    the tombstone and stops (NotFound) instead of deleting the new snapshot's name key."""
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    await volops.create_snapshot(ctx, "v", "s")
    await volumes.create_volume(ctx, "c", None, 1, source_snapshot="v@s")
    real_txn, raced = ctx.txn, []

    async def txn_after_a_race(compare, success):
        if not raced:                                                # the delete's own txn
            raced.append(True)
            await volumes.delete_snapshot(ctx, "v", "s")             # tombstone: the clone keeps it
            await volops.create_snapshot(ctx, "v", "s")              # the name, taken again
        return await real_txn(compare, success)

    monkeypatch.setattr(ctx, "txn", txn_after_a_race)
    with pytest.raises(NotFound):
        await volumes.delete_snapshot(ctx, "v", "s")
    assert raced
    assert [s.name for s in await volumes.list_snapshots(ctx, "v")] == ["s"]
    assert await ctx.get_raw(ctx.keys.snapshot_name(vol.volume_id, "s")) is not None


# --- a revert that outlives its caller (docs/storage.md, "Volume ops") -----------------

async def test_a_revert_to_another_snapshot_is_refused_while_one_is_pending_or_running(ctx):
    """A second revert op beside an unfinished one could run after it, much later, and roll
    back writes made in between: while a revert of the volume is pending or running, a revert
    to another snapshot is refused (409); the same revert still waits for the op it made."""
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    await volops.create_snapshot(ctx, "v", "s1")
    await volops.create_snapshot(ctx, "v", "s2")
    await own(ctx, vol.volume_id, "c1")
    with pytest.raises(Unavailable):
        await volops.revert_volume(ctx, "v", "s1", timeout=0.3)         # pending on c1
    with pytest.raises(Conflict, match="a revert to snapshot 's1' is still pending") as e:
        await volops.revert_volume(ctx, "v", "s2", timeout=0.3)
    assert e.value.status == 409
    [op] = await ops_of(ctx, vol.volume_id)
    op.state = "running"
    await ctx.etcd.put(ctx.keys.volop(vol.volume_id, op.op_id), op.encode())
    with pytest.raises(Conflict, match="still running"):
        await volops.revert_volume(ctx, "v", "s2", timeout=0.3)
    assert [o.op_id for o in await ops_of(ctx, vol.volume_id)] == [op.op_id]
    async with Executor(ctx, "c1"):
        op.state = "pending"
        await ctx.etcd.put(ctx.keys.volop(vol.volume_id, op.op_id), op.encode())
        await volops.revert_volume(ctx, "v", "s1", timeout=5)             # finished: s2 may go now
        await volops.revert_volume(ctx, "v", "s2", timeout=5)
    assert {o.state for o in await ops_of(ctx, vol.volume_id)} <= {"done"}   # receipts at most


async def test_two_reverts_made_at_once_make_one_op(ctx, monkeypatch):
    """Both list the volume's ops before either wrote one: the volume is put back with the
    op, so the second's compare fails and its second look finds the first."""
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    await volops.create_snapshot(ctx, "v", "s1")
    await volops.create_snapshot(ctx, "v", "s2")
    await own(ctx, vol.volume_id, "c1")
    raced = revert_after_the_ops_are_listed(ctx, monkeypatch, vol.volume_id, "s1")
    with pytest.raises(Conflict, match="'s1' is still pending"):
        await volops.revert_volume(ctx, "v", "s2", timeout=0.2)
    assert raced and [o.snapshot_id for o in await ops_of(ctx, vol.volume_id)] == \
        [(await volumes.list_snapshots(ctx, "v"))[0].snapshot_id]


async def test_the_leader_moves_a_revert_whose_executor_died_after_its_caller_gave_up(ctx):
    """Nobody waits for the revert any more; its executor dies mid-way. The leader's periodic
    pass moves it (back to pending) as the waiting call would have: to the live owner, else a
    live chunk of the placement. A revert on a live executor stays where it is."""
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 2)
    await volops.create_snapshot(ctx, "v", "s")
    with pytest.raises(Unavailable):
        await volops.revert_volume(ctx, "v", "s", timeout=0.3)
    [op] = await ops_of(ctx, vol.volume_id)
    op.state = "running"
    await ctx.etcd.put(ctx.keys.volop(vol.volume_id, op.op_id), op.encode())
    await volops.tidy_ops(ctx)
    [same] = await ops_of(ctx, vol.volume_id)
    assert (same.executor, same.state) == (op.executor, "running")    # live: left alone
    await ctx.etcd.delete(ctx.keys.chunk_live(op.executor))
    assert await volops.tidy_ops(ctx) == []
    [moved] = await ops_of(ctx, vol.volume_id)
    assert moved.op_id == op.op_id and moved.state == "pending"
    assert moved.executor != op.executor and moved.executor in vol.placement
    other = moved.executor
    await ctx.etcd.delete(ctx.keys.chunk_live(other))
    last = next(c for c in ("c0", "c1", "c2") if c not in (op.executor, other))
    await own(ctx, vol.volume_id, last)                                # a live owner wins
    await volops.tidy_ops(ctx)
    [moved] = await ops_of(ctx, vol.volume_id)
    assert (moved.executor, moved.state) == (last, "pending")


async def test_the_meta_takes_no_snapshot_while_a_revert_is_unfinished(ctx):
    """A revert's executor writes at the seq it read when it took ownership. If its lease
    lapsed, the meta would take the snapshot itself and raise the seq, and the revert's
    remaining writes (at the old seq) would land inside the new snapshot: the snapshot waits
    for the revert to finish instead."""
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 2)
    await volops.create_snapshot(ctx, "v", "s")
    await own(ctx, vol.volume_id, "c1")
    with pytest.raises(Unavailable):
        await volops.revert_volume(ctx, "v", "s", timeout=0.3)
    [op] = await ops_of(ctx, vol.volume_id)
    op.state = "running"
    key = ctx.keys.volop(vol.volume_id, op.op_id)
    await ctx.etcd.put(key, op.encode())
    await ctx.etcd.delete(ctx.keys.chunk_live("c1"))                    # no live owner now
    with pytest.raises(Unavailable, match="revert .* unfinished"):
        await volops.create_snapshot(ctx, "v", "t", timeout=0.3)
    v, _ = await ctx.get(ctx.keys.volume(vol.volume_id), Volume)
    assert v.snap_seq == 2
    op.state = "done"
    await ctx.etcd.put(key, op.encode())
    t, _ = await volops.create_snapshot(ctx, "v", "t", timeout=2)
    assert t.state == "ready" and t.seq == 2


async def test_an_owner_that_comes_back_live_before_the_meta_commits_takes_the_snapshot(ctx, monkeypatch):
    """The meta reads no live key for the owner and goes to commit the snapshot itself; its
    chunk server registers again (live key written) before the commit, and may write at the
    seq it read on taking ownership. The commit compares the live key still absent, so it
    fails, and the next pass hands the snapshot to that coordinator as an op."""
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    vid = vol.volume_id
    await own(ctx, vid, "c1", epoch=2)
    await ctx.etcd.delete(ctx.keys.chunk_live("c1"))                # its lease lapsed
    real_live_owner = volops.live_owner
    reads = []

    async def live_owner(c, v):
        owner, rev = await real_live_owner(c, v)
        reads.append(owner)
        if len(reads) == 1:
            assert owner is None
            await register_chunk(ctx, "c1", labels={"zone": "b"})     # c1 is live again
        return owner, rev
    monkeypatch.setattr(volops, "live_owner", live_owner)
    async with Executor(ctx, "c1") as ex:
        snap, created = await volops.create_snapshot(ctx, "v", "s", timeout=5)
    assert created and snap.state == "ready" and snap.seq == 1
    assert [(op.kind, op.executor) for op in ex.ran] == [("snapshot", "c1")], \
        "the meta committed the snapshot while the owner was live again"
    assert reads[0] is None and reads[-1] is not None and reads[-1].chunk_id == "c1"
    v, _ = await ctx.get(ctx.keys.volume(vid), Volume)
    assert v.snap_seq == 2
    assert await ops_of(ctx, vid) == []


# --- a snapshot's size is the volume's at the barrier --------------------------------------

async def test_a_snapshot_committed_by_the_meta_has_the_size_at_its_barrier(ctx):
    """Expanded while the snapshot waited for its barrier: the snapshot holds every block
    written up to the barrier, so its size is the volume's then, not at the create (a clone
    or restore of it would be cut short)."""
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    await own(ctx, vol.volume_id, "c1")
    with pytest.raises(Unavailable):
        await volops.create_snapshot(ctx, "v", "s", timeout=0.2)       # creating, op on c1
    await volumes.resize_volume(ctx, "v", "2Gi")
    await own(ctx, vol.volume_id, "c1", released=True)                   # nobody serves it now
    snap, created = await volops.create_snapshot(ctx, "v", "s", timeout=5)   # the meta commits
    assert not created and snap.state == "ready" and snap.size == 2 * 2**30
    [stored] = await volumes.list_snapshots(ctx, "v")
    assert stored.size == 2 * 2**30
    clone, _ = await volumes.create_volume(ctx, "c", None, 3, source_snapshot=snap.snapshot_id)
    assert clone.size == 2 * 2**30



# --- a retried revert request (its answer was lost) -------------------------------------

async def test_a_retried_revert_request_gets_the_first_outcome_and_is_not_run_again(ctx):
    """The revert finished but its answer was lost (leader died, connection reset) and the
    client retried the request with the same id: the retry answers from the done op and
    runs nothing, else the writes made since the first revert would be rolled back. The
    done op is the receipt: kept until tidy_ops removes it, FINISHED_OP_TTL after it was made."""
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    s1, _ = await volops.create_snapshot(ctx, "v", "s1")
    await own(ctx, vol.volume_id, "c1")
    async with Executor(ctx, "c1") as ex:
        await volops.revert_volume(ctx, "v", "s1", timeout=5, request_id="req-1")
        [op] = await ops_of(ctx, vol.volume_id)
        assert (op.op_id, op.state) == (volops.revert_op_id("req-1"), "done")
        _, snap = await volops.revert_volume(ctx, "v", "s1", timeout=5, request_id="req-1")   # the retry
        assert snap.snapshot_id == s1.snapshot_id
        assert [o.op_id for o in ex.ran] == [op.op_id]                   # ran once
        assert volops.FINISHED_OP_TTL >= 60                              # >> the client's 15 s of retries
        assert await volops.tidy_ops(ctx, now=op.created + volops.FINISHED_OP_TTL - 1) == []
        assert await volops.tidy_ops(ctx, now=op.created + volops.FINISHED_OP_TTL) == [op.op_id]
        # A new request (a new id, or none: older clients) is a new revert.
        await volops.revert_volume(ctx, "v", "s1", timeout=5, request_id="req-2")
        await volops.revert_volume(ctx, "v", "s1", timeout=5)
    assert len(ex.ran) == 3 and ex.ran[1].op_id == volops.revert_op_id("req-2")


async def test_a_retried_revert_request_that_failed_reports_the_failure_again(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 1)
    await volops.create_snapshot(ctx, "v", "s")
    await own(ctx, vol.volume_id, "c0")
    async with Executor(ctx, "c0", fail="replica c1 unreachable") as ex:
        for _ in range(2):
            with pytest.raises(ZError, match="replica c1 unreachable") as e:
                await volops.revert_volume(ctx, "v", "s", timeout=5, request_id="req-1")
            assert e.value.hint == "retry the revert"
    assert len(ex.ran) == 1


async def test_a_request_that_joined_an_unfinished_revert_keeps_its_own_receipt(ctx):
    """A second request (another id) to the same snapshot while the first one's revert is
    unfinished waits for that op; its outcome is recorded under its own id too, so a retry
    of the second request does not revert again either."""
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    await volops.create_snapshot(ctx, "v", "s")
    await own(ctx, vol.volume_id, "c1")
    with pytest.raises(Unavailable) as e:
        await volops.revert_volume(ctx, "v", "s", timeout=0.3, request_id="first")   # pending on c1
    assert "new request" in e.value.hint and "undoes the writes made since" in e.value.hint
    second = asyncio.ensure_future(volops.revert_volume(ctx, "v", "s", timeout=5, request_id="second"))
    await asyncio.sleep(0.3)                                          # waiting for the first's op
    assert [o.op_id for o in await ops_of(ctx, vol.volume_id)] == [volops.revert_op_id("first")]
    async with Executor(ctx, "c1") as ex:
        await second
        await volops.revert_volume(ctx, "v", "s", timeout=5, request_id="second")     # its retry
        await volops.revert_volume(ctx, "v", "s", timeout=5, request_id="first")      # and the first's
    assert [o.op_id for o in ex.ran] == [volops.revert_op_id("first")]
    assert sorted((o.op_id, o.state) for o in await ops_of(ctx, vol.volume_id)) == [
        (volops.revert_op_id("first"), "done"), (volops.revert_op_id("second"), "done")]


async def test_a_request_id_names_one_request(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    await volops.create_snapshot(ctx, "v", "s1")
    await volops.create_snapshot(ctx, "v", "s2")
    await own(ctx, vol.volume_id, "c1")
    async with Executor(ctx, "c1"):
        await volops.revert_volume(ctx, "v", "s1", timeout=5, request_id="req-1")
    with pytest.raises(Conflict, match="used for a revert to another snapshot"):
        await volops.revert_volume(ctx, "v", "s2", timeout=1, request_id="req-1")
    for bad in ("", "a/b", "x" * 65, 7):
        with pytest.raises(InvalidArgument, match="invalid request_id"):
            await volops.revert_volume(ctx, "v", "s1", timeout=1, request_id=bad)
    assert len(await ops_of(ctx, vol.volume_id)) == 1
