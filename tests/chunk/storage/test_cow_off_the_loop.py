"""A write that must copy-on-write waits for the disk without stopping the event loop.

A COW makes the preserved block durable before the live one changes: two fdatasyncs of the
version file (``replica_store``, step 1). They ran inline on the chunk server's event loop, so
every first overwrite of a block after a snapshot stopped every other request of every volume
on that server for two device syncs (~4 ms each on this machine's disk: 23k -> 0.85k IOPS
right after a snapshot, 4 KiB QD32). Now they run in worker threads: other requests are
answered meanwhile, and the COW's own order (version data, sync, slots, sync, live data) is
kept (test_cow_crash_order and test_durable_order cover the deferred path too). An UNMAP of
blocks a snapshot still reads does the same.

The version file's syncs are held behind one seam, ``os.fdatasync``: off the loop's thread
until the test lets them go; on it (the code before) for at most 1.5 s each, long enough to
show the loop stalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from pathlib import Path
from typing import AsyncIterator

import pytest

from chunk.storage.extent_file import BLOCK_SIZE
from chunk.storage.replica_store import ReplicaStore
from chunk.storage.wire import Frame, Op, Pipeline, Status
from tests.chunk.storage.raw_peer import EXTENT, authed_raw, replica_server
from tests.cluster import async_wait_for

pytestmark = pytest.mark.timeout(60)

VID = "vol-cow"


def _hold_version_syncs(monkeypatch) -> tuple[threading.Event, list[bool]]:
    """(proceed, calls): fdatasyncs of ``.ver`` files wait for ``proceed`` (1.5 s at most on
    the loop's thread); ``calls`` records for each whether it ran on the loop's thread."""
    loop_thread = threading.get_ident()
    proceed, calls = threading.Event(), []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = ""
        if path.endswith(".ver"):
            on_loop = threading.get_ident() == loop_thread
            calls.append(on_loop)
            proceed.wait(1.5 if on_loop else 10)
        real(fd)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    return proceed, calls


def _write(idx: int, off: int, data: bytes, seq: int) -> Frame:
    return Frame(Op.WRITE, 0, VID, idx, 1, 1, off, len(data), data, seq=seq)


@contextlib.asynccontextmanager
async def _served(tmp_path: Path) -> AsyncIterator[tuple[ReplicaStore, Pipeline]]:
    """A replica server over a store syncing as served (cow_sync on), and a peer connection."""
    async with replica_server(tmp_path, cow_sync=True, auth_timeout=1.0) as (server, store):
        pipe = Pipeline(*await authed_raw(server))
        try:
            yield store, pipe
        finally:
            await pipe.close()


async def test_a_cow_write_leaves_the_loop_serving_other_requests(tmp_path: Path, monkeypatch):
    async with _served(tmp_path) as (store, pipe):
        for idx in (0, 1):
            assert (await pipe.call(Frame(Op.CREATE, 0, VID, idx, 1, 1), 10)).status is Status.OK
        old, new, other = b"o" * BLOCK_SIZE, b"n" * BLOCK_SIZE, b"x" * BLOCK_SIZE
        assert (await pipe.call(_write(0, 0, old, 1), 10)).status is Status.OK
        proceed, calls = _hold_version_syncs(monkeypatch)
        cow = asyncio.ensure_future(pipe.call(_write(0, 0, new, 2), 10))   # snapshot 1 taken
        await async_wait_for(lambda: calls, 5, "the COW's first sync")
        assert calls == [False], calls          # held, in a worker thread
        # A PING and a write to another extent are answered while it waits.
        ping = await asyncio.wait_for(asyncio.shield(pipe.call(Frame(Op.PING, 0), 10)), 1.0)
        assert ping.status is Status.OK and not cow.done(), "the loop waited for the COW's sync"
        done = await asyncio.wait_for(pipe.call(_write(1, 0, other, 1), 10), 1.0)
        assert done.status is Status.OK and not cow.done()
        proceed.set()
        assert (await asyncio.wait_for(cow, 10)).status is Status.OK
        assert calls == [False, False]          # the barrier, then the slots' sync
        assert store.read(VID, 0, 0, BLOCK_SIZE)[0] == new
        assert store.read(VID, 0, 0, BLOCK_SIZE, view=1)[0] == old     # the snapshot's block
        assert store.verify(VID, 0) == []


async def test_an_unmap_after_a_snapshot_leaves_the_loop_serving_other_requests(tmp_path: Path,
                                                                              monkeypatch):
    """An UNMAP (a host's discard, fstrim) of blocks a snapshot still reads copies them aside
    first, with the same two syncs per 1 MiB piece: the loop answers others meanwhile."""
    async with _served(tmp_path) as (store, pipe):
        assert (await pipe.call(Frame(Op.CREATE, 0, VID, 0, 1, 1), 10)).status is Status.OK
        old = bytes(range(256)) * (4 * BLOCK_SIZE // 256)
        assert (await pipe.call(_write(0, 0, old, 1), 10)).status is Status.OK
        proceed, calls = _hold_version_syncs(monkeypatch)
        unmap = asyncio.ensure_future(
            pipe.call(Frame(Op.UNMAP, 0, VID, 0, 1, 1, 0, 4 * BLOCK_SIZE, seq=2), 10))
        await async_wait_for(lambda: calls, 5, "the unmap's first sync")
        assert calls == [False], calls
        ping = await asyncio.wait_for(asyncio.shield(pipe.call(Frame(Op.PING, 0), 10)), 1.0)
        assert ping.status is Status.OK and not unmap.done(), "the loop waited for the COW's sync"
        proceed.set()
        assert (await asyncio.wait_for(unmap, 10)).status is Status.OK
        assert store.read(VID, 0, 0, 4 * BLOCK_SIZE)[0] == bytes(4 * BLOCK_SIZE)
        assert store.read(VID, 0, 0, 4 * BLOCK_SIZE, view=1)[0] == old
        assert store.verify(VID, 0) == []


async def test_a_second_write_of_a_block_waits_for_the_first_ones_syncs(tmp_path: Path, monkeypatch):
    """A write of a block whose COW is between its slot write and that slot's sync (a new
    owner's retry after a failover): it must not trust the unsynced slot and write the live
    block at once, or a power loss could keep the new live block without the snapshot's
    copy. It waits for the first write to finish (here: fenced by the new owner's epoch)."""
    from chunk.storage.fencing import StaleEpochError
    store = ReplicaStore([(tmp_path / "disk", None)], extent_size=EXTENT)     # cow_sync on
    try:
        store.create(VID, 0, 1)
        old, first, second = b"o" * BLOCK_SIZE, b"1" * BLOCK_SIZE, b"2" * BLOCK_SIZE
        store.write(VID, 0, 0, old, seq=1)
        store.admit(VID, 0, 1)
        loop_thread, proceed, syncs = threading.get_ident(), threading.Event(), []
        real = os.fdatasync

        def fdatasync(fd: int) -> None:
            if os.readlink(f"/proc/self/fd/{fd}").endswith(".ver"):
                syncs.append(fd)
                if len(syncs) == 2 and threading.get_ident() != loop_thread:
                    proceed.wait(10)                 # the slot's sync, held
            real(fd)
        monkeypatch.setattr(os, "fdatasync", fdatasync)
        w1 = asyncio.ensure_future(store.write(VID, 0, 0, first, seq=2, epoch=1))
        await async_wait_for(lambda: len(syncs) == 2, 5, "the first write's slot sync")
        store.admit(VID, 0, 2)                       # the new owner
        later = store.write(VID, 0, 0, second, seq=2, epoch=2)
        assert later is not None, "the block's unsynced slot was trusted"
        w2 = asyncio.ensure_future(later)
        for _ in range(5):
            await asyncio.sleep(0)
        assert not w2.done() and store.read(VID, 0, 0, BLOCK_SIZE)[0] == old
        proceed.set()
        with pytest.raises(StaleEpochError):
            await asyncio.wait_for(w1, 10)           # fenced after its sync: never lands
        await asyncio.wait_for(w2, 10)
        assert store.read(VID, 0, 0, BLOCK_SIZE)[0] == second
        assert store.read(VID, 0, 0, BLOCK_SIZE, view=1)[0] == old
        assert store.verify(VID, 0) == [] and store.stat(VID, 0)["pending"] == 0
    finally:
        store.close()


async def test_a_cow_whose_version_file_is_trimmed_meanwhile_still_lands(tmp_path: Path, monkeypatch):
    """The reclaimer trims the version key a COW is copying into (its snapshot was deleted:
    nobody reads that key) while the COW waits for its barrier: the write lands, copying again
    into a new key file (the trim cannot tell this COW's unwritten slots from unread ones;
    test_audit17_store_cow_trim_race.py), instead of failing (a failed write drops a healthy
    replica)."""
    store = ReplicaStore([(tmp_path / "disk", None)], extent_size=EXTENT)     # cow_sync on
    try:
        store.create(VID, 0, 1)
        store.write(VID, 0, 0, b"o" * 2 * BLOCK_SIZE, seq=1)
        store.write(VID, 0, BLOCK_SIZE, b"p" * BLOCK_SIZE, seq=2)    # key 1 holds block 1
        store.admit(VID, 0, 1)
        proceed, calls = _hold_version_syncs(monkeypatch)
        w = asyncio.ensure_future(store.write(VID, 0, 0, b"n" * BLOCK_SIZE, seq=2, epoch=1))
        await async_wait_for(lambda: calls, 5, "the COW's barrier")
        store.trim(VID, 0, set())                    # no snapshot left
        proceed.set()
        await asyncio.wait_for(w, 10)
        assert store.read(VID, 0, 0, BLOCK_SIZE)[0] == b"n" * BLOCK_SIZE
        assert store.verify(VID, 0) == [] and store.stat(VID, 0)["pending"] == 0
    finally:
        store.close()


async def test_a_cows_new_version_file_is_linked_durably_off_the_loop(tmp_path: Path, monkeypatch):
    """The first COW of a snapshot into an extent creates its version file: the directory's
    fsync (the file must stay linked across a power loss) also waits off the loop, before the
    barrier; requests are answered meanwhile."""
    async with _served(tmp_path) as (store, pipe):
        assert (await pipe.call(Frame(Op.CREATE, 0, VID, 0, 1, 1), 10)).status is Status.OK
        assert (await pipe.call(_write(0, 0, b"o" * BLOCK_SIZE, 1), 10)).status is Status.OK
        loop_thread, proceed, calls = threading.get_ident(), threading.Event(), []
        real = os.fsync

        def fsync(fd: int) -> None:
            if os.readlink(f"/proc/self/fd/{fd}").endswith(".v"):
                on_loop = threading.get_ident() == loop_thread
                calls.append(on_loop)
                proceed.wait(1.5 if on_loop else 10)
            real(fd)
        monkeypatch.setattr(os, "fsync", fsync)
        cow = asyncio.ensure_future(pipe.call(_write(0, 0, b"n" * BLOCK_SIZE, 2), 10))
        await async_wait_for(lambda: calls, 5, "the version directory's fsync")
        assert calls == [False], calls
        ping = await asyncio.wait_for(asyncio.shield(pipe.call(Frame(Op.PING, 0), 10)), 1.0)
        assert ping.status is Status.OK and not cow.done()
        proceed.set()
        assert (await asyncio.wait_for(cow, 10)).status is Status.OK
        assert store.read(VID, 0, 0, BLOCK_SIZE, view=1)[0] == b"o" * BLOCK_SIZE
