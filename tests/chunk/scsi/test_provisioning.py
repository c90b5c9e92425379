"""UNMAP, WRITE SAME and GET LBA STATUS; on the file device holes really are punched."""

from __future__ import annotations

import os
import struct

import pytest

from chunk.blockdev import FileBlockDevice, MemoryBlockDevice

from .helpers import (check, get_lba_status, good, make_lu, read10, rw10, rw16, run, unmap_cdb,
                      unmap_params, write10)

MiB = 1 << 20


def ws10(lba, n, flags=0):
    return rw10(0x41, lba, n, flags)


def ws16(lba, n, flags=0):
    return rw16(0x93, lba, n, flags)


@pytest.fixture
def filedev(tmp_path):
    with FileBlockDevice(tmp_path / "vol", 8 * MiB) as d:
        yield d


def allocated(dev: FileBlockDevice) -> int:
    return os.stat(dev.path).st_blocks * 512


async def test_unmap_reads_zeros_and_frees_space(filedev):
    lu = make_lu(filedev)
    blocks = 4 * MiB // 512
    good(await run(lu, rw16(0x8A, 0, blocks), os.urandom(4 * MiB)))
    before = allocated(filedev)
    assert before >= 4 * MiB
    params = unmap_params((0, 2048), (4096, 2048))       # [0, 1 MiB) and [2 MiB, 3 MiB)
    good(await run(lu, unmap_cdb(len(params)), params))
    assert good(await run(lu, read10(0, 2048))) == bytes(MiB)
    assert good(await run(lu, read10(4096, 2048))) == bytes(MiB)
    assert good(await run(lu, read10(2048, 1))) != bytes(512)      # untouched in between
    assert allocated(filedev) <= before - 2 * MiB


