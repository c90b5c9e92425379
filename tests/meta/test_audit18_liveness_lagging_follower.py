"""Audit 18 (left open after the 1496d7c revert): the liveness follower behind etcd.

While the follower watches, an info write of a server that stays down (a registration
failing half-way) keeps its outage's start, so such a server cannot put its grace off. But
the follower may handle that write's event late, after the server came up (that
registration's live key) and went down again: reading the state then, be24fa1 wrote the
previous outage back as the current one, and a recovery pass before the follower's next
events dropped the server's replicas at once. The follower now decides from its own ordered
stream: it sets the start aside (a marker write) and writes it back only if its stream shows
no live event of the server before the marker's own event. It never waits for anything.

The follower here is ``liveness.follow`` itself, its events held back at will (``Lagging``):
each is handled in etcd's order, as late as the test says.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from meta import chunks, extents, liveness
from meta.recovery import Recovery
from tests.meta.helpers import chunk_down, register_chunk
from tests.meta.test_audit18_liveness_down_since import admin_of, info_rev, until
from tests.meta.test_recovery import GRACE, ZONES, ctx, extent_on  # noqa: F401 - ctx: the fixture
from zstore import etcd as zetcd

WAIT = 10.0     # seconds: bound of every wait for the follower


class Lagging:
    """``liveness.follow`` whose events are handled only as the test lets them through."""

    def __init__(self, ctx, monkeypatch):
        self.ctx, self.base = ctx, ctx.keys.chunks()
        self.open = True
        self.permits = 0
        self.wake = asyncio.Event()
        self.progress = asyncio.Event()
        self.listed = asyncio.Event()
        self.handled: list[tuple[str, str, str, int]] = []     # (chunk id, key kind, PUT|DELETE, rev)
        self.watches = 0
        self.stop = asyncio.Event()
        self.task: asyncio.Task | None = None
        real_watch, real_create = zetcd.watch_prefix, zetcd.create_watch

        async def watch_prefix(etcd, prefix, on_snapshot, on_event, stop, **kw):
            async def listed(kvs, *a):
                await on_snapshot(kvs, *a)
                self.listed.set()

            async def held(event):
                while not self.open and not self.permits:
                    self.wake.clear()
                    await self.wake.wait()
                if not self.open:
                    self.permits -= 1
                await on_event(event)
                kp = ctx.keys.chunk_key_parts(event.kv.key, self.base)
                if kp:
                    self.handled.append((kp[0], kp[1], event.kind, event.kv.mod_revision))
                self.progress.set()
            return await real_watch(etcd, prefix, listed, held, stop, **kw)

        async def create_watch(*a, **kw):
            self.watches += 1
            return await real_create(*a, **kw)
        monkeypatch.setattr(zetcd, "watch_prefix", watch_prefix)
        monkeypatch.setattr(zetcd, "create_watch", create_watch)

    async def __aenter__(self):
        self.task = asyncio.ensure_future(liveness.follow(self.ctx, self.stop))
        await asyncio.wait_for(self.listed.wait(), WAIT)
        return self

    async def __aexit__(self, *exc):
        self.stop.set()
        self.release()
        await asyncio.wait_for(self.task, WAIT)

    def hold(self) -> None:
        self.open = False

    def release(self) -> None:
        self.open = True
        self.wake.set()

    async def step_until(self, cid: str, kind: str, what: str = "PUT") -> tuple[str, str, str, int]:
        """Let events through one by one until ``cid``'s ``kind`` event (``what``) is handled."""
        deadline = time.monotonic() + WAIT
        while True:
            n = len(self.handled)
            self.progress.clear()
            self.permits += 1
            self.wake.set()
            while len(self.handled) == n:
                await asyncio.wait_for(self.progress.wait(), max(0.01, deadline - time.monotonic()))
                self.progress.clear()
            got = self.handled[-1]
            if got[:3] == (cid, kind, what):
                return got


