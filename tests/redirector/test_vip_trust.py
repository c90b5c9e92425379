"""A holder that can no longer trust its lease neither adds the VIP address nor announces it.

A real pause (GC, SIGSTOP, a VM descheduled) right after an etcd answer cannot be produced
reliably, so the trust clock is faked narrowly: ``_trusted_until`` is made to say "expired"
at the exact point the pause would end. etcd, the lease and the VIP record are real; the
address is a recorder (no interface is touched).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from redirector.vip import LeaseLost, VipHolder
from zstore.config import RedirectorConfig
from zstore.keys import Keys
from zstore.records import VipRecord

pytestmark = pytest.mark.timeout(30)


class FakeAddress:
    """Stands in for VipAddress: records add/announce/remove."""

    def __init__(self) -> None:
        self.vip, self.interface, self.cidr, self.lifetime = "10.77.0.100", "eth0", "10.77.0.100/32", 3
        self.calls: list[str] = []

    async def add(self) -> None:
        self.calls.append("add")

    async def remove(self) -> bool:
        self.calls.append("remove")
        return True

    def announce(self) -> bool:
        self.calls.append("announce")
        return True


def expire_trust(holder: VipHolder) -> None:
    """From now on the holder's lease is past its trusted window (as after a long pause)."""
    holder._trusted_until = lambda: time.monotonic() - 0.001


async def make_holder(etcd_client, etcd_config) -> tuple[VipHolder, FakeAddress]:
    cfg = RedirectorConfig(vip="10.77.0.100", port=3260, interface="eth0", lease_ttl=3)
    h = VipHolder(etcd_client, Keys(etcd_config.prefix), cfg, "r1")
    h.address = addr = FakeAddress()
    h._lease = await etcd_client.lease(3)
    h._refreshed = time.monotonic()
    return h, addr


async def test_paused_after_winning_the_vip_adds_no_address_and_sends_no_arp(etcd_client, etcd_config,
                                                                          monkeypatch):
    h, addr = await make_holder(etcd_client, etcd_config)
    real_txn = etcd_client.transaction

    async def txn_then_pause(*args, **kwargs):
        answer = await real_txn(*args, **kwargs)
        expire_trust(h)            # the winning txn's answer arrives after the pause
        return answer
    monkeypatch.setattr(etcd_client, "transaction", txn_then_pause)
    acquired: list[VipRecord] = []

    async def on_acquire(rec: VipRecord) -> None:
        acquired.append(rec)
    try:
        with pytest.raises(LeaseLost):
            await h._try_acquire(on_acquire)
        await asyncio.sleep(0.1)               # an announcer, had one started, runs now
        assert addr.calls == [] and acquired == [] and h._announcer is None
        assert not h.holding
    finally:
        await etcd_client.revoke_lease(h._lease.id)


async def test_paused_before_extending_the_address_does_not_extend_it(etcd_client, etcd_config):
    h, addr = await make_holder(etcd_client, etcd_config)
    try:
        await h._try_acquire(lambda rec: asyncio.sleep(0))
        assert h.holding and addr.calls[0] == "add"
        h._announcer.cancel()                  # (its ARPs are the other test's business)
        await asyncio.gather(h._announcer, return_exceptions=True)
        addr.calls.clear()
        await h._confirm()                     # trusted: extends the address
        assert addr.calls == ["add"]
        addr.calls.clear()
        expire_trust(h)                        # paused between the refresh's answer and the add
        with pytest.raises(LeaseLost):
            await h._confirm()
        assert addr.calls == []
    finally:
        for t in (h._announcer, getattr(h, "_watcher", None)):
            if t is not None:
                t.cancel()
                await asyncio.gather(t, return_exceptions=True)
        await etcd_client.revoke_lease(h._lease.id)


async def test_the_announcer_stops_once_the_lease_is_not_trusted(etcd_client, etcd_config):
    """The later gratuitous ARPs (1 s and lifetime+1.5 s after acquiring) are sent only while
    the hold is still trusted: a holder resumed from a pause sends none."""
    h, addr = await make_holder(etcd_client, etcd_config)
    try:
        await h._try_acquire(lambda rec: asyncio.sleep(0))
        await asyncio.sleep(0.1)
        assert addr.calls == ["add", "announce"]
        expire_trust(h)
        await asyncio.sleep(1.3)               # past the second announcement's time
        assert addr.calls == ["add", "announce"]
    finally:
        for t in (h._announcer, getattr(h, "_watcher", None)):
            if t is not None:
                t.cancel()
                await asyncio.gather(t, return_exceptions=True)
        await etcd_client.revoke_lease(h._lease.id)
