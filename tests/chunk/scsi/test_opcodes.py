"""REPORT SUPPORTED OPERATION CODES, task management functions, target port groups,
and data_out_length, the transport's R2T sizing."""

from __future__ import annotations

import struct

from chunk.scsi.opcodes import SUPPORTED

from .helpers import (H1, caw, check, good, make_lu, mode_select6, prout, read10, rsoc, run,
                      unmap_cdb, write10)


def descriptors(d: bytes, rctd: bool = False):
    n = struct.unpack_from(">I", d)[0]
    assert n == len(d) - 4
    size = 20 if rctd else 8
    out = []
    for pos in range(4, len(d), size):
        op, sa, flags, cdblen = struct.unpack_from(">BxHxBH", d, pos)
        out.append((op, sa, flags, cdblen))
    return out


async def test_all_commands():
    lu = make_lu()
    ds = descriptors(good(await run(lu, rsoc())))
    assert len(ds) == len(SUPPORTED)
    assert ds == sorted(ds)
    listed = {(op, sa if flags & 1 else None) for op, sa, flags, _ in ds}
    assert listed == set(SUPPORTED)
    assert (0x28, 0, 0, 10) in ds and (0x88, 0, 0, 16) in ds and (0x89, 0, 0, 16) in ds
    assert (0x9E, 0x10, 1, 16) in ds and (0xA3, 0x0C, 1, 12) in ds
    # every listed command is actually executed: none answers INVALID OPERATION CODE
    for op, sa, flags, cdblen in ds:
        cdb = bytearray(cdblen)
        cdb[0] = op
        if flags & 1:
            cdb[1] = sa
        r = await run(lu, bytes(cdb), b"")
        assert r.status != 0x02 or r.sense[12] != 0x20, hex(op)


async def test_a_thick_lu_does_not_report_unmap():
    """A thick LU (LBPU=0) answers UNMAP with INVALID OPERATION CODE, so REPORT SUPPORTED
    OPERATION CODES must not list it: initiators that ask before unmapping were told yes."""
    from chunk.blockdev import MemoryBlockDevice
    lu = make_lu(MemoryBlockDevice(1 << 20, thin=False))
    ds = descriptors(good(await run(lu, rsoc())))
    assert 0x42 not in {op for op, *_ in ds} and len(ds) == len(SUPPORTED) - 1
    assert good(await run(lu, rsoc(1, 0x42))) == bytes((0, 1, 0, 0))
    assert good(await run(make_lu(), rsoc(1, 0x42)))[1] == 0x03      # thin: supported


async def test_timeouts_descriptors():
    d = good(await run(make_lu(), rsoc(rctd=True)))
    ds = descriptors(d, rctd=True)
    assert all(flags & 0x02 for _, _, flags, _ in ds)
    assert struct.unpack_from(">HxBII", d, 12) == (0x0A, 0, 0, 30)


async def test_one_command():
    lu = make_lu()
    d = good(await run(lu, rsoc(1, 0x2A)))                  # WRITE(10)
    assert d[1] == 0x03 and struct.unpack_from(">H", d, 2)[0] == 10
    assert d[4:] == bytes((0x2A, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0xFF, 0xFF, 0x00))
    d = good(await run(lu, rsoc(2, 0x9E, 0x10)))            # READ CAPACITY(16)
    assert d[1] == 0x03 and d[4:6] == bytes((0x9E, 0x1F))
    assert good(await run(lu, rsoc(1, 0xC0))) == bytes((0, 1, 0, 0))   # not supported
    check(await run(lu, rsoc(1, 0x9E)), 0x5, 0x24)          # has service actions
    check(await run(lu, rsoc(2, 0x28)), 0x5, 0x24)          # has none
    check(await run(lu, rsoc(5)), 0x5, 0x24)
    d = good(await run(lu, rsoc(1, 0x28, rctd=True)))
    assert d[1] == 0x83 and len(d) == 4 + 10 + 12


async def test_task_management_functions_and_target_port_groups():
    lu = make_lu()
    assert good(await run(lu, struct.pack(">BBBxxxIBB", 0xA3, 0x0D, 0, 4, 0, 0))) == \
        bytes((0xDA, 0, 0, 0))
    d = good(await run(lu, struct.pack(">BBxxxxIBB", 0xA3, 0x0A, 1024, 0, 0)))
    assert struct.unpack_from(">I", d)[0] == len(d) - 4 == 12
    state, sup, tpg, _, status, _, count, _, rel = struct.unpack_from(">BBHBBBBHH", d, 4)
    assert (state, tpg, count, rel) == (0, 7, 1, H1.relative_port_id) and sup & 0x01
    lu.alua_state = 2                                       # standby
    d = good(await run(lu, struct.pack(">BBxxxxIBB", 0xA3, 0x2A, 1024, 0, 0)))
    assert d[4] == 0x10 and d[8] == 2                       # extended header; state follows
    check(await run(lu, struct.pack(">BBxxxxIBB", 0xA3, 0x05, 64, 0, 0)), 0x5, 0x24)


def test_data_out_length():
    lu = make_lu()                                          # 2048 blocks of 512 bytes
    assert lu.data_out_length(write10(0, 8)) == 4096
    assert lu.data_out_length(bytes((0x0A, 0, 0, 0, 0, 0))) == 256 * 512   # WRITE(6) 0 = 256
    assert lu.data_out_length(write10(2047, 2)) == 0        # fails before any data moves
    assert lu.data_out_length(read10(0, 8)) == 0
    assert lu.data_out_length(caw(0, 2)) == 2048
    assert lu.data_out_length(unmap_cdb(40)) == 40
    assert lu.data_out_length(mode_select6(24)) == 24
    assert lu.data_out_length(prout(0)) == 24
    assert lu.data_out_length(bytes((0xC5,)) + bytes(15)) == 0
    assert lu.data_out_length(b"\x2a\x00") == 0             # truncated CDB


async def test_truncated_cdb_is_invalid_field():
    check(await run(make_lu(), b"\x28\x00\x00"), 0x5, 0x24)
