"""The chunk server's disks: parse their specs, prepare them, and probe their state.

A disk is a directory (a mount point, or just a folder for file-backed
storage). Each gets a ``disk-id`` file when first prepared; a later probe that
finds a different id (or none) means another filesystem is mounted there now,
and the disk is reported failed instead of silently storing data elsewhere.

A failed disk is reported, not fatal: the server keeps serving from the
others, and the meta leader sees the state in the chunk's records.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zstore.config import ConfigError
from zstore.records import Disk
from zstore.units import SizeError, parse_size

from .identity import IdentityError, load_or_create, read_id

DISK_ID_FILE = "disk-id"
_PROBE_FILE = ".zstore-write-probe"
_MIN_FREE = 1 << 20          # a filesystem with less than this available is full


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

    @property
    def path(self) -> Path:
        return self.spec.path


def prepare(spec: DiskSpec) -> LocalDisk:
    """Create the directory and its disk-id if missing; a failure marks the disk failed."""
    try:
        spec.path.mkdir(parents=True, exist_ok=True)
        disk_id, _ = load_or_create(spec.path / DISK_ID_FILE)
        return LocalDisk(spec, disk_id)
    except (OSError, IdentityError) as e:
        return LocalDisk(spec, None, _reason(e))


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

    Blocking (walks the tree, writes a probe file): call it from a thread.
    """
    path = disk.path

    def failed(reason: str, capacity: int = 0) -> dict[str, Any]:
        rec = Disk(path=str(path), capacity=disk.spec.capacity or capacity, used=0, state="failed")
        return {**rec.to_dict(), "disk_id": disk.disk_id, "error": reason}

    if disk.disk_id is None:
        return failed(disk.error or "not prepared")
    try:
        if not path.is_dir():
            return failed("directory is missing")
        if read_id(path / DISK_ID_FILE) != disk.disk_id:
            return failed(f"{DISK_ID_FILE} changed or vanished (another filesystem mounted here?)")
        _check_writable(path)
        st = os.statvfs(path)
        used = used_bytes(path)
    except (OSError, IdentityError) as e:
        return failed(_reason(e))
    capacity = disk.spec.capacity if disk.spec.capacity is not None else st.f_blocks * st.f_frsize
    full = used >= capacity or st.f_bavail * st.f_frsize < _MIN_FREE
    rec = Disk(path=str(path), capacity=capacity, used=used, state="full" if full else "ok")
    return {**rec.to_dict(), "disk_id": disk.disk_id}


def probe_all(disks: list[LocalDisk]) -> list[dict[str, Any]]:
    return [probe(d) for d in disks]


def all_failed(records: list[dict[str, Any]]) -> bool:
    return bool(records) and all(r["state"] == "failed" for r in records)
