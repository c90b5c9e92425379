"""Coordinator pieces that need no cluster: the write gate snapshots and reverts close, and
the range locks a copy holds."""

from __future__ import annotations

import asyncio

import pytest

from chunk.storage.coordinator import RangeLocks, WriteGate


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
