"""One listing of a volume's unfinished reverts, one rule, against a real etcd.

Four places listed a volume's ops to find an unfinished revert: the snapshot create (it
waits for one), the revert (one at a time), the snapshot delete (not the target of one) and
the volume delete / the stranded-snapshot collection. Two of them decoded with ``ctx.list``:
an op record of a newer schema (a newer zstore wrote it, in a rolling upgrade) or one that
does not decode at all made them raise a raw decode error. Now all go through
``volumes.unfinished_reverts``: an op of a newer schema is an unfinished revert (an upgraded
chunk server may run it), a record that does not decode is skipped with a log.
"""

import logging
import time

import pytest

from meta import volops, volumes
from tests.meta.helpers import make_ctx, register_zones
from zstore.errors import Conflict, Unavailable
from zstore.records import RecordError, Snapshot, Volume, VolumeOp

NEWER = b'{"schema": 99, "kind": "revert", "state": "pending"}'
GARBAGE = b"{}"


@pytest.fixture
async def ctx(etcd_client, etcd_config):
    return await register_zones(make_ctx(etcd_client, etcd_config), {"c0": "a", "c1": "b", "c2": "c"})


async def _ops(ctx, vid):
    """The ops that decode (the test's own garbage left out)."""
    out = []
    for _, value in await ctx.list_raw(ctx.keys.volops(vid)):
        try:
            out.append(VolumeOp.decode(value))
        except RecordError:
            pass
    return out


async def _volume_with_snapshot(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    snap, _ = await volops.create_snapshot(ctx, "v", "s")
    return vol, snap


async def test_a_snapshot_create_waits_for_an_op_of_a_newer_zstore(ctx):
    vol, _ = await _volume_with_snapshot(ctx)
    await ctx.etcd.put(ctx.keys.volop(vol.volume_id, "op-from-the-future"), NEWER)
    with pytest.raises(Unavailable, match="newer zstore"):
        await volops.create_snapshot(ctx, "v", "t", timeout=0.2)
    assert (await volumes.snapshot_named(ctx, "v", "t")).state == "creating"    # not committed


async def test_a_revert_is_refused_beside_an_op_of_a_newer_zstore(ctx):
    vol, _ = await _volume_with_snapshot(ctx)
    key = ctx.keys.volop(vol.volume_id, "op-from-the-future")
    await ctx.etcd.put(key, NEWER)
    with pytest.raises(Unavailable, match="newer zstore"):
        await volops.revert_volume(ctx, "v", "s", timeout=0.2)
    assert [k for k, _ in await ctx.list_raw(ctx.keys.volops(vol.volume_id))] == [key]   # no second op


async def test_a_snapshot_delete_is_refused_beside_an_op_of_a_newer_zstore(ctx):
    """The op may be a revert to this very snapshot, which needs its block versions."""
    vol, snap = await _volume_with_snapshot(ctx)
    await ctx.etcd.put(ctx.keys.volop(vol.volume_id, "op-from-the-future"), NEWER)
    with pytest.raises(Unavailable, match="newer zstore"):
        await volumes.delete_snapshot(ctx, "v", "s")
    assert (await ctx.get(ctx.keys.snapshot(snap.snapshot_id), Snapshot))[0].state == "ready"


async def test_an_op_that_does_not_decode_is_skipped_with_a_log(ctx, caplog):
    """Create, revert, snapshot delete and volume delete all go on past it."""
    vol, _ = await _volume_with_snapshot(ctx)
    await ctx.etcd.put(ctx.keys.volop(vol.volume_id, "garbled"), GARBAGE)
    with caplog.at_level(logging.WARNING, logger="meta.volumes"):
        t, _ = await volops.create_snapshot(ctx, "v", "t")
    assert t.state == "ready"
    assert any("garbled" in r.getMessage() and "does not decode" in r.getMessage() for r in caplog.records)
    with pytest.raises(Unavailable, match="still running"):        # its op made: nobody runs it here
        await volops.revert_volume(ctx, "v", "s", timeout=0.2)
    assert [op.kind for op in await _ops(ctx, vol.volume_id)] == ["revert"]
    await volumes.delete_snapshot(ctx, "v", "t")
    assert await volumes.delete_volume(ctx, "v", force=True) == vol.volume_id     # cancels the revert


async def test_a_stranded_snapshot_beside_an_op_of_a_newer_zstore_is_kept(ctx):
    vol, _ = await _volume_with_snapshot(ctx)
    sid = "f" * 32
    await ctx.etcd.put(ctx.keys.snapshot(sid), Snapshot(snapshot_id=sid, name="old", volume_id=vol.volume_id,
                                                        size=vol.size, state="creating",
                                                        created=time.time() - 3600).encode())
    await ctx.etcd.put(ctx.keys.volop(vol.volume_id, "op-from-the-future"), NEWER)
    await volumes.collect_garbage(ctx)
    assert (await ctx.get(ctx.keys.snapshot(sid), Snapshot))[0].state == "creating"


async def test_every_caller_asks_the_one_listing(ctx, monkeypatch):
    """A revert that only ``volumes.unfinished_reverts`` reports (none is stored) is seen by
    the snapshot create, the revert, the snapshot delete, the volume delete and the
    stranded-snapshot collection alike: no caller lists the ops its own way."""
    vol, snap = await _volume_with_snapshot(ctx)
    await volops.create_snapshot(ctx, "v", "s2")
    other = VolumeOp(op_id="r1", volume_id=vol.volume_id, kind="revert", snapshot_id=snap.snapshot_id,
                     executor="c1")

    async def one_revert(c, vid):
        return [(c.keys.volop(vid, other.op_id), 1, other)] if vid == vol.volume_id else []

    monkeypatch.setattr(volumes, "unfinished_reverts", one_revert)
    with pytest.raises(Unavailable, match="waits for a revert"):
        await volops.create_snapshot(ctx, "v", "t", timeout=0.2)
    [t] = [s for s in await volumes.list_snapshots(ctx, "v") if s.name == "t"]
    t.created = time.time() - 3600
    await ctx.etcd.put(ctx.keys.snapshot(t.snapshot_id), t.encode())
    await volumes.collect_garbage(ctx)
    assert (await ctx.get(ctx.keys.snapshot(t.snapshot_id), Snapshot))[0] is not None   # kept
    with pytest.raises(Conflict, match="a revert to snapshot 's' is still pending"):
        await volops.revert_volume(ctx, "v", "s2", timeout=0.2)
    with pytest.raises(Conflict, match="revert still running"):
        await volumes.delete_snapshot(ctx, "v", "s")
    with pytest.raises(Conflict, match="revert still pending"):
        await volumes.delete_volume(ctx, "v")
    assert (await ctx.get(ctx.keys.volume(vol.volume_id), Volume))[0].state != "deleted"
