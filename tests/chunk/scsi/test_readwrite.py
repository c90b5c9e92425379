"""READ/WRITE 6/10/12/16 and READ CAPACITY over the memory fake and the real file device."""

from __future__ import annotations

import errno
import os
import struct

import pytest

from chunk.blockdev import FileBlockDevice, MediumError, MemoryBlockDevice, NoSpaceError

from .helpers import (check, good, make_lu, rc10, rc16, read10, rw6, rw10, rw12, rw16, run,
                      write10)

SIZE = 1 << 20                   # 2048 blocks of 512 bytes
NB = SIZE // 512


@pytest.fixture(params=["memory", "file"])
def dev(request, tmp_path):
    if request.param == "memory":
        yield MemoryBlockDevice(SIZE)
    else:
        with FileBlockDevice(tmp_path / "vol", SIZE) as d:
            yield d


READS = {6: (0x08, rw6), 10: (0x28, rw10), 12: (0xA8, rw12), 16: (0x88, rw16)}
WRITES = {6: (0x0A, rw6), 10: (0x2A, rw10), 12: (0xAA, rw12), 16: (0x8A, rw16)}


@pytest.mark.parametrize("size", [6, 10, 12, 16])
async def test_round_trip_at_both_edges(dev, size):
    lu = make_lu(dev)
    (wop, wb), (rop, rb) = WRITES[size], READS[size]
    for lba in (0, NB - 3):
        data = os.urandom(3 * 512)
        assert good(await run(lu, wb(wop, lba, 3), data)) == b""
        assert good(await run(lu, rb(rop, lba, 3))) == data


@pytest.mark.parametrize("size", [6, 10, 12, 16])
async def test_past_the_end_is_lba_out_of_range(dev, size):
    lu = make_lu(dev)
    (wop, wb), (rop, rb) = WRITES[size], READS[size]
    for lba, n in ((NB - 1, 2), (NB, 1)):
        check(await run(lu, rb(rop, lba, n)), 0x5, 0x21)
        check(await run(lu, wb(wop, lba, n), bytes(512 * n)), 0x5, 0x21)
    assert bytes(await dev.read(SIZE - 512, 512)) == bytes(512)


async def test_read6_length_zero_means_256_blocks(dev):
    lu = make_lu(dev)
    await dev.write(0, b"\x01" * 256 * 512)
    assert good(await run(lu, rw6(0x08, 0, 0))) == b"\x01" * 256 * 512
    assert good(await run(lu, rw6(0x0A, 0, 0), b"\x02" * 256 * 512)) == b""
    assert bytes(await dev.read(0, 256 * 512)) == b"\x02" * 256 * 512


@pytest.mark.parametrize("size", [10, 12, 16])
async def test_zero_length_transfers_nothing_but_checks_the_lba(dev, size):
    lu = make_lu(dev)
    (wop, wb), (rop, rb) = WRITES[size], READS[size]
    assert (await run(lu, rb(rop, NB - 1, 0))).data is None
    assert good(await run(lu, wb(wop, 0, 0), b"")) == b""
    check(await run(lu, rb(rop, NB + 1, 0)), 0x5, 0x21)
    check(await run(lu, rb(rop, 0xFFFFFFFF, 0)), 0x5, 0x21)


async def test_64_bit_lba_does_not_wrap():
    lu = make_lu()
    check(await run(lu, rw16(0x88, 0xFFFFFFFFFFFFFFFF, 1)), 0x5, 0x21)
    check(await run(lu, rw16(0x88, (1 << 64) - 1, 2)), 0x5, 0x21)


@pytest.mark.parametrize("cdb", [read10(0, 1, 0x20), rw12(0xA8, 0, 1, 0xE0), rw16(0x88, 0, 1, 0x40)])
async def test_rdprotect_without_protection_information_is_refused(cdb):
    s = check(await run(make_lu(), cdb), 0x5, 0x24)
    assert s.sks == 0xCF0001                               # CDB byte 1, bit 7


async def test_wrprotect_is_refused():
    check(await run(make_lu(), write10(0, 1, 0x20), bytes(512)), 0x5, 0x24)


async def test_transfer_longer_than_block_limits_is_refused():
    lu = make_lu(max_transfer_bytes=64 * 1024)             # 128 blocks
    check(await run(lu, read10(0, 129)), 0x5, 0x24)
    assert len(good(await run(lu, read10(0, 128)))) == 128 * 512
    assert lu.data_out_length(write10(0, 129)) == 0        # nothing is solicited for it


async def test_fua_and_write_cache_disabled_write_through():
    dev = MemoryBlockDevice(SIZE)
    lu = make_lu(dev)
    good(await run(lu, write10(0, 1), bytes(512)))
    assert dev.fua_writes == 0
    good(await run(lu, write10(0, 1, flags=0x08), bytes(512)))           # FUA
    assert dev.fua_writes == 1
    good(await run(lu, write10(0, 1, flags=0x10), bytes(512)))           # DPO alone: ignored
    assert dev.fua_writes == 1
    good(await run(lu, rw10(0x2E, 0, 1), bytes(512)))                    # WRITE AND VERIFY
    assert dev.fua_writes == 2
    lu.modes.wce = False
    good(await run(lu, write10(0, 1), bytes(512)))
    assert dev.fua_writes == 3


