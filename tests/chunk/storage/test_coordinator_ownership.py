"""The coordinator sends every mutation under ownership that is held and current: never at
epoch 0 while ownership is being re-taken, never once its lease may have lapsed, and a write
is acknowledged only on ``min_write_replicas`` in-sync replicas. Driven over the in-memory
stand-ins of test_coordinator (engine, meta, replicas)."""

from __future__ import annotations

import asyncio
import time

import pytest

from chunk.storage import coordinator as cm
from chunk.storage import replicas as rk
from chunk.storage.coordinator import EXTENT_SIZE, MediumError
from chunk.storage.replica_client import Denied
from chunk.storage.wire import Status
from tests.chunk.storage.test_coordinator import _MemReplica, _mem_coordinator
from tests.cluster import until
from zstore.records import Volume


class _SrvReplica(_MemReplica):
    """Like the real replica server: a mutation or flush at epoch 0 is DENIED (the wire
    status, as the replica client reports it); every request's epoch is recorded."""

    def __init__(self, cid: str, delay: float = 0.002) -> None:
        super().__init__(cid, delay)
        self.epochs: list[tuple[str, int, int]] = []
        self.decided = 0                   # writes whose outcome (OK or the failure) is fixed

    def _denied(self, what: str) -> rk.ReplicaFailed:
        e = Denied(Status.DENIED, {"error": f"{what} needs an ownership epoch"})
        return rk.ReplicaFailed(self.chunk_id, rk._status_kind(e), str(e))   # noqa: SLF001

    def start_write(self, vid, idx, off, data, epoch, seq, fua=False, sole=False):
        self.epochs.append(("write", epoch, seq))
        data = bytes(data)

        async def reply():
            self.decided += 1
            if epoch == 0:
                raise self._denied("WRITE")
            if self.fail:
                raise rk.ReplicaFailed(self.chunk_id, self.fail, "injected")
            self.state[off] = data
            await asyncio.sleep(self.delay)
        return reply()

    async def flush(self, vid, idx, epoch):
        self.epochs.append(("flush", epoch, 0))
        if epoch == 0:
            raise self._denied("FLUSH")


class _Lease:
    def __init__(self) -> None:
        self.lease_deadline, self.lease_gen = time.monotonic() + 60, 1
        self.acquiring = 0                 # ownership.acquire calls started (the fake below)


def _setup(monkeypatch, reps, acquire_delay: float, snap_seq: int = 1):
    acquired = []

    async def acquire(etcd, keys, vid, chunk_id):
        lease.acquiring += 1
        await asyncio.sleep(acquire_delay)                  # etcd round trips
        acquired.append(vid)
        return 7 + len(acquired), 100 + len(acquired), Volume(
            volume_id=vid, name=vid, size=EXTENT_SIZE, replicas=3, snap_seq=snap_seq)
    monkeypatch.setattr(cm.ownership, "acquire", acquire)
    lease = _Lease()
    coord = _mem_coordinator(reps, ["A", "B", "C"])

    async def no_refresh():
        pass
    coord._refresh_extents = no_refresh                     # noqa: SLF001
    coord.engine.lease = lease
    coord._lease_gen = 1                                    # noqa: SLF001
    return coord, lease, acquired


async def _until(cond, timeout: float = 5.0) -> None:
    """Wait for a state of the coordinator or its replicas (never a fixed sleep)."""
    await until(cond, "the condition", timeout, 0.001, message="condition not reached in time")


def _sent_epochs(reps) -> set[int]:
    return {e[1] for r in reps.values() for e in r.epochs}


def test_a_flush_while_ownership_is_retaken_after_a_new_lease_drops_no_replica(monkeypatch):
    """A new lease makes the next request take ownership again. The epoch once read 0 for
    the whole etcd round trip, and a SYNCHRONIZE CACHE meanwhile (flush never took ownership
    itself) sent FLUSH at epoch 0: every remote replica answered DENIED, which counted as an
    I/O error and dropped them all (with no dirty log: a full copy each). The flush now waits
    for the new epoch; nothing goes out at 0 and no replica is dropped."""
    async def main():
        reps = {k: _SrvReplica(k) for k in "ABC"}
        coord, lease, _ = _setup(monkeypatch, reps, 0.05)
        await coord.write(0, b"x" * 4096)                   # acknowledged, not flushed
        assert coord._unflushed == {0}                      # noqa: SLF001
        lease.lease_gen += 1                                # the server's lease was granted anew
        w = asyncio.create_task(coord.write(4096, b"y" * 4096))     # re-takes ownership
        await _until(lambda: lease.acquiring == 1)          # inside the etcd round trip
        assert coord.epoch != 0                             # never exposed while re-taking
        f = asyncio.create_task(coord.flush())
        await asyncio.wait_for(asyncio.gather(w, f), 5)
        assert coord.extents[0].replicas == ["A", "B", "C"]
        assert 0 not in _sent_epochs(reps)
        assert ("flush", 8, 0) in reps["B"].epochs
    asyncio.run(main())


