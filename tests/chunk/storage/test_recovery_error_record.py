"""A failed recovery attempt's error is recorded on the task even when the meta leader writes
the task (its idle note, session 18) between the runner's read and its write.

The error write was one compare-and-swap whose failure was ignored: the task stayed
``running`` with no error, so the attempt's failure was never counted by the leader's
failure count (it re-plans a task showing an error at three passes in a row) nor shown in
``zstore cluster status``. Real etcd; the coordinator is a stand-in whose copy fails."""

from __future__ import annotations

import json

from chunk.storage.coordinator import MediumError
from tests.chunk.storage.test_recovery_runner_errors import IDX, TARGET, VID, _engine
from zstore.keys import Keys
from zstore.records import ExtentRecord, RecoveryTask


class _NotingEtcd:
    """The real etcd; right after the runner's n-th read of ``key`` the leader writes a note
    into the task (an extra field, as meta/recovery.py's idle note does)."""

    def __init__(self, etcd, key: bytes, note_after: set[int]) -> None:
        self._etcd, self._key, self.note_after = etcd, key, note_after
        self.transactions = etcd.transactions
        self.gets = self.notes = 0

    async def get(self, key):
        got = await self._etcd.get(key)
        if key == self._key:
            self.gets += 1
            if self.gets in self.note_after and got is not None:
                raw = json.loads(got.value)
                raw["idle_for"] = 4.0
                await self._etcd.put(key, json.dumps(raw).encode())
                self.notes += 1
        return got

    async def transaction(self, **kw):
        return await self._etcd.transaction(**kw)


async def _failed_attempt(etcd_client, etcd_config, during_copy, wrap=None) -> RecoveryTask:
    """One recovery attempt of a task assigned to this server ("me") whose copy fails after
    ``during_copy(key)`` ran; the engine reads etcd through ``wrap(key)`` if given. The task
    record left."""
    keys = Keys(etcd_config.prefix)
    key = keys.recovery_task(VID, IDX)
    await etcd_client.put(keys.extent(VID, IDX), ExtentRecord(VID, IDX, ["A", "B"], 5, {}).encode())
    await etcd_client.put(key, RecoveryTask(VID, IDX, TARGET, "rebuild", "me", 3).encode())
    eng = _engine(wrap(key) if wrap else etcd_client, keys)

    class Coord:
        async def run_recovery(self, t, rev, rate):
            await during_copy(key)
            raise MediumError(f"target {TARGET} failed during the copy: connection reset")

    async def coordinator(vid):
        return Coord()

    async def release(coord):
        pass
    eng.coordinator, eng.release = coordinator, release
    assert await eng._recovery_attempt(key) is False                   # noqa: SLF001
    return RecoveryTask.decode((await etcd_client.get(key)).value)


async def _nothing(key) -> None:
    pass


async def test_a_leader_note_between_read_and_write_does_not_lose_the_attempts_error(
        etcd_client, etcd_config):
    noting = []

    def wrap(key):
        noting.append(_NotingEtcd(etcd_client, key, {2}))   # the error path's read
        return noting[0]
    task = await _failed_attempt(etcd_client, etcd_config, _nothing, wrap)
    assert noting[0].notes == 1
    assert task.state == "pending" and "connection reset" in (task.error or "")
    assert task.executor == "me" and task.done_bytes == 0


async def test_a_task_reassigned_meanwhile_is_not_written_over(etcd_client, etcd_config):
    async def replanned(key):               # onto another executor during the copy
        await etcd_client.put(key, RecoveryTask(VID, IDX, TARGET, "rebuild", "other", 3).encode())
    task = await _failed_attempt(etcd_client, etcd_config, replanned)
    assert task.executor == "other" and task.state == "pending" and task.error is None


async def test_a_task_deleted_and_planned_again_here_is_not_written_over(etcd_client, etcd_config):
    """Review of a8597e3: the copy hung past the stall timeout, the leader deleted the task
    and planned a new one for the same extent, again on this server (the volume's owner): the
    old attempt's error (naming the old target) went onto the new task."""
    async def planned_again(key):
        await etcd_client.delete(key)
        await etcd_client.put(key, RecoveryTask(VID, IDX, "D", "rebuild", "me", 3).encode())
    task = await _failed_attempt(etcd_client, etcd_config, planned_again)
    assert task.target == "D" and task.state == "pending" and task.error is None
