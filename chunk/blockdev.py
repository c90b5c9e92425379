"""The narrow block-device interface the SCSI layer executes against.

Everything above this line speaks SCSI (iSCSI today, TCMU later); everything
below it (a file now, the replicated volume coordinator later) only sees byte
offsets.  Offsets and lengths are always multiples of ``block_size``; the SCSI
layer has already checked ranges, read-only state and reservations.

Design rule: reads and writes call ``os.preadv``/``os.pwrite`` directly on the
event loop.  A page-cache hit costs microseconds, far less than a thread
hand-off.  Only calls that wait for the device itself (``fdatasync``) go to a
worker thread, because they can take milliseconds and would stall every
session served by this loop.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import os
from typing import Protocol, runtime_checkable

__all__ = [
    "BlockDevice", "BlockDeviceError", "MediumError", "MiscompareError", "NoSpaceError",
    "ReadOnlyError", "FileBlockDevice", "MemoryBlockDevice",
]


class BlockDeviceError(Exception):
    """Base of the typed errors the SCSI layer maps to sense data."""


class MediumError(BlockDeviceError):
    """EIO: the data could not be read or written (MEDIUM ERROR)."""


class NoSpaceError(BlockDeviceError):
    """ENOSPC/EDQUOT: a thin device could not allocate backing space."""


class ReadOnlyError(BlockDeviceError):
    """The device (or its backing store) refuses writes."""


class MiscompareError(BlockDeviceError):
    """``compare_and_write``: the data differs from the expected; nothing was written.

    ``offset`` is the byte offset of the first difference inside the compared range (the
    MISCOMPARE sense's INFORMATION field)."""

    def __init__(self, offset: int) -> None:
        super().__init__(f"miscompare at byte {offset}")
        self.offset = offset


@runtime_checkable
class BlockDevice(Protocol):
    block_size: int       # logical block size in bytes (512 or 4096)
    size: int             # bytes; may grow at runtime (online resize)
    readonly: bool
    thin: bool            # thin-provisioned: LBPME reported, UNMAP supported

    async def read(self, offset: int, length: int) -> bytes | memoryview: ...
    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None: ...
    async def flush(self) -> None: ...
    async def unmap(self, offset: int, length: int) -> None: ...
    async def write_zeroes(self, offset: int, length: int) -> None: ...

    # Optional (not part of the protocol check): a device that several servers may write at
    # once offers ``async compare_and_write(offset, expected, new, fua=False)``, atomic with
    # respect to every writer of the device, raising ``MiscompareError`` when the data is not
    # ``expected``. The SCSI layer runs COMPARE AND WRITE through it when present; otherwise
    # it reads, compares and writes under its own lock, atomic only for its own writes
    # (enough for a device only this process writes, such as a file).


def _check_geometry(size: int, block_size: int) -> None:
    if block_size not in (512, 1024, 2048, 4096):
        raise ValueError(f"unsupported block size {block_size}")
    if size < 0 or size % block_size:
        raise ValueError(f"size {size} is not a multiple of the block size {block_size}")


def _os_error(e: OSError) -> BlockDeviceError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpaceError(str(e))
    if e.errno in (errno.EROFS, errno.EBADF, errno.EPERM, errno.EACCES):
        return ReadOnlyError(str(e))
    return MediumError(str(e))


# fallocate(2) modes (linux/falloc.h)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int

_ZERO_CHUNK = 1 << 20
_ZEROS = bytes(_ZERO_CHUNK)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """libc fallocate with any mode (``os.posix_fallocate`` only allocates)."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class FileBlockDevice:
    """A volume stored in one (sparse) file.

    ``thin=True`` leaves the file sparse and punches holes on UNMAP;
    ``thin=False`` allocates the whole file up front, so writes never hit
    ENOSPC, and zeroing keeps the blocks allocated.
    """

    def __init__(self, path: str | os.PathLike, size: int, block_size: int = 512,
                 readonly: bool = False, thin: bool = True) -> None:
        _check_geometry(size, block_size)
        self.path = os.fspath(path)
        self.block_size = block_size
        self.readonly = readonly
        self.thin = thin
        flags = os.O_RDONLY if readonly else os.O_RDWR | os.O_CREAT
        self._fd = os.open(self.path, flags | os.O_CLOEXEC, 0o600)
        try:
            current = os.fstat(self._fd).st_size
            if current < size and not readonly:
                self._grow(current, size)
            elif current < size:
                raise ValueError(f"{self.path} is {current} bytes, smaller than {size}")
        except BaseException:
            os.close(self._fd)
            raise
        self.size = size
        self._punch = thin            # cleared once the file system says EOPNOTSUPP

    def _grow(self, old: int, new: int) -> None:
        if self.thin:
            os.ftruncate(self._fd, new)
        else:
            os.posix_fallocate(self._fd, old, new - old)

    # -- I/O -----------------------------------------------------------------

    async def read(self, offset: int, length: int) -> memoryview:
        buf = bytearray(length)
        view = memoryview(buf)
        done = 0
        try:
            while done < length:
                n = os.preadv(self._fd, [view[done:]], offset + done)
                if n == 0:            # past EOF of a shorter file: reads as zeros
                    break
                done += n
        except OSError as e:
            raise _os_error(e) from None
        return view

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        if self.readonly:
            raise ReadOnlyError(self.path)
        view = memoryview(data)
        done, total = 0, len(view)
        try:
            while done < total:
                done += os.pwrite(self._fd, view[done:], offset + done)
        except OSError as e:
            raise _os_error(e) from None
        if fua:
            await self.flush()

    async def flush(self) -> None:
        if self.readonly:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(None, os.fdatasync, self._fd)
        except OSError as e:
            raise _os_error(e) from None

    async def unmap(self, offset: int, length: int) -> None:
        """Deallocate; the range reads as zeros afterwards (LBPRZ)."""
        if self.readonly:
            raise ReadOnlyError(self.path)
        if self._punch:
            try:
                fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise _os_error(e) from None
                self._punch = False
        await self._write_zero_bytes(offset, length)

    async def write_zeroes(self, offset: int, length: int) -> None:
        if self.thin:
            await self.unmap(offset, length)
            return
        if self.readonly:
            raise ReadOnlyError(self.path)
        try:
            fallocate(self._fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise _os_error(e) from None
        await self._write_zero_bytes(offset, length)

    async def _write_zero_bytes(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            n = min(_ZERO_CHUNK, end - offset)
            await self.write(offset, _ZEROS[:n] if n < _ZERO_CHUNK else _ZEROS)
            offset += n

    async def allocation(self, offset: int, length: int) -> tuple[bool, int]:
        """(mapped, run length in bytes) of the extent starting at ``offset``.

        Uses SEEK_DATA/SEEK_HOLE, so the answer has file-system block
        granularity.  Backs GET LBA STATUS.
        """
        end = offset + length
        try:
            data = os.lseek(self._fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:          # no data at or after offset
                return False, length
            return True, length                 # file system without SEEK_DATA
        if data > offset:
            return False, min(data, end) - offset
        hole = os.lseek(self._fd, offset, os.SEEK_HOLE)
        return True, min(hole, end) - offset

    # -- management ----------------------------------------------------------

    def resize(self, new_size: int) -> None:
        """Grow online; shrinking a live volume would lose data, so it is refused."""
        _check_geometry(new_size, self.block_size)
        if new_size < self.size:
            raise ValueError("shrinking a volume is not supported")
        if new_size == self.size:
            return
        if self.readonly:
            raise ReadOnlyError(self.path)
        self._grow(self.size, new_size)
        self.size = new_size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FileBlockDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MemoryBlockDevice:
    """In-memory device for unit tests of the layers above."""

    def __init__(self, size: int, block_size: int = 512, readonly: bool = False,
                 thin: bool = True) -> None:
        _check_geometry(size, block_size)
        self.block_size = block_size
        self.size = size
        self.readonly = readonly
        self.thin = thin
        self.buf = bytearray(size)
        self.flushes = 0
        self.fua_writes = 0
        self.unmapped: list[tuple[int, int]] = []

    async def read(self, offset: int, length: int) -> bytes:
        # a copy: the caller may hold the buffer while later writes land
        return bytes(self.buf[offset:offset + length])

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        if self.readonly:
            raise ReadOnlyError("memory device is read-only")
        self.buf[offset:offset + len(data)] = data
        if fua:
            self.fua_writes += 1

    async def flush(self) -> None:
        self.flushes += 1

    async def unmap(self, offset: int, length: int) -> None:
        if self.readonly:
            raise ReadOnlyError("memory device is read-only")
        self.buf[offset:offset + length] = bytes(length)
        self.unmapped.append((offset, length))

    async def write_zeroes(self, offset: int, length: int) -> None:
        if self.readonly:
            raise ReadOnlyError("memory device is read-only")
        self.buf[offset:offset + length] = bytes(length)

    def resize(self, new_size: int) -> None:
        _check_geometry(new_size, self.block_size)
        if new_size < self.size:
            raise ValueError("shrinking a volume is not supported")
        self.buf.extend(bytes(new_size - self.size))
        self.size = new_size
