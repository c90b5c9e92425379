"""The iSCSI portal on the VIP: answers logins with redirects and serves discovery.

A Normal-session login is answered, as soon as its first Login Request text
is complete, with "target moved temporarily" (0x0101) and the chosen chunk
server's portal (``Members.choose``); an unknown target gets 0x0203 and, with
no chunk server up, 0x0301 "service unavailable". Temporary, not permanent:
open-iscsi and libiscsi then reconnect to the VIP after losing the chunk
server, and get a fresh choice (field notes §5).

Redirect before CHAP (``login.py`` does it in that order; this is why we keep
it). The redirector then needs no per-target CHAP secrets for normal logins,
and the chunk server, which does hold them, authenticates the real session;
redirecting after CHAP would authenticate twice per login and would make the
VIP holder a second place that must get every secret right. The cost: the
redirect tells an unauthenticated client which chunk server serves a target
it names, i.e. the chunk portals, which are reachable and not secret anyway;
and open-iscsi logs a harmless "Login authentication failed" (conn error
1020) before the redirected login succeeds (open-iscsi #117).

Discovery sessions are served here (with discovery CHAP if configured):
SendTargets lists only the targets the initiator may see, each at the VIP,
never at a chunk server, so what the initiator records is the address that
survives failures.

Every connection is its own asyncio task with a bounded login (first PDU,
each PDU and the whole login within ``login_timeout``); connections are
capped in total and per peer address (a quarter of the total), so a flood or
a pile of half-open connections from one host cannot lock the others out;
discovery sessions live at most ``DISCOVERY_LIFETIME``.

Those caps act only while descriptors last: asyncio accepts up to
``LISTEN_BACKLOG`` connections per wakeup before any handler can refuse one,
so a full portal may briefly hold that many more, plus what etcd, logging and
the ``ip`` helper use. ``descriptors_needed`` is that sum; the daemon raises
its open-file limit and refuses a ``max_connections`` that does not fit. Should
accept still fail for lack of resources, asyncio pauses accepting for a second
but logs once per queued connection (tens of thousands of lines a minute):
``AcceptErrorLimiter`` lets one such line through every ``ACCEPT_ERROR_LOG``
seconds.

Only the VIP holder may answer (a stale holder's redirect is a split brain):
``holding`` (``VipHolder.holding``: our lease is surely alive) is checked when
a connection starts, when its login is decided and before each discovery
answer; when it is false the connection is dropped without a word. ``close``
also covers connections the loop accepted but whose task has not run yet: they
see the portal closed and drop themselves.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import time
from collections import Counter
from typing import Callable

from chunk import scsi
from chunk.catalog import Catalog
from chunk.iscsi.constants import LoginStatus
from chunk.iscsi.errors import LoginError
from chunk.iscsi.login import LoginResult, login
from chunk.iscsi.negotiation import TargetPreferences
from chunk.iscsi.session import Session
from chunk.iscsi.target import ScsiGlue, discovery_chap
from zstore.records import ChapRecord

from .members import Members

log = logging.getLogger(__name__)

TPGT = 1                    # the chunk servers' portal group tag too
PER_HOST_SHARE = 4          # one peer host may hold at most 1/4 of the connections
IPV6_HOST_PREFIX = 64       # an IPv6 host is a /64: it can pick any address in it at will
DISCOVERY_LIFETIME = 120.0  # seconds; initiators log out right after SendTargets
NOP_INTERVAL = 10.0
LISTEN_BACKLOG = 1024       # also how many connections asyncio accepts per wakeup
FD_RESERVE = 128            # descriptors besides connections: etcd, log, listener, `ip`, ARP
ACCEPT_ERROR_LOG = 10.0     # seconds between two "accept() out of system resource" lines


def descriptors_needed(max_connections: int) -> int:
    """The open-file limit a portal allowing ``max_connections`` needs."""
    return max_connections + LISTEN_BACKLOG + FD_RESERVE


class AcceptErrorLimiter(logging.Filter):
    """On asyncio's logger: one "accept() out of system resource" record every
    ``ACCEPT_ERROR_LOG`` seconds, with how many were dropped; other records pass."""

    MESSAGE = "socket.accept() out of system resource"

    def __init__(self) -> None:
        super().__init__()
        self.dropped, self.last = 0, -ACCEPT_ERROR_LOG

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.MESSAGE):
            return True
        now = time.monotonic()
        if now - self.last < ACCEPT_ERROR_LOG:
            self.dropped += 1
            return False
        rest = str(record.msg)[len(self.MESSAGE):]
        record.msg = f"{self.MESSAGE} ({self.dropped} more since the last report){rest}"
        self.dropped, self.last = 0, now
        return True


ACCEPT_ERRORS = AcceptErrorLimiter()


def host_of(peer: str) -> str:
    """What the per-host connection share counts by: an IPv4 address as it is (also one
    mapped into IPv6); an IPv6 address by its /64, which one host (or one attacker) can
    fill with addresses of its own choosing."""
    try:
        ip = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return peer
    if ip.version == 4:
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.ip_network(f"{ip}/{IPV6_HOST_PREFIX}", strict=False))


def address(host: str, port: int) -> str:
    """``host:port`` as a TargetAddress wants it (IPv6 in brackets)."""
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


class NotHolding(BaseException):
    """The VIP is not (surely) ours: drop the connection, answer nothing.

    A BaseException so that login()'s catch-all, which answers TARGET_ERROR,
    and the session's command handlers let it through to ``_handle``."""


