"""A repair's mend keeps the durable order of writes, its syncs off the loop (audit 18, item 1).

``ReplicaStore.mend`` ran on the event loop with its syncs inline, and ignored ``_Hold``: a
deferred COW write that had written its snapshot copy (a version slot) and was waiting for
that copy's fdatasync in a worker thread left the mutation counter still, so a repair's
verdict taken meanwhile held, and the mend installed the peer's live block at once. The
page cache may write that block back before the version's sync: a power loss then keeps the
mended live block (seq 2) and loses the snapshot's copy (the snapshot reads the block absent).
Its own versions went the same way (written, then the live block, synced only by the flush
after), and a new version file's directory fsync and an unmapped block's ``.crc`` sync ran on
the loop.

Real stores, replica servers and etcd; the version file's sync is held in its worker thread
(``os.fdatasync`` of B's ``.ver`` files), and what the disk is asked to do is recorded as it
happens: B's ``.data`` writes while that sync is held, and which thread ran each sync.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from chunk.storage.extent_file import BLOCK_SIZE
from chunk.storage.replica_store import _Hold

from .replica_nodes import block
from .test_repair import VID

pytestmark = pytest.mark.timeout(60)

BLK = 3


def _path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


class HeldVersionSync:
    """The ``nth`` fdatasync of a version file under ``disk`` run in a worker thread waits for
    ``proceed`` (``reached`` set when it starts). Once ``watch`` is set, every pwrite to the
    data file ``data`` issued while that sync has not completed is recorded in ``early``."""

    def __init__(self, monkeypatch, disk: Path, data: Path, nth: int) -> None:
        self.nth, self.calls = nth, 0
        self.reached, self.proceed = threading.Event(), threading.Event()
        self.synced = False
        self.watch = False
        self.early: list[int] = []
        self._lock = threading.Lock()
        prefix, ino = str(disk), os.stat(data).st_ino
        real_sync, real_pwrite = os.fdatasync, os.pwrite

        def fdatasync(fd):
            if threading.current_thread() is not threading.main_thread():
                path = _path(fd)
                if path.startswith(prefix) and ".ver" in path:
                    with self._lock:
                        self.calls += 1
                        mine = self.calls == self.nth
                    if mine:
                        self.reached.set()
                        assert self.proceed.wait(10)
                        real_sync(fd)
                        self.synced = True
                        return None
            return real_sync(fd)

        def pwrite(fd, data, offset):
            if self.watch and not self.synced and os.fstat(fd).st_ino == ino:
                self.early.append(offset)
            return real_pwrite(fd, data, offset)

        monkeypatch.setattr(os, "fdatasync", fdatasync)
        monkeypatch.setattr(os, "pwrite", pwrite)


class HoldWaits:
    """Records the holds (``_Hold``) on ``rep`` that had to wait for another one there
    (``blocked``, set when such a ``take`` begins) and those taken (``taken``, in order)."""

    def __init__(self, monkeypatch, rep) -> None:
        self.blocked = asyncio.Event()
        self.waited: list = []
        self.taken: list = []
        real = _Hold.take

        async def take(hold):
            if hold.rep is rep and any(b in rep.busy for b in hold.blocks):
                self.waited.append(hold)
                self.blocked.set()
            await real(hold)
            if hold.rep is rep:
                self.taken.append(hold)

        monkeypatch.setattr(_Hold, "take", take)


async def _snapshot_write_held(nodes, monkeypatch):
    """A (no COW syncs) and B (``cow_sync``) with block BLK at seq 1; A took the write of
    seq 2 (a version key 1 of the old block), B takes it deferred (epoch 1) and is held in
    the fdatasync after its version slot was written. B's block then rots (after the COW read
    it): returns (a, b, the write's task, the hold)."""
    a = await nodes.add("A")
    b = await nodes.add("B", cow_sync=True)
    await nodes.extent(VID, 0, ["A", "B"], {BLK: block("old")})
    b.store.flush(VID, 0)
    a.store.write(VID, 0, BLK * BLOCK_SIZE, block("new"), 2)
    held = HeldVersionSync(monkeypatch, Path(b.store.stat(VID, 0)["disk"]), b.data_path(VID, 0),
                           nth=2)                       # 1: the COW's barrier, 2: after its slot
    b.store.admit(VID, 0, 1)
    later = b.store.write(VID, 0, BLK * BLOCK_SIZE, block("new"), 2, epoch=1)
    assert later is not None, "a COW with cow_sync is deferred"
    write = asyncio.create_task(later)
    assert await asyncio.to_thread(held.reached.wait, 5), "the deferred write's sync was not held"
    b.corrupt(VID, 0, BLK)
    held.watch = True
    return a, b, write, held


def _assert_views(a, b) -> None:
    assert b.store.verify(VID, 0) == []
    assert b.store.read(VID, 0, BLK * BLOCK_SIZE, BLOCK_SIZE)[0] == block("new")
    assert b.store.read(VID, 0, BLK * BLOCK_SIZE, BLOCK_SIZE, view=1)[0] == block("old")
    assert b.store.digest(VID, 0) == a.store.digest(VID, 0)


async def _repair_while_held(b, held, monkeypatch):
    """Start B's repair of BLK; once its mend is seen waiting for the hold of the deferred
    write on BLK (however many awaits the repair takes to get there), let the write's
    version sync go. Returns (the repair's task, the holds' record): ``_mend_waited`` then
    checks what happened."""
    waits = HoldWaits(monkeypatch, b.store._replicas[(VID, 0)])
    repair = asyncio.create_task(b.repair.repair_block(VID, 0, BLK))
    blocked = asyncio.create_task(waits.blocked.wait())
    try:
        done, _ = await asyncio.wait([repair, blocked], timeout=5,
                                     return_when=asyncio.FIRST_COMPLETED)
        assert waits.blocked.is_set(), ("the mend did not wait for the deferred write's hold "
                                        f"(repair done: {repair in done})")
        assert held.early == [] and waits.taken == [], "the mend went on during the sync"
    finally:
        blocked.cancel()
        held.proceed.set()
    return repair, waits


def _mend_waited(held, waits) -> None:
    """The repair is over: its mend waited for the write's hold, took it only then, and B's
    live block was not written until the write's version sync had completed (``early``
    records every such write up to that sync's end, not only those before the check)."""
    assert held.synced, "the deferred write's version sync never completed"
    assert held.early == [], ("the mend wrote the live block while the deferred write's "
                              "snapshot copy was not synced yet")
    assert len(waits.waited) == 1 and waits.taken == waits.waited, (waits.waited, waits.taken)
    assert waits.waited[0].blocks == range(BLK, BLK + 1)


async def test_a_mend_waits_for_the_deferred_write_holding_its_block(nodes, monkeypatch):
    a, b, write, held = await _snapshot_write_held(nodes, monkeypatch)
    repair, waits = await _repair_while_held(b, held, monkeypatch)
    await asyncio.wait_for(write, 10)
    assert await asyncio.wait_for(repair, 10)
    _mend_waited(held, waits)
    _assert_views(a, b)


async def test_a_mend_waits_for_the_last_sync_of_a_cancelled_write(nodes, monkeypatch):
    """Cancelled in its sync, the write changes nothing more (the counter stays: a verdict
    taken then holds) but its hold lasts until that sync ends: the mend waits for it, then
    installs A's block (and keeps the snapshot's copy the write made)."""
    a, b, write, held = await _snapshot_write_held(nodes, monkeypatch)
    write.cancel()
    await asyncio.gather(write, return_exceptions=True)
    repair, waits = await _repair_while_held(b, held, monkeypatch)
    assert await asyncio.wait_for(repair, 10)
    _mend_waited(held, waits)
    _assert_views(a, b)


class DiskOps:
    """(operation, file suffix, thread is the loop's) of the syncs and writes the storage code
    issues under ``disk``, in order."""

    SUFFIXES = (".seq", ".crc", ".data", ".hdr", ".ver", ".v")

    def __init__(self, monkeypatch, disk: Path) -> None:
        self.ops: list[tuple[str, str, bool]] = []
        self.on = False
        prefix = str(disk)
        real = {name: getattr(os, name) for name in ("fdatasync", "fsync", "pwrite")}

        def kind(path: str) -> str:
            name = path.removesuffix(" (deleted)")
            return next((s for s in self.SUFFIXES if name.endswith(s)), os.path.basename(name))

        def wrap(name: str, op: str):
            def call(fd, *args):
                if self.on:
                    path = _path(fd)
                    if path.startswith(prefix):
                        self.ops.append((op, kind(path),
                                         threading.current_thread() is threading.main_thread()))
                return real[name](fd, *args)
            return call

        monkeypatch.setattr(os, "fdatasync", wrap("fdatasync", "sync"))
        monkeypatch.setattr(os, "fsync", wrap("fsync", "sync"))
        monkeypatch.setattr(os, "pwrite", wrap("pwrite", "write"))

    def first(self, op: str, kind: str, after: int = 0) -> int:
        return next(i for i, o in enumerate(self.ops) if i >= after and o[:2] == (op, kind))


async def _ahead(nodes, a_change):
    """A and B (``cow_sync``) with block BLK at seq 1; ``a_change(a)`` reaches A only (at seq 2:
    a version key 1 of BLK that B lacks), and B's BLK rots: its repair takes A's block and that
    version (a new version file here)."""
    a = await nodes.add("A")
    b = await nodes.add("B", cow_sync=True)
    await nodes.extent(VID, 0, ["A", "B"], {BLK: block("old"), 5: block("five")})
    b.store.flush(VID, 0)
    a_change(a)
    b.corrupt(VID, 0, BLK)
    return a, b


async def test_a_mends_version_is_durable_before_its_live_block(nodes, monkeypatch):
    """The mend adds the version A has (the snapshot's copy of the old block) and installs
    A's live block at seq 2: the version is synced before the live block is written, as a
    COW's is before the write's data (it was synced only by the flush after the mend)."""
    a, b = await _ahead(nodes, lambda a: a.store.write(VID, 0, BLK * BLOCK_SIZE, block("new"), 2))
    ops = DiskOps(monkeypatch, Path(b.store.stat(VID, 0)["disk"]))
    ops.on = True
    assert await asyncio.wait_for(b.repair.repair_block(VID, 0, BLK), 10)
    ops.on = False
    put = ops.first("write", ".ver")
    live = ops.first("write", ".data")
    assert put < ops.first("sync", ".ver", put) < live, ops.ops
    assert ops.first("write", ".seq") < ops.first("sync", ".seq") < live, ops.ops
    _assert_views(a, b)


@pytest.mark.parametrize("change", ["write", "unmap"])
async def test_a_mend_syncs_nothing_on_the_loop(nodes, monkeypatch, change):
    """A new version file's directory fsync (A wrote at seq 2) and the zeroed checksum's sync
    before the punch (A unmapped the block at seq 2) ran inline, on the event loop."""
    def a_change(a):
        if change == "write":
            a.store.write(VID, 0, BLK * BLOCK_SIZE, block("new"), 2)
        else:
            a.store.unmap(VID, 0, BLK * BLOCK_SIZE, BLOCK_SIZE, 2)
    a, b = await _ahead(nodes, a_change)
    ops = DiskOps(monkeypatch, Path(b.store.stat(VID, 0)["disk"]))
    ops.on = True
    assert await asyncio.wait_for(b.repair.repair_block(VID, 0, BLK), 10)
    ops.on = False
    syncs = [o for o in ops.ops if o[0] == "sync"]
    assert syncs, "the mend was synced"
    assert [o for o in syncs if o[2]] == [], f"synced on the event loop: {syncs}"
    assert b.store.verify(VID, 0) == []
    assert b.store.digest(VID, 0) == a.store.digest(VID, 0)
    want = block("new") if change == "write" else bytes(BLOCK_SIZE)
    assert b.store.read(VID, 0, BLK * BLOCK_SIZE, BLOCK_SIZE)[0] == want
    assert b.store.read(VID, 0, BLK * BLOCK_SIZE, BLOCK_SIZE, view=1)[0] == block("old")
