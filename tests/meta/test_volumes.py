"""Volume, snapshot, LUN, ACL and CHAP operations against a real etcd."""

import asyncio

import pytest

from meta import chunks, exports, volops, volumes
from tests.cluster import async_wait_for
from tests.meta.helpers import GiB, make_ctx, register_chunk
from zstore.errors import Conflict, InsufficientResources, InvalidArgument, NotFound, Unavailable
from zstore.etcd import EtcdUnavailable
from zstore.records import LunMapping, Target, Volume


@pytest.fixture
async def ctx(etcd_client, etcd_config):
    c = make_ctx(etcd_client, etcd_config)
    for i, zone in enumerate("abc"):
        await register_chunk(c, f"c{i}", labels={"zone": zone})
    return c


async def test_create_places_replicas_on_distinct_chunks(ctx):
    vol, created = await volumes.create_volume(ctx, "v1", "1Gi", 3)
    assert created and vol.size == GiB and sorted(vol.placement) == ["c0", "c1", "c2"]
    assert vol.lun == 1 and vol.target_index == 0 and len(vol.wwn) == 32 and vol.wwn[0] == "6"
    t, _ = await ctx.get(ctx.keys.target(0), Target)
    assert t.iqn.endswith(".t0000")
    m, _ = await ctx.get(ctx.keys.lun(0, 1), LunMapping)
    assert m.volume_id == vol.volume_id


async def test_create_is_idempotent_and_conflicts_on_other_size(ctx):
    a, c1 = await volumes.create_volume(ctx, "v1", "1Gi", 2)
    b, c2 = await volumes.create_volume(ctx, "v1", 2**30, 2)
    assert c1 and not c2 and a.volume_id == b.volume_id
    with pytest.raises(Conflict) as e:
        await volumes.create_volume(ctx, "v1", "2Gi", 2)
    assert "already exists with size 1Gi (asked 2Gi)" in e.value.message
    with pytest.raises(Conflict):
        await volumes.create_volume(ctx, "v1", "1Gi", 3)


async def test_create_with_a_size_range_accepts_an_existing_volume_in_it(ctx):
    a, _ = await volumes.create_volume(ctx, "v1", "128Mi", 2)
    for low, high in ((64 * 2**20, None), (None, 2**30), (0, None), (128 * 2**20, 128 * 2**20)):
        b, created = await volumes.create_volume(ctx, "v1", "64Mi", 2, min_size=low, max_size=high)
        assert not created and b.volume_id == a.volume_id and b.size == 128 * 2**20
    with pytest.raises(Conflict) as e:
        await volumes.create_volume(ctx, "v1", "256Mi", 2, min_size=256 * 2**20)
    assert "asked at least" in e.value.message
    with pytest.raises(Conflict):
        await volumes.create_volume(ctx, "v1", "64Mi", 2, min_size=0, max_size=100 * 2**20)
    with pytest.raises(Conflict):       # the range relaxes the size only
        await volumes.create_volume(ctx, "v1", "64Mi", 3, min_size=0)
    with pytest.raises(Conflict):       # without a range (the CLI) the size is exact
        await volumes.create_volume(ctx, "v1", "64Mi", 2)
    for bad in (-1, "1Gi", True, 1.5):
        with pytest.raises(InvalidArgument):
            await volumes.create_volume(ctx, "v1", "64Mi", 2, min_size=bad)


