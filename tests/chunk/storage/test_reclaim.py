"""Reclaimer against a real store and real etcd (and an unreachable one)."""

from __future__ import annotations

import pytest

from chunk.storage.extent_file import BLOCK_SIZE
from chunk.storage.reclaim import ReclaimRefused, Reclaimer
from chunk.storage.replica_store import ReplicaStore
from tests.cluster import free_port
from zstore import etcd as zetcd
from zstore.config import EtcdConfig
from zstore.keys import Keys
from zstore.records import ClusterInfo, ExtentRecord, RecoveryTask, Snapshot, Volume

from .replica_nodes import EXTENT, block

pytestmark = pytest.mark.timeout(60)

ME = "chunk-me"


@pytest.fixture
def keys(etcd_config):
    return Keys(etcd_config.prefix)


@pytest.fixture
def store(tmp_path):
    s = ReplicaStore([(tmp_path / "disk", None)], extent_size=EXTENT, cow_sync=False)
    yield s
    s.close()


async def put(etcd, key, rec):
    await etcd.put(key, rec.encode())


async def volume(etcd, keys, vid, snap_seq=1, **kw):
    await put(etcd, keys.volume(vid), Volume(volume_id=vid, name=vid, size=EXTENT * 4, replicas=2,
                                             snap_seq=snap_seq, **kw))


async def extent(etcd, keys, store, vid, idx, replicas=(ME,), generation=1, **kw):
    await put(etcd, keys.extent(vid, idx), ExtentRecord(volume_id=vid, index=idx,
                                                       replicas=list(replicas),
                                                       generation=generation, **kw))
    store.create(vid, idx, generation)
    store.write(vid, idx, 0, block(idx + 1), 1)


async def snapshot(etcd, keys, sid, vid, seq, state="ready"):
    await put(etcd, keys.snapshot(sid), Snapshot(snapshot_id=sid, name=sid, volume_id=vid,
                                                 size=EXTENT * 4, state=state, seq=seq))


@pytest.fixture
async def cluster(etcd_client, keys):
    await put(etcd_client, keys.cluster(), ClusterInfo(cluster_id="c1"))
    return etcd_client


async def test_extents_of_deleted_volumes_go_and_others_stay(cluster, keys, store):
    etcd = cluster
    await volume(etcd, keys, "v1")
    await volume(etcd, keys, "v2", state="deleted")      # kept while snapshots reference it
    for vid, idx in (("v1", 0), ("v1", 1), ("v2", 0), ("v3", 0), ("v3", 2)):
        await extent(etcd, keys, store, vid, idx)
    await etcd.delete(keys.volume("v3"))                 # v3 was deleted

    r = Reclaimer(store, etcd, keys, ME, interval=3600)
    summary = await r.run_once()
    assert sorted(summary["deleted"]) == [("v3", 0), ("v3", 2)]
    assert store.extents() == [("v1", 0), ("v1", 1), ("v2", 0)]

    await etcd.delete(keys.volume("v2"))
    assert (await r.run_once())["deleted"] == [("v2", 0)]
    assert store.extents() == [("v1", 0), ("v1", 1)]
    assert (await r.run_once())["deleted"] == []
    assert r.status()["deleted"] == 3 and r.status()["runs"] == 3 and r.status()["last_error"] is None


async def test_extent_moved_elsewhere_is_deleted_only_when_clearly_not_ours(cluster, keys, store):
    etcd = cluster
    await volume(etcd, keys, "v1")
    for idx in range(5):
        await extent(etcd, keys, store, "v1", idx, generation=1)
    # 0: moved away after a rebuild, newer generation -> delete
    await put(etcd, keys.extent("v1", 0), ExtentRecord("v1", 0, ["x", "y"], generation=3))
    # 1: dropped as stale, awaiting resync -> keep
    await put(etcd, keys.extent("v1", 1), ExtentRecord("v1", 1, ["x"], generation=2, stale={ME: 2}))
    # 2: still in sync -> keep
    await put(etcd, keys.extent("v1", 2), ExtentRecord("v1", 2, ["x", ME], generation=4))
    # 3: a rebuild onto this chunk is copying (not joined yet) -> keep
    await put(etcd, keys.extent("v1", 3), ExtentRecord("v1", 3, ["x"], generation=5))
    await put(etcd, keys.recovery_task("v1", 3), RecoveryTask("v1", 3, target=ME, kind="rebuild",
                                                              executor="x", generation=5))
    # 4: record not newer than the local copy -> keep
    await put(etcd, keys.extent("v1", 4), ExtentRecord("v1", 4, ["x"], generation=1))

    summary = await Reclaimer(store, etcd, keys, ME).run_once()
    assert summary["deleted"] == [("v1", 0)]
    assert store.extents() == [("v1", i) for i in (1, 2, 3, 4)]


