"""ACL changes and the volume record, against a real etcd.

``add_acl`` put the volume record back unchanged (no field changed: the record as read,
re-encoded), only so its mod revision moved and a volume delete without force that read the
ACL before the entry failed its compare, looked again and refused. But the coordinator's
snapshot commit (chunk/storage/coordinator.py ``_commit_snapshot``) compares the volume
record's mod revision too, 8 attempts, then the snapshot fails: ACL churn on one volume could
use them up. The entry now moves the volume's name key instead (``volumes.delete_guard``, as
snapshot exports do since c3521e7), which the delete reads before the ACL and compares.
"""

import pytest

from meta import exports, volops, volumes
from tests.meta.helpers import make_ctx, own, register_zones
from zstore.errors import NotFound, Unavailable
from zstore.records import Snapshot, Volume, VolumeOp

ATTEMPTS = 8                    # the coordinator's (chunk/storage/coordinator.py _commit_snapshot)
N = 4                           # changes of each kind between each read and txn of the commit
H = "iqn.2004-10.com.example:h{}"


@pytest.fixture
async def ctx(etcd_client, etcd_config):
    return await register_zones(make_ctx(etcd_client, etcd_config), {"c0": "a", "c1": "b", "c2": "c"})


async def _vrev(ctx, vid):
    return (await ctx.etcd.get(ctx.keys.volume(vid))).mod_revision


async def _acl_churn(ctx, i):
    """N ACL changes: an add, its read-only flip, and (every other) a remove."""
    for j in range(N):
        name = H.format(f"{i}-{j}")
        await exports.add_acl(ctx, "v", name)
        await exports.add_acl(ctx, "v", name, readonly=True)
        if j % 2:
            await exports.remove_acl(ctx, "v", name)


async def _pending_snapshot(ctx, vid):
    """A snapshot ``new`` of the volume served by c0, its op claimed by c0 as the coordinator
    does (``_claim_op``): (snapshot id, op key, the op's claimed bytes)."""
    await own(ctx, vid, "c0")
    with pytest.raises(Unavailable):
        await volops.create_snapshot(ctx, "v", "new", timeout=0.01)
    snap = await volumes.snapshot_named(ctx, "v", "new")
    op_key = ctx.keys.volop(vid, volumes.snapshot_op_id(snap.snapshot_id))
    op, op_rev = await ctx.get(op_key, VolumeOp)
    op.state, op.claim_epoch = "running", 1
    claimed = op.encode()
    t = ctx.etcd.transactions
    ok, _ = await ctx.etcd.transaction(compare=[t.mod(op_key) == op_rev], success=[t.put(op_key, claimed)],
                                       failure=[])
    assert ok
    return snap.snapshot_id, op_key, claimed


async def _commit_like_the_coordinator(ctx, vid, sid, op_key, claimed, churn):
    """chunk/storage/coordinator.py ``_commit_snapshot``'s txn shape: read the volume, then one
    txn comparing the owner's and the volume's mod revisions, the snapshot's, and the op's
    value as claimed; 8 attempts. ``churn(i)`` runs between each read and its txn. The number
    of the attempt that committed, or None when all were lost."""
    t = ctx.etcd.transactions
    okey, vkey, skey = ctx.keys.owner(vid), ctx.keys.volume(vid), ctx.keys.snapshot(sid)
    owner_rev = (await ctx.etcd.get(okey)).mod_revision
    for attempt in range(ATTEMPTS):
        v, vrev = await ctx.get(vkey, Volume)
        s, srev = await ctx.get(skey, Snapshot)
        await churn(attempt)
        op = VolumeOp.decode(claimed)
        s.seq, s.state, s.size = v.snap_seq, "ready", v.size
        v.snap_seq += 1
        op.state, op.error = "done", None
        ok, _ = await ctx.etcd.transaction(
            compare=[t.mod(okey) == owner_rev, t.mod(vkey) == vrev, t.mod(skey) == srev,
                     t.value(op_key) == claimed],
            success=[t.put(vkey, v.encode()), t.put(skey, s.encode()), t.put(op_key, op.encode())], failure=[])
        if ok:
            return attempt
    return None


async def test_acl_changes_leave_the_volume_record_alone(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    before = await _vrev(ctx, vol.volume_id)
    await _acl_churn(ctx, 0)
    assert await _vrev(ctx, vol.volume_id) == before
    assert len(await volumes.acl_entries(ctx, vol.volume_id)) == N - N // 2
    assert all(e.readonly for e in await volumes.acl_entries(ctx, vol.volume_id))


async def test_a_coordinator_commit_is_not_starved_by_acl_churn(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    sid, op_key, claimed = await _pending_snapshot(ctx, vol.volume_id)
    seq = (await ctx.get(ctx.keys.volume(vol.volume_id), Volume))[0].snap_seq

    async def churn(i):
        await _acl_churn(ctx, i)

    assert await _commit_like_the_coordinator(ctx, vol.volume_id, sid, op_key, claimed, churn) == 0, \
        "the ACL changes cost the snapshot commit attempts"
    snap, _ = await ctx.get(ctx.keys.snapshot(sid), Snapshot)
    assert snap.state == "ready" and snap.seq == seq


def _race_after_the_guard_read(monkeypatch, race):
    """Run ``race()`` once, right after the first read of a volume's delete guard: between
    what the operation read and its txn."""
    real, raced = volumes.delete_guard, []

    async def read_then_race(ctx_, vol):
        got = await real(ctx_, vol)
        if not raced:
            raced.append(True)
            await race()
        return got

    monkeypatch.setattr(volumes, "delete_guard", read_then_race)
    return raced


async def test_an_acl_entry_racing_the_delete_of_its_volume_is_refused(ctx, monkeypatch):
    """add_acl read the volume and its guard; the volume is deleted before its txn, kept as a
    tombstone for a snapshot (its ACL dropped): the entry fails its compare and, looking
    again, is refused (404): none outlives the volume."""
    v, _ = await volumes.create_volume(ctx, "v", "1Gi", 1)
    await volops.create_snapshot(ctx, "v", "s")
    raced = _race_after_the_guard_read(monkeypatch, lambda: volumes.delete_volume(ctx, "v"))
    with pytest.raises(NotFound):
        await exports.add_acl(ctx, "v", H.format("late"))
    assert raced and await ctx.list_raw(ctx.keys.acls()) == []
    assert (await ctx.get(ctx.keys.volume(v.volume_id), Volume))[0].state == "deleted"


async def test_a_volume_recreated_under_the_same_name_does_not_take_a_late_acl_entry(ctx, monkeypatch):
    """The volume read is deleted and a new one made under its name before the entry's txn:
    the name key names another volume (its revision moved), so the entry is not put under the
    old volume's id; looking again, it goes to the new volume."""
    old, _ = await volumes.create_volume(ctx, "v", "1Gi", 1)

    async def recreate():
        await volumes.delete_volume(ctx, "v")
        await volumes.create_volume(ctx, "v", "1Gi", 1)

    raced = _race_after_the_guard_read(monkeypatch, recreate)
    entry = await exports.add_acl(ctx, "v", H.format("late"))
    new, _ = await volumes.find_volume(ctx, "v")
    assert raced and new.volume_id != old.volume_id and entry.volume_id == new.volume_id
    assert await ctx.list_raw(ctx.keys.volume_acl(old.volume_id)) == []
