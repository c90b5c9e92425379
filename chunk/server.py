"""The chunk server daemon: ``python -m chunk.server --config FILE`` (``zstore-chunk``).

It prepares its identity and disks, keeps itself registered in etcd (see
``registration``), runs the storage engine (``storage/engine.py``: its extent
replicas, the replication port, coordinators for the volumes it serves) and
the iSCSI frontend over it. It runs until SIGTERM/SIGINT, then revokes its
lease so the cluster sees it down at once, and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any, NoReturn, Sequence

from zstore import config as zconfig
from zstore import etcd as zetcd
from zstore import logs
from zstore.daemon import stop_on_signals
from zstore.fdlimit import raise_fd_limit
from zstore.cli.client import tls_context
from zstore.config import Config, ConfigError, read_secret_file
from zstore.keys import Keys
from zstore.records import ChunkInfo

from . import disks as zdisks
from .catalog import Catalog
from .drain import AdminFollower
from .iscsi.target import IscsiTarget, TargetConfig
from .storage.engine import StorageEngine
from .storage.host_crash import BootState
from .shared_reservations import ReservationStore
from .storage.extent_file import EXTENT_SIZE
from .identity import IdentityError, load_or_create
from .registration import Registration

log = logging.getLogger("chunk.server")

PROG = "zstore-chunk"
CHUNK_ID_FILE = "chunk-id"
LOCK_FILE = "lock"
EXIT_SETUP = 1      # environment problem: data dir unusable, all disks failed, server already running
EXIT_USAGE = 2      # bad flags or config

EPILOG = """\
Flags override the config file (--config, else $ZSTORE_CONFIG, else
/etc/zstore/zstore.toml), which overrides ZSTORE_CHUNK_* variables' defaults.
--label adds to the labels from the config. Exit status: 0 after SIGTERM or
SIGINT, 2 for bad flags or config, 1 when it cannot start (data dir unusable,
already running on this data dir, every disk failed).
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (and exit 2), as for config errors."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see --help)", EXIT_USAGE)


def fail(message: str, code: int) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="zstore chunk server", epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="TOML config file")
    p.add_argument("--data-dir", metavar="DIR", help="where the chunk id and default disk live")
    p.add_argument("--disk", action="append", metavar="PATH[:CAPACITY]",
                   help="a disk directory, optionally with a capacity like 10Gi (repeatable; "
                        "without a capacity the filesystem's size is used)")
    p.add_argument("--address", help="host other servers reach this one at")
    p.add_argument("--data-port", metavar="PORT", help="replication port")
    p.add_argument("--portal", metavar="HOST:PORT", help="iSCSI portal")
    p.add_argument("--frontend", choices=("builtin", "lio"),
                   help="iSCSI target: builtin (default) or the kernel's LIO with TCMU")
    p.add_argument("--label", action="append", metavar="K=V", help="placement label (repeatable)")
    p.add_argument("--etcd-endpoints", metavar="A,B", help="etcd endpoints, comma-separated")
    p.add_argument("--prefix", help="etcd key prefix")
    p.add_argument("--lease-ttl", metavar="SECONDS", help="liveness lease TTL")
    p.add_argument("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING, ERROR")
    p.add_argument("--log-file", metavar="FILE", help="log here instead of stderr")
    return p


def load_config(args: argparse.Namespace, env: dict[str, str] | None = None) -> Config:
    """Config file + env + flags; raises ConfigError."""
    env = dict(os.environ if env is None else env)
    path = zconfig.find_config_file(args.config, env)
    cfg = zconfig.load(path, env=env, overrides={
        "chunk.data_dir": args.data_dir, "chunk.disks": args.disk, "chunk.address": args.address,
        "chunk.data_port": args.data_port, "chunk.portal": args.portal, "chunk.frontend": args.frontend,
        "chunk.lease_ttl": args.lease_ttl, "etcd.endpoints": args.etcd_endpoints,
        "etcd.prefix": args.prefix, "log.level": args.log_level, "log.file": args.log_file,
    })
    for item in args.label or []:
        k, eq, v = item.partition("=")
        if not eq or not k.strip():
            raise ConfigError(f"--label {item!r}: use KEY=VALUE")
        cfg.chunk.labels[k.strip()] = v.strip()
    return cfg


