"""The meta leader's in-memory copy of every extent record, kept current by an etcd watch.

A recovery pass looks at every extent record. Listing and decoding them all each pass
(~1 s of CPU per 100k records, 16k records per TiB allocated) starved the leader's event
loop, its election keepalive and its API with it. Here they are listed once (in pages, at
one revision) and decoded once, then followed by a watch from the next revision: a put
replaces a record, a delete removes it. Each record keeps its mod revision, so writes based
on it stay compare-and-swap on that revision: a copy that lags only costs a failed
transaction and a retry, never a wrong write.

On any watch failure (compaction, etcd restart, network) the copy is marked not ready and
listed again in full; also every ``RELIST_EVERY`` seconds, in case a watch stalls
unnoticed, and whenever a caller doubts it (``relist``: its own write did not show up).
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Iterable, TypeVar

import aetcd

from zstore.etcd import cancel_watch, create_watch, get_prefix_paged
from zstore.keys import Keys
from zstore.records import ExtentRecord

log = logging.getLogger(__name__)

YIELD_EVERY = 2000          # records handled between two yields to the event loop
RELIST_EVERY = 600.0        # a full listing at least this often, whatever the watch says

T = TypeVar("T")
Extents = dict[tuple[str, int], tuple[ExtentRecord, int]]


async def paced(items: Iterable[T], every: int = YIELD_EVERY) -> AsyncIterator[T]:
    """``items``, yielding to the event loop every ``every``: a loop over every extent
    record must not hold the leader's loop (its keepalive, its API) for seconds."""
    for i, item in enumerate(items):
        if i and i % every == 0:
            await asyncio.sleep(0)
        yield item


async def decode_extents(kvs: Iterable) -> Extents:
    """``{(volume id, index): (record, mod revision)}`` of etcd's extent kvs."""
    out: Extents = {}
    async for kv in paced(kvs):
        out[Keys.extent_key_parts(kv.key)] = (ExtentRecord.decode(kv.value), kv.mod_revision)
    return out


class ExtentView:
    """Every extent record with its mod revision, following etcd (``start`` .. ``close``).

    ``snapshot`` hands out the records themselves (not copies): callers must not change
    them, but copy one to write it back.
    """

    def __init__(self, etcd: aetcd.Client, keys: Keys, retry_delay: float = 1.0,
                 relist_every: float = RELIST_EVERY):
        self._etcd, self._prefix = etcd, keys.all_extents()
        self._retry_delay, self._relist_every = retry_delay, relist_every
        self._records: Extents = {}
        self._ready = False
        self._tick = asyncio.Event()            # set (and replaced) on every change of state
        self._relist = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._follow())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._ready = False

    @property
    def ready(self) -> bool:
        """A full listing was loaded and its watch has not failed since."""
        return self._ready

    def snapshot(self) -> Extents:
        """The records as of the last event applied (a new dict; the records are shared)."""
        return dict(self._records)

    def relist(self) -> None:
        """Drop the watch and list everything again (the caller doubts the copy)."""
        self._relist.set()

    async def wait_ready(self, timeout: float) -> bool:
        return await self._wait(lambda: self._ready, timeout)

    async def wait_past(self, seen: dict[tuple[str, int], int], timeout: float) -> bool:
        """Wait until each extent of ``seen`` (key -> the mod revision a successful write
        compared against) shows a newer revision or is gone: the caller's own writes are in.
        False after ``timeout`` (then it relists: the watch may be stuck)."""
        def past() -> bool:
            return self._ready and all(
                (got := self._records.get(k)) is None or got[1] > rev for k, rev in seen.items())
        if await self._wait(past, timeout):
            return True
        if self._ready:
            # a listing under way already reads them; asking for another would drop its watch
            log.warning("extent records: %d write(s) of this server not seen by the watch after "
                        "%.0fs; listing them again", len(seen), timeout)
            self.relist()
        return False

    async def _wait(self, cond, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not cond():
            left = deadline - loop.time()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self._tick.wait(), left)
            except asyncio.TimeoutError:
                return cond()
        return True

    def _changed(self) -> None:
        self._tick.set()
        self._tick = asyncio.Event()

    async def _follow(self) -> None:
        while True:
            self._relist.clear()
            try:
                kvs, rev = await get_prefix_paged(self._etcd, self._prefix)
                self._records = await decode_extents(kvs)
                del kvs                          # not held (raw) for the whole watch
                watch = await create_watch(self._etcd, self._prefix, start_revision=rev + 1)
                self._ready = True
                self._changed()
                log.info("extent records: %d loaded at revision %d, following changes",
                         len(self._records), rev)
                try:
                    await self._consume(watch)
                finally:
                    self._ready = False
                    await cancel_watch(watch)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - keep following through etcd outages
                self._ready = False
                self._changed()
                log.warning("extent records: watch failed (%s); listing again in %.1fs",
                            e, self._retry_delay)
                try:
                    await asyncio.wait_for(self._relist.wait(), self._retry_delay)
                except asyncio.TimeoutError:
                    pass

    async def _consume(self, watch) -> None:
        """Apply the watch's events until it fails (raises), a relist is asked for, or
        ``relist_every`` has passed."""
        async def apply() -> None:
            n = 0
            async for ev in watch:
                key = Keys.extent_key_parts(ev.kv.key)
                if ev.kind == aetcd.rtypes.EventKind.DELETE:
                    self._records.pop(key, None)
                else:
                    self._records[key] = (ExtentRecord.decode(ev.kv.value), ev.kv.mod_revision)
                self._changed()
                n += 1
                if n % YIELD_EVERY == 0:
                    await asyncio.sleep(0)       # a burst of events is all queued already
        applier = asyncio.ensure_future(apply())
        relister = asyncio.ensure_future(self._relist.wait())
        try:
            done, _ = await asyncio.wait({applier, relister}, timeout=self._relist_every,
                                         return_when=asyncio.FIRST_COMPLETED)
            if applier in done:
                applier.result()                 # raises what broke the watch
                raise RuntimeError("the watch ended")
        finally:
            for t in (applier, relister):
                t.cancel()
            await asyncio.gather(applier, relister, return_exceptions=True)
