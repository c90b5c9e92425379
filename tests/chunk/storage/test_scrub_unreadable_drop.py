"""A snapshot version that stays unreadable gets this replica dropped for a resync, when another
in-sync replica reads it; and the engine publishes the scrubber's error counters."""

from __future__ import annotations

import pytest

from chunk.storage.extent_file import BLOCK_SIZE
from chunk.storage.scrubber import Scrubber

from .replica_nodes import block
from .test_scrubber import VID, MediaError, meta_drop, record, setup

pytestmark = pytest.mark.timeout(60)


def _version_file(node):
    return next((node.data_path(VID, 0).parent / f"{VID}.0.v").glob("*.ver"))


async def _versions_on_both(nodes):
    a, b = await setup(nodes)
    for n in (a, b):
        n.store.write(VID, 0, BLOCK_SIZE, block("one, later"), 2)   # version (1, 1) on both
    return a, b


def _scrubber(node, drop):
    return Scrubber(node.store, node.repair, rate_bytes_per_s=64 << 20, interval=3600,
                    recheck_delay=0.05, drop=drop)


async def test_a_persistently_unreadable_version_drops_this_replica_for_a_resync(nodes, etcd_client,
                                                                                 monkeypatch):
    a, b = await _versions_on_both(nodes)
    MediaError(monkeypatch, _version_file(b), [1], data_at=BLOCK_SIZE)
    drop, calls = meta_drop(etcd_client, nodes.keys)
    scrub = _scrubber(b, drop)
    counts = await scrub.run_pass()
    assert counts["unreadable"] == 1
    assert calls == [(VID, 0, "B", 1)]                  # B dropped itself: A reads the block
    st = scrub.status()
    assert st["unreadable_drops"] == 1 and st["resyncs_requested"] == 1
    rec = await record(nodes, VID, 0)
    assert rec.replicas == ["A"] and rec.stale == {"B": 1}
    assert (await record(nodes, VID, 1)).replicas == ["A", "B"]     # the other extent is left
    await scrub.run_pass()                              # not in sync any more: nothing again
    assert len(calls) == 1


async def test_nothing_is_dropped_when_no_other_replica_reads_it(nodes, etcd_client, monkeypatch):
    a, b = await _versions_on_both(nodes)
    MediaError(monkeypatch, _version_file(b), [1], data_at=BLOCK_SIZE)
    MediaError(monkeypatch, _version_file(a), [1], data_at=BLOCK_SIZE)   # A's copy as bad
    drop, calls = meta_drop(etcd_client, nodes.keys)
    scrub = _scrubber(b, drop)
    assert (await scrub.run_pass())["unreadable"] == 1
    assert calls == [] and scrub.status()["unreadable_drops"] == 0
    assert (await record(nodes, VID, 0)).replicas == ["A", "B"]


async def test_a_block_that_reads_again_on_the_recheck_drops_nothing(nodes, etcd_client, monkeypatch):
    a, b = await _versions_on_both(nodes)
    eio = MediaError(monkeypatch, _version_file(b), [1], data_at=BLOCK_SIZE)
    drop, calls = meta_drop(etcd_client, nodes.keys)
    scrub = _scrubber(b, drop)
    sleep = __import__("asyncio").sleep

    async def healed(delay):             # the sector reads again before the recheck
        eio.bad.clear()
        await sleep(delay)
    monkeypatch.setattr("chunk.storage.scrubber.asyncio.sleep", healed)
    assert (await scrub.run_pass())["unreadable"] == 1
    assert calls == [] and (await record(nodes, VID, 0)).replicas == ["A", "B"]


def test_engine_status_publishes_the_scrubber_error_counters():
    from types import SimpleNamespace

    from chunk.storage.engine import StorageEngine as Engine
    eng = Engine.__new__(Engine)
    eng.repair = SimpleNamespace(status=lambda: {"checksum_errors": 0})
    eng.scrubber = SimpleNamespace(status=lambda: {"errors": 3, "unreadable": 2, "unresolved": 1,
                                                   "passes": 1})
    eng.store = SimpleNamespace(extents=lambda: [])
    eng._coords, eng._retired, eng._running = {}, {}, {}
    st = eng.status()
    assert st["scrub_errors"] == 3 and st["scrub_unreadable"] == 2 and st["scrub_unresolved"] == 1
