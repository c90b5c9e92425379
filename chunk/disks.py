"""The chunk server's disks: parse their specs, prepare them, and probe their state.

A disk is a directory (a mount point, or just a folder for file-backed
storage). Each gets a ``disk-id`` file when first prepared; a later probe that
finds a different id (or none) means another filesystem is mounted there now,
and the disk is reported failed instead of silently storing data elsewhere.
The chunk server records the ids it gave out (``KNOWN_FILE`` in its data
dir), so a restart never gives a new id to a path it knew: an empty mount
point there is a disk that is not mounted, not a new disk.

A disk directory also names the chunk server that owns it (``OWNER_FILE``,
its chunk id; written on first use, and on the first start of a version
without it: adopted). A disk another server owns, or whose disk-id differs
from the one recorded for its path and is none of this server's, is refused
(failed): its extents' generations are another server's, and settling them
against this server's copies could delete the in-sync one and serve stale
data. Disks of this server swapped between its paths are fine.

A failed disk is reported, not fatal: the server keeps serving from the
others, and the meta leader sees the state in the chunk's records. Probes are
bounded (``PROBE_TIMEOUT``), the start's too (``prepare_all(timeout=)``,
``probe_at_start``): a disk that hangs (a dead mount) is failed, never waited on.
Only a disk's liveness is bounded, never its size: the count of zstore's bytes
(a walk of every file) runs beside the probes (``DiskUsage``), so a big disk on
a cold cache is never failed for the time that walk takes.

Space (docs/storage.md, "Disk space"): without a configured capacity a disk is
its filesystem: ``capacity`` its size, ``free`` what an unprivileged writer can
still use (``f_bavail``), ``used`` the rest (other files and root-reserved
blocks included). With one, ``capacity`` is the limit and ``used`` zstore's own
bytes, and ``free`` never exceeds what the filesystem has available. ``fs``
names the filesystem (boot id + device), so totals count a filesystem that
several disks share once (``meta/chunks.py``: ``space``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from zstore.config import ConfigError
from zstore.records import Disk
from zstore.units import SizeError, parse_size

from .identity import IdentityError, load_or_create, read_id, write_atomic

log = logging.getLogger(__name__)

DISK_ID_FILE = "disk-id"
KNOWN_FILE = "disk-ids"       # in the data dir: "<disk id> <path>" per disk ever prepared
OWNER_FILE = "owner-chunk-id"  # in each disk: the chunk id of the server it belongs to
_PROBE_FILE = ".zstore-write-probe"
_MIN_FREE = 1 << 20          # a filesystem with less than this available is full
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@dataclass(frozen=True)
class DiskSpec:
    path: Path
    capacity: int | None = None   # None: the filesystem's size

    def __str__(self) -> str:
        return f"{self.path}:{self.capacity}" if self.capacity is not None else str(self.path)


def parse_spec(text: str) -> DiskSpec:
    """``PATH`` or ``PATH:CAPACITY`` (``/srv/d0:10Gi``); the path is made absolute."""
    text = text.strip()
    if not text:
        raise ConfigError("empty disk spec; use PATH or PATH:CAPACITY")
    path, capacity = text, None
    if ":" in text:
        path, _, size = text.rpartition(":")
        try:
            capacity = parse_size(size)
        except SizeError as e:
            raise ConfigError(f"disk {text!r}: {e}") from None
        if capacity <= 0:
            raise ConfigError(f"disk {text!r}: capacity must be positive")
        if not path:
            raise ConfigError(f"disk {text!r}: missing path before ':'")
    return DiskSpec(Path(os.path.abspath(os.path.expanduser(path))), capacity)


@dataclass
class LocalDisk:
    """One configured disk and what preparing it at startup found."""
    spec: DiskSpec
    disk_id: str | None = None
    error: str | None = None      # why it could not be prepared
    # Counts its usage beside the probes (set by ``probe_at_start``); None: ``probe`` walks it.
    usage: DiskUsage | None = field(default=None, repr=False, compare=False)

    @property
    def path(self) -> Path:
        return self.spec.path


def prepare(spec: DiskSpec, known_id: str | None = None, *, chunk_id: str | None = None,
            ours: frozenset[str] | set[str] = frozenset()) -> LocalDisk:
    """Create the directory and its disk-id if missing; a failure marks the disk failed.

    ``known_id``: the id this server gave the path before. Its disk-id having
    vanished means the disk is not mounted (or was emptied), so none is
    written: that would put new extents on whatever filesystem is there now.
    A path it never prepared is a new disk and gets one.

    ``chunk_id``: this server; a disk owned by another is refused, one owned by
    nobody yet is marked as this server's. ``ours``: every disk id this server
    recorded; a disk-id other than ``known_id`` is refused unless it is one of them.
    """
    try:
        if known_id is None:
            spec.path.mkdir(parents=True, exist_ok=True)
        elif read_id(spec.path / DISK_ID_FILE) is None:      # nor the directory made again
            return LocalDisk(spec, None, (
                f"{DISK_ID_FILE} of disk {known_id} vanished (not mounted?); if this is a new "
                f"disk on purpose, remove its line from the data dir's {KNOWN_FILE}"))
        owner = read_id(spec.path / OWNER_FILE) if chunk_id is not None else None
        if owner is not None and owner != chunk_id:
            return LocalDisk(spec, None, (
                f"it belongs to chunk server {owner} ({OWNER_FILE}), not to this one "
                f"({chunk_id}): refused, its extents are not this server's; to reuse it here, "
                f"empty it"))
        found = read_id(spec.path / DISK_ID_FILE)
        if known_id is not None and found != known_id and found not in ours:
            return LocalDisk(spec, None, (
                f"its {DISK_ID_FILE} {found} is not disk {known_id} this server prepared at this "
                f"path, nor any other of its disks (another server's disk?): refused; to reuse "
                f"it here, empty it and remove the path's line from the data dir's {KNOWN_FILE}"))
        disk_id, _ = load_or_create(spec.path / DISK_ID_FILE)
        if chunk_id is not None and owner is None:
            _adopt(spec.path, chunk_id)
        return LocalDisk(spec, disk_id)
    except (OSError, IdentityError) as e:
        return LocalDisk(spec, None, _reason(e))


def _adopt(path: Path, chunk_id: str) -> None:
    """Mark the disk this server's; a full disk (which can still serve) is marked later."""
    try:
        write_atomic(path / OWNER_FILE, (chunk_id + "\n").encode())
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        log.warning("disk %s: cannot write %s yet (%s); written at a later start",
                    path, OWNER_FILE, _reason(e))


