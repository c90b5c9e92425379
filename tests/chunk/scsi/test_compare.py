"""COMPARE AND WRITE, VERIFY and ORWRITE: compare semantics, MISCOMPARE offsets, atomicity."""

from __future__ import annotations

import asyncio
import struct

import pytest

from chunk.blockdev import MemoryBlockDevice

from .helpers import caw, check, good, make_lu, read10, rw10, rw12, rw16, run, write10

MiB = 1 << 20


async def test_compare_and_write_success_and_miscompare():
    dev = MemoryBlockDevice(MiB)
    lu = make_lu(dev)
    old, new = b"A" * 1024, b"B" * 1024
    await dev.write(512 * 7, old)
    good(await run(lu, caw(7, 2), old + new))
    assert bytes(await dev.read(512 * 7, 1024)) == new
    # compare data differs at byte 700 of the verify buffer: MISCOMPARE, INFORMATION = 700
    verify = bytearray(new)
    verify[700] ^= 0xFF
    s = check(await run(lu, caw(7, 2), bytes(verify) + b"C" * 1024), 0xE, 0x1D)
    assert s.valid and s.info == 700
    assert bytes(await dev.read(512 * 7, 1024)) == new    # nothing written


async def test_compare_and_write_checks():
    lu = make_lu()
    good(await run(lu, caw(0, 0), b""))                    # zero blocks: nothing to do
    check(await run(lu, caw(2047, 2), bytes(2048)), 0x5, 0x21)
    check(await run(lu, caw(0, 65), bytes(65 * 1024)), 0x5, 0x24)       # > max length (64)
    check(await run(lu, caw(0, 1, flags=0x20), bytes(1024)), 0x5, 0x24)  # WRPROTECT
    # the Data-Out Buffer must be exactly 2 * n blocks (and 256 wraps to 0)
    check(await run(lu, caw(0, 1), bytes(2048), expected=2048), 0x5, 0x24)
    check(await run(lu, caw(0, 0), bytes(1024), expected=1024), 0x5, 0x24)
    assert lu.data_out_length(caw(0, 3)) == 3 * 1024
    assert lu.data_out_length(caw(0, 200)) == 0


class SlowDevice(MemoryBlockDevice):
    """Yields inside every call, as a networked backend would."""

    async def read(self, offset, length):
        data = await super().read(offset, length)           # the data is as of the request
        await asyncio.sleep(0.01)
        return data

    async def write(self, offset, data, fua=False):
        await asyncio.sleep(0.01)
        await super().write(offset, data, fua)


async def test_compare_and_write_is_atomic_against_concurrent_writes():
    dev = SlowDevice(MiB)
    lu = make_lu(dev)
    await MemoryBlockDevice.write(dev, 0, b"A" * 512)
    # the WRITE arrives while the CAW is between its read and its write
    cas = asyncio.create_task(run(lu, caw(0, 1), b"A" * 512 + b"B" * 512))
    await asyncio.sleep(0.001)
    plain = asyncio.create_task(run(lu, write10(0, 1), b"W" * 512))
    await asyncio.gather(cas, plain)
    good(cas.result())
    good(plain.result())
    assert bytes(await dev.read(0, 512)) == b"W" * 512       # the write came after the CAW
    # and two CAWs expecting the same old data: exactly one wins
    await MemoryBlockDevice.write(dev, 0, b"A" * 512)
    r1, r2 = await asyncio.gather(run(lu, caw(0, 1), b"A" * 512 + b"X" * 512),
                                  run(lu, caw(0, 1), b"A" * 512 + b"Y" * 512))
    assert sorted((r1.status, r2.status)) == [0x00, 0x02]


async def test_compare_and_write_waits_for_writes_already_in_flight():
    dev = SlowDevice(MiB)
    lu = make_lu(dev)
    plain = asyncio.create_task(run(lu, write10(0, 1), b"W" * 512))
    await asyncio.sleep(0.001)                              # the write is inside the device
    r = await run(lu, caw(0, 1), b"W" * 512 + b"C" * 512)   # compares against the new data
    good(r)
    good(await plain)
    assert bytes(await dev.read(0, 512)) == b"C" * 512


