"""ReplicaStore / ExtentFile durability under failures: a full disk part-way through a
write, a failure part-way through an unmap or an import (the COW floor), failed fdatasyncs
inside writes, unmaps and trims, and two copies of one extent on two disks.

Real files; a full disk is a small tmpfs (skipped where it cannot be mounted) or ENOSPC
injected into ``os.pwrite`` of one fd, a failed sync EIO injected into ``os.fdatasync``
of one file (the seam the store's other tests use); everything else runs for real.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from chunk.storage import extent_file
from chunk.storage.extent_file import BLOCK_SIZE, WRITE_PIECE, ExtentFile
from chunk.storage.replica_store import NoExtent, ReplicaStore, StoreFull, StoreIOError
from tests.chunk.storage.test_replica_store import _mount_tmpfs, _umount

pytestmark = pytest.mark.timeout(120)

V = "vol-d"
SIZE = 64 * BLOCK_SIZE


def _enospc_after(monkeypatch, fd: int, good: int, short: int | None = None) -> None:
    """pwrites to ``fd``: the first ``good`` are real (the last of them cut to ``short``
    bytes if given), every later one fails with ENOSPC, until the test ends."""
    real, calls = os.pwrite, [0]

    def pwrite(f, data, off):
        if f != fd:
            return real(f, data, off)
        calls[0] += 1
        if calls[0] > good:
            raise OSError(errno.ENOSPC, "No space left on device")
        if short is not None and calls[0] == good:
            return real(f, memoryview(data)[:short], off)
        return real(f, data, off)
    monkeypatch.setattr(os, "pwrite", pwrite)


# -- (A) ENOSPC part-way through a multi-block write -----------------------------------------

def test_a_full_disk_fails_a_mixed_write_before_it_changes_anything(tmp_path: Path):
    """8 present blocks then 8 absent ones, on a full tmpfs: the pieces overwriting the
    present blocks went in, then allocating the absent ones said ENOSPC, and the present
    blocks held new data under their old checksums for good (after a restart too). Now the
    range is allocated first: the write fails whole, and the old data reads back."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not _mount_tmpfs(mnt, "4m"):
        pytest.skip("cannot mount a small tmpfs here (needs CAP_SYS_ADMIN)")
    try:
        d = mnt / "disk"
        old, new = b"A" * (8 * BLOCK_SIZE), b"B" * (16 * BLOCK_SIZE)
        with ReplicaStore([(d, None)], extent_size=1 << 20) as s:
            s.create(V, 0, 1)
            s.write(V, 0, 0, old, seq=1)
            s.flush(V, 0)
            fd = os.open(mnt / "fill", os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                while True:
                    os.write(fd, b"x" * BLOCK_SIZE)
            except OSError as e:
                assert e.errno == errno.ENOSPC
            finally:
                os.close(fd)
            with pytest.raises(StoreFull):
                s.write(V, 0, 0, new, seq=1)
            assert s.read(V, 0, 0, 16 * BLOCK_SIZE)[0] == old + bytes(8 * BLOCK_SIZE)
            assert s.verify(V, 0) == []
            os.unlink(mnt / "fill")
        with ReplicaStore([(d, None)], extent_size=1 << 20) as s:
            assert s.verify(V, 0) == []
            assert s.read(V, 0, 0, 8 * BLOCK_SIZE)[0] == old
            s.write(V, 0, 0, new, seq=1)                        # the retry, with room again
            assert s.read(V, 0, 0, 16 * BLOCK_SIZE)[0] == new
    finally:
        _umount(mnt)


@pytest.mark.parametrize("short", [None, 6000], ids=["whole-piece", "short-piece"])
def test_a_data_write_failing_part_way_leaves_every_block_readable(tmp_path: Path, monkeypatch,
                                                                   short):
    """Where allocating first does not help (a file system without fallocate, a copy-on-write
    one, a present block whose data never reached the disk), a ``.data`` pwrite can still
    fail after earlier pieces overwrote present blocks: those get the checksum of what is
    on disk now (new data; a block cut part-way, its mix), absent blocks stay absent."""
    d = tmp_path / "d0"
    old, new = b"A" * (8 * BLOCK_SIZE), bytes(range(256)) * (16 * BLOCK_SIZE // 256)
    s = ReplicaStore([(d, None)], extent_size=SIZE)
    try:
        s.create(V, 0, 1)
        s.write(V, 0, 0, old, seq=1)
        s.flush(V, 0)
        _enospc_after(monkeypatch, s._replicas[(V, 0)].ext._data, 1, short)   # noqa: SLF001
        with pytest.raises(StoreFull):
            s.write(V, 0, 0, new, seq=1)
        monkeypatch.undo()
        assert s.verify(V, 0) == []
        got = s.read(V, 0, 0, 16 * BLOCK_SIZE)[0]
        n = short or WRITE_PIECE
        assert got == new[:n] + old[n:] + bytes(8 * BLOCK_SIZE)
        s.flush(V, 0)
    finally:
        s.close()
    with ReplicaStore([(d, None)], extent_size=SIZE) as s:          # the same after a restart
        assert s.verify(V, 0) == []
        assert s.read(V, 0, 0, 16 * BLOCK_SIZE)[0] == got


def test_only_a_write_mixing_present_and_absent_blocks_allocates_first(tmp_path: Path, monkeypatch):
    """The common overwrite (present blocks, one or many) and a first write (all absent) make
    no fallocate call: the 4 KiB write path has no syscall more."""
    calls = []
    real = extent_file.fallocate
    monkeypatch.setattr(extent_file, "fallocate", lambda *a: (calls.append(a), real(*a))[1])
    with ExtentFile.create(tmp_path, V, 0, extent_size=SIZE) as ext:
        ext.write(0, b"a" * (4 * BLOCK_SIZE))                 # all absent
        ext.write(0, b"b" * BLOCK_SIZE)                       # one present block
        ext.write_block(1, b"c" * BLOCK_SIZE)
        ext.write(100, b"d" * 50)                             # partial, present
        ext.write(0, b"e" * (4 * BLOCK_SIZE))                 # all present
        ext.write(9 * BLOCK_SIZE, b"f" * BLOCK_SIZE)          # one absent block
        assert calls == []
        ext.write(2 * BLOCK_SIZE, b"g" * (4 * BLOCK_SIZE))    # 2, 3 present; 4, 5 absent
        assert calls == [(ext._data, extent_file.FALLOC_FL_KEEP_SIZE,    # noqa: SLF001
                          2 * BLOCK_SIZE, 4 * BLOCK_SIZE)]
        assert os.fstat(ext._data).st_size == SIZE                       # noqa: SLF001
        assert ext.read(0, 6 * BLOCK_SIZE) == b"e" * 2 * BLOCK_SIZE + b"g" * 4 * BLOCK_SIZE


# -- (B) the COW floor is lowered before any block changes ------------------------------------

def test_an_unmap_zero_failing_part_way_keeps_the_snapshot_of_its_zeros(tmp_path: Path, monkeypatch):
    """A clone's extent: UNMAP with zero at seq 5 writes zeros 1 MiB at a time and fails in
    the second MiB. The first MiB is present at seq 5, so the floor must be <= 5: the floor
    lowered only after the loop stayed above it, the next write at seq 6 skipped the COW and
    the snapshot at 5 lost its zeros (it read through to the parent)."""
    size = 4 << 20
    with ReplicaStore([(tmp_path / "d0", None)], extent_size=size) as s:
        s.create("clone", 0, 1)
        rep = s._replicas[("clone", 0)]                                     # noqa: SLF001
        _enospc_after(monkeypatch, rep.ext._data, (1 << 20) // WRITE_PIECE)  # noqa: SLF001
        with pytest.raises(StoreFull):
            s.unmap("clone", 0, 0, size, seq=5, zero=True)
        monkeypatch.undo()
        assert s.read("clone", 0, 0, BLOCK_SIZE)[1] == b"\x01"             # zeros present at 5
        s.write("clone", 0, 0, b"N" * BLOCK_SIZE, seq=6)                     # after a snapshot at 5
        data, present = s.read("clone", 0, 0, BLOCK_SIZE, view=5)
        assert present == b"\x01" and data == bytes(BLOCK_SIZE)
        assert s.read("clone", 0, 0, BLOCK_SIZE)[0] == b"N" * BLOCK_SIZE


def test_an_import_failing_part_way_keeps_the_snapshot_of_what_it_wrote(tmp_path: Path, monkeypatch):
    """An IMPORT into an empty replica (floor: none) writes block 0 at seq 1, then fails on
    block 2: the floor must already be 1, or a write at seq 2 skips the COW of block 0."""
    with ReplicaStore([(tmp_path / "src", None)], extent_size=SIZE) as src, \
            ReplicaStore([(tmp_path / "dst", None)], extent_size=SIZE) as dst:
        src.create(V, 0, 1)
        src.write(V, 0, 0, b"a" * BLOCK_SIZE, seq=1)
        src.write(V, 0, 2 * BLOCK_SIZE, b"c" * BLOCK_SIZE, seq=1)
        blob, nxt = src.export(V, 0, 0, SIZE)
        assert nxt is None
        dst.create(V, 0, 1)
        _enospc_after(monkeypatch, dst._replicas[(V, 0)].ext._data, 1)      # noqa: SLF001
        with pytest.raises(StoreFull):
            dst.import_(V, 0, blob)
        monkeypatch.undo()
        assert dst.read(V, 0, 0, BLOCK_SIZE)[0] == b"a" * BLOCK_SIZE
        dst.write(V, 0, 0, b"z" * BLOCK_SIZE, seq=2)
        assert dst.read(V, 0, 0, BLOCK_SIZE, view=1) == (b"a" * BLOCK_SIZE, b"\x01")


# -- (C) a failed sync inside a write, unmap or trim retires the replica ---------------------

def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _fail_sync_of(monkeypatch, suffix: str) -> list[str]:
    """The next fdatasync of a file whose name ends with ``suffix`` fails with EIO."""
    real, failed = os.fdatasync, []

    def fdatasync(fd):
        if not failed and _fd_path(fd).endswith(suffix):
            failed.append(_fd_path(fd))
            raise OSError(errno.EIO, "Input/output error")
        return real(fd)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    return failed


def _versions_to_trim(s: ReplicaStore) -> None:
    s.write(V, 0, 0, b"0" * BLOCK_SIZE, seq=1)
    s.write(V, 0, BLOCK_SIZE, b"1" * BLOCK_SIZE, seq=2)
    s.write(V, 0, 0, b"2" * (2 * BLOCK_SIZE), seq=3)     # versions key 2: block 0 (1), block 1 (2)


SYNCS = {
    # name: (set-up, the call whose inline sync fails, the file it syncs)
    "seq-one-block": (lambda s: s.write(V, 0, 0, b"a" * BLOCK_SIZE, seq=1),
                      lambda s: s.write(V, 0, 2 * BLOCK_SIZE, b"b" * BLOCK_SIZE, seq=2), ".seq"),
    "seq-run": (lambda s: s.write(V, 0, 0, b"a" * BLOCK_SIZE, seq=1),
                lambda s: s.write(V, 0, 2 * BLOCK_SIZE, b"b" * (2 * BLOCK_SIZE), seq=2), ".seq"),
    "cow": (lambda s: s.write(V, 0, 0, b"a" * BLOCK_SIZE, seq=1),
            lambda s: s.write(V, 0, 0, b"b" * BLOCK_SIZE, seq=2), ".ver"),
    "unmap-crc": (lambda s: s.write(V, 0, 0, b"a" * BLOCK_SIZE, seq=1),
                  lambda s: s.unmap(V, 0, 0, BLOCK_SIZE, seq=1), ".crc"),
    "trim-drop": (_versions_to_trim, lambda s: s.trim(V, 0, {1}), ".ver"),
}


@pytest.mark.parametrize("case", sorted(SYNCS))
def test_a_failed_inline_sync_retires_the_replica(tmp_path: Path, monkeypatch, case: str):
    """Not only ``flush``: a failed fdatasync of ``.seq`` (a write making an absent block
    present after a snapshot), of a version (COW), of ``.crc`` (before an unmap's punch) or of
    dropped version slots (trim) may have lost dirty pages the next sync reports as written.
    The replica is broken from then on (I/O errors), its disk failed, as after a failed flush;
    it used to stay in service and a later FUA write or flush 'succeeded'."""
    set_up, call, suffix = SYNCS[case]
    s = ReplicaStore([(tmp_path / "d0", None)], extent_size=SIZE)
    try:
        s.create(V, 0, 1)
        s.create(V, 1, 1)
        set_up(s)
        s.flush(V, 0)
        failed = _fail_sync_of(monkeypatch, suffix)
        with pytest.raises(StoreIOError):
            call(s)
        assert failed, "the call did not sync that file"
        for later in (lambda: s.read(V, 0, 0, BLOCK_SIZE), lambda: s.flush(V, 0),
                      lambda: s.write(V, 0, 0, b"x" * BLOCK_SIZE, seq=9, fua=True)):
            with pytest.raises(StoreIOError, match="unusable: a flush failed"):
                later()
        assert s.usage()[0]["state"] == "failed"
        assert s.read(V, 1, 0, BLOCK_SIZE)[0] == bytes(BLOCK_SIZE)    # the disk's others still read
        s.delete(V, 0)
        assert not list((tmp_path / "d0").glob(f"{V}.0.*"))
    finally:
        s.close()


# -- (D) one extent, two disks ------------------------------------------------------------------

def test_no_second_copy_while_a_disk_that_did_not_open_may_hold_the_extent(tmp_path: Path):
    """A disk whose directory did not open at start hides its extents: a CREATE (a resync
    target, an IMPORT) must not put a copy elsewhere that the old one meets at the next start.
    A disk that failed later (its extents listed at start) does not stop creates."""
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    d1.write_bytes(b"")                                   # d1 does not open
    with ReplicaStore([(d1, None), (d2, None)], extent_size=SIZE) as s:
        with pytest.raises(StoreIOError, match="may be there"):
            s.create(V, 0, 2)
        assert not list(d2.glob(f"{V}.0.*"))
    d1.unlink()
    with ReplicaStore([(d1, None), (d2, None)], extent_size=SIZE) as s:
        s._disks[0].fail("EIO, later")                     # noqa: SLF001 - as a failed create does
        s.create(V, 0, 2)
        assert s.stat(V, 0)["disk"] == str(d2)


def test_a_copy_made_while_the_old_disk_was_unmounted_wins_by_generation(tmp_path: Path):
    """The audit's case: d1 not mounted, a recovery re-creates the extent on d2 and ends with
    SETGEN 3; d1 comes back with its copy of generation 1. Whatever the disks' order, the
    generation-3 copy is served and the stale one removed (it used to be the first scanned)."""
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    with ReplicaStore([(d1, None), (d2, None)], extent_size=SIZE) as s:
        s.create(V, 0, 1)
        assert s.stat(V, 0)["disk"] == str(d1)
        s.write(V, 0, 0, b"OLD!" * 1024, seq=1)
        s.flush(V, 0)
    os.rename(d1, tmp_path / "d1.fs")
    d1.mkdir()
    with ReplicaStore([(d1, None), (d2, None)], extent_size=SIZE) as s:
        s.set_probe_error(d1, "disk-id vanished (not mounted?)")
        with pytest.raises(StoreIOError, match="may be there"):
            s.read(V, 0, 0, 4096)
        s.create(V, 0, 1)                                 # the recovery target
        assert s.stat(V, 0)["disk"] == str(d2)
        s.write(V, 0, 0, b"NEW!" * 1024, seq=1)
        s.set_generation(V, 0, 3)
    d1.rmdir()
    os.rename(tmp_path / "d1.fs", d1)
    with ReplicaStore([(d1, None), (d2, None)], extent_size=SIZE) as s:
        assert s.stat(V, 0)["generation"] == 3 and s.read(V, 0, 0, 4)[0] == b"NEW!"
        assert s.broken == {} and not list(d1.glob(f"{V}.0*"))


def _copy(disk: Path, generation: int, data: bytes) -> None:
    with ReplicaStore([(disk, None)], extent_size=SIZE) as s:
        s.create(V, 0, 1)
        s.write(V, 0, 0, data, seq=1)
        s.set_generation(V, 0, generation)


@pytest.mark.parametrize("stale_first", [True, False])
def test_of_two_copies_the_higher_generation_is_served_whatever_the_disk_order(tmp_path: Path,
                                                                               stale_first):
    a, b = tmp_path / "a", tmp_path / "b"
    _copy(a, 1, b"OLD!" * 1024)
    _copy(b, 3, b"NEW!" * 1024)
    order = [a, b] if stale_first else [b, a]
    with ReplicaStore([(p, None) for p in order], extent_size=SIZE) as s:
        assert s.stat(V, 0)["generation"] == 3 and s.stat(V, 0)["disk"] == str(b)
        assert s.read(V, 0, 0, 4)[0] == b"NEW!"
        assert s.broken == {}
        assert not list(a.glob(f"{V}.0*"))               # the stale copy is gone
        s.delete(V, 0)
    with ReplicaStore([(p, None) for p in order], extent_size=SIZE) as s:
        with pytest.raises(NoExtent):                    # nothing stale comes back
            s.read(V, 0, 0, 4)


def test_two_copies_with_one_generation_are_both_broken_until_deleted(tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    _copy(a, 2, b"AAAA" * 1024)
    _copy(b, 2, b"BBBB" * 1024)
    for order in ([a, b], [b, a]):
        with ReplicaStore([(p, None) for p in order], extent_size=SIZE) as s:
            assert (V, 0) in s.broken and not s.has(V, 0)
            with pytest.raises(StoreIOError, match="same generation"):
                s.read(V, 0, 0, 4)
            with pytest.raises(StoreIOError):
                s.create(V, 0, 3)
    with ReplicaStore([(a, None), (b, None)], extent_size=SIZE) as s:
        s.delete(V, 0)                                   # both go
        assert not list(a.glob(f"{V}.0*")) and not list(b.glob(f"{V}.0*"))
        s.create(V, 0, 3)
        assert s.read(V, 0, 0, 4)[0] == bytes(4)