def load_known(data_dir: Path) -> dict[str, str]:
    """path -> disk id of every disk this server prepared (empty before the first start)."""
    try:
        text = (data_dir / KNOWN_FILE).read_text()
    except FileNotFoundError:
        return {}
    known = {}
    for line in filter(None, (ln.strip() for ln in text.splitlines())):
        disk_id, _, path = line.partition(" ")
        if len(disk_id) != 32 or not path:
            raise IdentityError(f"{data_dir / KNOWN_FILE}: bad line {line[:80]!r}")
        known[path] = disk_id
    return known


def prepare_all(specs: list[DiskSpec], data_dir: Path, chunk_id: str | None = None, *,
                timeout: float | None = None,
                prepare_one: Callable[..., LocalDisk] | None = None) -> list[LocalDisk]:
    """``prepare`` each disk against the ids recorded in ``data_dir`` (and owned by
    ``chunk_id``), then record new ones.

    With ``timeout`` (the server's start), each disk is prepared in a thread of its own and
    waited on for ``timeout`` s at most: one that has not finished (a hung mount, a failing
    disk: a stat or open that never returns) is failed until a restart, and the others are
    used. Its thread is left behind (nothing can stop it); whatever it does later is never
    looked at, and the disk's id is not recorded this time."""
    known = load_known(data_dir)
    ours = frozenset(known.values())
    one = prepare_one or prepare

    def prep(s: DiskSpec) -> LocalDisk:
        return one(s, known.get(str(s.path)), chunk_id=chunk_id, ours=ours)
    if timeout is None:
        disks = [prep(s) for s in specs]
    else:
        futures = _bounded(prep, specs, "disk-prepare", timeout)
        disks = [f.result() if f.done() else _hung(LocalDisk(s), "preparing it", timeout)
                 for s, f in zip(specs, futures)]
    now = dict(known) | {str(d.path): d.disk_id for d in disks if d.disk_id is not None}
    if now != known:
        write_atomic(data_dir / KNOWN_FILE,
                     "".join(f"{i} {p}\n" for p, i in sorted(now.items())).encode())
    return disks


def _reason(e: Exception) -> str:
    if isinstance(e, OSError):
        name = errno.errorcode.get(e.errno or 0, "")
        return f"{e.strerror or e} ({name})" if name else str(e.strerror or e)
    return str(e)


def used_bytes(path: Path) -> int:
    """Bytes allocated to files under ``path`` (sparse files count what they hold)."""
    total = 0
    for root, _dirs, files in os.walk(path, onerror=lambda _e: None):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue          # removed while we walked
            total += st.st_blocks * 512
    return total