async def test_twenty_concurrent_creates_yield_one_volume(ctx):
    results = await asyncio.gather(*[volumes.create_volume(ctx, "same", "1Gi", 3) for _ in range(20)])
    assert len({v.volume_id for v, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    vols = await ctx.list(ctx.keys.volumes(), Volume)
    assert len(vols) == 1
    assert len(await ctx.list_raw(ctx.keys.luns())) == 1


async def test_concurrent_creates_of_different_names_get_distinct_luns(ctx):
    res = await asyncio.gather(*[volumes.create_volume(ctx, f"v{i}", "1Gi", 1) for i in range(12)])
    slots = {(v.target_index, v.lun) for v, _ in res}
    assert len(slots) == 12


async def test_luns_fill_a_target_then_move_to_the_next(etcd_client, etcd_config):
    ctx = make_ctx(etcd_client, etcd_config, luns_per_target=3, max_targets=2)
    await register_chunk(ctx, "c0")
    got = [(await volumes.create_volume(ctx, f"v{i}", "1Mi", 1))[0] for i in range(6)]
    assert [(v.target_index, v.lun) for v in got] == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    with pytest.raises(InsufficientResources):
        await volumes.create_volume(ctx, "v6", "1Mi", 1)
    await volumes.delete_volume(ctx, "v1")
    v, _ = await volumes.create_volume(ctx, "v7", "1Mi", 1)
    assert (v.target_index, v.lun) == (0, 2)
    targets = await exports.list_targets(ctx)
    assert [t["luns"] for t in targets] == [3, 3]


@pytest.mark.parametrize("size", ["0", "-1", "abc", "1.5", "10Zi", "", None, 2**51, "9" * 5000])
async def test_invalid_sizes(ctx, size):
    with pytest.raises(InvalidArgument):
        await volumes.create_volume(ctx, "bad", size, 1)
    assert await ctx.list(ctx.keys.volumes(), Volume) == []


@pytest.mark.parametrize("replicas", [0, 4, "3", True, None])
async def test_invalid_replicas(ctx, replicas):
    with pytest.raises(InvalidArgument):
        await volumes.create_volume(ctx, "bad", "1Gi", replicas)


@pytest.mark.parametrize("name", ["", "a/b", "-x", "x" * 129, "sp ace", "ü"])
async def test_invalid_names(ctx, name):
    with pytest.raises(InvalidArgument):
        await volumes.create_volume(ctx, name, "1Gi", 1)


async def test_sizes_round_up_to_mib(ctx):
    v, _ = await volumes.create_volume(ctx, "odd", 1000, 1)
    assert v.size == 2**20


async def test_too_many_replicas_for_the_cluster(etcd_client, etcd_config):
    ctx = make_ctx(etcd_client, etcd_config)
    await register_chunk(ctx, "a")
    await register_chunk(ctx, "b")
    await register_chunk(ctx, "dead", live=False)
    with pytest.raises(InsufficientResources) as e:
        await volumes.create_volume(ctx, "v", "1Gi", 3)
    assert "only 2 chunk server(s)" in e.value.message and "1 are down or draining" in e.value.message
    assert await ctx.list_raw(ctx.keys.volume_names()) == []


async def test_draining_chunk_gets_no_new_replicas(ctx):
    await chunks.set_admin_state(ctx, "c1", "draining")
    v, _ = await volumes.create_volume(ctx, "v", "1Gi", 2)
    assert sorted(v.placement) == ["c0", "c2"]
    with pytest.raises(InsufficientResources):
        await volumes.create_volume(ctx, "w", "1Gi", 3)
    await chunks.set_admin_state(ctx, "c1", "active")
    assert (await volumes.create_volume(ctx, "w", "1Gi", 3))[1]


async def test_thick_volume_needs_free_space(etcd_client, etcd_config):
    ctx = make_ctx(etcd_client, etcd_config)
    await register_chunk(ctx, "small", capacity=GiB)
    await register_chunk(ctx, "big", capacity=100 * GiB)
    with pytest.raises(InsufficientResources):
        await volumes.create_volume(ctx, "thick", "10Gi", 2, thin=False)
    v, _ = await volumes.create_volume(ctx, "thin", "10Gi", 2, thin=True)
    assert sorted(v.placement) == ["big", "small"]


async def test_resize_grows_only(ctx):
    await volumes.create_volume(ctx, "v", "1Gi", 1)
    assert (await volumes.resize_volume(ctx, "v", "2Gi")).size == 2 * GiB
    assert (await volumes.resize_volume(ctx, "v", "2Gi")).size == 2 * GiB
    with pytest.raises(InvalidArgument) as e:
        await volumes.resize_volume(ctx, "v", "1Gi")
    assert "cannot shrink" in e.value.message
    with pytest.raises(NotFound):
        await volumes.resize_volume(ctx, "nope", "1Gi")


async def test_delete_refused_while_exported_unless_forced(ctx):
    await volumes.create_volume(ctx, "v", "1Gi", 1)
    await exports.add_acl(ctx, "v", "iqn.2004-10.com.example:host1")
    with pytest.raises(Conflict) as e:
        await volumes.delete_volume(ctx, "v")
    assert "exported to 1 initiator" in e.value.message
    await volumes.delete_volume(ctx, "v", force=True)
    with pytest.raises(NotFound):
        await volumes.find_volume(ctx, "v")
    assert await ctx.list_raw(ctx.keys.acls()) == []
    assert await ctx.list_raw(ctx.keys.luns()) == []


async def test_snapshots_and_clones(ctx):
    v, _ = await volumes.create_volume(ctx, "v", "1Gi", 2)
    s, created = await volops.create_snapshot(ctx, "v", "s1")
    s2, created2 = await volops.create_snapshot(ctx, "v", "s1")
    assert created and not created2 and s.snapshot_id == s2.snapshot_id and s.size == GiB
    clone, _ = await volumes.create_volume(ctx, "c", None, 2, source_snapshot="v@s1")
    assert clone.source_snapshot == s.snapshot_id and clone.size == GiB
    with pytest.raises(InvalidArgument):
        await volumes.create_volume(ctx, "small", "1Mi", 2, source_snapshot="v@s1")
    with pytest.raises(NotFound):
        await volumes.create_volume(ctx, "x", None, 2, source_snapshot="v@nope")
    # Deleting the source volume keeps it as a tombstone while its snapshot lives.
    await volumes.delete_volume(ctx, "v")
    with pytest.raises(NotFound):
        await volumes.find_volume(ctx, "v")
    assert (await ctx.get(ctx.keys.volume(v.volume_id), Volume))[0].state == "deleted"
    # The name is free again.
    v2, created = await volumes.create_volume(ctx, "v", "1Gi", 2)
    assert created and v2.volume_id != v.volume_id
    # Snapshots survive their volume's deletion and are listed.
    assert [x.snapshot_id for x in await volumes.list_snapshots(ctx)] == [s.snapshot_id]


async def test_a_retried_clone_create_finds_its_volume_after_the_snapshot_is_deleted(ctx):
    await volumes.create_volume(ctx, "v", "1Gi", 2)
    s, _ = await volops.create_snapshot(ctx, "v", "s1")
    a, _ = await volumes.create_volume(ctx, "c", None, 2, source_snapshot=s.snapshot_id)
    b, _ = await volumes.create_volume(ctx, "d", "2Gi", 2, source_snapshot=s.snapshot_id)
    await volumes.delete_snapshot_by_id(ctx, s.snapshot_id)
    again, created = await volumes.create_volume(ctx, "c", None, 2, source_snapshot=s.snapshot_id)
    assert not created and again.volume_id == a.volume_id
    again, created = await volumes.create_volume(ctx, "d", "2Gi", 2, source_snapshot=s.snapshot_id)
    assert not created and again.volume_id == b.volume_id
    with pytest.raises(Conflict):       # the name with another source, or none
        await volumes.create_volume(ctx, "d", "2Gi", 2, source_snapshot="0" * 32)
    with pytest.raises(Conflict):
        await volumes.create_volume(ctx, "d", "2Gi", 2)
    with pytest.raises(Conflict):
        await volumes.create_volume(ctx, "v", "1Gi", 2, source_snapshot=s.snapshot_id)
    with pytest.raises(NotFound):       # a new clone of the deleted snapshot
        await volumes.create_volume(ctx, "e", None, 2, source_snapshot=s.snapshot_id)


async def test_tombstones_are_collected_when_unreferenced(ctx):
    v, _ = await volumes.create_volume(ctx, "v", "1Gi", 1)
    s, _ = await volops.create_snapshot(ctx, "v", "s")
    c, _ = await volumes.create_volume(ctx, "c", None, 1, source_snapshot="v@s")
    await volumes.delete_snapshot(ctx, "v", "s")        # kept: the clone references it
    assert await ctx.get_raw(ctx.keys.snapshot(s.snapshot_id)) is not None
    assert await volumes.list_snapshots(ctx) == []
    await volumes.delete_volume(ctx, "v")               # snapshot tombstone still there -> kept
    assert await ctx.get_raw(ctx.keys.volume(v.volume_id)) is not None
    await volumes.delete_volume(ctx, "c")               # last reference gone: all erased
    assert await ctx.get_raw(ctx.keys.snapshot(s.snapshot_id)) is None
    assert await ctx.get_raw(ctx.keys.volume(v.volume_id)) is None
    assert await ctx.get_raw(ctx.keys.volume(c.volume_id)) is None


async def test_acl_added_during_a_tombstoning_delete_is_refused(ctx, monkeypatch):
    """add_acl found the volume, then a delete kept it as a tombstone (a snapshot lives) and
    dropped its ACL: the entry must not be put after that, where it would outlive the volume."""
    v, _ = await volumes.create_volume(ctx, "v", "1Gi", 1)
    s, _ = await volops.create_snapshot(ctx, "v", "s")
    real = exports.find_volume
    raced = []

    async def find_then_delete(ctx_, ref):
        found = await real(ctx_, ref)
        if not raced:
            raced.append(ref)
            await volumes.delete_volume(ctx, "v")
        return found

    monkeypatch.setattr(exports, "find_volume", find_then_delete)
    with pytest.raises(NotFound):
        await exports.add_acl(ctx, "v", "iqn.2004-10.com.example:late")
    assert raced and await ctx.list_raw(ctx.keys.acls()) == []
    # The tombstone goes with its last snapshot, and with it anything under its ACL prefix.
    assert await ctx.txn([], [ctx.put(ctx.keys.acl(v.volume_id, "iqn.2004-10.com.example:stray"), b"x")])
    await volumes.delete_snapshot_by_id(ctx, s.snapshot_id)
    assert await ctx.get_raw(ctx.keys.volume(v.volume_id)) is None
    assert await ctx.list_raw(ctx.keys.acls()) == []


async def test_garbage_collection_keeps_a_tombstone_whose_snapshot_came_after_its_listing(ctx, monkeypatch):
    """The collector lists snapshots, then volumes. A snapshot taken and its volume deleted
    in between: the volume shows as a tombstone and the first listing has no snapshot of it.
    Erasing it then would take the extent map the snapshot's data lives in."""
    v, _ = await volumes.create_volume(ctx, "v", "1Gi", 1)
    real_list, raced = ctx.list, []

    async def list_with_race(prefix, cls):
        if prefix == ctx.keys.volumes() and not raced:
            raced.append(True)
            await volops.create_snapshot(ctx, "v", "s")
            await volumes.delete_volume(ctx, "v")
        return await real_list(prefix, cls)

    monkeypatch.setattr(ctx, "list", list_with_race)
    await volumes.collect_garbage(ctx)
    assert raced
    vol, _ = await ctx.get(ctx.keys.volume(v.volume_id), Volume)
    assert vol is not None and vol.state == "deleted"
    assert [s.name for s in await volumes.list_snapshots(ctx)] == ["s"]


async def test_an_acl_entry_added_during_a_delete_without_force_makes_it_refuse(ctx, monkeypatch):
    """A delete without force reads the ACL (empty), then commits. An initiator added in
    between moves the volume's revision, so the delete looks again and refuses instead of
    removing a volume someone was just given."""
    await volumes.create_volume(ctx, "v", "1Gi", 1)
    real, raced = volumes.acl_entries, []

    async def read_then_add(ctx_, vid):
        got = await real(ctx_, vid)
        if not raced:
            raced.append(True)
            await exports.add_acl(ctx, "v", "iqn.2004-10.com.example:new")
        return got

    monkeypatch.setattr(volumes, "acl_entries", read_then_add)
    with pytest.raises(Conflict, match="exported to 1 initiator"):
        await volumes.delete_volume(ctx, "v")
    assert raced and (await volumes.find_volume(ctx, "v"))[0].name == "v"


async def test_wrongly_typed_references_are_invalid_arguments(ctx):
    await volumes.create_volume(ctx, "v", "1Gi", 1)
    for bad in (5, ["@"], ""):
        with pytest.raises(InvalidArgument):
            await volumes.create_volume(ctx, "c", None, 1, source_snapshot=bad)
    with pytest.raises(InvalidArgument):
        await exports.clear_chap(ctx, "v", 5)


async def test_list_pagination(ctx):
    for i in range(7):
        await volumes.create_volume(ctx, f"vol{i:02d}", "1Mi", 1)
    names, token = [], None
    while True:
        page, token = await volumes.list_volumes(ctx, limit=3, start_after=token)
        names += [v.name for v in page]
        if token is None:
            break
    assert names == [f"vol{i:02d}" for i in range(7)]


async def test_acl_add_is_idempotent_and_validates(ctx):
    await volumes.create_volume(ctx, "v", "1Gi", 1)
    iqn = "iqn.1994-05.com.redhat:abc"
    a = await exports.add_acl(ctx, "v", iqn)
    b = await exports.add_acl(ctx, "v", iqn)
    assert a.added == b.added
    _, entries = await exports.list_acl(ctx, "v")
    assert [e.initiator for e in entries] == [iqn]
    with pytest.raises(InvalidArgument):
        await exports.add_acl(ctx, "v", "not an iqn")
    await exports.remove_acl(ctx, "v", iqn)
    with pytest.raises(NotFound):
        await exports.remove_acl(ctx, "v", iqn)


async def test_chap_secrets_never_listed(ctx):
    v, _ = await volumes.create_volume(ctx, "v", "1Gi", 1)
    rec = await exports.set_chap(ctx, {"target": "v", "initiator": "iqn.2004-10.com.example:h1",
                                       "user": "u1", "secret": "supersecret123",
                                       "mutual_user": "tgt", "mutual_secret": "othersecret456"})
    assert rec.target.endswith(".t0000")
    listed = await exports.list_chap(ctx)
    assert listed and "supersecret123" not in repr(listed) and "othersecret456" not in repr(listed)
    assert "supersecret123" not in repr(rec)
    assert listed[0]["mutual"] is True
    with pytest.raises(InvalidArgument):
        await exports.set_chap(ctx, {"target": "*", "initiator": "iqn.2004-10.com.example:h1",
                                     "user": "u", "secret": "short"})
    with pytest.raises(InvalidArgument):
        await exports.set_chap(ctx, {"target": "*", "initiator": "iqn.2004-10.com.example:h1",
                                     "user": "u", "secret": "samesecret123", "mutual_user": "m",
                                     "mutual_secret": "samesecret123"})
    await exports.clear_chap(ctx, "v", "iqn.2004-10.com.example:h1")
    assert await exports.list_chap(ctx) == []


async def test_a_unique_snapshot_name_is_taken_once_across_volumes_even_concurrently(ctx, monkeypatch):
    await volumes.create_volume(ctx, "a", "1Gi", 1)
    await volumes.create_volume(ctx, "b", "1Gi", 1)
    # Both creates read the unique name free before either commits (the race CSI hit).
    real, reads = volops._unique_name_taken, []
    both_read = asyncio.Event()

    async def slow(*args):
        got = await real(*args)
        reads.append(1)
        if len(reads) == 2:
            both_read.set()
        await asyncio.wait_for(both_read.wait(), 10)
        return got
    monkeypatch.setattr(volops, "_unique_name_taken", slow)
    res = await asyncio.gather(*(volops.create_snapshot(ctx, v, "x", unique=True) for v in "ab"),
                               return_exceptions=True)
    monkeypatch.setattr(volops, "_unique_name_taken", real)
    won = [r for r in res if not isinstance(r, BaseException)]
    assert len(won) == 1 and [type(r) for r in res if isinstance(r, BaseException)] == [Conflict]
    winner = won[0][0]
    loser = "b" if winner.volume_id == (await volumes.find_volume(ctx, "a"))[0].volume_id else "a"
    again, created = await volops.create_snapshot(ctx, winner.volume_id, "x", unique=True)   # a retry
    assert not created and again.snapshot_id == winner.snapshot_id
    with pytest.raises(Conflict):
        await volops.create_snapshot(ctx, loser, "x", unique=True)
    # Per-volume names (the CLI) are not affected.
    other, _ = await volops.create_snapshot(ctx, loser, "x")
    await volumes.delete_snapshot_by_id(ctx, other.snapshot_id)
    # Deleting the holder frees the name for the other volume.
    await volumes.delete_snapshot_by_id(ctx, winner.snapshot_id)
    assert await ctx.get_raw(ctx.keys.snapshot_unique_name("x")) is None
    taken, created = await volops.create_snapshot(ctx, loser, "x", unique=True)
    assert created and await ctx.get_raw(ctx.keys.snapshot_unique_name("x")) == taken.snapshot_id.encode()
    # A key left naming a snapshot that is gone is taken over.
    await ctx.txn([], [ctx.put(ctx.keys.snapshot_unique_name("y"), "0" * 32)])
    y, created = await volops.create_snapshot(ctx, "a", "y", unique=True)
    assert created and await ctx.get_raw(ctx.keys.snapshot_unique_name("y")) == y.snapshot_id.encode()


async def test_snapshot_of_a_deleted_volume_can_be_deleted_by_id(ctx):
    v, _ = await volumes.create_volume(ctx, "v", "1Gi", 1)
    s, _ = await volops.create_snapshot(ctx, "v", "s")
    await volumes.delete_volume(ctx, "v")                    # tombstoned: the snapshot references it
    assert await ctx.get_raw(ctx.keys.volume(v.volume_id)) is not None
    await volumes.delete_snapshot_by_id(ctx, s.snapshot_id)
    assert await ctx.get_raw(ctx.keys.snapshot(s.snapshot_id)) is None
    assert await ctx.get_raw(ctx.keys.volume(v.volume_id)) is None     # last reference gone
    with pytest.raises(NotFound):
        await volumes.delete_snapshot_by_id(ctx, s.snapshot_id)


async def test_a_clone_made_while_its_snapshot_is_deleted_keeps_its_parent(ctx, monkeypatch):
    """The delete lists the volumes (no clone yet), then a clone of the snapshot commits, then
    the delete's transaction runs: it must fail its compare and keep the snapshot as the
    clone's parent (a tombstone), not erase it."""
    await volumes.create_volume(ctx, "v", "1Gi", 2)
    snap, _ = await volops.create_snapshot(ctx, "v", "s")
    real, cloned = ctx.list, []

    async def list_then_clone(prefix, cls):
        got = await real(prefix, cls)
        if prefix == ctx.keys.volumes() and not cloned:
            cloned.append(await volumes.create_volume(ctx, "clone", None, 2, source_snapshot="v@s"))
        return got
    monkeypatch.setattr(ctx, "list", list_then_clone)
    await volumes.delete_snapshot(ctx, "v", "s")
    kept, _ = await ctx.get(ctx.keys.snapshot(snap.snapshot_id), type(snap))
    assert cloned and kept is not None and kept.state == "deleted"
    assert cloned[0][0].source_snapshot == snap.snapshot_id


async def test_a_snapshot_made_while_its_volume_is_deleted_keeps_the_volume(ctx, monkeypatch):
    """The delete lists the snapshots (none yet), then a snapshot of the volume commits its
    first record, then the delete's transaction runs: it must look again and keep the volume
    as a tombstone for that snapshot, not erase it from under it."""
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 2)

    async def no_finish(ctx_, vol_, snap, deadline):       # the snapshot stays "creating"
        return snap
    monkeypatch.setattr(volops, "_finish", no_finish)
    real, made = volumes._snapshots_of, []                 # noqa: SLF001

    async def list_then_snapshot(ctx_, vid):
        got = await real(ctx_, vid)
        if not made:
            made.append((await volops.create_snapshot(ctx, "v", "s"))[0])
        return got
    monkeypatch.setattr(volumes, "_snapshots_of", list_then_snapshot)
    await volumes.delete_volume(ctx, "v")
    kept, _ = await ctx.get(ctx.keys.volume(vol.volume_id), Volume)
    assert made and kept is not None and kept.state == "deleted"
    assert (await ctx.get(ctx.keys.snapshot(made[0].snapshot_id), type(made[0])))[0] is not None


async def test_an_upper_case_iqn_names_the_same_acl_entry_as_the_lower_case_one(ctx):
    """RFC 3720 3.2.6.2: iSCSI names are case-insensitive; the ACL keeps the lower-case form."""
    await volumes.create_volume(ctx, "v", "1Gi", 1)
    a = await exports.add_acl(ctx, "v", "IQN.2004-10.com.Example:Host1")
    b = await exports.add_acl(ctx, "v", "iqn.2004-10.com.example:host1")
    assert a.initiator == b.initiator == "iqn.2004-10.com.example:host1" and a.added == b.added
    _, entries = await exports.list_acl(ctx, "v")
    assert [e.initiator for e in entries] == ["iqn.2004-10.com.example:host1"]
    assert await exports.remove_acl(ctx, "v", "iqn.2004-10.com.EXAMPLE:HOST1") == "iqn.2004-10.com.example:host1"
    assert (await exports.list_acl(ctx, "v"))[1] == []


@pytest.mark.parametrize("bad", ["iqn.2004-10.com.example:a/b", "iqn.2004-10.com.example:a\x00",
                                 "iqn.2004-10.com.example:a_b", "iqn.2004-10.com.example:*"])
async def test_acl_and_chap_refuse_invalid_iscsi_names(ctx, bad):
    await volumes.create_volume(ctx, "v", "1Gi", 1)
    with pytest.raises(InvalidArgument):
        await exports.add_acl(ctx, "v", bad)
    with pytest.raises(InvalidArgument):
        await exports.remove_acl(ctx, "v", bad)
    with pytest.raises(InvalidArgument):
        await exports.set_chap(ctx, {"target": "v", "initiator": bad, "user": "u",
                                     "secret": "supersecret123"})
    assert (await exports.list_acl(ctx, "v"))[1] == [] and await exports.list_chap(ctx) == []


async def test_entries_stored_before_normalization_can_still_be_removed(ctx):
    """An ACL entry or CHAP record written under an upper-case or now-invalid name by an older
    version is not lost: removing it by the name it was stored under still works."""
    from zstore.records import AclEntry, ChapRecord
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 1)
    target = await exports.target_iqn_of(ctx, vol)
    for name in ("iqn.2004-10.com.example:Old", "iqn.2004-10.com.example:old_one"):
        await ctx.txn([], [ctx.put(ctx.keys.acl(vol.volume_id, name),
                                   AclEntry(volume_id=vol.volume_id, initiator=name, readonly=False)),
                           ctx.put(ctx.keys.chap(target, name),
                                   ChapRecord(target=target, initiator=name, user="u", secret="supersecret123",
                                              mutual_user=None, mutual_secret=None, changed=1.0))])
        await exports.remove_acl(ctx, "v", name)
        await exports.clear_chap(ctx, "v", name)
    assert (await exports.list_acl(ctx, "v"))[1] == [] and await exports.list_chap(ctx) == []