class CawDevice(MemoryBlockDevice):
    """A device with a compare_and_write of its own (a replicated volume's, atomic across
    chunk servers): the unit must run COMPARE AND WRITE through it, not read + write."""

    def __init__(self, size):
        super().__init__(size)
        self.calls = []
        self.plain_writes = 0

    async def write(self, offset, data, fua=False):
        self.plain_writes += 1
        await super().write(offset, data, fua)

    async def compare_and_write(self, offset, expected, new, fua=False):
        from chunk.blockdev import MiscompareError
        self.calls.append((offset, bytes(expected), bytes(new), fua))
        have = bytes(await self.read(offset, len(expected)))
        if have != bytes(expected):
            raise MiscompareError(next(i for i, (a, b) in enumerate(zip(have, bytes(expected))) if a != b))
        await MemoryBlockDevice.write(self, offset, new, fua)


async def test_compare_and_write_runs_through_the_devices_own_when_it_has_one():
    dev = CawDevice(MiB)
    lu = make_lu(dev)
    await MemoryBlockDevice.write(dev, 512 * 3, b"A" * 1024)
    good(await run(lu, caw(3, 2, flags=0x08), b"A" * 1024 + b"B" * 1024))
    assert dev.calls == [(512 * 3, b"A" * 1024, b"B" * 1024, True)] and dev.plain_writes == 0
    assert bytes(await dev.read(512 * 3, 1024)) == b"B" * 1024
    verify = bytearray(b"B" * 1024)
    verify[900] ^= 1
    s = check(await run(lu, caw(3, 2), bytes(verify) + b"C" * 1024), 0xE, 0x1D)
    assert s.valid and s.info == 900
    assert dev.calls[-1][3] is False and dev.plain_writes == 0
    assert bytes(await dev.read(512 * 3, 1024)) == b"B" * 1024


VERIFIES = [(0x2F, rw10), (0xAF, rw12), (0x8F, rw16)]


@pytest.mark.parametrize("op, build", VERIFIES)
async def test_verify(op, build):
    dev = MemoryBlockDevice(MiB)
    lu = make_lu(dev)
    data = bytes(range(256)) * 8
    await dev.write(512 * 4, data)
    good(await run(lu, build(op, 4, 4), None))               # BYTCHK 0: range check only
    check(await run(lu, build(op, 2047, 2), None), 0x5, 0x21)
    good(await run(lu, build(op, 4, 4, 0x02), data))         # BYTCHK 01: compare
    bad = bytearray(data)
    bad[1500] ^= 1
    s = check(await run(lu, build(op, 4, 4, 0x02), bytes(bad)), 0xE, 0x1D)
    assert s.info == 1500
    check(await run(lu, build(op, 4, 1, 0x04), bytes(512)), 0x5, 0x24)   # BYTCHK 10b
    check(await run(lu, build(op, 4, 1, 0x20), None), 0x5, 0x24)         # VRPROTECT
    assert lu.data_out_length(build(op, 4, 4, 0x02)) == 2048
    assert lu.data_out_length(build(op, 4, 4, 0x06)) == 512
    assert lu.data_out_length(build(op, 4, 4)) == 0


async def test_verify_bytchk_11_compares_every_block_with_one():
    dev = MemoryBlockDevice(MiB)
    lu = make_lu(dev)
    await dev.write(0, b"\x42" * 2048)
    good(await run(lu, rw10(0x2F, 0, 4, 0x06), b"\x42" * 512))
    await dev.write(3 * 512 + 10, b"\x00")
    s = check(await run(lu, rw10(0x2F, 0, 4, 0x06), b"\x42" * 512), 0xE, 0x1D)
    assert s.info == 3 * 512 + 10


async def test_orwrite():
    dev = MemoryBlockDevice(MiB)
    lu = make_lu(dev)
    await dev.write(0, b"\x0F" * 1024)
    good(await run(lu, rw16(0x8B, 0, 2), b"\xF0" * 512 + b"\x01" * 512))
    assert bytes(await dev.read(0, 1024)) == b"\xFF" * 512 + b"\x0F" * 512
    check(await run(lu, rw16(0x8B, 2047, 2), bytes(1024)), 0x5, 0x21)
    check(await run(lu, rw16(0x8B, 0, 1, 0x20), bytes(512)), 0x5, 0x24)


async def test_write_and_verify_writes():
    dev = MemoryBlockDevice(MiB)
    lu = make_lu(dev)
    for op, build in ((0x2E, rw10), (0xAE, rw12), (0x8E, rw16)):
        payload = struct.pack(">B", op) * 512
        good(await run(lu, build(op, 9, 1), payload))
        assert good(await run(lu, read10(9, 1))) == payload
