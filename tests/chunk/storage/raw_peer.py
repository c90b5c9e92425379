"""A replica server over a real ReplicaStore in tmp_path, and raw peer connections to it.

Shared by the tests that pin the replica server's protocol with frames sent by hand
(peer_auth's client side + wire), independently of replica_client."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import AsyncIterator

from chunk.storage import peer_auth
from chunk.storage.replica_server import ReplicaServer
from chunk.storage.replica_store import ReplicaStore
from chunk.storage.wire import FrameReader, FrameWriter

SECRET = b"s" * 32
CLUSTER = "cluster-1"
EXTENT = 4 << 20


@contextlib.asynccontextmanager
async def replica_server(tmp_path: Path, *, cow_sync: bool = False, stop_within: float | None = None,
                         **server_kw) -> AsyncIterator[tuple[ReplicaServer, ReplicaStore]]:
    """(server, store) on loopback, one disk ``tmp_path/disk``; stopped and closed after
    (``stop_within``: the stop must end in that many seconds)."""
    store = ReplicaStore([(tmp_path / "disk", None)], extent_size=EXTENT, cow_sync=cow_sync)
    server = ReplicaServer(store, SECRET, CLUSTER, "127.0.0.1", 0, **server_kw)
    await server.start()
    try:
        yield server, store
    finally:
        try:
            await asyncio.wait_for(server.stop(), stop_within)
        finally:
            store.close()


async def raw(server: ReplicaServer) -> tuple[FrameReader, FrameWriter]:
    """A connection to the server, not authenticated yet."""
    r, w = await asyncio.open_connection("127.0.0.1", server.port)
    return FrameReader(r), FrameWriter(w)


async def authed_raw(server: ReplicaServer, chunk_id: str = "c") -> tuple[FrameReader, FrameWriter]:
    """A connection through the HELLO handshake, as chunk server ``chunk_id``."""
    reader, writer = await raw(server)
    await asyncio.wait_for(peer_auth.client_handshake(reader, writer, SECRET, CLUSTER, chunk_id), 5)
    return reader, writer
