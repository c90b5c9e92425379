"""INQUIRY standard data and VPD pages, byte by byte; answers for absent LUNs; REPORT LUNS."""

from __future__ import annotations

import struct

import pytest

from chunk.blockdev import MemoryBlockDevice
from chunk.scsi import LogicalUnit, LunIdentity, lun_not_supported, report_luns
from chunk.scsi.luns import encode_lun, report_luns_command

from .helpers import H1, IDENT, WWN, check, good, inquiry, make_lu, run


async def test_standard_inquiry_bytes():
    lu = make_lu()
    d = good(await run(lu, inquiry(alloc=255)))
    assert len(d) == 96 and d[4] == 91                     # additional length = n - 5
    assert d[0] == 0x00                                    # PQ 0, direct access block device
    assert d[1] == 0x00                                    # not removable
    assert d[2] == 0x06                                    # SPC-4
    assert d[3] == 0x12                                    # HISUP, response data format 2
    assert d[5] == 0x10                                    # TPGS = implicit ALUA
    assert d[7] == 0x02                                    # CMDQUE
    assert d[8:16] == b"ZSTORE  "
    assert d[16:32] == b"zstore volume   "
    assert d[32:36] == b"0001"
    descriptors = struct.unpack_from(">8H", d, 58)
    assert descriptors[:3] == (0x00A0, 0x0460, 0x04C0)     # SAM-5, SPC-4, SBC-3


@pytest.mark.parametrize("alloc", [0, 5, 36, 95])
async def test_inquiry_is_cut_to_the_allocation_length(alloc):
    d = good(await run(make_lu(), inquiry(alloc=alloc)))
    full = good(await run(make_lu(), inquiry(alloc=255)))
    assert d == full[:alloc]


async def test_page_code_without_evpd_is_invalid():
    s = check(await run(make_lu(), inquiry(evpd=0, page=0x83)), 0x5, 0x24)
    assert s.sks == 0xC00002                               # SKSV, C/D=CDB, byte 2


async def test_unknown_vpd_page_is_invalid():
    check(await run(make_lu(), inquiry(evpd=1, page=0x87)), 0x5, 0x24)


async def test_supported_vpd_pages():
    d = good(await run(make_lu(), inquiry(1, 0x00)))
    assert d[:4] == bytes((0, 0, 0, 6))
    assert list(d[4:]) == [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]
    lu = make_lu()
    for page in d[4:]:                                     # every listed page is readable
        p = good(await run(lu, inquiry(1, page)))
        assert p[1] == page and struct.unpack_from(">H", p, 2)[0] == len(p) - 4


async def test_unit_serial_number():
    assert good(await run(make_lu(), inquiry(1, 0x80))) == b"\x00\x80\x00\x08vol-0001"


def designators(page: bytes) -> list[tuple[int, int, int, int, bytes]]:
    """(protocol, code set, piv|assoc, type, data) of each VPD 0x83 designator."""
    out, pos = [], 4
    while pos < len(page):
        b0, b1, _, n = page[pos:pos + 4]
        out.append((b0 >> 4, b0 & 0xF, b1 >> 4, b1 & 0xF, page[pos + 4:pos + 4 + n]))
        pos += 4 + n
    assert pos == len(page)
    return out


async def test_device_identification():
    d = good(await run(make_lu(), inquiry(1, 0x83)))
    ds = designators(d)
    naa = ds[0]
    assert naa[1:4] == (1, 0x0, 3) and naa[4] == bytes.fromhex(WWN)       # binary, LU, NAA
    t10 = ds[1]
    assert t10[1:4] == (2, 0x0, 1) and t10[4] == b"ZSTORE  vol-0001"
    rel = ds[2]
    assert rel[:4] == (5, 1, 0x9, 4) and rel[4] == b"\x00\x00\x00\x01"    # iSCSI, PIV, port
    tpg = ds[3]
    assert tpg[:4] == (5, 1, 0x9, 5) and tpg[4] == b"\x00\x00\x00\x07"
    port_name = ds[4]
    assert port_name[:4] == (5, 3, 0x9, 8)
    assert port_name[4].rstrip(b"\0") == H1.target_port.encode() and len(port_name[4]) % 4 == 0
    target_name = ds[5]
    assert target_name[:4] == (5, 3, 0xA, 8)
    assert target_name[4].rstrip(b"\0") == b"iqn.2026-01.io.zstore:c.t0000"


