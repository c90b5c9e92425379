"""Coordinator pieces that need no cluster: the write gate snapshots and reverts close, the
range locks, flush ordering, taking ownership, a resync's join and overlapping writes. The
later ones drive a real Coordinator over stand-ins for the engine, the meta and the replicas
(in-memory: offset -> bytes, applied in arrival order); tests/chunk/storage/test_replication.py
runs the same code on a real cluster."""

from __future__ import annotations

import asyncio

import msgpack
import pytest

from chunk.storage import coordinator as coordinator_module
from chunk.storage.coordinator import Coordinator, RangeLocks, WriteGate
from chunk.storage.coordinator import EXTENT_SIZE, MediumError
from zstore.keys import Keys
from zstore.records import ExtentRecord, RecoveryTask, Volume, VolumeOwner


async def _barrier(gate: WriteGate, held: asyncio.Event, release: asyncio.Event) -> None:
    async with gate:
        held.set()
        await release.wait()


def test_barrier_waits_for_writes_in_flight_and_holds_new_ones():
    async def main():
        gate = WriteGate()
        assert gate.try_enter() and gate.try_enter()
        held, release = asyncio.Event(), asyncio.Event()
        barrier = asyncio.create_task(_barrier(gate, held, release))
        await asyncio.sleep(0.01)
        assert not held.is_set()                       # two writes still in flight
        assert not gate.try_enter()                    # closed to new writes meanwhile
        gate.leave()
        await asyncio.sleep(0.01)
        assert not held.is_set()
        gate.leave()
        await asyncio.wait_for(held.wait(), 1)         # the last one out lets it in
        waiter = asyncio.create_task(gate.enter())     # a general-path write waits
        await asyncio.sleep(0.01)
        assert not waiter.done() and not gate.try_enter()
        release.set()
        await barrier
        await asyncio.wait_for(waiter, 1)              # reopened: the waiter entered
        assert gate.try_enter()
        gate.leave()
        gate.leave()
        async with gate:                               # idle: the barrier does not wait
            pass
    asyncio.run(main())


def test_a_barrier_cancelled_while_waiting_reopens_the_gate():
    async def main():
        gate = WriteGate()
        assert gate.try_enter()
        barrier = asyncio.create_task(_barrier(gate, asyncio.Event(), asyncio.Event()))
        await asyncio.sleep(0.01)
        assert not gate.try_enter()
        barrier.cancel()
        with pytest.raises(asyncio.CancelledError):
            await barrier
        assert gate.try_enter()                        # open again, and the lock is free
        gate.leave()
        gate.leave()
        async with gate:
            pass
    asyncio.run(main())


def test_barriers_take_turns():
    async def main():
        gate = WriteGate()
        order = []

        async def snap(name):
            async with gate:
                order.append(name + "+")
                await asyncio.sleep(0.01)
                order.append(name + "-")
        await asyncio.gather(snap("a"), snap("b"))
        assert order == ["a+", "a-", "b+", "b-"]
        assert gate.try_enter()
    asyncio.run(main())


def test_a_copy_holds_its_range_and_writes_elsewhere_go_on():
    async def main():
        locks = RangeLocks()
        t = locks.try_begin(3, 0, 4096)
        hold = asyncio.create_task(locks.hold(3, 0, 8192))
        await asyncio.sleep(0.01)
        assert not hold.done()                          # a write in flight there
        assert locks.try_begin(3, 4096, 8192) is None   # held: the fast path declines
        other = locks.try_begin(3, 8192, 12288)         # outside the held range
        assert other is not None
        locks.end(3, t)
        await asyncio.wait_for(hold, 1)
        waiter = asyncio.create_task(locks.begin(3, 0, 4096))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        locks.release(3)
        locks.end(3, await asyncio.wait_for(waiter, 1))
        locks.end(3, other)
    asyncio.run(main())


def test_a_hold_cancelled_while_waiting_releases_its_range():
    async def main():
        locks = RangeLocks()
        t = locks.try_begin(1, 0, 4096)
        hold = asyncio.create_task(locks.hold(1, 0, 4096))
        await asyncio.sleep(0.01)
        hold.cancel()
        with pytest.raises(asyncio.CancelledError):
            await hold
        locks.end(1, t)
        again = locks.try_begin(1, 0, 4096)             # not left held by the cancelled copy
        assert again is not None
        locks.end(1, again)
        await asyncio.wait_for(locks.hold(1, 0, 4096), 1)
        locks.release(1)
    asyncio.run(main())


