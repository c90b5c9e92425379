"""The /dev/uioN of one TCMU backstore: find it, map it, wait on it, kick it.

The kernel names the uio device ``tcm-user/<hba index>/<device name>/<config>``
(sysfs ``/sys/class/uio/uioN/name``); map 0 is the mailbox, command ring and
data area, and must be mapped whole, shared, read-write. A 4-byte read on the
fd returns once the kernel has queued commands (uio's event counter); a 4-byte
write tells it we moved ``cmd_tail``.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

SYS_UIO = Path("/sys/class/uio")


class UioError(Exception):
    pass


def uio_name(hba_index: int, device: str, config: str) -> str:
    return f"tcm-user/{hba_index}/{device}/{config}"


def find(name: str, sys_uio: Path = SYS_UIO, suffix: str | None = None) -> str | None:
    """``uioN`` whose sysfs name is ``name``; else, with ``suffix`` ("<device>/<config>"), the
    one TCMU device whose name ends so (whatever HBA number the kernel put in); else None."""
    if not sys_uio.is_dir():
        return None
    names = {}
    for d in sorted(sys_uio.iterdir()):
        try:
            names[d.name] = (d / "name").read_text().strip()
        except OSError:
            continue
    for uio, n in names.items():
        if n == name:
            return uio
    if suffix:
        hits = [u for u, n in names.items() if n.startswith("tcm-user/") and n.endswith("/" + suffix)]
        if len(hits) == 1:
            return hits[0]
    return None


class UioDevice:
    """One mapped uio device. ``buf`` is the shared mapping (mailbox at offset 0)."""

    def __init__(self, uio: str, dev_dir: str = "/dev", sys_uio: Path = SYS_UIO):
        self.name = uio
        try:
            self.size = int((sys_uio / uio / "maps" / "map0" / "size").read_text().strip(), 16)
        except (OSError, ValueError) as e:
            raise UioError(f"{uio}: cannot read map0 size: {e}") from None
        self.fd = os.open(os.path.join(dev_dir, uio), os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            self.buf = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        except OSError as e:
            os.close(self.fd)
            raise UioError(f"{uio}: mmap of {self.size} bytes failed: {e}") from None

    def fileno(self) -> int:
        return self.fd

    def ack(self) -> None:
        """Consume the interrupt count (non-blocking: nothing pending is fine)."""
        try:
            os.read(self.fd, 4)
        except BlockingIOError:
            pass

    def kick(self) -> None:
        os.write(self.fd, b"\0\0\0\0")

    def close(self) -> None:
        if self.fd >= 0:
            try:
                self.buf.close()
            except BufferError:          # a view still alive; the fd close below still unmaps on exit
                pass
            os.close(self.fd)
            self.fd = -1
