"""ReplicaStore: a disk whose directory vanished (removed, unmounted) between two probes.

Real files in tmp_path. A CREATE arriving before the next disk probe must go to another disk:
not fail on the vanished one again and again, nor land on an empty mount point.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from chunk.storage.extent_file import BLOCK_SIZE, ExtentFile
from chunk.storage.replica_store import ReplicaStore, StoreIOError

pytestmark = pytest.mark.timeout(60)

SIZE = 32 * BLOCK_SIZE
V = "v"


def _disk_of(store: ReplicaStore, idx: int) -> str:
    return store._replicas[(V, idx)].disk.path.name


def _state(store: ReplicaStore, name: str) -> dict:
    return next(u for u in store.usage() if Path(u["path"]).name == name)


def test_creates_after_a_disk_directory_is_removed_go_to_the_other_disk(tmp_path):
    # d0 has the most room by the store's own accounting, so it would be chosen again and again.
    s = ReplicaStore([(tmp_path / "d0", 1 << 30), (tmp_path / "d1", 1 << 29)], extent_size=SIZE)
    try:
        s.create(V, 0, 1)
        assert _disk_of(s, 0) == "d0"
        shutil.rmtree(tmp_path / "d0")
        for i in range(1, 5):
            s.create(V, i, 1)                    # was: StoreIOError ENOENT for every one
            assert _disk_of(s, i) == "d1"
            s.write(V, i, 0, b"y" * BLOCK_SIZE, 1)
            assert s.read(V, i, 0, BLOCK_SIZE)[0] == b"y" * BLOCK_SIZE
        st = _state(s, "d0")
        assert st["state"] == "failed" and "gone" in st["error"]
        assert _state(s, "d1")["state"] == "ok"
        assert not (tmp_path / "d0").exists()    # nothing re-made the directory
    finally:
        s.close()


def test_a_missing_file_of_one_extent_is_not_a_vanished_disk(tmp_path, monkeypatch):
    s = ReplicaStore([(tmp_path / "d0", None), (tmp_path / "d1", None)], extent_size=SIZE)
    try:
        def create(*a, **k):
            raise FileNotFoundError(2, "No such file or directory", "one extent's file")
        monkeypatch.setattr(ExtentFile, "create", staticmethod(create))
        with pytest.raises(StoreIOError):
            s.create(V, 0, 1)
        monkeypatch.undo()
        assert [u["state"] for u in s.usage()] == ["ok", "ok"]
        assert not s.has(V, 0)
        s.create(V, 0, 1)
        assert s.has(V, 0)
    finally:
        s.close()


def test_a_create_after_an_unmount_goes_to_the_other_disk_not_the_empty_mount_point(tmp_path):
    d0, d1 = tmp_path / "d0", tmp_path / "d1"
    s = ReplicaStore([(d0, 1 << 30), (d1, 1 << 29)], extent_size=SIZE)   # d0: the most room
    try:
        (d0 / "disk-id").write_text("a" * 32 + "\n")
        s.create(V, 0, 1)
        s.write(V, 0, 0, b"x" * BLOCK_SIZE, 1)
        assert _disk_of(s, 0) == "d0"
        # The umount: the disk's filesystem goes (here: elsewhere), its empty mount point stays.
        os.rename(d0, tmp_path / "d0-mounted-elsewhere")
        os.mkdir(d0)
        s.create(V, 1, 1)                        # was: made on the empty mount point
        assert _disk_of(s, 1) == "d1"
        assert os.listdir(d0) == []              # nothing written on the "root filesystem"
        st = _state(s, "d0")
        assert st["state"] == "failed" and "not the one opened" in st["error"]
        s.create(V, 2, 1)
        assert _disk_of(s, 2) == "d1" and os.listdir(d0) == []
        assert s.read(V, 0, 0, BLOCK_SIZE)[0] == b"x" * BLOCK_SIZE   # what is open still serves
        assert sorted(p.name for p in d1.glob("*.hdr")) == ["v.1.hdr", "v.2.hdr"]
    finally:
        s.close()


def test_a_transient_stat_error_does_not_fail_a_good_disk(tmp_path, monkeypatch):
    """A stat of the disk directory failing with a transient errno (ENOMEM under memory
    pressure, ESTALE) is no vanished disk: failing it would last until a restart."""
    import errno

    from chunk.storage import replica_store
    s = ReplicaStore([(tmp_path / "d0", 1 << 30), (tmp_path / "d1", 1 << 29)], extent_size=SIZE)
    real_stat = os.stat
    try:
        def stat(path, *a, **k):
            if Path(path) == tmp_path / "d0":
                raise OSError(errno.ENOMEM, "Cannot allocate memory", str(path))
            return real_stat(path, *a, **k)
        monkeypatch.setattr(replica_store.os, "stat", stat)
        s.create(V, 0, 1)
        monkeypatch.undo()
        assert _disk_of(s, 0) == "d0" and _state(s, "d0")["state"] == "ok"
    finally:
        s.close()
