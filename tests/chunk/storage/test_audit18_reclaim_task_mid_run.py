"""A recovery task placed on this server during a reclaim run keeps its target copy.

The run read a volume's recovery tasks once, when its first deletion came up, and decided
every later extent of that volume from that listing. A task planned after it (a move off a
draining server onto this one: the extent is whole, this server is neither in sync nor
stale, and the local copy is an old leftover the copy's CREATE reuses) was not in it: the
copy the executor was writing was deleted as an orphan, the copy failed and was redone.
"""

from __future__ import annotations

from typing import Any

from chunk.storage.reclaim import Reclaimer
from zstore.records import ExtentRecord, RecoveryTask

from .replica_nodes import block
from .test_reclaim import (ME, _reopen_with_rotten_headers, cluster, extent, keys, put,  # noqa: F401
                           store, volume)


def move_task(vid: str, idx: int) -> RecoveryTask:
    """A move off draining ``y`` onto this server (the extent keeps its two replicas)."""
    return RecoveryTask(vid, idx, target=ME, kind="rebuild", executor="x", generation=5,
                        replaces="y")


class TaskAfterFirstDeletion:
    """The run's etcd client; once the run deleted its first copy, the leader places a move
    of ``idx`` onto this server and the executor's CREATE reuses the copy here (a no-op on
    a copy that is here) and starts writing it, before the run's next etcd read answers."""

    def __init__(self, etcd: Any, keys: Any, store: Any, vid: str, idx: int) -> None:
        self._etcd, self._keys, self._store, self._at = etcd, keys, store, (vid, idx)
        self.armed = False
        self.placed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._etcd, name)

    async def _place(self) -> None:
        if self.armed and not self.placed:
            self.placed = True
            vid, idx = self._at
            await put(self._etcd, self._keys.recovery_task(vid, idx), move_task(vid, idx))
            if self._store.has(vid, idx):
                self._store.create(vid, idx, 1)              # the CREATE: reuses the copy
                self._store.write(vid, idx, 0, block("copied"), 1)

    async def get(self, *a: Any, **kw: Any) -> Any:
        await self._place()
        return await self._etcd.get(*a, **kw)

    async def transaction(self, *a: Any, **kw: Any) -> Any:
        await self._place()
        return await self._etcd.transaction(*a, **kw)


def reclaimer(store, etcd, keys) -> Reclaimer:  # noqa: F811
    class Armed(Reclaimer):
        def _delete(self, vid, idx, why):
            done = super()._delete(vid, idx, why)
            self.etcd.armed = True
            return done

        def _delete_broken(self, vid, idx, why):
            done = super()._delete_broken(vid, idx, why)
            self.etcd.armed = True
            return done
    return Armed(store, etcd, keys, ME)


async def test_a_task_placed_after_the_first_deletion_keeps_a_later_copy(cluster, keys, store):  # noqa: F811
    etcd = cluster
    await volume(etcd, keys, "v1")
    for idx in (0, 1):
        await extent(etcd, keys, store, "v1", idx, generation=1)
        await put(etcd, keys.extent("v1", idx), ExtentRecord("v1", idx, ["x", "y"], generation=5))
    proxy = TaskAfterFirstDeletion(etcd, keys, store, "v1", 1)
    summary = await reclaimer(store, proxy, keys).run_once()
    assert proxy.placed
    assert summary["deleted"] == [("v1", 0)]         # no task: an orphan, it goes
    assert store.has("v1", 1)                         # the move's target: kept, with its copy
    assert store.read("v1", 1, 0, len(block("copied")))[0] == block("copied")


async def test_a_broken_copy_is_kept_for_a_task_placed_after_the_first_deletion(cluster, keys,  # noqa: F811
                                                                               store, tmp_path):
    """A copy that did not open, targeted by a rebuild (whose CREATE discards and replaces
    it): the same read right before it is deleted."""
    etcd = cluster
    await volume(etcd, keys, "v1")
    for idx in (0, 1):
        await extent(etcd, keys, store, "v1", idx, generation=1)
        await put(etcd, keys.extent("v1", idx), ExtentRecord("v1", idx, ["x", "y"], generation=5))
    store.close()
    s = _reopen_with_rotten_headers(tmp_path / "disk", [("v1", 1)])
    try:
        proxy = TaskAfterFirstDeletion(etcd, keys, s, "v1", 1)
        summary = await reclaimer(s, proxy, keys).run_once()
        assert proxy.placed
        assert summary["deleted"] == [("v1", 0)]
        assert ("v1", 1) in s.broken
    finally:
        s.close()


async def test_the_copy_goes_once_its_task_ended_without_a_join(cluster, keys, store):  # noqa: F811
    """The read before the deletion costs no orphan its deletion: a task that ended without
    a join (given up, placed elsewhere) leaves the copy to go at the next run."""
    etcd = cluster
    await volume(etcd, keys, "v1")
    await extent(etcd, keys, store, "v1", 0, generation=1)
    await put(etcd, keys.extent("v1", 0), ExtentRecord("v1", 0, ["x", "y"], generation=5))
    await put(etcd, keys.recovery_task("v1", 0), move_task("v1", 0))
    r = Reclaimer(store, etcd, keys, ME)
    assert (await r.run_once())["deleted"] == [] and store.has("v1", 0)
    await put(etcd, keys.recovery_task("v1", 0), RecoveryTask("v1", 0, target="z", kind="rebuild",
                                                              executor="x", generation=5))
    assert (await r.run_once())["deleted"] == [("v1", 0)] and not store.has("v1", 0)
