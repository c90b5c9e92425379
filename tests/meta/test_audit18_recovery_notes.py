"""Audit 18 (review 213): the leader's notes in a recovery task record (meta/recovery.py
``TrackedTask``) neither erase what newer code wrote there nor let clocks time a task out early.

* The project adds fields to a record while keeping schema 1 (``replaces`` was one). The
  leader's writes of a task record (its idle/failure note, a handover to another executor)
  were a read-modify-write through ``TrackedTask``, which drops every key it does not know:
  during a rolling upgrade a newer server's field was erased, by the note on almost every
  idle task each term. Both writes now change only their own keys of the record as read.
"""

from __future__ import annotations

import json

from meta.recovery import Recovery
from tests.meta.helpers import own
from tests.meta.test_recovery import GRACE, ctx, task_of  # noqa: F401 - ctx: the fixture
from tests.meta.test_recovery_stall import rebuilding, write_task

STALL = 60.0
PERIOD = 2.0


class Leader:
    """One term: a scheduler with a monotonic clock of its own (``origin``) and the wall clock
    the test moves (``wall``), seen ``skew`` seconds off by this meta server."""

    def __init__(self, ctx, wall: list[float], origin: float, skew: float = 0.0) -> None:
        self.t, self.wall, self.skew = origin, wall, skew
        self.rec = Recovery(ctx, grace=GRACE, stall_timeout=STALL, clock=lambda: self.t)

    async def step(self, dt: float = PERIOD) -> dict:
        self.t += dt
        self.wall[0] += dt
        return await self.rec.step(now=self.wall[0] + self.skew)


async def add_future_field(ctx, vid, value="kept-by-newer-code") -> None:
    """A schema-1 field this code does not know, as a newer meta server or chunk server would
    have written it."""
    key = ctx.keys.recovery_task(vid, 0)
    d = json.loads((await ctx.etcd.get(key)).value)
    d["future_field"] = value
    await ctx.etcd.put(key, json.dumps(d).encode())


async def raw_of(ctx, vid) -> dict:
    return json.loads((await ctx.etcd.get(ctx.keys.recovery_task(vid, 0))).value)


async def test_the_idle_note_keeps_a_field_this_code_does_not_know(ctx):
    vid = await rebuilding(ctx)
    wall = [1_800_000_000.0]
    leader = Leader(ctx, wall, 1000.0)
    await leader.step()
    await add_future_field(ctx, vid)
    await leader.step()
    before = (await ctx.etcd.get(ctx.keys.recovery_task(vid, 0))).version
    await leader.step()                                  # second sight: the note is written
    got = await ctx.etcd.get(ctx.keys.recovery_task(vid, 0))
    assert got.version == before + 1, "no note written"
    d = json.loads(got.value)
    assert d["future_field"] == "kept-by-newer-code"
    assert d["schema"] == 1 and d["executor"] and d["target"]


async def test_the_failure_count_keeps_a_field_this_code_does_not_know(ctx):
    vid = await rebuilding(ctx)
    wall = [1_800_000_000.0]
    leader = Leader(ctx, wall, 1000.0)
    await leader.step()
    await write_task(ctx, vid, error="EIO on the target")
    await add_future_field(ctx, vid)
    assert (await leader.step())["deleted"] == []        # counted: 1, written to the record
    d = await raw_of(ctx, vid)
    assert d["failures"] == 1 and d["future_field"] == "kept-by-newer-code"


async def test_a_handover_keeps_a_field_this_code_does_not_know(ctx):
    """The executor changes (the volume's owner is now live on c2): the record is written with
    the new executor, every other key as it was."""
    vid = await rebuilding(ctx)
    wall = [1_800_000_000.0]
    leader = Leader(ctx, wall, 1000.0)
    await leader.step()
    task = await task_of(ctx, vid)
    assert task.executor == task.target
    await write_task(ctx, vid, state="running", done_bytes=3 << 20)
    await add_future_field(ctx, vid)
    await own(ctx, vid, "c2")
    did = await leader.step()
    assert did["reassigned"] == [(vid, 0, "c2")]
    d = await raw_of(ctx, vid)
    assert d["executor"] == "c2" and d["state"] == "pending" and d["done_bytes"] == 3 << 20
    assert d["future_field"] == "kept-by-newer-code"