def _check_port(where: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise ConfigError(f"{where}: {port} is not a port (1-65535)")


def validate(cfg: Config) -> list[zdisks.DiskSpec]:
    """Check everything that can be checked before touching disk; return the disk specs."""
    c = cfg.chunk
    if c.event_loop not in ("asyncio", "uvloop"):
        raise ConfigError(f"chunk.event_loop: {c.event_loop!r} must be asyncio or uvloop")
    if not c.data_dir:
        raise ConfigError("chunk.data_dir must be set")
    if not c.address:
        raise ConfigError("chunk.address must be set")
    _check_port("chunk.data_port", c.data_port)
    host, sep, port = c.portal.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"chunk.portal: {c.portal!r} is not HOST:PORT")
    _check_port("chunk.portal", int(port))
    if c.frontend not in ("builtin", "lio"):
        raise ConfigError(f"chunk.frontend: {c.frontend!r} must be builtin or lio")
    if not 2 <= c.lease_ttl <= 600:
        raise ConfigError(f"chunk.lease_ttl: {c.lease_ttl} must be between 2 and 600 seconds")
    if not 0.1 <= c.replica_timeout <= 300:
        raise ConfigError(f"chunk.replica_timeout: {c.replica_timeout} must be between 0.1 and 300 seconds")
    if not c.replica_timeout <= c.revert_timeout <= 86400:
        raise ConfigError(f"chunk.revert_timeout: {c.revert_timeout} must be between chunk.replica_timeout "
                          f"({c.replica_timeout}) and 86400 seconds")
    if not 1 <= c.min_write_replicas <= 3:
        raise ConfigError(f"chunk.min_write_replicas: {c.min_write_replicas} must be 1, 2 or 3")
    for name in ("recovery_rate", "scrub_rate"):
        if getattr(c, name) <= 0:
            raise ConfigError(f"chunk.{name}: must be greater than 0 (MiB/s)")
    if not 0 <= c.drain_grace <= 3600:
        raise ConfigError(f"chunk.drain_grace: {c.drain_grace} must be between 0 and 3600 seconds")
    for k in c.labels:
        if not k or "=" in k or "," in k:
            raise ConfigError(f"chunk.labels: invalid label key {k!r}")
    if not cfg.etcd.endpoints:
        raise ConfigError("etcd.endpoints must not be empty")
    try:
        Keys(cfg.etcd.prefix)
    except ValueError as e:
        raise ConfigError(f"etcd.prefix: {e}") from None
    if logging.getLevelName(cfg.log.level.upper()) not in range(0, 100):
        raise ConfigError(f"log.level: unknown level {cfg.log.level!r}")
    specs = [zdisks.parse_spec(d) for d in c.disks] or [
        zdisks.DiskSpec(Path(os.path.abspath(c.data_dir)) / "disk0")]
    seen: set[Path] = set()
    for s in specs:
        if s.path in seen:
            raise ConfigError(f"disk {s.path} is listed twice")
        seen.add(s.path)
    return specs


