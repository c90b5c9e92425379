"""The VIP portal in-process: redirect answers, discovery at the VIP, and connection bounds.

Catalog and members are stand-ins with fixed answers; the wire side is real
TCP on loopback (127.0.0.x sources stand for different hosts).
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import time
from dataclasses import dataclass, field

import pytest

from chunk.iscsi import pdu as P
from chunk.iscsi.constants import LoginStatus
from chunk.iscsi.text import encode_text
from redirector.portal import RedirectPortal, address
from tests.redirector.iscsi_client import ISID
from tests.cluster import async_wait_for
from tests.redirector.iscsi_client import RawInitiator

pytestmark = pytest.mark.timeout(60)

T1, T2, T3 = (f"iqn.2026-01.io.zstore:abcd1234.t000{i}" for i in (1, 2, 3))
INIT, STRANGER = "iqn.1994-05.com.example:host1", "iqn.1994-05.com.example:stranger"
CHUNK = "127.0.0.1:3261"


@dataclass
class FakeCatalog:
    visible: dict[str, list[str]] = field(default_factory=lambda: {INIT: [T1, T2]})

    def target(self, iqn):
        return object() if iqn in (T1, T2, T3) else None

    def chap_for(self, target, initiator):
        return None

    def visible_targets(self, initiator):
        return sorted(self.visible.get(initiator, []))

    def visible_luns(self, target, initiator):
        return {1: object()} if target in self.visible.get(initiator, []) else {}


@dataclass
class FakeMembers:
    portal: str | None = CHUNK
    asked: list[tuple[str, str]] = field(default_factory=list)
    recorded: list[tuple[str, str]] = field(default_factory=list)

    def choose(self, initiator, target, record=True):
        self.asked.append((initiator, target))
        if record:
            self.recorded.append((initiator, target))
        return self.portal


async def _open(holding=lambda: True, **kw) -> tuple[RedirectPortal, FakeMembers, int]:
    members = FakeMembers()
    p = RedirectPortal(FakeCatalog(), members, login_timeout=1.0, max_connections=8, holding=holding, **kw)
    await p.open("127.0.0.2", 0)
    port = p._server.sockets[0].getsockname()[1]
    p.advertise = address("127.0.0.2", port)      # bound to port 0: advertise the real one
    return p, members, port


@pytest.fixture
async def portal():
    p, members, port = await _open()
    yield p, members, port
    await p.close()


def _login_request(target: str | None) -> bytes:
    pairs = [("InitiatorName", INIT), ("SessionType", "Normal" if target else "Discovery")]
    if target:
        pairs.append(("TargetName", target))
    return P.LoginRequest(transit=True, csg=1, nsg=3, isid=ISID, itt=0x10, cid=1, cmdsn=1,
                          data=encode_text(pairs)).to_bytes()


async def _rest(c: RawInitiator) -> bytes:
    """What the peer still sends before it closes (a reset counts as a close)."""
    got = b""
    try:
        while chunk := await asyncio.wait_for(c.r.read(65536), 5):
            got += chunk
    except ConnectionError:
        pass
    return got


async def _all_received(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the peer sends until it closes (a reset counts as a close)."""
    loop, got = asyncio.get_running_loop(), b""
    sock.setblocking(False)
    try:
        while chunk := await asyncio.wait_for(loop.sock_recv(sock, 65536), timeout):
            got += chunk
    except ConnectionError:
        pass
    return got


async def test_normal_login_is_redirected_without_tpgt(portal):
    p, members, port = portal
    c = await RawInitiator.connect("127.0.0.2", port)
    resp, keys = await c.login(INIT, T1)
    assert resp.status == LoginStatus.TARGET_MOVED_TEMPORARILY
    assert keys == {"TargetAddress": CHUNK}          # no ",tpgt" in a redirect (RFC 7143 §13.8)
    assert not resp.transit and resp.tsih == 0
    assert members.asked == members.recorded == [(INIT, T1)]
    assert await c.closed()
    # Not on the target's ACL: redirected too (the chunk server masks), but nothing is recorded.
    s = await RawInitiator.connect("127.0.0.2", port)
    resp, keys = await s.login(STRANGER, T1)
    assert resp.status == LoginStatus.TARGET_MOVED_TEMPORARILY and keys == {"TargetAddress": CHUNK}
    assert members.asked[-1] == (STRANGER, T1) and members.recorded == [(INIT, T1)]