class _Replica:
    """Flushes only when the test opens ``gate``."""

    def __init__(self) -> None:
        self.gate, self.flushed = asyncio.Event(), []

    async def flush(self, vid, idx, epoch) -> None:
        await self.gate.wait()
        self.flushed.append(idx)


class _Engine:
    chunk_id, lease, min_write_replicas = "c1", None, 1

    def __init__(self, replica=None, etcd=None) -> None:
        self.rep, self.etcd = replica, etcd if etcd is not None else _NoRecords()

    @property
    def owner_reads(self):
        return OwnerReadsOf(self)

    async def replica(self, chunk_id):
        return self.rep

    class keys:                                         # noqa: N801 - stands in for KeyLayout
        @staticmethod
        def extents(vid):
            return f"/extents/{vid}/".encode()          # bytes, as KeyLayout's are

        @staticmethod
        def owner(vid):
            return f"/owners/{vid}".encode()


def _coordinator(engine) -> Coordinator:
    c = Coordinator(engine, Volume(volume_id="v1", name="v1", size=1 << 30, replicas=1))
    c._is_ready = True                                  # noqa: SLF001 - no _open: no etcd here
    return c


def test_a_second_flush_waits_for_the_first_and_a_cancelled_one_keeps_its_extents():
    async def main():
        rep = _Replica()
        c = _coordinator(_Engine(rep))
        c.epoch = 1
        c.extents[0] = ExtentRecord(volume_id="v1", index=0, replicas=["c1"], generation=1)
        c._unflushed.add(0)                             # noqa: SLF001 - an acknowledged write
        first = asyncio.create_task(c.flush())
        await asyncio.sleep(0.01)
        second = asyncio.create_task(c.flush())         # SYNCHRONIZE CACHE from another queue
        await asyncio.sleep(0.01)
        assert not second.done()                        # not GOOD before extent 0 is durable
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await asyncio.sleep(0.01)
        assert not second.done()                        # it took extent 0 back up, still waiting
        rep.gate.set()
        await asyncio.wait_for(second, 1)
        assert rep.flushed == [0] and not c._unflushed  # noqa: SLF001
    asyncio.run(main())


def test_ownership_is_not_kept_when_reading_the_extent_map_fails(monkeypatch):
    class Etcd:
        """Every read of the extent map fails: the one-Range listing and the paged one
        (``zetcd.get_prefix_paged``: ``connect``, then Range calls on ``kvstub``)."""
        calls = 0
        _timeout, metadata = 5.0, None

        def __init__(self) -> None:
            self.kvstub = self

        async def connect(self):
            pass

        async def Range(self, req, timeout=None, metadata=None):  # noqa: N802 - etcd's KV stub
            self.calls += 1
            raise ConnectionError("etcd timed out")

        async def get_prefix(self, prefix):
            self.calls += 1
            raise ConnectionError("etcd timed out")

    async def acquire(etcd, keys, vid, chunk_id):
        return 7, 100, Volume(volume_id=vid, name=vid, size=1 << 30, replicas=1)

    monkeypatch.setattr(coordinator_module.ownership, "acquire", acquire)

    async def main():
        etcd = Etcd()
        c = _coordinator(_Engine(etcd=etcd))
        for attempt in (1, 2):                          # no epoch left behind: tried again
            with pytest.raises(ConnectionError):
                await c.ensure_owner()
            assert c.epoch == 0 and etcd.calls == attempt
    asyncio.run(main())


def test_a_failed_open_is_tried_again_by_the_next_io():
    class Etcd:
        calls = 0

        async def get(self, key):
            self.calls += 1
            if self.calls == 1:
                raise ConnectionError("etcd timed out")
            return None                                 # then: the source snapshot is gone

    class Engine(_Engine):
        started = asyncio.Event()

        class keys(_Engine.keys):                       # noqa: N801
            @staticmethod
            def snapshot(sid):
                return f"/snapshots/{sid}"

    async def main():
        Engine.started.set()
        etcd = Etcd()
        c = Coordinator(Engine(etcd=etcd), Volume(volume_id="clone", name="clone", size=1 << 30,
                                                  replicas=1, source_snapshot="s1"))
        with pytest.raises(ConnectionError):
            await c.ready()
        with pytest.raises(coordinator_module.MediumError, match="is gone"):
            await c.ready()                             # not the first error again: a new try
        assert etcd.calls == 2
    asyncio.run(main())


