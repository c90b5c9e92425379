"""A mended block is synced before the repair counts (audit 17b, item 2).

``mend`` installs the peer's copy in the page cache only; nothing synced it, and a power loss
soon after could bring the rotten bytes back from the disk. The extent's fdatasyncs are held
or failed behind the worker-sync seam (``worker_syncs.hold_syncs``): real files, real peers.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from chunk.storage.extent_file import BLOCK_SIZE
from chunk.storage.replica_store import StoreIOError

from .replica_nodes import block
from .test_repair import VID, two
from .worker_syncs import hold_syncs, replica_fds

pytestmark = pytest.mark.timeout(60)


async def _repair_held(b, monkeypatch, fail: bool):
    """B's repair of block 3, the extent's first sync off the loop held (then failed if
    ``fail``); asserts it does not count before that sync ends. The threads that synced."""
    b.store.flush(VID, 0)                       # what was written before is on disk already
    b.corrupt(VID, 0, 3)
    reached, proceed, threads = hold_syncs(monkeypatch, replica_fds(b.store, VID, 0), fail=fail)
    b.repair.start()
    assert b.repair.schedule(VID, 0, 3)
    try:
        assert await asyncio.to_thread(reached.wait, 5), "the mend was never synced"
        assert b.repair.status()["repaired"] == 0, "counted before its sync completed"
    finally:
        proceed.set()
    assert await b.repair.wait_idle(10)
    return threads


async def test_a_mend_is_synced_off_the_loop_before_it_counts(nodes, monkeypatch):
    a, b = await two(nodes)
    threads = await _repair_held(b, monkeypatch, fail=False)
    assert b.repair.status()["repaired"] == 1
    assert any(t != threading.get_ident() for t in threads), "synced in a worker thread"
    assert b.store.read(VID, 0, 3 * BLOCK_SIZE, BLOCK_SIZE)[0] == block("three")
    assert b.store.digest(VID, 0) == a.store.digest(VID, 0)


async def test_a_mend_whose_sync_fails_is_no_repair(nodes, monkeypatch):
    a, b = await two(nodes)
    await _repair_held(b, monkeypatch, fail=True)
    assert b.repair.status()["repaired"] == 0 and b.repair.status()["repair_failed"] == 1
    with pytest.raises(StoreIOError):           # retired: a coordinator resyncs it in full
        b.store.read(VID, 0, 3 * BLOCK_SIZE, BLOCK_SIZE)