def test_a_write_waiting_for_a_range_while_ownership_is_retaken_goes_out_at_the_new_epoch(monkeypatch):
    """W1 waits for an overlapping W0; meanwhile a new lease makes W2 re-take ownership. W1
    once went out at epoch 0: unfenced on the local replica, DENIED and dropped on the remote
    ones, and acknowledged on one copy. It now waits for the new epoch."""
    async def main():
        reps = {k: _SrvReplica(k, delay=0.02) for k in "ABC"}
        coord, lease, acquired = _setup(monkeypatch, reps, 0.2)
        w0 = asyncio.create_task(coord.write(0, b"0" * 4096))
        await _until(lambda: all(r.epochs for r in reps.values()))    # w0 sent
        w1 = asyncio.create_task(coord.write(0, b"1" * 4096))       # waits for w0's range
        await _until(lambda: coord._locks._waiting == 1)            # noqa: SLF001
        lease.lease_gen += 1
        w2 = asyncio.create_task(coord.write(8192, b"2" * 4096))    # re-takes ownership
        await asyncio.wait_for(asyncio.gather(w0, w1, w2), 5)
        assert len(acquired) == 1 and coord.epoch == 8
        assert 0 not in _sent_epochs(reps)
        assert coord.extents[0].replicas == ["A", "B", "C"]
        assert all(r.state[0] == b"1" * 4096 for r in reps.values())
        assert all(r.epochs[-1][1] == 8 for r in reps.values())
    asyncio.run(main())


def test_a_denied_reply_is_not_a_failed_replica():
    """DENIED (a mutation sent without an epoch) says nothing about the replica: it once
    counted as an I/O error and dropped it. The attempt is repeated under the epoch held
    (here: an attempt made at epoch 0, handed to the retry loop as the fast path hands its
    own), and every replica stays."""
    async def main():
        reps = {k: _SrvReplica(k) for k in "ABC"}
        coord = _mem_coordinator(reps, ["A", "B", "C"])
        rec = coord.extents[0]
        targets = [reps[c] for c in rec.replicas]
        outcomes = [None, reps["B"]._denied("WRITE"), reps["C"]._denied("WRITE")]   # noqa: SLF001
        await asyncio.wait_for(coord._replicate(                                    # noqa: SLF001
            "write", 0, 0, 4096, memoryview(b"z" * 4096), False, False,
            first=(rec, targets, outcomes, 0, coord.seq)), 5)
        assert coord.extents[0].replicas == ["A", "B", "C"]
        assert reps["B"].state[0] == reps["C"].state[0] == b"z" * 4096
        assert reps["B"].epochs == [("write", 7, coord.seq)]
    asyncio.run(main())


def test_a_write_that_waited_past_the_lease_deadline_is_not_sent_at_the_old_seq(monkeypatch):
    """W1 passed ensure_owner, then waited for an overlapping W0 while the server's lease
    deadline passed. It was sent anyway at the old epoch and seq, and a meta that commits a
    snapshot by itself once the lease expires would find it inside the ready snapshot. Now
    nothing is sent until the lease is back; under the new lease ownership is re-taken, and
    W1 goes out at the new epoch and the volume's new seq."""
    async def main():
        reps = {k: _SrvReplica(k, delay=0.02) for k in "ABC"}
        coord, lease, acquired = _setup(monkeypatch, reps, 0.01, snap_seq=6)
        old_seq = coord.seq
        w0 = asyncio.create_task(coord.write(0, b"0" * 4096))
        await _until(lambda: all(r.epochs for r in reps.values()))    # w0 sent
        w1 = asyncio.create_task(coord.write(0, b"1" * 4096))       # waits for w0's range
        await _until(lambda: coord._locks._waiting == 1)            # noqa: SLF001
        lease.lease_deadline = time.monotonic() - 1                 # the lease may have lapsed
        await asyncio.wait_for(w0, 2)
        await asyncio.sleep(0.3)
        assert not w1.done()
        assert [e for r in reps.values() for e in r.epochs] == [("write", 7, old_seq)] * 3
        lease.lease_gen, lease.lease_deadline = 2, time.monotonic() + 60    # a new lease
        await asyncio.wait_for(w1, 2)
        assert acquired and coord.seq == 6
        assert all(r.epochs[-1] == ("write", 8, 6) for r in reps.values())
        assert coord.extents[0].replicas == ["A", "B", "C"]
    asyncio.run(main())