async def test_chap_is_set_and_cleared_under_the_lower_case_name(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 1)
    target = await exports.target_iqn_of(ctx, vol)
    rec = await exports.set_chap(ctx, {"target": target.upper(), "initiator": "iqn.2004-10.com.Example:H1",
                                       "user": "u1", "secret": "supersecret123"})
    assert (rec.target, rec.initiator) == (target, "iqn.2004-10.com.example:h1")
    await exports.clear_chap(ctx, "v", "IQN.2004-10.COM.EXAMPLE:H1")
    assert await exports.list_chap(ctx) == []


CHAP = {"target": "*", "initiator": "iqn.2004-10.com.example:h1", "user": "u1", "secret": "supersecret123"}


@pytest.mark.parametrize("mutual_user", ["", 123, "a\x00b", "a\nb", "x" * 256, "\u00e9" * 128, "\ud800"])
async def test_a_bad_mutual_user_is_refused_not_stored(ctx, mutual_user):
    """An empty or non-string mutual user was stored: `chap list` said mutual, the target
    quietly did one-way CHAP."""
    with pytest.raises(InvalidArgument, match="mutual CHAP user name"):
        await exports.set_chap(ctx, {**CHAP, "mutual_user": mutual_user, "mutual_secret": "othersecret456"})
    assert await exports.list_chap(ctx) == []


