"""A replica on a chunk server with no registration record (no ChunkInfo): looking it up
raised a raw LookupError (``Peers.address``: UnknownPeer), which reached the initiator as
INTERNAL TARGET FAILURE, and the replica was never dropped: every write to the extent failed
so. It now fails as a peer that does not answer (UNAVAILABLE) and is dropped as one.

The harness of ``test_audit18_coord_engine_stop``: a real started StorageEngine serving
volume v from real peers on loopback, no replica of its own, the meta's drop a stand-in
over the test etcd."""

from __future__ import annotations

import asyncio

import pytest

from chunk.scsi.unit import _ANSWERED
from chunk.storage.coordinator import NotServing

from .replica_nodes import block
from .test_audit18_coord_engine_stop import served  # noqa: F401

pytestmark = pytest.mark.timeout(60)


async def test_a_replica_on_an_unregistered_chunk_server_is_dropped(served):  # noqa: F811
    """X has no ChunkInfo record (never registered, or its record removed): the write drops
    it as a peer that does not answer and is acknowledged on B, instead of failing with a raw
    LookupError (INTERNAL TARGET FAILURE) for ever."""
    dev = await served.start(["B", "X"], unregistered=("X",))
    await asyncio.wait_for(dev.write(0, block(1)), 10)
    assert served.meta.dropped() == ["X"]
    assert (await served.record()).replicas == ["B"]
    assert served.read("B", 0) == block(1)


async def test_a_flush_drops_a_replica_on_an_unregistered_chunk_server(served):  # noqa: F811
    dev = await served.start(["B", "X"], unregistered=("X",))
    served.coord._unflushed.add(0)                         # noqa: SLF001 - as after a write
    await asyncio.wait_for(dev.flush(), 10)
    assert served.meta.dropped() == ["X"]


async def test_every_replica_unregistered_drops_nobody(served):  # noqa: F811
    """Neither X nor Y is registered: as every replica unreachable, nobody is dropped and the
    write is answered (NOT READY), never a raw LookupError."""
    dev = await served.start(["X", "Y"], unregistered=("X", "Y"))
    with pytest.raises(_ANSWERED) as got:
        await asyncio.wait_for(dev.write(0, block(1)), 10)
    assert isinstance(got.value, NotServing)
    assert served.meta.dropped() == []
