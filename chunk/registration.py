"""Keep a chunk server registered in etcd for as long as it runs.

Two records: ``chunks/{id}/info`` (what the server is; no lease, rewritten at
every registration) and ``chunks/{id}/live`` (held under a lease, so it exists
exactly while the server is alive and reachable). The meta leader shows a
chunk server ``up`` while its live key exists. The live record also lists the
server's iSCSI sessions; it is rewritten within ``debounce`` seconds of a
session coming or going (``sessions_changed``), so an admin, and whoever
moves initiators around, sees where each initiator is logged in now rather
than at the next periodic refresh.

Disk probes (``probe_disks``) run in a task of their own: the live record
publishes the last probe that finished and nothing waits on one, so a disk that
stalls cannot cost the server its lease (the probe itself bounds each disk:
``chunk/disks.py`` ``probe_all_async`` reports one that does not answer failed).
Only the very first registration waits for a probe, before any lease exists.
Likewise the live record is written by a task of its own: keepalives keep their
ttl/3 schedule while a write of it hangs or fails (etcd's disk slow: puts time
out while keepalives still answer), so the lease outlives a slow etcd disk.

The loop never gives up: etcd unreachable at start or later is logged and
retried with backoff; when the lease turns out to have expired (a long outage,
a paused process) a new one is granted and everything is written again. On
stop the lease is revoked so the server shows down at once rather than after
the TTL; or, with ``revoke_on_stop=False``, kept alive (keepalives only) until
``unregister``, so it cannot expire while the server is still shutting down; the
live record is then rewritten once with ``stopping=True`` so that redirectors
send no new logins to a listener that is closing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

import aetcd
from aetcd import exceptions as aetcd_exc

from zstore.keys import Keys
from zstore.records import ChunkInfo, ChunkLive, now

log = logging.getLogger(__name__)

T = TypeVar("T")
DiskProbe = Callable[[], Awaitable[list[dict[str, Any]]]]
InfoBuilder = Callable[[list[dict[str, Any]]], ChunkInfo]
SessionLister = Callable[[], list[dict[str, Any]]]


class LeaseLost(Exception):
    """The lease expired or was revoked behind our back; register again."""


class _Stopped(Exception):
    """Stop was requested while an etcd call was in flight."""


def _lease_not_found(e: BaseException) -> bool:
    return isinstance(e, aetcd_exc.ClientError) and "lease not found" in str(e)


class Backoff:
    """Exponential backoff with jitter, so many servers don't retry in lockstep."""

    def __init__(self, first: float = 0.2, cap: float = 5.0) -> None:
        self.first, self.cap, self._next = first, cap, first

    def next(self) -> float:
        delay = self._next
        self._next = min(self.cap, self._next * 2)
        return delay * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self._next = self.first