async def test_versions_of_deleted_snapshots_are_trimmed(cluster, keys, store):
    etcd = cluster
    await volume(etcd, keys, "v1", snap_seq=1)
    await extent(etcd, keys, store, "v1", 0)               # block 0 = block(1) at seq 1
    # s1 taken (seq 1), overwrite at seq 2; s2 (seq 2), overwrite at seq 3; s3 (seq 3), at seq 4.
    for seq, fill in ((2, "two"), (3, "three"), (4, "four")):
        store.write("v1", 0, 0, block(fill), seq)
    await volume(etcd, keys, "v1", snap_seq=4)
    await snapshot(etcd, keys, "s1", "v1", 1)
    await snapshot(etcd, keys, "s2", "v1", 2, state="deleted")   # tombstone: a clone reads it
    await snapshot(etcd, keys, "s3", "v1", 3)
    await snapshot(etcd, keys, "other", "v9", 2)                   # another volume's

    def view(s):
        data, present = store.read("v1", 0, 0, BLOCK_SIZE, view=s)
        return data if present == b"\x01" else None

    assert [view(s) for s in (1, 2, 3)] == [block(1), block("two"), block("three")]
    r = Reclaimer(store, etcd, keys, ME)
    assert (await r.run_once())["trimmed"] == 0

    await etcd.delete(keys.snapshot("s1"))
    summary = await r.run_once()
    assert summary["trimmed"] == 1 and summary["deleted"] == []
    assert view(1) is None                                  # s1's version is gone
    assert view(2) == block("two") and view(3) == block("three")
    assert store.read("v1", 0, 0, BLOCK_SIZE)[0] == block("four")

    await etcd.delete(keys.snapshot("s3"))
    assert (await r.run_once())["trimmed"] == 1
    assert view(2) == block("two")
    assert r.status()["trimmed"] == 2


async def test_trim_runs_again_only_when_the_set_generation_or_imports_change(cluster, keys, store,
                                                                                 tmp_path):
    etcd = cluster
    await volume(etcd, keys, "v1", snap_seq=3)
    await extent(etcd, keys, store, "v1", 0)
    store.write("v1", 0, 0, block("two"), 2)                # version (1, 1)
    r = Reclaimer(store, etcd, keys, ME)
    assert (await r.run_once())["trimmed"] == 1             # no snapshot has seq 1

    # A resync brings the old version back from a peer that had not trimmed yet.
    with ReplicaStore([(tmp_path / "peer", None)], extent_size=EXTENT, cow_sync=False) as peer:
        peer.create("v1", 0, 1)
        peer.write("v1", 0, 0, block(1), 1)
        peer.write("v1", 0, 0, block("two"), 2)
        blob, _ = peer.export("v1", 0, 0, BLOCK_SIZE)
    assert store.import_("v1", 0, blob)
    assert store.read("v1", 0, 0, BLOCK_SIZE, view=1)[1] == b"\x01"
    # An import counts even without a new generation: a block repair imports and ends with
    # no SETGEN, and the version it brought back must not stay for good.
    assert (await r.run_once())["trimmed"] == 1
    assert store.read("v1", 0, 0, BLOCK_SIZE, view=1)[1] == b"\x00"
    assert (await r.run_once())["trimmed"] == 0             # nothing changed since
    store.set_generation("v1", 0, 2)                        # a resync's SETGEN: looked at again
    assert (await r.run_once())["trimmed"] == 0


