"""The redirector daemon: ``python -m redirector.server --config FILE`` (``zstore-redirector``).

Initiators know one address, the VIP. Whichever redirector holds it
(``vip.VipHolder``: an etcd lease, epoch +1 per holder) listens there and
answers each Normal login with a temporary redirect to a chunk server
(``members``: sticky record, else rendezvous hash over live, non-draining
chunk servers) and serves discovery itself (``portal``). The other
redirectors stand by, mirroring the same state, so a takeover serves its
first login at once.

State comes only from watches (catalog: targets, ACLs, CHAP; members: chunk
servers and sticky records): nothing per login waits on etcd. A redirector
campaigns for the VIP only after both mirrors have their first listing, so a
fresh holder never answers "no such target" out of ignorance.

Runs until SIGTERM/SIGINT, then gives the VIP back (lease revoked, so a
standby takes over at once rather than after the lease TTL) and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import resource
import socket
import sys
from typing import NoReturn, Sequence

from chunk.catalog import Catalog
from zstore import config as zconfig
from zstore import etcd as zetcd
from zstore import logs
from zstore.daemon import stop_on_signals
from zstore.config import Config, ConfigError, RedirectorConfig
from zstore.fdlimit import raise_fd_limit
from zstore.keys import Keys
from zstore.records import VipRecord

from .members import Members
from .portal import RedirectPortal, descriptors_needed
from .probe import PortalProber
from .sweep import RedirectSweeper

log = logging.getLogger("redirector.server")

PROG = "zstore-redirector"
EXIT_USAGE = 2
SYNC_WARN = 5.0            # seconds without etcd listings before we say so
MAX_CONNECTIONS = 0xFFFF   # the TSIHs there are
MIN_FITTED = 64            # the least a default max_connections is lowered to (_fit_fd_limit)

EPILOG = """\
Flags override the config file (--config, else $ZSTORE_CONFIG, else
/etc/zstore/zstore.toml), which overrides ZSTORE_REDIRECTOR_* variables' defaults.
Exit status: 0 after SIGTERM or SIGINT, 2 for bad flags or config.
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (and exit 2), as for config errors."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see --help)")


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="zstore iSCSI login redirector on the VIP", epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="TOML config file")
    p.add_argument("--vip", metavar="ADDRESS", help="the address initiators log in to")
    p.add_argument("--port", metavar="PORT", help="iSCSI port on the VIP (default 3260)")
    p.add_argument("--interface", metavar="IFACE", help="where to add the VIP (default: none, "
                                                        "the address must already be local)")
    p.add_argument("--redirector-id", metavar="ID", help="stable name (default: hostname:port)")
    p.add_argument("--lease-ttl", metavar="SECONDS", help="VIP lease TTL: failover takes about this")
    p.add_argument("--login-timeout", metavar="SECONDS", help="bound on each connection's login")
    p.add_argument("--max-connections", metavar="N", help="connections held at once")
    p.add_argument("--etcd-endpoints", metavar="A,B", help="etcd endpoints, comma-separated")
    p.add_argument("--prefix", help="etcd key prefix")
    p.add_argument("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING, ERROR")
    p.add_argument("--log-file", metavar="FILE", help="log here instead of stderr")
    return p


def load_config(args: argparse.Namespace, env: dict[str, str] | None = None) -> Config:
    """Config file + env + flags; raises ConfigError."""
    env = dict(os.environ if env is None else env)
    path = zconfig.find_config_file(args.config, env)
    return zconfig.load(path, env=env, overrides={
        "redirector.vip": args.vip, "redirector.port": args.port,
        "redirector.interface": args.interface, "redirector.redirector_id": args.redirector_id,
        "redirector.lease_ttl": args.lease_ttl, "redirector.login_timeout": args.login_timeout,
        "redirector.max_connections": args.max_connections,
        "etcd.endpoints": args.etcd_endpoints, "etcd.prefix": args.prefix,
        "log.level": args.log_level, "log.file": args.log_file,
    })


def validate(cfg: Config, fd_limit: int | None = None) -> None:
    """Everything checkable before touching the network; fills in the default id.

    ``fd_limit``: the open-file limit the portal will run under; default the hard limit,
    which ``raise_fd_limit`` raises the soft one to."""
    r = cfg.redirector
    try:
        vip = ipaddress.ip_address(r.vip)
    except ValueError:
        raise ConfigError(f"redirector.vip: {r.vip!r} is not an IP address") from None
    # The portal listens on the VIP and SendTargets advertises it: it must name one host.
    for bad, what in ((vip.is_unspecified, "the wildcard address"), (vip.is_multicast, "a multicast address"),
                      (vip.is_link_local, "a link-local address")):
        if bad:
            raise ConfigError(f"redirector.vip: {r.vip} is {what}; it must be one host's unicast address")
    if not 1 <= r.port <= 65535:
        raise ConfigError(f"redirector.port: {r.port} is not a port (1-65535)")
    if not 1 <= r.lease_ttl <= 600:
        raise ConfigError(f"redirector.lease_ttl: {r.lease_ttl} must be between 1 and 600 seconds")
    if not 0 < r.login_timeout <= 300:
        raise ConfigError(f"redirector.login_timeout: {r.login_timeout} must be in (0, 300] seconds")
    if not 1 <= r.max_connections <= MAX_CONNECTIONS:     # each may hold a 16-bit TSIH
        raise ConfigError(f"redirector.max_connections: {r.max_connections} must be 1..{MAX_CONNECTIONS}")
    r.max_connections = _fit_fd_limit(r.max_connections, resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                                      if fd_limit is None else fd_limit)
    if r.interface is not None and not r.interface.strip():
        raise ConfigError("redirector.interface must not be blank")
    if not r.redirector_id:
        r.redirector_id = f"{socket.gethostname()}:{r.port}"
    if not cfg.etcd.endpoints:
        raise ConfigError("etcd.endpoints must not be empty")
    try:
        Keys(cfg.etcd.prefix)
    except ValueError as e:
        raise ConfigError(f"etcd.prefix: {e}") from None
    if logging.getLevelName(cfg.log.level.upper()) not in range(0, 100):
        raise ConfigError(f"log.level: unknown level {cfg.log.level!r}")


