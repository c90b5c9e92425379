"""A deferred COW whose version file the reclaimer trims meanwhile still keeps its copy.

A write that must copy-on-write waits for the version file's barrier sync off the event loop
(``ReplicaStore._write_later``). Its slot is not written yet, so the reclaimer's trim, which
runs on the loop meanwhile, does not see the block it copies: a key file whose other entries no
snapshot reads any more is unlinked whole. The COW then took "trimmed" to mean "nobody reads
this key" and overwrote the live block without its copy, but the key may still be needed for
the block in flight: here snapshot 1 reads block 0 through key 2, while key 2's only other entry
(block 1, origin 2) belonged to snapshot 2, deleted. Snapshot 1 then read block 0 as absent
(zeros): its data was gone for good, silently.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from chunk.storage.extent_file import BLOCK_SIZE
from chunk.storage.replica_store import ReplicaStore
from tests.chunk.storage.raw_peer import EXTENT
from tests.chunk.storage.test_cow_off_the_loop import _hold_version_syncs
from tests.cluster import async_wait_for

pytestmark = pytest.mark.timeout(60)

VID = "vol-trim-race"


async def test_a_cow_whose_key_file_is_trimmed_meanwhile_keeps_the_snapshots_block(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    store = ReplicaStore([(tmp_path / "disk", None)], extent_size=EXTENT)     # cow_sync on
    try:
        store.create(VID, 0, 1)
        old = b"o" * BLOCK_SIZE
        store.write(VID, 0, 0, old + b"a" * BLOCK_SIZE, seq=1)   # snapshot 1 is taken after
        store.write(VID, 0, BLOCK_SIZE, b"b" * BLOCK_SIZE, seq=2)  # snapshot 2 after, deleted
        store.write(VID, 0, BLOCK_SIZE, b"c" * BLOCK_SIZE, seq=3)  # key 2: block 1 (origin 2)
        store.admit(VID, 0, 1)
        proceed, calls = _hold_version_syncs(monkeypatch)
        w = asyncio.ensure_future(store.write(VID, 0, 0, b"n" * BLOCK_SIZE, seq=3, epoch=1))
        await async_wait_for(lambda: calls, 5, "the COW's barrier")
        assert store.trim(VID, 0, {1}) == 1          # snapshot 2 gone: block 1's version goes
        proceed.set()
        await asyncio.wait_for(w, 10)
        assert store.read(VID, 0, 0, BLOCK_SIZE)[0] == b"n" * BLOCK_SIZE
        assert store.read(VID, 0, 0, 2 * BLOCK_SIZE, view=1)[0] == old + b"a" * BLOCK_SIZE, \
            "snapshot 1 lost block 0"
        assert store.verify(VID, 0) == [] and store.stat(VID, 0)["pending"] == 0
    finally:
        store.close()
    # And after a restart (the copy is on disk, not only in memory).
    store = ReplicaStore([(tmp_path / "disk", None)], extent_size=EXTENT)
    try:
        assert store.read(VID, 0, 0, BLOCK_SIZE, view=1)[0] == old
    finally:
        store.close()