async def test_a_rebuild_that_joins_during_the_run_keeps_its_copy(cluster, keys, store):
    """The run lists the extent records (this server not in the set, a rebuild copying onto
    it), then reads the recovery task again only when a deletion is on the table. If the
    rebuild finishes in between (SETGEN here, then the join adds this server and deletes its
    task in one txn), the task read finds no task: the copy, now in sync, must stay."""
    etcd = cluster
    await volume(etcd, keys, "v1")
    await extent(etcd, keys, store, "v1", 0, generation=1)
    await put(etcd, keys.extent("v1", 0), ExtentRecord("v1", 0, ["x"], generation=5))
    await put(etcd, keys.recovery_task("v1", 0), RecoveryTask("v1", 0, target=ME, kind="rebuild",
                                                              executor="x", generation=5))

    class JoinDuringTaskRead(Reclaimer):
        async def _listing(self, prefix):
            got = await super()._listing(prefix)
            if prefix == keys.extents("v1"):        # the join, after the records were read
                store.set_generation("v1", 0, 6)
                await put(etcd, keys.extent("v1", 0), ExtentRecord("v1", 0, ["x", ME], generation=6))
                await etcd.delete(keys.recovery_task("v1", 0))
            return got

    summary = await JoinDuringTaskRead(store, etcd, keys, ME).run_once()
    assert summary["deleted"] == [] and store.extents() == [("v1", 0)]


async def test_snapshot_taken_during_a_run_keeps_its_versions(cluster, keys, store):
    """A version for a snapshot not yet in the listing (seq >= the volume's snap_seq) stays."""
    etcd = cluster
    await volume(etcd, keys, "v1", snap_seq=3)
    await extent(etcd, keys, store, "v1", 0)
    store.write("v1", 0, 0, block("at 3"), 3)
    store.write("v1", 0, 0, block("at 4"), 4)               # version (3, 3): a snapshot at seq 3
    r = Reclaimer(store, etcd, keys, ME)
    await r.run_once()
    data, present = store.read("v1", 0, 0, BLOCK_SIZE, view=3)
    assert present == b"\x01" and data == block("at 3")


async def test_nothing_deleted_when_etcd_is_unreachable(keys, store, tmp_path):
    store.create("v3", 0, 1)
    store.write("v3", 0, 0, block(7), 1)
    dead = zetcd.client(EtcdConfig(endpoints=[f"127.0.0.1:{free_port()}"], prefix=keys.prefix,
                                   timeout=1.0))
    await dead.connect()
    try:
        r = Reclaimer(store, dead, keys, ME)
        with pytest.raises(zetcd.UNAVAILABLE_ERRORS):
            await r.run_once()
        assert store.extents() == [("v3", 0)]
        assert r.status()["last_error"] and r.status()["runs"] == 0
    finally:
        await dead.close()


async def test_nothing_deleted_without_the_cluster_record(etcd_client, keys, store):
    """A wrong prefix (or an empty etcd) makes every volume look deleted: refuse."""
    store.create("v1", 0, 1)
    with pytest.raises(ReclaimRefused):
        await Reclaimer(store, etcd_client, keys, ME).run_once()
    assert store.extents() == [("v1", 0)]


async def test_periodic_loop_runs(cluster, keys, store):
    import asyncio
    store.create("gone", 0, 1)
    r = Reclaimer(store, cluster, keys, ME, interval=0.05)
    r.start()
    try:
        for _ in range(100):
            if not store.extents():
                break
            await asyncio.sleep(0.05)
    finally:
        await r.stop()
    assert store.extents() == [] and r.status()["runs"] >= 1


async def test_a_copy_of_a_degraded_extent_is_kept_even_unlisted(cluster, keys, store):
    """The extent (2 replicas wanted) is down to ["x"], and this chunk's older copy is no longer
    listed as stale (dropped from the map, or forgotten after its resync failed): if "x" is lost
    before a new copy joins, this copy is all that is left. It goes once the extent is whole."""
    etcd = cluster
    await volume(etcd, keys, "v1")
    await extent(etcd, keys, store, "v1", 0, generation=1)
    await put(etcd, keys.extent("v1", 0), ExtentRecord("v1", 0, ["x"], generation=3))
    r = Reclaimer(store, etcd, keys, ME)
    assert (await r.run_once())["deleted"] == []
    assert store.extents() == [("v1", 0)]
    # A rebuild to "y" joined: the extent is whole again, this copy is not needed.
    await put(etcd, keys.extent("v1", 0), ExtentRecord("v1", 0, ["x", "y"], generation=4))
    assert (await r.run_once())["deleted"] == [("v1", 0)]
    assert store.extents() == []


