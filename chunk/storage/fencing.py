"""The replica-side ownership-epoch check.

A volume is written through one owner (its coordinator); each new owner gets
a larger epoch from the meta leader.  A deposed owner may not know it is
deposed yet (partitioned, paused), so replicas refuse requests whose epoch
is below the highest they have seen for that volume: once the new owner has
touched a replica, the old owner's writes bounce with ``STALE_EPOCH``
instead of racing the new owner's.

Persistence: a higher epoch is written durably into the header of the extent
the request addresses *before* the request runs.  So after a restart the
volume's highest epoch, the maximum over its extents' headers (``scan``),
is at least every epoch this replica ever admitted.  Caveat: deleting an
extent (moved elsewhere) drops its header; a replica that held only that
extent of the volume forgets the epoch.  A per-volume epoch record is the
fix once extents move.

Raising an epoch costs one fsync'd header rename, once per owner change per
extent; equal epochs cost a dict lookup.
"""

from __future__ import annotations

import os
from pathlib import Path

from .extent_file import ExtentError, ExtentFile, ExtentHeader, HeaderError

__all__ = ["StaleEpochError", "EpochFence"]


class StaleEpochError(ExtentError):
    """The request's epoch is older than one this replica has seen for the volume."""

    def __init__(self, volume: str, epoch: int, highest: int) -> None:
        super().__init__(f"volume {volume}: epoch {epoch} is stale (seen {highest})")
        self.volume = volume
        self.epoch = epoch
        self.highest = highest    # goes back in the reply, so the old owner learns it lost


class EpochFence:
    """Highest epoch seen per volume on this replica."""

    def __init__(self) -> None:
        self._highest: dict[str, int] = {}

    def highest(self, volume: str) -> int:
        return self._highest.get(volume, 0)

    def seed(self, header: ExtentHeader) -> None:
        """Account for one extent's persisted epoch (at startup or when opening it)."""
        if header.epoch > self._highest.get(header.volume, 0):
            self._highest[header.volume] = header.epoch

    def scan(self, directory: str | os.PathLike) -> list[Path]:
        """Seed from every extent header in ``directory``; returns the unreadable ones.

        An unreadable header is reported, not skipped silently: its extent
        is unusable and the caller marks it for rebuild.
        """
        bad = []
        for hdr in sorted(Path(directory).glob("*.hdr")):
            try:
                self.seed(ExtentHeader.decode(hdr.read_bytes(), str(hdr)))
            except (HeaderError, OSError):
                bad.append(hdr)
        return bad

    def admit_volume(self, volume: str, epoch: int) -> None:
        """Admit ``epoch`` for a volume with no extent here (yet): in memory only.

        The caller persists it by creating the extent with
        ``epoch=highest(volume)``; until then a crash forgets it, which is
        harmless: nothing of the volume is on this replica to protect.
        """
        highest = self._highest.get(volume, 0)
        if epoch < highest:
            raise StaleEpochError(volume, epoch, highest)
        self._highest[volume] = epoch

    def admit(self, extent: ExtentFile, epoch: int) -> None:
        """Let a request with ``epoch`` run against ``extent``, or raise ``StaleEpochError``.

        A newer epoch is made durable in the extent's header first, so the
        replica cannot forget it in a crash right after serving the request.
        """
        volume = extent.header.volume
        self.seed(extent.header)
        highest = self._highest.get(volume, 0)
        if epoch < highest:
            raise StaleEpochError(volume, epoch, highest)
        if epoch > extent.epoch:
            extent.set_header(epoch=epoch)
        self._highest[volume] = epoch
