"""StorageEngine pieces that need no cluster: how assignments (volume ops, recovery tasks)
become tasks. The engine with real etcd and peers is exercised by test_replication.py."""

from __future__ import annotations

import asyncio

from chunk.storage.engine import StorageEngine


def _bare_engine() -> StorageEngine:
    eng = StorageEngine.__new__(StorageEngine)        # only what _spawn uses
    eng._running, eng._rerun, eng._stop = {}, {}, asyncio.Event()   # noqa: SLF001
    return eng


def test_an_assignment_arriving_while_its_task_runs_starts_it_again_once_it_ends():
    """The running task may have read the record just before the meta handed it back to this
    server, and end as "not ours": the new assignment must not be dropped as a duplicate.
    It never runs twice at once, and several arrivals meanwhile start it once more."""
    async def main():
        eng = _bare_engine()
        runs, gate = [], asyncio.Event()

        async def job(n):
            runs.append(n)
            await gate.wait()

        eng._spawn("recovery/v/0", lambda: job(1))                     # noqa: SLF001
        await asyncio.sleep(0)
        eng._spawn("recovery/v/0", lambda: job(2))                     # noqa: SLF001
        eng._spawn("recovery/v/0", lambda: job(3))                     # noqa: SLF001
        await asyncio.sleep(0.01)
        assert runs == [1]
        gate.set()
        for _ in range(50):
            if not eng._running:                                       # noqa: SLF001
                break
            await asyncio.sleep(0.01)
        assert runs == [1, 3] and not eng._running and not eng._rerun  # noqa: SLF001
    asyncio.run(main())


def test_nothing_starts_again_once_the_engine_stops():
    async def main():
        eng = _bare_engine()
        runs, gate = [], asyncio.Event()

        async def job(n):
            runs.append(n)
            await gate.wait()

        eng._spawn("op/x", lambda: job(1))                             # noqa: SLF001
        await asyncio.sleep(0)
        eng._spawn("op/x", lambda: job(2))                             # noqa: SLF001
        eng._stop.set()                                                # noqa: SLF001
        gate.set()
        await asyncio.sleep(0.05)
        assert runs == [1] and not eng._running                        # noqa: SLF001
    asyncio.run(main())