@pytest.mark.parametrize("user", ["", None, 123, "a\x00b", "x" * 256, "\u00e9" * 128])
async def test_a_bad_user_is_refused(ctx, user):
    with pytest.raises(InvalidArgument, match="CHAP user name"):
        await exports.set_chap(ctx, {**CHAP, "user": user})
    assert await exports.list_chap(ctx) == []


async def test_chap_secret_length_counts_utf8_bytes(ctx):
    """The secret is used as its UTF-8 bytes, so the 12..255 limits are bytes."""
    for secret in ("\u00e9" * 128, "\u00e9" * 5 + "x", "\ud800" * 20):    # 256 bytes; 11 bytes; not UTF-8
        with pytest.raises(InvalidArgument, match="12 to 255 bytes"):
            await exports.set_chap(ctx, {**CHAP, "secret": secret})
        with pytest.raises(InvalidArgument, match="12 to 255 bytes"):
            await exports.set_chap(ctx, {**CHAP, "mutual_user": "t", "mutual_secret": secret})
    assert await exports.list_chap(ctx) == []
    await exports.set_chap(ctx, {**CHAP, "secret": "\u00e9" * 6, "mutual_user": "t\u00e9",
                                 "mutual_secret": "x" + "\u00e9" * 127})          # 12 and 255 bytes
    [listed] = await exports.list_chap(ctx)
    assert listed["mutual"] is True and listed["mutual_user"] == "t\u00e9"


