"""Audit 16: local repair must not install a peer's copy of a block older than the one that
rotted here (LocalRepair against real stores, replica servers and etcd)."""

from __future__ import annotations

import pytest

from chunk.storage.extent_file import BLOCK_SIZE
from chunk.storage.extent_file import ChecksumError

from .replica_nodes import block

pytestmark = pytest.mark.timeout(60)

VID = "vol-1"


async def test_audit16_rotten_block_is_not_mended_with_the_peers_older_write(nodes):
    """B took a write at seq 2 that is still on its way to A (both in sync in the record), and
    that new block rotted on B. The repair installed A's seq-1 block: B then read the old data
    as valid, silently undoing a write it had acknowledged. The peer's copy must be at least
    as new as the block it replaces; once A has the write, the repair takes it."""
    a, b = await nodes.add("A"), await nodes.add("B")
    await nodes.extent(VID, 0, ["A", "B"], {3: block("old!")})
    b.store.write(VID, 0, 3 * BLOCK_SIZE, block("NEW!"), 2)       # reaches B first
    b.corrupt(VID, 0, 3)
    assert b.store.verify(VID, 0) == [3]
    assert not await b.repair.repair_block(VID, 0, 3)
    assert b.store.verify(VID, 0) == [3]                          # still a checksum error...
    with pytest.raises(ChecksumError):
        b.store.read(VID, 0, 3 * BLOCK_SIZE, BLOCK_SIZE)           # ...never the old data
    a.store.write(VID, 0, 3 * BLOCK_SIZE, block("NEW!"), 2)       # then A: now it can mend
    assert await b.repair.repair_block(VID, 0, 3)
    assert b.store.read(VID, 0, 3 * BLOCK_SIZE, BLOCK_SIZE)[0] == block("NEW!")
    assert a.store.digest(VID, 0) == b.store.digest(VID, 0)
