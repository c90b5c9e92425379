"""Recovery and its status read the extent map in pages, not in one Range reply.

gRPC's client refuses a reply over ``grpc.max_receive_message_length`` (4 MiB by default):
one Range over every extent record passed that at ~13k extents, and from then on every
recovery pass failed (only logged: degraded extents were never repaired) and ``GET /cluster``
errored. Here the client's limit is 32 KiB and the page 40 keys, so a few hundred records
show the same failure (the auditor's reproduction wrote 20k records under the default limit).
"""

import uuid

import pytest
from aetcd import exceptions as aetcd_exc

from meta import extents, recovery, volumes
from meta.recovery import Recovery, read_world
from tests.meta.helpers import make_ctx, register_chunk
from zstore import etcd as zetcd
from zstore.records import ExtentRecord

from tests.conftest import SMALL_REPLY as LIMIT
N = 400


async def write_extents(ctx, vid, replicas, n):
    ids = list(replicas)
    for start in range(0, n, 100):                      # etcd takes up to 128 ops per txn
        ops = [ctx.put(ctx.keys.extent(vid, i), ExtentRecord(volume_id=vid, index=i, replicas=ids))
               for i in range(start, min(n, start + 100))]
        await ctx.etcd.transaction(compare=[], success=ops, failure=[])


async def test_recovery_and_status_with_more_extents_than_one_reply_holds(small_client, etcd_config,
                                                                        monkeypatch):
    monkeypatch.setattr(zetcd, "PAGE_SIZE", 40, raising=False)
    ctx = make_ctx(small_client, etcd_config)
    for cid, zone in (("c0", "a"), ("c1", "b"), ("c2", "c"), ("c3", "d")):
        await register_chunk(ctx, cid, labels={"zone": zone})
    vol, _ = await volumes.create_volume(ctx, "big", "1Ti", 3)
    vid = vol.volume_id
    await write_extents(ctx, vid, ["c0", "c1"], N)       # every extent one copy short
    with pytest.raises(aetcd_exc.ClientError, match="larger than max"):
        await small_client.get_prefix(ctx.keys.all_extents())    # what one Range does
    assert len(N * ExtentRecord(volume_id=vid, index=0, replicas=["c0", "c1"]).encode()) > LIMIT

    world = await read_world(ctx)
    assert sorted(world.extents) == [(vid, i) for i in range(N)]
    assert all(rev > 0 for _, rev in world.extents.values())
    done = await Recovery(ctx, grace=60, concurrency=4).step()
    assert len(done["created"]) == 4 and {c[2] for c in done["created"]} == {"rebuild"}

    status = await recovery.cluster_status(ctx)
    assert status["degraded_extents"] == N and len(status["tasks"]) == 4
    vstatus = await recovery.volume_status(ctx, vol)
    assert vstatus["extents"]["allocated"] == N and vstatus["extents"]["degraded"] == N
    recs = await extents.all_extents(ctx)
    assert [r.index for r in recs] == list(range(N))
    assert len(await extents.all_extents(ctx, vid)) == N
    assert len(await extents.all_extents(ctx, uuid.uuid4().hex)) == 0


async def test_a_mirrored_prefix_larger_than_one_reply_is_listed_in_pages(small_client, etcd_config,
                                                                         monkeypatch):
    """``watch_prefix`` (a coordinator following its volume's extent map, the chunk catalog)
    lists in pages too: a volume of ~13k extents was one Range over the 4 MiB limit, and the
    mirror's listing failed on every retry."""
    import asyncio
    monkeypatch.setattr(zetcd, "PAGE_SIZE", 40, raising=False)
    ctx = make_ctx(small_client, etcd_config)
    vid = uuid.uuid4().hex
    await write_extents(ctx, vid, ["c0", "c1"], N)
    prefix = ctx.keys.extents(vid)
    stop, got = asyncio.Event(), asyncio.get_running_loop().create_future()

    async def on_snapshot(kvs):
        if not got.done():
            got.set_result(kvs)

    async def on_event(ev):
        pass

    task = asyncio.ensure_future(zetcd.watch_prefix(small_client, prefix, on_snapshot, on_event, stop,
                                                    retry_delay=0.1))
    try:
        kvs = await asyncio.wait_for(got, 20)
        assert len(kvs) == N and [k for k, _ in kvs] == sorted(k for k, _ in kvs)
    finally:
        stop.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
