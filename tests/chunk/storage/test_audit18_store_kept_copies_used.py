"""A limited disk counts the copies it keeps that are not open until they are removed
(audit 18, item 3).

``ReplicaStore._used`` (which picks the disk for a new extent, and says when a limited disk is
full) summed the open replicas only: a copy that did not open at the start, or a replica
retired by a failed sync, kept its files, and its bytes, until a DELETE, but counted for
nothing, so a limited disk took new extents past its limit. Real files in tmp_path; the
failed sync is ``os.fdatasync`` raising ENOSPC.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from chunk.storage.extent_file import BLOCK_SIZE
from chunk.storage.replica_store import ReplicaStore, StoreError, StoreFull

SIZE = 64 * BLOCK_SIZE
V = "vol-k"


def _filled(store: ReplicaStore, idx: int) -> int:
    """Extent ``idx`` created, every block written, with a snapshot's versions of half of
    them (a ``.v`` directory too): the disk's used bytes after."""
    store.create(V, idx, 1)
    store.write(V, idx, 0, b"a" * SIZE, seq=1)
    store.write(V, idx, 0, b"b" * (SIZE // 2), seq=2)
    store.flush(V, idx)
    return store.usage()[0]["used"]


def _allocated(disk: Path) -> int:
    """What the extent's files (all but the header) take on disk, counted from the files."""
    files = [p for p in disk.glob(f"{V}.*") if p.is_file() and not p.name.endswith(".hdr")]
    files += list(disk.glob(f"{V}.*.v/*.ver"))
    return sum(p.stat().st_blocks * 512 for p in files)


def test_a_copy_that_did_not_open_counts_until_it_is_deleted(tmp_path: Path):
    disk = tmp_path / "d0"
    with ReplicaStore([(disk, 1 << 30)], extent_size=SIZE) as s:
        used = _filled(s, 0)
    assert used == _allocated(disk) > SIZE
    (disk / f"{V}.0.hdr").write_bytes(b"not a header")
    # Room for the copy kept and just less than one more extent.
    with ReplicaStore([(disk, used + SIZE - 1)], extent_size=SIZE) as s:
        assert s.has(V, 0) is False and (V, 0) in s.broken
        assert s.usage()[0]["used"] == used, "the copy kept counts as used"
        assert s.usage()[0]["state"] == "ok"
        with pytest.raises(StoreFull):
            s.create(V, 1, 1)                     # placed past the limit before
        s.delete(V, 0)
        assert s.usage()[0]["used"] == 0, "removed: no longer counted"
        s.create(V, 1, 1)
        assert s.stat(V, 1)["disk"] == str(disk)


def test_a_replica_retired_by_a_failed_sync_counts_until_it_is_deleted(tmp_path: Path, monkeypatch):
    disk = tmp_path / "d0"
    with ReplicaStore([(disk, 1 << 30)], extent_size=SIZE) as s:
        used = _filled(s, 0)
    with ReplicaStore([(disk, used + SIZE - 1)], extent_size=SIZE) as s:
        assert s.usage()[0]["used"] == used
        s.write(V, 0, SIZE // 2, b"c" * BLOCK_SIZE, seq=3)
        real = os.fdatasync

        def fdatasync(fd):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(os, "fdatasync", fdatasync)
        with pytest.raises(StoreError):
            s.flush(V, 0)                         # retired; its disk marked full
        monkeypatch.setattr(os, "fdatasync", real)
        assert (V, 0) in s.broken
        usage = s.usage()[0]                      # clears ``enospc`` if there is room
        assert usage["used"] == _allocated(disk) >= used, "the retired copy counts as used"
        with pytest.raises(StoreFull):
            s.create(V, 1, 1)                     # placed past the limit before
        s.delete(V, 0)
        assert s.usage()[0]["used"] == 0
        s.create(V, 1, 1)
        assert s.stat(V, 1)["disk"] == str(disk)


def test_copies_kept_on_another_disk_do_not_count_here(tmp_path: Path):
    d0, d1 = tmp_path / "d0", tmp_path / "d1"
    with ReplicaStore([(d0, 1 << 30)], extent_size=SIZE) as s:
        _filled(s, 0)
    (d0 / f"{V}.0.hdr").write_bytes(b"not a header")
    with ReplicaStore([(d0, 1 << 30), (d1, 1 << 30)], extent_size=SIZE) as s:
        used = {Path(u["path"]): u["used"] for u in s.usage()}
        assert used == {d0: _allocated(d0), d1: 0}


@pytest.mark.parametrize("err", [errno.EIO, errno.ESTALE, errno.EACCES])
def test_a_kept_copy_whose_files_do_not_stat_counts_nothing_and_fails_nothing(
        tmp_path: Path, monkeypatch, caplog, err):
    """One kept copy whose files' metadata do not read (its ``.crc`` inode: EIO, an NFS handle
    gone stale, a permission changed) raised out of ``_used``: ``usage`` reported the whole
    disk failed ("statvfs: ...", for good on EIO) and a CREATE found no disk (StoreFull). It
    is counted as nothing and logged once, the disk stays usable, and it counts again once
    its files read."""
    disk = tmp_path / "d0"
    with ReplicaStore([(disk, 1 << 30)], extent_size=SIZE) as s:
        used = _filled(s, 0)
    (disk / f"{V}.0.hdr").write_bytes(b"not a header")    # the copy is kept, broken
    real = os.lstat

    def lstat(path, *args, **kw):
        if str(path).endswith(f"{V}.0.crc"):
            raise OSError(err, os.strerror(err), str(path))
        return real(path, *args, **kw)

    with ReplicaStore([(disk, 1 << 30)], extent_size=SIZE) as s:
        assert (V, 0) in s.broken
        monkeypatch.setattr(os, "lstat", lstat)
        caplog.clear()
        for _ in range(3):
            u = s.usage()[0]
            assert (u["state"], u["used"]) == ("ok", 0), u
        assert not s._disks[0].failed
        warned = [r for r in caplog.records if f"{V}.0" in r.getMessage()]
        assert len(warned) == 1, [r.getMessage() for r in caplog.records]
        s.create(V, 1, 1)
        assert s.stat(V, 1)["disk"] == str(disk)
        monkeypatch.setattr(os, "lstat", real)
        assert s.usage()[0]["used"] == used + s._replicas[(V, 1)].allocated()
