"""Operation codes and the REPORT SUPPORTED OPERATION CODES table.

The table lists exactly the commands ``LogicalUnit`` executes, with the CDB
usage data (SPC-4 6.35.3: a 1 bit marks a CDB bit the device server looks
at), so initiators that probe with RSOC see the truth.
"""

from __future__ import annotations

TEST_UNIT_READY = 0x00
REQUEST_SENSE = 0x03
READ_6 = 0x08
WRITE_6 = 0x0A
INQUIRY = 0x12
MODE_SELECT_6 = 0x15
RESERVE_6 = 0x16
RELEASE_6 = 0x17
MODE_SENSE_6 = 0x1A
START_STOP_UNIT = 0x1B
PREVENT_ALLOW = 0x1E
READ_CAPACITY_10 = 0x25
READ_10 = 0x28
WRITE_10 = 0x2A
WRITE_VERIFY_10 = 0x2E
VERIFY_10 = 0x2F
PRE_FETCH_10 = 0x34
SYNCHRONIZE_CACHE_10 = 0x35
WRITE_SAME_10 = 0x41
UNMAP = 0x42
MODE_SELECT_10 = 0x55
RESERVE_10 = 0x56
RELEASE_10 = 0x57
MODE_SENSE_10 = 0x5A
PERSISTENT_RESERVE_IN = 0x5E
PERSISTENT_RESERVE_OUT = 0x5F
READ_16 = 0x88
COMPARE_AND_WRITE = 0x89
WRITE_16 = 0x8A
ORWRITE_16 = 0x8B
WRITE_VERIFY_16 = 0x8E
VERIFY_16 = 0x8F
PRE_FETCH_16 = 0x90
SYNCHRONIZE_CACHE_16 = 0x91
WRITE_SAME_16 = 0x93
SERVICE_ACTION_IN_16 = 0x9E
REPORT_LUNS = 0xA0
MAINTENANCE_IN = 0xA3
READ_12 = 0xA8
WRITE_12 = 0xAA
WRITE_VERIFY_12 = 0xAE
VERIFY_12 = 0xAF

# service actions
SAI_READ_CAPACITY_16 = 0x10
SAI_GET_LBA_STATUS = 0x12
MI_REPORT_TARGET_PORT_GROUPS = 0x0A
MI_REPORT_SUPPORTED_OPCODES = 0x0C
MI_REPORT_SUPPORTED_TMFS = 0x0D

_FF4 = [0xFF] * 4
_FF8 = [0xFF] * 8
_RW10 = [0xF8, *_FF4, 0x00, 0xFF, 0xFF, 0x00]
_RW12 = [0xF8, *_FF4, *_FF4, 0x00, 0x00]
_RW16 = [0xF8, *_FF8, *_FF4, 0x00, 0x00]
_VRF10 = [0xF6, *_FF4, 0x00, 0xFF, 0xFF, 0x00]
_VRF12 = [0xF6, *_FF4, *_FF4, 0x00, 0x00]
_VRF16 = [0xF6, *_FF8, *_FF4, 0x00, 0x00]
_IMM10 = [0x02, *_FF4, 0x00, 0xFF, 0xFF, 0x00]
_IMM16 = [0x02, *_FF8, *_FF4, 0x00, 0x00]
_SPC2_10 = [0x12, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0]

# (opcode, service action or None) -> CDB usage data without the opcode byte
SUPPORTED: dict[tuple[int, int | None], list[int]] = {
    (TEST_UNIT_READY, None): [0, 0, 0, 0, 0],
    (REQUEST_SENSE, None): [0x01, 0, 0, 0xFF, 0],
    (READ_6, None): [0x1F, 0xFF, 0xFF, 0xFF, 0],
    (WRITE_6, None): [0x1F, 0xFF, 0xFF, 0xFF, 0],
    (INQUIRY, None): [0x03, 0xFF, 0xFF, 0xFF, 0],
    (MODE_SELECT_6, None): [0x11, 0, 0, 0xFF, 0],
    # SCSI-2's 3RDPTY (obsolete since SPC-2) checked, to refuse a third-party RESERVE(6)
    # and to release nothing for a third-party RELEASE(6) (``check_spc2_cdb``)
    (RESERVE_6, None): [0x10, 0, 0, 0, 0],
    (RELEASE_6, None): [0x10, 0, 0, 0, 0],
    (MODE_SENSE_6, None): [0x08, 0xFF, 0xFF, 0xFF, 0],
    (START_STOP_UNIT, None): [0x01, 0, 0x0F, 0xF7, 0],
    (PREVENT_ALLOW, None): [0, 0, 0, 0x03, 0],
    (READ_CAPACITY_10, None): [0, *_FF4, 0, 0, 0x01, 0],
    (READ_10, None): _RW10,
    (WRITE_10, None): _RW10,
    (WRITE_VERIFY_10, None): _VRF10,
    (VERIFY_10, None): _VRF10,
    (PRE_FETCH_10, None): _IMM10,
    (SYNCHRONIZE_CACHE_10, None): _IMM10,
    (WRITE_SAME_10, None): _RW10,
    (UNMAP, None): [0x01, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0],
    (MODE_SELECT_10, None): [0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0],
    # SPC-2 7.21/7.23: 3RDPTY, and without it LONGID and PARAMETER LIST LENGTH, checked
    # (RESERVE refuses them; a third-party RELEASE releases nothing)
    (RESERVE_10, None): _SPC2_10,
    (RELEASE_10, None): _SPC2_10,
    (MODE_SENSE_10, None): [0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0],
    (PERSISTENT_RESERVE_IN, None): [0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0],
    (PERSISTENT_RESERVE_OUT, None): [0x1F, 0xFF, 0, 0, *_FF4, 0],
    (READ_16, None): _RW16,
    (COMPARE_AND_WRITE, None): [0xF8, *_FF8, 0, 0, 0, 0xFF, 0, 0],
    (WRITE_16, None): _RW16,
    (ORWRITE_16, None): _RW16,
    (WRITE_VERIFY_16, None): _VRF16,
    (VERIFY_16, None): _VRF16,
    (PRE_FETCH_16, None): _IMM16,
    (SYNCHRONIZE_CACHE_16, None): _IMM16,
    (WRITE_SAME_16, None): [0xF9, *_FF8, *_FF4, 0, 0],
    (SERVICE_ACTION_IN_16, SAI_READ_CAPACITY_16): [0x1F, *([0] * 8), *_FF4, 0, 0],
    (SERVICE_ACTION_IN_16, SAI_GET_LBA_STATUS): [0x1F, *_FF8, *_FF4, 0, 0],
    (REPORT_LUNS, None): [0, 0xFF, 0, 0, 0, *_FF4, 0, 0],
    (MAINTENANCE_IN, MI_REPORT_TARGET_PORT_GROUPS): [0xFF, 0, 0, 0, 0, *_FF4, 0, 0],
    (MAINTENANCE_IN, MI_REPORT_SUPPORTED_OPCODES): [0x1F, 0x87, 0xFF, 0xFF, 0xFF, *_FF4, 0, 0],
    (MAINTENANCE_IN, MI_REPORT_SUPPORTED_TMFS): [0x1F, 0x80, 0, 0, 0, *_FF4, 0, 0],
    (READ_12, None): _RW12,
    (WRITE_12, None): _RW12,
    (WRITE_VERIFY_12, None): _VRF12,
    (VERIFY_12, None): _VRF12,
}

#: opcodes whose commands are told apart by a service action in byte 1
WITH_SERVICE_ACTION = frozenset(op for op, sa in SUPPORTED if sa is not None)
