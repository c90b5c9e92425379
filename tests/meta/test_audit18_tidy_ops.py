"""The leader's tidying of volume ops past a record it cannot read, against a real etcd.

``tidy_ops`` (the first thing each recovery pass does) and ``move_stranded_reverts`` decoded
every op in the cluster with ``VolumeOp.decode``: one record that does not decode, or one a
newer zstore wrote (a rolling upgrade), raised out of them, and every recovery pass failed
from then on. Such a record is now left alone (the one rule of ``volumes.decoded_op``: an op
of a newer schema is not this code's to tidy or move, garbage is skipped with a log) and the
others are tidied and moved as before.
"""

import time

import pytest

from meta import volops, volumes
from tests.meta.helpers import make_ctx, own, register_zones
from zstore.errors import Unavailable
from zstore.records import VolumeOp

NEWER = b'{"schema": 99, "kind": "revert", "state": "done"}'
GARBAGE = b"{}"
LATER = 10**6


@pytest.fixture
async def ctx(etcd_client, etcd_config):
    return await register_zones(make_ctx(etcd_client, etcd_config), {"c0": "a", "c1": "b", "c2": "c"})


async def test_tidy_ops_goes_on_past_an_op_it_cannot_read(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    await volops.create_snapshot(ctx, "v", "s")
    vid = vol.volume_id
    receipt = VolumeOp(op_id="old", volume_id=vid, kind="revert", snapshot_id="x", executor="c0", state="done")
    for op_id, value in (("garbled", GARBAGE), ("newer", NEWER), ("old", receipt.encode())):
        await ctx.etcd.put(ctx.keys.volop(vid, op_id), value)
    assert await volops.tidy_ops(ctx, now=time.time() + LATER) == ["old"]
    assert [k.rsplit(b"/", 1)[-1] for k, _ in await ctx.list_raw(ctx.keys.volops(vid))] == [b"garbled", b"newer"]


async def test_a_stranded_revert_is_moved_past_an_op_it_cannot_read(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    await volops.create_snapshot(ctx, "v", "s")
    await own(ctx, vol.volume_id, "c1")
    with pytest.raises(Unavailable):
        await volops.revert_volume(ctx, "v", "s", timeout=0.2)          # pending on c1
    await ctx.etcd.put(ctx.keys.volop(vol.volume_id, "garbled"), GARBAGE)
    await ctx.etcd.put(ctx.keys.volop(vol.volume_id, "newer"), NEWER)
    await ctx.etcd.delete(ctx.keys.chunk_live("c1"))                    # its executor dies
    [moved] = await volops.move_stranded_reverts(ctx)
    op, _ = await ctx.get(ctx.keys.volop(vol.volume_id, moved), VolumeOp)
    assert op.kind == "revert" and op.executor != "c1"