def test_overlapping_writes_wait_for_each_other_and_others_do_not():
    async def main():
        locks = RangeLocks()
        t = locks.try_begin(0, 0, 8192)
        assert locks.try_begin(0, 4096, 12288) is None          # overlaps: the fast path declines
        other = locks.try_begin(0, 8192, 12288)                 # touching, not overlapping
        assert other is not None and locks.try_begin(1, 0, 8192) is not None
        waiter = asyncio.create_task(locks.begin(0, 0, 4096))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        locks.end(0, t)
        locks.end(0, await asyncio.wait_for(waiter, 1))
        locks.end(0, other)
    asyncio.run(main())


class _MemReplica:
    """A replica in memory: writes and unmaps apply when they arrive, replies come later."""

    def __init__(self, chunk_id: str, delay: float = 0.002) -> None:
        self.chunk_id, self.delay, self.connected = chunk_id, delay, True
        self.state: dict[int, bytes] = {}
        self.fail: str | None = None

    def start_write(self, vid, idx, off, data, epoch, seq, fua=False, sole=False):
        async def reply():
            if self.fail:
                from chunk.storage import replicas as rk
                raise rk.ReplicaFailed(self.chunk_id, self.fail, "injected")
            self.state[off] = bytes(data)
            await asyncio.sleep(self.delay)
        return reply()

    def send_write(self, vid, idx, off, data, epoch, seq, on_reply, sole=False):
        self.state[off] = bytes(data)
        asyncio.get_running_loop().call_later(self.delay, on_reply, None)
        return True

    def outcome_of(self, reply):
        return None

    async def unmap(self, vid, idx, off, n, epoch, seq, zero=False, sole=False):
        self.state[off] = bytes(n)
        await asyncio.sleep(self.delay)

    async def create(self, *args):
        pass

    async def flush(self, *args):
        pass

    async def export(self, vid, idx, pos, n, epoch=0):
        # A real blob's framing (a msgpack map, format 1): the coordinator looks for blocks
        # the exporter marked unreadable in it.
        return msgpack.packb({"format": 1, "lo": pos, "hi": pos + n,
                              "data": [[k, v] for k, v in self.state.items() if pos <= k < pos + n]}), None

    async def import_(self, vid, idx, blob, epoch):
        got = msgpack.unpackb(blob)
        data, lo, hi = dict(got["data"]), got["lo"], got["hi"]
        for k in [k for k in self.state if lo <= k < hi]:
            del self.state[k]
        self.state.update(data)

    async def digest(self, vid, idx):
        await asyncio.sleep(0)
        return sorted(self.state.items())

    async def setgen(self, *args):
        await asyncio.sleep(0.02)


class _Meta:
    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord

    async def call(self, method, path, body):
        await asyncio.sleep(0.01)
        idx = int(path.split("/")[3])
        rec = self.coord.extents[idx]
        new = ExtentRecord(rec.volume_id, idx, list(rec.replicas), rec.generation + 1, dict(rec.stale))
        if path.endswith("/join"):
            new.replicas.append(body["chunk_id"])
            new.stale.pop(body["chunk_id"], None)
        if path.endswith("/drop"):
            new.replicas.remove(body["chunk_id"])
            new.stale[body["chunk_id"]] = new.generation
        return {"extent": new.to_dict()}


class _NoRecords:
    """etcd as a fresh read sees it here: no record (the coordinator's own map is the truth)."""

    async def get(self, key):
        return None


class OwnerReadsOf:
    """``OwnerReads``' interface over a fake engine's ``etcd.get`` (the real one batches its
    reads in etcd transactions: test_owner_reads.py)."""

    def __init__(self, engine) -> None:
        self.engine = engine

    async def epoch(self, vid: str) -> int | None:
        got = await self.engine.etcd.get(self.engine.keys.owner(vid))
        return None if got is None else VolumeOwner.decode(got.value).epoch


class _MemEngine:
    chunk_id, replicas_version, min_write_replicas, lease = "me", 1, 1, None
    etcd, keys = _NoRecords(), Keys("/test")

    @property
    def owner_reads(self):
        return OwnerReadsOf(self)

    def __init__(self, reps) -> None:
        self.reps = reps

    async def replica(self, chunk_id):
        return self.reps[chunk_id]

    def cached_replicas(self, chunk_ids):
        return [self.reps[c] for c in chunk_ids]

    def forget_peer(self, chunk_id):
        pass

    async def report_progress(self, task, rev, done, total):
        return rev

    async def chunk_ids(self):
        return sorted(self.reps)


