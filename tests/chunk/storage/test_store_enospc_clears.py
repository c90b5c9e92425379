"""A disk marked full by ENOSPC is placeable again once it has room for an extent: space freed
by UNMAP hole punching or outside zstore, not only by a DELETE or a trim
(chunk/storage/replica_store.py, ``usage``)."""

from __future__ import annotations

import errno
import os
from types import SimpleNamespace

import pytest

from chunk.storage import extent_file
from chunk.storage.extent_file import BLOCK_SIZE
from chunk.storage.replica_store import ReplicaStore, StoreFull

SIZE = 32 * BLOCK_SIZE


def _fill_up(monkeypatch, store: ReplicaStore) -> None:
    """A write that meets ENOSPC from the file system (simulated): the disk is marked full."""
    real = os.pwrite

    def pwrite(fd, data, off):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(extent_file.os, "pwrite", pwrite)
    with pytest.raises(StoreFull):
        store.write("v", 0, 0, b"x" * BLOCK_SIZE, seq=1)
    monkeypatch.setattr(extent_file.os, "pwrite", real)


def test_a_full_disk_with_room_again_is_reported_ok_and_takes_extents(tmp_path, monkeypatch):
    with ReplicaStore([(tmp_path / "d0", None)], extent_size=SIZE) as store:
        store.create("v", 0, 1)
        _fill_up(monkeypatch, store)
        # The space came back (an unmap punched holes; files outside zstore went): the real
        # filesystem under tmp_path has plenty.
        assert [u["state"] for u in store.usage()] == ["ok"]          # "full" for good before
        store.create("v", 1, 1)                                       # StoreFull before
        assert store.stat("v", 1)["disk"] == str(tmp_path / "d0")


def test_a_limited_disk_with_room_again_is_reported_ok(tmp_path, monkeypatch):
    with ReplicaStore([(tmp_path / "d0", 8 * SIZE)], extent_size=SIZE) as store:
        store.create("v", 0, 1)
        _fill_up(monkeypatch, store)
        assert [u["state"] for u in store.usage()] == ["ok"]


def test_a_disk_still_without_room_stays_full(tmp_path, monkeypatch):
    with ReplicaStore([(tmp_path / "d0", None)], extent_size=SIZE) as store:
        store.create("v", 0, 1)
        _fill_up(monkeypatch, store)
        real = os.statvfs
        st = real(tmp_path)
        tight = SimpleNamespace(f_blocks=st.f_blocks, f_frsize=st.f_frsize, f_files=st.f_files,
                                f_favail=st.f_favail, f_bavail=(SIZE - 1) // st.f_frsize)
        monkeypatch.setattr(os, "statvfs", lambda p: tight)
        assert [u["state"] for u in store.usage()] == ["full"]
        with pytest.raises(StoreFull):
            store.create("v", 1, 1)
        no_inodes = SimpleNamespace(**{**vars(tight), "f_bavail": st.f_bavail, "f_favail": 0})
        monkeypatch.setattr(os, "statvfs", lambda p: no_inodes)
        assert [u["state"] for u in store.usage()] == ["full"]
        monkeypatch.setattr(os, "statvfs", real)
        assert [u["state"] for u in store.usage()] == ["ok"]
