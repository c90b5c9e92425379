"""LocalRepair against real stores, replica servers and etcd."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from chunk.storage.extent_file import BLOCK_SIZE
from chunk.storage.repair import LocalRepair
from chunk.storage.replica_client import ChecksumFailed
from chunk.storage.replica_server import ReplicaServer
from chunk.storage.peers import Peers
from zstore.keys import Keys

from .replica_nodes import EXTENT, block

pytestmark = pytest.mark.timeout(60)

VID = "vol-1"


async def two(nodes, data=None):
    a, b = await nodes.add("A"), await nodes.add("B")
    await nodes.extent(VID, 0, ["A", "B"], data or {2: block("two"), 3: block("three"), 4: block(4)})
    return a, b


async def test_corrupt_block_is_repaired_from_the_peer(nodes):
    a, b = await two(nodes)
    b.corrupt(VID, 0, 3)
    assert b.store.verify(VID, 0) == [3]
    assert a.store.digest(VID, 0) == b.store.digest(VID, 0)   # crcs agree, only the data rotted

    b.repair.start()
    assert b.repair.schedule(VID, 0, 3)
    assert not b.repair.schedule(VID, 0, 3), "a queued block is not queued twice"
    assert await b.repair.wait_idle(10)

    assert b.store.verify(VID, 0) == []
    data, present = b.store.read(VID, 0, 3 * BLOCK_SIZE, BLOCK_SIZE)
    assert data == block("three") and present == b"\x01"
    assert b.store.digest(VID, 0) == a.store.digest(VID, 0)
    assert b.repair.status() == {"checksum_errors": 1, "repaired": 1, "repair_failed": 0,
                                 "dropped": 0, "queued": 0}


async def test_a_peer_read_of_a_rotten_block_triggers_the_repair(nodes):
    """The replica server's checksum hook schedules the repair (the chunk server's wiring)."""
    a, b = await two(nodes)
    b.corrupt(VID, 0, 2)
    b.repair.start()
    with pytest.raises(ChecksumFailed):
        await a.client.read(("127.0.0.1", b.server.port), VID, 0, 2 * BLOCK_SIZE, BLOCK_SIZE)
    assert await b.repair.wait_idle(10)
    assert b.repair.repaired == 1
    data, _ = await a.client.read(("127.0.0.1", b.server.port), VID, 0, 2 * BLOCK_SIZE, BLOCK_SIZE)
    assert data == block("two")


async def test_dead_peer_is_skipped(nodes):
    await nodes.add("A")
    b = await nodes.add("B")
    await nodes.add_dead("C")
    await nodes.extent(VID, 0, ["C", "A", "B"], {5: block("five")})
    b.corrupt(VID, 0, 5)
    assert await b.repair.repair_block(VID, 0, 5)
    assert b.store.verify(VID, 0) == []
    assert b.store.read(VID, 0, 5 * BLOCK_SIZE, BLOCK_SIZE)[0] == block("five")


async def test_no_in_sync_peer_means_failure_and_nothing_changes(nodes):
    a, b = await two(nodes)
    # A was dropped from the extent: its copy may be old, so it must not be used.
    await nodes.extent(VID, 1, ["B"], {0: block("x")})
    a.store.create(VID, 1, 1)
    a.store.write(VID, 1, 0, block("old"), 1)
    b.corrupt(VID, 1, 0)
    b.repair.start()
    b.repair.schedule(VID, 1, 0)
    assert await b.repair.wait_idle(10)
    assert b.repair.repair_failed == 1 and b.repair.repaired == 0
    assert b.store.verify(VID, 1) == [0]


async def test_block_rewritten_before_the_repair_is_left_alone(nodes):
    a, b = await two(nodes)
    b.corrupt(VID, 0, 4)
    # The coordinator's write reaches B first (A's copy is still the old one).
    b.store.write(VID, 0, 4 * BLOCK_SIZE, block("new"), 1)
    assert await b.repair.repair_block(VID, 0, 4)
    assert b.store.read(VID, 0, 4 * BLOCK_SIZE, BLOCK_SIZE)[0] == block("new")


class RacingClient:
    """The real client, but a coordinator write lands on the repairing replica mid-export."""

    def __init__(self, inner, on_export) -> None:
        self.inner, self.on_export, self.exports = inner, on_export, 0

    async def export(self, *args, **kw):
        got = await self.inner.export(*args, **kw)
        self.exports += 1
        if self.exports == 1:
            self.on_export()
        return got

    def __getattr__(self, name):
        return getattr(self.inner, name)


async def test_repair_racing_a_write_does_not_clobber_it(nodes, etcd_client, etcd_config):
    a, b = await two(nodes)
    b.corrupt(VID, 0, 3)

    # A partial write (one sector) cannot land on a rotten block: it is RMW and
    # would fail. A whole-block write does, and then the peer's export (taken
    # before the write reached A) is old: importing it would lose the write.
    def write_lands():
        b.store.write(VID, 0, 3 * BLOCK_SIZE, block("newer"), 1)

    keys = Keys(etcd_config.prefix)
    racing = RacingClient(b.client, write_lands)
    repair = LocalRepair(b.store, racing, Peers(etcd_client, keys), keys, etcd_client, "B")
    before = b.store.stat(VID, 0)["mutations"]
    assert await repair.repair_block(VID, 0, 3)
    assert racing.exports == 1, "the conflict is seen, and the rewritten block needs no second copy"
    assert b.store.stat(VID, 0)["mutations"] == before + 1, "only the write changed the extent"
    assert b.store.read(VID, 0, 3 * BLOCK_SIZE, BLOCK_SIZE)[0] == block("newer")
    assert b.store.verify(VID, 0) == []


async def test_conflict_on_another_block_retries_and_repairs(nodes, etcd_client, etcd_config):
    """A write elsewhere in the extent also conflicts; the retry then installs the copy."""
    a, b = await two(nodes)
    b.corrupt(VID, 0, 3)

    def write_elsewhere():
        for n in (a, b):
            n.store.write(VID, 0, 7 * BLOCK_SIZE, block("seven"), 1)

    keys = Keys(etcd_config.prefix)
    racing = RacingClient(b.client, write_elsewhere)
    repair = LocalRepair(b.store, racing, Peers(etcd_client, keys), keys, etcd_client, "B",
                         retry_delay=0.01)
    assert await repair.repair_block(VID, 0, 3)
    assert racing.exports == 2
    assert b.store.read(VID, 0, 3 * BLOCK_SIZE, BLOCK_SIZE)[0] == block("three")
    assert b.store.read(VID, 0, 7 * BLOCK_SIZE, BLOCK_SIZE)[0] == block("seven")
    assert b.store.digest(VID, 0) == a.store.digest(VID, 0)


async def test_queue_is_bounded(nodes, etcd_client, etcd_config):
    a, b = await two(nodes)
    keys = Keys(etcd_config.prefix)
    repair = LocalRepair(b.store, b.client, Peers(etcd_client, keys), keys, etcd_client, "B",
                         max_queue=2)
    assert repair.schedule(VID, 0, 1) and repair.schedule(VID, 0, 2)
    assert not repair.schedule(VID, 0, 3)
    assert repair.status()["dropped"] == 1 and repair.status()["queued"] == 2
    assert repair.checksum_errors == 2


async def test_peer_that_moved_port_is_found_again(nodes):
    """A restarted peer re-registers on a new port; the cached address is dropped on failure."""
    a, b = await two(nodes)
    b.corrupt(VID, 0, 2)
    b.corrupt(VID, 0, 3)
    assert await b.repair.repair_block(VID, 0, 2)          # caches A's address
    await a.server.stop()
    a.server = ReplicaServer(a.store, a.server.secret, a.server.cluster_id, "127.0.0.1", 0)
    await a.server.start()
    await nodes.register("A", a.server.port)
    assert await b.repair.repair_block(VID, 0, 3)
    assert b.store.verify(VID, 0) == []


def rot_version(node, vid: str, idx: int, key: int, blk: int) -> None:
    """Flip one byte of a snapshot version's data in ``K.ver`` (slots, then block data)."""
    path = Path(node.store.stat(vid, idx)["disk"]) / f"{vid}.{idx}.v" / f"{key}.ver"
    data_at = -(-(EXTENT // BLOCK_SIZE) * 8 // BLOCK_SIZE) * BLOCK_SIZE
    fd = os.open(path, os.O_RDWR)
    try:
        off = data_at + blk * BLOCK_SIZE + 100
        os.pwrite(fd, bytes([os.pread(fd, 1, off)[0] ^ 0xFF]), off)
    finally:
        os.close(fd)


async def snapshotted(nodes):
    """Block 3 written at seq 1 then 2 on both replicas: a version (key 1, origin 1)."""
    a, b = await two(nodes, {3: block("1111")})
    for n in (a, b):
        n.store.write(VID, 0, 3 * BLOCK_SIZE, block("2222"), 2)
    return a, b


def assert_views(node, live: bytes) -> None:
    assert node.store.verify(VID, 0) == []
    assert node.store.read(VID, 0, 3 * BLOCK_SIZE, BLOCK_SIZE)[0] == live
    assert node.store.read(VID, 0, 3 * BLOCK_SIZE, BLOCK_SIZE, view=1)[0] == block("1111")
    assert node.store.read(VID, 0, 3 * BLOCK_SIZE, BLOCK_SIZE, view=2)[0] == block("2222")


async def test_rot_in_a_version_does_not_undo_a_write_the_peer_lacks(nodes):
    """The audit's data loss: B's live block holds a write at seq 3 that A has not received
    yet, and only B's old version rotted. The repair mends that version and keeps the write."""
    a, b = await snapshotted(nodes)
    rot_version(b, VID, 0, 1, 3)
    b.store.write(VID, 0, 3 * BLOCK_SIZE, block("3333"), 3)      # reaches B first
    assert b.store.verify(VID, 0) == [3]
    assert await b.repair.repair_block(VID, 0, 3)
    assert_views(b, block("3333"))
    a.store.write(VID, 0, 3 * BLOCK_SIZE, block("3333"), 3)      # then A: the replicas agree
    assert a.store.digest(VID, 0) == b.store.digest(VID, 0)


async def test_a_rotten_live_block_with_versions_is_repaired_from_the_peer(nodes):
    """The live block is what failed (and A is a write ahead): B takes A's live block and the
    version that write made, so every view of B reads as A's."""
    a, b = await snapshotted(nodes)
    a.store.write(VID, 0, 3 * BLOCK_SIZE, block("3333"), 3)
    b.corrupt(VID, 0, 3)
    assert await b.repair.repair_block(VID, 0, 3)
    assert_views(b, block("3333"))
    assert a.store.digest(VID, 0) == b.store.digest(VID, 0)
