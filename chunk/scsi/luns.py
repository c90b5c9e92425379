"""Answers that belong to the target rather than to one LU: REPORT LUNS and
commands addressed to a LUN that does not exist or is masked."""

from __future__ import annotations

import struct

from .cdb import U32
from .inquiry import not_present
from .opcodes import INQUIRY, REQUEST_SENSE
from .sense import (ASC_LUN_NOT_SUPPORTED, CHECK_CONDITION, GOOD, ILLEGAL_REQUEST, ScsiError,
                    ScsiResult, fixed_sense, invalid_field_in_cdb)


def encode_lun(lun: int) -> bytes:
    """8-byte LUN (SAM-5 4.6): peripheral addressing below 256, flat space up to 16383."""
    if 0 <= lun < 256:
        return bytes((0, lun, 0, 0, 0, 0, 0, 0))
    if lun < 0x4000:
        return bytes((0x40 | (lun >> 8), lun & 0xFF, 0, 0, 0, 0, 0, 0))
    raise ValueError(f"LUN {lun} cannot be encoded with single-level addressing")


def report_luns(luns: list[int], select_report: int = 0) -> bytes:
    """REPORT LUNS parameter data (SPC-4 6.33), uncut.

    SELECT REPORT 00h/02h list the LUs; 01h asks for well-known LUs, of which
    there are none.  Other values raise INVALID FIELD IN CDB.
    """
    if select_report not in (0x00, 0x01, 0x02):
        raise invalid_field_in_cdb(2)
    body = b"" if select_report == 0x01 else b"".join(encode_lun(n) for n in sorted(luns))
    return struct.pack(">I4x", len(body)) + body


def report_luns_command(cdb: bytes, luns: list[int]) -> ScsiResult:
    """Execute a REPORT LUNS CDB for the LUNs this I_T nexus may see."""
    try:
        alloc = U32(cdb, 6)[0]
        if alloc < 16:              # SPC-3/4: the allocation length shall be at least 16
            raise invalid_field_in_cdb(6)
        return ScsiResult(GOOD, report_luns(luns, cdb[2])[:alloc])
    except ScsiError as e:
        return ScsiResult(CHECK_CONDITION, None, e.sense())


def lun_not_supported(cdb: bytes) -> ScsiResult:
    """Response for a LUN with no LU behind it (absent, or masked by the ACL).

    INQUIRY answers peripheral qualifier 011b / type 1Fh (SPC-4 6.6.2) so hosts
    scanning the target do not treat the hole as an error; REQUEST SENSE
    returns LOGICAL UNIT NOT SUPPORTED as data; anything else fails with it.
    REPORT LUNS must not come here: the caller answers it with ``report_luns``.
    """
    op = cdb[0]
    if op == INQUIRY and not cdb[1] & 0x01:
        alloc = (cdb[3] << 8) | cdb[4]
        return ScsiResult(GOOD, not_present()[:alloc])
    sense = fixed_sense(ILLEGAL_REQUEST, *ASC_LUN_NOT_SUPPORTED)
    if op == REQUEST_SENSE:
        return ScsiResult(GOOD, sense[:cdb[4]])
    return ScsiResult(CHECK_CONDITION, None, sense)
