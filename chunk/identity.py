"""Persistent identities for a chunk server and its disks.

The chunk id is how the meta leader knows a server across restarts and
address changes, so it must survive a crash at any instant: it is written to
a temp file, fsynced, renamed into place and the directory fsynced. A reader
therefore sees either no file or a complete id, never half of one.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

_ID_RE = re.compile(r"^[0-9a-f]{32}$")


class IdentityError(RuntimeError):
    """An id file that exists but cannot be used."""


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_id(path: Path) -> str | None:
    """The id stored in ``path``, or None if there is none yet."""
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        return None
    if not _ID_RE.match(value):
        raise IdentityError(f"{path} does not hold a valid id ({value[:40]!r}); "
                            "fix or remove it (removing it makes this a new server/disk)")
    return value


def load_or_create(path: Path) -> tuple[str, bool]:
    """(id, created): the id in ``path``, creating a fresh uuid4 hex on first use."""
    existing = read_id(path)
    if existing:
        return existing, False
    new = uuid.uuid4().hex
    write_atomic(path, (new + "\n").encode())
    return new, True