def _versions(store, vid, idx):
    """(block, origin, key) of every version the replica holds."""
    rep = store._replicas[(vid, idx)]                          # noqa: SLF001
    return sorted((b, origin, key) for key in rep.keys
                  for b, (origin, _) in rep.versions[key].entries.items())


async def test_versions_made_after_a_snapshot_was_deleted_are_trimmed(cluster, keys, store):
    """Snapshot at seq 1 taken and deleted, the reclaimer ran; the volume's seq stays 2, so the
    first overwrite of each block still makes a version (1, 1) no snapshot reads. The next run
    trims them: the allocated space falls back."""
    etcd = cluster
    await volume(etcd, keys, "v1", snap_seq=1)
    await extent(etcd, keys, store, "v1", 0)
    for b in range(1, 64):
        store.write("v1", 0, b * BLOCK_SIZE, block(b), 1)
    await volume(etcd, keys, "v1", snap_seq=2)                # s1 (seq 1) taken, then deleted
    r = Reclaimer(store, etcd, keys, ME)
    assert (await r.run_once())["trimmed"] == 0
    before = store.stat("v1", 0)["allocated"]

    for b in range(64):
        store.write("v1", 0, b * BLOCK_SIZE, block("new"), 2)
    assert len(_versions(store, "v1", 0)) == 64
    assert store.stat("v1", 0)["allocated"] > before

    assert (await r.run_once())["trimmed"] == 64
    assert _versions(store, "v1", 0) == []
    assert store.stat("v1", 0)["allocated"] <= before
    assert store.read("v1", 0, 0, BLOCK_SIZE)[0] == block("new")
    assert (await r.run_once())["trimmed"] == 0               # nothing new since
    # A retried or repeated write at the same seq makes no version: nothing to trim either.
    store.write("v1", 0, 0, block("again"), 2)
    assert (await r.run_once())["trimmed"] == 0


async def test_replicas_agree_after_a_resync_once_both_reclaimers_ran(cluster, keys, tmp_path):
    """Replicas A and B, snapshot seq 1 taken and deleted, both reclaimers ran. Overwrites at seq 2
    make versions on both. B's reclaimer trims; B is dropped and resynced from A (which still has
    them: the versions come back, new generation). Once each reclaimer ran once, the replicas
    are equal (else the scrubber drops B, the resync brings the versions back, and so on)."""
    etcd = cluster
    a = ReplicaStore([(tmp_path / "a", None)], extent_size=EXTENT, cow_sync=False)
    b = ReplicaStore([(tmp_path / "b", None)], extent_size=EXTENT, cow_sync=False)
    try:
        await volume(etcd, keys, "v1", snap_seq=1)
        await put(etcd, keys.extent("v1", 0), ExtentRecord("v1", 0, ["A", "B"], generation=1))
        for s in (a, b):
            s.create("v1", 0, 1)
            for blk in range(8):
                s.write("v1", 0, blk * BLOCK_SIZE, block(blk), 1)
        await volume(etcd, keys, "v1", snap_seq=2)             # s1 (seq 1) taken, then deleted
        ra, rb = Reclaimer(a, etcd, keys, "A"), Reclaimer(b, etcd, keys, "B")
        await ra.run_once()
        await rb.run_once()

        for s in (a, b):
            for blk in range(8):
                s.write("v1", 0, blk * BLOCK_SIZE, block("two"), 2)
        assert (await rb.run_once())["trimmed"] == 8
        # B dropped and resynced from A: a full copy, then SETGEN.
        b.delete("v1", 0)
        pos = 0
        while pos is not None and pos < EXTENT:
            blob, pos = a.export("v1", 0, pos, EXTENT - pos)
            assert b.import_("v1", 0, blob)
        b.set_generation("v1", 0, 2)
        await put(etcd, keys.extent("v1", 0), ExtentRecord("v1", 0, ["A", "B"], generation=2))
        assert a.digest("v1", 0) == b.digest("v1", 0) and len(_versions(b, "v1", 0)) == 8

        assert (await ra.run_once())["trimmed"] == 8
        assert (await rb.run_once())["trimmed"] == 8
        assert a.digest("v1", 0) == b.digest("v1", 0)
        assert _versions(a, "v1", 0) == _versions(b, "v1", 0) == []

        # Both trimmed in the same order too: more overwrites after a second deleted snapshot.
        await volume(etcd, keys, "v1", snap_seq=3)             # s2 (seq 2) taken, then deleted
        for s in (a, b):
            s.write("v1", 0, 0, block("three"), 3)
        await ra.run_once()
        await rb.run_once()
        assert a.digest("v1", 0) == b.digest("v1", 0) and _versions(a, "v1", 0) == []
    finally:
        a.close()
        b.close()


