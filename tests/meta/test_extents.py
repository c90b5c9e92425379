"""The extent map against a real etcd: allocation, drop and join."""

import asyncio

import pytest

from meta import chunks, extents, volumes
from tests.meta.helpers import make_ctx, register_chunk, register_zones
from zstore.errors import Conflict, InsufficientResources, InvalidArgument, NotFound
from zstore.records import ExtentRecord, RecoveryTask, VolumeOwner

MiB = 2**20
ZONES = {"c0": "a", "c1": "a", "c2": "b", "c3": "c", "c4": "c"}


@pytest.fixture
async def ctx(etcd_client, etcd_config):
    return await register_zones(make_ctx(etcd_client, etcd_config), ZONES)


async def kill(ctx, cid):
    """What a chunk server's death looks like in etcd: its lease key gone, the leader noticed."""
    await ctx.etcd.delete(ctx.keys.chunk_live(cid))
    await chunks.mark_liveness(ctx, cid, False)


def zones(ids):
    return [ZONES[c] for c in ids]


def test_extent_size_matches_the_chunk_servers():
    from chunk.storage.extent_file import EXTENT_SIZE
    assert extents.EXTENT_SIZE == EXTENT_SIZE


async def test_allocation_uses_the_planned_placement(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    rec, created = await extents.allocate(ctx, vol.volume_id, 3)
    assert created and rec.replicas == vol.placement and rec.generation == 1 and rec.stale == {}
    assert sorted(zones(rec.replicas)) == ["a", "b", "c"]
    stored, _ = await ctx.get(ctx.keys.extent(vol.volume_id, 3), ExtentRecord)
    assert stored == rec


async def test_ten_concurrent_allocations_make_one_record(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    dead = next(c for c in vol.placement if ZONES[c] == "a")
    await kill(ctx, dead)                          # the plan is not usable: every caller places anew
    got = await asyncio.gather(*[extents.allocate(ctx, vol.volume_id, 0) for _ in range(10)])
    assert sum(created for _, created in got) == 1
    assert len({tuple(r.replicas) for r, _ in got}) == 1
    assert len(await ctx.list_raw(ctx.keys.extents(vol.volume_id))) == 1
    rec = got[0][0]
    assert dead not in rec.replicas and len(set(rec.replicas)) == 3
    assert sorted(zones(rec.replicas)) == ["a", "b", "c"]      # still one per zone


async def test_partially_usable_plan_keeps_the_usable_part_and_spreads(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    by_zone = {ZONES[c]: c for c in vol.placement}
    await chunks.set_admin_state(ctx, by_zone["b"], "draining")
    await register_chunk(ctx, "c5", labels={"zone": "d"})
    for i in range(5):
        rec, _ = await extents.allocate(ctx, vol.volume_id, i)
        assert by_zone["a"] in rec.replicas and by_zone["c"] in rec.replicas
        assert by_zone["b"] not in rec.replicas
        assert "c5" in rec.replicas                # zone d: the only one not shared with the others


async def test_index_bounds_and_unknown_volume(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", 100 * MiB, 1)     # 2 extents: 0 and 1
    assert (await extents.allocate(ctx, vol.volume_id, "1"))[1]
    with pytest.raises(InvalidArgument) as e:
        await extents.allocate(ctx, vol.volume_id, 2)
    assert "beyond the end" in e.value.message
    for bad in (-1, "x", "1.5", True, None):
        with pytest.raises(InvalidArgument):
            await extents.allocate(ctx, vol.volume_id, bad)
    with pytest.raises(NotFound):
        await extents.allocate(ctx, "0" * 32, 0)
    await volumes.resize_volume(ctx, "v", 200 * MiB)
    assert (await extents.allocate(ctx, vol.volume_id, 2))[1]


async def test_thick_extents_need_room_thin_ones_do_not(etcd_client, etcd_config):
    ctx = make_ctx(etcd_client, etcd_config)
    await register_chunk(ctx, "tiny", capacity=32 * MiB)
    await register_chunk(ctx, "big", capacity=2**30)
    thin, _ = await volumes.create_volume(ctx, "thin", 64 * MiB, 2, thin=True)
    assert sorted((await extents.allocate(ctx, thin.volume_id, 0))[0].replicas) == ["big", "tiny"]
    thick, _ = await volumes.create_volume(ctx, "thick", 16 * MiB, 1, thin=False)
    for i in range(4):   # whatever the plan was, a thick extent never lands on "tiny"
        vol, _ = await volumes.create_volume(ctx, f"thick{i}", 16 * MiB, 1, thin=False)
        assert (await extents.allocate(ctx, vol.volume_id, 0))[0].replicas == ["big"]
    await register_chunk(ctx, "big", capacity=2**30, used=2**30)     # now full
    with pytest.raises(InsufficientResources) as e:
        await extents.allocate(ctx, thick.volume_id, 0)
    assert "cannot place 1 replicas" in e.value.message
    assert await ctx.get_raw(ctx.keys.extent(thick.volume_id, 0)) is None


async def test_drop_rules(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    vid = vol.volume_id
    rec, _ = await extents.allocate(ctx, vid, 0)
    a, b, c = rec.replicas
    rec, changed = await extents.drop(ctx, vid, 0, a, 1, "write timed out")
    assert changed and rec.replicas == [b, c] and rec.generation == 2 and rec.stale == {a: 1}
    # A caller that saw generation 1 drops b: too old, nothing changes, it gets the record to re-read.
    again, changed = await extents.drop(ctx, vid, 0, b, 1, "stale view")
    assert not changed and again == rec
    # Dropping what is already gone is a no-op.
    assert (await extents.drop(ctx, vid, 0, a, 2))[1] is False
    with pytest.raises(Conflict):
        await extents.drop(ctx, vid, 0, b, 7)                      # a generation from the future
    rec, _ = await extents.drop(ctx, vid, 0, b, 2, "EIO")
    assert rec.replicas == [c] and rec.generation == 3 and rec.stale == {a: 1, b: 2}
    with pytest.raises(Conflict) as e:
        await extents.drop(ctx, vid, 0, c, 3, "timeout")
    assert "last in-sync replica" in e.value.message and e.value.details["record"]["replicas"] == [c]
    assert (await extents.get_extent(ctx, vid, 0))[0] == rec
    with pytest.raises(NotFound):
        await extents.drop(ctx, vid, 5, c, 1)
    with pytest.raises(InvalidArgument):
        await extents.drop(ctx, vid, 0, "", 3)
    with pytest.raises(InvalidArgument):
        await extents.drop(ctx, vid, 0, c, "3")


async def test_concurrent_drops_of_one_generation_keep_a_replica(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    rec, _ = await extents.allocate(ctx, vol.volume_id, 0)
    got = await asyncio.gather(*[extents.drop(ctx, vol.volume_id, 0, cid, 1, "race")
                                 for cid in rec.replicas], return_exceptions=True)
    assert sum(1 for g in got if not isinstance(g, Exception) and g[1]) == 1
    final, _ = await extents.get_extent(ctx, vol.volume_id, 0)
    assert len(final.replicas) == 2 and final.generation == 2


async def test_join_rules(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    vid = vol.volume_id
    rec, _ = await extents.allocate(ctx, vid, 0)
    a, b, c = rec.replicas
    await extents.drop(ctx, vid, 0, a, 1, "test")                 # generation 2
    await ctx.etcd.put(ctx.keys.recovery_task(vid, 0), RecoveryTask(
        volume_id=vid, index=0, target=a, kind="resync", executor=a, generation=2).encode())
    with pytest.raises(Conflict) as e:
        await extents.join(ctx, vid, 0, a, 1)                      # resynced against an old generation
    assert e.value.details["record"]["generation"] == 2
    with pytest.raises(Conflict):
        await extents.join(ctx, vid, 0, b, 2)                      # already in sync
    rec = await extents.join(ctx, vid, 0, a, 2)
    assert rec.replicas == [b, c, a] and rec.generation == 3 and rec.stale == {}
    assert await ctx.get_raw(ctx.keys.recovery_task(vid, 0)) is None     # its task is done
    with pytest.raises(Conflict) as e:
        spare = next(c for c in ZONES if c not in rec.replicas)
        await extents.join(ctx, vid, 0, spare, 3)                  # full: no fourth replica
    assert "already has 3 of 3" in e.value.message


async def test_join_keeps_a_task_for_another_target(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    vid = vol.volume_id
    rec, _ = await extents.allocate(ctx, vid, 0)
    a, b, c = rec.replicas
    await extents.drop(ctx, vid, 0, a, 1, "test")
    await extents.drop(ctx, vid, 0, b, 2, "test")
    await ctx.etcd.put(ctx.keys.recovery_task(vid, 0), RecoveryTask(
        volume_id=vid, index=0, target=b, kind="resync", executor=c, generation=3).encode())
    rec = await extents.join(ctx, vid, 0, a, 3)
    assert rec.replicas == [c, a] and rec.stale == {b: 2}
    assert await ctx.get_raw(ctx.keys.recovery_task(vid, 0)) is not None
    with pytest.raises(NotFound):
        await extents.join(ctx, vid, 0, "nobody", 4)


async def test_join_with_an_epoch_requires_that_epoch_to_still_own_the_volume(ctx):
    """A copy made by an owner that was taken over meanwhile proves nothing: the new owner may
    have written the extent without the joining replica."""
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    vid = vol.volume_id
    rec, _ = await extents.allocate(ctx, vid, 0)
    a = rec.replicas[0]
    await extents.drop(ctx, vid, 0, a, 1, "test")                 # generation 2
    with pytest.raises(Conflict) as e:
        await extents.join(ctx, vid, 0, a, 2, 3)                   # no owner at all
    assert "no longer owns" in e.value.message
    await ctx.etcd.put(ctx.keys.owner(vid), VolumeOwner(volume_id=vid, chunk_id="c9", epoch=4).encode())
    with pytest.raises(Conflict) as e:
        await extents.join(ctx, vid, 0, a, 2, 3)                   # epoch 4 took over from 3
    assert "epoch 3 no longer owns the volume (now 4)" in e.value.message
    with pytest.raises(InvalidArgument):
        await extents.join(ctx, vid, 0, a, 2, "4")
    assert (await extents.get_extent(ctx, vid, 0))[0].generation == 2     # nothing changed
    rec = await extents.join(ctx, vid, 0, a, 2, 4)                 # the owner's copy joins
    assert a in rec.replicas and rec.generation == 3


async def test_list_pages_in_index_order(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 1)      # 16 extents
    for i in (9, 0, 15, 3, 4):
        await extents.allocate(ctx, vol.volume_id, i)
    seen, after = [], None
    while True:
        page, after = await extents.list_extents(ctx, vol.volume_id, limit=2, start_after=after)
        seen += [r.index for r in page]
        if after is None:
            break
    assert seen == [0, 3, 4, 9, 15]
    with pytest.raises(InvalidArgument):
        await extents.list_extents(ctx, vol.volume_id, limit=0)


async def test_erasing_a_volume_erases_its_storage_records(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 2)
    keep, _ = await volumes.create_volume(ctx, "keep", "1Gi", 2)
    vid = vol.volume_id
    for v in (vid, keep.volume_id):
        await extents.allocate(ctx, v, 0)
        await ctx.etcd.put(ctx.keys.owner(v), b"{}")
        await ctx.etcd.put(ctx.keys.volop(v, "op1"), b"{}")
        await ctx.etcd.put(ctx.keys.recovery_task(v, 0), b"{}")
    await volumes.delete_volume(ctx, "v")
    for prefix in (ctx.keys.extents(vid), ctx.keys.volops(vid), ctx.keys.recovery(vid)):
        assert await ctx.list_raw(prefix) == []
    assert await ctx.get_raw(ctx.keys.owner(vid)) is None
    other = keep.volume_id
    assert len(await ctx.list_raw(ctx.keys.extents(other))) == 1
    assert await ctx.get_raw(ctx.keys.owner(other)) is not None


async def test_tombstoned_volume_keeps_extents_until_collected(ctx):
    from meta import volops
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 1)
    await extents.allocate(ctx, vol.volume_id, 0)
    await volops.create_snapshot(ctx, "v", "s")
    await volumes.delete_volume(ctx, "v")               # tombstone: the snapshot needs the data
    assert len(await ctx.list_raw(ctx.keys.extents(vol.volume_id))) == 1
    with pytest.raises(NotFound):                        # but no new extents for a deleted volume
        await extents.allocate(ctx, vol.volume_id, 1)
    snap = (await volumes.list_snapshots(ctx))[0]
    await volumes.delete_snapshot_by_id(ctx, snap.snapshot_id)
    assert await ctx.get_raw(ctx.keys.volume(vol.volume_id)) is None
    assert await ctx.list_raw(ctx.keys.extents(vol.volume_id)) == []


async def test_a_tombstoned_volumes_extent_takes_its_recovered_replica_back(ctx):
    """A deleted volume kept for its snapshot still holds the snapshot's data in its extents:
    a replica dropped while it was down must be able to join again after a resync (the join
    answered 404 for a tombstone, and the recovery task retried for ever, holding a slot)."""
    from meta import volops
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    vid = vol.volume_id
    rec, _ = await extents.allocate(ctx, vid, 0)
    a = rec.replicas[0]
    await extents.drop(ctx, vid, 0, a, 1, "test")                  # generation 2
    await volops.create_snapshot(ctx, "v", "s")
    await volumes.delete_volume(ctx, "v")                          # a tombstone now
    rec = await extents.join(ctx, vid, 0, a, 2)
    assert a in rec.replicas and rec.generation == 3


async def test_too_few_usable_servers_place_a_degraded_extent(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    for cid in ("c0", "c1", "c2", "c3"):
        await chunks.set_admin_state(ctx, cid, "draining")
    rec, _ = await extents.allocate(ctx, vol.volume_id, 0)
    assert rec.replicas == ["c4"]                      # the writes go on; recovery adds copies
    await chunks.set_admin_state(ctx, "c4", "draining")
    with pytest.raises(InsufficientResources) as e:
        await extents.allocate(ctx, vol.volume_id, 1)
    assert "5 are down or draining" in e.value.message


async def register_on_host(ctx, cid, host, labels=None):
    """A chunk server whose hostname is ``host`` (several may share one)."""
    from zstore.records import ChunkInfo
    await register_chunk(ctx, cid, labels=labels)
    info, _ = await ctx.get(ctx.keys.chunk_info(cid), ChunkInfo)
    info.hostname = host
    await ctx.etcd.put(ctx.keys.chunk_info(cid), info.encode())


def volume_on(vid, placement, replicas=3):
    from zstore.records import Volume
    return Volume(volume_id=vid, name=vid, size=2**30, replicas=replicas, thin=True,
                  placement=placement, target_index=0, lun=0, wwn="0")


async def test_extent_allocation_refuses_three_replicas_on_one_host(etcd_client, etcd_config):
    ctx = make_ctx(etcd_client, etcd_config)
    for cid in ("s0", "s1", "s2"):
        await register_on_host(ctx, cid, "node1")
    with pytest.raises(InsufficientResources) as e:
        await volumes.create_volume(ctx, "v", "1Gi", 3)
    assert "only 1 failure domain(s) (host=node1); 3 are needed" in e.value.message
    # A volume planned on that host before domains were enforced: its extents are refused too.
    vol = volume_on("vid1", ["s0", "s1", "s2"])
    with pytest.raises(InsufficientResources) as e:
        extents.place_extent(vol, await chunks.list_chunks(ctx))
    assert "only 1 failure domain(s) (host=node1); 3 are needed" in e.value.message
    assert "allow_shared_failure_domain" in e.value.hint
    # ... unless the setting lets replicas share a domain.
    views = await chunks.list_chunks(ctx)
    assert extents.place_extent(vol, views, allow_shared=True) == ["s0", "s1", "s2"]


async def test_extent_on_a_plan_sharing_a_host_moves_a_replica_to_another_host(etcd_client, etcd_config):
    ctx = make_ctx(etcd_client, etcd_config)
    for cid, host in (("s0", "node1"), ("s1", "node1"), ("s2", "node2"), ("s3", "node3")):
        await register_on_host(ctx, cid, host)
    vol = volume_on("vid1", ["s0", "s1", "s2"])
    got = extents.place_extent(vol, await chunks.list_chunks(ctx))
    assert got == ["s0", "s2", "s3"]


async def test_a_down_domain_makes_a_degraded_extent_not_a_shared_one(etcd_client, etcd_config):
    ctx = make_ctx(etcd_client, etcd_config)
    for cid, host in (("s0", "node1"), ("s1", "node1"), ("s2", "node2"), ("s3", "node3")):
        await register_on_host(ctx, cid, host)
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    await kill(ctx, "s3")                          # node3 is down: two domains usable
    for i in range(5):
        rec, _ = await extents.allocate(ctx, vol.volume_id, i)
        assert len(rec.replicas) == 2 and "s2" in rec.replicas, rec.replicas


async def test_a_rebuild_never_adds_a_second_replica_to_a_domain(etcd_client, etcd_config):
    from meta import placement
    views = {"k0": ("node1", {}), "k1": ("node2", {}), "f0": ("node1", {}), "f1": ("node2", {})}
    pool = [placement.Candidate(chunk_id=c, free=2**40, host=h, labels=lab) for c, (h, lab) in views.items()]
    keep, free = pool[:2], pool[2:]
    with pytest.raises(InsufficientResources) as e:
        extents.place_more(free, keep, 1, extents.EXTENT_SIZE)
    assert "host=node1, host=node2" in e.value.message
    assert extents.place_more(free, keep, 1, extents.EXTENT_SIZE, allow_shared=True)[0] in ("f0", "f1")
    # The recovery scheduler waits instead (the extent stays counted as degraded).
    from meta import recovery
    ctx = make_ctx(etcd_client, etcd_config)
    for cid, (host, _) in views.items():
        await register_on_host(ctx, cid, host)
    await register_on_host(ctx, "k2", "node3")
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    rec = ExtentRecord(volume_id=vol.volume_id, index=0, replicas=["k0", "k1"], stale={"k2": 1},
                       generation=2)
    await ctx.etcd.put(ctx.keys.extent(vol.volume_id, 0), rec.encode())
    await ctx.etcd.delete(ctx.keys.chunk_info("k2"))                      # removed for good
    await ctx.etcd.delete(ctx.keys.chunk_live("k2"))
    did = await recovery.Recovery(ctx, grace=0).step()
    assert did["created"] == []
    assert (await recovery.cluster_status(ctx))["degraded_extents"] == 1
    await register_on_host(ctx, "n3", "node3")
    did = await recovery.Recovery(ctx, grace=0).step()
    assert [t[3] for t in did["created"]] == ["n3"]
