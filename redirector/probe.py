"""Is each chunk server's iSCSI portal reachable? TCP connects from the VIP holder.

A chunk server renews its lease from its own process; that says nothing about its
portal: a storage NIC down, a firewall rule or a dead listener leave it "up" in etcd
while every initiator sent there fails, comes back to the VIP and, sticky, is sent
there again until an admin drains it (longer than open-iscsi's replacement_timeout:
the filesystem sees I/O errors).

Why a background prober rather than a probe per login: a login's redirect is decided
synchronously (``LoginPolicy.redirect``), so it costs no round trip and a login storm
costs no connects. Only the VIP holder probes (one connect per chunk server per
``interval``, whatever the number of redirectors), all servers concurrently, each
bounded by ``timeout``. One lost SYN moves nobody: a server is unreachable only after
``failures`` failed probes in a row, reachable again after one success. So a dead
portal stops getting logins within ``interval * failures + timeout`` seconds.

What a verdict does (``Members``): it only diverts logins. A server whose portal fails
gets no logins while it fails, but sticky records pointing at it are kept, not rewritten,
so when it answers again its initiators land back where they were (the probe sees the
holder's route, not the initiators'). Since a wrong verdict thus does no lasting harm, it
is obeyed however many portals fail (in a real outage of most portals the initiators can
only use the ones that answer); only when none answers does every up server take logins,
the holder's own network (a NIC, a route, a firewall on this host) being then the likelier
fault. More than half failing is logged once at WARNING, as information only.
"""

from __future__ import annotations

import asyncio
import logging

from .members import Members

log = logging.getLogger(__name__)

PROBE_INTERVAL = 2.0        # seconds between passes
PROBE_TIMEOUT = 1.0         # bound on one connect
PROBE_FAILURES = 2          # failed passes in a row before a server is unreachable


def split_portal(portal: str) -> tuple[str, int]:
    """ "host:port" or "[v6]:port" -> (host, port)."""
    host, _, port = portal.rpartition(":")
    return host.strip("[]"), int(port)


class PortalProber:
    def __init__(self, members: Members, interval: float = PROBE_INTERVAL,
                 timeout: float = PROBE_TIMEOUT, failures: int = PROBE_FAILURES):
        self.members = members
        self.interval, self.timeout, self.failures = interval, timeout, failures

    async def run(self) -> None:
        """Probe until cancelled; a cancelled prober leaves every server reachable again,
        so stale verdicts never outlive the VIP holder that made them."""
        fails: dict[tuple[str, str], int] = {}      # (chunk id, portal) -> failed passes in a row
        try:
            while True:
                targets = [(cid, c.portal) for cid, c in self.members.chunks.items() if c.usable]
                ok = await asyncio.gather(*(self._reachable(p) for _, p in targets))
                fails = {t: 0 if good else fails.get(t, 0) + 1 for t, good in zip(targets, ok)}
                self.members.set_unreachable({cid for (cid, _), n in fails.items() if n >= self.failures})
                await asyncio.sleep(self.interval)
        finally:
            self.members.set_unreachable(set())

    async def _reachable(self, portal: str) -> bool:
        try:
            host, port = split_portal(portal)
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), self.timeout)
        except (OSError, ValueError, asyncio.TimeoutError):
            return False
        writer.transport.abort()                # nothing to say; do not wait for the close
        return True