def lock_data_dir(data_dir: Path) -> int:
    """Hold an exclusive lock on the data dir for our lifetime: one server per chunk id."""
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        fail(f"data dir {data_dir} is in use by another chunk server (pid {holder})", EXIT_SETUP)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class ChunkServer:
    """Identity, disks and registration of one chunk server."""

    def __init__(self, cfg: Config, chunk_id: str, disks: list[zdisks.LocalDisk]) -> None:
        self.cfg = cfg
        self.chunk_id = chunk_id
        self.disks = disks
        self.hostname = socket.gethostname()
        self._states: dict[str, str] = {}
        self._probe: list[dict[str, Any]] = []      # the last probe's records
        self.engine: StorageEngine | None = None

    def info(self, disk_records: list[dict[str, Any]]) -> ChunkInfo:
        c = self.cfg.chunk
        return ChunkInfo(chunk_id=self.chunk_id, hostname=self.hostname, address=c.address,
                         data_port=c.data_port, portal=c.portal, labels=dict(c.labels),
                         disks=disk_records)

    async def probe_disks(self) -> list[dict[str, Any]]:
        records = await zdisks.probe_all_async(self.disks)    # a stalled disk: failed, in time
        self.probed(records)
        return records

    def probed(self, records: list[dict[str, Any]]) -> None:
        """Take a probe's verdicts: the extent store puts no new extent on a disk the probe
        failed (unmounted, swapped, read-only), whose statvfs may well be the root
        filesystem's; then the records get the store's own view, and changes are logged."""
        self._probe = records
        if self.engine is not None:
            self._tell_store(self.engine.store)
            self._merge_store_view(records, self.engine.store.usage())
        self._log_changes(records)

    def _tell_store(self, store) -> None:
        for r in self._probe:
            store.set_probe_error(r["path"], (r.get("error") or "failed") if r["state"] == "failed" else None)

    @staticmethod
    def _merge_store_view(records: list[dict[str, Any]], usage: list[dict[str, Any]]) -> None:
        """A disk the extent store can no longer put a new extent on is full for placement
        too (it hit ENOSPC, or has less than one extent of room left)."""
        by_path = {u["path"]: u for u in usage}
        for r in records:
            u = by_path.get(r["path"])
            if u is None or r["state"] == "failed":
                continue
            if u["state"] == "failed":
                r["state"] = "failed"
                r["error"] = f"the extent store cannot use it: {u.get('error')}"
            elif u["state"] == "full" or u["capacity"] - u["used"] < EXTENT_SIZE:
                r["state"] = "full"

    def _log_changes(self, records: list[dict[str, Any]]) -> None:
        for r in records:
            before = self._states.get(r["path"])
            if before != r["state"]:
                self._states[r["path"]] = r["state"]
                if r["state"] == "failed":
                    log.error("disk %s failed: %s", r["path"], r.get("error"))
                elif r["state"] == "full":
                    log.warning("disk %s is full (%d of %d bytes used)", r["path"], r["used"], r["capacity"])
                elif before is not None:
                    log.info("disk %s is %s again", r["path"], r["state"])

    def target_config(self) -> TargetConfig:
        c = self.cfg.chunk
        host, _, port = c.portal.rpartition(":")
        return TargetConfig(host=host.strip("[]"), port=int(port), advertise=c.portal,
                            nop_interval=c.iscsi_nop_interval, nop_timeout=c.iscsi_nop_interval,
                            drain_grace=c.drain_grace)

    def storage_engine(self, etcd, keys: Keys) -> StorageEngine:
        c = self.cfg.chunk
        # Every configured disk, the ones that failed to prepare too (after the others: the
        # scrubber keeps its cursor on the store's first disk). A disk the store does not know
        # of cannot make it answer "may be there": an extent on a disk not mounted at startup
        # read as NO_EXTENT from every replica, i.e. zeros, and a write re-created it empty.
        # Those failed ones are unusable until a restart, and never opened by the store: an
        # unmounted disk's mount point is not created or written to, and an extent on a disk
        # whose disk-id did not read is not served.
        disks = [(str(d.path), d.spec.capacity)
                 for d in sorted(self.disks, key=lambda d: d.error is not None)]
        failed = {str(d.path): d.error for d in self.disks if d.error is not None}
        engine = StorageEngine(etcd, keys, self.chunk_id, disks, failed_disks=failed,
                               listen=(c.address, c.data_port),
                               token=read_secret_file(self.cfg.client.token_file, "meta token"),
                               meta_ca=self.cfg.client.ca_file, replica_timeout=c.replica_timeout,
                               revert_timeout=c.revert_timeout,
                               min_write_replicas=c.min_write_replicas,
                               recovery_rate=c.recovery_rate * 2**20, scrub_rate=c.scrub_rate * 2**20,
                               scrub_interval=c.scrub_interval,
                               boot_state=BootState(Path(os.path.abspath(c.data_dir))))
        self._tell_store(engine.store)        # the startup probe's verdicts, before any CREATE
        return engine

    def frontend(self, catalog: Catalog, open_device, reservations=None):
        """The iSCSI frontend over the volumes: the built-in target, or LIO + TCMU (whose
        reservations the kernel keeps, per host)."""
        if self.cfg.chunk.frontend == "lio":
            from .lio import LioFrontend
            return LioFrontend(self.cfg.chunk.portal, catalog, open_device,
                               Path(os.path.abspath(self.cfg.chunk.data_dir)))
        return IscsiTarget(self.target_config(), catalog, open_device, reservations)

    async def run(self, stop: asyncio.Event) -> None:
        etcd = zetcd.client(self.cfg.etcd)
        keys = Keys(self.cfg.etcd.prefix)
        # Stale (logins 0x0301, commands NOT READY) once etcd has not confirmed the mirror for
        # a lease TTL: by then this server counts as down and its revoked ACLs must not hold.
        catalog = Catalog(etcd, keys, stale_after=self.cfg.chunk.lease_ttl)
        engine = self.engine = self.storage_engine(etcd, keys)
        starting = asyncio.ensure_future(engine.run_start(stop))
        reservations = ReservationStore(etcd, keys, self.chunk_id)
        reservations.start(stop)
        target = self.frontend(catalog, engine.open, reservations)
        # Listen at once; until the catalog's first listing arrives (``catalog.synced``), the
        # built-in target answers logins "service unavailable", which initiators retry. A
        # restart within the TTL meets logins that early: the old process's live key remains.
        syncing = asyncio.ensure_future(catalog.start(stop))
        # Live (the key that makes redirectors send initiators here, and the meta show this
        # server up) only once the catalog holds its first listing and the storage engine has
        # started: an engine that cannot start (its replication port in use) serves no I/O.
        async def serving() -> None:
            await asyncio.shield(syncing)
            await engine.started.wait()

        reg = Registration(etcd, keys, self.chunk_id,
                           lease_ttl=self.cfg.chunk.lease_ttl, build_info=self.info,
                           probe_disks=self.probe_disks, endpoints=zetcd.describe(self.cfg.etcd),
                           sessions=target.session_list, storage=engine.status, revoke_on_stop=False,
                           serve_when=serving)
        engine.lease = reg                 # writes start only while this server's lease holds
        target.on_sessions_changed(reg.sessions_changed)
        admin = AdminFollower(etcd, keys, self.chunk_id,
                              on_state=lambda state: target.set_draining(state == "draining"))
        following = asyncio.ensure_future(admin.run(stop))
        try:
            # Inside the try: a frontend that cannot start (the portal's port in use) still
            # stops the engine (a clean stop recorded) before the error ends the server. And
            # ``start`` may wait (LIO: for the catalog's first listing, etcd down) as long as
            # it likes, but not past stop.
            if not await _unless_stopped(target.start(), stop):
                log.info("stopped while the iSCSI frontend was starting")
            # On stop, ``run`` rewrites the live record ``stopping`` (redirectors send no new
            # logins here) before it returns, so before the listener below closes.
            await reg.run(stop)
        except OSError as e:
            raise StartError(f"iSCSI frontend on {self.cfg.chunk.portal}: {e.strerror or e}") from e
        finally:
            await target.stop()
            await reservations.close()
            following.cancel()
            syncing.cancel()
            await catalog.close()
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            await engine.stop()
            # Only now: the sessions are gone and the coordinators released their volumes. A
            # lease revoked earlier let the meta take a snapshot itself (it sees no live
            # owner) while writes at the old seq still landed, inside the snapshot; so until
            # here ``reg`` keeps the lease alive (keepalives only, no write starts).
            await reg.unregister()
            try:
                await asyncio.wait_for(etcd.close(), 2.0)
            except Exception:  # noqa: BLE001 - exiting anyway
                pass