def _reopen_with_rotten_headers(path, rotten):
    """A store on ``path`` reopened after flipping a byte in the headers of ``rotten``."""
    for vid, idx in rotten:
        hdr = path / f"{vid}.{idx}.hdr"
        raw = bytearray(hdr.read_bytes())
        raw[10] ^= 0xFF
        hdr.write_bytes(bytes(raw))
    s = ReplicaStore([(path, None)], extent_size=EXTENT, cow_sync=False)
    assert sorted(s.broken) == sorted(rotten)
    return s


def _files(path, vid, idx):
    return sorted(p.name for p in path.iterdir() if p.name.startswith(f"{vid}.{idx}."))


async def test_broken_copies_of_deleted_volumes_are_deleted(cluster, keys, store, tmp_path):
    """A copy that does not open (rotten header) is not in ``extents()``; its volume deleted,
    its files go all the same. A broken copy of a live volume's extent listed here stays."""
    etcd = cluster
    await volume(etcd, keys, "live")
    for vid, idx in (("gone", 0), ("gone", 1), ("live", 0)):
        await extent(etcd, keys, store, vid, idx)
    store.write("gone", 0, 0, block("two"), 2)                 # a version too: the .v directory
    store.close()
    disk = tmp_path / "disk"
    s = _reopen_with_rotten_headers(disk, [("gone", 0), ("live", 0)])
    try:
        assert s.extents() == [("gone", 1)]
        r = Reclaimer(s, etcd, keys, ME)
        summary = await r.run_once()
        assert sorted(summary["deleted"]) == [("gone", 0), ("gone", 1)]
        assert _files(disk, "gone", 0) == [] and _files(disk, "gone", 1) == []
        assert list(s.broken) == [("live", 0)]                  # listed here: kept
        assert _files(disk, "live", 0) != []
        assert (await r.run_once())["deleted"] == [] and r.status()["deleted"] == 2
    finally:
        s.close()


async def test_broken_copy_of_a_live_extent_goes_only_once_it_is_whole_elsewhere(cluster, keys,
                                                                                  store, tmp_path):
    etcd = cluster
    await volume(etcd, keys, "v1")                             # 2 replicas wanted
    for idx in range(6):
        await extent(etcd, keys, store, "v1", idx)
    store.close()
    disk = tmp_path / "disk"
    s = _reopen_with_rotten_headers(disk, [("v1", i) for i in range(6)])
    try:
        # 0: this server still listed in sync (the coordinator has not dropped it yet) -> keep
        await put(etcd, keys.extent("v1", 0), ExtentRecord("v1", 0, ["x", ME], generation=1))
        # 1: dropped as stale, awaiting resync -> keep
        await put(etcd, keys.extent("v1", 1), ExtentRecord("v1", 1, ["x"], generation=2,
                                                           stale={ME: 1}))
        # 2: degraded, not listed: may be the last copy -> keep
        await put(etcd, keys.extent("v1", 2), ExtentRecord("v1", 2, ["x"], generation=2))
        # 3: a rebuild onto this server is copying (it discards the broken copy) -> keep
        await put(etcd, keys.extent("v1", 3), ExtentRecord("v1", 3, ["x"], generation=2))
        await put(etcd, keys.recovery_task("v1", 3), RecoveryTask("v1", 3, target=ME,
                                                                  kind="rebuild", executor="x",
                                                                  generation=2))
        # 4: rebuilt elsewhere, whole -> delete (even at the same generation: nothing to compare)
        await put(etcd, keys.extent("v1", 4), ExtentRecord("v1", 4, ["x", "y"], generation=1))
        # 5: no record -> keep
        await etcd.delete(keys.extent("v1", 5))
        r = Reclaimer(s, etcd, keys, ME)
        assert (await r.run_once())["deleted"] == [("v1", 4)]
        assert sorted(s.broken) == [("v1", i) for i in (0, 1, 2, 3, 5)]
        assert _files(disk, "v1", 4) == []
        for i in (0, 1, 2, 3, 5):
            assert _files(disk, "v1", i) != []
        # 2 whole again elsewhere -> goes now.
        await put(etcd, keys.extent("v1", 2), ExtentRecord("v1", 2, ["x", "y"], generation=3))
        assert (await r.run_once())["deleted"] == [("v1", 2)]
        assert _files(disk, "v1", 2) == []
    finally:
        s.close()


