"""Deleting a volume while a revert of it is pending or running, against a real etcd.

The delete kept the volume as a tombstone (for its snapshots) and left the revert op: its
executor took ownership of the deleted volume, rewrote it, and its caller was answered
"reverted". A delete now refuses (409, naming the op) while a revert is unfinished; with
force it cancels the op in the same transaction, and the waiting caller hears "cancelled".
"""

import asyncio
import time

import pytest

from meta import volops, volumes
from tests.meta.helpers import Executor, make_ctx, register_zones
from zstore.errors import Conflict, Unavailable, ZError
from zstore.records import Volume, VolumeOp


@pytest.fixture
async def ctx(etcd_client, etcd_config):
    return await register_zones(make_ctx(etcd_client, etcd_config), {"c0": "a", "c1": "b", "c2": "c"})


async def _ops(ctx, vid):
    return [op for _, op in await ctx.list(ctx.keys.volops(vid), VolumeOp)]


async def _pending_revert(ctx):
    """Volume v, its snapshot s, and a revert to s pending (no chunk server runs it here)."""
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    await volops.create_snapshot(ctx, "v", "s")
    with pytest.raises(Unavailable):
        await volops.revert_volume(ctx, "v", "s", timeout=0.2)
    [op] = await _ops(ctx, vol.volume_id)
    assert (op.kind, op.state) == ("revert", "pending")
    return vol, op


async def test_a_delete_without_force_refuses_while_a_revert_is_pending(ctx):
    vol, op = await _pending_revert(ctx)
    with pytest.raises(Conflict, match=f"revert still pending \\(op {op.op_id}, to snapshot 's'"):
        await volumes.delete_volume(ctx, "v")
    assert (await ctx.get(ctx.keys.volume(vol.volume_id), Volume))[0].state != "deleted"
    assert [o.op_id for o in await _ops(ctx, vol.volume_id)] == [op.op_id]
    # Once the revert ran, the delete goes through.
    async with Executor(ctx, op.executor):
        await volops.revert_volume(ctx, "v", "s", timeout=5)
    assert await volumes.delete_volume(ctx, "v") == vol.volume_id


async def test_a_forced_delete_cancels_the_revert_and_its_caller_hears_it(ctx, monkeypatch):
    vol, op = await _pending_revert(ctx)
    real_route, waiting = volops._route_revert, asyncio.Event()

    async def route_and_tell(*args):
        waiting.set()                           # the caller joined the op and waits on it
        return await real_route(*args)

    monkeypatch.setattr(volops, "_route_revert", route_and_tell)
    waiter = asyncio.ensure_future(volops.revert_volume(ctx, "v", "s", timeout=30))   # joins it
    try:
        await asyncio.wait_for(waiting.wait(), 10)
        assert await volumes.delete_volume(ctx, "v", force=True) == vol.volume_id
        with pytest.raises(ZError, match="cancelled"):
            await asyncio.wait_for(waiter, 10)
    finally:
        waiter.cancel()
    tomb, _ = await ctx.get(ctx.keys.volume(vol.volume_id), Volume)
    assert tomb is not None and tomb.state == "deleted"                # kept for s
    assert await _ops(ctx, vol.volume_id) == []                         # nothing left to run


async def test_a_revert_made_after_the_delete_read_the_ops_makes_it_look_again(ctx, monkeypatch):
    """The delete found no revert; before it commits, a revert of the volume is made: its op
    puts the volume back, the delete's compare fails, and it refuses on the next read."""
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    await volops.create_snapshot(ctx, "v", "s")
    real_snapshots_of, raced = volumes._snapshots_of, []

    async def snapshots_then_revert(c, vid):
        got = await real_snapshots_of(c, vid)
        if not raced:
            raced.append(time.monotonic())
            with pytest.raises(Unavailable):
                await volops.revert_volume(c, "v", "s", timeout=0.1)
        return got

    monkeypatch.setattr(volumes, "_snapshots_of", snapshots_then_revert)
    with pytest.raises(Conflict, match="revert still pending"):
        await volumes.delete_volume(ctx, "v")
    assert raced
    assert (await ctx.get(ctx.keys.volume(vol.volume_id), Volume))[0].state != "deleted"


async def test_a_snapshot_waiting_for_a_revert_a_forced_delete_cancels_is_not_committed(ctx):
    """A create waits for the volume's unfinished revert; a forced delete cancels that revert,
    so the volume may hold a half-reverted image: the create fails and leaves nothing."""
    vol, _ = await _pending_revert(ctx)
    create = asyncio.ensure_future(volops.create_snapshot(ctx, "v", "t", timeout=30))
    try:
        for _ in range(100):                    # the create is waiting: its record exists
            if await ctx.get_raw(ctx.keys.snapshot_name(vol.volume_id, "t")) is not None:
                break
            await asyncio.sleep(0.05)
        assert not create.done()
        assert await volumes.delete_volume(ctx, "v", force=True) == vol.volume_id
        with pytest.raises(ZError, match="deleted while the snapshot .t. waited for a revert"):
            await asyncio.wait_for(create, 10)
    finally:
        create.cancel()
    assert await ctx.get_raw(ctx.keys.snapshot_name(vol.volume_id, "t")) is None
    assert [s.name for s in await volumes._snapshots_of(ctx, vol.volume_id)] == ["s"]


async def test_an_op_of_a_newer_zstore_is_taken_as_an_unfinished_revert(ctx):
    """In a rolling upgrade a newer meta wrote an op this one cannot read: skipped as garbage,
    a revert of it went on rewriting the deleted volume. The delete refuses (503), force too."""
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    await volops.create_snapshot(ctx, "v", "s")
    await ctx.etcd.put(ctx.keys.volop(vol.volume_id, "op-from-the-future"),
                       b'{"schema": 99, "kind": "revert", "state": "pending"}')
    for force in (False, True):
        with pytest.raises(Unavailable, match="newer zstore"):
            await volumes.delete_volume(ctx, "v", force=force)
    assert (await ctx.get(ctx.keys.volume(vol.volume_id), Volume))[0].state != "deleted"
