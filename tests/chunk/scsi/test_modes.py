"""MODE SENSE(6/10) layouts and MODE SELECT(6/10) validation, WCE and SWP round trips."""

from __future__ import annotations

import struct

import pytest

from chunk.blockdev import MemoryBlockDevice

from .helpers import (H1, H2, TUR, check, good, make_lu, mode_select6, mode_select10,
                      mode_sense6, mode_sense10, run, write10)

MiB = 1 << 20


def pages_of(data: bytes, hdr: int, bdl: int) -> dict[int, bytes]:
    out, pos = {}, hdr + bdl
    while pos < len(data):
        code, n = data[pos] & 0x3F, data[pos + 1]
        out[code] = data[pos:pos + 2 + n]
        pos += 2 + n
    assert pos == len(data)
    return out


async def test_mode_sense6_all_pages():
    d = good(await run(make_lu(), mode_sense6(0x3F)))
    assert d[0] == len(d) - 1
    assert d[1] == 0                                       # medium type
    assert d[2] == 0x10                                    # DPOFUA, not write protected
    assert d[3] == 8                                       # one short block descriptor
    assert struct.unpack_from(">II", d, 4) == (MiB // 512, 512)
    pages = pages_of(d, 4, 8)
    assert sorted(pages) == [0x08, 0x0A, 0x1C]
    assert pages[0x08][:3] == bytes((0x08, 0x12, 0x04))    # caching: WCE
    assert len(pages[0x08]) == 20
    c = pages[0x0A]
    assert len(c) == 12 and c[2] & 0x04 == 0               # D_SENSE=0: fixed sense
    assert c[3] >> 4 == 1                                  # unrestricted reordering


async def test_mode_sense10_long_lba_and_dbd():
    lu = make_lu()
    d = good(await run(lu, mode_sense10(0x08, llbaa=True)))
    assert struct.unpack_from(">H", d)[0] == len(d) - 2
    assert d[4] & 0x01 and struct.unpack_from(">H", d, 6)[0] == 16
    assert struct.unpack_from(">QII", d, 8) == (MiB // 512, 0, 512)
    d = good(await run(lu, mode_sense10(0x08, dbd=True)))
    assert struct.unpack_from(">H", d, 6)[0] == 0 and d[8] == 0x08 and len(d) == 28
    d = good(await run(lu, mode_sense6(0x0A, dbd=True)))
    assert d[3] == 0 and d[4] == 0x0A and len(d) == 16


async def test_page_control():
    lu = make_lu(write_cache=False)
    cur = good(await run(lu, mode_sense6(0x08, pc=0, dbd=True)))
    assert cur[6] & 0x04 == 0
    chg = good(await run(lu, mode_sense6(0x08, pc=1, dbd=True)))
    assert not any(chg[6:])                                  # nothing changeable (test_modes_fixed)
    chg = good(await run(lu, mode_sense6(0x0A, pc=1, dbd=True)))
    assert not any(chg[6:])
    assert good(await run(lu, mode_sense6(0x08, pc=2, dbd=True)))[6] & 0x04 == 0
    check(await run(lu, mode_sense6(0x08, pc=3)), 0x5, 0x39)  # saved: not supported


async def test_mode_sense_errors_and_truncation():
    lu = make_lu()
    check(await run(lu, mode_sense6(0x19)), 0x5, 0x24)
    check(await run(lu, mode_sense6(0x08, sub=0x01)), 0x5, 0x24)
    good(await run(lu, mode_sense6(0x3F, sub=0xFF)))
    full = good(await run(lu, mode_sense6(0x3F)))
    short = good(await run(lu, mode_sense6(0x3F, alloc=4)))
    assert short == full[:4] and short[0] == len(full) - 1  # the header still tells the full size


async def test_write_protect_bit():
    lu = make_lu(MemoryBlockDevice(MiB, readonly=True))
    assert good(await run(lu, mode_sense6(0x08)))[2] & 0x80
    assert good(await run(lu, mode_sense10(0x08)))[3] & 0x80


def caching_page(wce: bool) -> bytes:
    p = bytearray(20)
    p[0], p[1], p[2] = 0x08, 0x12, 0x04 if wce else 0
    return bytes(p)


async def test_mode_select_of_the_current_values_is_good_and_changes_nothing():
    dev = MemoryBlockDevice(MiB)
    lu = make_lu(dev)
    good(await run(lu, TUR, nexus=H2))                       # H2 is a known nexus
    params = bytes(4) + caching_page(True)
    good(await run(lu, mode_select6(len(params)), params))
    params = bytes(8) + caching_page(True)                   # MODE SELECT(10)
    good(await run(lu, mode_select10(len(params)), params))
    assert lu.modes.wce is True
    good(await run(lu, TUR, nexus=H2))                       # nothing changed: no attention


async def test_mode_select_with_block_descriptor():
    lu = make_lu()
    params = bytes((0, 0, 0, 8)) + struct.pack(">II", 0, 512) + caching_page(True)
    good(await run(lu, mode_select6(len(params)), params))
    params = bytes((0, 0, 0, 8)) + struct.pack(">II", 0, 4096) + caching_page(True)
    check(await run(lu, mode_select6(len(params)), params), 0x5, 0x26)


@pytest.mark.parametrize("params, asc", [
    (bytes(4) + bytes((0x08, 0x12, 0x05)) + bytes(17), 0x26),   # RCD is not changeable
    (bytes(4) + bytes((0x19, 0x06)) + bytes(6), 0x26),          # unknown page
    (bytes(4) + bytes((0x08, 0x10)) + bytes(16), 0x26),         # wrong page length
    (bytes(4) + bytes((0x08, 0x12)) + bytes(10), 0x1A),         # page runs past the list
    (bytes(3), 0x1A),                                           # not even a header
])
async def test_mode_select_rejects_bad_lists_and_changes_nothing(params, asc):
    lu = make_lu()
    check(await run(lu, mode_select6(len(params)), params), 0x5, asc)
    assert lu.modes.wce is True


async def test_mode_select_sp_and_short_data():
    lu = make_lu()
    params = bytes(4) + caching_page(False)
    check(await run(lu, mode_select6(len(params), sp=True), params), 0x5, 0x24)
    check(await run(lu, mode_select6(len(params)), params[:10]), 0x5, 0x0E, 0x03)
    good(await run(lu, mode_select6(0), b""))
    assert lu.modes.wce is True
