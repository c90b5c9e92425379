"""A recovery task whose target, or in-sync source, is on a chunk server with no registration
record (no ChunkInfo: never registered, or unregistered meanwhile). ``run_recovery`` looked
them up with ``engine.replica`` and let ``Peers.address``'s raw LookupError out: the runner
recorded "chunk server 'X' has no info record" on the task, which named no role, and the
meta's planner (``target_failed``) could not tell it was the target's own failure. Now it is
a replica that does not answer (UNAVAILABLE, ``replica on <chunk server>: ...``), as any
other failed call to it is recorded; an unregistered first source is skipped like the others.

The harness of ``test_audit18_coord_engine_stop``: a real started StorageEngine ("me", no
replica of its own) over the test etcd, peers real ReplicaServers on loopback found through
their ChunkInfo records by the engine's real Peers; the attempt is the engine's own
``_recovery_attempt`` over a task record in etcd. The meta leader is a stand-in (its join)."""

from __future__ import annotations

import asyncio

import pytest

from chunk.storage.coordinator import EXTENT_SIZE
from chunk.storage.metaclient import MetaError
from meta.recovery import target_failed
from zstore.records import ExtentRecord, RecoveryTask

from . import replica_nodes
from .replica_nodes import block
from .test_audit18_coord_engine_stop import served  # noqa: F401

pytestmark = pytest.mark.timeout(120)


class _JoinMeta:
    """The meta leader's join as it makes it in etcd (the target in sync at generation + 1)."""

    def __init__(self, etcd, keys) -> None:
        self.etcd, self.keys, self.calls = etcd, keys, []

    async def call(self, method, path, body=None):
        self.calls.append((method, path, body))
        parts = path.strip("/").split("/")
        if parts[-1] != "join":
            raise MetaError(400, f"not served here: {method} {path}")
        key = self.keys.extent(parts[1], int(parts[2]))
        rec = ExtentRecord.decode((await self.etcd.get(key)).value)
        if body["generation"] != rec.generation:
            raise MetaError(409, "generation moved")
        new = ExtentRecord(rec.volume_id, rec.index, [*rec.replicas, body["chunk_id"]],
                           rec.generation + 1, {})
        await self.etcd.put(key, new.encode())
        return {"extent": new.to_dict()}

    async def close(self) -> None:
        pass


async def _run(served, target: str, done) -> RecoveryTask | None:  # noqa: F811
    """A rebuild of v/0 onto ``target`` assigned to the engine: its own runner (the watch)
    takes it. The task record once ``done(task)`` (None: deleted)."""
    key = served.keys.recovery_task("v", 0)
    await served.etcd.put(key, RecoveryTask("v", 0, target, "rebuild", "me", 3).encode())
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        got = await served.etcd.get(key)
        task = RecoveryTask.decode(got.value) if got is not None else None
        if await done(task):
            return task
        assert asyncio.get_running_loop().time() < deadline, f"the runner never got there: {task}"
        await asyncio.sleep(0.05)


async def _failed(task) -> bool:
    return task is not None and bool(task.error)


async def test_an_unregistered_target_fails_the_attempt_as_the_targets_own(served):  # noqa: F811
    await served.start(["B"])
    task = await _run(served, "X", _failed)              # X: no ChunkInfo record
    assert task.state == "pending", task
    assert task.error.startswith("replica on X: unavailable: "), task.error
    assert "not registered" in task.error and "'X'" in task.error, task.error
    assert target_failed(task)                           # the meta: the target's own failure


async def test_no_registered_source_fails_the_attempt_naming_them_not_as_the_targets(served):  # noqa: F811
    await served.start(["X", "Y"], unregistered=("X", "Y"))
    await served.nodes.add("C")
    task = await _run(served, "C", _failed)
    assert task.error.startswith("replica on X: unavailable: "), task.error
    assert "X, Y" in task.error and "registered" in task.error, task.error
    assert not target_failed(task)                       # a source's: the stale target kept


async def test_an_unregistered_first_source_is_skipped_and_the_copy_comes_from_another(
        served, monkeypatch):  # noqa: F811
    """X (first in the read order) has no record, B is in sync: the rebuild copies from B
    and C joins, where the raw LookupError failed every attempt while X stayed listed."""
    monkeypatch.setattr(replica_nodes, "EXTENT", EXTENT_SIZE)   # the coordinator's extents
    await served.start(["X", "B"], unregistered=("X",))
    await served.nodes.add("C")
    served.nodes.nodes["B"].store.write("v", 0, 0, block(7), 1)
    served.engine.meta = _JoinMeta(served.etcd, served.keys)

    async def joined(task) -> bool:
        assert task is None or not task.error, task.error
        return "C" in (await served.record()).replicas
    await _run(served, "C", joined)
    rec = await served.record()
    assert rec.replicas == ["X", "B", "C"]
    assert served.read("C", 0) == block(7)
