"""A recovery task runner whose etcd fails once outside the copy itself (the task's read, its
claim, the coordinator's volume read, the error's record after a failed attempt): a
transient etcd error ("leader changed", Unavailable) must not end the runner.

Before, only errors inside ``Coordinator.run_recovery`` were caught: any other one ended the
runner silently, the task stayed pending/running with no error (the meta re-plans only tasks
showing one), and nothing ran it again until a new PUT of the task or a restart.

The engine here is the real StorageEngine's assignment side over the session's real etcd;
only the coordinator is a stand-in whose recovery does what the meta's join does (the
target joins the extent record, the task key is deleted)."""

from __future__ import annotations

import asyncio

import pytest

from chunk.storage.coordinator import MediumError
from chunk.storage.engine import StorageEngine
from zstore.etcd import EtcdUnavailable
from zstore.keys import Keys
from zstore.records import RECOVERY_SLOTS, ExtentRecord, RecoveryTask

pytestmark = pytest.mark.timeout(120)

VID, IDX, TARGET = "vol-r", 3, "C"


class _FlakyEtcd:
    """The real etcd, whose n-th get of ``key`` / n-th transaction raises (once each)."""

    def __init__(self, etcd, key: bytes, fail_get: set[int], fail_txn: set[int]) -> None:
        self._etcd, self._key = etcd, key
        self.transactions = etcd.transactions
        self.fail_get, self.fail_txn = set(fail_get), set(fail_txn)
        self.gets = self.txns = 0
        self.raised = 0

    async def get(self, key):
        if key == self._key:
            self.gets += 1
            if self.gets in self.fail_get:
                self.raised += 1
                raise EtcdUnavailable("etcdserver: leader changed")
        return await self._etcd.get(key)

    async def transaction(self, **kw):
        self.txns += 1
        if self.txns in self.fail_txn:
            self.raised += 1
            raise EtcdUnavailable("etcdserver: leader changed")
        return await self._etcd.transaction(**kw)


def _engine(etcd, keys: Keys) -> StorageEngine:
    eng = StorageEngine.__new__(StorageEngine)        # the assignment side only
    eng._running, eng._rerun, eng._stop = {}, {}, asyncio.Event()   # noqa: SLF001
    eng._recovery_slots = asyncio.Semaphore(RECOVERY_SLOTS)          # noqa: SLF001
    eng.etcd, eng.keys, eng.chunk_id, eng.recovery_rate = etcd, keys, "me", 0
    return eng


# (first get, transaction, attempts failing in run_recovery, coordinator() calls raising)
SCENARIOS = {
    "task read": ({1}, set(), 0, set()),
    "claim put": (set(), {1}, 0, set()),
    "coordinator": (set(), set(), 0, {1}),
    "error-path read": ({2}, set(), 1, set()),     # after a failed attempt: its record
    "error-path put": (set(), {2}, 1, set()),
}


@pytest.mark.parametrize("where", list(SCENARIOS))
async def test_a_transient_etcd_error_outside_the_copy_does_not_end_the_task(
        where, etcd_client, etcd_config):
    fail_get, fail_txn, copy_failures, coord_failures = SCENARIOS[where]
    keys = Keys(etcd_config.prefix)
    key = keys.recovery_task(VID, IDX)
    ext_key = keys.extent(VID, IDX)
    await etcd_client.put(ext_key, ExtentRecord(VID, IDX, ["A", "B"], 5, {}).encode())
    task = RecoveryTask(VID, IDX, TARGET, "rebuild", "me", 3)
    await etcd_client.put(key, task.encode())

    flaky = _FlakyEtcd(etcd_client, key, fail_get, fail_txn)
    eng = _engine(flaky, keys)
    calls = {"coordinator": 0, "copy": 0}

    class Coord:
        async def run_recovery(self, t, rev, rate):
            calls["copy"] += 1
            if calls["copy"] <= copy_failures:
                raise MediumError(f"target {TARGET} failed during the copy: connection reset")
            # The meta's join: the target in sync at generation + 1, the task deleted.
            rec = ExtentRecord.decode((await etcd_client.get(ext_key)).value)
            rec = ExtentRecord(VID, IDX, [*rec.replicas, t.target], rec.generation + 1, {})
            await etcd_client.put(ext_key, rec.encode())
            await etcd_client.delete(key)

    async def coordinator(vid):
        calls["coordinator"] += 1
        if calls["coordinator"] in coord_failures:
            flaky.raised += 1
            raise EtcdUnavailable("etcdserver: leader changed")
        return Coord()

    async def release(coord):
        pass
    eng.coordinator, eng.release = coordinator, release

    await eng._on_recovery(key, task.encode())                        # noqa: SLF001
    runner = eng._running.get(f"recovery/{VID}/{IDX}")                 # noqa: SLF001
    assert runner is not None
    try:
        # The runner ends once the task is done (or, before the fix, at the etcd error).
        await asyncio.wait_for(asyncio.shield(runner), 30)
    except Exception:  # noqa: BLE001 - the old runner died of the injected error
        pass
    finally:
        eng._stop.set()                                                # noqa: SLF001
        if not runner.done():
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    assert flaky.raised == 1, "the injected etcd error was not hit"
    assert await etcd_client.get(key) is None, \
        f"the task was left behind after an etcd error in its {where}"
    rec = ExtentRecord.decode((await etcd_client.get(ext_key)).value)
    assert rec.replicas == ["A", "B", TARGET] and rec.generation == 6
    # The runner gave its slot back: both slots are free.
    for _ in range(2):
        await asyncio.wait_for(eng._recovery_slots.acquire(), 1)      # noqa: SLF001


async def test_cancelling_a_runner_still_ends_it(etcd_client, etcd_config):
    """Stopping the engine cancels runners: the catch-all must not swallow the cancellation
    (here: cancelled while waiting out the backoff after a failed task read)."""
    keys = Keys(etcd_config.prefix)
    key = keys.recovery_task(VID, IDX)
    task = RecoveryTask(VID, IDX, TARGET, "rebuild", "me", 3)
    await etcd_client.put(key, task.encode())
    flaky = _FlakyEtcd(etcd_client, key, set(range(1, 1000)), set())
    eng = _engine(flaky, keys)
    await eng._on_recovery(key, task.encode())                        # noqa: SLF001
    runner = eng._running[f"recovery/{VID}/{IDX}"]                     # noqa: SLF001
    for _ in range(100):
        if flaky.raised or runner.done():
            break
        await asyncio.sleep(0.01)
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    assert runner.cancelled()
    for _ in range(2):
        await asyncio.wait_for(eng._recovery_slots.acquire(), 1)      # noqa: SLF001
