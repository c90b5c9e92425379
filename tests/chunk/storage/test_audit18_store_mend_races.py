"""A change that ignores a mend's hold, landing during one of its syncs, makes it stop
(audit 18, review of the mend's hold: items 1 and 2).

``mend_async`` checked its verdict once, after taking its block's hold, and trusted it
through every sync that followed. Writes and unmaps with an epoch wait for the hold, but
``import_``, ``trim`` and ``revert_async`` do not: an IMPORT landing during the mend's sync
was overwritten by the mend's older blob (the replica left at the old seq, its digest
differing from the peer's), and a reclaim trim that dropped the very version entry the mend
was replacing (slot zeroed, data punched) had the mend write that slot back over the hole,
a version failing its checksum for good. Now, after each of its syncs, the mend compares the
state of its blocks (seqs, checksums, version entries) with what it left before the sync, and
answers False (the repair verifies again) if anything else changed them.

Real stores on tmp_path; one sync of the mend, in its worker thread, is held (``os.fsync`` /
``os.fdatasync`` of a chosen file waiting on an event) while the other change lands on the loop.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from chunk.storage.extent_file import BLOCK_SIZE
from chunk.storage.replica_store import ReplicaStore

pytestmark = pytest.mark.timeout(60)

SIZE = 32 * BLOCK_SIZE
V = "vol-a"
BLK = 3


def blk(s: str) -> bytes:
    return (s.encode() * BLOCK_SIZE)[:BLOCK_SIZE]


class HeldSync:
    """The ``nth`` sync (fsync or fdatasync) run in a worker thread of a file whose path ends
    with ``suffix`` waits for ``proceed``; ``reached`` is set when it starts."""

    def __init__(self, monkeypatch, suffix: str, nth: int = 1) -> None:
        self.reached, self.proceed = threading.Event(), threading.Event()
        self.calls = 0
        self._lock = threading.Lock()

        def wrap(real):
            def call(fd):
                if threading.current_thread() is not threading.main_thread() \
                        and os.readlink(f"/proc/self/fd/{fd}").endswith(suffix):
                    with self._lock:
                        self.calls += 1
                        mine = self.calls == nth
                    if mine:
                        self.reached.set()
                        assert self.proceed.wait(10)
                return real(fd)
            return call

        monkeypatch.setattr(os, "fsync", wrap(os.fsync))
        monkeypatch.setattr(os, "fdatasync", wrap(os.fdatasync))


def _rot(path: Path, offset: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"rot!" * (BLOCK_SIZE // 4), offset)
    finally:
        os.close(fd)


def _pair(tmp_path: Path) -> tuple[ReplicaStore, ReplicaStore]:
    """L and P (``cow_sync``) with BLK at seq 1."""
    stores = []
    for name in ("L", "P"):
        s = ReplicaStore([(tmp_path / name, None)], extent_size=SIZE, cow_sync=True)
        s.create(V, 0, 1)
        s.write(V, 0, BLK * BLOCK_SIZE, blk("a"), 1)
        s.write(V, 0, 7 * BLOCK_SIZE, blk("7"), 1)
        s.flush(V, 0)
        stores.append(s)
    return stores[0], stores[1]


async def _mend_held(store, blob, verdict, held):
    mend = asyncio.create_task(store.mend_async(V, 0, blob, verified=verdict))
    assert await asyncio.to_thread(held.reached.wait, 10), "the mend's sync was not held"
    return mend


# (P's change at seq 2, file suffix, nth) of the mend's sync held: its new version file's
# directory entry, the barrier after the version's data, the sync after its slot, the
# ``.seq`` sync, and (P unmapped the block) the zeroed checksum's sync before the punch.
STEPS = [("write", ".v", 1), ("write", ".ver", 1), ("write", ".ver", 2), ("write", ".seq", 1),
         ("unmap", ".ver", 2), ("unmap", ".crc", 1)]


@pytest.mark.parametrize("change,suffix,nth", STEPS)
async def test_an_import_during_a_mends_sync_is_not_undone(tmp_path, monkeypatch, change,
                                                           suffix, nth):
    """L's live block rots; its repair fetched P's block at seq 2 (with the version key 1 L
    lacks); P takes seq 3, and a recovery IMPORTs P's state into L while the mend waits for
    a sync. The mend must not then install its older blob over the import."""
    L, P = _pair(tmp_path)
    if change == "write":                                        # L lacks it
        P.write(V, 0, BLK * BLOCK_SIZE, blk("n"), 2)
    else:
        P.unmap(V, 0, BLK * BLOCK_SIZE, BLOCK_SIZE, 2)
    fetched = P.export(V, 0, BLK * BLOCK_SIZE, BLOCK_SIZE)[0]    # the repair's fetch
    P.write(V, 0, BLK * BLOCK_SIZE, blk("N"), 3)
    current = P.export(V, 0, BLK * BLOCK_SIZE, BLOCK_SIZE)[0]    # the recovery's
    _rot(tmp_path / "L" / f"{V}.0.data", BLK * BLOCK_SIZE)
    verdict = await L.verify_verdict_async(V, 0, BLK, 1)
    assert verdict is not None and verdict.bad_live == {BLK}
    held = HeldSync(monkeypatch, suffix, nth)
    mend = await _mend_held(L, fetched, verdict, held)
    try:
        assert L.import_(V, 0, current)                         # no hold taken
    finally:
        held.proceed.set()
    assert await asyncio.wait_for(mend, 10) is False, "the mend went on over the import"
    monkeypatch.undo()
    L.flush(V, 0)
    assert L.verify(V, 0) == []
    assert L.read(V, 0, BLK * BLOCK_SIZE, BLOCK_SIZE)[0] == blk("N")
    assert L.digest(V, 0) == P.digest(V, 0)


async def test_an_import_of_other_blocks_during_a_mends_sync_lets_it_finish(tmp_path,
                                                                            monkeypatch):
    """Only a change of the mend's own blocks stops it: an IMPORT of another block (as a
    write elsewhere in the extent) does not."""
    L, P = _pair(tmp_path)
    P.write(V, 0, BLK * BLOCK_SIZE, blk("n"), 2)
    P.write(V, 0, 7 * BLOCK_SIZE, blk("s"), 2)
    fetched = P.export(V, 0, BLK * BLOCK_SIZE, BLOCK_SIZE)[0]
    other = P.export(V, 0, 7 * BLOCK_SIZE, BLOCK_SIZE)[0]
    _rot(tmp_path / "L" / f"{V}.0.data", BLK * BLOCK_SIZE)
    verdict = await L.verify_verdict_async(V, 0, BLK, 1)
    held = HeldSync(monkeypatch, ".ver", 1)
    mend = await _mend_held(L, fetched, verdict, held)
    try:
        assert L.import_(V, 0, other)
    finally:
        held.proceed.set()
    assert await asyncio.wait_for(mend, 10) is True
    monkeypatch.undo()
    L.flush(V, 0)
    assert L.verify(V, 0) == []
    assert L.digest(V, 0) == P.digest(V, 0)


async def test_a_trim_during_a_mends_barrier_does_not_leave_a_rotten_version(tmp_path,
                                                                            monkeypatch):
    """L's version (key 2) of block 5 rots; the mend replaces it from P's copy, and while it
    waits for the barrier after that version's data, the reclaimer trims it (only snapshot 1
    is left: nothing reads it): slot zeroed, data punched. The mend must not then write the
    slot back over the hole."""
    stores = []
    for name in ("L", "P"):
        s = ReplicaStore([(tmp_path / name, None)], extent_size=SIZE, cow_sync=True)
        s.create(V, 0, 1)
        s.write(V, 0, 3 * BLOCK_SIZE, blk("a"), 1)
        s.write(V, 0, 5 * BLOCK_SIZE, blk("b"), 2)
        s.write(V, 0, 3 * BLOCK_SIZE, blk("A"), 3)       # version key 2: block 3, origin 1
        s.write(V, 0, 5 * BLOCK_SIZE, blk("B"), 3)       # version key 2: block 5, origin 2
        s.flush(V, 0)
        stores.append(s)
    L, P = stores
    ver = tmp_path / "L" / f"{V}.0.v" / "2.ver"
    data_at = -(-32 * 8 // BLOCK_SIZE) * BLOCK_SIZE
    _rot(ver, data_at + 5 * BLOCK_SIZE)
    verdict = await L.verify_verdict_async(V, 0, 5, 1)
    assert verdict is not None and set(verdict.bad_versions) == {(5, 2)}
    blob = P.export(V, 0, 5 * BLOCK_SIZE, BLOCK_SIZE)[0]
    held = HeldSync(monkeypatch, ".ver", 1)
    mend = await _mend_held(L, blob, verdict, held)
    try:
        assert L.trim(V, 0, {1}) == 1                   # block 5's version: unread
    finally:
        held.proceed.set()
    assert await asyncio.wait_for(mend, 10) is False, "the mend wrote a slot the trim dropped"
    monkeypatch.undo()
    L.flush(V, 0)
    assert L.verify(V, 0) == [], "a version slot over punched data"
    assert sorted(L._replicas[(V, 0)].versions[2].entries) == [3]
    assert L.read(V, 0, 3 * BLOCK_SIZE, BLOCK_SIZE, view=1)[0] == blk("a")
