"""A local repair verifies in a worker thread, never on the event loop (audit 17b, item 1).

Repair runs when a disk rots, often a failing disk whose reads take seconds; ``_still_bad``
and ``mend`` read it on the loop, and every volume of the server stalled meanwhile. The
failing disk is a real file whose worker-thread read is held behind ``os.preadv`` (the
scrubber tests' ``BlockedRead``); a read on the loop is never held (it would hang the test)
and so shows up as the hold never being reached.

The token invariant (repair.py's docstring) is checked with the read done and its result
held: a write landing then must make the verdict count for nothing, or the repair would
install the peer's older copy over it.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from chunk.storage.extent_file import BLOCK_SIZE

from .replica_nodes import block
from .test_repair import VID, two
from .test_scrubber import BlockedRead

pytestmark = pytest.mark.timeout(60)


class ReadThenHold(BlockedRead):
    """``BlockedRead``, but the worker's read is done first and held before its result is
    checked: a write landing meanwhile is one the verify did not see."""

    def preadv(self, fd, buffers, offset):
        if (threading.current_thread() is threading.main_thread() or self.started.is_set()
                or os.fstat(fd).st_ino != self.ino):
            return self.real(fd, buffers, offset)
        got = self.real(fd, buffers, offset)
        self.started.set()
        assert self.go.wait(10)
        return got


async def test_the_server_answers_while_a_repairs_verify_is_held(nodes, monkeypatch):
    a, b = await two(nodes)
    await nodes.extent(VID, 1, ["A", "B"], {})
    b.corrupt(VID, 0, 3)
    held = BlockedRead(monkeypatch, b.data_path(VID, 0))
    repair = asyncio.create_task(b.repair.repair_block(VID, 0, 3))
    addr = ("127.0.0.1", b.server.port)
    try:
        assert await asyncio.to_thread(held.started.wait, 5), "the repair read on the event loop"
        await asyncio.wait_for(a.client.write(addr, VID, 1, 0, block("other"), epoch=1, seq=1), 5)
        await asyncio.wait_for(a.client.ping(addr), 5)
        assert not repair.done(), "answered while the repair's read was still held"
    finally:
        held.go.set()
    assert await asyncio.wait_for(repair, 10)
    assert b.store.read(VID, 1, 0, BLOCK_SIZE)[0] == block("other")
    assert b.store.read(VID, 0, 3 * BLOCK_SIZE, BLOCK_SIZE)[0] == block("three")
    assert b.store.verify(VID, 0) == [] and b.store.digest(VID, 0) == a.store.digest(VID, 0)


async def test_a_write_landing_during_the_verify_is_not_mended_over(nodes, monkeypatch):
    """The rotten block read, then the coordinator's whole-block write reaches this replica
    (not the peer yet) before the verdict is used: taken as the token, it would let the mend
    install the peer's old copy over the acknowledged write."""
    a, b = await two(nodes)
    b.corrupt(VID, 0, 3)
    held = ReadThenHold(monkeypatch, b.data_path(VID, 0))
    repair = asyncio.create_task(b.repair.repair_block(VID, 0, 3))
    try:
        assert await asyncio.to_thread(held.started.wait, 5), "the repair read on the event loop"
        b.store.write(VID, 0, 3 * BLOCK_SIZE, block("newer"), 1)
    finally:
        held.go.set()
    assert await asyncio.wait_for(repair, 10)
    assert b.store.read(VID, 0, 3 * BLOCK_SIZE, BLOCK_SIZE)[0] == block("newer")
    assert b.store.verify(VID, 0) == []
    assert a.store.read(VID, 0, 3 * BLOCK_SIZE, BLOCK_SIZE)[0] == block("three"), "peer untouched"


async def test_a_mend_given_a_verdict_a_write_outdated_changes_nothing(nodes):
    a, b = await two(nodes)
    b.corrupt(VID, 0, 3)
    verdict = await b.store.verify_verdict_async(VID, 0, 3, 1)
    assert verdict is not None and verdict.bad == [3]
    blob = a.store.export(VID, 0, 3 * BLOCK_SIZE, BLOCK_SIZE)[0]
    b.store.write(VID, 0, 7 * BLOCK_SIZE, block("seven"), 1)      # elsewhere in the extent
    assert not b.store.mend(VID, 0, blob, verified=verdict)
    assert b.store.verify(VID, 0) == [3]
    fresh = await b.store.verify_verdict_async(VID, 0, 3, 1)
    assert fresh is not None and b.store.mend(VID, 0, blob, verified=fresh)
    assert b.store.verify(VID, 0) == []


class SlowWorkerReads(BlockedRead):
    """Every worker-thread read of the data file takes ``delay`` (a failing disk); reads on
    the loop are not slowed (the loop has nothing else to wait for in these tests)."""

    delay = 0.1

    def preadv(self, fd, buffers, offset):
        if threading.current_thread() is not threading.main_thread() \
                and os.fstat(fd).st_ino == self.ino:
            self.started.set()
            time.sleep(self.delay)
        return self.real(fd, buffers, offset)


async def test_a_busy_extent_is_still_repaired(nodes, monkeypatch):
    """The token covers the whole extent: a write to another of its blocks during every
    worker read made every verdict void, and the repair gave up with the block still rotten
    (it read on the loop before, where nothing lands meanwhile). A void verdict is now taken
    again on the loop."""
    a, b = await two(nodes)
    b.corrupt(VID, 0, 3)
    SlowWorkerReads(monkeypatch, b.data_path(VID, 0))
    stop = asyncio.Event()

    async def busy() -> None:                      # a write elsewhere in the extent, often
        for k in range(200):
            if stop.is_set():
                return
            b.store.write(VID, 0, 7 * BLOCK_SIZE, block(f"w{k}"), 1)
            await asyncio.sleep(0.02)

    writer = asyncio.create_task(busy())
    try:
        assert await asyncio.wait_for(b.repair.repair_block(VID, 0, 3), 20)
    finally:
        stop.set()
        await writer
    assert b.store.read(VID, 0, 3 * BLOCK_SIZE, BLOCK_SIZE)[0] == block("three")
    assert 3 not in b.store.verify(VID, 0)
