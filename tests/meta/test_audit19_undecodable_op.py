"""An op record that does not decode, at a snapshot's own op key, against a real etcd.

A ``creating`` snapshot whose op key held bytes that do not decode as an op was kept for
ever: the leader's ``tidy_ops`` skipped the record (garbage, logged), the stranded-snapshot
collection left a snapshot alone whose op it cannot read, and no chunk server runs such an
op (its engine skips it), so nothing could ever commit or fail the snapshot. Its name stayed
taken and a deleted volume under it was never reclaimed.

Now the leader's tidying treats such a record, once it has seen it unchanged (same mod
revision) for ``UNDECODABLE_OP_GRACE``, as a failed op: it removes it, logged as an error,
and takes its ``creating`` snapshot and names along, all compared. A record of a newer schema
is not garbage (a newer meta or chunk server may own it) and stays, however old.
"""

import logging

import pytest

from meta import volops, volumes
from tests.meta.helpers import make_ctx, own, register_zones
from zstore.errors import Unavailable
from zstore.records import Snapshot, Volume, VolumeOp

GARBAGE = b"\x00not an op"
NEWER = b'{"schema": 99, "kind": "snapshot", "state": "pending"}'
GRACE = volops.UNDECODABLE_OP_GRACE
T0 = 10**9                      # the tidying's clock (its ``now``), far from the records' own


@pytest.fixture
async def ctx(etcd_client, etcd_config):
    return await register_zones(make_ctx(etcd_client, etcd_config), {"c0": "a", "c1": "b", "c2": "c"})


def tidy(ctx, t):
    """``tidy_ops`` at wall clock and grace clock ``t`` both."""
    return volops.tidy_ops(ctx, now=t, grace_clock=t)


async def _creating_with(ctx, value, name="s"):
    """Volume v owned by c0 (nobody runs its ops); a ``creating`` snapshot of it whose op key
    then holds ``value``."""
    if await ctx.get_raw(ctx.keys.volume_name("v")) is None:
        await volumes.create_volume(ctx, "v", "1Gi", 3)
    vol, _ = await volumes.find_volume(ctx, "v")
    await own(ctx, vol.volume_id, "c0")
    with pytest.raises(Unavailable, match="still waiting for the volume's coordinator"):
        await volops.create_snapshot(ctx, "v", name, timeout=0.2)
    snap = await volumes.snapshot_named(ctx, "v", name)
    assert snap.state == "creating"
    await ctx.etcd.put(_op_key(ctx, snap), value)
    return vol, snap


def _op_key(ctx, snap):
    return ctx.keys.volop(snap.volume_id, volumes.snapshot_op_id(snap.snapshot_id))


async def _snapshot(ctx, sid):
    return (await ctx.get(ctx.keys.snapshot(sid), Snapshot))[0]