def _check(holding: Callable[[], bool]) -> None:
    if not holding():
        raise NotHolding()


class RedirectPolicy:
    """login()'s LoginPolicy: targets from the catalog, redirects from Members.

    Every decision first checks ``holding``, so no answer (redirect, "no such
    target", a discovery login) leaves a redirector that lost the VIP."""

    def __init__(self, catalog: Catalog, members: Members, tsihs: set[int],
                 holding: Callable[[], bool]):
        self.catalog, self.members, self.tsihs = catalog, members, tsihs
        self.holding = holding

    def target_exists(self, target_iqn: str) -> bool:
        _check(self.holding)
        return self.catalog.target(target_iqn) is not None

    def chap_for(self, target_iqn: str | None, initiator: str) -> ChapRecord | None:
        # Only discovery sessions get this far: normal logins are redirected first.
        _check(self.holding)
        if target_iqn is None:
            return discovery_chap(self.catalog, initiator)      # refused if only per-target CHAP
        return self.catalog.chap_for(target_iqn, initiator)

    def redirect(self, initiator: str, target_iqn: str | None) -> str | None:
        _check(self.holding)
        if target_iqn is None:
            return None                         # discovery: served here
        # Only initiators on an ACL of this target get a sticky record (bounded by
        # what admins configured); the others are redirected all the same, and the
        # chunk server shows them no LUN, exactly as it would without us.
        portal = self.members.choose(initiator, target_iqn,
                                     record=bool(self.catalog.visible_luns(target_iqn, initiator)))
        if portal is None:
            raise LoginError("no chunk server is up to serve the target",
                             LoginStatus.SERVICE_UNAVAILABLE)
        return portal

    def new_tsih(self) -> int:
        """A free TSIH; with all 65535 in use (only discovery sessions hold one, at most
        ``max_connections`` <= 65535) the login is refused rather than looping forever."""
        if len(self.tsihs) >= 0xFFFF:
            raise LoginError("every TSIH is in use", LoginStatus.OUT_OF_RESOURCES)
        while True:
            tsih = random.randint(1, 0xFFFF)
            if tsih not in self.tsihs:
                return tsih


class DiscoveryView:
    """A discovery session's resolver: no LUNs, SendTargets at the VIP only."""

    def __init__(self, catalog: Catalog, initiator: str, vip: str, holding: Callable[[], bool]):
        self.catalog, self.initiator, self.vip, self.holding = catalog, initiator, vip, holding

    def unit(self, lun: int) -> None:
        return None

    def visible_luns(self) -> list[int]:
        return []

    def send_targets(self, which: str) -> list[tuple[str, list[str]]]:
        _check(self.holding)                # ends the session with no answer
        visible = self.catalog.visible_targets(self.initiator)
        if which == "All":
            names = visible
        else:                       # "" names the session's target: a discovery session has none
            names = [which] if which in visible else []
        return [(n, [f"{self.vip},{TPGT}"]) for n in names]