async def test_block_limits_page():
    lu = make_lu(max_transfer_bytes=1 << 20, max_unmap_descriptors=128)
    d = good(await run(lu, inquiry(1, 0xB0)))
    assert len(d) == 64 and d[3] == 0x3C
    wsnz, max_caw, opt_gran, max_xfer, opt_xfer, max_prefetch = struct.unpack_from(">BBHIII", d, 4)
    assert wsnz == 1 and max_caw == 64
    assert opt_gran == 8                                   # 4 KiB in 512-byte blocks
    assert max_xfer == 2048 and opt_xfer == 2048 and max_prefetch == 2048
    max_unmap, max_desc, unmap_gran, uga = struct.unpack_from(">IIII", d, 20)
    assert max_unmap == 1 << 20 and max_desc == 128 and unmap_gran == 8
    assert uga == 0x80000000                               # UGAVALID, alignment 0
    assert struct.unpack_from(">Q", d, 36)[0] == 0xFFFF    # MAXIMUM WRITE SAME LENGTH


async def test_thick_lu_reports_no_unmap():
    lu = make_lu(MemoryBlockDevice(1 << 20, thin=False))
    bl = good(await run(lu, inquiry(1, 0xB0)))
    assert struct.unpack_from(">II", bl, 20) == (0, 0)
    assert good(await run(lu, inquiry(1, 0xB2))) == bytes((0, 0xB2, 0, 4, 0, 0, 0, 0))


async def test_block_device_characteristics_and_provisioning():
    lu = make_lu()
    b1 = good(await run(lu, inquiry(1, 0xB1)))
    assert len(b1) == 64 and struct.unpack_from(">H", b1, 4)[0] == 1      # non-rotating
    b2 = good(await run(lu, inquiry(1, 0xB2)))
    assert b2 == bytes((0, 0xB2, 0, 4, 0, 0xE4, 0x02, 0))  # LBPU LBPWS LBPWS10 LBPRZ, thin


def test_bad_wwn_is_refused_at_construction():
    with pytest.raises(ValueError):
        LogicalUnit(MemoryBlockDevice(4096), LunIdentity(wwn="1234", serial="x"))
    with pytest.raises(ValueError):
        LogicalUnit(MemoryBlockDevice(4096), LunIdentity(wwn="5" * 32, serial="x"))


def test_absent_lun_inquiry_has_qualifier_011b():
    r = lun_not_supported(inquiry(alloc=36))
    assert r.status == 0 and len(r.data) == 36
    assert r.data[0] == 0x7F and r.data[2] == 0x06 and r.data[4] == 31


def test_absent_lun_other_commands():
    r = lun_not_supported(bytes(6))                        # TEST UNIT READY
    assert r.status == 0x02 and r.sense[2] == 0x05 and r.sense[12:14] == b"\x25\x00"
    r = lun_not_supported(bytes((0x03, 0, 0, 0, 18, 0)))   # REQUEST SENSE answers with data
    assert r.status == 0 and r.data[2] == 0x05 and r.data[12] == 0x25
    r = lun_not_supported(inquiry(evpd=1, page=0x83))
    assert r.status == 0x02


def test_report_luns_encoding():
    assert encode_lun(0) == bytes(8)
    assert encode_lun(255) == bytes((0, 255, 0, 0, 0, 0, 0, 0))
    assert encode_lun(256) == bytes((0x41, 0x00, 0, 0, 0, 0, 0, 0))     # flat space
    assert encode_lun(0x3FFF) == bytes((0x7F, 0xFF, 0, 0, 0, 0, 0, 0))
    d = report_luns([3, 1, 300])
    assert struct.unpack_from(">I", d)[0] == 24 and d[4:8] == bytes(4)
    assert d[8:] == encode_lun(1) + encode_lun(3) + encode_lun(300)
    assert report_luns([1, 2], select_report=1) == struct.pack(">I4x", 0)


def test_report_luns_command_checks_allocation_and_select_report():
    cdb = struct.pack(">BxB3xIBB", 0xA0, 0, 16, 0, 0)
    r = report_luns_command(cdb, [1, 2])
    assert r.status == 0 and len(r.data) == 16 and r.data[3] == 16       # cut, length says all
    r = report_luns_command(struct.pack(">BxB3xIBB", 0xA0, 0, 15, 0, 0), [1])
    assert r.status == 0x02 and r.sense[12] == 0x24
    r = report_luns_command(struct.pack(">BxB3xIBB", 0xA0, 0x07, 64, 0, 0), [1])
    assert r.status == 0x02 and r.sense[12] == 0x24


async def test_lu_answers_report_luns_itself_with_its_own_lun():
    d = good(await run(make_lu(), struct.pack(">BxB3xIBB", 0xA0, 0, 64, 0, 0)))
    assert d == struct.pack(">I4x", 8) + encode_lun(IDENT.lun)