def _mem_coordinator(reps: dict, replicas: list[str]) -> Coordinator:
    c = Coordinator(_MemEngine(reps), Volume(volume_id="v", name="v", size=EXTENT_SIZE, replicas=3))
    c._is_ready, c.epoch = True, 7                      # noqa: SLF001
    c.extents[0] = ExtentRecord("v", 0, list(replicas), 3, {})
    c.engine.meta = _Meta(c)
    return c


def test_a_write_during_a_resyncs_join_waits_and_reaches_the_joined_replica():
    """Between the digest that proves the target equal and the join, the extent is held: a
    write arriving then (here: while the target's SETGEN runs) waits, and lands on the
    joined replica too; a target failing such a write can no longer join unseen."""
    async def main():
        a, b, c = _MemReplica("A"), _MemReplica("B"), _MemReplica("C")
        coord = _mem_coordinator({"A": a, "B": b, "C": c}, ["A", "B"])
        coord.extents[0].stale = {"C": 2}
        writes = []
        setgen = c.setgen

        async def setgen_then_write(*args):
            writes.append(asyncio.create_task(coord.write(4096, b"\x55" * 4096)))
            await asyncio.sleep(0.01)
            assert not writes[0].done()                 # held until the join
            await setgen(*args)
        c.setgen = setgen_then_write
        await coord.run_recovery(RecoveryTask("v", 0, "C", "resync", "me", 3), 1, 0)
        await asyncio.wait_for(writes[0], 1)
        assert coord.extents[0].replicas == ["A", "B", "C"]
        assert a.state[4096] == b.state[4096] == c.state[4096] == b"\x55" * 4096
    asyncio.run(main())


def test_a_recovery_target_whose_copy_does_not_open_gets_a_fresh_one_copied_in_full():
    """A resync target holds a copy that does not open (its CREATE answers an I/O error):
    the recovery asks for a fresh replica in its place and copies the whole extent, not
    only the dirty blocks, which would sit on nothing; then it joins."""
    async def main():
        from chunk.storage import replicas as rk
        from chunk.storage.coordinator import Dirty
        a, b, c = _MemReplica("A"), _MemReplica("B"), _MemReplica("C")
        a.state = {0: b"\x01" * 4096, 8192: b"\x02" * 4096}
        b.state = dict(a.state)
        coord = _mem_coordinator({"A": a, "B": b, "C": c}, ["A", "B"])
        coord.extents[0].stale = {"C": 2}
        coord._dirty[(0, "C")] = Dirty(2, coord.seq, {2})  # noqa: SLF001 - only block 2 written
        calls = []

        async def create(vid, idx, epoch, generation, discard_broken=False):
            calls.append(discard_broken)
            if not discard_broken:
                raise rk.ReplicaFailed("C", rk.IO, "extent is here but unusable")
        c.create = create
        await coord.run_recovery(RecoveryTask("v", 0, "C", "resync", "me", 3), 1, 0)
        assert calls == [False, True]
        assert c.state == a.state and coord.extents[0].replicas == ["A", "B", "C"]
    asyncio.run(main())


def test_a_recovery_reads_the_extent_record_fresh_before_calling_the_target_in_sync():
    """The coordinator's extent map follows etcd by watch and may lag: it still lists the
    target in sync (generation 3) while etcd has dropped it (generation 4). The task must
    not end as done on that view; the copy runs and the target joins."""
    async def main():
        a, b, c = _MemReplica("A"), _MemReplica("B"), _MemReplica("C")
        a.state = {0: b"\x07" * 4096}
        b.state = dict(a.state)
        coord = _mem_coordinator({"A": a, "B": b, "C": c}, ["A", "B", "C"])
        fresh = ExtentRecord("v", 0, ["A", "B"], 4, {"C": 3})

        class Etcd:
            async def get(self, key):
                return type("KV", (), {"value": fresh.encode()})() if key == coord.engine.keys.extent("v", 0) else None
        coord.engine.etcd = Etcd()
        await coord.run_recovery(RecoveryTask("v", 0, "C", "resync", "me", 4), 1, 0)
        assert c.state == a.state and coord.extents[0].replicas == ["A", "B", "C"]
        assert coord.extents[0].generation == 5
    asyncio.run(main())


