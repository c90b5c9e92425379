"""Chunk id -> replication address, from the chunk servers' ChunkInfo records.

Repair and scrubbing talk to a handful of peers, rarely: a short TTL cache is
enough and needs no watch task to own. A peer that fails a call is
``forget``-ed so the next call reads its record again (it may have moved to
another address or port after a restart).
"""

from __future__ import annotations

import time

from zstore.keys import Keys
from zstore.records import ChunkInfo

Address = tuple[str, int]


class UnknownPeer(LookupError):
    """No ChunkInfo record for this chunk id."""


class Peers:
    def __init__(self, etcd, keys: Keys, ttl: float = 10.0) -> None:
        self.etcd = etcd
        self.keys = keys
        self.ttl = ttl
        self._cache: dict[str, tuple[Address, float]] = {}

    async def address(self, chunk_id: str) -> Address:
        """(host, data_port) of ``chunk_id``; raises UnknownPeer when it never registered."""
        hit = self._cache.get(chunk_id)
        now = time.monotonic()
        if hit and now - hit[1] < self.ttl:
            return hit[0]
        got = await self.etcd.get(self.keys.chunk_info(chunk_id))
        if got is None:
            self._cache.pop(chunk_id, None)
            raise UnknownPeer(f"chunk server {chunk_id!r} has no info record")
        info = ChunkInfo.decode(got.value)
        addr = (info.address, int(info.data_port))
        self._cache[chunk_id] = (addr, now)
        return addr

    def forget(self, chunk_id: str) -> None:
        self._cache.pop(chunk_id, None)
