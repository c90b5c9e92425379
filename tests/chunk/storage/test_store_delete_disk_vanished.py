"""ReplicaStore.delete on a disk whose directory vanished (removed, unmounted) between two probes.

Real files in tmp_path, a real etcd for the reclaimer. The DELETE must fail the disk and answer
a clear error naming it, as a CREATE there does (test_store_disk_vanished.py): not raise ENOENT
from the directory's fsync after forgetting the replica, with the disk still taking extents, nor
"delete" nothing from an empty mount point while the extent stays on the unmounted disk.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from chunk.storage import replica_store
from chunk.storage.extent_file import BLOCK_SIZE
from chunk.storage.reclaim import Reclaimer
from chunk.storage.replica_store import ReplicaStore, StoreIOError

from .replica_nodes import EXTENT
from .test_reclaim import ME, extent, put, volume
from zstore.keys import Keys
from zstore.records import ClusterInfo

pytestmark = pytest.mark.timeout(60)

SIZE = 32 * BLOCK_SIZE
V = "v"


def _disk_of(store: ReplicaStore, idx: int) -> str:
    return store._replicas[(V, idx)].disk.path.name        # noqa: SLF001


def _state(store: ReplicaStore, name: str) -> dict:
    return next(u for u in store.usage() if Path(u["path"]).name == name)


def _two_disks(tmp_path: Path) -> ReplicaStore:
    # d0 has the most room by the store's own accounting: chosen first.
    return ReplicaStore([(tmp_path / "d0", 1 << 30), (tmp_path / "d1", 1 << 29)], extent_size=SIZE)


def test_a_delete_on_a_removed_disk_directory_fails_the_disk_with_a_clear_error(tmp_path):
    s = _two_disks(tmp_path)
    try:
        s.create(V, 0, 1)
        s.write(V, 0, 0, b"x" * BLOCK_SIZE, 1)
        assert _disk_of(s, 0) == "d0"
        shutil.rmtree(tmp_path / "d0")
        # was: StoreIOError "[Errno 2] No such file or directory: .../d0" from the fsync of
        # the directory, the replica already forgotten and d0 still "ok"
        with pytest.raises(StoreIOError, match=r"v/0 not deleted: disk .*d0 failed: its directory is gone"):
            s.delete(V, 0)
        st = _state(s, "d0")
        assert st["state"] == "failed" and "gone" in st["error"]
        assert s.has(V, 0)
        assert s.read(V, 0, 0, BLOCK_SIZE)[0] == b"x" * BLOCK_SIZE   # what is open still serves
        with pytest.raises(StoreIOError, match="not deleted"):       # again: the same answer
            s.delete(V, 0)
        s.create(V, 1, 1)                                            # new extents: elsewhere
        assert _disk_of(s, 1) == "d1" and _state(s, "d1")["state"] == "ok"
        s.delete(V, 1)                                               # the good disk deletes
        assert not s.has(V, 1) and list((tmp_path / "d1").glob("v.1.*")) == []
        assert not (tmp_path / "d0").exists()                        # nothing re-made it
    finally:
        s.close()


def test_a_delete_after_an_unmount_removes_nothing_and_fails_the_disk(tmp_path):
    d0 = tmp_path / "d0"
    s = _two_disks(tmp_path)
    try:
        s.create(V, 0, 1)
        assert _disk_of(s, 0) == "d0"
        # The umount: the disk's filesystem goes (here: elsewhere), its empty mount point stays.
        os.rename(d0, tmp_path / "d0-mounted-elsewhere")
        os.mkdir(d0)
        with pytest.raises(StoreIOError, match="not the one opened"):   # was: "deleted"
            s.delete(V, 0)
        assert _state(s, "d0")["state"] == "failed" and s.has(V, 0)
        # Still on the disk: it would come back at its next mount, so it was not deleted.
        assert (tmp_path / "d0-mounted-elsewhere" / "v.0.hdr").exists()
        assert os.listdir(d0) == []
    finally:
        s.close()


def test_a_broken_copy_on_a_removed_disk_directory_stays_broken_and_fails_the_disk(tmp_path):
    s = _two_disks(tmp_path)
    s.create(V, 0, 1)
    s.close()
    (tmp_path / "d0" / "v.0.hdr").write_bytes(b"rotten")
    s = _two_disks(tmp_path)
    try:
        assert (V, 0) in s.broken
        shutil.rmtree(tmp_path / "d0")
        with pytest.raises(StoreIOError, match="d0 failed: its directory is gone"):
            s.delete(V, 0)
        assert (V, 0) in s.broken and _state(s, "d0")["state"] == "failed"
    finally:
        s.close()


def test_a_transient_stat_error_does_not_stop_a_delete(tmp_path, monkeypatch):
    """Only ENOENT/ENOTDIR/EIO/EROFS (or another directory) fail the disk: ENOMEM, ESTALE...
    would take a good disk out until a restart."""
    s = _two_disks(tmp_path)
    real_stat = os.stat
    try:
        s.create(V, 0, 1)

        def stat(path, *a, **k):
            if Path(path) == tmp_path / "d0":
                raise OSError(errno.ENOMEM, "Cannot allocate memory", str(path))
            return real_stat(path, *a, **k)
        monkeypatch.setattr(replica_store.os, "stat", stat)
        s.delete(V, 0)
        monkeypatch.undo()
        assert not s.has(V, 0) and list((tmp_path / "d0").glob("v.0.*")) == []
        assert _state(s, "d0")["state"] == "ok"
    finally:
        s.close()


async def test_reclaim_of_an_extent_on_a_vanished_disk_reports_the_disk(etcd_client, etcd_config,
                                                                       tmp_path):
    """Both volumes deleted: a1's extent sits on d0, whose directory is removed; z9's on d1.
    The reclaimer's failure names the disk, d0 is failed, and z9 still goes."""
    keys = Keys(etcd_config.prefix)
    await put(etcd_client, keys.cluster(), ClusterInfo(cluster_id="c1"))
    store = ReplicaStore([(tmp_path / "d0", 1 << 30), (tmp_path / "d1", 1 << 29)],
                         extent_size=EXTENT, cow_sync=False)
    try:
        await volume(etcd_client, keys, "a1")
        await extent(etcd_client, keys, store, "a1", 0)          # on d0: the most room
        store.set_probe_error(tmp_path / "d0", "placed elsewhere for the test")
        await volume(etcd_client, keys, "z9")
        await extent(etcd_client, keys, store, "z9", 0)          # on d1
        store.set_probe_error(tmp_path / "d0", None)
        assert [store._replicas[(v, 0)].disk.path.name for v in ("a1", "z9")] == ["d0", "d1"]
        shutil.rmtree(tmp_path / "d0")
        await etcd_client.delete(keys.volume("a1"))
        await etcd_client.delete(keys.volume("z9"))
        r = Reclaimer(store, etcd_client, keys, ME, interval=3600)
        summary = await r.run_once()
        assert summary["deleted"] == [("z9", 0)] and not store.has("z9", 0)
        st = r.status()
        assert st["failed"] == 1 and st["last_error"] is None
        assert "a1/0 not deleted: disk" in st["last_failure"]
        assert "d0 failed: its directory is gone" in st["last_failure"]   # was: ENOENT, d0 "ok"
        assert _state(store, "d0")["state"] == "failed"
    finally:
        store.close()
