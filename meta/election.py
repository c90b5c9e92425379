"""Leader election among meta servers, through an etcd lease, with an epoch.

The leader key holds the leader's record under the leader's lease; whoever
creates it (in a transaction that also bumps the epoch counter) leads until
its lease expires or is revoked. The epoch therefore grows by exactly one per
change of leader. Every write the leader makes compares the leader key with
its own record (``fence()``), so safety does not depend on clocks: a leader
that stalled past its lease simply finds its writes refused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import aetcd

from zstore.errors import Unavailable
from zstore.etcd import UNAVAILABLE_ERRORS
from zstore.keys import Keys
from zstore.records import LeaderRecord, MetaMember

log = logging.getLogger(__name__)


class Election:
    def __init__(self, etcd: aetcd.Client, keys: Keys, meta_id: str, url: str, ttl: int,
                 on_change: Callable[[bool], None] | None = None):
        self.etcd, self.keys, self.meta_id, self.url, self.ttl = etcd, keys, meta_id, url, ttl
        self.on_change = on_change or (lambda leading: None)
        self.record: LeaderRecord | None = None      # ours, while we lead
        self._value: bytes | None = None
        self._lease = None
        self._last_refresh = 0.0

    @property
    def is_leader(self) -> bool:
        if self.record is None:
            return False
        # Stop acting as leader a little before the lease can have expired.
        return time.monotonic() - self._last_refresh < self.ttl * 0.8

    def fence(self) -> list:
        if not self.is_leader or self._value is None:
            raise Unavailable("this meta server is not the leader", hint="retry; writes go to the leader")
        return [self.etcd.transactions.value(self.keys.leader()) == self._value]

    async def current(self) -> LeaderRecord | None:
        got = await self.etcd.get(self.keys.leader())
        return LeaderRecord.decode(got.value) if got else None

    def _step_down(self, why: str) -> None:
        if self.record is not None:
            log.warning("stepping down as leader (epoch %d): %s", self.record.epoch, why)
            self.record, self._value = None, None
            self.on_change(False)

    async def _try_acquire(self) -> None:
        lkey, ekey = self.keys.leader(), self.keys.epoch()
        if await self.etcd.get(lkey) is not None:
            return
        got = await self.etcd.get(ekey)
        epoch = int(got.value) if got else 0
        rec = LeaderRecord(meta_id=self.meta_id, url=self.url, epoch=epoch + 1)
        value = rec.encode()
        t = self.etcd.transactions
        cmp = [t.version(lkey) == 0, (t.mod(ekey) == got.mod_revision) if got else (t.version(ekey) == 0)]
        ok, _ = await self.etcd.transaction(
            compare=cmp, success=[t.put(lkey, value, lease=self._lease), t.put(ekey, str(epoch + 1).encode())],
            failure=[])
        if ok:
            self.record, self._value = rec, value
            log.info("elected leader, epoch %d", rec.epoch)
            self.on_change(True)

    async def run(self, stop: asyncio.Event) -> None:
        tick = max(0.2, min(1.0, self.ttl / 4))
        while not stop.is_set():
            try:
                self._lease = await self.etcd.lease(self.ttl)
                self._last_refresh = time.monotonic()
                await self.etcd.put(self.keys.meta_member(self.meta_id),
                                    MetaMember(meta_id=self.meta_id, url=self.url).encode(), lease=self._lease)
                refreshed = time.monotonic()
                while not stop.is_set():
                    if time.monotonic() - refreshed >= self.ttl / 3:
                        sent = time.monotonic()     # etcd restarts the TTL no earlier than this
                        reply = await self.etcd.refresh_lease(self._lease.id)
                        if reply is None or reply.TTL <= 0:
                            raise LookupError("lease expired")
                        refreshed = self._last_refresh = sent
                        if self.record is not None:
                            # Ours by lease is not enough: the key can be deleted or rewritten
                            # behind us (an operator, a restore) while the lease lives on, and a
                            # leader whose fence fails every write must let another lead.
                            got = await self.etcd.get(self.keys.leader())
                            if got is None or got.value != self._value:
                                self._step_down("the leader key no longer names this server")
                    if self.record is None:
                        await self._try_acquire()
                    elif not self.is_leader:
                        raise LookupError("lease not refreshed in time")
                    try:
                        await asyncio.wait_for(stop.wait(), tick)
                    except asyncio.TimeoutError:
                        pass
            except asyncio.CancelledError:
                raise
            except (LookupError, *UNAVAILABLE_ERRORS) as e:
                self._step_down(f"{type(e).__name__}: {e}")
                log.warning("etcd session lost (%s); retrying", e)
                await self._drop_lease()
                try:
                    await asyncio.wait_for(stop.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass
            except Exception:  # noqa: BLE001 - the election loop must survive anything
                self._step_down("unexpected error")
                log.exception("election loop error")
                await self._drop_lease()
                await asyncio.sleep(1.0)
        await self.resign()

    async def _drop_lease(self) -> None:
        """Revoke the current lease, best effort. After a lost session the leader key may
        still live under it: left alone it would keep every meta server (this one under its
        next lease too) from leading until the old lease's TTL ran out."""
        lease, self._lease = self._lease, None
        if lease is not None:
            try:
                await asyncio.wait_for(self.etcd.revoke_lease(lease.id), 2)
            except Exception:  # noqa: BLE001 - etcd may be gone; the lease then just expires
                pass

    async def resign(self) -> None:
        """Give up leadership at once (clean shutdown): revoke the lease."""
        self._step_down("shutting down")
        await self._drop_lease()