def test_a_write_landed_in_part_before_a_snapshot_is_split_when_repeated_at_the_new_seq(monkeypatch):
    """An attempt lands on A and B, C answers NO_EXTENT (not created yet: the write waits
    and repeats). Meanwhile the lease lapses and a new one comes: the meta committed a
    snapshot at the old seq, which holds the write on A and B and not on C. The repeat goes
    out at the new seq, and C, the smaller side, is dropped (resynced later) so that every
    replica left agrees on the snapshot."""
    async def main():
        reps = {k: _SrvReplica(k) for k in "ABC"}
        coord, lease, acquired = _setup(monkeypatch, reps, 0.0, snap_seq=6)
        old_seq = coord.seq
        reps["C"].fail = rk.NO_EXTENT
        w = asyncio.create_task(coord.write(0, b"w" * 4096))
        await _until(lambda: all(r.decided for r in reps.values()))   # C said NO_EXTENT: waits
        assert [r.epochs for r in reps.values()] == [[("write", 7, old_seq)]] * 3
        lease.lease_gen += 1                                        # lapsed and granted anew
        reps["C"].fail = None
        await asyncio.wait_for(w, 5)
        assert acquired and coord.seq == 6
        assert coord.extents[0].replicas == ["A", "B"]
        assert reps["A"].epochs[-1] == reps["B"].epochs[-1] == ("write", 8, 6)
        assert all(e[2] == old_seq for e in reps["C"].epochs)       # not written after the split
    asyncio.run(main())