class _FencedReplica(_MemReplica):
    """A replica server's per-volume epoch fence, as the store keeps it."""

    def __init__(self, chunk_id: str, highest: int = 0, down: bool = False) -> None:
        super().__init__(chunk_id)
        self.highest, self.down = highest, down

    async def fence(self, vid, idx, epoch):
        from chunk.storage import replicas as rk
        if self.down:
            raise rk.ReplicaFailed(self.chunk_id, rk.UNAVAILABLE, "no answer")
        if epoch < self.highest:
            raise rk.ReplicaFailed(self.chunk_id, rk.STALE_EPOCH, f"seen {self.highest}")
        self.highest = epoch


def test_before_a_snapshot_every_server_is_fenced_and_one_that_does_not_answer_is_dropped():
    """A deposed owner could go on writing at the old seq to replicas the new owner never
    touched, into the snapshot about to be committed. _fence_all raises the epoch on every
    server (those holding nothing of the volume too: a new extent could be made there),
    drops a silent one from the extents where another replica was fenced, and refuses the
    snapshot where none was, or where another server already took the volume over."""
    async def main():
        from chunk.storage.coordinator import FencedError
        reps = {c: _FencedReplica(c, highest=5) for c in "ABC"}
        reps["D"] = _FencedReplica("D", highest=5, down=True)
        coord = _mem_coordinator(reps, ["A", "D"])                  # extent 0 on A and D
        coord.extents[1] = ExtentRecord("v", 1, ["B"], 3, {})
        await coord._fence_all()                                    # noqa: SLF001
        assert [reps[c].highest for c in "ABC"] == [7, 7, 7]
        assert coord.extents[0].replicas == ["A"] and coord.extents[1].replicas == ["B"]
        reps["B"].down = True                                       # extent 1's only replica
        with pytest.raises(MediumError, match="no replica could be fenced"):
            await coord._fence_all()                                # noqa: SLF001
        reps["B"].down = False
        reps["C"].highest = 9                                       # another owner since
        with pytest.raises(FencedError):
            await coord._fence_all()                                # noqa: SLF001
    asyncio.run(main())


def test_an_unmap_in_flight_keeps_an_overlapping_fast_write_out_so_replicas_agree():
    async def main():
        reps = {k: _MemReplica(k, 0.01) for k in "ABC"}
        coord = _mem_coordinator(reps, ["A", "B", "C"])
        unmap = asyncio.create_task(coord.unmap(0, 4096))
        await asyncio.sleep(0.005)                      # sent to A, waiting for its reply
        assert coord.write_nowait(0, b"\x77" * 4096) is None
        write = asyncio.create_task(coord.write(0, b"\x77" * 4096))
        await asyncio.gather(unmap, write)
        assert len({r.state[0] for r in reps.values()}) == 1     # one order on every replica
    asyncio.run(main())


class _Lease:
    def __init__(self) -> None:
        self.lease_deadline, self.lease_gen = 0.0, 1


def test_no_write_starts_while_the_lease_may_have_lapsed_and_a_new_lease_retakes_ownership(monkeypatch):
    """A server whose etcd lease may have expired (the meta then treats it as down and may
    snapshot or hand out its volumes) starts no write: the fast path declines, the general
    path waits. Under a new lease, ownership is taken again: a new epoch, the current seq."""
    import time
    acquired = []

    async def acquire(etcd, keys, vid, chunk_id):
        acquired.append(vid)
        return 7 + len(acquired), 100 + len(acquired), Volume(volume_id=vid, name=vid, size=EXTENT_SIZE,
                                                              replicas=3, snap_seq=1 + len(acquired))
    monkeypatch.setattr(coordinator_module.ownership, "acquire", acquire)

    async def main():
        reps = {k: _MemReplica(k) for k in "ABC"}
        coord = _mem_coordinator(reps, ["A", "B", "C"])

        async def no_refresh():
            pass
        coord._refresh_extents = no_refresh                 # noqa: SLF001 - the map is set up here
        lease = coord.engine.lease = _Lease()
        coord.epoch = 0
        write = asyncio.create_task(coord.write(0, b"a" * 4096))
        await asyncio.sleep(0.3)
        assert not write.done() and not acquired              # waiting for the lease
        lease.lease_deadline = time.monotonic() + 30
        await asyncio.wait_for(write, 2)
        assert acquired and coord.epoch == 8 and coord.seq == 2
        assert coord.write_nowait(4096, b"b" * 4096) is not None        # fresh lease: fast path
        await asyncio.sleep(0.05)
        lease.lease_gen += 1                                  # the lease lapsed and was granted anew
        assert coord.write_nowait(8192, b"c" * 4096) is None
        await coord.write(8192, b"c" * 4096)
        assert coord.epoch == 9 and coord.seq == 3 and len(acquired) == 2
        lease.lease_deadline = time.monotonic() - 1
        assert coord.write_nowait(0, b"d" * 4096) is None
    asyncio.run(main())


