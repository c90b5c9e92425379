"""A freed LUN slot is not handed out again at once.

The allocator took the lowest free slot, so the volume created right after a delete got the
deleted volume's target and LUN. A host that still held the deleted volume's device (a forced
delete, a force-detach) then read and wrote the new volume through it; and the chunk server
posted no REPORTED LUNS DATA HAS CHANGED, the old volume's unit being gone. Now a cursor
(``keys.lun_cursor``) moves past every slot taken, in the create's or export's txn, and a new
LUN takes the first free slot at or after it, wrapping round the whole space.
"""

import asyncio

import pytest

from meta import exports, snapshot_exports, volops, volumes
from tests.meta.helpers import make_ctx, register_chunk
from zstore.errors import InsufficientResources

H1 = "iqn.2020-01.com.example:host1"


@pytest.fixture
async def ctx(etcd_client, etcd_config):
    c = make_ctx(etcd_client, etcd_config)
    await register_chunk(c, "c0")
    return c


def slot(v):
    return (v.target_index, v.lun)


async def test_a_deleted_volumes_slot_is_not_the_next_volumes(ctx):
    v, _ = await volumes.create_volume(ctx, "v", "1Gi", 1)
    assert slot(v) == (0, 1)                                   # a new cluster starts at the start
    await exports.add_acl(ctx, "v", H1)
    await volumes.delete_volume(ctx, "v", force=True)          # H1 may still hold target 0 LUN 1
    w, _ = await volumes.create_volume(ctx, "w", "1Gi", 1)
    assert slot(w) != slot(v)
    assert slot(w) == (0, 2)                                   # still on the same target
    x, _ = await volumes.create_volume(ctx, "x", "1Gi", 1)
    assert slot(x) == (0, 3)


async def test_an_unexported_or_deleted_snapshots_slot_is_not_reused_at_once(ctx):
    await volumes.create_volume(ctx, "x", "1Gi", 1)
    await volops.create_snapshot(ctx, "x", "s1")
    await volops.create_snapshot(ctx, "x", "s2")
    view1, _ = await snapshot_exports.export_snapshot(ctx, "x@s1")
    assert (view1["target_index"], view1["lun"]) == (0, 2)     # export moves the cursor too
    await snapshot_exports.unexport_snapshot(ctx, "x@s1")
    view2, _ = await snapshot_exports.export_snapshot(ctx, "x@s2")
    assert (view2["target_index"], view2["lun"]) != (0, 2)
    await volumes.delete_snapshot(ctx, "x", "s2", force=True)
    y, _ = await volumes.create_volume(ctx, "y", "1Gi", 1)
    assert slot(y) not in {(0, 2), (view2["target_index"], view2["lun"])}
    assert slot(y) == (0, 4)


async def test_a_cluster_without_the_cursor_starts_from_the_first_slot(ctx):
    a, _ = await volumes.create_volume(ctx, "a", "1Gi", 1)
    b, _ = await volumes.create_volume(ctx, "b", "1Gi", 1)
    await volumes.delete_volume(ctx, "a")
    await ctx.etcd.delete(ctx.keys.lun_cursor())               # as a cluster made before it
    c, _ = await volumes.create_volume(ctx, "c", "1Gi", 1)
    assert slot(c) == (0, 1)                                   # absent = from the start
    d, _ = await volumes.create_volume(ctx, "d", "1Gi", 1)
    assert slot(d) == (0, 3)


async def test_the_cursor_wraps_round_the_whole_space(etcd_client, etcd_config):
    ctx = make_ctx(etcd_client, etcd_config, luns_per_target=3, max_targets=2)
    await register_chunk(ctx, "c0")
    got = [(await volumes.create_volume(ctx, f"v{i}", "1Mi", 1))[0] for i in range(5)]
    assert [slot(v) for v in got] == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2)]
    await volumes.delete_volume(ctx, "v1")                    # frees (0, 2)
    await volumes.delete_volume(ctx, "v3")                    # frees (1, 1)
    a, _ = await volumes.create_volume(ctx, "a", "1Mi", 1)
    assert slot(a) == (1, 3)                                   # not (0, 2) nor (1, 1)
    b, _ = await volumes.create_volume(ctx, "b", "1Mi", 1)
    assert slot(b) == (0, 2)                                   # wrapped: first free from the start
    c, _ = await volumes.create_volume(ctx, "c", "1Mi", 1)
    assert slot(c) == (1, 1)
    with pytest.raises(InsufficientResources):
        await volumes.create_volume(ctx, "full", "1Mi", 1)


def test_next_free_slot_over_the_real_space():
    T, L = 4096, 255
    assert volumes.next_free_slot(set(), None, T, L) == (0, 1)
    assert volumes.next_free_slot({(0, 1)}, (0, 1), T, L) == (0, 2)
    assert volumes.next_free_slot(set(), (0, 255), T, L) == (0, 255)
    assert volumes.next_free_slot({(0, 255)}, (0, 255), T, L) == (1, 1)      # next target
    # The last slot taken: round to the first free one of target 0.
    used = {(4095, 255), (0, 1), (0, 2)}
    assert volumes.next_free_slot(used, (4095, 255), T, L) == (0, 3)
    assert volumes.slot_after(4095, 255, T, L) == (0, 1)
    assert volumes.slot_after(7, 255, T, L) == (8, 1)
    assert volumes.slot_after(7, 3, T, L) == (7, 4)
    # A cursor out of range (the space was made smaller) wraps too.
    assert volumes.next_free_slot(set(), (5000, 1), T, L) == ((5000 * L) % (T * L) // L, 1)
    # Every slot taken but one, behind the cursor.
    full = {(t, n) for t in range(T) for n in range(1, L + 1)} - {(3, 7)}
    assert volumes.next_free_slot(full, (100, 1), T, L) == (3, 7)
    assert volumes.next_free_slot(full | {(3, 7)}, (100, 1), T, L) is None


async def test_concurrent_creates_and_exports_never_share_a_slot(ctx):
    await volumes.create_volume(ctx, "src", "1Gi", 1)
    for i in range(5):
        await volops.create_snapshot(ctx, "src", f"s{i}")
    for i in range(3):                                          # free some slots first
        await volumes.create_volume(ctx, f"gone{i}", "1Gi", 1)
        await volumes.delete_volume(ctx, f"gone{i}")
    # Every txn taking a slot compares the one cursor: a burst must not run out of retries.
    res = await asyncio.gather(*[volumes.create_volume(ctx, f"v{i}", "1Gi", 1) for i in range(100)],
                               *[snapshot_exports.export_snapshot(ctx, f"src@s{i}") for i in range(5)])
    slots = [slot(v) for v, _ in res[:100]] + [(e["target_index"], e["lun"]) for e, _ in res[100:]]
    assert len(set(slots)) == 105
    assert not {(0, 2), (0, 3), (0, 4)} & set(slots)           # the freed ones: not yet
    assert len(await ctx.list_raw(ctx.keys.luns())) == 106