class DiskUsage:
    """zstore's bytes on one disk (``used_bytes``), counted in a thread of its own: a probe
    starts a count unless one runs, waits ``wait`` s at most for it, and takes the newest
    finished count (None before the first). The walk's time is never a probe's: a healthy
    disk with a million files on a cold cache takes minutes, and must not be failed for it."""

    def __init__(self, path: Path, wait: float) -> None:
        self.path = path
        self.wait = wait
        self.bytes: int | None = None         # the newest finished count
        self._walk: concurrent.futures.Future | None = None
        self._lock = threading.Lock()

    def latest(self) -> int | None:
        with self._lock:
            if self._walk is None or self._walk.done():
                self._walk = _in_thread(self._count, self.path, f"disk-usage {self.path}")
            walk = self._walk
        concurrent.futures.wait([walk], timeout=self.wait)
        return self.bytes

    def _count(self, path: Path) -> int:
        try:
            n = used_bytes(path)
        except Exception as e:  # noqa: BLE001 - the last count stays; the next probe retries
            log.warning("disk %s: counting its usage failed: %s", path, e)
            raise
        self.bytes = n
        return n


def _check_writable(path: Path) -> None:
    probe = path / _PROBE_FILE
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, b"ok")
    finally:
        os.close(fd)
    probe.unlink()


def probe(disk: LocalDisk) -> dict[str, Any]:
    """The disk's current record (``Disk`` fields plus ``disk_id``, and ``error`` if failed).

    Blocking (writes a probe file, and walks the tree unless ``disk.usage`` counts it beside
    the probe): call it from a thread. With ``disk.usage``, the walk's time is not the probe's:
    a count not finished is the previous one, or none yet (``zstore_used`` None; a limited
    disk's ``used`` then taken as all its filesystem uses, up to the limit: at least ours).
    """
    path = disk.path

    def failed(reason: str) -> dict[str, Any]:
        return _failed(disk, reason)

    if disk.disk_id is None:
        return failed(disk.error or "not prepared")
    try:
        if not path.is_dir():
            return failed("directory is missing")
        if read_id(path / DISK_ID_FILE) != disk.disk_id:
            return failed(f"{DISK_ID_FILE} changed or vanished (another filesystem mounted here?)")
        _check_writable(path)
        st = os.statvfs(path)
        dev = os.stat(path).st_dev
        ours = used_bytes(path) if disk.usage is None else disk.usage.latest()
    except (OSError, IdentityError) as e:
        return failed(_reason(e))
    fs_capacity, fs_free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    limit = disk.spec.capacity
    if limit is None:           # the filesystem: everything on it is used, ours or not
        capacity, used, free = fs_capacity, fs_capacity - fs_free, fs_free
    else:                       # the limit and our bytes, but no more room than the fs has
        # Not counted yet: what the filesystem uses bounds ours, so the limit is never overrun.
        mine = ours if ours is not None else min(limit, fs_capacity - fs_free)
        capacity, used, free = limit, mine, max(0, min(limit - mine, fs_free))
    full = used >= capacity or fs_free < _MIN_FREE
    rec = Disk(path=str(path), capacity=capacity, used=used, state="full" if full else "ok")
    return {**rec.to_dict(), "disk_id": disk.disk_id, "free": free, "zstore_used": ours,
            "limited": limit is not None, "fs": filesystem_id(dev),
            "fs_capacity": fs_capacity, "fs_free": fs_free}


def _failed(disk: LocalDisk, reason: str) -> dict[str, Any]:
    rec = Disk(path=str(disk.path), capacity=disk.spec.capacity or 0, used=0, state="failed")
    return {**rec.to_dict(), "disk_id": disk.disk_id, "free": 0, "error": reason}


def filesystem_id(dev: int) -> str:
    """Names one filesystem cluster-wide: device numbers are only unique within one kernel,
    so the boot id (shared by the containers of one host, as their filesystems are) comes
    first; the hostname where there is none."""
    try:
        host = _BOOT_ID.read_text().strip()
    except OSError:
        host = ""
    return f"{host or socket.gethostname()}:{os.major(dev)}:{os.minor(dev)}"


def probe_all(disks: list[LocalDisk]) -> list[dict[str, Any]]:
    return [probe(d) for d in disks]


