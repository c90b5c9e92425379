"""Audit 18: recovery's stall timer and failure counts survive a change of leader.

Both lived in the leader's memory only: each term started them again, so with the leader
changing more often than the stall timeout a task nobody runs any more was kept for ever,
and with it changing more often than ``FAILING_PASSES`` passes a task failing for good was
retried for ever. The leader now keeps what it needs in the task record (meta/recovery.py
``TrackedTask``): since when the record has not changed, valid while etcd's version of the
key is the one the note was written at, and the count of passes in a row that saw an error.
"""

from __future__ import annotations

import pytest

from meta.recovery import FAILING_PASSES, Recovery, TrackedTask
from tests.meta.test_recovery import GRACE, ctx, task_of  # noqa: F401 - ctx: the fixture
from tests.meta.test_recovery_stall import rebuilding, write_task
from zstore.records import RecoveryTask

STALL = 30.0
PERIOD = 2.0


class Leader:
    """One term: a scheduler with a monotonic clock of its own (another origin each term, as
    on another meta server) and the wall clock the test moves."""

    origins = iter(range(10_000, 10_000_000, 7_919))

    def __init__(self, ctx, wall: list[float], **kw) -> None:
        self.t = float(next(self.origins))
        self.wall = wall
        self.rec = Recovery(ctx, grace=GRACE, stall_timeout=STALL, clock=lambda: self.t, **kw)

    async def step(self, dt: float = PERIOD) -> dict:
        self.t += dt
        self.wall[0] += dt
        return await self.rec.step(now=self.wall[0])


async def raw_task(ctx, vid, index=0):
    return await ctx.etcd.get(ctx.keys.recovery_task(vid, index))


@pytest.mark.parametrize("state", ["running", "pending"])
async def test_a_stall_is_timed_across_leader_changes(ctx, state):
    """Terms of two passes, 10 s apart: each far shorter than the timeout. The record nobody
    changes any more is placed again once it has been unchanged for the timeout in all, not
    before (counted from the first leader that saw it)."""
    vid = await rebuilding(ctx)
    wall = [1_800_000_000.0]
    assert (await Leader(ctx, wall).step())["created"]
    await write_task(ctx, vid, state=state)              # the executor's last word
    first_seen = None
    deleted_at = None
    for _ in range(12):
        leader = Leader(ctx, wall)
        for _ in range(2):
            did = await leader.step(10.0)
            first_seen = first_seen or wall[0]
            if did["deleted"]:
                deleted_at = wall[0]
                break
        if deleted_at:
            break
    assert deleted_at is not None, "never placed again: each leader started the timer again"
    assert STALL <= deleted_at - first_seen <= STALL + 30.0
    assert (await task_of(ctx, vid)).state == "pending"    # the new task, planned afresh


async def test_a_failing_task_is_counted_across_leader_changes(ctx):
    """One pass per term: no leader alone sees FAILING_PASSES passes. The count goes on in
    the record, and the task is placed again after FAILING_PASSES passes in all."""
    vid = await rebuilding(ctx)
    wall = [1_800_000_000.0]
    await Leader(ctx, wall).step()
    await write_task(ctx, vid, error="NO_SPACE on the target")
    for n in range(1, FAILING_PASSES):
        assert (await Leader(ctx, wall).step())["deleted"] == [], n
    did = await Leader(ctx, wall).step()
    assert did["deleted"] == [(vid, 0)] and did["created"]
    assert (await task_of(ctx, vid)).error is None


@pytest.mark.parametrize("keeps_notes", [False, True])
async def test_a_pass_without_an_error_starts_the_count_over_across_leaders(ctx, keeps_notes):
    """The executor tries again (its record: running, no error) and fails again. A leader that
    sees the attempt without an error starts the count over, as one leader always did, whether
    the executor's write dropped the leader's fields (today's chunk servers decode a plain
    RecoveryTask) or kept them (a RecoveryTask that has the fields)."""
    vid = await rebuilding(ctx)
    wall = [1_800_000_000.0]
    await Leader(ctx, wall).step()

    async def executor_writes(**changes):
        if not keeps_notes:
            return await write_task(ctx, vid, **changes)
        key = ctx.keys.recovery_task(vid, 0)
        task = TrackedTask.decode((await ctx.etcd.get(key)).value)
        for k, v in changes.items():
            setattr(task, k, v)
        await ctx.etcd.put(key, task.encode())

    await executor_writes(error="EIO on the target")
    for _ in range(FAILING_PASSES - 1):
        assert (await Leader(ctx, wall).step())["deleted"] == []
    await executor_writes(state="running", error=None)
    assert (await Leader(ctx, wall).step())["deleted"] == []      # an attempt: starts over
    await executor_writes(state="pending", error="EIO on the target")
    for _ in range(FAILING_PASSES - 1):
        assert (await Leader(ctx, wall).step())["deleted"] == []
    assert (await Leader(ctx, wall).step())["deleted"] == [(vid, 0)]


async def test_a_record_changed_since_the_note_is_timed_afresh(ctx):
    """The note holds only while etcd's version of the key is the one it was written at: a
    copy's progress written by an executor that keeps the field (a stale ``idle_for``)
    is a change, timed from when a leader sees it."""
    vid = await rebuilding(ctx)
    wall = [1_800_000_000.0]
    leader = Leader(ctx, wall)
    await leader.step()
    await write_task(ctx, vid, state="running")
    await leader.step()
    await leader.step()                                  # unchanged: the leader notes it
    noted = TrackedTask.decode((await raw_task(ctx, vid)).value)
    assert noted.idle_for is not None
    noted.done_bytes = 5 << 20                            # progress, the note carried along
    await ctx.etcd.put(ctx.keys.recovery_task(vid, 0), noted.encode())
    wall[0] += STALL * 2                                  # a leader change takes a while
    leader = Leader(ctx, wall)
    assert (await leader.step())["deleted"] == []
    assert (await leader.step(STALL - 5))["deleted"] == []
    assert (await leader.step(10))["deleted"] == [(vid, 0)]


async def test_records_without_the_fields_and_older_readers(ctx):
    """Rolling upgrade: a task record written before the fields is timed from when this leader
    first sees it; the records this leader writes stay schema 1, and code that knows only a
    plain RecoveryTask reads them (and drops the fields)."""
    vid = await rebuilding(ctx)
    wall = [1_800_000_000.0]
    leader = Leader(ctx, wall)
    await leader.step()
    old = RecoveryTask.decode((await raw_task(ctx, vid)).value)
    await ctx.etcd.put(ctx.keys.recovery_task(vid, 0), old.encode())     # as an older leader wrote it
    assert (await leader.step())["deleted"] == []
    await write_task(ctx, vid, error="EIO on the target")
    assert (await leader.step())["deleted"] == []       # counted and noted in the record
    raw = (await raw_task(ctx, vid)).value
    assert b'"failures":1' in raw
    plain = RecoveryTask.decode(raw)
    assert plain.schema == 1 and plain.error == "EIO on the target" and plain.executor
    # A fresh task is written as before: no leader fields until there is something to note.
    await ctx.etcd.delete(ctx.keys.recovery_task(vid, 0))
    await leader.step()
    assert b"failures" not in (await raw_task(ctx, vid)).value
