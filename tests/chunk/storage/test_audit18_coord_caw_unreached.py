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
from chunk.storage.coordinator import NotServing

from .test_compare_write import BS, N, X, _coordinator, _other_server, _replicas


def _fenced_by_another_server_on_b(reps) -> None:
    def other(replica, idx):
        if replica.chunk_id == "B" and replica.highest < 8:
            _other_server(reps, 8, "BC")
    reps["B"].hook = other


def test_a_completion_reaching_no_replica_drops_rather_than_keeping_them_differing(monkeypatch):
    async def main():
        reps = _replicas()
        coord = _coordinator(monkeypatch, reps)
        _fenced_by_another_server_on_b(reps)
        for r in reps.values():
            orig = r.start_write

            def cut(vid, idx, off, data, epoch, seq, fua=False, r=r, orig=orig):
                if epoch >= 9:                       # the completion, after the retake
                    async def fail():
                        raise rk.ReplicaFailed(r.chunk_id, rk.UNAVAILABLE, "dial refused", unsent=True)
                    return fail()
                return orig(vid, idx, off, data, epoch, seq, fua)
            r.start_write = cut
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