def test_a_dirty_resync_copies_writes_made_while_it_starts_without_a_full_copy():
    """Writes that leave while a dirty-block resync starts (during the target's CREATE round
    trip, the fast path still open) miss the target and enter the dirty log only when they
    end. The copy reads the log once they have ended, so it sends them too: the digests
    agree at once, with no fallback to a full copy (64 pieces of 1 MiB) under write load."""
    async def main():
        from chunk.storage.coordinator import Dirty
        a, b, c = _MemReplica("A"), _MemReplica("B"), _MemReplica("C")
        a.state = {0: b"\x01" * 4096, 8192: b"\x02" * 4096}
        b.state = dict(a.state)
        c.state = {0: b"\x01" * 4096}                              # missed block 2 while out
        coord = _mem_coordinator({"A": a, "B": b, "C": c}, ["A", "B"])
        coord.extents[0].stale = {"C": 2}
        coord._dirty[(0, "C")] = Dirty(2, coord.seq, {2})  # noqa: SLF001
        writes, imports = [], []

        async def create(*args, **kw):
            fast = coord.write_nowait(4 * 4096, b"\x44" * 4096)    # done before the copy
            assert fast is not None
            writes.append(fast)
            writes.append(asyncio.create_task(coord.write(6 * 4096, b"\x66" * 4096)))
            await asyncio.sleep(0)                               # sent, reply still on its way
            writes.append(coord.write_nowait(8 * 4096, b"\x88" * 4096))   # in flight at the copy
        c.create = create
        import_ = c.import_

        async def counted_import(*args):
            imports.append(args)
            await import_(*args)
        c.import_ = counted_import
        await coord.run_recovery(RecoveryTask("v", 0, "C", "resync", "me", 3), 1, 0)
        await asyncio.gather(*writes)
        assert len(imports) == 4, f"{len(imports)} imports: blocks 2, 4, 6, 8 are 4 (64 more: a full copy)"
        assert coord.counters["copy_full_fallbacks"] == 0
        assert c.state == a.state == b.state and 8 * 4096 in c.state
        assert coord.extents[0].replicas == ["A", "B", "C"]
    asyncio.run(main())


def test_a_refused_join_never_reports_the_copy_as_complete():
    """The join (or the digest) can still fail after the last byte is copied: the task then
    goes back to pending and must not show done_bytes == total_bytes. Full progress is the
    join itself, which deletes the task."""
    async def main():
        from chunk.storage.metaclient import MetaError
        a, b, c = _MemReplica("A"), _MemReplica("B"), _MemReplica("C")
        a.state = {0: b"\x07" * 4096}
        b.state = dict(a.state)
        coord = _mem_coordinator({"A": a, "B": b, "C": c}, ["A", "B"])
        coord.extents[0].stale = {"C": 2}
        reports = []

        async def report_progress(task, rev, done, total):
            reports.append((done, total))
            return rev
        coord.engine.report_progress = report_progress

        class Refusing:
            async def call(self, method, path, body):
                raise MetaError(409, "epoch 7 no longer owns the volume")
        coord.engine.meta = Refusing()
        with pytest.raises(MediumError, match="refused"):
            await coord.run_recovery(RecoveryTask("v", 0, "C", "rebuild", "me", 3), 1, 0)
        assert all(done < total for done, total in reports), reports
    asyncio.run(main())


