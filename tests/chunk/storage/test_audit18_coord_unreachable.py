"""Every in-sync replica unreachable (UNAVAILABLE) while this server holds none of the
extent (it serves the LUN only): the trouble is most likely on our side (our own network
cut). Before 67c7d77, all but the last were dropped one after another and the write failed
anyway, costing the extent its redundancy for nothing. Now, when the request reached none of
them (``unsent``: the dial refused or timed out, no registration record, the replica client
closed) and no earlier attempt of it may have changed one, nobody is dropped and the write
fails NOT READY (04/01), which the host retries, as etcd out of reach is answered (a
COMPARE AND WRITE, whose retry is not idempotent, fails MEDIUM ERROR); a flush, which
changes no data, keeps them all however they failed.

An UNAVAILABLE after the request left (its reply overdue, the connection lost with it on
it) says nothing of what the replica did: 67c7d77 kept them all then too, and a write B took
(its reply timed out) while C was down left B (new data) and C (old) both in sync. Such
replicas are dropped as before, those the request never reached first, so the one left (the
meta refuses to drop the last) is one that may hold it and answers.

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
from tests.cluster import until

from .replica_nodes import block
from .test_audit18_coord_engine_stop import served  # noqa: F401

pytestmark = pytest.mark.timeout(60)


async def _until(cond, what: str, timeout: float = 10.0) -> None:
    """Poll ``cond``; ``what`` is the failure message itself."""
    await until(cond, what, timeout, 0.001, message=what)


async def _down(served, *cids) -> None:  # noqa: F811
    """Stop the servers of ``cids``, and wait until this server's replica client saw their
    connections close (a request then dials, refused: it reaches nobody)."""
    for cid in cids:
        await served.nodes.nodes[cid].server.stop()
    for cid in cids:
        r = served.engine.cached_replica(cid)
        await _until(lambda: not r.connected, f"{cid}'s connection still looks up")


async def _cut_off(served):  # noqa: F811
    """v served from B and C, written once; then neither answers (their servers gone, as
    when this server's own network is cut)."""
    dev = await served.start(["B", "C"], replica_timeout=2.0)
    await asyncio.wait_for(dev.write(0, block(1)), 10)
    await _down(served, "B", "C")
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


async def test_a_flush_whose_replies_all_time_out_drops_nobody(served):  # noqa: F811
    """Both replicas took the FLUSH, their replies never come (the replica timeout): sent, but
    a flush changes no data, so they cannot differ for it: nobody dropped, NOT READY."""
    dev = await served.start(["B", "C"], relayed=("B", "C"), replica_timeout=1.0)
    await asyncio.wait_for(dev.write(0, block(1)), 10)        # extent 0 unflushed
    for cid in "BC":
        served.relays[cid].hold()
    with pytest.raises(NotServing):
        await asyncio.wait_for(dev.flush(), 30)
    assert served.meta.dropped() == []
    assert (await served.record()).replicas == ["B", "C"]


async def test_a_compare_and_write_whose_compare_reads_no_replica_drops_nobody(served):  # noqa: F811
    """Its compare reads no replica: MEDIUM ERROR (the compare's own), nothing written, nobody
    dropped. (This test, named for every replica unreachable, never reached the write.)"""
    dev = await _cut_off(served)
    with pytest.raises(MediumError, match="could serve the compare"):
        await asyncio.wait_for(dev.compare_and_write(0, block(1), block(3)), 30)
    assert served.meta.dropped() == []


async def test_a_compare_and_write_whose_write_reaches_no_replica_drops_nobody(served):  # noqa: F811
    """The compare read B and C; then both go down before the write is sent, which reaches
    neither (refused): nobody dropped, and MEDIUM ERROR, not NOT READY (``retried`` False:
    a COMPARE AND WRITE retried after an attempt that may have landed would miscompare
    against itself)."""
    dev = await served.start(["B", "C"], replica_timeout=2.0)
    await asyncio.wait_for(dev.write(0, block(1)), 10)
    coord = served.coord
    orig = coord._caw_send                                      # noqa: SLF001

    async def send_to_nobody(*args, **kw):
        await _down(served, "B", "C")                           # after the compare
        return await orig(*args, **kw)
    coord._caw_send = send_to_nobody                            # noqa: SLF001
    with pytest.raises(MediumError, match="no in-sync replica answered") as got:
        await asyncio.wait_for(dev.compare_and_write(0, block(1), block(3)), 30)
    assert not isinstance(got.value, NotServing)
    assert served.meta.dropped() == []
    assert (await served.record()).replicas == ["B", "C"]


async def test_one_unreachable_replica_is_still_dropped(served):  # noqa: F811
    """The other in-sync replica answers: the one that does not is dropped, the write done."""
    dev = await served.start(["B", "C"], replica_timeout=2.0)
    await asyncio.wait_for(dev.write(0, block(1)), 10)
    await served.nodes.nodes["B"].server.stop()
    await asyncio.wait_for(dev.write(BLOCK_SIZE, block(2)), 30)
    assert served.meta.dropped() == ["B"]
    assert (await served.record()).replicas == ["C"]
    assert served.read("C", BLOCK_SIZE) == block(2)


async def test_a_write_b_took_while_c_is_down_keeps_b(served):  # noqa: F811
    """B took the write (its reply held until the replica timeout), C is down (refused):
    both UNAVAILABLE. Before, nobody was dropped (NOT READY) and B (new data) and C (old)
    both stayed in sync (the reviewer's reproducer). Now C, which the write never reached,
    is dropped first; the meta refuses to drop B, the last: MEDIUM ERROR, and B, which
    answers, serves the extent."""
    dev = await served.start(["B", "C"], relayed=("B",), replica_timeout=1.0)
    await asyncio.wait_for(dev.write(0, block(1)), 10)
    await _down(served, "C")
    served.relays["B"].hold()
    with pytest.raises(MediumError):
        await asyncio.wait_for(dev.write(BLOCK_SIZE, block(2)), 30)
    assert served.meta.dropped() == ["C", "B"]                  # B refused: the last
    assert (await served.record()).replicas == ["B"]
    assert served.read("B", BLOCK_SIZE) == block(2)


async def test_a_write_that_reached_b_not_c_both_timing_out_keeps_agreeing_replicas(served):  # noqa: F811
    """B took the write (its reply held), C's request is held on its way (C never gets it):
    both time out, both UNAVAILABLE after the request left. Before: NOT READY, B (new) and C
    (old) both kept in sync. Now one is dropped (B, the first), the meta refuses C, the last:
    MEDIUM ERROR, and the replica left in sync agrees with itself."""
    dev = await served.start(["B", "C"], relayed=("B", "C"), replica_timeout=1.0)
    await asyncio.wait_for(dev.write(0, block(1)), 10)
    served.relays["B"].hold()
    served.relays["C"].hold(requests=True)
    with pytest.raises(MediumError):
        await asyncio.wait_for(dev.write(BLOCK_SIZE, block(2)), 30)
    assert served.read("B", BLOCK_SIZE) == block(2)
    assert served.read("C", BLOCK_SIZE) != block(2)
    assert served.meta.dropped() == ["B", "C"]
    assert (await served.record()).replicas == ["C"]


async def test_a_write_repeated_after_a_fence_that_then_reaches_nobody_keeps_agreeing_replicas(
        served):  # noqa: F811
    """The write's first attempt landed on B and was fenced on C (another owner's epoch);
    while it takes the volume back, B and C go down, so the repeat reaches neither (refused).
    Nothing of the repeat landed, but the first attempt did, on B only: keeping both (before:
    NOT READY) left B (new) and C (old) in sync. Now one is dropped (B, the first), the meta
    refuses C: MEDIUM ERROR."""
    dev = await served.start(["B", "C"], replica_timeout=2.0)
    await asyncio.wait_for(dev.write(0, block(1)), 10)
    coord = served.coord
    served.nodes.nodes["C"].store.admit("v", 0, coord.epoch + 1)  # another owner reached C
    await coord._owner_lock.acquire()                           # noqa: SLF001 - hold the retake
    try:
        w = asyncio.ensure_future(dev.write(BLOCK_SIZE, block(2)))
        await _until(lambda: coord.counters["fenced"] == 1, "the write was not fenced")
        await _down(served, "B", "C")
    finally:
        coord._owner_lock.release()                             # noqa: SLF001
    with pytest.raises(MediumError):
        await asyncio.wait_for(w, 30)
    assert served.read("B", BLOCK_SIZE) == block(2)
    assert served.read("C", BLOCK_SIZE) != block(2)
    assert served.meta.dropped() == ["B", "C"]
    assert (await served.record()).replicas == ["C"]