def recorded(ctx, cid, check):
    async def cond():                  # written since cid's last info write, and as ``check`` says
        admin, rev = await admin_of(ctx, cid)
        return admin is not None and rev > await info_rev(ctx, cid) and check(admin.down_since)
    return cond


async def view_of(ctx, cid):
    return next(v for v in await chunks.list_chunks(ctx) if v.chunk_id == cid)


async def test_a_late_registration_event_does_not_make_the_outage_before_it_current(ctx, monkeypatch):
    """c0, recorded down long ago, registers (info, live) and goes down again while the
    follower is behind; the follower handles the info write's event after all that: the old
    outage is not written back as current (a pass then dropped c0's replicas), and once the
    follower has caught up, c0's outage is the current one."""
    vol = await extent_on(ctx, "v", ["c0", "c1", "c2"])
    await chunk_down(ctx, "c0", ago=GRACE * 10)
    async with Lagging(ctx, monkeypatch) as follower:
        follower.hold()
        back = time.time()
        await register_chunk(ctx, "c0", labels={"zone": ZONES["c0"]})
        await ctx.etcd.delete(ctx.keys.chunk_live("c0"))
        await follower.step_until("c0", "info")                  # handled late: c0 down again
        since = (await view_of(ctx, "c0")).down_since
        assert since is None or since >= back - 1, "the outage before the registration is current"
        did = await Recovery(ctx, grace=GRACE).step()
        assert did["dropped"] == [] and did["created"] == []
        follower.release()
        await until(recorded(ctx, "c0", lambda s: s is not None and s >= back - 1),
                    "c0's current outage recorded", WAIT)
    did = await Recovery(ctx, grace=GRACE).step()
    assert did["dropped"] == []
    got, _ = await extents.get_extent(ctx, vol.volume_id, 0)
    assert got.replicas == ["c0", "c1", "c2"]


async def test_a_late_event_of_an_earlier_registration_that_came_up_does_not_either(ctx, monkeypatch):
    """The same when the registration that came up is an earlier one, and the one whose event
    is handled last fails half-way: the first info event sets the outage aside, the live
    events after it drop it."""
    await chunk_down(ctx, "c0", ago=GRACE * 10)
    async with Lagging(ctx, monkeypatch) as follower:
        follower.hold()
        back = time.time()
        await register_chunk(ctx, "c0", labels={"zone": ZONES["c0"]})
        await ctx.etcd.delete(ctx.keys.chunk_live("c0"))
        await register_chunk(ctx, "c0", labels={"zone": ZONES["c0"]}, live=False)
        await follower.step_until("c0", "info")
        since = (await view_of(ctx, "c0")).down_since
        assert since is None or since >= back - 1
        follower.release()
        await until(recorded(ctx, "c0", lambda s: s is not None and s >= back - 1),
                    "c0's current outage recorded", WAIT)


async def test_a_late_half_registration_keeps_the_outage_and_its_grace(ctx, monkeypatch):
    """A registration that never came up, its event handled late with other servers' writes
    in between: c0 was down all along; while its start is set aside the pass counts nothing
    for it (not the old outage, not a new one); then it goes on with its start, and its
    replicas go as the grace is over."""
    vol = await extent_on(ctx, "v", ["c0", "c1", "c2"])
    await chunk_down(ctx, "c0", ago=GRACE * 10)
    old, _ = await admin_of(ctx, "c0")
    async with Lagging(ctx, monkeypatch) as follower:
        follower.hold()
        await register_chunk(ctx, "c0", labels={"zone": ZONES["c0"]}, live=False)
        await register_chunk(ctx, "c3", labels={"zone": ZONES["c3"]})
        await follower.step_until("c0", "info")
        assert (await view_of(ctx, "c0")).to_dict()["down_since"] is None    # set aside
        did = await Recovery(ctx, grace=GRACE).step()
        assert did["dropped"] == []
        follower.release()
        await until(recorded(ctx, "c0", lambda s: s == old.down_since), "c0's outage kept", WAIT)
    did = await Recovery(ctx, grace=GRACE).step()
    assert did["dropped"] == [(vol.volume_id, 0, "c0")]