def _fit_fd_limit(max_connections: int, fd_limit: int) -> int:
    """Out of descriptors, accept fails before the connection caps act, and so does every
    `ip` call that keeps the VIP: a max_connections the limit cannot carry is refused when
    the config asked for it, and the default is lowered to fit (with a warning), so that a
    host or container with a low hard limit (1024) still runs a redirector. Below the floor
    (``MIN_FITTED``) an accept burst can still meet EMFILE, which the portal survives."""
    need = descriptors_needed(max_connections)
    if fd_limit == resource.RLIM_INFINITY or need <= fd_limit:
        return max_connections
    if max_connections != RedirectorConfig.max_connections:
        raise ConfigError(f"redirector.max_connections: {max_connections} connections need an "
                          f"open-file limit of at least {need}, but it is {fd_limit}; raise it "
                          f"(LimitNOFILE=, ulimit -n) or lower max_connections")
    fitted = max(MIN_FITTED, max_connections - (need - fd_limit))
    log.warning("the open-file limit is %d: redirector.max_connections lowered from %d to %d "
                "(raise LimitNOFILE= / ulimit -Hn to %d for the default)",
                fd_limit, max_connections, fitted, need)
    return fitted


class Redirector:
    """Mirrors, portal and VIP campaign of one redirector process."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.etcd = zetcd.client(cfg.etcd)
        self.keys = Keys(cfg.etcd.prefix)
        self.catalog = Catalog(self.etcd, self.keys)
        self.members = Members(self.etcd, self.keys)
        r = cfg.redirector
        self._holder = None                   # the VipHolder, once campaigning
        self._duties: list[asyncio.Task] = []     # the VIP holder's: portal probes, record sweep
        # The portal answers only while the holder is sure of its lease: a holder that
        # froze past it must not serve the logins queued meanwhile (split brain).
        self.portal = RedirectPortal(self.catalog, self.members, login_timeout=r.login_timeout,
                                     max_connections=r.max_connections,
                                     holding=lambda: self._holder is not None and self._holder.holding)

    async def run(self, stop: asyncio.Event) -> None:
        from .vip import VipHolder           # imported here: the portal and mirrors do not need it
        try:
            if not await self._sync(stop):
                return
            holder = self._holder = VipHolder(self.etcd, self.keys, self.cfg.redirector,
                                              self.cfg.redirector.redirector_id)
            log.info("redirector %s campaigning for VIP %s:%d", self.cfg.redirector.redirector_id,
                     self.cfg.redirector.vip, self.cfg.redirector.port)
            await holder.run(stop, self._on_acquire, self._on_release)
        finally:
            await self._stop_duties()
            await self.portal.close()
            await self.members.close()
            await self.catalog.close()
            try:
                await asyncio.wait_for(self.etcd.close(), 2.0)
            except Exception:  # noqa: BLE001 - exiting anyway
                pass

    async def _sync(self, stop: asyncio.Event) -> bool:
        """First listings of both mirrors; False if stopped first."""
        synced = asyncio.ensure_future(asyncio.gather(self.catalog.start(stop), self.members.start(stop)))
        stopped = asyncio.ensure_future(stop.wait())
        try:
            done, _ = await asyncio.wait({synced, stopped}, timeout=SYNC_WARN,
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done:
                log.warning("no listing from etcd at %s after %.0fs; still trying",
                            zetcd.describe(self.cfg.etcd), SYNC_WARN)
                await asyncio.wait({synced, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if synced.done():
                synced.result()
                log.info("catalog and chunk servers mirrored: %d targets, %d chunk servers usable",
                         len(self.catalog.targets), len(self.members.usable()))
                return True
            return False
        finally:
            stopped.cancel()
            if not synced.done():
                synced.cancel()
            await asyncio.gather(synced, stopped, return_exceptions=True)

    async def _on_acquire(self, rec: VipRecord) -> None:
        # An OSError (port taken, address not local) tells the holder to give the VIP up.
        await self.portal.open(rec.vip, rec.port)
        if not self._duties:
            self._duties = [asyncio.ensure_future(d.run()) for d in (
                PortalProber(self.members),
                RedirectSweeper(self.etcd, self.keys, self.catalog, self.members))]

    async def _on_release(self) -> None:
        await self._stop_duties()
        await self.portal.close()

    async def _stop_duties(self) -> None:
        """Only the VIP holder probes portals and sweeps records: one prober and one writer,
        not one per redirector."""
        for t in self._duties:
            t.cancel()
        await asyncio.gather(*self._duties, return_exceptions=True)
        self._duties = []


async def _serve(cfg: Config) -> None:
    await Redirector(cfg).run(stop_on_signals(log))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args)
        validate(cfg, fd_limit=raise_fd_limit())
    except ConfigError as e:
        fail(str(e))
    logs.setup("redirector", cfg.log.level, cfg.log.file)
    r = cfg.redirector
    log.info("redirector %s starting: VIP %s:%d%s, etcd %s%s", r.redirector_id, r.vip, r.port,
             f" on {r.interface}" if r.interface else "", zetcd.describe(cfg.etcd), cfg.etcd.prefix)
    asyncio.run(_serve(cfg))
    log.info("redirector %s stopped", r.redirector_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
