"""A peer's export blob for the wrong range, or garbled, fails that peer only (audit 18, item 2).

``mend`` raised ValueError for a blob outside the verdict's run (and StoreError for one that
does not decode) and ``repair_block`` did not catch it there: the whole repair crashed on the
first such peer instead of taking the block from the next in-sync one. Real stores, replica
servers and etcd; peer C's EXPORT answers are replaced on their way to B (``BadPeer``).
"""

from __future__ import annotations

import msgpack
import pytest

from chunk.storage.extent_file import BLOCK_SIZE

from .replica_nodes import EXTENT, block
from .test_repair import VID

pytestmark = pytest.mark.timeout(60)

BLK = 3


def _other_block(c, blob: bytes) -> bytes:
    return c.store.export(VID, 0, (BLK + 1) * BLOCK_SIZE, BLOCK_SIZE)[0]


def _beyond(c, blob: bytes) -> bytes:
    state = msgpack.unpackb(blob)
    state.update(offset=EXTENT, end=EXTENT + BLOCK_SIZE, live=[], versions=[])
    return msgpack.packb(state)


def _garbled(c, blob: bytes) -> bytes:
    return blob[: len(blob) // 2]


def _wider(c, blob: bytes) -> bytes:
    return c.store.export(VID, 0, BLK * BLOCK_SIZE, 2 * BLOCK_SIZE)[0]


class BadPeer:
    """B's real client, but what ``port``'s EXPORT answers is replaced by ``bad(blob)``."""

    def __init__(self, inner, port: int, bad) -> None:
        self.inner, self.port, self.bad = inner, port, bad
        self.exports = 0

    async def export(self, addr, *args, **kw):
        blob, nxt = await self.inner.export(addr, *args, **kw)
        if addr[1] == self.port:
            self.exports += 1
            return self.bad(self.node, blob), nxt
        return blob, nxt

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("bad", [_other_block, _beyond, _garbled, _wider],
                         ids=["another-block", "beyond-the-extent", "garbled", "wider"])
async def test_a_bad_blob_from_one_peer_goes_on_to_the_next(nodes, bad):
    c, a, b = await nodes.add("C"), await nodes.add("A"), await nodes.add("B")
    await nodes.extent(VID, 0, ["C", "A", "B"], {BLK: block("three"), BLK + 1: block("four")})
    b.corrupt(VID, 0, BLK)
    peer = BadPeer(b.client, c.server.port, bad)
    peer.node = c
    b.repair.client = peer
    b.repair.start()
    assert b.repair.schedule(VID, 0, BLK)
    assert await b.repair.wait_idle(10)
    assert peer.exports >= 1, "C, first in the record, was asked first"
    assert b.repair.status()["repaired"] == 1, b.repair.status()
    assert b.store.verify(VID, 0) == []
    assert b.store.read(VID, 0, BLK * BLOCK_SIZE, BLOCK_SIZE)[0] == block("three")
    assert b.store.read(VID, 0, (BLK + 1) * BLOCK_SIZE, BLOCK_SIZE)[0] == block("four")
    assert b.store.digest(VID, 0) == a.store.digest(VID, 0)
