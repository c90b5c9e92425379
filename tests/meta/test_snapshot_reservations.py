"""A snapshot LUN's persistent-reservation state goes with its export.

Chunk servers key a snapshot LUN's reservations by (volume id, the snapshot's seq)
(``keys.reservation(vid, seq)``, acked under ``keys.reservation_acks(vid, seq)``). Unexport
and snapshot delete removed the slot, the pointer and the ACL but not those keys: exporting
the snapshot again (to another host) loaded the old holder's reservation, and the new host got
RESERVATION CONFLICT. Now they are deleted in the same transaction; the volume's own
reservation (view 0) and other snapshots' are left alone.
"""

import pytest

from meta import snapshot_exports, volops, volumes
from tests.meta.helpers import make_ctx, register_chunk
from zstore.records import ReservationRecord

NEXUS = ["iqn.2020-01.com.example:host1,i,0x23d000000001", "iqn.2026-01.io.zstore:x.t0000,t,0x1", 1]


@pytest.fixture
async def ctx(etcd_client, etcd_config):
    c = make_ctx(etcd_client, etcd_config)
    await register_chunk(c, "c0")
    return c


async def reserve(ctx, vid, view):
    rec = ReservationRecord(generation=1, registrations=[[NEXUS, 0xABC]], holder=NEXUS, type=1)
    await ctx.etcd.put(ctx.keys.reservation(vid, view), rec.encode())
    await ctx.etcd.put(ctx.keys.reservation_ack(vid, view, "c0"), b"7")
    await ctx.etcd.put(ctx.keys.reservation_ack(vid, view, "c1"), b"7")


async def reserved(ctx, vid, view):
    """(record present, number of acks) of view ``view`` of volume ``vid``."""
    rec = await ctx.get_raw(ctx.keys.reservation(vid, view))
    return rec is not None, len(await ctx.list_raw(ctx.keys.reservation_acks(vid, view)))


async def setup(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 1)
    s1, _ = await volops.create_snapshot(ctx, "v", "s1")
    s2, _ = await volops.create_snapshot(ctx, "v", "s2")
    assert 0 < s1.seq < s2.seq
    for s in (s1, s2):
        await snapshot_exports.export_snapshot(ctx, f"v@{s.name}")
    for view in (0, s1.seq, s2.seq):
        await reserve(ctx, vol.volume_id, view)
    return vol, s1, s2


async def test_unexport_drops_the_snapshot_luns_reservation(ctx):
    vol, s1, s2 = await setup(ctx)
    await snapshot_exports.unexport_snapshot(ctx, "v@s1")
    assert await reserved(ctx, vol.volume_id, s1.seq) == (False, 0)
    assert await reserved(ctx, vol.volume_id, 0) == (True, 2)          # the volume's own
    assert await reserved(ctx, vol.volume_id, s2.seq) == (True, 2)     # another snapshot's
    await snapshot_exports.export_snapshot(ctx, "v@s1")                # again: a fresh LU
    assert await reserved(ctx, vol.volume_id, s1.seq) == (False, 0)


async def test_deleting_an_exported_snapshot_drops_its_reservation(ctx):
    vol, s1, s2 = await setup(ctx)
    await volumes.delete_snapshot(ctx, "v", "s2", force=True)
    assert await reserved(ctx, vol.volume_id, s2.seq) == (False, 0)
    assert await reserved(ctx, vol.volume_id, 0) == (True, 2)
    assert await reserved(ctx, vol.volume_id, s1.seq) == (True, 2)


async def test_deleting_an_unexported_snapshot_drops_a_leftover_reservation(ctx):
    vol, s1, s2 = await setup(ctx)
    await ctx.etcd.delete(ctx.keys.snapshot_lun(s1.snapshot_id))       # as an unexport before the fix
    await volumes.delete_snapshot(ctx, "v", "s1")
    assert await reserved(ctx, vol.volume_id, s1.seq) == (False, 0)
    assert await reserved(ctx, vol.volume_id, 0) == (True, 2)
    assert await reserved(ctx, vol.volume_id, s2.seq) == (True, 2)


async def test_deleting_the_volume_unexports_its_snapshots_and_their_reservations(ctx):
    vol, s1, s2 = await setup(ctx)
    await volumes.delete_volume(ctx, "v", force=True)                  # a tombstone: it has snapshots
    for s in (s1, s2):
        assert await reserved(ctx, vol.volume_id, s.seq) == (False, 0)
    assert await reserved(ctx, vol.volume_id, 0) == (True, 2)          # erased with the volume