def test_retaking_ownership_after_a_lease_lapse_drops_dirty_logs_when_another_server_owned_it(monkeypatch):
    """A lapsed lease makes the coordinator take ownership again without being fenced. If the
    epoch it gets is not its last + 1, another server owned the volume in between and may
    have written without the dirty logs: they are dropped (a full copy follows). If it is,
    nobody did, and the logs stay."""
    import time
    from chunk.storage.coordinator import Dirty
    epochs = [8, 10]                             # 8: ours + 1; 10: someone took 9 meanwhile

    async def acquire(etcd, keys, vid, chunk_id):
        return epochs.pop(0), 100, Volume(volume_id=vid, name=vid, size=EXTENT_SIZE, replicas=3)
    monkeypatch.setattr(coordinator_module.ownership, "acquire", acquire)

    async def main():
        reps = {k: _MemReplica(k) for k in "ABC"}
        coord = _mem_coordinator(reps, ["A", "B"])
        coord._taken_epoch = 7                              # noqa: SLF001 - as _acquire would

        async def no_refresh():
            pass
        coord._refresh_extents = no_refresh                 # noqa: SLF001
        lease = coord.engine.lease = _Lease()
        lease.lease_deadline, coord._lease_gen = time.monotonic() + 30, 1    # noqa: SLF001
        coord._dirty[(0, "C")] = Dirty(2, coord.seq, {1})   # noqa: SLF001
        lease.lease_gen += 1                                # lapsed, granted anew: nobody between
        await coord.write(0, b"a" * 4096)
        assert coord.epoch == 8 and coord._dirty[(0, "C")].blocks == {0, 1}    # noqa: SLF001
        lease.lease_gen += 1                                # lapsed again: another owner between
        await coord.write(4096, b"b" * 4096)
        assert coord.epoch == 10 and not coord._dirty       # noqa: SLF001
    asyncio.run(main())


def test_a_new_owner_flushes_every_extent_the_previous_owner_may_have_left_unflushed(monkeypatch):
    """SYNCHRONIZE CACHE through a server that took the volume over (failover, multipath
    across servers) once synced only what that server itself had written: GOOD with the
    previous owner's acknowledged writes still in the replicas' page cache."""
    epochs = [5, 6]

    async def acquire(etcd, keys, vid, chunk_id):
        return epochs.pop(0), 100, Volume(volume_id=vid, name=vid, size=1 << 30, replicas=1)
    monkeypatch.setattr(coordinator_module.ownership, "acquire", acquire)

    async def main():
        rep = _Replica()
        rep.gate.set()
        c = _coordinator(_Engine(rep))

        async def refresh():
            for idx in (0, 3):
                c.extents[idx] = ExtentRecord(volume_id="v1", index=idx, replicas=["c1"], generation=1)
        c._refresh_extents = refresh                    # noqa: SLF001 - the map etcd would give
        await c.ensure_owner()                          # epoch 5: another server owned 1..4
        await c.flush()
        assert sorted(rep.flushed) == [0, 3]
        rep.flushed.clear()
        c.epoch = 0                                     # lease lapse: taken again, 6 = ours + 1
        await c.ensure_owner()
        await c.flush()
        assert rep.flushed == []                        # nothing new since our own flush
    asyncio.run(main())


def _fenced_coordinator(monkeypatch, snap_seq: int, fenced: str):
    """Replicas A, B, C at seq 4 with ``fenced`` refusing our epoch (another owner fenced them);
    retaking ownership (no pause) un-fences them and reads the volume at ``snap_seq``."""
    from chunk.storage import replicas as rk

    async def acquire(etcd, keys, vid, chunk_id):
        return 9, 100, Volume(volume_id=vid, name=vid, size=EXTENT_SIZE, replicas=3, snap_seq=snap_seq)
    monkeypatch.setattr(coordinator_module.ownership, "acquire", acquire)
    reps = {k: _MemReplica(k) for k in "ABC"}
    coord = _mem_coordinator(reps, ["A", "B", "C"])
    coord.seq = 4

    async def no_refresh():
        pass
    coord._refresh_extents = no_refresh                 # noqa: SLF001
    for k in fenced:
        reps[k].fail = rk.STALE_EPOCH

    async def retake(lost, attempt, deadline):          # what _retake does, minus the pause
        for k in fenced:
            reps[k].fail = None
        coord.epoch = 0
        await coord.ensure_owner()
    coord._retake = retake                              # noqa: SLF001
    return coord, reps


def test_a_fenced_write_that_a_snapshot_split_drops_the_replicas_on_the_smaller_side(monkeypatch):
    """A deposed owner's write lands on A (not yet fenced) and is refused by B and C (fenced by
    the new owner, who then commits a snapshot). Retaking ownership gives a higher seq: the
    snapshot holds the write on A only, and repeating it at the new seq cannot change that.
    Before, all three were kept and the snapshot read differently depending on the replica."""
    async def main():
        coord, reps = _fenced_coordinator(monkeypatch, snap_seq=5, fenced="BC")
        await coord.write(0, b"x" * 4096)
        assert coord.seq == 5 and coord.extents[0].replicas == ["B", "C"]
        assert all(r.state[0] == b"x" * 4096 for r in (reps["B"], reps["C"]))   # the repeat landed
    asyncio.run(main())


