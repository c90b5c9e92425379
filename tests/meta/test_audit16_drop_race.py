"""Audit 16: a recovery pass must not drop the replicas of a server that came back meanwhile."""

from __future__ import annotations

import time

import pytest

from meta import chunks, volumes
from meta.recovery import Recovery, read_world
from tests.meta.helpers import chunk_down, make_ctx, register_chunk
from zstore.records import ExtentRecord

GRACE = 60.0


@pytest.fixture
async def ctx(etcd_client, etcd_config):
    c = make_ctx(etcd_client, etcd_config)
    for cid, zone in {"c0": "a", "c1": "b", "c2": "c", "c3": "d"}.items():
        await register_chunk(c, cid, labels={"zone": zone})
    return c


async def test_a_server_back_between_the_read_and_the_drop_keeps_its_replicas(ctx):
    """c1 was down past the grace when the pass read the chunk servers, and is up again (its
    live key back) by the time the pass writes: the drop compared only the extent record, so
    c1's replica was dropped from an up server (a flap cost a resync of every extent it held,
    and on a long pass over many extents, all of them)."""
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    key = ctx.keys.extent(vol.volume_id, 0)
    await ctx.etcd.put(key, ExtentRecord(volume_id=vol.volume_id, index=0,
                                         replicas=["c0", "c1", "c2"]).encode())
    await chunk_down(ctx, "c1", ago=GRACE * 2)
    r = Recovery(ctx, grace=GRACE)
    world = await read_world(ctx)                            # the pass's read: c1 long down
    await register_chunk(ctx, "c1", labels={"zone": "b"})    # c1 is back
    await chunks.mark_liveness(ctx, "c1", True)
    done = {"dropped": [], "deleted": [], "reassigned": [], "created": []}
    await r._drop_dead(world, time.time(), done)
    got = ExtentRecord.decode((await ctx.etcd.get(key)).value)
    assert got.replicas == ["c0", "c1", "c2"], f"dropped: {done['dropped']}"


async def test_a_server_still_down_past_the_grace_is_dropped(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    key = ctx.keys.extent(vol.volume_id, 0)
    await ctx.etcd.put(key, ExtentRecord(volume_id=vol.volume_id, index=0,
                                         replicas=["c0", "c1", "c2"]).encode())
    await chunk_down(ctx, "c1", ago=GRACE * 2)
    done = await Recovery(ctx, grace=GRACE).step()
    assert [c for _, _, c in done["dropped"]] == ["c1"]
    got = ExtentRecord.decode((await ctx.etcd.get(key)).value)
    assert got.replicas == ["c0", "c2"] and "c1" in got.stale


async def test_a_removed_server_whose_process_puts_its_live_key_back_is_still_dropped(ctx):
    """``zstore chunk remove --force`` on a running server deletes its keys; the process puts
    its live key back at its next refresh (no info key). The drop's "still down" compare
    held such a server's replicas for as long as the process lived (review of 8b718c5: three
    passes, nothing dropped, nothing rebuilt)."""
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    key = ctx.keys.extent(vol.volume_id, 0)
    await ctx.etcd.put(key, ExtentRecord(volume_id=vol.volume_id, index=0,
                                         replicas=["c0", "c1", "c2"]).encode())
    await ctx.etcd.delete_prefix(ctx.keys.chunk_dir("c1"))  # removed
    await ctx.etcd.put(ctx.keys.chunk_live("c1"), b"{}")    # the still-running process's refresh
    done = await Recovery(ctx, grace=GRACE).step()
    assert [c for _, _, c in done["dropped"]] == ["c1"]
    got = ExtentRecord.decode((await ctx.etcd.get(key)).value)
    assert got.replicas == ["c0", "c2"]
