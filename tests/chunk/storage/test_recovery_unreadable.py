"""A rebuild whose sources hold rotten blocks: Coordinator.run_recovery over real ReplicaStores
(64 MiB extents, sparse), the executor's own one called inline and the others through real
ReplicaServers on loopback; only the engine's etcd/meta side is a stand-in (the join).

Before, one block failing its checksum on the copy's first source failed every attempt, and
the other blocks of the extent stayed at one copy for good."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from chunk.blockdev import MediumError
from chunk.storage import replicas as rk
from chunk.storage.coordinator import Coordinator
from chunk.storage.extent_file import BLOCK_SIZE, EXTENT_SIZE, ChecksumError
from chunk.storage.replica_client import ChecksumFailed, ReplicaClient
from chunk.storage.replica_server import ReplicaServer
from chunk.storage.replica_store import ReplicaStore
from zstore.keys import Keys
from zstore.records import ExtentRecord, RecoveryTask, Volume

pytestmark = pytest.mark.timeout(120)

SECRET = b"k" * 32
CLUSTER = "cluster-1"
VID = "vol-1"
BLOCKS = {b: bytes([b % 251 + 1]) * BLOCK_SIZE for b in (0, 1, 7, 300, 301, 9000, 16383)}
ROTTEN = 300


class _Meta:
    """The meta leader's join: the target becomes an in-sync replica."""

    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord

    async def call(self, method, path, body):
        rec = self.coord.extents[int(path.split("/")[3])]
        assert path.endswith("/join") and body["generation"] == rec.generation
        new = ExtentRecord(rec.volume_id, rec.index, [*rec.replicas, body["chunk_id"]],
                           rec.generation + 1, {})
        return {"extent": new.to_dict()}


class _NoRecords:
    async def get(self, key):
        return None


class _Engine:
    """The chunk server "A" around its coordinator: its own store inline, peers remote."""

    replicas_version, min_write_replicas, lease = 1, 1, None
    etcd, keys = _NoRecords(), Keys("/test")

    def __init__(self, chunk_id: str, stores: dict, ports: dict) -> None:
        self.chunk_id = chunk_id
        self.client = ReplicaClient(SECRET, CLUSTER, chunk_id, timeout=5.0)
        self.reps = {cid: rk.LocalReplica(cid, st) if cid == chunk_id
                     else rk.RemoteReplica(cid, ("127.0.0.1", ports[cid]), self.client)
                     for cid, st in stores.items()}

    async def replica(self, chunk_id):
        return self.reps[chunk_id]

    def cached_replica(self, chunk_id):
        return self.reps[chunk_id]

    def local_store_for(self, rec):
        return self.reps[self.chunk_id].store if self.chunk_id in rec.replicas else None

    def forget_peer(self, chunk_id):
        pass

    async def report_progress(self, task, rev, done, total):
        return rev


@pytest.fixture
async def cluster(tmp_path: Path):
    stores, servers = {}, {}
    for cid in "ABC":
        stores[cid] = ReplicaStore([(tmp_path / cid, None)], cow_sync=False)
        servers[cid] = ReplicaServer(stores[cid], SECRET, CLUSTER, "127.0.0.1", 0)
        await servers[cid].start()
    engine = _Engine("A", stores, {cid: s.port for cid, s in servers.items()})
    try:
        yield stores, engine
    finally:
        await engine.client.close()
        for cid in "ABC":
            await servers[cid].stop()
            stores[cid].close()


def _coordinator(engine: _Engine, replicas: list[str]) -> Coordinator:
    c = Coordinator(engine, Volume(volume_id=VID, name=VID, size=EXTENT_SIZE, replicas=3))
    c._is_ready, c.epoch = True, 7                      # noqa: SLF001 - no etcd: owner already
    c.extents[0] = ExtentRecord(VID, 0, list(replicas), 3, {})
    engine.meta = _Meta(c)
    return c


def _populate(stores: dict, on: str) -> None:
    for cid in on:
        stores[cid].create(VID, 0, 3)
        for b, data in BLOCKS.items():
            stores[cid].write(VID, 0, b * BLOCK_SIZE, data, seq=1)


def _rot(store: ReplicaStore, block: int) -> None:
    """Flip a byte of ``block`` in the .data file behind the store's back (bit rot)."""
    path = Path(store.stat(VID, 0)["disk"]) / f"{VID}.0.data"
    fd = os.open(path, os.O_RDWR)
    try:
        off = block * BLOCK_SIZE + 100
        os.pwrite(fd, bytes([os.pread(fd, 1, off)[0] ^ 0xFF]), off)
    finally:
        os.close(fd)


async def test_a_block_no_source_reads_is_copied_unreadable_and_the_rest_completes(cluster):
    """The only in-sync replica (the dead peer's survivor) has one rotten block: the rebuild
    completes and C joins; every other block equals A's, and the rotten one fails its
    checksum on C too (MEDIUM ERROR through the coordinator), never zeros or wrong data."""
    stores, engine = cluster
    _populate(stores, "A")
    _rot(stores["A"], ROTTEN)
    coord = _coordinator(engine, ["A"])
    await coord.run_recovery(RecoveryTask(VID, 0, "C", "rebuild", "A", 3), 1, 0)

    assert coord.extents[0].replicas == ["A", "C"]
    c = stores["C"]
    assert c.digest(VID, 0) == stores["A"].digest(VID, 0)
    assert c.verify(VID, 0) == [ROTTEN]                 # the scrubber and repair see it as bad
    for b, data in BLOCKS.items():
        if b != ROTTEN:
            assert c.read(VID, 0, b * BLOCK_SIZE, BLOCK_SIZE)[0] == data
    with pytest.raises(ChecksumError):
        c.read(VID, 0, ROTTEN * BLOCK_SIZE, BLOCK_SIZE)
    with pytest.raises(ChecksumFailed):                 # what a peer read of it answers
        await engine.client.read(engine.reps["C"].addr, VID, 0, ROTTEN * BLOCK_SIZE, BLOCK_SIZE)
    with pytest.raises(MediumError):                    # no replica serves it: MEDIUM ERROR
        await coord.read(ROTTEN * BLOCK_SIZE, BLOCK_SIZE)
    assert await coord.read(301 * BLOCK_SIZE, BLOCK_SIZE) == BLOCKS[301]
    assert coord.counters["unreadable_copied"] == 1


async def test_a_block_rotten_on_the_first_source_comes_from_the_second(cluster):
    """A (the executor's own replica, read first) has a rotten block, B has it intact: the
    rebuild takes that block from B and C is complete: every block reads and verifies."""
    stores, engine = cluster
    _populate(stores, "AB")
    _rot(stores["A"], ROTTEN)
    coord = _coordinator(engine, ["A", "B"])
    await coord.run_recovery(RecoveryTask(VID, 0, "C", "rebuild", "A", 3), 1, 0)

    assert coord.extents[0].replicas == ["A", "B", "C"]
    c = stores["C"]
    assert c.verify(VID, 0) == []
    assert c.digest(VID, 0) == stores["B"].digest(VID, 0)
    for b, data in BLOCKS.items():
        assert c.read(VID, 0, b * BLOCK_SIZE, BLOCK_SIZE)[0] == data
    assert coord.counters["unreadable_copied"] == 0
    assert coord.counters["copy_source_retries"] == 1