async def test_get_lba_status_follows_holes(filedev):
    lu = make_lu(filedev)
    good(await run(lu, write10(0, 64), os.urandom(64 * 512)))
    d = good(await run(lu, get_lba_status(0)))
    assert struct.unpack_from(">I", d)[0] == 20
    lba, n, status = struct.unpack_from(">QIB", d, 8)
    assert (lba, status) == (0, 0) and n >= 64              # mapped run starts at 0
    params = unmap_params((0, 32))
    good(await run(lu, unmap_cdb(len(params)), params))
    lba, n, status = struct.unpack_from(">QIB", good(await run(lu, get_lba_status(0))), 8)
    assert (lba, n, status) == (0, 32, 1)                   # deallocated
    lba, n, status = struct.unpack_from(">QIB", good(await run(lu, get_lba_status(32))), 8)
    assert (lba, status) == (32, 0)
    lba, n, status = struct.unpack_from(">QIB", good(await run(lu, get_lba_status(1000))), 8)
    assert (lba, n, status) == (1000, 8 * MiB // 512 - 1000, 1)
    check(await run(lu, get_lba_status(8 * MiB // 512)), 0x5, 0x21)


async def test_unmap_parameter_errors():
    lu = make_lu()
    good(await run(lu, unmap_cdb(0), b""))                  # nothing to do
    check(await run(lu, unmap_cdb(6), bytes(6)), 0x5, 0x1A)  # shorter than the header
    bad = struct.pack(">HH4x", 22, 32) + bytes(16)           # BDDL beyond the list
    check(await run(lu, unmap_cdb(len(bad)), bad), 0x5, 0x1A)
    p = unmap_params((2047, 2))
    check(await run(lu, unmap_cdb(len(p)), p), 0x5, 0x21)
    lu2 = make_lu(max_unmap_descriptors=2)
    p = unmap_params((0, 1), (2, 1), (4, 1))
    check(await run(lu2, unmap_cdb(len(p)), p), 0x5, 0x26)
    lu3 = make_lu(max_unmap_blocks=8)
    p = unmap_params((0, 9))
    check(await run(lu3, unmap_cdb(len(p)), p), 0x5, 0x26)
    # MAXIMUM UNMAP LBA COUNT bounds the whole command (SBC-4), not each descriptor
    dev4 = MemoryBlockDevice(MiB)
    lu4 = make_lu(dev4, max_unmap_blocks=8)
    p = unmap_params((0, 8), (10, 8), (20, 8), (30, 8))
    check(await run(lu4, unmap_cdb(len(p)), p), 0x5, 0x26)
    assert dev4.unmapped == []
    p = unmap_params((0, 4), (10, 4))
    good(await run(lu4, unmap_cdb(len(p)), p))
    check(await run(lu, bytes((0x42, 1, 0, 0, 0, 0, 0, 0, 24, 0)), unmap_params((0, 1))),
          0x5, 0x24)                                          # ANCHOR


async def test_unmap_validates_every_descriptor_before_unmapping_any():
    dev = MemoryBlockDevice(MiB)
    lu = make_lu(dev)
    await dev.write(0, b"\xff" * 512)
    p = unmap_params((0, 1), (5000, 1))
    check(await run(lu, unmap_cdb(len(p)), p), 0x5, 0x21)
    assert bytes(await dev.read(0, 512)) == b"\xff" * 512 and dev.unmapped == []


async def test_truncated_last_descriptor_is_ignored():
    dev = MemoryBlockDevice(MiB)
    lu = make_lu(dev)
    p = unmap_params((0, 1)) + bytes(8)
    p = struct.pack(">HH", len(p) - 2, 24) + p[4:]           # BDDL 24: one and a half descriptors
    good(await run(lu, unmap_cdb(len(p)), p))
    assert dev.unmapped == [(0, 512)]


async def test_thick_lu_has_no_unmap():
    lu = make_lu(MemoryBlockDevice(MiB, thin=False))
    p = unmap_params((0, 1))
    check(await run(lu, unmap_cdb(len(p)), p), 0x5, 0x20)


@pytest.mark.parametrize("cdb", [ws10, ws16])
async def test_write_same_pattern(cdb):
    dev = MemoryBlockDevice(MiB)
    lu = make_lu(dev)
    block = bytes(range(256)) * 2
    good(await run(lu, cdb(10, 300), block))
    assert bytes(await dev.read(10 * 512, 300 * 512)) == block * 300
    assert bytes(await dev.read(9 * 512, 512)) == bytes(512)
    assert bytes(await dev.read(310 * 512, 512)) == bytes(512)


async def test_write_same_unmap_punches_holes_when_the_data_is_zero(filedev):
    lu = make_lu(filedev)
    good(await run(lu, rw16(0x8A, 0, 2048), b"\x77" * MiB))
    before = allocated(filedev)
    good(await run(lu, ws16(0, 2048, flags=0x08), bytes(512)))          # UNMAP bit
    assert good(await run(lu, read10(0, 2048))) == bytes(MiB)
    assert allocated(filedev) <= before - MiB + 4096
    # UNMAP with non-zero data must write the data, not deallocate
    good(await run(lu, ws10(0, 8, flags=0x08), b"\x01" * 512))
    assert good(await run(lu, read10(0, 8))) == b"\x01" * 4096


async def test_write_same_ndob_and_plain_zeroes():
    dev = MemoryBlockDevice(MiB)
    lu = make_lu(dev)
    await dev.write(0, b"\x55" * 8192)
    good(await run(lu, ws16(0, 8, flags=0x01), None))                  # NDOB: no data-out
    assert bytes(await dev.read(0, 4096)) == bytes(4096) and dev.unmapped == []
    good(await run(lu, ws16(8, 8, flags=0x09), None))                  # NDOB + UNMAP
    assert dev.unmapped == [(4096, 4096)]
    assert lu.data_out_length(ws16(0, 8, flags=0x01)) == 0
    assert lu.data_out_length(ws16(0, 8)) == 512


async def test_write_same_errors():
    lu = make_lu()
    check(await run(lu, ws10(0, 0), bytes(512)), 0x5, 0x24)             # WSNZ
    check(await run(lu, ws10(2048, 0), bytes(512)), 0x5, 0x21)          # LBA checked first
    check(await run(lu, ws10(2047, 2), bytes(512)), 0x5, 0x21)
    check(await run(lu, ws16(0, 1, flags=0x10), bytes(512)), 0x5, 0x24)  # ANCHOR
    check(await run(lu, ws16(0, 1, flags=0x20), bytes(512)), 0x5, 0x24)  # WRPROTECT
    check(await run(make_lu(max_write_same_blocks=16), ws16(0, 17), bytes(512)), 0x5, 0x24)
    check(await run(lu, ws10(0, 1), bytes(100)), 0x5, 0x0E, 0x03)      # short data-out
