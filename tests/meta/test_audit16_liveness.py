"""Audit 16: chunk liveness bookkeeping across a meta leader failover, against a real etcd."""

from __future__ import annotations

import asyncio
import time

import pytest

from meta import liveness, volumes
from meta.recovery import Recovery
from tests.cluster import async_wait_for
from tests.meta.helpers import chunk_down, make_ctx, register_chunk
from zstore.records import ChunkAdmin, ExtentRecord

GRACE = 60.0


@pytest.fixture
async def ctx(etcd_client, etcd_config):
    c = make_ctx(etcd_client, etcd_config)
    for cid, zone in {"c0": "a", "c1": "b", "c2": "c", "c3": "d"}.items():
        await register_chunk(c, cid, labels={"zone": zone})
    return c


async def follow_once(ctx) -> None:
    """A new leader's liveness follower: its listing handled, then stopped."""
    stop = asyncio.Event()
    task = asyncio.create_task(liveness.follow(ctx, stop))
    try:
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_server_that_came_back_and_died_again_while_no_leader_watched_gets_a_fresh_grace(ctx):
    """c1 went down an hour ago (the old leader recorded it); while no leader was watching it
    came back (registered again: new info, new live key) and went down again a moment ago.
    The new leader's listing kept the hour-old ``down_since``, so the next recovery pass
    dropped c1's replicas at once, a grace period too early."""
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    rec = ExtentRecord(volume_id=vol.volume_id, index=0, replicas=["c0", "c1", "c2"])
    await ctx.etcd.put(ctx.keys.extent(vol.volume_id, 0), rec.encode())
    await chunk_down(ctx, "c1", ago=3600)                  # the old leader's record
    await register_chunk(ctx, "c1", labels={"zone": "b"})  # back, unseen by any leader
    await ctx.etcd.delete(ctx.keys.chunk_live("c1"))       # and down again, just now
    await follow_once(ctx)
    admin, _ = await ctx.get(ctx.keys.chunk_admin("c1"), ChunkAdmin)
    assert admin.down_since is not None and admin.down_since > time.time() - 30, \
        f"down_since is {time.time() - admin.down_since:.0f}s ago"
    done = await Recovery(ctx, grace=GRACE).step()
    assert done["dropped"] == []


async def test_a_server_still_down_since_the_old_leader_saw_it_keeps_its_down_since(ctx):
    """The counterpart: no registration since the old leader recorded the down, so the time
    stands (a failover must not restart the grace either)."""
    await chunk_down(ctx, "c1", ago=3600)
    before, _ = await ctx.get(ctx.keys.chunk_admin("c1"), ChunkAdmin)
    await follow_once(ctx)
    admin, _ = await ctx.get(ctx.keys.chunk_admin("c1"), ChunkAdmin)
    assert admin.down_since == before.down_since