class _Store:
    """A store recording what ran: admission, and the mutations."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    def admit(self, vid, idx, epoch):
        self.ran.append(f"admit {epoch}")

    def admit_write(self, vid, idx, epoch, off, data, seq):
        self.ran.append(f"admit_write {epoch}")

    def write(self, *args, **kw):
        self.ran.append("write")

    def unmap(self, *args):
        self.ran.append("unmap")

    async def flush_async(self, vid, idx):
        self.ran.append("flush")

    def read(self, vid, idx, off, length, view):
        self.ran.append("read")
        return bytes(length), None


def test_the_local_replica_refuses_a_mutation_at_epoch_0_as_the_replica_server_does():
    """The local replica skipped admission at epoch 0 and ran the mutation unfenced; the
    replica server refuses it. Now both refuse it (DENIED); reads at 0 (views) still run."""
    async def main():
        store = _Store()
        local = rk.LocalReplica("A", store)
        for call in (local.write("v", 0, 0, b"a" * 4096, 0, 1), local.unmap("v", 0, 0, 4096, 0, 1),
                     local.flush("v", 0, 0)):
            with pytest.raises(rk.ReplicaFailed) as e:
                await call
            assert e.value.kind == rk.DENIED
        with pytest.raises(rk.ReplicaFailed) as e:
            local.write_now("v", 0, 0, b"a" * 4096, 0, 1)
        assert e.value.kind == rk.DENIED
        assert store.ran == []
        await local.read("v", 0, 0, 4096, 0, 3)
        await local.write("v", 0, 0, b"a" * 4096, 5, 1)
        assert store.ran == ["read", "admit 5", "write"]
    asyncio.run(main())


def test_min_write_replicas_holds_for_every_write_not_only_the_one_that_saw_the_failure():
    """W1 sees B and C fail and fails itself ("only 1 replica left"), leaving the extent on
    A alone. W2 (general path) and W3 (fast path) were then acknowledged on that one copy,
    although min_write_replicas is 2. Both fail now; the fast path declines (nothing done)
    and the general path gives the error."""
    async def main():
        reps = {k: _MemReplica(k) for k in "ABC"}
        coord = _mem_coordinator(reps, ["A", "B", "C"])
        coord.engine.min_write_replicas = 2
        reps["B"].fail = reps["C"].fail = rk.UNAVAILABLE
        with pytest.raises(MediumError, match="only 1 replica"):
            await coord.write(0, b"1" * 4096)
        assert coord.extents[0].replicas == ["A"]
        with pytest.raises(MediumError, match="only 1 replica"):
            await coord.write(4096, b"2" * 4096)                      # general path
        assert coord.write_nowait(8192, b"3" * 4096) is None          # fast path: declined
        with pytest.raises(MediumError, match="only 1 replica"):
            await coord.unmap(0, 4096)
    asyncio.run(main())


def test_a_fast_write_settling_after_its_extent_fell_below_min_write_replicas_fails():
    """A fast-path write left on A, B and C; before the replies, another write's failures
    dropped B and C (the record now lists A alone). It is no longer on min_write_replicas
    in-sync replicas: not acknowledged."""
    async def main():
        from zstore.records import ExtentRecord
        reps = {k: _MemReplica(k, delay=0.02) for k in "ABC"}
        coord = _mem_coordinator(reps, ["A", "B", "C"])
        coord.engine.min_write_replicas = 2
        fut = coord.write_nowait(0, b"f" * 4096)
        assert fut is not None
        coord._adopt(ExtentRecord("v", 0, ["A"], 5, {"B": 5, "C": 5}))   # noqa: SLF001
        with pytest.raises(MediumError, match="only 1 replica"):
            await asyncio.wait_for(fut, 2)
        coord._adopt(ExtentRecord("v", 0, ["A", "B"], 6, {"C": 5}))      # noqa: SLF001 - B back
        assert coord.write_nowait(0, b"g" * 4096) is not None
    asyncio.run(main())


def test_min_write_replicas_above_the_volumes_replica_count_leaves_it_writable():
    """min_write_replicas is at most the volume's replica count: a 1-replica volume on a
    server configured for 2 stays writable (on both paths)."""
    async def main():
        reps = {k: _MemReplica(k) for k in "A"}
        coord = _mem_coordinator(reps, ["A"])
        coord.volume.replicas = 1
        coord.engine.min_write_replicas = 2
        await coord.write(0, b"1" * 4096)
        fut = coord.write_nowait(4096, b"2" * 4096)
        assert fut is not None
        await fut
    asyncio.run(main())


class _DialingReplica(_SrvReplica):
    """A remote replica with no connection yet: a request sent dials on await and leaves
    once connected (as ``RemoteReplica.start_write`` does); ``connect`` dials alone."""

    def __init__(self, cid: str, dial: float) -> None:
        super().__init__(cid)
        self.connected, self.dial, self.dialling = False, dial, 0

    async def connect(self) -> None:
        self.dialling += 1
        await asyncio.sleep(self.dial)
        self.connected = True

    def start_write(self, vid, idx, off, data, epoch, seq, fua=False, sole=False):
        if self.connected:
            return super().start_write(vid, idx, off, data, epoch, seq, fua, sole=sole)

        async def dial_then_send():
            await self.connect()
            await super(_DialingReplica, self).start_write(vid, idx, off, data, epoch, seq, fua,
                                                           sole=sole)
        return dial_then_send()


def test_a_write_to_a_replica_not_yet_connected_is_not_sent_after_the_lease_deadline(monkeypatch):
    """C has no connection yet. Its write once dialled on await and went out when connected,
    at the epoch and seq read before the dial: a connect outlasting the lease deadline put
    the write inside a snapshot the meta may have committed by itself meanwhile. Now the
    coordinator dials first and looks at ownership again before anything leaves."""
    async def main():
        reps = {k: _SrvReplica(k) for k in "AB"}
        reps["C"] = _DialingReplica("C", dial=0.2)
        coord, lease, acquired = _setup(monkeypatch, reps, 0.01, snap_seq=6)
        old_seq = coord.seq
        w = asyncio.create_task(coord.write(0, b"w" * 4096))
        await _until(lambda: reps["C"].dialling == 1)              # connecting
        lease.lease_deadline = time.monotonic() - 1                 # the lease may have lapsed
        await _until(lambda: reps["C"].connected)
        await asyncio.sleep(0.05)
        assert not w.done()
        assert all(e[2] != old_seq for r in reps.values() for e in r.epochs), \
            [r.epochs for r in reps.values()]
        lease.lease_gen, lease.lease_deadline = 2, time.monotonic() + 60    # a new lease
        await asyncio.wait_for(w, 2)
        assert acquired and coord.seq == 6
        assert all(r.epochs == [("write", 8, 6)] for r in reps.values())
        assert coord.extents[0].replicas == ["A", "B", "C"]
    asyncio.run(main())
