"""Snapshot creates and the volume record, against a real etcd.

``create_snapshot`` put the volume record back unchanged with the new ``creating`` snapshot
(no field changed), only so its mod revision moved and a volume delete that listed the
snapshots before it failed its compare and looked again (else it erased the volume under the
new snapshot). But the coordinator's snapshot commit compares the volume record's mod
revision, 8 attempts, then the snapshot fails: creates of other snapshots of the volume could
use them up. A create now moves the volume's name key instead (``volumes.delete_guard``),
which the delete reads before listing the snapshots and compares.
"""

import asyncio

import pytest

from meta import exports, volops, volumes
from tests.meta.helpers import own
from tests.meta.test_audit19_volume_record_acl import (H, N, _acl_churn, _commit_like_the_coordinator,
                                                        _pending_snapshot, _race_after_the_guard_read, _vrev,
                                                        ctx)  # noqa: F401
from zstore.errors import Conflict, NotFound, Unavailable
from zstore.records import Snapshot


async def _snapshot_churn(ctx, i):
    """N snapshot creates of other names; the volume's coordinator (c0, live) never runs them,
    so each stays ``creating`` with its op handed to c0."""
    for j in range(N):
        with pytest.raises(Unavailable):
            await volops.create_snapshot(ctx, "v", f"other-{i}-{j}", timeout=0.01)


async def test_snapshot_creates_leave_the_volume_record_alone(ctx):
    """While a coordinator serves the volume, a create writes the snapshot, its name and its
    op; only the commit (the coordinator's) writes the volume record (its snap_seq)."""
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    await own(ctx, vol.volume_id, "c0")
    before = await _vrev(ctx, vol.volume_id)
    await _snapshot_churn(ctx, 0)
    assert await _vrev(ctx, vol.volume_id) == before
    assert sorted(s.state for s in await volumes.list_snapshots(ctx, "v")) == ["creating"] * N


async def test_a_coordinator_commit_is_not_starved_by_creates_of_other_snapshots(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    sid, op_key, claimed = await _pending_snapshot(ctx, vol.volume_id)

    async def churn(i):
        await _snapshot_churn(ctx, i)
        await _acl_churn(ctx, i)

    assert await _commit_like_the_coordinator(ctx, vol.volume_id, sid, op_key, claimed, churn) == 0, \
        "the snapshot creates cost the snapshot commit attempts"
    assert (await ctx.get(ctx.keys.snapshot(sid), Snapshot))[0].state == "ready"
    assert len(await volumes.list_snapshots(ctx, "v")) == 1 + N


async def test_a_snapshot_create_racing_the_delete_of_its_volume_is_refused(ctx, monkeypatch):
    """The create read the volume and its guard; the volume (no snapshots) is erased before
    the create's txn: the create fails its compare (the name key is gone) and, looking again,
    answers 404, leaving no snapshot of an erased volume behind."""
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 1)
    raced = _race_after_the_guard_read(monkeypatch, lambda: volumes.delete_volume(ctx, "v"))
    with pytest.raises(NotFound):
        await volops.create_snapshot(ctx, "v", "late")
    assert raced and await volumes.list_snapshots(ctx) == []
    assert await ctx.get_raw(ctx.keys.volume(vol.volume_id)) is None


async def test_many_concurrent_acl_adds_and_snapshot_creates_all_land(ctx):
    """The name key is now what they all compare: concurrent ones retry, none is refused."""
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    await own(ctx, vol.volume_id, "c0")
    before = await _vrev(ctx, vol.volume_id)

    async def snap(i):
        try:
            await volops.create_snapshot(ctx, "v", f"c{i}", timeout=0.01)
        except Unavailable:
            pass

    await asyncio.gather(*(exports.add_acl(ctx, "v", H.format(i)) for i in range(10)),
                         *(snap(i) for i in range(10)))
    assert len(await volumes.acl_entries(ctx, vol.volume_id)) == 10
    assert len(await volumes.list_snapshots(ctx, "v")) == 10
    assert await _vrev(ctx, vol.volume_id) == before
    with pytest.raises(Conflict, match="exported to 10 initiator"):
        await volumes.delete_volume(ctx, "v")
