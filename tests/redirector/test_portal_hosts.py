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
