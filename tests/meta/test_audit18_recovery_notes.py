"""Audit 18 (review 213): the leader's notes in a recovery task record (meta/recovery.py
``TrackedTask``) neither erase what newer code wrote there nor let clocks time a task out early.

* The project adds fields to a record while keeping schema 1 (``replaces`` was one). The
  leader's writes of a task record (its idle/failure note, a handover to another executor)
  were a read-modify-write through ``TrackedTask``, which drops every key it does not know:
  during a rolling upgrade a newer server's field was erased, by the note on almost every
  idle task each term. Both writes now change only their own keys of the record as read.
* The note said since when (``idle_since``) on the noting leader's wall clock: a new leader
  whose clock was ahead by the timeout deleted a running copy quiet for seconds at its first
  pass (one behind started the timer again each term). The note now holds the seconds the
  leaders observed on their monotonic clocks; a new leader adds only what it observes itself.
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


# --- clock skew between meta servers (7ae7826 noted idle_since on the writer's wall clock) ---

async def running_and_noted(ctx, wall):
    """A copy claimed and running, then quiet (a digest and join, a wait behind a revert):
    leader A sees its record unchanged for one period and notes it. Returns (vid, when A
    first saw that record)."""
    vid = await rebuilding(ctx)
    a = Leader(ctx, wall, 1000.0)
    await a.step()
    await write_task(ctx, vid, state="running", done_bytes=5 << 20)
    await a.step()
    first_seen = wall[0]
    version = (await ctx.etcd.get(ctx.keys.recovery_task(vid, 0))).version
    await a.step()                                       # unchanged: noted
    assert (await ctx.etcd.get(ctx.keys.recovery_task(vid, 0))).version == version + 1
    return vid, first_seen


async def passes_until_deleted(leader, vid, passes: int, wall) -> float | None:
    for _ in range(passes):
        did = await leader.step()
        if did["deleted"]:
            assert did["deleted"] == [(vid, 0)]
            return wall[0]
    return None


async def test_a_new_leader_whose_clock_is_ahead_does_not_time_a_quiet_copy_out_early(ctx):
    """Leader B's wall clock is far ahead of A's. The copy was quiet for seconds when B takes
    over: B does not delete it at its first pass (the reviewer's reproducer did), and places
    it again only once the record has been unchanged for the timeout in all."""
    wall = [1_800_000_000.0]
    vid, first_seen = await running_and_noted(ctx, wall)
    b = Leader(ctx, wall, 50_000.0, skew=STALL * 10)
    assert (await b.step())["deleted"] == []
    deleted_at = await passes_until_deleted(b, vid, int(STALL / PERIOD) + 3, wall)
    assert deleted_at is not None, "never placed again"
    assert STALL <= deleted_at - first_seen <= STALL + 2 * PERIOD


async def test_leaders_whose_clocks_are_behind_still_count_the_earlier_terms(ctx):
    """Each new leader's wall clock is behind the one before (a note from its future): the
    earlier terms' time still counts, and the task is placed again although no term is
    anywhere near the timeout long (terms of two passes, 10 s apart)."""
    vid = await rebuilding(ctx)
    wall = [1_800_000_000.0]
    await Leader(ctx, wall, 1000.0).step()
    await write_task(ctx, vid, state="running")
    first_seen = deleted_at = None
    for term in range(1, 16):
        leader = Leader(ctx, wall, 1000.0 * term, skew=-1000.0 * term)
        for _ in range(2):
            did = await leader.step(10.0)
            first_seen = first_seen or wall[0]
            if did["deleted"]:
                deleted_at = wall[0]
                break
        if deleted_at:
            break
    assert deleted_at is not None, "never placed again: each term started the timer again"
    assert deleted_at - first_seen >= STALL


async def test_a_wall_clock_note_is_not_taken(ctx):
    """A note as 7ae7826 wrote it (``idle_since``, a wall-clock time, valid for the key's
    version) is not taken by this code: the record is timed from this leader's first sight,
    and the next note write removes the field (a server still running that code would take
    it, with its matching version, as a time on its own clock)."""
    vid = await rebuilding(ctx)
    wall = [1_800_000_000.0]
    await Leader(ctx, wall, 1000.0).step()
    await write_task(ctx, vid, state="running")
    key = ctx.keys.recovery_task(vid, 0)
    got = await ctx.etcd.get(key)
    d = json.loads(got.value)
    d.update(idle_since=wall[0] - STALL * 10, idle_version=got.version + 1)
    await ctx.etcd.put(key, json.dumps(d).encode())
    leader = Leader(ctx, wall, 7000.0)
    assert (await leader.step())["deleted"] == []
    assert (await leader.step())["deleted"] == []        # second sight: noted, this code's way
    d = await raw_of(ctx, vid)
    assert "idle_since" not in d and d["idle_for"] == PERIOD
    assert await passes_until_deleted(leader, vid, int(STALL / PERIOD), wall) is not None


async def test_a_note_is_refreshed_within_a_term_not_at_every_pass(ctx):
    """A long term keeps its count in the record (the next leader goes on from it, less the
    handover) with a write per tenth of the timeout, not one per pass."""
    wall = [1_800_000_000.0]
    vid, first_seen = await running_and_noted(ctx, wall)
    key = ctx.keys.recovery_task(vid, 0)
    a = Leader(ctx, wall, 1000.0)
    await a.step()                                       # A's term (again): first sight
    before = (await ctx.etcd.get(key)).version
    passes = 12
    for _ in range(passes):
        assert (await a.step())["deleted"] == []
    writes = (await ctx.etcd.get(key)).version - before
    assert 1 <= writes <= 1 + passes * PERIOD / (STALL / 10)
    noted = (await raw_of(ctx, vid))["idle_for"]
    assert noted >= (wall[0] - first_seen) - STALL / 10 - 2 * PERIOD
