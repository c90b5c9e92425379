"""Coordinator pieces that need no cluster: the write gate snapshots and reverts close, the
range locks a copy holds, flush ordering and taking ownership. The last two drive a real
Coordinator over a stand-in engine (only ``replica``, ``etcd.get_prefix`` and ``keys`` are
used there); tests/chunk/storage/test_replication.py runs the same code on a real cluster."""

from __future__ import annotations

import asyncio

import pytest

from chunk.storage import coordinator as coordinator_module
from chunk.storage.coordinator import Coordinator, RangeLocks, WriteGate
from zstore.records import ExtentRecord, Volume


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
    chunk_id = "c1"

    def __init__(self, replica=None, etcd=None) -> None:
        self.rep, self.etcd = replica, etcd

    async def replica(self, chunk_id):
        return self.rep

    class keys:                                         # noqa: N801 - stands in for KeyLayout
        @staticmethod
        def extents(vid):
            return f"/extents/{vid}/"


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
        calls = 0

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
