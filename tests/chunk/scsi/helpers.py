"""CDB builders and result checks shared by the SCSI layer tests."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from chunk.blockdev import MemoryBlockDevice
from chunk.scsi import LogicalUnit, LunIdentity, Nexus, ScsiResult

WWN = "6" + "5a5354" + "0123456789abcdef012345678"        # 32 hex digits, NAA 6
IDENT = LunIdentity(wwn=WWN, serial="vol-0001", lun=3, target_port_group=7)
H1 = Nexus("iqn.2004-10.com.example:h1,i,0x23d000000001", "iqn.2026-01.io.zstore:c.t0000,t,0x0001", 1)
H2 = Nexus("iqn.2004-10.com.example:h2,i,0x23d000000002", "iqn.2026-01.io.zstore:c.t0000,t,0x0001", 1)


def make_lu(dev=None, *, size: int = 1 << 20, ua: bool = False, **kw) -> LogicalUnit:
    """An LU over a fresh memory device; power-on UAs off unless asked for."""
    return LogicalUnit(dev or MemoryBlockDevice(size), IDENT, power_on_ua=ua, **kw)


async def run(lu: LogicalUnit, cdb: bytes, data: bytes | None = None, nexus: Nexus = H1,
              expected: int | None = None) -> ScsiResult:
    """Send the CDB as a transport would: data-out = what the initiator sent."""
    exp = expected if expected is not None else (len(data) if data is not None else 4096)
    return await lu.execute(cdb, memoryview(data) if data is not None else None, exp, nexus)


@dataclass
class Sense:
    valid: bool
    key: int
    asc: int
    ascq: int
    info: int
    sks: int


def sense_of(r: ScsiResult) -> Sense:
    assert r.status == 0x02, f"expected CHECK CONDITION, got {r.status:#x}"
    s = r.sense
    assert s is not None and len(s) == 18 and s[0] & 0x7F == 0x70 and s[7] == 10
    return Sense(bool(s[0] & 0x80), s[2] & 0x0F, s[12], s[13], struct.unpack_from(">I", s, 3)[0],
                 int.from_bytes(s[15:18], "big"))


def check(r: ScsiResult, key: int, asc: int, ascq: int = 0) -> Sense:
    s = sense_of(r)
    assert (s.key, s.asc, s.ascq) == (key, asc, ascq), (hex(s.key), hex(s.asc), hex(s.ascq))
    return s


def good(r: ScsiResult) -> bytes:
    assert r.status == 0x00, (r.status, r.sense)
    return bytes(r.data) if r.data is not None else b""


# -- CDB builders ---------------------------------------------------------------

def inquiry(evpd: int = 0, page: int = 0, alloc: int = 255) -> bytes:
    return struct.pack(">BBBHB", 0x12, evpd, page, alloc, 0)


def rw6(opcode: int, lba: int, n: int) -> bytes:
    return struct.pack(">BBHBB", opcode, lba >> 16, lba & 0xFFFF, n, 0)


def rw10(opcode: int, lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", opcode, flags, lba, 0, n, 0)


def rw12(opcode: int, lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIIBB", opcode, flags, lba, n, 0, 0)


def rw16(opcode: int, lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", opcode, flags, lba, n, 0, 0)


def read10(lba: int, n: int, flags: int = 0) -> bytes:
    return rw10(0x28, lba, n, flags)


def write10(lba: int, n: int, flags: int = 0) -> bytes:
    return rw10(0x2A, lba, n, flags)


def caw(lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQ3xBBB", 0x89, flags, lba, n, 0, 0)


def unmap_cdb(plen: int) -> bytes:
    return struct.pack(">BB5xHB", 0x42, 0, plen, 0)


def unmap_params(*ranges: tuple[int, int]) -> bytes:
    descs = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    return struct.pack(">HH4x", 6 + len(descs), len(descs)) + descs


def mode_sense6(page: int, pc: int = 0, dbd: bool = False, alloc: int = 255, sub: int = 0) -> bytes:
    return bytes((0x1A, 0x08 if dbd else 0, (pc << 6) | page, sub, alloc, 0))


def mode_sense10(page: int, pc: int = 0, dbd: bool = False, llbaa: bool = False,
                 alloc: int = 1024) -> bytes:
    return struct.pack(">BBBB3xHB", 0x5A, (0x08 if dbd else 0) | (0x10 if llbaa else 0),
                       (pc << 6) | page, 0, alloc, 0)


def mode_select6(plen: int, pf: bool = True, sp: bool = False) -> bytes:
    return bytes((0x15, (0x10 if pf else 0) | (0x01 if sp else 0), 0, 0, plen, 0))


def mode_select10(plen: int) -> bytes:
    return struct.pack(">BB5xHB", 0x55, 0x10, plen, 0)


def prin(sa: int, alloc: int = 8192) -> bytes:
    return struct.pack(">BB5xHB", 0x5E, sa, alloc, 0)


def prout(sa: int, rtype: int = 0, scope: int = 0, plen: int = 24) -> bytes:
    return struct.pack(">BBB2xIB", 0x5F, sa, (scope << 4) | rtype, plen, 0)


def prout_params(key: int = 0, sark: int = 0, flags: int = 0) -> bytes:
    return struct.pack(">QQ4xBx2x", key, sark, flags)


def rsoc(option: int = 0, opcode: int = 0, sa: int = 0, rctd: bool = False,
         alloc: int = 65535) -> bytes:
    return struct.pack(">BBBBHIBB", 0xA3, 0x0C, (0x80 if rctd else 0) | option, opcode, sa,
                       alloc, 0, 0)


TUR = bytes(6)


def request_sense(alloc: int = 252) -> bytes:
    return bytes((0x03, 0, 0, 0, alloc, 0))


def rc10() -> bytes:
    return bytes((0x25,)) + bytes(9)


def rc16(alloc: int = 32) -> bytes:
    return struct.pack(">BBQIBB", 0x9E, 0x10, 0, alloc, 0, 0)


def get_lba_status(lba: int, alloc: int = 24) -> bytes:
    return struct.pack(">BBQIBB", 0x9E, 0x12, lba, alloc, 0, 0)