def test_a_fenced_write_without_a_snapshot_in_between_keeps_every_replica(monkeypatch):
    async def main():
        coord, _ = _fenced_coordinator(monkeypatch, snap_seq=4, fenced="C")
        await coord.write(0, b"y" * 4096)
        assert coord.extents[0].replicas == ["A", "B", "C"]
    asyncio.run(main())


class _Lost(_MemReplica):
    """A replica whose copy of the extent is gone (its disk not mounted, or replaced)."""

    def __init__(self, chunk_id: str) -> None:
        super().__init__(chunk_id)
        from chunk.storage import replicas as rk
        self.fail, self.created = rk.NO_EXTENT, 0

    async def create(self, *args):
        self.created += 1

    async def read(self, vid, idx, off, length, epoch, view=0):
        from chunk.storage import replicas as rk
        raise rk.ReplicaFailed(self.chunk_id, rk.NO_EXTENT, "no such extent")


def test_an_extent_every_copy_of_which_is_lost_is_an_error_not_recreated_empty():
    """Every in-sync replica of an extent whose replica set changed since allocation answers
    NO_EXTENT: it was created and written, so that is loss, not "not created yet". It was once
    CREATEd empty and written over, and reads gave zeros for everything written before."""
    async def main():
        reps = {k: _Lost(k) for k in "AB"}
        coord = _mem_coordinator(reps, ["A", "B"])
        coord.engine.local_store_for = lambda rec: None     # no local replica: reads go remote
        coord.engine.cached_replica = reps.get
        coord.extents[0] = ExtentRecord("v", 0, ["A", "B"], 3, {"C": 2})
        with pytest.raises(MediumError, match="no in-sync replica has it"):
            await coord.write(0, b"z" * 4096)
        assert reps["A"].created == reps["B"].created == 0
        with pytest.raises(MediumError, match="no in-sync replica has it"):
            await coord.read(0, 4096)
        # as allocated (generation 1, nothing dropped): not created yet, so created now
        coord.extents[0] = ExtentRecord("v", 0, ["A", "B"], 1, {})
        assert await coord.read(0, 4096) == bytes(4096)
        for r in reps.values():
            r.fail = None
        await coord.write(0, b"z" * 4096)
    asyncio.run(main())


def test_a_flush_that_cannot_read_the_owner_record_is_not_ready_not_a_medium_error():
    """SYNCHRONIZE CACHE reads the owner record (is the volume still ours?): etcd unreachable
    then is NOT READY, which hosts retry, not a medium error (nothing failed on the disks)."""
    from aetcd import exceptions as aetcd_exc
    from chunk.storage.coordinator import NotServing

    class Unreachable(_NoRecords):
        async def get(self, key):
            raise aetcd_exc.ConnectionFailedError("etcd down")

    async def main():
        rep = _Replica()
        rep.gate.set()
        c = _coordinator(_Engine(rep, etcd=Unreachable()))
        c.epoch = 1
        c.extents[0] = ExtentRecord(volume_id="v1", index=0, replicas=["c1"], generation=1)
        c._unflushed.add(0)                             # noqa: SLF001 - an acknowledged write
        with pytest.raises(NotServing):
            await c.flush()
        assert rep.flushed == [0]                       # the replicas were flushed all the same
    asyncio.run(main())


def test_a_fast_write_whose_local_cow_is_cancelled_is_cancelled_not_handed_off():
    """A stop cancels the task finishing the local replica's COW: the write is cancelled (the
    session gets no answer), its range and gate released; it is not handed to the failure
    path, which would take this server's own healthy replica for failed and drop it."""
    async def main():
        a = _MemReplica("A")
        c = _mem_coordinator({"A": a}, ["A"])
        assert c._gate.try_enter()                      # noqa: SLF001 - as write_nowait does
        token = c._locks.try_begin(0, 0, 4096)          # noqa: SLF001
        done = asyncio.get_running_loop().create_future()
        p = coordinator_module._PendingWrite(c, done, 0, 0, 4096, memoryview(bytes(4096)),  # noqa: SLF001
                                             c.extents[0], [a], 7, 1, token)
        p.left = 1
        local = asyncio.ensure_future(asyncio.sleep(30))
        local.add_done_callback(p.local_callback(0, a))
        local.cancel()
        await asyncio.wait_for(asyncio.gather(local, return_exceptions=True), 5)
        assert done.cancelled()
        assert c.counters["fast_write_handoffs"] == 0
        assert c._locks.try_begin(0, 0, 4096) is not None     # noqa: SLF001 - released
    asyncio.run(main())