async def test_fua_write_reaches_fdatasync_on_the_file_device(tmp_path, monkeypatch):
    synced = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd)))
    with FileBlockDevice(tmp_path / "v", SIZE) as dev:
        lu = make_lu(dev)
        good(await run(lu, write10(5, 1, flags=0x08), b"f" * 512))
        assert len(synced) == 1
        good(await run(lu, bytes((0x35,)) + bytes(9)))                   # SYNCHRONIZE CACHE(10)
        assert len(synced) == 2


async def test_short_data_out_writes_whole_blocks_only(dev):
    lu = make_lu(dev)
    await dev.write(0, b"a" * 1024)
    # EDTL of one block for a two-block WRITE: the first block lands, GOOD
    good(await run(lu, write10(0, 2), b"b" * 512))
    assert bytes(await dev.read(0, 1024)) == b"b" * 512 + b"a" * 512
    # a partial block: nothing is written, INVALID FIELD IN COMMAND INFORMATION UNIT
    check(await run(lu, write10(0, 1), b"c" * 200), 0x5, 0x0E, 0x03)
    assert bytes(await dev.read(0, 512)) == b"b" * 512
    # extra data beyond the CDB's length is ignored
    good(await run(lu, write10(1, 1), b"d" * 1024))
    assert bytes(await dev.read(0, 1536)) == b"b" * 512 + b"d" * 512 + bytes(512)


async def test_read_only_device_and_software_write_protect(tmp_path):
    with FileBlockDevice(tmp_path / "v", SIZE) as d:
        await d.write(0, b"r" * 512)
    with FileBlockDevice(tmp_path / "v", SIZE, readonly=True) as ro:
        lu = make_lu(ro)
        assert good(await run(lu, read10(0, 1))) == b"r" * 512
        for cdb, data in ((write10(0, 1), bytes(512)), (rw16(0x93, 0, 1), bytes(512)),
                          (struct.pack(">BB5xHB", 0x42, 0, 24, 0), bytes(24))):
            check(await run(lu, cdb, data), 0x7, 0x27)
    lu = make_lu()
    lu.modes.swp = True
    check(await run(lu, write10(0, 1), bytes(512)), 0x7, 0x27)
    good(await run(lu, read10(0, 1)))


class FailingDevice(MemoryBlockDevice):
    def __init__(self, exc):
        super().__init__(SIZE)
        self.exc = exc

    async def read(self, offset, length):
        raise self.exc

    async def write(self, offset, data, fua=False):
        raise self.exc


async def test_eio_is_medium_error():
    lu = make_lu(FailingDevice(MediumError("EIO")))
    check(await run(lu, read10(0, 1)), 0x3, 0x11)          # UNRECOVERED READ ERROR
    check(await run(lu, write10(0, 1), bytes(512)), 0x3, 0x0C)  # WRITE ERROR


async def test_enospc_is_space_allocation_failed(tmp_path, monkeypatch):
    with FileBlockDevice(tmp_path / "v", SIZE) as dev:
        lu = make_lu(dev)

        def full(*a):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(os, "pwrite", full)
        check(await run(lu, write10(0, 1), bytes(512)), 0x7, 0x27, 0x07)


async def test_read_capacity(dev):
    lu = make_lu(dev)
    assert good(await run(lu, rc10())) == struct.pack(">II", NB - 1, 512)
    d = good(await run(lu, rc16()))
    assert len(d) == 32
    assert struct.unpack_from(">QI", d) == (NB - 1, 512)
    assert d[12] == 0 and d[13] == 0                       # no protection, 1 LB per PB
    assert d[14] & 0xC0 == 0xC0                            # LBPME, LBPRZ (thin)
    assert good(await run(lu, rc16(alloc=12))) == d[:12]


async def test_read_capacity_variants():
    lu = make_lu(MemoryBlockDevice(SIZE, block_size=4096, thin=False), physical_block_exponent=0)
    assert good(await run(lu, rc10())) == struct.pack(">II", SIZE // 4096 - 1, 4096)
    assert good(await run(lu, rc16()))[12:15] == bytes(3)  # thick: no LBPME
    # an LBA without PMI is invalid
    check(await run(lu, bytes((0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0))), 0x5, 0x24)
    lu2 = make_lu(physical_block_exponent=3)
    assert good(await run(lu2, rc16()))[13] == 3


class HugeDevice(MemoryBlockDevice):
    """Capacity only: READ CAPACITY never touches the data."""

    def __init__(self, size):
        self.block_size, self.size, self.readonly, self.thin = 512, size, False, True


async def test_read_capacity_10_saturates_for_large_volumes():
    lu = make_lu(HugeDevice(4 << 40))                      # 2^33 blocks
    assert good(await run(lu, rc10())) == struct.pack(">II", 0xFFFFFFFF, 512)
    assert struct.unpack_from(">Q", good(await run(lu, rc16())))[0] == (8 << 30) - 1


async def test_unknown_opcode_and_bad_service_action():
    s = check(await run(make_lu(), bytes((0xC5,)) + bytes(15)), 0x5, 0x20)
    assert s.sks == 0xC00000
    check(await run(make_lu(), struct.pack(">BBQIBB", 0x9E, 0x11, 0, 32, 0, 0)), 0x5, 0x24)


async def test_reads_return_the_device_buffer_without_copying(tmp_path):
    with FileBlockDevice(tmp_path / "v", SIZE) as dev:
        lu = make_lu(dev)
        r = await run(lu, read10(0, 8))
        assert isinstance(r.data, memoryview) and r.data.nbytes == 4096