class RedirectPortal:
    """Listens on one address while told to; one bounded task per connection.

    ``holding`` says whether we may answer at all (the VIP holder's lease is surely alive)."""

    def __init__(self, catalog: Catalog, members: Members, *, holding: Callable[[], bool],
                 login_timeout: float, max_connections: int, prefs: TargetPreferences | None = None,
                 discovery_lifetime: float = DISCOVERY_LIFETIME):
        self.catalog, self.members = catalog, members
        self.login_timeout, self.max_connections = login_timeout, max_connections
        self.per_host = max(1, max_connections // PER_HOST_SHARE)
        self.prefs = prefs or TargetPreferences()
        self.discovery_lifetime = discovery_lifetime
        self.tsihs: set[int] = set()
        self.holding = holding
        self.policy = RedirectPolicy(catalog, members, self.tsihs, holding)
        self.advertise = ""
        self.refused = 0
        self.evicted = 0            # connections ended to make room for another host's
        self._server: asyncio.base_events.Server | None = None
        self._conns: dict[asyncio.Task, str] = {}
        self._hosts: Counter[str] = Counter()
        self._closed = True

    @property
    def listening(self) -> bool:
        return self._server is not None

    def connection_count(self) -> int:
        return len(self._conns)

    async def open(self, host: str, port: int) -> None:
        """Start listening on ``host:port`` (raises OSError if it cannot bind)."""
        if self._server is not None:
            return
        self.advertise = address(host, port)
        self._closed = False
        logging.getLogger("asyncio").addFilter(ACCEPT_ERRORS)      # once: filters are a set
        self._server = await asyncio.start_server(self._handle, host, port, backlog=LISTEN_BACKLOG,
                                                  reuse_address=True)
        log.info("redirecting iSCSI logins on %s", self.advertise)

    async def close(self) -> None:
        """Stop listening and drop every connection (the VIP is no longer ours).

        Connections already accepted whose task has not started are not in
        ``_conns`` yet; ``_closed`` makes them drop themselves when they start."""
        self._closed = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
            log.info("stopped listening on %s", self.advertise)
        tasks = list(self._conns)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            try:
                await asyncio.wait_for(server.wait_closed(), 2.0)
            except asyncio.TimeoutError:
                pass

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        peer = writer.get_extra_info("peername")
        host = host_of(str(peer[0])) if peer else "?"
        self._conns[task] = host
        self._hosts[host] += 1
        try:
            if self._closed:
                raise NotHolding()          # accepted just before close(): not ours to serve
            _check(self.holding)
            if len(self._conns) > self.max_connections and self._hosts[host] <= self.per_host:
                self._make_room(host)
            if len(self._conns) > self.max_connections or self._hosts[host] > self.per_host:
                self.refused += 1
                if self.refused % 100 == 1:
                    log.warning("refusing connection from %s: %d open (%d from it); %d refused so far",
                                host, len(self._conns), self._hosts[host], self.refused)
                return
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = self.login_timeout
            result = await login(reader, writer, self.policy, self.prefs, tpgt=TPGT,
                                 first_pdu_timeout=t, pdu_timeout=t, deadline=t)
            if result is None:
                return                          # redirected, refused, or dropped
            if result.params.session_type != "Discovery":
                log.error("normal session from %s was not redirected; closing", host)
                return
            await self._discovery(reader, writer, result)
        except NotHolding:
            log.info("dropping connection from %s: the VIP is not ours", host)
            writer.transport.abort()        # and whatever was queued for it
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        except Exception:  # noqa: BLE001 - one connection must never take the portal down
            log.exception("connection from %s failed", host)
        finally:
            if self._conns.pop(task, None) is not None:     # not already counted out (evicted)
                self._hosts[host] -= 1
            if self._hosts[host] <= 0:
                self._hosts.pop(host, None)
            writer.close()

    def _make_room(self, host: str) -> None:
        """The portal is full and ``host`` is within its share: end the oldest connection of
        the host holding the most, if that is more than ``host`` holds (itself included).

        Refusing the newcomer let a few hosts (a flood, or idle discovery sessions held for
        minutes) keep every other initiator from logging in; this way a host with fewer
        connections always gets one, and only the heaviest host loses one."""
        heavy, most = max(self._hosts.items(), key=lambda kv: kv[1])
        if most <= self._hosts[host]:
            return
        victim = next((t for t, h in self._conns.items() if h == heavy and not t.done()), None)
        if victim is None:
            return
        self.evicted += 1
        if self.evicted % 100 == 1:
            log.warning("portal full (%d connections): ending the oldest of %s's %d for one from %s; "
                        "%d evicted so far", len(self._conns), heavy, most, host, self.evicted)
        del self._conns[victim]                 # counted out now; its task's finally skips it
        self._hosts[heavy] -= 1
        victim.cancel()

    async def _discovery(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         r: LoginResult) -> None:
        _check(self.holding)
        p = r.params
        nexus = scsi.Nexus(initiator=f"{p.initiator_name},i,0x{r.isid.hex()}",
                           target_port=f"discovery,t,0x{TPGT:04x}", relative_port_id=TPGT)
        sess = Session(reader, writer, p, isid=r.isid, tsih=r.tsih, statsn=r.statsn,
                       expcmdsn=r.expcmdsn, resolver=DiscoveryView(self.catalog, p.initiator_name,
                                                                   self.advertise, self.holding),
                       scsi=ScsiGlue, nexus=nexus, nop_interval=NOP_INTERVAL, nop_timeout=NOP_INTERVAL)
        self.tsihs.add(r.tsih)
        log.info("discovery session: %s (tsih %d)", p.initiator_name, r.tsih)
        try:
            await asyncio.wait_for(sess.run(), self.discovery_lifetime)
        except asyncio.TimeoutError:
            log.info("discovery session of %s closed after %.0fs", p.initiator_name,
                     self.discovery_lifetime)
        finally:
            self.tsihs.discard(r.tsih)
