"""Audit 18: ``down_since`` is the start of a chunk server's current outage (meta/liveness.py).

The leader kept the ``down_since`` it had recorded for as long as it saw the server down.
A server that came back and went down again while no leader watched (a leader change, a
watch relisting) kept the first outage's timestamp: the new outage had its grace counted
from the old one, and the recovery pass dropped and rebuilt the replicas of a server that
was only re-registering. An outage now belongs to the registration it ended: one recorded
before the server's latest registration (its ``info`` key rewritten since) is over.
"""

from __future__ import annotations

import asyncio
import time

from meta import chunks, extents, liveness
from meta.recovery import Recovery
from tests.cluster import until
from tests.meta.helpers import chunk_down, register_chunk
from tests.meta.test_recovery import GRACE, ZONES, ctx, extent_on  # noqa: F401 - ctx: the fixture
from zstore.records import ChunkAdmin


async def admin_of(ctx, cid) -> tuple[ChunkAdmin | None, int]:
    return await ctx.get(ctx.keys.chunk_admin(cid), ChunkAdmin)


async def info_rev(ctx, cid) -> int:
    return (await ctx.etcd.get(ctx.keys.chunk_info(cid))).mod_revision


async def back_and_down_unseen(ctx, cid: str) -> float:
    """``cid`` was recorded down long ago; it registers again and loses its lease again, and
    no leader sees any of it. Returns the time it registered again."""
    await chunk_down(ctx, cid, ago=GRACE * 10)
    back = time.time()
    await register_chunk(ctx, cid, labels={"zone": ZONES[cid]})
    await ctx.etcd.delete(ctx.keys.chunk_live(cid))
    return back


async def test_a_new_leader_records_the_current_outage_not_the_one_before(ctx):
    back = await back_and_down_unseen(ctx, "c0")
    await chunks.mark_liveness(ctx, "c0", False)           # the new leader's listing sees it down
    admin, _ = await admin_of(ctx, "c0")
    assert admin.down_since >= back - 1, "the outage before the re-registration was kept"


async def test_the_follower_after_a_relisting_records_the_current_outage(ctx):
    """The same through ``liveness.follow``: stopped (leader lost), then started again."""
    back = await back_and_down_unseen(ctx, "c0")
    stop = asyncio.Event()
    follower = asyncio.ensure_future(liveness.follow(ctx, stop))
    try:
        async def recorded():
            admin, _ = await admin_of(ctx, "c0")
            return admin.down_since >= back - 1
        await until(recorded, "the follower to record c0's current outage")
    finally:
        stop.set()
        await follower


async def test_a_pass_before_the_follower_does_not_count_an_outage_older_than_the_registration(ctx):
    """Recovery and the liveness follower start together with a term: a pass can run before
    the follower has looked. c0 re-registered since its recorded outage (here it is between
    its info and live writes: up again a moment later); its replicas are not dropped, and no
    rebuild replaces it."""
    vol = await extent_on(ctx, "v", ["c0", "c1", "c2"])
    await chunk_down(ctx, "c0", ago=GRACE * 10)
    await register_chunk(ctx, "c0", labels={"zone": ZONES["c0"]}, live=False)   # info only, so far
    did = await Recovery(ctx, grace=GRACE).step()
    assert did["dropped"] == [] and did["created"] == []
    got, _ = await extents.get_extent(ctx, vol.volume_id, 0)
    assert got.replicas == ["c0", "c1", "c2"]
    view = next(v for v in await chunks.list_chunks(ctx) if v.chunk_id == "c0")
    assert view.to_dict()["down_since"] is None            # not known yet: not the old outage


async def test_a_registration_that_never_comes_up_does_not_postpone_the_grace(ctx):
    """While the follower watches, a down server that writes its info again but never its live
    key (it fails half-way through registering, again and again) is not up: its outage and its
    grace go on, or such a server would keep its extents from being rebuilt for ever."""
    vol = await extent_on(ctx, "v", ["c0", "c1", "c2"])
    stop = asyncio.Event()
    follower = asyncio.ensure_future(liveness.follow(ctx, stop))
    try:
        def marked(up):
            async def check():        # written since c0's last info write, up or down as asked
                admin, rev = await admin_of(ctx, "c0")
                return rev > await info_rev(ctx, "c0") and (admin.down_since is None) == up
            return check
        await until(marked(True), "c0 seen up")
        await ctx.etcd.delete(ctx.keys.chunk_live("c0"))
        await until(marked(False), "c0 seen down")
        first, _ = await admin_of(ctx, "c0")
        for _ in range(3):
            await register_chunk(ctx, "c0", labels={"zone": ZONES["c0"]}, live=False)
            await until(marked(False), "the half registration looked at")
        admin, _ = await admin_of(ctx, "c0")
        assert admin.down_since == first.down_since
    finally:
        stop.set()
        await follower
    did = await Recovery(ctx, grace=GRACE).step(now=first.down_since + GRACE + 1)
    assert did["dropped"] == [(vol.volume_id, 0, "c0")]


async def test_an_outage_recorded_after_the_registration_keeps_its_start(ctx):
    """The ordinary case: the server registered, went down, and the leader recorded it. A
    later look (another leader) keeps that start: the grace is not restarted."""
    await ctx.etcd.delete(ctx.keys.chunk_live("c0"))
    await chunks.mark_liveness(ctx, "c0", False)
    first, _ = await admin_of(ctx, "c0")
    await chunks.mark_liveness(ctx, "c0", False)
    again, _ = await admin_of(ctx, "c0")
    assert again.down_since == first.down_since


async def test_draining_a_down_server_does_not_make_an_old_outage_current(ctx):
    """An admin write that only changes the drain state carries ``down_since`` along: it must not
    make an outage recorded before the server's latest registration look current."""
    back = await back_and_down_unseen(ctx, "c0")
    await chunks.set_admin_state(ctx, "c0", "draining")
    view = next(v for v in await chunks.list_chunks(ctx) if v.chunk_id == "c0")
    since = view.to_dict()["down_since"]
    assert since is None or since >= back - 1
    await chunks.mark_liveness(ctx, "c0", False)
    admin, _ = await admin_of(ctx, "c0")
    assert admin.down_since >= back - 1 and admin.state == "draining"
