"""A recovery task whose record nobody changes any more is placed again (meta/recovery.py).

A task "running" or "pending" with no progress and no error (its executor's runner ended
or hangs, or it never saw the assignment) was kept for ever: nothing counted it as failing,
and the extent stayed under-replicated with the task holding a slot. The leader times the
record's revision on its own clock; a copy that reports progress is never timed out.
"""

import pytest

from meta import extents
from meta.recovery import Recovery
from tests.meta.helpers import chunk_down as down, own
from tests.meta.test_recovery import GRACE, ctx, extent_on, task_of  # noqa: F401 - ctx: the fixture

STALL = 30.0


class Clock:
    """The scheduler's monotonic clock, moved by the test."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


async def rebuilding(ctx, name="v", indexes=(0,)):
    """Extents of a volume missing c0 (down past the grace): each gets a rebuild."""
    for index in indexes:
        vol = await extent_on(ctx, name, ["c0", "c1", "c2"], index=index)
        await extents.drop(ctx, vol.volume_id, index, "c0", 1, "test")
    await down(ctx, "c0", ago=GRACE * 2)
    return vol.volume_id


async def write_task(ctx, vid, index=0, **changes):
    """Change the task's record as its executor does (claim, progress)."""
    task = await task_of(ctx, vid, index)
    for k, v in changes.items():
        setattr(task, k, v)
    await ctx.etcd.put(ctx.keys.recovery_task(vid, index), task.encode())


@pytest.mark.parametrize("state", ["running", "pending"])
async def test_a_task_whose_record_stays_unchanged_is_placed_again(ctx, state):
    """Running: claimed, then its runner is gone or hangs. Pending: its executor never picked
    it up (no other task of its keeps it busy)."""
    vid = await rebuilding(ctx)
    clock = Clock()
    rec = Recovery(ctx, grace=GRACE, stall_timeout=STALL, clock=clock)
    assert [k for _, _, k, _ in (await rec.step())["created"]] == ["rebuild"]
    await write_task(ctx, vid, state=state, done_bytes=(3 << 20) * (state == "running"))
    assert (await rec.step())["deleted"] == []                # the leader sees this record now
    clock.t += STALL - 1
    assert (await rec.step())["deleted"] == []                # not yet
    clock.t += 2
    did = await rec.step()
    assert did["deleted"] == [(vid, 0)] and [k for _, _, k, _ in did["created"]] == ["rebuild"]
    fresh = await task_of(ctx, vid)
    assert fresh.state == "pending" and fresh.done_bytes == 0 and fresh.executor == fresh.target
    assert (await rec.step())["deleted"] == []                # the new record is timed afresh


async def test_a_copy_that_reports_progress_is_never_placed_again(ctx):
    vid = await rebuilding(ctx)
    clock = Clock()
    rec = Recovery(ctx, grace=GRACE, stall_timeout=STALL, clock=clock)
    await rec.step()
    await write_task(ctx, vid, state="running")
    await rec.step()
    for done in range(1, 6):                                   # far longer than STALL in all
        clock.t += STALL * 0.6
        await write_task(ctx, vid, done_bytes=done << 20)      # report_progress
        assert (await rec.step())["deleted"] == []
    assert (await task_of(ctx, vid)).done_bytes == 5 << 20
    clock.t += STALL + 1                                       # then it stops reporting
    assert (await rec.step())["deleted"] == [(vid, 0)]


async def test_a_pending_task_queued_behind_progressing_copies_waits(ctx):
    """The volume's owner c1 runs the three rebuilds; it copies two at a time (its copy slots,
    chunk/storage/engine.py): the queued one is pending all along but not stalled while both
    others progress. Once they stop changing, they are placed again, and the queued one at the
    next pass (a slot seen free at one pass only may be one its runner is just taking).

    (Before audit 18 one progressing copy spared every pending task of its executor; with a
    slot free a pending task is not queued: tests/meta/test_audit18_recovery_busy_executor.py.)"""
    vid = await rebuilding(ctx, indexes=(0, 1, 2))
    await own(ctx, vid, "c1")
    clock = Clock()
    rec = Recovery(ctx, grace=GRACE, stall_timeout=STALL, clock=clock)
    assert sorted(i for _, i, _, _ in (await rec.step())["created"]) == [0, 1, 2]
    assert [(await task_of(ctx, vid, i)).executor for i in (0, 1, 2)] == ["c1", "c1", "c1"]
    for i in (0, 1):
        await write_task(ctx, vid, i, state="running")
    await rec.step()
    for done in range(1, 4):
        clock.t += STALL * 0.6
        for i in (0, 1):
            await write_task(ctx, vid, i, done_bytes=done << 20)
        assert (await rec.step())["deleted"] == []
    assert (await task_of(ctx, vid, 2)).state == "pending"
    clock.t += STALL + 1
    assert sorted((await rec.step())["deleted"]) == [(vid, 0), (vid, 1)]
    assert (await rec.step())["deleted"] == [(vid, 2)]


async def test_a_stall_timeout_of_zero_never_places_a_task_again(ctx):
    """0 is the documented "never" (meta.recovery_stall_timeout), not "at once"."""
    vid = await rebuilding(ctx)
    clock = Clock()
    rec = Recovery(ctx, grace=GRACE, stall_timeout=0, clock=clock)
    await rec.step()
    await write_task(ctx, vid, state="running")
    for _ in range(3):
        clock.t += 10 * STALL
        assert (await rec.step())["deleted"] == []