class StartError(Exception):
    """The server could not start serving (after cleaning up what it had started)."""


async def _unless_stopped(coro, stop: asyncio.Event) -> bool:
    """Await ``coro`` unless ``stop`` comes first (then it is cancelled): True if it ended."""
    task = asyncio.ensure_future(coro)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return False
    task.result()                  # its error, if it failed
    return True


async def _serve(server: ChunkServer) -> None:
    await server.run(stop_on_signals(log))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args)
        specs = validate(cfg)
        # Files the server needs once running: a bad one is a usage error now, with its
        # reason, not a traceback from inside the event loop a moment later.
        read_secret_file(cfg.client.token_file, "meta token")
        if cfg.client.ca_file:
            tls_context(cfg.client.ca_file)
    except ConfigError as e:
        fail(str(e), EXIT_USAGE)
    logs.setup("chunk", cfg.log.level, cfg.log.file)
    if cfg.chunk.frontend == "lio":
        from .lio import LioUnavailable, check_kernel
        try:
            check_kernel()
        except LioUnavailable as e:
            fail(str(e), EXIT_SETUP)

    data_dir = Path(os.path.abspath(cfg.chunk.data_dir))
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        lock_fd = lock_data_dir(data_dir)
        chunk_id, created = load_or_create(data_dir / CHUNK_ID_FILE)
    except (OSError, IdentityError) as e:
        fail(f"data dir {data_dir}: {getattr(e, 'strerror', None) or e}", EXIT_SETUP)
    log.info("%s chunk id %s in %s", "created" if created else "using", chunk_id, data_dir)

    raise_fd_limit()            # open extent replicas hold a few descriptors each
    # Bounded as the periodic probe is: a disk whose prepare or probe does not finish in time
    # (a hung mount, a failing disk) is failed until a restart, and the others start. Only
    # liveness is in that bound: a big disk's usage walk is counted beside it, never failing it.
    timeout = zdisks.PROBE_TIMEOUT
    try:
        disks = zdisks.prepare_all(specs, data_dir, chunk_id, timeout=timeout)
    except (OSError, IdentityError) as e:
        fail(f"data dir {data_dir}: {getattr(e, 'strerror', None) or e}", EXIT_SETUP)
    disks, records = zdisks.probe_at_start(disks, timeout)
    server = ChunkServer(cfg, chunk_id, disks)
    server.probed(records)
    if zdisks.all_failed(records):
        reasons = "; ".join(f"{r['path']}: {r.get('error')}" for r in records)
        log.error("every disk failed (%s); not starting", reasons)
        fail(f"every disk failed: {reasons}", EXIT_SETUP)
    for r in records:
        if r["state"] != "failed":
            log.info("disk %s (%s): capacity %d, used %d, %s",
                     r["path"], r["disk_id"], r["capacity"], r["used"], r["state"])

    run = asyncio.run
    if cfg.chunk.event_loop == "uvloop":
        try:
            import uvloop
            run = uvloop.run
        except ImportError:
            log.warning("uvloop is not installed; using asyncio's default event loop")
    try:
        run(_serve(server))
    except StartError as e:
        log.error("chunk server %s could not start: %s", chunk_id, e)
        fail(str(e), EXIT_SETUP)
    finally:
        os.close(lock_fd)
    log.info("chunk server %s stopped", chunk_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
