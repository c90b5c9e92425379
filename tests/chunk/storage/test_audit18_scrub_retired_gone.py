"""A copy retired here whose files go before the scrub pass ends keeps its report.

db80aea moved a retired copy's ``mismatched`` / ``unresolved_extents`` entries to
``status()["retired"]``, but only at the end of a pass, looking in ``store.broken`` then. A
pass takes days; the reclaimer deletes a broken copy once the extent is whole elsewhere
(``Reclaimer._delete_broken``), and a resync's CREATE discards it, both far sooner. By the end
of the pass the copy was in neither ``has`` nor ``broken``: the report vanished silently, as a
deleted extent's does (reviewer's reproducer, /tmp/rev210-repro/test_rev210_retired_vanish.py).

Now the store tells the scrubber the moment it retires a copy (``ReplicaStore.retire_listeners``,
called by ``_retire``), and the report moves to ``retired`` (logged) then, whatever happens to
the copy's files afterwards. ``engine.status()`` publishes the count as ``scrub_retired``.
"""

from __future__ import annotations

import errno
import os

import pytest

from chunk.storage.extent_file import BLOCK_SIZE
from chunk.storage.reclaim import Reclaimer
from chunk.storage.replica_store import ReplicaStore, StoreError
from zstore.records import ClusterInfo, ExtentRecord, Volume

from .replica_nodes import EXTENT, block
from .test_audit18_scrub_retired_copy import retire
from .test_scrubber import VID, _voter, setup

pytestmark = pytest.mark.timeout(60)


def failed_flush(store, vid: str, idx: int, monkeypatch) -> None:
    """A real failed fdatasync (ENOSPC) of the copy: ``_durable`` retires it."""
    real = os.fdatasync

    def fdatasync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    try:
        with pytest.raises(StoreError):
            store.flush(vid, idx)
    finally:
        monkeypatch.setattr(os, "fdatasync", real)
    assert (vid, idx) in store.broken and not store.has(vid, idx)


def retired_logs(caplog, vid: str, idx: int) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "chunk.storage.scrubber" and r.levelname == "ERROR"
            and f"{vid}/{idx}: this copy" in r.getMessage() and "was retired" in r.getMessage()]


async def _mismatch_on_b(nodes):
    a, b = await setup(nodes)
    b.store.write(VID, 0, 7 * BLOCK_SIZE, block("only on B"), 1)     # a write never acknowledged
    scrub = _voter(b, None)                                           # reports, never drops
    assert (await scrub.run_pass())["mismatches"] == 1
    assert scrub.status()["mismatched"] == [{"volume": VID, "extent": 0, "peers": ["A"]}]
    return a, b, scrub


async def test_retired_then_reclaimed_before_the_pass_ends_is_listed(nodes, etcd_client,
                                                                     monkeypatch, caplog):
    """The reviewer's scenario, with a real failed flush and the real reclaimer: the copy is
    retired, the extent is rebuilt on A and C, B's reclaimer deletes the broken copy, then a
    pass ends. The report is in ``retired`` and was logged."""
    _a, b, scrub = await _mismatch_on_b(nodes)
    with caplog.at_level("INFO", logger="chunk.storage.scrubber"):
        failed_flush(b.store, VID, 0, monkeypatch)
        # rebuilt elsewhere, whole: B's broken copy is the reclaimer's to delete
        await etcd_client.put(nodes.keys.cluster(), ClusterInfo(cluster_id="c1").encode())
        await etcd_client.put(nodes.keys.volume(VID), Volume(
            volume_id=VID, name=VID, size=EXTENT * 4, replicas=2, snap_seq=1).encode())
        await etcd_client.put(nodes.keys.extent(VID, 0), ExtentRecord(
            volume_id=VID, index=0, replicas=["A", "C"], generation=2).encode())
        summary = await Reclaimer(b.store, etcd_client, nodes.keys, "B").run_once()
        assert (VID, 0) in summary["deleted"]
        assert (VID, 0) not in b.store.broken and not b.store.has(VID, 0)
        await scrub.run_pass()
    st = scrub.status()
    assert st["mismatched"] == [] and st["unresolved_extents"] == []
    [entry] = st["retired"]
    assert (entry["volume"], entry["extent"], entry["was"], entry["peers"]) == \
        (VID, 0, "mismatched", ["A"])
    assert "a flush failed" in entry["why"]
    assert len(retired_logs(caplog, VID, 0)) == 1
    assert st["retired_reports"] == 1


