"""The order in which the replica store makes things durable (power-loss safety).

A power loss cannot be simulated here, so these tests record, on real files in
tmp_path, the durable operations the storage modules issue (pwrite, fdatasync,
fsync, hole punch, unlink) and check their order: what must be on disk before
what (docs/storage.md, "Durability contract").
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from chunk.storage import extent_file, replica_store
from chunk.storage.extent_file import BLOCK_SIZE, ExtentFile
from chunk.storage.replica_store import ReplicaStore

pytestmark = pytest.mark.timeout(120)

SIZE = 32 * BLOCK_SIZE
V = "vol-d"


def _kind(path: str) -> str:
    """The role of a file the store touches: .seq, .crc, .data, .ver, .v (directory)."""
    name = os.path.basename(path)
    for suffix in (".seq", ".crc", ".data", ".hdr", ".ver", ".v"):
        if name.endswith(suffix):
            return suffix
    return name


class Ops(list):
    """(operation, kind, path) in the order the storage code issued them."""

    def kinds(self) -> list[tuple[str, str]]:
        return [(op, kind) for op, kind, _ in self]

    def index(self, op: str, kind: str) -> int:           # type: ignore[override]
        return self.kinds().index((op, kind))

    def count(self, op: str, kind: str) -> int:           # type: ignore[override]
        return self.kinds().count((op, kind))


@pytest.fixture
def ops(monkeypatch: pytest.MonkeyPatch) -> Ops:
    log = Ops()

    def name(fd: int) -> str:
        return os.readlink(f"/proc/self/fd/{fd}")

    def record(op: str, path: str) -> None:
        log.append((op, _kind(path), path))

    real_fdatasync, real_fsync, real_pwrite = os.fdatasync, os.fsync, os.pwrite
    real_unlink, real_fallocate = os.unlink, extent_file.fallocate
    assert replica_store.fallocate is real_fallocate

    def fdatasync(fd: int) -> None:
        record("sync", name(fd))
        real_fdatasync(fd)

    def fsync(fd: int) -> None:
        record("sync", name(fd))
        real_fsync(fd)

    def pwrite(fd: int, data, offset: int) -> int:
        record("write", name(fd))
        return real_pwrite(fd, data, offset)

    def unlink(path, *args, **kwargs) -> None:
        record("unlink", os.fspath(path))
        real_unlink(path, *args, **kwargs)

    def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
        record("punch", name(fd))
        real_fallocate(fd, mode, offset, length)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "unlink", unlink)
    monkeypatch.setattr(extent_file, "fallocate", fallocate)
    monkeypatch.setattr(replica_store, "fallocate", fallocate)
    return log


@pytest.fixture
def store(tmp_path: Path):
    s = ReplicaStore([(tmp_path / "d0", None)], extent_size=SIZE)    # cow_sync on, as served
    s.create(V, 0, 1)
    yield s
    s.close()


def _blk(seed: int, n: int = 1) -> bytes:
    return bytes((seed * 31 + i) % 251 for i in range(n * BLOCK_SIZE))


@pytest.fixture(params=["inline", "deferred"])
def write(request):
    """``store.write`` as called inline, or as the replica server runs it (``epoch`` given: a
    write waiting for the disk comes back as a coroutine, its syncs in worker threads)."""
    def inline(store: ReplicaStore, off: int, data: bytes, seq: int) -> None:
        store.write(V, 0, off, data, seq=seq)

    def deferred(store: ReplicaStore, off: int, data: bytes, seq: int) -> None:
        store.admit(V, 0, 1)
        later = store.write(V, 0, off, data, seq=seq, epoch=1)
        if later is not None:
            asyncio.run(later)
    return inline if request.param == "inline" else deferred


# -- defect 1: an absent block's new seq is durable before its checksum ----------------------

def test_absent_block_written_after_a_snapshot_syncs_seq_before_crc(store: ReplicaStore, ops: Ops,
                                                                   write):
    store.write(V, 0, 0, _blk(1), seq=1)                   # block 0 present at 1
    ops.clear()
    write(store, 5 * BLOCK_SIZE, _blk(2), 2)               # 4 KiB fast path, block 5 absent
    assert ("sync", ".seq") in ops.kinds()
    assert ops.index("write", ".seq") < ops.index("sync", ".seq") < ops.index("write", ".crc")
    assert store.read(V, 0, 5 * BLOCK_SIZE, BLOCK_SIZE, view=1)[1] == b"\x00"

    ops.clear()                                            # the long path: two absent blocks
    write(store, 6 * BLOCK_SIZE, _blk(3, 2), 2)
    assert ops.index("write", ".seq") < ops.index("sync", ".seq") < ops.index("write", ".crc")

    store.unmap(V, 0, 8 * BLOCK_SIZE, BLOCK_SIZE, seq=2)   # unmapped at 2, written at 3
    ops.clear()
    write(store, 8 * BLOCK_SIZE, _blk(4), 3)
    assert ops.index("write", ".seq") < ops.index("sync", ".seq") < ops.index("write", ".crc")


def test_cow_and_absent_in_one_write_version_then_seq_then_crc(store: ReplicaStore, ops: Ops, write):
    store.write(V, 0, 0, _blk(1), seq=1)
    ops.clear()
    write(store, 0, _blk(2, 2), 2)                         # block 0 COW, block 1 absent
    k = ops.kinds()
    assert k.index(("sync", ".v")) < k.index(("sync", ".ver"))      # the new file linked first
    assert k.index(("sync", ".ver")) < k.index(("write", ".seq")) < k.index(("sync", ".seq")) \
        < k.index(("write", ".crc"))


def test_common_writes_sync_nothing(store: ReplicaStore, ops: Ops):
    """The cost: no sync for a volume never snapshotted (seq 1), a present block at its
    seq, or an absent block whose seq is already current."""
    store.write(V, 0, 0, _blk(1), seq=1)                   # absent, but no snapshot yet
    store.write(V, 0, 0, _blk(2, 3), seq=1)
    store.write(V, 0, 0, _blk(3), seq=1)                   # present, seq current
    store.write(V, 0, 10 * BLOCK_SIZE, _blk(6), seq=2)     # absent block made present at 2
    store.unmap(V, 0, 10 * BLOCK_SIZE, BLOCK_SIZE, seq=2)  # absent again, its seq 2 durable
    ops.clear()
    store.write(V, 0, 10 * BLOCK_SIZE, _blk(4), seq=2)
    store.write(V, 0, 10 * BLOCK_SIZE, _blk(5), seq=2)
    store.unmap(V, 0, 20 * BLOCK_SIZE, 4 * BLOCK_SIZE, seq=2)   # nothing present there
    assert [o for o in ops.kinds() if o[0] == "sync"] == []


def test_flush_syncs_versions_then_seq_then_data_and_crc(store: ReplicaStore, ops: Ops):
    store.write(V, 0, 0, _blk(1), seq=1)
    store.write(V, 0, 0, _blk(2), seq=2)
    ops.clear()
    store.flush(V, 0)
    syncs = [k for op, k in ops.kinds() if op == "sync"]
    assert syncs == [".ver", ".seq", ".data", ".crc"]


def test_revert_sees_a_block_whose_seq_did_not_reach_the_disk(tmp_path: Path):
    """The state a power loss can leave after a COW write: new data and crc, old seq.
    The version says the block changed after the snapshot; revert restores it."""
    disk = tmp_path / "d0"
    with ReplicaStore([(disk, None)], extent_size=SIZE) as s:
        s.create(V, 0, 1)
        s.write(V, 0, 0, _blk(1), seq=1)
        s.write(V, 0, 0, _blk(2), seq=2)                   # version (1, 1) of block 0
        s.flush(V, 0)
    seq_file = disk / f"{V}.0.seq"
    fd = os.open(seq_file, os.O_WRONLY)
    try:
        os.pwrite(fd, (1).to_bytes(4, "little"), 0)       # seq 2 lost, data and crc kept
    finally:
        os.close(fd)
    with ReplicaStore([(disk, None)], extent_size=SIZE) as s:
        assert s.read(V, 0, 0, BLOCK_SIZE, view=1)[0] == _blk(1)
        s.revert(V, 0, 1, seq=3)
        assert s.read(V, 0, 0, BLOCK_SIZE)[0] == _blk(1)


# -- defect 2: an unmap's zero checksums are durable before the punch ------------------------

def test_extent_unmap_syncs_crc_before_punch(tmp_path: Path, ops: Ops):
    with ExtentFile.create(tmp_path, "v", 0, extent_size=SIZE) as ext:
        ext.write(0, _blk(1, 4))
        ops.clear()
        ext.unmap(BLOCK_SIZE, 2 * BLOCK_SIZE)
        assert ops.index("write", ".crc") < ops.index("sync", ".crc") < ops.index("punch", ".data")
        assert ext.read(0, 4 * BLOCK_SIZE) == _blk(1)[:BLOCK_SIZE] + bytes(2 * BLOCK_SIZE) \
            + _blk(1, 4)[3 * BLOCK_SIZE:]
        ops.clear()
        ext.unmap(8 * BLOCK_SIZE, 8 * BLOCK_SIZE)          # nothing present: no sync needed
        assert ops.count("sync", ".crc") == 0


def _unmap(s: ReplicaStore, off: int, length: int, seq: int, deferred: bool) -> None:
    """``s.unmap`` inline, or as the replica server runs it (the ``write`` fixture's way)."""
    if not deferred:
        s.unmap(V, 0, off, length, seq=seq)
        return
    s.admit(V, 0, 1)
    later = s.unmap(V, 0, off, length, seq=seq, epoch=1)
    assert later is not None                                # present blocks: it waits for a sync
    asyncio.run(later)


@pytest.mark.parametrize("deferred", [False, True], ids=["inline", "deferred"])
def test_store_unmap_of_a_long_range_syncs_crc_once_before_punching(tmp_path: Path, ops: Ops,
                                                                    deferred: bool):
    size = 4 << 20                                          # several of the store's 1 MiB pieces
    with ReplicaStore([(tmp_path / "d0", None)], extent_size=size) as s:
        s.create(V, 0, 1)
        s.write(V, 0, 0, bytes(b"\x01" * size), seq=1)
        ops.clear()
        _unmap(s, 0, size, 1, deferred)
        assert ops.count("sync", ".crc") == 1
        k = ops.kinds()
        last_crc_write = len(k) - 1 - k[::-1].index(("write", ".crc"))
        assert last_crc_write < k.index(("sync", ".crc")) < k.index(("punch", ".data"))
        assert s.read(V, 0, 0, size)[0] == bytes(size)


@pytest.mark.parametrize("deferred", [False, True], ids=["inline", "deferred"])
def test_store_unmap_after_a_snapshot_keeps_the_blocks_for_it_synced_first(tmp_path: Path, ops: Ops,
                                                                           deferred: bool):
    size = 2 << 20
    with ReplicaStore([(tmp_path / "d0", None)], extent_size=size) as s:
        s.create(V, 0, 1)
        s.write(V, 0, 0, _blk(7, size // BLOCK_SIZE), seq=1)
        ops.clear()
        _unmap(s, 0, size, 2, deferred)                      # snapshot 1 taken: a COW first
        k = ops.kinds()
        syncs = [i for i, op in enumerate(k) if op == ("sync", ".ver")]
        assert len(syncs) == 4                               # barrier + slots, per 1 MiB piece
        assert syncs[1] < k.index(("write", ".crc"))         # piece 1 preserved before zeroed
        assert syncs[3] < k.index(("sync", ".crc")) < k.index(("punch", ".data"))
        assert s.read(V, 0, 0, size)[0] == bytes(size)
        assert s.read(V, 0, 0, size, view=1)[0] == _blk(7, size // BLOCK_SIZE)
        assert s.verify(V, 0) == []


# -- defect 3: removing versions ---------------------------------------------------------------

def _two_origins(s: ReplicaStore) -> None:
    """Key 2 holds block 0 (origin 1) and block 1 (origin 2)."""
    s.write(V, 0, 0, _blk(1), seq=1)
    s.write(V, 0, BLOCK_SIZE, _blk(2), seq=2)
    s.write(V, 0, 0, _blk(3, 2), seq=3)


def test_trim_syncs_zeroed_slots_before_punching(store: ReplicaStore, ops: Ops):
    _two_origins(store)
    ops.clear()
    assert store.trim(V, 0, {1}) == 1                      # block 1's (2, 2) goes, block 0's stays
    assert ops.index("write", ".ver") < ops.index("sync", ".ver") < ops.index("punch", ".ver")
    assert store.read(V, 0, 0, BLOCK_SIZE, view=1)[0] == _blk(1)


def test_trim_fsyncs_the_directory_after_unlinking(store: ReplicaStore, ops: Ops):
    _two_origins(store)
    ver = store._replicas[(V, 0)].versions[2].path        # noqa: SLF001
    ops.clear()
    assert store.trim(V, 0, set()) == 2
    assert not ver.exists()
    k = ops.kinds()
    assert k.index(("unlink", ".ver")) < len(k) - 1 - k[::-1].index(("sync", ".v"))


def test_flush_fsyncs_the_directory_after_an_import_unlinked_versions(tmp_path: Path, ops: Ops):
    with ReplicaStore([(tmp_path / "src", None)], extent_size=SIZE) as src, \
            ReplicaStore([(tmp_path / "dst", None)], extent_size=SIZE) as dst:
        src.create(V, 0, 1)
        src.write(V, 0, 0, _blk(7, 2), seq=3)              # no versions
        dst.create(V, 0, 1)
        _two_origins(dst)
        blob, nxt = src.export(V, 0, 0, SIZE)
        assert nxt is None
        ops.clear()
        assert dst.import_(V, 0, blob)
        assert ("unlink", ".ver") in ops.kinds()
        dst.set_generation(V, 0, 2)                          # flushes first
        k = ops.kinds()
        assert k.index(("unlink", ".ver")) < k.index(("sync", ".v"))
        assert dst.digest(V, 0) == src.digest(V, 0)