async def test_unknown_target_and_no_chunk_server(portal):
    p, members, port = portal
    c = await RawInitiator.connect("127.0.0.2", port)
    resp, _ = await c.login(INIT, "iqn.2026-01.io.zstore:nope.t9999")
    assert resp.status == LoginStatus.NOT_FOUND and members.asked == []
    members.portal = None
    c = await RawInitiator.connect("127.0.0.2", port)
    resp, _ = await c.login(INIT, T1)
    assert resp.status == LoginStatus.SERVICE_UNAVAILABLE
    assert await c.closed()


async def test_discovery_lists_visible_targets_at_the_vip(portal):
    p, members, port = portal
    c = await RawInitiator.connect("127.0.0.2", port)
    resp, _ = await c.login(INIT, None)
    assert resp.status == 0 and resp.transit and resp.tsih
    vip = f"127.0.0.2:{port},1"
    assert await c.send_targets("All") == [("TargetName", T1), ("TargetAddress", vip),
                                           ("TargetName", T2), ("TargetAddress", vip)]
    assert await c.send_targets(T2) == [("TargetName", T2), ("TargetAddress", vip)]
    assert await c.send_targets(T3) == []             # exists, but not visible to INIT
    assert await c.send_targets("") == []
    c.close()
    s = await RawInitiator.connect("127.0.0.2", port)
    assert (await s.login(STRANGER, None))[0].status == 0
    assert await s.send_targets("All") == []
    assert members.asked == []
    s.close()


async def test_half_open_and_garbage_are_bounded_per_host(portal):
    p, _, port = portal                                      # 8 connections, 2 per host
    t0 = time.monotonic()
    idle = [await RawInitiator.connect("127.0.0.2", port, source="127.0.0.3") for _ in range(2)]
    await async_wait_for(lambda: p.connection_count() == 2, 5, "2 connections held")
    extra = await RawInitiator.connect("127.0.0.2", port, source="127.0.0.3")
    assert await extra.closed(2)                              # over its host's share: dropped at once
    garbage = await RawInitiator.connect("127.0.0.2", port, source="127.0.0.4")
    garbage.w.write(b"\xff" * 48 + b"junk")                   # unknown opcode, not a login
    huge = await RawInitiator.connect("127.0.0.2", port, source="127.0.0.4")
    huge.w.write(P.LoginRequest(transit=True, csg=1, nsg=3).to_bytes()[:4] + b"\xff" * 44)
    # Meanwhile another host logs in as usual.
    good = await RawInitiator.connect("127.0.0.2", port, source="127.0.0.5")
    assert (await good.login(INIT, T1))[0].status == LoginStatus.TARGET_MOVED_TEMPORARILY
    assert await garbage.closed(3) and await huge.closed(3)
    for c in idle:                                            # closed by the login timeout (1 s)
        assert await c.closed(3)
    assert time.monotonic() - t0 < 5
    await async_wait_for(lambda: p.connection_count() == 0, 5, "all connections gone")


async def test_total_cap(portal):
    p, _, port = portal
    held = [await RawInitiator.connect("127.0.0.2", port, source=f"127.0.1.{i}") for i in range(8)]
    await async_wait_for(lambda: p.connection_count() == 8, 5, "8 connections held")
    late = await RawInitiator.connect("127.0.0.2", port, source="127.0.2.1")
    assert await late.closed(2)
    for c in held:
        c.close()
    await async_wait_for(lambda: p.connection_count() == 0, 5, "held connections closed")
    ok = await RawInitiator.connect("127.0.0.2", port, source="127.0.2.1")
    assert (await ok.login(INIT, T1))[0].status == LoginStatus.TARGET_MOVED_TEMPORARILY


