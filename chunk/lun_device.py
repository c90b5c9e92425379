"""The device and SCSI identity behind one exported LUN, shared by both frontends
(the built-in iSCSI target and LIO/TCMU): a volume opens as itself; a snapshot
opens as its volume's read-only view at the snapshot's seq (``open_device(volume,
True, seq)``, docs/storage.md), sized as the snapshot and named by its own WWN.
"""

from __future__ import annotations

from typing import Any, Callable

from chunk import scsi
from chunk.blockdev import ReadOnlyError
from chunk.catalog import LunExport


class SnapshotDevice:
    """A snapshot view as a BlockDevice: the snapshot's size (its volume may have grown since),
    writes refused. Reads go straight to the view."""

    readonly = True

    def __init__(self, dev: Any, size: int) -> None:
        self.dev, self.size = dev, size
        self.block_size, self.thin = dev.block_size, dev.thin

    async def read(self, offset: int, length: int):
        return await self.dev.read(offset, length)

    async def write(self, offset: int, data, fua: bool = False) -> None:
        raise ReadOnlyError("a snapshot LUN is read-only")

    async def flush(self) -> None:
        pass

    async def unmap(self, offset: int, length: int) -> None:
        raise ReadOnlyError("a snapshot LUN is read-only")

    async def write_zeroes(self, offset: int, length: int) -> None:
        raise ReadOnlyError("a snapshot LUN is read-only")

    def resize(self, size: int) -> None:
        """A snapshot never changes size."""

    def close(self) -> None:
        self.dev.close()


def open_export(open_device: Callable[..., Any], ex: LunExport) -> tuple[Any, scsi.LunIdentity]:
    """(device, identity) for ``ex``; ``open_device`` is the storage engine's opener."""
    ident = scsi.LunIdentity(wwn=ex.wwn, serial=ex.serial, lun=ex.lun)
    if ex.view_seq:
        return SnapshotDevice(open_device(ex.volume, True, ex.view_seq), ex.size), ident
    return open_device(ex.volume, ex.readonly), ident
