"""Every in-sync replica unreachable (UNAVAILABLE) while this server holds none of the
extent (it serves the LUN only): the trouble is most likely on our side (our own network
cut). Before, all but the last were dropped one after another and the write failed anyway,
costing the extent its redundancy for nothing. Now nobody is dropped and the write fails
NOT READY (04/01), which the host retries, as etcd out of reach is answered (a COMPARE AND
WRITE, whose retry is not idempotent, keeps its MEDIUM ERROR).

The harness of ``test_audit18_coord_engine_stop``: a real started StorageEngine serving
volume v from real peers on loopback, no replica of its own, the meta's drop a stand-in
over the test etcd."""

from __future__ import annotations

import asyncio

import pytest

from chunk.blockdev import MediumError
from chunk.scsi.sense import NOT_READY
from chunk.storage.coordinator import NotServing
from chunk.storage.extent_file import BLOCK_SIZE

from .replica_nodes import block
from .test_audit18_coord_engine_stop import served  # noqa: F401

pytestmark = pytest.mark.timeout(60)


async def _cut_off(served):  # noqa: F811
    """v served from B and C, written once; then neither answers (their servers gone, as
    when this server's own network is cut)."""
    dev = await served.start(["B", "C"], replica_timeout=2.0)
    await asyncio.wait_for(dev.write(0, block(1)), 10)
    for cid in "BC":
        await served.nodes.nodes[cid].server.stop()
    return dev


async def test_a_write_with_every_replica_unreachable_drops_nobody_and_is_not_ready(served):  # noqa: F811
    dev = await _cut_off(served)
    before = await served.record()
    with pytest.raises(NotServing) as got:
        await asyncio.wait_for(dev.write(BLOCK_SIZE, block(2)), 30)
    assert (got.value.key, got.value.asc, got.value.ascq) == (NOT_READY, 0x04, 0x01)
    assert served.meta.dropped() == []
    after = await served.record()
    assert (after.replicas, after.generation) == (before.replicas, before.generation)
    assert served.coord.extents[0].replicas == ["B", "C"]


async def test_a_flush_with_every_replica_unreachable_drops_nobody(served):  # noqa: F811
    dev = await _cut_off(served)
    with pytest.raises(NotServing):
        await asyncio.wait_for(dev.flush(), 30)
    assert served.meta.dropped() == []


async def test_a_compare_and_write_with_every_replica_unreachable_drops_nobody(served):  # noqa: F811
    """Its compare reads no replica: MEDIUM ERROR as before (not NOT READY: a COMPARE AND
    WRITE retried after it may have landed would miscompare against itself), nobody dropped."""
    dev = await _cut_off(served)
    with pytest.raises(MediumError):
        await asyncio.wait_for(dev.compare_and_write(0, block(1), block(3)), 30)
    assert served.meta.dropped() == []


async def test_one_unreachable_replica_is_still_dropped(served):  # noqa: F811
    """The other in-sync replica answers: the one that does not is dropped, the write done."""
    dev = await served.start(["B", "C"], replica_timeout=2.0)
    await asyncio.wait_for(dev.write(0, block(1)), 10)
    await served.nodes.nodes["B"].server.stop()
    await asyncio.wait_for(dev.write(BLOCK_SIZE, block(2)), 30)
    assert served.meta.dropped() == ["B"]
    assert (await served.record()).replicas == ["C"]
    assert served.read("C", BLOCK_SIZE) == block(2)

