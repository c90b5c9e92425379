"""The per-host connection share counts an IPv6 host by its /64.

One host (or one attacker) picks addresses in its /64 at will, so keyed on the exact address
the share bounded nothing. Connections are fed to the portal's handler directly with a peer
address of our choosing (loopback cannot give IPv6 sources in one /64).
"""

from __future__ import annotations

import asyncio

import pytest

from redirector.portal import RedirectPortal, host_of
from tests.cluster import async_wait_for

pytestmark = pytest.mark.timeout(30)


def test_host_of():
    assert host_of("10.1.2.3") == "10.1.2.3"
    assert host_of("::ffff:10.1.2.3") == "10.1.2.3"
    assert host_of("2001:db8:1:2::5") == host_of("2001:db8:1:2:ffff::77") == "2001:db8:1:2::/64"
    assert host_of("2001:db8:1:3::5") != host_of("2001:db8:1:2::5")
    assert host_of("fe80::1%eth0") == "fe80::/64"


class FakeWriter:
    def __init__(self, peer: str) -> None:
        self.peer, self.closed = peer, False
        self.transport = self

    def get_extra_info(self, name: str, default=None):
        return {"peername": (self.peer, 40000, 0, 0)}.get(name, default)

    def write(self, data: bytes) -> None:
        pass

    async def drain(self) -> None:
        pass

    def abort(self) -> None:
        self.closed = True

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    async def wait_closed(self) -> None:
        pass


async def test_ipv6_peers_in_one_64_share_one_hosts_cap():
    p = RedirectPortal(None, None, holding=lambda: True, login_timeout=2.0, max_connections=8)  # 2 per host
    p._closed = False                               # as after open(), without a listener
    tasks = []

    def connect(peer: str) -> asyncio.Task:
        reader = asyncio.StreamReader()            # sends nothing: held until the login timeout
        t = asyncio.ensure_future(p._handle(reader, FakeWriter(peer)))
        tasks.append(t)
        return t
    try:
        for i in (1, 2):
            connect(f"2001:db8:1:2::{i}")
        await async_wait_for(lambda: p.connection_count() == 2, 5, "2 connections held")
        third = connect("2001:db8:1:2::3")          # another address, same /64: same host
        await asyncio.wait_for(asyncio.shield(third), 1.0)
        assert p.refused == 1
        other = connect("2001:db8:1:3::1")          # another /64: another host, served
        await asyncio.sleep(0.2)
        assert not other.done() and p.refused == 1
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_full_portal_ends_the_heaviest_hosts_oldest_connection_for_a_new_host():
    """Four hosts holding their share each filled the portal, and every other initiator's
    login was refused for as long as they kept their connections (idle discovery sessions
    are held for minutes). The newcomer now gets a slot: the oldest connection of the host
    holding the most is ended. A host already at its share is still refused."""
    p = RedirectPortal(None, None, holding=lambda: True, login_timeout=5.0, max_connections=8)  # 2 per host
    p._closed = False
    tasks: dict[str, asyncio.Task] = {}

    def connect(peer: str, name: str) -> asyncio.Task:
        t = asyncio.ensure_future(p._handle(asyncio.StreamReader(), FakeWriter(peer)))
        tasks[name] = t
        return t
    try:
        for h in range(1, 5):
            for k in range(2):
                connect(f"10.0.0.{h}", f"h{h}-{k}")
                await async_wait_for(lambda: p.connection_count() == len(tasks), 5, "held")
        assert p.connection_count() == 8 and p.refused == 0
        newcomer = connect("10.0.0.9", "new")
        await async_wait_for(lambda: tasks["h1-0"].done(), 2, "the oldest of a heaviest host ended")
        await asyncio.sleep(0.1)
        assert not newcomer.done() and p.refused == 0 and p.evicted == 1
        assert p.connection_count() == 8
        assert all(not t.done() for n, t in tasks.items() if n != "h1-0")
        again = connect("10.0.0.2", "h2-again")       # h2 at its share: refused, nobody ended
        await asyncio.wait_for(asyncio.shield(again), 1.0)
        assert p.refused == 1 and p.evicted == 1
        assert p.connection_count() == 8 and dict(p._hosts)["10.0.0.9"] == 1
    finally:
        for t in tasks.values():
            t.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
    assert p.connection_count() == 0 and not p._hosts
