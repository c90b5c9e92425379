"""CDB field decoding shared by the handlers.

Everything here is called on the I/O hot path, so it is plain
``struct.unpack_from`` on precompiled structs, no objects per command.
"""

from __future__ import annotations

import struct

from .sense import invalid_field_in_cdb

U16 = struct.Struct(">H").unpack_from
U32 = struct.Struct(">I").unpack_from
U64 = struct.Struct(">Q").unpack_from
_LBA32_LEN16 = struct.Struct(">IxH").unpack_from      # (10)-byte CDBs from byte 2
_LBA32_LEN32 = struct.Struct(">II").unpack_from       # (12)-byte CDBs from byte 2
_LBA64_LEN32 = struct.Struct(">QI").unpack_from       # (16)-byte CDBs from byte 2

_GROUP_LENGTH = (6, 10, 10, 0, 16, 12, 0, 0)


def cdb_length(opcode: int) -> int:
    """CDB length from the group code (SPC-4 4.2.5.1); 0 for reserved/vendor groups."""
    return _GROUP_LENGTH[opcode >> 5]


def need(cdb: bytes, n: int) -> None:
    """Transports pad CDBs (iSCSI carries 16 bytes); a shorter one is malformed."""
    if len(cdb) < n:
        raise invalid_field_in_cdb(0)


def lba_len(cdb: bytes) -> tuple[int, int]:
    """(LBA, NUMBER OF BLOCKS) for the 6/10/12/16-byte READ/WRITE layout family.

    READ(6)/WRITE(6): a length of 0 means 256 blocks (SBC-3 5.13, 5.36).
    """
    size = _GROUP_LENGTH[cdb[0] >> 5]
    if len(cdb) < size:
        raise invalid_field_in_cdb(0)
    if size == 10:
        return _LBA32_LEN16(cdb, 2)
    if size == 16:
        return _LBA64_LEN32(cdb, 2)
    if size == 12:
        return _LBA32_LEN32(cdb, 2)
    if size == 6:
        return ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3], cdb[4] or 256
    raise invalid_field_in_cdb(0)


def alloc_len(cdb: bytes) -> int:
    """ALLOCATION LENGTH for the commands in this layer that have one."""
    op = cdb[0]
    if op in (0x12, 0x1A, 0x03):                      # INQUIRY, MODE SENSE(6), REQUEST SENSE
        return U16(cdb, 3)[0] if op == 0x12 else cdb[4]
    if op in (0x5A, 0x5E):                            # MODE SENSE(10), PR IN
        return U16(cdb, 7)[0]
    if op in (0xA0, 0xA3):                            # REPORT LUNS, MAINTENANCE IN
        return U32(cdb, 6)[0]
    if op == 0x9E:                                    # SERVICE ACTION IN(16)
        return U32(cdb, 10)[0]
    raise AssertionError(f"no allocation length for opcode {op:#x}")