async def test_a_creating_snapshot_with_an_undecodable_op_goes_after_the_grace(ctx, caplog):
    vol, snap = await _creating_with(ctx, GARBAGE)
    assert await tidy(ctx, T0) == []                     # first seen
    assert await tidy(ctx, T0 + GRACE - 1) == []         # not for long enough
    assert (await _snapshot(ctx, snap.snapshot_id)).state == "creating"
    with caplog.at_level(logging.ERROR, logger="meta.volops"):
        assert await tidy(ctx, T0 + GRACE + 1) == [volumes.snapshot_op_id(snap.snapshot_id)]
    assert any("does not decode" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    assert await _snapshot(ctx, snap.snapshot_id) is None
    assert await ctx.get_raw(ctx.keys.snapshot_name(vol.volume_id, "s")) is None
    assert await ctx.get_raw(_op_key(ctx, snap)) is None
    # The name is free again, and the deleted volume no longer kept.
    await own(ctx, vol.volume_id, "c0", released=True)
    again, created = await volops.create_snapshot(ctx, "v", "s", timeout=2)
    assert created and again.snapshot_id != snap.snapshot_id and again.state == "ready"
    await volumes.delete_snapshot(ctx, "v", "s")
    await volumes.delete_volume(ctx, "v")
    assert (await ctx.get(ctx.keys.volume(vol.volume_id), Volume))[0] is None


async def test_an_op_of_a_newer_schema_stays_however_old(ctx):
    _, snap = await _creating_with(ctx, NEWER)
    for now in (T0, T0 + 100 * GRACE):
        assert await tidy(ctx, now) == []
    assert await ctx.get_raw(_op_key(ctx, snap)) == NEWER
    assert (await _snapshot(ctx, snap.snapshot_id)).state == "creating"


async def test_a_rewritten_record_starts_its_grace_again(ctx):
    _, snap = await _creating_with(ctx, GARBAGE)
    assert await tidy(ctx, T0) == []
    await ctx.etcd.put(_op_key(ctx, snap), GARBAGE + b"!")              # a new mod revision
    assert await tidy(ctx, T0 + GRACE + 1) == []          # seen as this only now
    assert (await _snapshot(ctx, snap.snapshot_id)).state == "creating"
    assert await tidy(ctx, T0 + 2 * GRACE + 2) == [volumes.snapshot_op_id(snap.snapshot_id)]
    assert await _snapshot(ctx, snap.snapshot_id) is None


async def test_an_undecodable_op_beside_a_ready_snapshot_or_of_no_snapshot_goes_alone(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    snap, _ = await volops.create_snapshot(ctx, "v", "s")
    assert snap.state == "ready"
    await ctx.etcd.put(_op_key(ctx, snap), GARBAGE)
    await ctx.etcd.put(ctx.keys.volop(vol.volume_id, "garbled"), b"{}")
    await tidy(ctx, T0)
    assert sorted(await tidy(ctx, T0 + GRACE + 1)) == sorted(
        ["garbled", volumes.snapshot_op_id(snap.snapshot_id)])
    assert await ctx.list_raw(ctx.keys.volops(vol.volume_id)) == []
    assert (await _snapshot(ctx, snap.snapshot_id)).state == "ready"


async def test_an_op_rewritten_between_the_read_and_the_removal_keeps_the_snapshot(ctx, monkeypatch):
    """The create is repeated meanwhile and hands a readable op to the coordinator: the
    removal fails its compare on the op, and nothing is removed."""
    vol, snap = await _creating_with(ctx, GARBAGE)
    await tidy(ctx, T0)
    real_removal, rewritten = volops.creating_snapshot_removal, []

    async def rewrite_then_removal(c, s, srev):
        rewritten.append(True)
        op = VolumeOp(op_id=volumes.snapshot_op_id(s.snapshot_id), volume_id=vol.volume_id, kind="snapshot",
                      snapshot_id=s.snapshot_id, executor="c1")
        await c.etcd.put(_op_key(c, s), op.encode())
        return await real_removal(c, s, srev)

    monkeypatch.setattr(volops, "creating_snapshot_removal", rewrite_then_removal)
    assert await tidy(ctx, T0 + GRACE + 1) == []
    assert rewritten and (await _snapshot(ctx, snap.snapshot_id)).state == "creating"
    op, _ = await ctx.get(_op_key(ctx, snap), VolumeOp)
    assert (op.executor, op.state) == ("c1", "pending")


# --- a repeated create of the snapshot (``volops._finish``) ---------------------------------
# It decoded the op with ``VolumeOp.decode``: one that does not decode, or one a newer zstore
# wrote, raised a raw decode error (a 500) at every repeat of the create. An op that does not
# decode is now no op: handed over to the volume's coordinator, or replaced by the meta's own
# commit, compared on its revision; one of a newer schema answers 503 (a newer meta's).

async def test_a_repeated_create_hands_a_new_op_over_an_undecodable_one(ctx):
    _, snap = await _creating_with(ctx, GARBAGE)
    with pytest.raises(Unavailable, match="still waiting for the volume's coordinator on chunk server c0"):
        await volops.create_snapshot(ctx, "v", "s", timeout=0.2)
    op, _ = await ctx.get(_op_key(ctx, snap), VolumeOp)
    assert (op.kind, op.executor, op.state, op.snapshot_id) == ("snapshot", "c0", "pending", snap.snapshot_id)


async def test_a_repeated_create_with_no_coordinator_commits_over_an_undecodable_op(ctx):
    vol, snap = await _creating_with(ctx, GARBAGE)
    await own(ctx, vol.volume_id, "c0", released=True)
    again, created = await volops.create_snapshot(ctx, "v", "s", timeout=2)
    assert not created and again.snapshot_id == snap.snapshot_id and again.state == "ready"
    assert await ctx.get_raw(_op_key(ctx, snap)) is None


async def test_a_repeated_create_beside_its_op_of_a_newer_schema_answers_unavailable(ctx):
    vol, snap = await _creating_with(ctx, NEWER)
    await own(ctx, vol.volume_id, "c0", released=True)
    with pytest.raises(Unavailable, match="written by a newer zstore"):
        await volops.create_snapshot(ctx, "v", "s", timeout=0.2)
    assert await ctx.get_raw(_op_key(ctx, snap)) == NEWER
    assert (await _snapshot(ctx, snap.snapshot_id)).state == "creating"


@pytest.mark.parametrize("snapval", [b"\x00garbage", b'{"schema": 99, "snapshot_id": "x"}'])
async def test_an_undecodable_snapshot_beside_its_garbage_op_leaves_both_and_the_pass_goes_on(
        ctx, snapval, caplog):
    """Review of fa3f31f: the snapshot read raised out of ``tidy_ops`` (recovery's first step,
    so every recovery pass failed); now both records stay, logged, and the rest is tidied."""
    vol, _ = await volumes.create_volume(ctx, "w", "1Gi", 3)
    sid = "ab" * 16
    await ctx.etcd.put(ctx.keys.snapshot(sid), snapval)
    key = ctx.keys.volop(vol.volume_id, volumes.snapshot_op_id(sid))
    await ctx.etcd.put(key, GARBAGE)
    other = ctx.keys.volop(vol.volume_id, "zz-garbage")          # listed after it
    await ctx.etcd.put(other, GARBAGE)
    assert await tidy(ctx, T0) == []
    with caplog.at_level(logging.WARNING, logger="meta.volops"):
        assert await tidy(ctx, T0 + GRACE + 1) == ["zz-garbage"]
    assert await ctx.get_raw(key) is not None
    assert await ctx.get_raw(ctx.keys.snapshot(sid)) is not None
    assert await ctx.get_raw(other) is None
    assert sum("left" in r.getMessage() for r in caplog.records) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="meta.volops"):
        assert await tidy(ctx, T0 + GRACE + 2) == []
    assert not any("left" in r.getMessage() for r in caplog.records)   # once per record


async def test_the_grace_is_timed_on_its_own_clock_not_the_wall(ctx):
    """Review of fa3f31f: a wall-clock step of more than the grace (NTP, a VM resumed) must not
    cut it short; the grace runs on ``grace_clock`` (monotonic by default)."""
    vol, snap = await _creating_with(ctx, GARBAGE)
    assert await volops.tidy_ops(ctx, now=T0, grace_clock=5.0) == []
    assert await volops.tidy_ops(ctx, now=T0 + 10 * GRACE, grace_clock=6.0) == []
    assert (await _snapshot(ctx, snap.snapshot_id)).state == "creating"
    assert await volops.tidy_ops(ctx, now=T0 + 10 * GRACE, grace_clock=6.0 + GRACE) == [
        volumes.snapshot_op_id(snap.snapshot_id)]