def probe_at_start(disks: list[LocalDisk], timeout: float,
                   probe_one: Callable[[LocalDisk], dict[str, Any]] | None = None
                   ) -> tuple[list[LocalDisk], list[dict[str, Any]]]:
    """The start's probe: ``probe_all`` with each disk in a thread of its own, waited on for
    ``timeout`` s at most. A disk whose probe has not answered comes back failed until a
    restart (its ``LocalDisk`` replaced by one with its ``error``), so the extent store never
    opens it: scanning its directory would hang the start the same way. Returns the disks
    and their records.

    The rule: only liveness is bounded, never size. The bound covers what a live disk answers
    at once whatever it holds: its directory is there, its disk-id is the one prepared, a
    file can be written, statvfs. zstore's usage (a walk and an lstat of every file: minutes
    for a healthy 16 TB disk with a million files on the cold cache after a reboot) is
    counted beside it, from now on for the periodic probes too (``DiskUsage``, given each
    disk here): waited on for ``timeout / 4`` s at most, and when not counted by then the disk
    starts (and is opened by the store) with no count yet, never failed for being big. A disk
    whose liveness checks hang is failed as above."""
    for d in disks:
        if d.disk_id is not None and d.usage is None:
            d.usage = DiskUsage(d.path, timeout / 4)
    one = probe_one or probe
    futures = _bounded(one, disks, "disk-probe", timeout)
    out, records = [], []
    for d, f in zip(disks, futures):
        if not f.done():
            d = _hung(LocalDisk(d.spec), "its probe", timeout)
            records.append(_failed(d, d.error or ""))
        else:
            e = f.exception()
            records.append(f.result() if e is None else _failed(d, _reason(e)))
        out.append(d)
    return out, records


def _bounded(fn: Callable[[Any], Any], items: list[DiskSpec] | list[LocalDisk], name: str,
             timeout: float) -> list[concurrent.futures.Future]:
    """``fn(item)`` for every disk, each in a daemon thread of its own, all waited on together
    for ``timeout`` s at most. Those not done by then are left running (a thread stuck in a
    dead disk cannot be stopped) and their futures returned unfinished."""
    futures = [_in_thread(fn, item, f"{name} {item.path}") for item in items]
    concurrent.futures.wait(futures, timeout=timeout)
    return futures


def _in_thread(fn: Callable[[Any], Any], arg: Any, name: str) -> concurrent.futures.Future:
    fut: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        try:
            fut.set_result(fn(arg))
        except BaseException as e:  # noqa: BLE001 - handed to the waiting side
            fut.set_exception(e)
    threading.Thread(target=run, name=name, daemon=True).start()
    return fut


def _hung(disk: LocalDisk, what: str, timeout: float) -> LocalDisk:
    """``disk`` failed because ``what`` did not finish within ``timeout`` s at the start."""
    disk.error = (f"{what} did not finish within {timeout:g}s at the start (a hung mount? a "
                  f"failing disk?): failed until a restart")
    log.error("disk %s: %s; starting without it", disk.path, disk.error)
    return disk


def all_failed(records: list[dict[str, Any]]) -> bool:
    return bool(records) and all(r["state"] == "failed" for r in records)


PROBE_TIMEOUT = 20.0     # a disk whose probe takes longer is reported failed until it answers

# Probes still running past their timeout: path -> (when it started, its future). Not started
# again while one runs, so threads stuck in a dead disk do not pile up.
_running: dict[Path, tuple[float, concurrent.futures.Future]] = {}


async def probe_all_async(disks: list[LocalDisk], timeout: float = PROBE_TIMEOUT,
                          probe_one: Callable[[LocalDisk], dict[str, Any]] | None = None
                          ) -> list[dict[str, Any]]:
    """``probe_all`` from the event loop: each disk probed in a thread of its own and
    waited on for ``timeout`` s at most. A disk that does not answer (a stalled device, a
    hung mount) is reported failed; the others as they are."""
    probe_one = probe_one or probe
    if not disks:
        return []

    def start(d: LocalDisk) -> tuple[float, concurrent.futures.Future]:
        got = _running.get(d.path)
        if got is not None:
            return got
        _running[d.path] = got = (time.monotonic(), _in_thread(probe_one, d, f"disk-probe {d.path}"))
        return got

    started = [start(d) for d in disks]
    await asyncio.wait([asyncio.wrap_future(f) for _, f in started], timeout=timeout)
    records = []
    for d, (t0, f) in zip(disks, started):
        if not f.done():
            records.append(_failed(d, f"its probe has not answered for {time.monotonic() - t0:.0f}s "
                                      f"(a stalled disk?)"))
            continue
        _running.pop(d.path, None)
        e = f.exception()
        records.append(f.result() if e is None else _failed(d, _reason(e)))
    return records
