"""StorageEngine pieces that need no cluster: how assignments (volume ops, recovery tasks)
become tasks, and how a recovery task's record is written (on the session's real etcd).
The engine with real etcd and peers is exercised by test_replication.py."""

from __future__ import annotations

import asyncio

import pytest

from chunk.storage.engine import StorageEngine
from zstore.keys import Keys
from zstore.records import RecoveryTask


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


def _etcd_engine(etcd_client, etcd_config) -> StorageEngine:
    eng = _bare_engine()
    eng.etcd, eng.keys, eng.chunk_id = etcd_client, Keys(etcd_config.prefix), "me"
    eng.recovery_rate = 0
    return eng


class _ReassignAfterTxn:
    """etcd whose next successful transaction is followed at once by the meta leader
    handing the task to another chunk server (before anything else reaches etcd)."""

    def __init__(self, etcd, key: bytes) -> None:
        self._etcd, self._key, self.armed = etcd, key, False
        self.transactions = etcd.transactions

    async def get(self, key):
        return await self._etcd.get(key)

    async def transaction(self, **kw):
        ok, responses = await self._etcd.transaction(**kw)
        if ok and self.armed:
            self.armed = False
            cur = RecoveryTask.decode((await self._etcd.get(self._key)).value)
            cur.executor = "other"
            await self._etcd.put(self._key, cur.encode())
        return ok, responses


async def test_progress_never_overwrites_a_reassignment_made_right_after_our_write(etcd_client, etcd_config):
    """The revision of the task write must be the write's own: read after it, it could be the
    reassignment's, and the next progress report would then put this server back as the
    executor over the meta's decision."""
    eng = _etcd_engine(etcd_client, etcd_config)
    key = eng.keys.recovery_task("v", 0)
    task = RecoveryTask("v", 0, "C", "resync", "me", 3)
    await etcd_client.put(key, task.encode())
    rev = (await etcd_client.get(key)).mod_revision
    eng.etcd = _ReassignAfterTxn(etcd_client, key)
    eng.etcd.armed = True
    rev = await eng.report_progress(task, rev, 1 << 20, 64 << 20)     # then reassigned
    with pytest.raises(RuntimeError, match="reassigned to other"):
        await eng.report_progress(task, rev, 2 << 20, 64 << 20)
    assert RecoveryTask.decode((await etcd_client.get(key)).value).executor == "other"


async def test_a_recovery_attempt_starts_at_zero_and_a_failed_one_is_left_pending_at_zero(etcd_client, etcd_config):
    """Every attempt copies the extent from its beginning: the task must not show the bytes
    of an earlier attempt (here: all of them, its join refused) while it runs or waits."""
    from chunk.storage.coordinator import MediumError
    eng = _etcd_engine(etcd_client, etcd_config)
    key = eng.keys.recovery_task("v", 0)
    seen = []

    class Coord:
        async def run_recovery(self, task, rev, rate):
            cur = RecoveryTask.decode((await etcd_client.get(key)).value)
            seen.append((cur.state, cur.done_bytes))
            rev = await eng.report_progress(task, rev, 64 << 20, 64 << 20)
            raise MediumError("join of C refused: epoch 7 no longer owns the volume")

    async def coordinator(vid):
        return Coord()

    async def release(coord):
        pass
    eng.coordinator, eng.release = coordinator, release
    await etcd_client.put(key, RecoveryTask("v", 0, "C", "resync", "me", 3, done_bytes=64 << 20,
                                            total_bytes=64 << 20, state="pending").encode())
    assert await eng._recovery_attempt(key) is False                  # noqa: SLF001
    cur = RecoveryTask.decode((await etcd_client.get(key)).value)
    assert seen == [("running", 0)]
    assert (cur.state, cur.done_bytes) == ("pending", 0) and "refused" in cur.error