async def test_a_copy_broken_by_a_failed_flush_is_deleted_with_its_volume(cluster, keys, store,
                                                                         tmp_path):
    import errno
    etcd = cluster
    await extent(etcd, keys, store, "v1", 0)
    rep = store._replicas[("v1", 0)]                           # noqa: SLF001
    store._retire(rep, OSError(errno.ENOSPC, "no space"))      # noqa: SLF001 - as a failed flush
    assert ("v1", 0) in store.broken and store.extents() == []
    assert (await Reclaimer(store, etcd, keys, ME).run_once())["deleted"] == [("v1", 0)]
    assert store.broken == {} and _files(tmp_path / "disk", "v1", 0) == []


def test_a_broken_copy_whose_files_do_not_go_stays_broken(store, tmp_path, monkeypatch):
    """A DELETE of a broken copy that fails (its disk dying) leaves it broken: I/O errors,
    never NO_EXTENT (a coordinator would read that as zeros); a later DELETE tries again."""
    import errno
    from chunk.storage import replica_store
    store.create("v1", 0, 1)
    store.write("v1", 0, 0, block(1), 1)
    store.close()
    disk = tmp_path / "disk"
    s = _reopen_with_rotten_headers(disk, [("v1", 0)])
    try:
        def eio(base):
            raise OSError(errno.EIO, "Input/output error", str(base))
        with monkeypatch.context() as m:
            m.setattr(replica_store, "_remove_extent", eio)
            with pytest.raises(replica_store.StoreIOError):
                s.delete("v1", 0)
        assert ("v1", 0) in s.broken
        with pytest.raises(replica_store.StoreIOError):
            s.read("v1", 0, 0, BLOCK_SIZE)
        s.delete("v1", 0)
        assert s.broken == {} and _files(disk, "v1", 0) == []
    finally:
        s.close()


async def test_listings_bigger_than_a_reply_are_read_in_pages(small_client, keys, store, monkeypatch):
    """Every snapshot of the cluster and a volume's extent records were each read in one
    Range: past gRPC's reply limit (4 MiB; 32 KiB for this client) every run failed, and
    nothing was reclaimed again. Read in pages now."""
    monkeypatch.setattr(zetcd, "PAGE_SIZE", 40, raising=False)
    etcd = small_client
    await put(etcd, keys.cluster(), ClusterInfo(cluster_id="c1"))
    await volume(etcd, keys, "v1", snap_seq=400)
    await extent(etcd, keys, store, "v1", 0)
    for i in range(1, 400):                                    # ~ 80 KiB of snapshot records
        await snapshot(etcd, keys, f"s{i:04d}", "v1", i)
    for idx in range(1, 300):                                  # ~ 60 KiB of extent records
        await put(etcd, keys.extent("v1", idx), ExtentRecord("v1", idx, ["x", ME], generation=1))
    await extent(etcd, keys, store, "gone", 0)                 # a deleted volume's extent
    summary = await Reclaimer(store, etcd, keys, ME).run_once()
    assert summary["deleted"] == [("gone", 0)]
    assert store.extents() == [("v1", 0)]