@pytest.mark.parametrize("error", [Unavailable("this meta server is no longer the leader"),
                                   EtcdUnavailable("etcd went away")], ids=["lost-leadership", "etcd"])
async def test_a_failing_garbage_collection_does_not_fail_a_committed_delete(ctx, monkeypatch, caplog, error):
    """The delete has committed when GC runs; a GC error answered 503/500, the CLI retried
    and got 404. Now GC is best effort: logged, and the next delete collects again."""
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 1)
    first, _ = await volops.create_snapshot(ctx, "v", "s1")
    snap, _ = await volops.create_snapshot(ctx, "v", "s2")
    real = volumes.collect_garbage

    async def failing(ctx_):
        raise error
    monkeypatch.setattr(volumes, "collect_garbage", failing)
    assert await volumes.delete_snapshot(ctx, "v", "s1") == first.snapshot_id
    assert await volumes.delete_volume(ctx, "v") == vol.volume_id          # tombstone: s2 refers to it
    assert await volumes.delete_snapshot_by_id(ctx, snap.snapshot_id) == snap.snapshot_id
    assert "garbage collection after deleting snapshot s1" in caplog.text
    assert "garbage collection after deleting volume v failed" in caplog.text and str(error) in caplog.text
    with pytest.raises(NotFound):
        await volumes.find_volume(ctx, "v")
    assert await volumes.list_snapshots(ctx) == []
    stale, _ = await ctx.get(ctx.keys.volume(vol.volume_id), Volume)
    assert stale is not None and stale.state == "deleted"                  # left for a later run
    monkeypatch.setattr(volumes, "collect_garbage", real)
    await volumes.create_volume(ctx, "w", "1Gi", 1)
    await volumes.delete_volume(ctx, "w")                                   # its GC collects it
    assert await ctx.get_raw(ctx.keys.volume(vol.volume_id)) is None
    assert await ctx.get_raw(ctx.keys.snapshot(snap.snapshot_id)) is None


async def test_the_leader_collects_a_tombstone_no_later_delete_would(ctx, monkeypatch):
    """A tombstone whose collection after its delete failed waited for some later delete,
    possibly for ever. The leader collects at once on election and then periodically."""
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 1)
    snap, _ = await volops.create_snapshot(ctx, "v", "s")
    real = volumes.collect_garbage

    async def failing(ctx_):
        raise Unavailable("this meta server is no longer the leader")
    monkeypatch.setattr(volumes, "collect_garbage", failing)
    await volumes.delete_volume(ctx, "v")
    await volumes.delete_snapshot_by_id(ctx, snap.snapshot_id)
    monkeypatch.setattr(volumes, "collect_garbage", real)
    assert await ctx.get_raw(ctx.keys.volume(vol.volume_id)) is not None
    stop = asyncio.Event()
    task = asyncio.create_task(volumes.collect_garbage_every(ctx, stop, interval=0.2))
    try:
        async def collected():
            return (await ctx.get_raw(ctx.keys.volume(vol.volume_id)) is None
                    and await ctx.get_raw(ctx.keys.snapshot(snap.snapshot_id)) is None)
        await async_wait_for(collected, 10, "the tombstones collected")
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
