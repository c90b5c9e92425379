"""ReplicaServer.stop ends in bounded time with peers still connected.

It closed the listener and awaited ``wait_closed`` before dropping its connections; since
Python 3.12.1 ``wait_closed`` waits for every accepted connection to end, so one idle peer
(every other chunk server keeps one open) hung the chunk server's shutdown for ever."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from chunk.storage.replica_client import ReplicaClient
from chunk.storage.replica_server import ReplicaServer
from chunk.storage.replica_store import ReplicaStore
from tests.chunk.storage.raw_peer import CLUSTER, EXTENT, SECRET

pytestmark = pytest.mark.timeout(60)

VID = "vol-1"


def test_stop_with_an_idle_authenticated_peer_connected(tmp_path: Path):
    async def main():
        store = ReplicaStore([(tmp_path / "disk", None)], extent_size=EXTENT, cow_sync=False)
        store.create(VID, 0, 1)
        server = ReplicaServer(store, SECRET, CLUSTER, "127.0.0.1", 0)
        await server.start()
        client = ReplicaClient(SECRET, CLUSTER, "peer", timeout=5)
        try:
            await asyncio.wait_for(client.digest(("127.0.0.1", server.port), VID, 0), 5)
            assert server.connections == 1              # the peer stays connected, idle
            await asyncio.wait_for(server.stop(), 5)
            assert server.connections == 0
        finally:
            await client.close()
            store.close()
    asyncio.run(main())
