"""The owner-record reads SYNCHRONIZE CACHE needs, coalesced per chunk server.

Every SYNCHRONIZE CACHE reads its volume's owner record, linearizably and after the command
arrived (``Coordinator.flush``: a deposed owner must not answer GOOD over another server's
unflushed writes). One etcd read per flush meant a database fsyncing on many volumes sent
etcd as many reads as it made commits. Here the reads asked while one is in flight wait for
it and then go together, as one read-only transaction of up to ``BATCH`` gets (etcd's
default limit is 128 operations per transaction), so a chunk server keeps one read in flight
(one per ``BATCH`` volumes beyond that) whatever its flush rate, each waiting at most one
read longer. A request never joins a read already sent: its answer must come from a read
that started after it was asked. A read-only etcd transaction is linearizable, like a get.
"""

from __future__ import annotations

import asyncio

from zstore.keys import Keys
from zstore.records import VolumeOwner

from .futures import retrieve

__all__ = ["BATCH", "OwnerReads"]

BATCH = 64


class OwnerReads:
    def __init__(self, etcd, keys: Keys, batch: int = BATCH) -> None:
        self._etcd, self._keys, self._batch = etcd, keys, batch
        self._queued: dict[str, asyncio.Future] = {}
        self._runner: asyncio.Task | None = None
        self.reads = 0                      # transactions sent (tests, stats)

    async def epoch(self, vid: str) -> int | None:
        """The epoch ``vid``'s owner record holds, read after this call began (None without
        a record); etcd's errors as a get would raise them."""
        fut = self._queued.get(vid)
        if fut is None:
            fut = self._queued[vid] = asyncio.get_running_loop().create_future()
            fut.add_done_callback(retrieve)   # every asker may give up
        if self._runner is None or self._runner.done():     # done: cancelled before it ran
            self._runner = asyncio.get_running_loop().create_task(self._run())
            self._runner.add_done_callback(self._runner_done)
        return await asyncio.shield(fut)    # one asker giving up does not fail the others

    def _runner_done(self, task: asyncio.Task) -> None:
        """A runner cancelled before its first step never ran ``_run``'s clean-up: its asks
        fail here (NOT READY, retried) instead of waiting for a runner that is gone."""
        if self._runner is not task:
            return                                  # ended normally; another may run now
        self._runner = None
        queued, self._queued = self._queued, {}
        for fut in queued.values():
            if not fut.done():
                fut.set_exception(ConnectionError("owner read stopped"))

    async def _run(self) -> None:
        try:
            while self._queued:
                queued, self._queued = self._queued, {}
                items = list(queued.items())
                await asyncio.gather(*(self._read(items[i:i + self._batch])
                                       for i in range(0, len(items), self._batch)))
        finally:
            self._runner = None
            for fut in self._queued.values():       # only if this task was cancelled (a stop)
                if not fut.done():
                    fut.set_exception(ConnectionError("owner read stopped"))
            self._queued.clear()

    async def _read(self, items: list[tuple[str, asyncio.Future]]) -> None:
        t = self._etcd.transactions
        try:
            self.reads += 1
            _, replies = await self._etcd.transaction(
                compare=[], success=[t.get(self._keys.owner(vid)) for vid, _ in items], failure=[])
        except BaseException as e:
            # The runner cancelled (a stop) is not the askers' cancellation: to them it is
            # etcd not answering (the coordinator's NOT READY), as any other failure.
            error = e if isinstance(e, Exception) else ConnectionError("owner read stopped")
            for _, fut in items:
                if not fut.done():
                    fut.set_exception(error)
            if not isinstance(e, Exception):
                raise
            return
        for (vid, fut), got in zip(items, replies):
            if fut.done():
                continue
            try:
                fut.set_result(VolumeOwner.decode(got[0][0]).epoch if got else None)
            except Exception as e:  # noqa: BLE001 - a malformed record fails its own flush
                fut.set_exception(e)
        for _, fut in items[len(replies):]:         # fewer replies than gets: never left waiting
            if not fut.done():
                fut.set_exception(ConnectionError("etcd answered fewer reads than asked"))
