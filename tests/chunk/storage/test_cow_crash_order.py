"""A power loss during a copy-on-write keeps the flushed snapshot's block.

A COW writes the old block's data into ``K.ver`` (new sparse space, whose allocation is
durable only at the file system's journal commit) and its slot (crc, origin) into a page
shared with the key's other slots (an in-place overwrite). A power loss can make the slot
durable and leave the data a hole. The retried write then finds a version for the block,
skips the copy and overwrites the live block: the snapshot's data would be gone.

The power loss is injected behind one seam, ``os.fdatasync`` (every store sync goes through
``extent_file.sync_fd``): at the k-th call it does not sync, it puts the ``.ver`` files in
the worst state write-back could leave them in (every data page allocated since that file's
last completed fdatasync is lost, in-place slot writes survive) and raises. Real files, a
real restart (a new ``ReplicaStore`` over the same directory).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from chunk.blockdev import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from chunk.storage.extent_file import BLOCK_SIZE
from chunk.storage.replica_store import ReplicaStore

pytestmark = pytest.mark.timeout(60)

BLOCKS = 16
SIZE = BLOCKS * BLOCK_SIZE
V = "vol-c"
ZERO_PAGE = bytes(BLOCK_SIZE)


class PowerLoss(BaseException):
    """The machine stopped: nothing after it runs (not an ``Exception`` the store handles)."""


def _old(b: int) -> bytes:
    return bytes([65 + b]) * BLOCK_SIZE


class WorstWriteback:
    """``os.fdatasync`` that loses power at its ``crash_at``-th call."""

    def __init__(self, root: Path, crash_at: int) -> None:
        self.root, self.crash_at, self.calls = root, crash_at, 0
        self.crashed = False
        self.real = os.fdatasync
        self.durable = {p: p.read_bytes() for p in root.rglob("*.ver")}   # all flushed

    def __call__(self, fd: int) -> None:
        self.calls += 1
        if self.calls == self.crash_at:
            self.crashed = True
            self._lose_new_space()
            raise PowerLoss
        self.real(fd)
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if path.suffix == ".ver":
            self.durable[path] = path.read_bytes()

    def _lose_new_space(self) -> None:
        """Punch every page past a ``.ver`` file's slot page that was a hole at its last
        completed sync: its allocation never committed. The slot page stays as written."""
        for path in self.root.rglob("*.ver"):
            old, now = self.durable.get(path, b""), path.read_bytes()
            fd = os.open(path, os.O_RDWR)
            try:
                for off in range(BLOCK_SIZE, len(now), BLOCK_SIZE):
                    was_hole = old[off:off + BLOCK_SIZE].strip(b"\0") == b""
                    if was_hole and now[off:off + BLOCK_SIZE] != ZERO_PAGE:
                        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, BLOCK_SIZE)
            finally:
                os.close(fd)


def _snapshot_then_one_cow(d: Path) -> ReplicaStore:
    """Blocks 0-3 flushed at seq 1 (snapshot 1), block 0 overwritten at seq 2 and flushed:
    the key-1 version file exists, its slot page allocated and durable."""
    s = ReplicaStore([(d, None)], extent_size=SIZE)          # cow_sync on, as served
    s.create(V, 0, 1)
    for b in range(4):
        s.write(V, 0, b * BLOCK_SIZE, _old(b), seq=1)
    s.flush(V, 0)
    s.write(V, 0, 0, b"x" * BLOCK_SIZE, seq=2)
    s.flush(V, 0)
    return s


def _write(s: ReplicaStore, off: int, data: bytes, seq: int, deferred: bool) -> None:
    """A write as called inline, or as the replica server runs it (``epoch`` given: a COW
    comes back as a coroutine whose syncs run in worker threads)."""
    if not deferred:
        s.write(V, 0, off, data, seq=seq)
        return
    s.admit(V, 0, 1)
    later = s.write(V, 0, off, data, seq=seq, epoch=1)
    if later is not None:
        asyncio.run(later)


@pytest.mark.parametrize("deferred", [False, True], ids=["inline", "deferred"])
def test_a_power_loss_at_any_sync_of_a_cow_keeps_the_snapshot_block(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    deferred: bool):
    crash_at = 0
    while True:
        crash_at += 1
        d = tmp_path / f"crash-at-{crash_at}"
        s = _snapshot_then_one_cow(d)
        disk = WorstWriteback(d, crash_at)
        with monkeypatch.context() as m:
            m.setattr(os, "fdatasync", disk)
            try:
                _write(s, 3 * BLOCK_SIZE, b"n" * BLOCK_SIZE, 2, deferred)   # COW #2 into key 1
            except PowerLoss:
                pass
        s.close()
        if not disk.crashed:
            break                                       # every sync of the write was tried
        s = ReplicaStore([(d, None)], extent_size=SIZE)   # restart
        try:
            _write(s, 3 * BLOCK_SIZE, b"n" * BLOCK_SIZE, 2, deferred)     # the coordinator's retry
            s.flush(V, 0)
            assert s.read(V, 0, 3 * BLOCK_SIZE, BLOCK_SIZE)[0] == b"n" * BLOCK_SIZE
            view = s.read(V, 0, 0, 4 * BLOCK_SIZE, view=1)[0]
            assert view == b"".join(_old(b) for b in range(4)), f"power loss at sync {crash_at}"
            assert s.verify(V, 0) == []
        finally:
            s.close()
    assert crash_at > 1, "the COW synced nothing"