async def test_retired_then_deleted_is_listed_at_once(nodes, caplog):
    """The reproducer's own steps (retire, DELETE, one pass); the report moves when the copy
    is retired, before any pass."""
    _a, b, scrub = await _mismatch_on_b(nodes)
    with caplog.at_level("INFO", logger="chunk.storage.scrubber"):
        retire(b.store, VID, 0)
        assert [e["extent"] for e in scrub.status()["retired"]] == [0]     # at once
        assert scrub.status()["mismatched"] == []
        b.store.delete(VID, 0)
        await scrub.run_pass()
    st = scrub.status()
    assert st["mismatched"] == []
    assert [(e["volume"], e["extent"], e["was"]) for e in st["retired"]] == [(VID, 0, "mismatched")]
    assert len(retired_logs(caplog, VID, 0)) == 1


async def test_retired_then_replaced_by_a_resync_is_listed(nodes, caplog, monkeypatch):
    """A resync's CREATE discards the broken copy and the fresh one agrees before the pass
    ends: db80aea cleared the report by that agreement (a log line, not ``retired``). It is the
    retired copy's report, so it is listed as retired; the fresh copy's agreement clears
    nothing more."""
    a, b, scrub = await _mismatch_on_b(nodes)
    with caplog.at_level("INFO", logger="chunk.storage.scrubber"):
        failed_flush(b.store, VID, 0, monkeypatch)
        b.store.usage()                                              # ENOSPC cleared: room
        b.store.create(VID, 0, 2, discard_broken=True)               # the resync's target
        for blk, payload in {1: block("one"), 300: block("three hundred")}.items():
            b.store.write(VID, 0, blk * BLOCK_SIZE, payload, 1)      # copied from A
        assert b.store.digest(VID, 0) == a.store.digest(VID, 0)
        assert (await scrub.run_pass())["mismatches"] == 0
    st = scrub.status()
    assert st["mismatched"] == []
    assert [(e["extent"], e["was"], e["peers"]) for e in st["retired"]] == [(0, "mismatched", ["A"])]
    assert len(retired_logs(caplog, VID, 0)) == 1
    assert not any("agree again" in r.getMessage() for r in caplog.records)


async def test_a_tie_and_its_mismatch_make_one_retired_entry(nodes):
    """A tie in unchecked metadata is in both ``mismatched`` and ``unresolved_extents``: one
    entry (the graver: unresolved), one count."""
    _a, b, scrub = await _mismatch_on_b(nodes)
    scrub.unresolved_extents[(VID, 0)] = ["A"]           # as ``_unresolvable`` leaves it
    retire(b.store, VID, 0)
    b.store.delete(VID, 0)
    await scrub.run_pass()
    st = scrub.status()
    assert st["mismatched"] == [] and st["unresolved_extents"] == []
    assert [(e["extent"], e["was"], e["peers"]) for e in st["retired"]] == [(0, "unresolved", ["A"])]
    assert st["retired_reports"] == 1


async def test_a_copy_retired_without_a_report_lists_nothing(nodes):
    a, b = await setup(nodes)
    scrub = _voter(b, None)
    assert (await scrub.run_pass())["mismatches"] == 0
    retire(b.store, VID, 1)
    b.store.delete(VID, 1)
    await scrub.run_pass()
    assert scrub.status()["retired"] == [] and scrub.status()["retired_reports"] == 0


def test_a_failing_listener_does_not_stop_a_retirement(tmp_path, monkeypatch, caplog):
    with ReplicaStore([(tmp_path / "d", None)], extent_size=EXTENT) as s:
        s.create(VID, 0, 1)
        s.write(VID, 0, 0, block("x"), 1)
        seen = []

        def bad(vid, idx, why):
            raise RuntimeError("listener bug")
        s.retire_listeners.extend([bad, lambda *a: seen.append(a)])
        failed_flush(s, VID, 0, monkeypatch)
        assert [(v, i) for v, i, _ in seen] == [(VID, 0)] and "a flush failed" in seen[0][2]
        assert any("retire listener" in r.getMessage() for r in caplog.records)


async def test_engine_status_publishes_the_retired_report_count(nodes):
    """``zstore chunk list --json``'s ``storage.scrub_retired``: the engine's status, from the
    scrubber's ``retired_reports``."""
    from types import SimpleNamespace

    from chunk.storage.engine import StorageEngine as Engine
    _a, b, scrub = await _mismatch_on_b(nodes)
    eng = Engine.__new__(Engine)
    eng.repair = SimpleNamespace(status=lambda: {"checksum_errors": 0})
    eng.scrubber, eng.store = scrub, b.store
    eng._coords, eng._retired, eng._running = {}, {}, {}
    assert eng.status()["scrub_retired"] == 0
    retire(b.store, VID, 0)
    assert eng.status()["scrub_retired"] == 1
