"""Audit 18: a pending task is spared the stall timeout only while it can be queued.

A chunk server runs two copies at once (chunk/storage/engine.py ``_recovery_slots``); a
task assigned to it waits, pending, for one of them. The leader spared every pending task
of an executor that had *any* running copy changing within the timeout: with one copy
progressing and a slot free, a pending task whose runner was gone (or whose assignment was
never seen) was never placed again for as long as that executor kept copying something,
and held its extent under-replicated and a slot. Now a pending task is spared only while
its executor's slots are all taken by copies that change within the timeout (at this pass
or the one before: a slot that frees is taken within moments).
"""

from __future__ import annotations

from meta.recovery import Recovery
from tests.meta.helpers import own
from tests.meta.test_recovery import ctx, task_of  # noqa: F401 - ctx: the fixture
from tests.meta.test_recovery_stall import STALL, Clock, rebuilding, write_task
from tests.meta.test_recovery import GRACE


async def progress(ctx, clock, rec, vid, indexes, steps, dt):
    """``steps`` passes ``dt`` apart, the copies of ``indexes`` writing progress before each."""
    deleted = []
    for n in range(1, steps + 1):
        clock.t += dt
        for i in indexes:
            await write_task(ctx, vid, i, done_bytes=n << 20)
        deleted += (await rec.step())["deleted"]
    return deleted


async def test_a_lost_pending_task_beside_one_progressing_copy_is_placed_again(ctx):
    """c1 owns the volume and runs both rebuilds: 0 copies and progresses all along, 1 stays
    pending (its runner is gone: c1 has a free slot and would have started it)."""
    vid = await rebuilding(ctx, indexes=(0, 1))
    await own(ctx, vid, "c1")
    clock = Clock()
    rec = Recovery(ctx, grace=GRACE, stall_timeout=STALL, clock=clock)
    await rec.step()
    await write_task(ctx, vid, 0, state="running")
    await rec.step()
    deleted = await progress(ctx, clock, rec, vid, [0], steps=4, dt=STALL * 0.6)
    assert deleted == [(vid, 1)], "the pending task was spared because c1 copies another extent"
    assert (await task_of(ctx, vid, 0)).state == "running"       # the copy goes on


async def test_a_pending_task_queued_behind_two_progressing_copies_waits(ctx):
    """Both of c1's slots copy and progress: the third task is queued, however long that
    takes. Once one copy is done (its join deletes its task) a slot is free: the queued task
    is timed out if it still does not start."""
    vid = await rebuilding(ctx, indexes=(0, 1, 2))
    await own(ctx, vid, "c1")
    clock = Clock()
    rec = Recovery(ctx, grace=GRACE, stall_timeout=STALL, clock=clock)
    assert len((await rec.step())["created"]) == 3
    for i in (0, 1):
        await write_task(ctx, vid, i, state="running")
    await rec.step()
    assert await progress(ctx, clock, rec, vid, [0, 1], steps=5, dt=STALL * 0.6) == []
    assert (await task_of(ctx, vid, 2)).state == "pending"
    await ctx.etcd.delete(ctx.keys.recovery_task(vid, 0))        # 0 is done; 1 goes on
    deleted = await progress(ctx, clock, rec, vid, [1], steps=2, dt=1.0)
    assert (vid, 2) in deleted                                   # idle past the timeout, a slot free
    assert (vid, 1) not in deleted


async def test_a_slot_freed_at_the_pass_does_not_time_the_queued_task_out_at_once(ctx):
    """The pass that first sees a slot free may have read the records between a copy's end
    and the queued task's claim: the queued task waits for the next pass."""
    vid = await rebuilding(ctx, indexes=(0, 1, 2))
    await own(ctx, vid, "c1")
    clock = Clock()
    rec = Recovery(ctx, grace=GRACE, stall_timeout=STALL, clock=clock)
    await rec.step()
    for i in (0, 1):
        await write_task(ctx, vid, i, state="running")
    await rec.step()
    assert await progress(ctx, clock, rec, vid, [0, 1], steps=3, dt=STALL * 0.6) == []
    await ctx.etcd.delete(ctx.keys.recovery_task(vid, 0))
    assert await progress(ctx, clock, rec, vid, [1], steps=1, dt=1.0) == []
    await write_task(ctx, vid, 2, state="running")               # claimed the slot meanwhile
    assert await progress(ctx, clock, rec, vid, [1, 2], steps=3, dt=1.0) == []
