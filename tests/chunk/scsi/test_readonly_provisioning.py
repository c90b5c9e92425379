"""What a read-only thin LU (a snapshot, a read-only grant) says about logical block
provisioning.

It refuses UNMAP and WRITE SAME with UNMAP (DATA PROTECT), yet its Logical Block
Provisioning VPD page set LBPU, LBPWS and LBPWS10: a host trusting the page (SBC-3: LBPU=1,
"the device server supports the UNMAP command"; LBPWS=1, it supports WRITE SAME(16) "to
unmap LBAs") issued discards that could only fail. Now those bits are clear and the Block
Limits page gives no UNMAP limits (0: UNMAP not implemented, what LBPU=0 goes with); the LU
stays thin provisioned: LBPME and LBPRZ in READ CAPACITY(16), LBPRZ and the thin
provisioning type in the VPD page.
"""

from __future__ import annotations

import struct

import pytest

from chunk.blockdev import MemoryBlockDevice

from .helpers import check, good, inquiry, make_lu, rc16, rw16, run, unmap_cdb, unmap_params

LBPU, LBPWS, LBPWS10, LBPRZ_B2 = 0x80, 0x40, 0x20, 0x04
LBPME, LBPRZ = 0x80, 0x40
THIN = 0x02                                          # PROVISIONING TYPE: thin provisioned


async def provisioning(lu) -> tuple[int, int, int, int, int]:
    """(B2 flags, provisioning type, RC16 byte 14, max unmap LBAs, max unmap descriptors)."""
    b2 = good(await run(lu, inquiry(1, 0xB2)))
    assert b2[1] == 0xB2 and struct.unpack_from(">H", b2, 2)[0] == 4
    b0 = good(await run(lu, inquiry(1, 0xB0)))
    max_lbas, max_descs = struct.unpack_from(">II", b0, 4 + 16)
    rc = good(await run(lu, rc16()))
    return b2[5], b2[6] & 0x07, rc[14], max_lbas, max_descs


async def test_a_read_only_thin_lu_advertises_no_unmap_but_stays_thin():
    flags, ptype, rc14, max_lbas, max_descs = await provisioning(
        make_lu(MemoryBlockDevice(1 << 20, readonly=True)))
    assert flags & (LBPU | LBPWS | LBPWS10) == 0, hex(flags)
    assert flags & LBPRZ_B2 and ptype == THIN
    assert rc14 & (LBPME | LBPRZ) == LBPME | LBPRZ
    assert (max_lbas, max_descs) == (0, 0)


async def test_a_writable_thin_lu_still_advertises_unmap():
    flags, ptype, rc14, max_lbas, max_descs = await provisioning(make_lu())
    assert flags == LBPU | LBPWS | LBPWS10 | LBPRZ_B2 and ptype == THIN
    assert rc14 & (LBPME | LBPRZ) == LBPME | LBPRZ
    assert max_lbas > 0 and max_descs > 0


@pytest.mark.parametrize("cdb, data", [
    (unmap_cdb(24), unmap_params((0, 1))),
    (rw16(0x93, 0, 1, 0x08), bytes(512)),            # WRITE SAME(16) with UNMAP
])
async def test_a_read_only_lu_still_answers_unmaps_as_write_protected(cdb, data):
    lu = make_lu(MemoryBlockDevice(1 << 20, readonly=True))
    check(await run(lu, cdb, data), 0x7, 0x27)       # DATA PROTECT, WRITE PROTECTED
