"""Recovery's stall timer under leader terms shorter than a tenth of the timeout (meta/recovery.py).

A leader wrote a task's idle note at its second sight of the record, then once per
``1/NOTE_SHARE`` of the stall timeout. A term shorter than that tenth wrote it once only,
at its second pass: whatever it observed after was lost, and each such term added one pass
interval to the task's stall time. With leaders flapping every few passes a task nobody runs
any more stayed placed for many times the timeout. The note is now also written again
whenever the time observed since the last write reaches the time observed before it in this
term (a doubling, capped at the tenth): each term's note keeps at least half of what the term
observed past its first pass interval, at a few writes more per term. Nothing unobserved is
counted (the timer can still run late, never early); a term of one pass observes nothing and
still adds nothing.
"""

from __future__ import annotations

import json

from meta.recovery import NOTE_SHARE, Recovery
from tests.meta.test_recovery import GRACE, ctx  # noqa: F401 - ctx: the fixture
from tests.meta.test_recovery_stall import rebuilding, write_task

STALL = 200.0                   # a tenth: 20 s, longer than the terms below
PERIOD = 2.0
TERM = 8                        # passes per term: 14 s observed, under STALL / NOTE_SHARE


class Leader:
    """One term: a scheduler with a monotonic clock of its own, and the wall clock the test moves."""

    def __init__(self, ctx, wall: list[float], origin: float) -> None:
        self.t, self.wall = origin, wall
        self.rec = Recovery(ctx, grace=GRACE, stall_timeout=STALL, clock=lambda: self.t)

    async def step(self) -> dict:
        self.t += PERIOD
        self.wall[0] += PERIOD
        return await self.rec.step(now=self.wall[0])


async def _quiet_task(ctx, wall):
    vid = await rebuilding(ctx)
    await Leader(ctx, wall, 1000.0).step()
    await write_task(ctx, vid, state="running")          # the executor's last word
    return vid


async def _idle_for(ctx, vid) -> float:
    return json.loads((await ctx.etcd.get(ctx.keys.recovery_task(vid, 0))).value).get("idle_for", 0.0)


async def test_a_short_term_keeps_at_least_half_of_what_it_observed(ctx):
    assert TERM * PERIOD < STALL / NOTE_SHARE
    wall = [1_800_000_000.0]
    vid = await _quiet_task(ctx, wall)
    leader = Leader(ctx, wall, 5000.0)
    for _ in range(TERM):
        assert (await leader.step())["deleted"] == []
    observed = (TERM - 1) * PERIOD                        # from its first sight to its last pass
    assert await _idle_for(ctx, vid) >= observed / 2


async def test_flapping_leaders_place_a_stalled_task_again_within_about_twice_the_timeout(ctx):
    wall = [1_800_000_000.0]
    vid = await _quiet_task(ctx, wall)
    first_seen = deleted_at = None
    for term in range(1, 60):
        leader = Leader(ctx, wall, 10_000.0 * term)
        for _ in range(TERM):
            did = await leader.step()
            first_seen = first_seen or wall[0]
            if did["deleted"]:
                deleted_at = wall[0]
                break
        if deleted_at:
            break
    assert deleted_at is not None, "never placed again: each short term added one pass interval"
    assert STALL <= deleted_at - first_seen <= 2 * STALL + 2 * TERM * PERIOD
