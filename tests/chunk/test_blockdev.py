"""FileBlockDevice against a real file (sparse files, hole punching, fdatasync),
MemoryBlockDevice as the unit-test fake, and the typed errors."""

from __future__ import annotations

import errno
import os

import pytest

from chunk import blockdev
from chunk.blockdev import (BlockDevice, FileBlockDevice, MediumError, MemoryBlockDevice,
                            NoSpaceError, ReadOnlyError)

MiB = 1 << 20


@pytest.fixture
def path(tmp_path):
    return tmp_path / "vol.img"


def allocated(path) -> int:
    return os.stat(path).st_blocks * 512


async def test_file_is_sparse_and_round_trips(path):
    with FileBlockDevice(path, 8 * MiB) as dev:
        assert isinstance(dev, BlockDevice)
        assert os.path.getsize(path) == 8 * MiB
        assert allocated(path) == 0
        assert bytes(await dev.read(4096, 512)) == bytes(512)
        data = os.urandom(8192)
        await dev.write(8 * MiB - 8192, data)          # the very last blocks
        assert bytes(await dev.read(8 * MiB - 8192, 8192)) == data
        assert 8192 <= allocated(path) < MiB


async def test_reopen_keeps_data(path):
    with FileBlockDevice(path, MiB) as dev:
        await dev.write(512, b"x" * 512)
        await dev.flush()
    with FileBlockDevice(path, MiB) as dev:
        assert bytes(await dev.read(512, 512)) == b"x" * 512


async def test_fua_and_flush_call_fdatasync(path, monkeypatch):
    calls = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real(fd)))
    with FileBlockDevice(path, MiB) as dev:
        await dev.write(0, b"a" * 512)
        assert calls == []
        await dev.write(0, b"b" * 512, fua=True)
        assert len(calls) == 1
        await dev.flush()
        assert len(calls) == 2


async def test_unmap_punches_a_hole_and_reads_zeros(path):
    with FileBlockDevice(path, 4 * MiB) as dev:
        await dev.write(0, os.urandom(2 * MiB))
        before = allocated(path)
        assert before >= 2 * MiB
        await dev.unmap(0, MiB)
        assert bytes(await dev.read(0, MiB)) == bytes(MiB)
        assert allocated(path) <= before - MiB
        assert (await dev.allocation(0, 4 * MiB)) == (False, MiB)
        assert (await dev.allocation(MiB, 3 * MiB)) == (True, MiB)
        assert (await dev.allocation(2 * MiB, 2 * MiB)) == (False, 2 * MiB)


async def test_unmap_falls_back_to_zeros_without_punch_hole(path, monkeypatch):
    def unsupported(fd, mode, offset, length):
        raise OSError(errno.EOPNOTSUPP, "not supported")
    monkeypatch.setattr(blockdev, "fallocate", unsupported)
    with FileBlockDevice(path, MiB) as dev:
        await dev.write(0, b"\xff" * 4096)
        await dev.unmap(0, 4096)
        assert bytes(await dev.read(0, 4096)) == bytes(4096)
        await dev.write(0, b"\xff" * 4096)
        await dev.write_zeroes(0, 4096)
        assert bytes(await dev.read(0, 4096)) == bytes(4096)


async def test_thick_file_is_allocated_and_zeroing_keeps_it(path):
    with FileBlockDevice(path, 2 * MiB, thin=False) as dev:
        assert allocated(path) >= 2 * MiB
        await dev.write(0, b"\x55" * 4096)
        await dev.write_zeroes(0, 4096)
        assert bytes(await dev.read(0, 4096)) == bytes(4096)
        assert allocated(path) >= 2 * MiB


async def test_resize_grows_only(path):
    with FileBlockDevice(path, MiB) as dev:
        dev.resize(3 * MiB)
        assert dev.size == 3 * MiB == os.path.getsize(path)
        await dev.write(3 * MiB - 512, b"e" * 512)
        with pytest.raises(ValueError):
            dev.resize(MiB)
        with pytest.raises(ValueError):
            dev.resize(3 * MiB + 1)


async def test_readonly(path):
    with FileBlockDevice(path, MiB) as dev:
        await dev.write(0, b"r" * 512)
    with FileBlockDevice(path, MiB, readonly=True) as dev:
        assert bytes(await dev.read(0, 512)) == b"r" * 512
        for call in (dev.write(0, b"w" * 512), dev.unmap(0, 512), dev.write_zeroes(0, 512)):
            with pytest.raises(ReadOnlyError):
                await call
    with pytest.raises(ValueError):
        FileBlockDevice(path, 2 * MiB, readonly=True)      # cannot grow a read-only file


def test_geometry_is_validated(path):
    with pytest.raises(ValueError):
        FileBlockDevice(path, 1000)
    with pytest.raises(ValueError):
        FileBlockDevice(path, MiB, block_size=520)
    with FileBlockDevice(path, MiB, block_size=4096) as dev:
        assert dev.block_size == 4096


@pytest.mark.parametrize("err, exc", [(errno.ENOSPC, NoSpaceError), (errno.EDQUOT, NoSpaceError),
                                      (errno.EIO, MediumError)])
async def test_write_errors_are_typed(path, monkeypatch, err, exc):
    with FileBlockDevice(path, MiB) as dev:
        def fail(*a):
            raise OSError(err, os.strerror(err))
        monkeypatch.setattr(os, "pwrite", fail)
        with pytest.raises(exc):
            await dev.write(0, b"z" * 512)


async def test_read_eio_is_medium_error(path, monkeypatch):
    with FileBlockDevice(path, MiB) as dev:
        def fail(*a):
            raise OSError(errno.EIO, "I/O error")
        monkeypatch.setattr(os, "preadv", fail)
        with pytest.raises(MediumError):
            await dev.read(0, 512)


async def test_memory_device():
    dev = MemoryBlockDevice(MiB)
    assert isinstance(dev, BlockDevice)
    await dev.write(1024, b"m" * 512, fua=True)
    held = await dev.read(1024, 512)
    await dev.write(1024, b"n" * 512)
    assert bytes(held) == b"m" * 512                       # reads are snapshots
    assert dev.fua_writes == 1
    await dev.unmap(1024, 512)
    assert bytes(await dev.read(1024, 512)) == bytes(512)
    dev.resize(2 * MiB)
    assert dev.size == len(dev.buf) == 2 * MiB
