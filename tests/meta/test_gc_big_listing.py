"""Garbage collection and op tidying read their listings in pages.

``collect_garbage`` read the snapshot and volume prefixes (for their revisions) and
``tidy_ops`` / ``move_stranded_reverts`` the volume-op prefix in one Range each. gRPC's
client refuses a reply over 4 MiB, so past ~20k snapshots or ~10k volume records every
collection failed, for good: deleted volumes and snapshots were never erased, and finished
ops never tidied. Here the client's limit is 32 KiB and the page 40 keys, so a few hundred
records show the same failure (as tests/meta/test_context_big_listing.py does).
"""

import time
import uuid

import pytest
from aetcd import exceptions as aetcd_exc

from meta import volops, volumes
from tests.meta.helpers import make_ctx
from zstore import etcd as zetcd
from zstore.records import Snapshot, Volume, VolumeOp

N = 300


async def put_all(ctx, records):
    items = list(records.items())
    for start in range(0, len(items), 100):                # etcd takes up to 128 ops per txn
        ops = [ctx.put(k, r) for k, r in items[start:start + 100]]
        await ctx.etcd.transaction(compare=[], success=ops, failure=[])


def volume(i, state="ready", vid=None):
    vid = vid or uuid.uuid4().hex
    return Volume(volume_id=vid, name=f"volume-{i}-" + "x" * 60, size=1 << 30, replicas=3,
                  placement=["c" * 32] * 3, wwn="6" * 32, state=state)


async def test_collect_garbage_erases_more_tombstones_than_one_reply_holds(small_client, etcd_config, monkeypatch):
    monkeypatch.setattr(zetcd, "PAGE_SIZE", 40, raising=False)
    ctx = make_ctx(small_client, etcd_config)
    live = volume("live")                                   # has snapshots: kept
    parent = volume("parent", state="deleted")              # a tombstone with a snapshot: kept
    clone_src = Snapshot(snapshot_id=uuid.uuid4().hex, name="cloned", volume_id=live.volume_id,
                         size=1 << 30, state="deleted", seq=1)
    clone = volume("clone")
    clone.source_snapshot = clone_src.snapshot_id           # keeps its deleted snapshot
    kept_snap = Snapshot(snapshot_id=uuid.uuid4().hex, name="kept", volume_id=parent.volume_id,
                         size=1 << 30, seq=2)
    vols = {ctx.keys.volume(v.volume_id): v for v in [live, parent, clone]}
    dead_vols = {}
    for i in range(N):
        v = volume(i, state="deleted")
        dead_vols[ctx.keys.volume(v.volume_id)] = v
    snaps = {ctx.keys.snapshot(s.snapshot_id): s for s in [clone_src, kept_snap]}
    dead_snaps = {}
    for i in range(N):
        s = Snapshot(snapshot_id=uuid.uuid4().hex, name=f"snapshot-{i}-" + "y" * 60,
                     volume_id=live.volume_id, size=1 << 30, state="deleted", seq=10 + i)
        dead_snaps[ctx.keys.snapshot(s.snapshot_id)] = s
    await put_all(ctx, {**vols, **dead_vols, **snaps, **dead_snaps})
    for prefix in (ctx.keys.volumes(), ctx.keys.snapshots()):
        with pytest.raises(aetcd_exc.ClientError, match="larger than max"):
            await small_client.get_prefix(prefix)           # what one Range does

    await volumes.collect_garbage(ctx)

    left_vols = {k: v for k, v in await ctx.list(ctx.keys.volumes(), Volume)}
    assert left_vols == vols
    left_snaps = {k: s for k, s in await ctx.list(ctx.keys.snapshots(), Snapshot)}
    assert left_snaps == snaps


async def test_tidy_ops_over_more_ops_than_one_reply_holds(small_client, etcd_config, monkeypatch):
    monkeypatch.setattr(zetcd, "PAGE_SIZE", 40, raising=False)
    ctx = make_ctx(small_client, etcd_config)
    vid = uuid.uuid4().hex
    old = time.time() - 10 * volops.FINISHED_OP_TTL
    done = {}
    for i in range(N):
        op = VolumeOp(op_id=f"op-{i:04d}-" + "z" * 40, volume_id=vid, kind="snapshot",
                      snapshot_id=uuid.uuid4().hex, executor="c" * 32, state="done", created=old)
        done[ctx.keys.volop(vid, op.op_id)] = op
    pending = VolumeOp(op_id="still-pending", volume_id=vid, kind="snapshot", snapshot_id=uuid.uuid4().hex,
                       executor="c" * 32, state="pending", created=old)
    await put_all(ctx, {**done, ctx.keys.volop(vid, pending.op_id): pending})
    with pytest.raises(aetcd_exc.ClientError, match="larger than max"):
        await small_client.get_prefix(ctx.keys.all_volops())

    assert await volops.move_stranded_reverts(ctx) == []
    removed = await volops.tidy_ops(ctx)
    assert sorted(removed) == sorted(op.op_id for op in done.values())
    assert [op.op_id for _, op in await ctx.list(ctx.keys.all_volops(), VolumeOp)] == ["still-pending"]