class Registration:
    """Holds the chunk server's etcd registration; ``run`` until ``stop`` is set."""

    def __init__(self, etcd: aetcd.Client, keys: Keys, chunk_id: str, *, lease_ttl: int,
                 build_info: InfoBuilder, probe_disks: DiskProbe, endpoints: str = "etcd",
                 refresh_interval: float = 10.0, backoff: Backoff | None = None,
                 sessions: SessionLister | None = None, debounce: float = 0.3,
                 storage: Callable[[], dict[str, Any]] | None = None,
                 revoke_on_stop: bool = True,
                 serve_when: Callable[[], Awaitable[Any]] | None = None) -> None:
        # False: ``run`` ends without revoking but keeps the lease alive; the owner calls
        # ``unregister`` once its writes have stopped (a revoked or expired lease lets the
        # meta snapshot this server's volumes itself).
        self.revoke_on_stop = revoke_on_stop
        self.serve_when = serve_when           # awaited before the live key is written
        self.etcd = etcd
        self.keys = keys
        self.chunk_id = chunk_id
        self.lease_ttl = lease_ttl
        self.build_info = build_info
        self.probe_disks = probe_disks
        self.endpoints = endpoints
        self.refresh_interval = refresh_interval
        self.backoff = backoff or Backoff()
        self.sessions = sessions
        self.storage = storage
        self.debounce = debounce
        self.started = now()
        self.lease: aetcd.leases.Lease | None = None
        # Until when (time.monotonic) the lease surely holds: the last grant or keepalive was
        # *sent* then minus the margin, so etcd expires it later than this. The storage engine
        # starts no write after it (``Coordinator.ensure_owner``): once etcd expires the lease
        # the meta treats this server as down and may snapshot or hand out its volumes.
        self.lease_deadline = 0.0
        self.lease_gen = 0                     # +1 per lease whose live key is written: coordinators re-own
        self.registered = asyncio.Event()      # set while registered (for callers and tests)
        self._stop = asyncio.Event()
        self._outage_since: float | None = None
        self._outage_logged = 0.0
        self._disks: list[dict[str, Any]] = []
        self._changed = asyncio.Event()        # sessions came or went since the last write
        self._stale = False                    # the live record is to be written again (no debounce)
        self._live_rev = 0                     # mod revision of the live record last written
        self._stop_marked = False              # the stopping mark was written (or is being)
        self._wake = asyncio.Event()           # set with ``_changed`` or ``_stale``: wakes ``_publish``
        self._keeper: asyncio.Task | None = None   # keepalives between stop and ``unregister``
        self._probing: asyncio.Task | None = None  # the disk probe running, if one is
        self._probed = False                   # a probe finished: ``_disks`` holds its records

    def sessions_changed(self) -> None:
        """Ask for a prompt rewrite of the live record (debounced); safe to call often."""
        self._changed.set()
        self._wake.set()

    # -- the loop -----------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        while not stop.is_set():
            try:
                await self._register()
                self.backoff.reset()
                await self._hold()
            except _Stopped:
                break
            except LeaseLost as e:
                self.registered.clear()
                self.lease = None
                self.lease_deadline = 0.0          # no write starts until a new lease holds
                log.warning("lost the etcd lease (%s); registering again", e)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - etcd down or erroring: retry, never exit
                self.registered.clear()
                delay = self.backoff.next()
                self._note_outage(e, f"retrying in {delay:.1f}s")
                if await self._sleep(delay):
                    break
        self.lease_deadline = 0.0                  # stopping: no write starts from now on
        if self._probing is not None:
            self._probing.cancel()                 # a thread stuck in a disk is left behind
        if self.revoke_on_stop:
            await self._unregister()
        elif self.lease is not None:
            # Shutting down (sessions, replica writes) can take longer than the lease has left;
            # expiring then would let the meta see no owner while writes still land.
            self._keeper = asyncio.ensure_future(self._keep_alive(self.lease))
            # ...but the listener closes now: redirectors must stop sending logins here at
            # once, not when the lease goes. The live key stays (same lease), marked stopping.
            await self._mark_stopping()

    async def unregister(self) -> None:
        """Revoke the lease (the live key goes with it): after ``run`` with revoke_on_stop
        False, once nothing of this server writes any more."""
        await self._unregister()

    async def _mark_stopping(self) -> None:
        """Rewrite the live record with ``stopping=True`` under the same lease (best effort,
        bounded: stop is set, so this bypasses ``_call``). The meta still sees it up."""
        try:
            await asyncio.wait_for(self._put_live_record(stopping=True), max(1.0, self.lease_ttl / 2))
            log.info("chunk server %s marked stopping in etcd: no new logins are sent here", self.chunk_id)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - shutting down anyway; the lease ends it later
            log.warning("could not mark chunk server %s stopping (%s); redirectors may still send "
                        "logins here until its lease is revoked", self.chunk_id, _describe(e))

    async def _keep_alive(self, lease: aetcd.leases.Lease) -> None:
        """Refresh ``lease`` every ttl/3 until cancelled by ``unregister``. Stop is set, so
        this bypasses ``_call``; ``lease_deadline`` stays 0: no write starts meanwhile."""
        interval = max(0.2, self.lease_ttl / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                reply = await asyncio.wait_for(self.etcd.refresh_lease(lease.id), interval * 1.5)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - etcd down: try again next tick
                if _lease_not_found(e):
                    return
                log.debug("keepalive while stopping failed: %s", _describe(e))
                continue
            if reply is None or reply.TTL <= 0:
                return                              # gone already: nothing left to keep

    def _probe_soon(self) -> asyncio.Task:
        """Start a disk probe unless one runs; its records are published once it ends."""
        if self._probing is None or self._probing.done():
            self._probing = asyncio.ensure_future(self._probe())
        return self._probing

    async def _probe(self) -> None:
        try:
            self._disks = await self.probe_disks()
            self._probed = True
            self._mark_stale()                 # ``_publish`` writes them (while registered)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the last records stay; the next round tries again
            log.exception("disk probe failed")

    async def _register(self) -> None:
        probing = self._probe_soon()
        if not self._probed:                   # the first time only, and before any lease
            await self._call(asyncio.shield(probing))
            if not self._probed:
                raise RuntimeError("the disk probe failed")
        info = self.build_info(self._disks)
        await self._call(self.etcd.put(self.keys.chunk_info(self.chunk_id), info.encode()))
        if self.serve_when is not None:
            await self._call(self.serve_when())
        sent = time.monotonic()
        lease = await self._call(self.etcd.lease(self.lease_ttl))
        self.lease = lease
        if lease.ttl != self.lease_ttl:
            log.warning("etcd granted a %ds lease instead of the %ds asked for", lease.ttl, self.lease_ttl)
        self._changed.clear()
        self._stale = False                    # this write has all of it
        self._live_rev = 0                     # a new lease: a new live key
        await self._put_live()
        # Writes start under this lease only now that its live key is in etcd: while it is
        # not, the meta sees no live owner and may commit a snapshot itself at the seq a
        # coordinator re-taking ownership (new lease_gen) would read and keep writing at.
        # ``sent`` is still from before the grant, so the deadline stays conservative.
        self.lease_gen += 1
        self._held(sent, lease.ttl)
        self.registered.set()
        self._recovered()
        log.info("registered chunk server %s in etcd at %s (lease %x, ttl %ds)",
                 self.chunk_id, self.endpoints, lease.id, lease.ttl)

    async def _hold(self) -> None:
        """Keep the lease alive every ttl/3 and have the live record rewritten every refresh
        interval and soon after sessions change; return on stop.

        The live record is written by a task of its own (``_publish``): a write that hangs
        or fails (etcd's disk slow: puts time out while keepalives still answer) never
        delays or skips a keepalive, or the lease would expire under a running server.
        """
        assert self.lease is not None
        publisher = asyncio.ensure_future(self._publish())
        try:
            await self._keep_lease(publisher)
        finally:
            publisher.cancel()
            await asyncio.gather(publisher, return_exceptions=True)

    async def _keep_lease(self, publisher: asyncio.Future) -> None:
        assert self.lease is not None
        interval = max(0.2, self.lease_ttl / 3)
        next_keepalive = time.monotonic() + interval
        next_refresh = time.monotonic() + self.refresh_interval
        while True:
            await self._wait_for(next_keepalive - time.monotonic(), publisher)  # raises what ended it
            try:
                sent = time.monotonic()
                next_keepalive = sent + interval
                reply = await self._call(self.etcd.refresh_lease(self.lease.id), timeout=interval * 1.5)
                if reply is None or reply.TTL <= 0:
                    raise LeaseLost(f"lease {self.lease.id:x} expired")
                self._held(sent, reply.TTL)
                if time.monotonic() >= next_refresh:
                    self._probe_soon()          # never awaited here: a slow disk delays nothing
                    self._mark_stale()
                    next_refresh = time.monotonic() + self.refresh_interval
                self._recovered()
            except (LeaseLost, _Stopped, asyncio.CancelledError):
                raise
            except Exception as e:  # noqa: BLE001
                if _lease_not_found(e):
                    raise LeaseLost(f"lease {self.lease.id:x} not found") from None
                self._note_outage(e, "keeping the lease alive as soon as it answers")

    async def _wait_for(self, timeout: float, publisher: asyncio.Future) -> None:
        """Sleep ``timeout``; raise _Stopped on stop, or what ended ``publisher`` (LeaseLost)."""
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({stopper, publisher}, timeout=max(0.0, timeout), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if self._stop.is_set():
            raise _Stopped
        if publisher.done():
            publisher.result()
            raise RuntimeError("the live record publisher ended")

    def _mark_stale(self) -> None:
        """The live record is to be written again (by ``_publish``, without debounce)."""
        self._stale = True
        self._wake.set()

    async def _publish(self) -> None:
        """Write the live record when sessions changed (once changes settle: one write per
        burst of logins), on each refresh and after each disk probe; a failed write is
        retried every ttl/3 until it lands. Ends only by raising (LeaseLost, _Stopped)."""
        interval = max(0.2, self.lease_ttl / 3)
        while True:
            if not (self._changed.is_set() or self._stale):
                await self._call(self._wake.wait())
            self._wake.clear()
            if self._changed.is_set():
                if await self._sleep(self.debounce):
                    raise _Stopped
                self._changed.clear()
            self._stale = False             # set again meanwhile: written again after this
            try:
                await self._put_live(timeout=max(1.0, self.lease_ttl / 2))
            except (LeaseLost, _Stopped, asyncio.CancelledError):
                self._stale = True
                raise
            except Exception as e:  # noqa: BLE001 - etcd slow or down: the next round retries
                self._stale = True
                self._note_outage(e, "writing the live record again as soon as it answers")
                if await self._sleep(interval):
                    raise _Stopped

    def _held(self, sent: float, ttl: int) -> None:
        """The lease holds for ``ttl`` s from when it was asked for; keep a third of it (at
        least 0.5 s) as margin for clock rates and the writes still in flight."""
        self.lease_deadline = max(self.lease_deadline, sent + ttl - max(0.5, ttl / 3))

    def lease_valid(self) -> bool:
        return time.monotonic() < self.lease_deadline

    @property
    def stopping(self) -> bool:
        """Stop was asked for: the lease is never valid for a write again (``lease_deadline``
        stays 0 once ``run`` ends), so writers waiting for it give up instead of waiting
        (``Coordinator.ensure_owner``) and holding up the shutdown."""
        return self._stop.is_set()

    async def _put_live(self, timeout: float | None = None) -> None:
        try:
            await self._call(self._put_live_record(), timeout=timeout)
        except aetcd_exc.ClientError as e:
            if _lease_not_found(e):
                raise LeaseLost(f"lease {self.lease.id:x} not found") from None
            raise

    async def _put_live_record(self, stopping: bool = False) -> None:
        """Write the live record. The stopping mark is written as is; every other write only
        over the record this server last wrote (its mod revision), and never over the mark: a
        publish still in flight when stop came is abandoned here (``_call``) but may still be
        applied by etcd after the mark, and must not clear it (redirectors would send logins
        to a server that is going away)."""
        assert self.lease is not None
        live = ChunkLive(chunk_id=self.chunk_id, pid=os.getpid(), started=self.started,
                         lease_ttl=self.lease.ttl, disks=self._disks,
                         sessions=self.sessions() if self.sessions else [],
                         storage=self._storage(), stopping=stopping)
        key, value = self.keys.chunk_live(self.chunk_id), live.encode()
        if stopping:
            self._stop_marked = True
            await self.etcd.put(key, value, lease=self.lease)
            return
        t = self.etcd.transactions
        for _ in range(3):
            if self._stop_marked:
                return
            if not self._live_rev:              # the first write under this lease
                put = await self.etcd.put(key, value, lease=self.lease)
                self._live_rev = put.header.revision if put is not None else 0
                return
            ok, responses = await self.etcd.transaction(
                compare=[t.mod(key) == self._live_rev], success=[t.put(key, value, lease=self.lease)],
                failure=[t.get(key)])
            if ok:
                self._live_rev = responses[0].response_put.header.revision
                return
            # Not the record we last wrote: ours, applied after its answer was lost (adopted,
            # written again), the stopping mark (never overwritten), or gone (lease ended).
            kvs = responses[0] if responses else []
            if not kvs:
                self._live_rev = 0
                continue
            raw, got = kvs[0]
            try:
                if ChunkLive.decode(raw).stopping:
                    return
            except Exception:  # noqa: BLE001 - not a record we can read: ours replaces it
                pass
            self._live_rev = got.mod_revision
        raise RuntimeError("the live record kept changing under this chunk server's writes")

    def _storage(self) -> dict[str, Any]:
        if self.storage is None:
            return {}
        try:
            return self.storage()
        except Exception:  # noqa: BLE001 - counters must never cost the registration
            log.exception("storage status failed")
            return {}

    async def _unregister(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
            self._keeper = None
        self.registered.clear()
        self.lease_deadline = 0.0
        lease, self.lease = self.lease, None
        if lease is None:
            return
        try:
            await asyncio.wait_for(self.etcd.revoke_lease(lease.id), 2.0)
            log.info("revoked lease %x: chunk server %s shows down now", lease.id, self.chunk_id)
        except Exception as e:  # noqa: BLE001 - best effort; the lease expires by itself
            log.warning("could not revoke lease %x (%s); it expires within %ds",
                        lease.id, _describe(e), lease.ttl)

    # -- helpers ------------------------------------------------------------------

    async def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Await an etcd call, abandoning it (``_Stopped``) as soon as stop is set."""
        task = asyncio.ensure_future(asyncio.wait_for(coro, timeout) if timeout else coro)
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if task not in done:
            task.cancel()
            raise _Stopped
        return task.result()

    async def _sleep(self, seconds: float) -> bool:
        """Sleep, or return True early when stop is set."""
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
            return True
        except asyncio.TimeoutError:
            return False

    def _note_outage(self, e: BaseException, action: str) -> None:
        t = time.monotonic()
        if self._outage_since is None:
            self._outage_since = self._outage_logged = t
            log.warning("etcd at %s is unreachable or failing (%s); %s", self.endpoints, _describe(e), action)
        elif t - self._outage_logged >= 30:
            self._outage_logged = t
            log.warning("still no etcd at %s after %.0fs (%s); %s",
                        self.endpoints, t - self._outage_since, _describe(e), action)
        else:
            log.debug("etcd call failed: %s", _describe(e))

    def _recovered(self) -> None:
        if self._outage_since is not None:
            log.info("etcd at %s answers again after %.1fs", self.endpoints, time.monotonic() - self._outage_since)
            self._outage_since = None


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