async def test_close_drops_connections_and_stops_listening(portal):
    p, _, port = portal
    c = await RawInitiator.connect("127.0.0.2", port)
    await async_wait_for(lambda: p.connection_count() == 1, 5, "connection held")
    await p.close()
    assert not p.listening and await c.closed(2)
    with pytest.raises(OSError):
        await RawInitiator.connect("127.0.0.2", port)


async def test_not_holding_the_vip_answers_nothing():
    """A frozen holder that resumes past its lease must not answer the logins queued meanwhile."""
    p, members, port = await _open(holding=lambda: False)
    try:
        for target in (T1, "iqn.2026-01.io.zstore:nope.t9999", None):
            c = await RawInitiator.connect("127.0.0.2", port)
            c.w.write(_login_request(target))
            assert await _rest(c) == b""        # closed (EOF or reset) with no response at all
        assert members.asked == [] and p.connection_count() == 0
    finally:
        await p.close()


async def test_vip_lost_mid_connection_answers_nothing():
    """Holding is checked when the login is decided and before each discovery answer,
    not only when the connection starts."""
    held = [True]
    p, members, port = await _open(holding=lambda: held[0])
    try:
        login = await RawInitiator.connect("127.0.0.2", port)
        disc = await RawInitiator.connect("127.0.0.2", port)
        assert (await disc.login(INIT, None))[0].status == 0
        await async_wait_for(lambda: p.connection_count() == 2, 5, "both connections started")
        held[0] = False
        login.w.write(_login_request(T1))
        assert await _rest(login) == b"" and members.asked == []
        disc.w.write(P.TextRequest(final=True, itt=0x11, ttt=0xFFFFFFFF, cmdsn=1, expstatsn=1,
                                   data=encode_text([("SendTargets", "All")])).to_bytes())
        assert await _rest(disc) == b""           # no SendTargets answer, session over
    finally:
        await p.close()


async def test_close_drops_connections_accepted_but_not_yet_started(portal):
    """A connection the loop has accepted but whose task has not run yet is not in _conns:
    close() must still keep it from being served once the VIP is given up."""
    p, members, port = portal
    client = socket.create_connection(("127.0.0.2", port), timeout=5)   # queued in the kernel
    try:
        client.sendall(_login_request(T1))

        def unstarted() -> bool:
            return any(t.get_coro().__qualname__ == "RedirectPortal._handle"
                       and inspect.getcoroutinestate(t.get_coro()) == inspect.CORO_CREATED
                       for t in asyncio.all_tasks())
        deadline = time.monotonic() + 5
        while not unstarted():                      # one loop turn at a time
            assert time.monotonic() < deadline, "the connection was never accepted"
            await asyncio.sleep(0)
        assert p.connection_count() == 0
        await p.close()
        assert await _all_received(client) == b""   # no redirect after the release
        assert members.asked == []
    finally:
        client.close()


async def test_handle_after_close_writes_nothing(portal):
    """A connection task that starts after close() (accepted just before) returns at once."""
    p, members, port = portal
    got: asyncio.Queue = asyncio.Queue()

    async def keep(reader, writer):
        await got.put((reader, writer))
    other = await asyncio.start_server(keep, "127.0.0.2", 0)
    try:
        c = await RawInitiator.connect("127.0.0.2", other.sockets[0].getsockname()[1])
        c.w.write(_login_request(T1))
        reader, writer = await asyncio.wait_for(got.get(), 5)
        await p.close()
        await asyncio.wait_for(p._handle(reader, writer), 5)
        assert await _rest(c) == b"" and members.asked == []
    finally:
        other.close()


def test_address_brackets_ipv6():
    assert address("::1", 3260) == "[::1]:3260" and address("10.0.0.1", 3260) == "10.0.0.1:3260"
