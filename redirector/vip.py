"""The VIP: exactly one redirector holds it, through an etcd lease with an epoch.

Same pattern as meta/election.py: the holder's ``VipRecord`` sits at
``keys.vip()`` under the holder's lease, created in a transaction that also
bumps ``keys.vip_epoch()``, so the epoch grows by exactly one per new holder.

A holder serves only while it can be sure its lease lives: it stops serving
and removes the address once ``SAFE * ttl`` has passed since the start of its
last successful refresh (etcd cannot have expired the lease before ``ttl``),
or at once when etcd says the lease is gone or the VIP record is no longer
ours. That last one is watched: deleting the record by hand (how an operator
moves the VIP) or overwriting it makes the holder stop serving as soon as etcd
reports it, before a standby can have won the VIP, not at its next refresh.
Transient etcd errors are retried until then, so an etcd blip does not
flap the VIP. The address itself is added with a kernel lifetime of about
``ttl`` that every refresh extends: a holder that is SIGKILLed or frozen loses
the address on its own when its lease expires, instead of answering ARP next
to the new holder until someone cleans up.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import math
import socket
import time
from typing import Awaitable, Callable

import aetcd

from zstore.config import RedirectorConfig
from zstore.etcd import UNAVAILABLE_ERRORS, cancel_watch
from zstore.keys import Keys
from zstore.records import RedirectorMember, VipRecord

from . import arp

log = logging.getLogger(__name__)

SAFE = 0.8                   # fraction of the lease ttl we trust a lease after its last refresh
# `ip` could not even be started (out of descriptors, memory): says nothing about the address
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN})
OnAcquire = Callable[[VipRecord], Awaitable[None]]
OnRelease = Callable[[], Awaitable[None]]


class LeaseLost(Exception):
    """Our hold on the VIP can no longer be trusted."""


class AcquireFailed(Exception):
    """We won the VIP but could not start serving it (address, listener)."""


async def _ip(*args: str, timeout: float = 5.0) -> tuple[int, str]:
    """Run ``ip ARGS`` in our network namespace: (exit status, stderr)."""
    proc = await asyncio.create_subprocess_exec("ip", *args, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, err.decode(errors="replace").strip()


class VipAddress:
    """The VIP on a local interface, with a kernel lifetime that ``add`` (re)starts.

    ``ip addr replace`` both adds and extends, so ``add`` is idempotent. An IPv6 VIP is
    added ``nodad``: during duplicate address detection the address is tentative and
    cannot be bound (the listener fails with EADDRNOTAVAIL), and DAD would even fail
    for good while a dying predecessor still answers for it. Who holds the VIP is
    decided in etcd, not by DAD."""

    def __init__(self, vip: str, interface: str, lifetime: int):
        ip = ipaddress.ip_address(vip)
        self.vip, self.interface, self.lifetime = vip, interface, lifetime
        self.version = ip.version
        self.cidr = f"{vip}/{ip.max_prefixlen}"
        # gratuitous ARP (IPv4) or unsolicited NA (IPv6); a loopback VIP never leaves the host
        self.announceable = not ip.is_loopback

    async def add(self) -> None:
        rc, err = await _ip(*self.add_args())
        if rc != 0:
            raise OSError(f"ip addr replace {self.cidr} dev {self.interface}: {err}")

    def add_args(self) -> list[str]:
        args = ["addr", "replace", self.cidr, "dev", self.interface,
                "valid_lft", str(self.lifetime), "preferred_lft", str(self.lifetime)]
        return args + ["nodad"] if self.version == 6 else args

    async def remove(self) -> bool:
        """Remove it; False if it was not there."""
        rc, err = await _ip("addr", "del", self.cidr, "dev", self.interface)
        if rc == 0:
            return True
        if "not found" in err or "Cannot assign" in err:
            return False
        raise OSError(f"ip addr del {self.cidr} dev {self.interface}: {err}")

    def announce(self) -> bool:
        if not self.announceable:
            return False
        if self.version == 6:
            return arp.advertise(self.interface, self.vip)
        return arp.announce(self.interface, self.vip)


async def _cancel_watch(watch) -> None:
    await cancel_watch(watch, 1.0)


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        pass


class VipHolder:
    """Campaigns for the VIP and serves it (through the caller's callbacks) while it holds it."""

    def __init__(self, etcd: aetcd.Client, keys: Keys, cfg: RedirectorConfig, redirector_id: str,
                 hostname: str | None = None):
        self.etcd, self.keys, self.cfg, self.redirector_id = etcd, keys, cfg, redirector_id
        self.hostname = hostname or socket.gethostname()
        self.ttl = cfg.lease_ttl
        self.poll = min(0.25, self.ttl / 6)      # how soon a standby notices a free VIP
        self.address = (VipAddress(cfg.vip, cfg.interface, lifetime=max(2, math.ceil(self.ttl)))
                        if cfg.interface else None)
        self._record: VipRecord | None = None
        self._value: bytes | None = None
        self._lease = None
        self._refreshed = 0.0                     # monotonic start of the last good refresh
        self._announcer: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None  # follows our record while we hold it
        self._lost: str | None = None             # why the watcher saw the record go, if it did
        self._wake = asyncio.Event()              # the watcher has news: don't sleep the poll out

    @property
    def holding(self) -> bool:
        """True while we hold the VIP and our lease is surely alive (false a little before
        ``on_release`` runs, never after)."""
        return (self._record is not None and self._lost is None
                and time.monotonic() < self._trusted_until())

    @property
    def record(self) -> VipRecord | None:
        return self._record

    async def current(self) -> VipRecord | None:
        got = await self.etcd.get(self.keys.vip())
        return VipRecord.decode(got.value) if got else None

    # -- the loop ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, on_acquire: OnAcquire, on_release: OnRelease) -> None:
        """Campaign, hold, release, campaign again, until ``stop``; then give the VIP back.

        ``on_acquire`` runs once the address is up (start serving); ``on_release`` whenever a
        hold ends, also after an ``on_acquire`` that failed half-way, so it must cope with a
        partial start. Both may run many times over the holder's life."""
        await self._remove_stale_address()
        try:
            while not stop.is_set():
                backoff, why = 0.5, "stopping"
                try:
                    await self._session(stop, on_acquire)
                except asyncio.CancelledError:
                    raise
                except AcquireFailed as e:
                    log.error("could not serve the VIP: %s", e.__cause__ or e, exc_info=e.__cause__)
                    backoff, why = float(self.ttl), "could not serve it"   # let another try first
                except (LeaseLost, *UNAVAILABLE_ERRORS) as e:
                    why = f"{type(e).__name__}: {e}"
                except Exception as e:  # noqa: BLE001 - the VIP loop must survive anything
                    log.exception("VIP loop error")
                    backoff, why = 1.0, f"unexpected {type(e).__name__}"
                await self._release(on_release, why)
                await self._drop_lease()
                if not stop.is_set():
                    log.warning("VIP etcd session ended (%s); campaigning again in %.1fs", why, backoff)
                    await _pause(stop, backoff)
        finally:
            await self._release(on_release, "stopping")
            await self._drop_lease()

    async def _session(self, stop: asyncio.Event, on_acquire: OnAcquire) -> None:
        t0 = time.monotonic()
        self._lease = await asyncio.wait_for(self.etcd.lease(self.ttl), self.ttl)
        self._refreshed = t0
        member = RedirectorMember(redirector_id=self.redirector_id, hostname=self.hostname)
        await self._etcd(self.etcd.put(self.keys.redirector_member(self.redirector_id),
                                       member.encode(), lease=self._lease))
        while not stop.is_set():
            if time.monotonic() - self._refreshed >= self.ttl / 3:
                await self._refresh()
            if self._record is not None:
                if self._lost is not None:
                    raise LeaseLost(self._lost)
                if time.monotonic() >= self._trusted_until():
                    raise LeaseLost(f"no successful lease refresh for {SAFE * self.ttl:.1f}s")
            else:
                await self._try_acquire(on_acquire)
            await self._nap(stop)

    async def _nap(self, stop: asyncio.Event) -> None:
        """Sleep ``poll``, or less when stop is set or the watcher has news."""
        if self._wake.is_set():
            self._wake.clear()
            return
        waits = {asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())}
        try:
            await asyncio.wait(waits, timeout=self.poll, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        self._wake.clear()

    def _trusted_until(self) -> float:
        return self._refreshed + SAFE * self.ttl

    async def _etcd(self, call: Awaitable):
        """One etcd call, bounded so that a hung call cannot outlive our trust in the lease."""
        return await asyncio.wait_for(call, max(0.1, self._trusted_until() - time.monotonic()))

    async def _refresh(self) -> None:
        t0 = time.monotonic()
        try:
            reply = await self._etcd(self.etcd.refresh_lease(self._lease.id))
        except UNAVAILABLE_ERRORS as e:
            if time.monotonic() >= self._trusted_until():
                raise LeaseLost(f"lease refresh failed for {SAFE * self.ttl:.1f}s: {e!r}") from e
            log.info("VIP lease refresh failed (%r); retrying", e)
            return
        if reply is None or reply.TTL <= 0:
            raise LeaseLost("lease expired")
        self._refreshed = t0
        if self._record is not None:
            await self._confirm()

    async def _confirm(self) -> None:
        """While holding: extend the address's lifetime, and check the record is still ours
        (deleting it by hand is how an operator moves the VIP)."""
        if self.address is not None:
            self._check_trust("extending the VIP address")
            try:
                await self.address.add()
            except OSError as e:
                if e.errno not in RESOURCE_ERRNOS:
                    raise LeaseLost(f"cannot keep the address: {e}") from e
                # The address lives about a ttl and we refresh every ttl/3: the next tries again.
                log.warning("could not run `ip` to extend the VIP address (%s); "
                            "the next refresh tries again", e)
        try:
            got = await self._etcd(self.etcd.get(self.keys.vip()))
        except UNAVAILABLE_ERRORS as e:
            log.info("VIP record check failed (%r); next refresh checks again", e)
            return
        if got is None or got.value != self._value:
            raise LeaseLost("the VIP record is no longer ours")
        if self._lost is not None:
            raise LeaseLost(self._lost)

    async def _try_acquire(self, on_acquire: OnAcquire) -> None:
        vkey, ekey = self.keys.vip(), self.keys.vip_epoch()
        got = await self._etcd(self.etcd.get(vkey))
        if got is not None:
            if got.lease != self._lease.id:
                return
            # ours already: our own txn committed but its answer was lost (timeout)
            rec, value, rev = VipRecord.decode(got.value), got.value, got.mod_revision
        else:
            epoch_kv = await self._etcd(self.etcd.get(ekey))
            epoch = int(epoch_kv.value) if epoch_kv else 0
            rec = VipRecord(redirector_id=self.redirector_id, vip=self.cfg.vip, port=self.cfg.port,
                            epoch=epoch + 1, interface=self.cfg.interface)
            value = rec.encode()
            t = self.etcd.transactions
            cmp = [t.version(vkey) == 0,
                   (t.mod(ekey) == epoch_kv.mod_revision) if epoch_kv else (t.version(ekey) == 0)]
            ok, replies = await self._etcd(self.etcd.transaction(
                compare=cmp, failure=[],
                success=[t.put(vkey, value, lease=self._lease), t.put(ekey, str(epoch + 1).encode())]))
            if not ok:
                return
            rev = replies[0].response_put.header.revision if replies else 0
        self._record, self._value, self._lost = rec, value, None
        self._watcher = asyncio.ensure_future(self._watch_record(value, rev))
        log.info("holding VIP %s:%d (epoch %d)%s", rec.vip, rec.port, rec.epoch,
                 f" on {self.cfg.interface}" if self.cfg.interface else "")
        try:
            if self.address is not None:
                self._check_trust("adding the VIP address")
                await self.address.add()
                self._check_trust("announcing the VIP")
                self._announcer = asyncio.ensure_future(self._announce())
            self._check_trust("serving the VIP")
            await on_acquire(rec)
        except LeaseLost:
            raise
        except Exception as e:
            raise AcquireFailed(str(e)) from e

    def _check_trust(self, doing: str) -> None:
        """Raise LeaseLost unless our lease is surely alive now. Called right before each
        step that claims the VIP on the LAN: a holder paused after its last etcd answer
        (GC, SIGSTOP, a swapped-out VM) must not add the address or send gratuitous ARP
        once another may hold the VIP."""
        if time.monotonic() >= self._trusted_until():
            raise LeaseLost(f"lease no longer trusted ({SAFE * self.ttl:.1f}s since the last refresh) "
                            f"before {doing}")

    def _lose(self, why: str) -> None:
        """The record is not ours any more: stop claiming the VIP now (``holding`` turns
        False at once), and wake the session loop to release it."""
        if self._lost is None:
            log.warning("%s", why)
            self._lost = why
        self._wake.set()

    async def _watch_record(self, value: bytes, rev: int) -> None:
        """While we hold the VIP: lose it as soon as etcd reports our record deleted or
        replaced. Watches from the revision after our own write (``rev``), so nothing
        between that write and the watch's creation is missed; after a failed watch, from
        now on plus one read of the record. Refreshes still check the record regardless."""
        key = self.keys.vip()
        start: int | None = rev + 1 if rev else None
        while True:
            try:
                watch = await self._create_watch(key, start)
                try:
                    if start is None:               # (re)started from now: anything before?
                        got = await self.etcd.get(key)
                        if got is None or got.value != value:
                            self._lose("the VIP record is no longer ours")
                            return
                    async for ev in watch:
                        if ev.kind == "DELETE":
                            self._lose("the VIP record was deleted")
                            return
                        if ev.kv.value != value:
                            self._lose("the VIP record was replaced by another")
                            return
                finally:
                    await _cancel_watch(watch)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the refresh's check remains the backstop
                log.info("watch on the VIP record failed (%r); watching again", e)
                await asyncio.sleep(min(1.0, self.poll * 2))
            start = None

    async def _create_watch(self, key: bytes, start: int | None):
        """Create a watch without ever abandoning the create half-way: aetcd hands a watch
        whose create was abandoned to the next watch created on this client (the
        redirector's mirrors share it). If we are cancelled meanwhile, the watch is
        cancelled once it exists."""
        creating = asyncio.ensure_future(self.etcd.watch(key, start_revision=start))
        try:
            return await asyncio.shield(creating)
        except asyncio.CancelledError:
            def drop(f: asyncio.Future) -> None:
                if not f.cancelled() and f.exception() is None:
                    asyncio.ensure_future(_cancel_watch(f.result()))
            creating.add_done_callback(drop)
            raise

    async def _announce(self) -> None:
        """Gratuitous ARP (IPv6: unsolicited NA) at once, again a second later (lost frames,
        slow switches), and once more after a SIGKILLed predecessor's address has surely
        expired (it may have answered ARP requests meanwhile)."""
        assert self.address is not None
        start = time.monotonic()
        try:
            for at in (0.0, 1.0, self.address.lifetime + 1.5):
                await asyncio.sleep(max(0.0, start + at - time.monotonic()))
                if not self.holding:        # lost (or no longer trusted) meanwhile: not ours
                    return
                if not self.address.announce():
                    return
        except OSError as e:
            log.warning("gratuitous ARP for %s on %s failed: %s", self.address.vip, self.address.interface, e)

    async def _release(self, on_release: OnRelease, why: str) -> None:
        """Stop serving at once, then take the address down."""
        rec = self._record
        if rec is None:
            return
        self._record = self._value = None
        log.warning("releasing VIP %s (epoch %d): %s", rec.vip, rec.epoch, why)
        if self._announcer is not None:
            self._announcer.cancel()
            self._announcer = None
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None
        self._lost = None
        try:
            await on_release()
        except Exception:  # noqa: BLE001 - the address must go regardless
            log.exception("on_release failed")
        if self.address is not None:
            try:
                await self.address.remove()
            except OSError as e:
                log.error("could not remove the VIP address: %s", e)

    async def _drop_lease(self) -> None:
        """Revoke our lease (frees the VIP record at once); if etcd is gone it just expires."""
        lease, self._lease = self._lease, None
        if lease is not None:
            try:
                await asyncio.wait_for(self.etcd.revoke_lease(lease.id), 1.0)
            except Exception:  # noqa: BLE001 - best effort
                pass

    async def _remove_stale_address(self) -> None:
        """A holder killed before its address expired (or an address added by hand) must not
        answer next to the real holder."""
        if self.address is None:
            return
        try:
            if await self.address.remove():
                log.warning("removed a stale %s from %s", self.address.cidr, self.address.interface)
        except OSError as e:
            log.error("could not check for a stale VIP address: %s", e)
