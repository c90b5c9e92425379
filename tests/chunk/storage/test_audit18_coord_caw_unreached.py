"""COMPARE AND WRITE where every in-sync replica fails UNAVAILABLE (review of a75b01d).

``_none_reached`` keeps every replica in sync (NOT READY, or MEDIUM ERROR for a CAW) only when
the request reached none of them and no earlier attempt may have changed one. Two CAW paths
missed that: the round completing a fenced CAW that landed on some replicas only started as
if nothing had landed (the replicas, just seen to differ, were all kept), and the CAW's flush
was answered NOT READY (a retry the host then makes miscompares against the CAW's own data).
A revert reaching no replica is kept alike now too. Fake replicas (``test_compare_write``'s),
as the rest of the CAW unit tests."""

from __future__ import annotations

import asyncio

import pytest

from chunk.blockdev import MediumError
from chunk.storage import replicas as rk
from chunk.storage.coordinator import EXTENT_SIZE, NotServing

from .test_compare_write import BS, N, X, _coordinator, _EpochReplica, _other_server, _replicas


def _fenced_by_another_server_on_b(reps) -> None:
    def other(replica, idx):
        if replica.chunk_id == "B" and replica.highest < 8:
            _other_server(reps, 8, "BC")
    reps["B"].hook = other


def _unsent_after_the_retake(reps, extents=None) -> None:
    """Every send at the retaken epoch (9: the completion round) fails before it leaves
    (``unsent``), on every extent or on those listed."""
    for r in reps.values():
        orig = r.start_write

        def cut(vid, idx, off, data, epoch, seq, fua=False, sole=False, r=r, orig=orig):
            if epoch >= 9 and (extents is None or idx in extents):
                async def fail():
                    raise rk.ReplicaFailed(r.chunk_id, rk.UNAVAILABLE, "dial refused", unsent=True)
                return fail()
            return orig(vid, idx, off, data, epoch, seq, fua, sole=sole)
        r.start_write = cut


def test_a_completion_reaching_no_replica_drops_rather_than_keeping_them_differing(monkeypatch):
    async def main():
        reps = _replicas()
        coord = _coordinator(monkeypatch, reps)
        _fenced_by_another_server_on_b(reps)
        _unsent_after_the_retake(reps)
        with pytest.raises(MediumError):
            await coord.compare_and_write(0, X, N)
        # Before: nobody dropped, A (ours) beside B and C (old) all in sync. Now they are
        # dropped as any replica a request may have changed (this fake meta drops even the
        # last, which the real one refuses): whatever stays in sync agrees.
        insync = coord.extents[0].replicas
        assert len({reps[k].get(0, 0, BS) for k in insync}) <= 1, "in-sync replicas differ"
        assert coord.counters["drops"] >= 2
    asyncio.run(main())


def test_a_landed_fua_caw_whose_flush_nobody_answers_is_medium_error_not_not_ready(monkeypatch):
    async def main():
        reps = _replicas()
        coord = _coordinator(monkeypatch, reps)
        _fenced_by_another_server_on_b(reps)
        for r in reps.values():
            async def flush(vid, idx, epoch, r=r):
                raise rk.ReplicaFailed(r.chunk_id, rk.UNAVAILABLE, "reply overdue")
            r.flush = flush
        with pytest.raises(Exception) as e:
            await coord.compare_and_write(0, X, N, fua=True)
        assert [r.get(0, 0, BS) for r in reps.values()] == [N, N, N]     # it landed everywhere
        assert isinstance(e.value, MediumError) and not isinstance(e.value, NotServing)
    asyncio.run(main())


def test_an_untouched_extent_of_a_completion_reaching_no_replica_keeps_them_all(monkeypatch):
    """Review of 8ce3f39: a CAW over two extents, fenced; it landed on extent 0 (A only) and
    on extent 1 nowhere (A, B, C alike). Extent 1's completion round reaches no replica: its
    replicas never differed and were sent nothing, yet every extent of the round started as
    landed and they were dropped. Whether replicas differ is per extent now."""
    async def main():
        reps = {k: _EpochReplica(k) for k in "ABC"}
        for r in reps.values():
            r.put(0, EXTENT_SIZE - BS, X)
            r.put(1, 0, X)
            r.lag[1] = 0.01                      # extent 1's writes arrive after the fence
        coord = _coordinator(monkeypatch, reps, extents=(0, 1))

        def other(replica, idx):
            if replica.chunk_id == "B" and idx == 0 and replica.highest < 8:
                _other_server(reps, 8, "ABC")    # A took extent 0 already (sent first)
        reps["B"].hook = other
        _unsent_after_the_retake(reps, extents={1})
        with pytest.raises(MediumError):
            await coord.compare_and_write(EXTENT_SIZE - BS, X + X, N + N)
        assert coord.extents[1].replicas == ["A", "B", "C"], "alike, never sent anything: dropped"
    asyncio.run(main())


def test_a_revert_sent_to_no_replica_keeps_them_all(monkeypatch):
    """A revert (``partial``) that reached no replica (every one unsent) changed none: all are
    kept and it fails NOT READY; before, it went down the drop path to one replica."""
    async def main():
        reps = _replicas()
        coord = _coordinator(monkeypatch, reps)
        for r in reps.values():
            async def revert(vid, idx, epoch, to, seq, sole=False, r=r):
                raise rk.ReplicaFailed(r.chunk_id, rk.UNAVAILABLE, "dial refused", unsent=True)
            r.revert = revert
        with pytest.raises(NotServing):
            await coord._revert(1)
        assert coord.extents[0].replicas == ["A", "B", "C"] and coord.counters["drops"] == 0
    asyncio.run(main())
