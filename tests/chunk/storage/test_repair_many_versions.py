"""LocalRepair of a block whose versions do not fit one export (real stores, servers, etcd).

A block written between 260 retained snapshots has 260 versions: its EXPORT comes in parts
(``ReplicaStore.export``), each with the live block and a slice of the versions by key.
Before, the repair mended from the first part only: a rotten version that only a later part
carries was never mended (every attempt failed), and a rotten live block took the peer's
live block without the versions in the later parts (a view read the wrong data).
"""

from __future__ import annotations

import logging

import msgpack
import pytest

from chunk.storage.extent_file import BLOCK_SIZE

from .replica_nodes import block
from .test_repair import VID, RacingClient, rot_version

pytestmark = pytest.mark.timeout(120)

HOT, VERSIONS = 3, 260


def _pat(seq: int) -> bytes:
    return seq.to_bytes(4, "big") * (BLOCK_SIZE // 4)


async def many_versions(nodes):
    """Block HOT written at seqs 1..261 on A and B: a version per seq in between (key s)."""
    a, b = await nodes.add("A"), await nodes.add("B")
    await nodes.extent(VID, 0, ["A", "B"], {0: block("zero")})
    for n in (a, b):
        for seq in range(1, VERSIONS + 2):
            n.store.write(VID, 0, HOT * BLOCK_SIZE, _pat(seq), seq)
    return a, b


def first_part_keys(node) -> set[int]:
    """Version keys of HOT in the first part of the node's export (as its server sends it)."""
    blob, nxt = node.store.export(VID, 0, HOT * BLOCK_SIZE, BLOCK_SIZE)
    assert nxt is not None and HOT * BLOCK_SIZE < nxt < (HOT + 1) * BLOCK_SIZE, "shipped in parts"
    return {v[2] for v in msgpack.unpackb(blob)["versions"]}


def assert_views(node, live: int, top: int) -> None:
    assert node.store.verify(VID, 0) == []
    for view in (0, 1, 100, 189, 190, 200, VERSIONS, top):
        want = _pat(view or live)                            # view 0: the live block
        assert node.store.read(VID, 0, HOT * BLOCK_SIZE, BLOCK_SIZE, view)[0] == want, view


async def test_a_rotten_version_only_a_later_export_part_carries_is_mended(nodes):
    a, b = await many_versions(nodes)
    assert 200 not in first_part_keys(a)
    rot_version(b, VID, 0, 200, HOT)
    assert b.store.verify(VID, 0) == [HOT]
    assert await b.repair.repair_block(VID, 0, HOT)
    assert_views(b, VERSIONS + 1, VERSIONS)
    assert b.store.digest(VID, 0) == a.store.digest(VID, 0)


async def test_a_rotten_live_block_takes_the_versions_of_every_part(nodes):
    """A is a write ahead (seq 262, so a version key 261 B lacks, in A's last part) and B's
    live block rots: B takes A's live block and every version it lacks, from every part."""
    a, b = await many_versions(nodes)
    a.store.write(VID, 0, HOT * BLOCK_SIZE, _pat(VERSIONS + 2), VERSIONS + 2)
    assert VERSIONS + 1 not in first_part_keys(a)
    b.corrupt(VID, 0, HOT)
    assert await b.repair.repair_block(VID, 0, HOT)
    assert_views(b, VERSIONS + 2, VERSIONS + 1)
    assert b.store.digest(VID, 0) == a.store.digest(VID, 0)


class EndlessParts:
    """A peer whose EXPORT of the block never ends: always one more part."""

    def __init__(self, inner) -> None:
        self.inner, self.exports = inner, 0

    async def export(self, addr, vid, idx, off, length, epoch=0):
        blob, _ = await self.inner.export(addr, vid, idx, off, length, epoch)
        self.exports += 1
        return blob, off + 1

    def __getattr__(self, name):
        return getattr(self.inner, name)


async def test_a_peer_that_never_ends_its_parts_fails_the_repair(nodes, caplog):
    a, b = await many_versions(nodes)
    rot_version(b, VID, 0, 200, HOT)
    endless = EndlessParts(b.client)
    b.repair.client = endless
    with caplog.at_level(logging.WARNING, logger="chunk.storage.repair"):
        assert not await b.repair.repair_block(VID, 0, HOT)
    assert endless.exports <= b.repair.retries * b.repair.max_parts
    assert "parts" in caplog.text
    assert b.store.verify(VID, 0) == [HOT], "nothing mended from a peer that does not finish"


async def test_parts_of_a_block_the_peer_changed_meanwhile_are_fetched_again(nodes):
    """B's live block rots; A takes a write (seq 262, a new version key 261) after sending its
    first part: the parts are not one state (live seq 261 in the first, 262 in the last), so
    the repair fetches them again rather than install A's old live block with its new version."""
    a, b = await many_versions(nodes)
    b.corrupt(VID, 0, HOT)
    # a write reaches the peer between the first two parts
    racing = RacingClient(
        b.client, lambda: a.store.write(VID, 0, HOT * BLOCK_SIZE, _pat(VERSIONS + 2), VERSIONS + 2))
    b.repair.client = racing
    assert await b.repair.repair_block(VID, 0, HOT)
    assert racing.exports == 4, "two parts, then both again"
    assert_views(b, VERSIONS + 2, VERSIONS + 1)
    assert b.store.digest(VID, 0) == a.store.digest(VID, 0)