@pytest.mark.parametrize("rounds", [1, 3])
async def test_a_crash_looping_registration_behind_a_lagging_follower_keeps_its_start(ctx, monkeypatch,
                                                                                     rounds):
    """c0 keeps failing half-way through registering, each time again before the follower
    handled the marker of the one before (its writes overtake the follower): the start set
    aside is carried to each next registration, never restarted; once the follower catches
    up it is written back, and the grace ends when it would have."""
    vol = await extent_on(ctx, "v", ["c0", "c1", "c2"])
    await chunk_down(ctx, "c0", ago=GRACE * 10)
    old, _ = await admin_of(ctx, "c0")
    async with Lagging(ctx, monkeypatch) as follower:
        follower.hold()
        await register_chunk(ctx, "c0", labels={"zone": ZONES["c0"]}, live=False)
        for _ in range(rounds):
            await follower.step_until("c0", "info")          # a marker written: c0 again meanwhile
            await register_chunk(ctx, "c0", labels={"zone": ZONES["c0"]}, live=False)
            await follower.step_until("c0", "admin")         # the marker's event: carried
        follower.release()
        await until(recorded(ctx, "c0", lambda s: s == old.down_since), "c0's outage kept", WAIT)
    did = await Recovery(ctx, grace=GRACE).step()
    assert did["dropped"] == [(vol.volume_id, 0, "c0")]


async def test_the_follower_does_not_wait_while_a_start_is_set_aside(ctx, monkeypatch):
    """c0's registration (never up) sets its outage aside; c1 dies right after. The follower
    handles c1's death next, at once, while c0's marker is still pending (it opens no other
    watch and waits for nothing), then writes c0's start back."""
    await chunk_down(ctx, "c0", ago=GRACE * 10)
    old, _ = await admin_of(ctx, "c0")
    async with Lagging(ctx, monkeypatch) as follower:
        follower.hold()
        await register_chunk(ctx, "c0", labels={"zone": ZONES["c0"]}, live=False)
        await ctx.etcd.delete(ctx.keys.chunk_live("c1"))
        await follower.step_until("c0", "info")
        began = time.monotonic()
        await follower.step_until("c1", "live", "DELETE")
        took = time.monotonic() - began
        c1, _ = await admin_of(ctx, "c1")
        assert c1.down_since is not None                     # c1's death recorded
        c0, c0_rev = await admin_of(ctx, "c0")
        assert c0.down_since is None and c0_rev > await info_rev(ctx, "c0")   # c0 still pending
        assert took < 2.0, f"c1's death took {took:.1f}s to handle"
        follower.release()
        await until(recorded(ctx, "c0", lambda s: s == old.down_since), "c0's outage kept", WAIT)
        assert follower.watches == 1                          # the follower's own watch only


async def test_a_new_term_while_a_start_is_set_aside_records_the_outage_from_now(ctx, monkeypatch):
    """The term ends between the marker and its event: what was set aside is lost with the
    follower's memory, and the next one's listing records the outage from when it sees it
    (as for any outage it did not watch): the grace starts again, it never ends early."""
    vol = await extent_on(ctx, "v", ["c0", "c1", "c2"])
    await chunk_down(ctx, "c0", ago=GRACE * 10)
    async with Lagging(ctx, monkeypatch) as follower:
        follower.hold()
        await register_chunk(ctx, "c0", labels={"zone": ZONES["c0"]}, live=False)
        await follower.step_until("c0", "info")
    before = time.time()
    async with Lagging(ctx, monkeypatch):
        await until(recorded(ctx, "c0", lambda s: s is not None and s >= before - 1),
                    "c0's outage recorded from the new term", WAIT)
    did = await Recovery(ctx, grace=GRACE).step()
    assert did["dropped"] == []
    got, _ = await extents.get_extent(ctx, vol.volume_id, 0)
    assert got.replicas == ["c0", "c1", "c2"]
