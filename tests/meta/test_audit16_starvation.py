"""Audit 16: a recovery task that keeps failing must not hold the slots from the others."""

from __future__ import annotations

import pytest

from meta import volumes
from meta.recovery import FAILING_PASSES, Recovery
from tests.meta.helpers import chunk_down, make_ctx, register_zones
from zstore.records import ExtentRecord, RecoveryTask

GRACE = 60.0
ZONES = {"c0": "a", "c1": "b", "c2": "c", "c3": "d", "c4": "e"}


@pytest.fixture
async def ctx(etcd_client, etcd_config):
    return await register_zones(make_ctx(etcd_client, etcd_config), ZONES)


async def extent_on(ctx, name, replicas):
    vol, _ = await volumes.create_volume(ctx, name, "1Gi", 3)
    await ctx.etcd.put(ctx.keys.extent(vol.volume_id, 0), ExtentRecord(
        volume_id=vol.volume_id, index=0, replicas=list(replicas)).encode())
    return vol


async def fail_task(ctx, vid):
    key = ctx.keys.recovery_task(vid, 0)
    task = RecoveryTask.decode((await ctx.etcd.get(key)).value)
    task.error = "extent 0 has no readable copy of block 7"      # the executor's record
    await ctx.etcd.put(key, task.encode())


async def test_a_task_that_keeps_failing_gives_its_slot_to_the_next_extent(ctx):
    """One slot; extent a (one live copy) sorts first and its rebuild fails every time (its only
    source cannot be read). Each replanning deleted it and created it again in the same pass,
    first again: extent b never got the slot, however long a's failure lasted."""
    await chunk_down(ctx, "c1", ago=GRACE * 2)
    await chunk_down(ctx, "c2", ago=GRACE * 2)
    a = await extent_on(ctx, "a", ["c0", "c1", "c2"])
    b = await extent_on(ctx, "b", ["c3", "c0", "c1"])
    rec = Recovery(ctx, grace=GRACE, concurrency=1)
    first = await rec.step()
    assert [v for v, *_ in first["created"]] == [a.volume_id]
    created = []
    for _ in range(2 * FAILING_PASSES):
        if await ctx.etcd.get(ctx.keys.recovery_task(a.volume_id, 0)):
            await fail_task(ctx, a.volume_id)
        created += [v for v, *_ in (await rec.step())["created"]]
    assert b.volume_id in created, "extent b never got the slot"
    # a is not given up: once b is whole again (its join deletes its task), a gets the slot.
    await ctx.etcd.delete(ctx.keys.recovery_task(b.volume_id, 0))
    await ctx.etcd.put(ctx.keys.extent(b.volume_id, 0), ExtentRecord(
        volume_id=b.volume_id, index=0, replicas=["c3", "c0", "c4"], generation=5).encode())
    did = await rec.step()
    assert [v for v, *_ in did["created"]] == [a.volume_id]
