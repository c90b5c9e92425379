"""Interim volume storage: one sparse file per volume in ``chunk.volume_dir``.

The replicated storage engine replaces this behind the same BlockDevice
interface. Until then, chunk servers that share the directory (``zstore up``
points all of them at one) are logically equivalent: any can serve any LUN.
"""

from __future__ import annotations

import os
from pathlib import Path

from zstore.records import Volume

from .blockdev import FileBlockDevice


class LocalVolumes:
    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, volume: Volume) -> Path:
        return self.dir / f"{volume.volume_id}.img"

    def open(self, volume: Volume, readonly: bool) -> FileBlockDevice:
        path = self.path(volume)
        if readonly and (not path.exists() or path.stat().st_size < volume.size):
            FileBlockDevice(path, volume.size, volume.block_size, thin=volume.thin).close()
        return FileBlockDevice(path, volume.size, volume.block_size, readonly=readonly, thin=volume.thin)
