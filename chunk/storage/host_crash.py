"""Telling a host crash from a process restart when a chunk server starts.

A write is acknowledged once it is in the page cache of every in-sync replica
(docs/storage.md, "Durability contract"). A SIGKILL keeps the page cache; a host
crash (power loss, panic) loses what was not fdatasync'd yet, so a replica back
from one may hold older data than its peers while it is still listed as in sync,
and would serve it (a coordinator reads its local replica first).

The kernel's boot id tells the two apart. ``boot-state`` in the chunk data dir
holds the boot id the server last ran under, whether it stopped cleanly (every
extent flushed after the last write: ``StorageEngine.stop``) and the extents
still *suspect*. At start, a boot id other than the recorded one without a clean
stop makes every local extent suspect; the record is rewritten at once (not
clean, this boot, the suspects) before anything can write, so a crash before
the suspects are settled does not forget them. The engine settles them
(``StorageEngine._settle_suspects``): this replica is dropped from each extent
beside an in-sync replica on an up server, and recovery resyncs it.

No file (a new data dir, or the first start of a version without this) is not
a crash: nothing is known about what came before.

A disk not scanned at a crash start (failed at startup: mounted late, ``nofail``)
has extents nobody marked suspect. Its path is kept in the record's
``unscanned`` list (a record without one has none) across every later start,
crash or not, clean stop or not, until a start scans it: then all of its
extents are suspect.

A record that cannot be written (the data dir's filesystem full) is not fatal:
the suspects stay in memory and the write is retried (``BootState.save``); the
old record stays, so a crash is still detected by the next start, and a *clean*
old record is truncated in place (no space needed), which reads as a crash.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable, Mapping

log = logging.getLogger(__name__)

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
STATE_FILE = "boot-state"


def current_boot_id(path: Path = BOOT_ID_PATH) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


class BootState:
    def __init__(self, data_dir: str | Path, boot_id: str | None = None) -> None:
        self.path = Path(data_dir) / STATE_FILE
        self.boot_id = boot_id if boot_id is not None else current_boot_id()
        self.host_crash = False
        self.unscanned: set[str] = set()   # disks a crash start did not scan: suspect when scanned
        self.unsaved = False               # the last write failed: ``save`` again later

    def read(self) -> dict | None:
        """The record as stored, None if there is none; an unreadable one reads as a crash."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            got = json.loads(raw)
            if not isinstance(got, dict):
                raise ValueError("not an object")
            return got
        except ValueError as e:
            log.error("%s does not read (%s): taken as a host crash", self.path, e)
            return {"boot_id": None, "clean": False, "suspect": []}

    def begin(self, extents: Iterable[tuple[str, int]], *, unscanned: Iterable[str | Path] = (),
              by_disk: Mapping[str | Path, Iterable[tuple[str, int]]] | None = None
              ) -> set[tuple[str, int]]:
        """At start, before any write: the suspect extents (those left from before, and
        every one of ``extents`` after a host crash); records this boot as running.

        ``unscanned``: the disks not scanned at this start (failed at startup); after a
        crash they are remembered until a start scans them. ``by_disk``: the extents of
        each disk scanned now, by path: those of a disk remembered so are suspect."""
        prev = self.read()
        suspect: set[tuple[str, int]] = set()
        now_unscanned = {str(p) for p in unscanned}
        if prev is not None:
            suspect = {(str(v), int(i)) for v, i in prev.get("suspect") or []}
            pending = {str(p) for p in prev.get("unscanned") or []}
            if prev.get("boot_id") != self.boot_id and not prev.get("clean"):
                self.host_crash = True
                suspect |= set(extents)
                pending |= now_unscanned
            for path, exts in (by_disk or {}).items():
                if str(path) in pending and str(path) not in now_unscanned:
                    log.error("disk %s was not scanned since a host crash: its extent replicas "
                              "are suspect", path)
                    suspect |= set(exts)
            self.unscanned = pending & now_unscanned
            if self.unscanned:
                log.error("disk(s) %s not scanned since a host crash: their extent replicas "
                          "become suspect once a start scans them", ", ".join(sorted(self.unscanned)))
        try:
            self.write(suspect, clean=False)
        except OSError as e:
            self._unsaved(e, prev)
        return suspect

    def save(self, suspect: Iterable[tuple[str, int]], clean: bool = False) -> bool:
        """``write``, a failure logged and left for a later ``save`` (True: written)."""
        try:
            self.write(suspect, clean)
            return True
        except OSError as e:
            self._unsaved(e, self.read())
            return False

    def _unsaved(self, e: OSError, prev: dict | None) -> None:
        self.unsaved = True
        log.error("cannot write %s (%s): the suspect extents are kept in memory and the record "
                  "is written again later; a host crash meanwhile is still detected", self.path, e)
        if prev is not None and prev.get("clean"):
            # A clean record would read as no crash: truncated (which needs no space) it
            # reads as one. Anything else already does (another boot, not clean), or is
            # this boot's running record with a superset of what is pending.
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.ftruncate(fd, 0)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e2:
                log.error("cannot truncate %s either (%s): a host crash before it is written "
                          "would go unnoticed", self.path, e2)

    def write(self, suspect: Iterable[tuple[str, int]], clean: bool) -> None:
        """Replace the record durably (a new file renamed over the old one)."""
        record = {"boot_id": self.boot_id, "clean": clean,
                  "suspect": sorted([v, i] for v, i in suspect)}
        if self.unscanned:
            record["unscanned"] = sorted(self.unscanned)
        body = json.dumps(record).encode()
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                _write_all(fd, body)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self.unsaved = False


def _write_all(fd: int, body: bytes) -> None:
    view = memoryview(body)
    while view:
        n = os.write(fd, view)
        view = view[n:]
