"""A COW whose slot writes fail part-way (a full disk allocating a slot page) leaves no slot
that a retried write trusts unsynced.

A COW syncs the saved blocks' data, writes their slots, and syncs again before the live
blocks change. Slots of blocks 512 apart are in different pages of the sparse version file;
the first write into a page allocates it, and on a full disk fails. The slots written before
stayed in the page cache and in memory, unsynced, and the write failed. The host's retry
(or any later write of those blocks at that seq) then found their versions already there
("a retried COW keeps the first copy"), synced nothing and overwrote the live blocks: a power
loss before writeback kept the new live block and lost its slot, and the snapshot read the
block as absent (zeros).

The full disk is one ENOSPC from ``os.pwrite`` on the second slot page; the power loss is
simulated on real files (the ``.ver`` file put back to its content at its last completed
fdatasync, the live files kept as written), then a real restart.
"""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest

from chunk.storage.extent_file import BLOCK_SIZE
from chunk.storage.replica_store import ReplicaStore, StoreFull

pytestmark = pytest.mark.timeout(60)

BLOCKS = 1024
SIZE = BLOCKS * BLOCK_SIZE
V = "vol-slot"
FAR = 600                               # its slot is in the second slot page (600 * 8 > 4096)
OLD = b"o" * BLOCK_SIZE


class VerDurable:
    """``os.fdatasync`` remembering each ``.ver`` file's content at its last completed sync."""

    def __init__(self) -> None:
        self.real, self.durable = os.fdatasync, {}

    def __call__(self, fd: int) -> None:
        self.real(fd)
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if path.suffix == ".ver":
            self.durable[path] = path.read_bytes()


def _fail_second_slot_page(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """ENOSPC for the first pwrite into a ``.ver`` file's second slot page."""
    real, failed = os.pwrite, []

    def pwrite(fd: int, data, offset: int) -> int:
        if not failed and 4096 <= offset < BLOCKS * 8 and len(data) == 8 \
                and os.readlink(f"/proc/self/fd/{fd}").endswith(".ver"):
            failed.append(offset)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)
    monkeypatch.setattr(os, "pwrite", pwrite)
    return failed


def _write(s: ReplicaStore, off: int, data: bytes, seq: int, deferred: bool) -> None:
    """A write called inline, or as the replica server calls it (with the owner's epoch: a
    COW comes back as a coroutine, its syncs in worker threads)."""
    later = s.write(V, 0, off, data, seq=seq, epoch=1 if deferred else 0)
    if later is not None:
        asyncio.run(later)


@pytest.mark.parametrize("deferred", [False, True], ids=["inline", "deferred"])
def test_a_cow_failing_at_a_slot_page_leaves_no_unsynced_slot_trusted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, deferred: bool):
    d = tmp_path / "d0"
    s = ReplicaStore([(d, None)], extent_size=SIZE)           # cow_sync on, as served
    try:
        s.create(V, 0, 1)
        s.write(V, 0, 0, OLD, seq=1)
        s.write(V, 0, FAR * BLOCK_SIZE, OLD, seq=1)
        s.flush(V, 0)
        s.admit(V, 0, 1)
        disk = VerDurable()
        monkeypatch.setattr(os, "fdatasync", disk)
        failed = _fail_second_slot_page(monkeypatch)
        # Snapshot 1 is taken (seq 2); one write covers both blocks: the disk is full.
        with pytest.raises(StoreFull):
            _write(s, 0, b"n" * (FAR + 1) * BLOCK_SIZE, 2, deferred)
        assert failed, "the slot write did not fail"
        _write(s, 0, b"r" * BLOCK_SIZE, 2, deferred)           # the host's next write of block 0
        assert s.read(V, 0, 0, BLOCK_SIZE, view=1)[0] == OLD
    finally:
        s.close()
    for path, content in disk.durable.items():                # the power loss, before a flush
        path.write_bytes(content)
    monkeypatch.undo()
    s = ReplicaStore([(d, None)], extent_size=SIZE)
    try:
        assert s.read(V, 0, 0, BLOCK_SIZE)[0] == b"r" * BLOCK_SIZE     # written back, kept
        assert s.read(V, 0, 0, BLOCK_SIZE, view=1)[0] == OLD, "snapshot 1 lost block 0"
        assert s.read(V, 0, FAR * BLOCK_SIZE, BLOCK_SIZE, view=1)[0] == OLD
    finally:
        s.close()
