"""A few real chunk-server storage stacks in one test process (repair and scrubber tests).

Each node: a ReplicaStore in its own temp directory, a ReplicaServer on
127.0.0.1, a ReplicaClient and a LocalRepair wired to the server's checksum
hook, exactly as a chunk server wires them; ChunkInfo records in the test's
etcd prefix so peers are found by chunk id.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from chunk.storage.extent_file import BLOCK_SIZE
from chunk.storage.peer_auth import load_or_create_secret
from chunk.storage.peers import Peers
from chunk.storage.repair import LocalRepair
from chunk.storage.replica_client import ReplicaClient
from chunk.storage.replica_server import ReplicaServer
from chunk.storage.replica_store import ReplicaStore
from tests.cluster import free_port
from zstore.keys import Keys
from zstore.records import ChunkInfo, ExtentRecord

EXTENT = 2 << 20          # small extents keep full-extent scrubs fast
CLUSTER = "test-cluster"


@dataclass
class Node:
    chunk_id: str
    store: ReplicaStore
    server: ReplicaServer
    client: ReplicaClient
    repair: LocalRepair

    def data_path(self, vid: str, idx: int) -> Path:
        return Path(self.store.stat(vid, idx)["disk"]) / f"{vid}.{idx}.data"

    def corrupt(self, vid: str, idx: int, block: int) -> None:
        """Flip one byte of a block in the data file, behind the store's back (bit rot)."""
        fd = os.open(self.data_path(vid, idx), os.O_RDWR)
        try:
            off = block * BLOCK_SIZE + 100
            b = os.pread(fd, 1, off)
            os.pwrite(fd, bytes([b[0] ^ 0xFF]), off)
        finally:
            os.close(fd)


class Nodes:
    def __init__(self, tmp: Path, etcd, keys: Keys) -> None:
        self.tmp, self.etcd, self.keys = tmp, etcd, keys
        self.nodes: dict[str, Node] = {}

    async def add(self, chunk_id: str, cow_sync: bool = False) -> Node:
        """A node; ``cow_sync``: its copy-on-writes wait for their syncs (off the loop)."""
        secret = await load_or_create_secret(self.etcd, self.keys)
        store = ReplicaStore([(self.tmp / chunk_id, None)], extent_size=EXTENT, cow_sync=cow_sync)
        client = ReplicaClient(secret, CLUSTER, chunk_id, timeout=3.0)
        repair = LocalRepair(store, client, Peers(self.etcd, self.keys), self.keys, self.etcd,
                             chunk_id, retry_delay=0.01)
        server = ReplicaServer(store, secret, CLUSTER, "127.0.0.1", 0,
                               on_checksum_error=repair.schedule)
        await server.start()
        await self.register(chunk_id, server.port)
        node = Node(chunk_id, store, server, client, repair)
        self.nodes[chunk_id] = node
        return node

    async def register(self, chunk_id: str, port: int) -> None:
        info = ChunkInfo(chunk_id=chunk_id, hostname="localhost", address="127.0.0.1",
                         data_port=port, portal="127.0.0.1:3260")
        await self.etcd.put(self.keys.chunk_info(chunk_id), info.encode())

    async def add_dead(self, chunk_id: str) -> None:
        """A registered peer nobody listens for (crashed chunk server)."""
        await self.register(chunk_id, free_port())

    async def extent(self, vid: str, idx: int, replicas: list[str], data: dict[int, bytes],
                     seq: int = 1, generation: int = 1) -> None:
        """Record the extent in etcd and write the same blocks on every live replica."""
        rec = ExtentRecord(volume_id=vid, index=idx, replicas=replicas, generation=generation)
        await self.etcd.put(self.keys.extent(vid, idx), rec.encode())
        for cid in replicas:
            node = self.nodes.get(cid)
            if node is None:
                continue
            node.store.create(vid, idx, generation)
            for block, payload in data.items():
                node.store.write(vid, idx, block * BLOCK_SIZE, payload, seq)

    async def close(self) -> None:
        for node in self.nodes.values():
            await node.repair.stop()
            await node.server.stop()
            await node.client.close()
            node.store.close()


def block(fill: int | str) -> bytes:
    """One recognisable 4 KiB block."""
    if isinstance(fill, str):
        return (fill.encode() * BLOCK_SIZE)[:BLOCK_SIZE]
    return bytes([fill]) * BLOCK_SIZE


class PeriodicWrites:
    """A coordinator stand-in: write ``k`` (``step(k)`` gives its offset, seq and data) sent to
    every replica server of ``addrs`` at once (extent 0 of ``vid``, epoch 1), the next
    ``period`` seconds after all of them answered; from ``start`` until ``stop``."""

    def __init__(self, client: ReplicaClient, addrs, vid: str, period: float,
                 step: Callable[[int], tuple[int, int, bytes]]) -> None:
        self.client, self.addrs, self.vid, self.period, self.step = client, addrs, vid, period, step
        self.n = 0
        self.task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            off, seq, data = self.step(self.n)
            await asyncio.gather(*(self.client.write(a, self.vid, 0, off, data, epoch=1, seq=seq)
                                   for a in self.addrs))
            self.n += 1
            await asyncio.sleep(self.period)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.client.close()
