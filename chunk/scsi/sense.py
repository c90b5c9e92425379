"""Status codes, fixed-format sense data and the error type every handler raises.

Handlers raise ``ScsiError``; ``LogicalUnit.execute`` turns it into a CHECK
CONDITION with fixed-format (0x70) sense.  Descriptor-format sense is never
produced: the control mode page reports D_SENSE=0 and does not let it change.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

# -- status (SAM-5) -----------------------------------------------------------
GOOD = 0x00
CHECK_CONDITION = 0x02
CONDITION_MET = 0x04
BUSY = 0x08
RESERVATION_CONFLICT = 0x18
TASK_SET_FULL = 0x28
TASK_ABORTED = 0x40

# -- sense keys (SPC-4 table 27) ----------------------------------------------
NO_SENSE = 0x0
RECOVERED_ERROR = 0x1
NOT_READY = 0x2
MEDIUM_ERROR = 0x3
HARDWARE_ERROR = 0x4
ILLEGAL_REQUEST = 0x5
UNIT_ATTENTION = 0x6
DATA_PROTECT = 0x7
ABORTED_COMMAND = 0xB
MISCOMPARE = 0xE

# -- (ASC, ASCQ) pairs used by this layer --------------------------------------
ASC_NO_ADDITIONAL = (0x00, 0x00)
ASC_WRITE_ERROR = (0x0C, 0x00)
ASC_UNRECOVERED_READ = (0x11, 0x00)
ASC_PARAM_LIST_LENGTH = (0x1A, 0x00)
ASC_MISCOMPARE_VERIFY = (0x1D, 0x00)
ASC_INVALID_OPCODE = (0x20, 0x00)
ASC_LBA_OUT_OF_RANGE = (0x21, 0x00)
ASC_INVALID_FIELD_IN_CDB = (0x24, 0x00)
ASC_LUN_NOT_SUPPORTED = (0x25, 0x00)
ASC_INVALID_FIELD_IN_PARAM = (0x26, 0x00)
ASC_INVALID_RELEASE_OF_PR = (0x26, 0x04)
ASC_WRITE_PROTECTED = (0x27, 0x00)
ASC_SPACE_ALLOC_FAILED_WP = (0x27, 0x07)
ASC_POWER_ON_RESET = (0x29, 0x00)
ASC_BUS_DEVICE_RESET = (0x29, 0x03)
ASC_I_T_NEXUS_LOSS = (0x29, 0x07)
ASC_MODE_PARAMS_CHANGED = (0x2A, 0x01)
ASC_RESERVATIONS_PREEMPTED = (0x2A, 0x03)
ASC_RESERVATIONS_RELEASED = (0x2A, 0x04)
ASC_REGISTRATIONS_PREEMPTED = (0x2A, 0x05)
ASC_CAPACITY_CHANGED = (0x2A, 0x09)
ASC_SAVING_PARAMS_UNSUPPORTED = (0x39, 0x00)
ASC_REPORTED_LUNS_CHANGED = (0x3F, 0x0E)
ASC_INVALID_FIELD_IN_IU = (0x0E, 0x03)
ASC_INSUFFICIENT_REG_RESOURCES = (0x55, 0x04)



class ScsiResult(NamedTuple):
    """Outcome of one command: status, data-in (already cut to the allocation
    length; the transport cuts it to the expected transfer length and reports
    residuals) and fixed-format sense for CHECK CONDITION.

    Immutable and cheap to build (one per command): a NamedTuple.
    """
    status: int
    data: bytes | memoryview | None = None
    sense: bytes | None = None


RESULT_GOOD = ScsiResult(GOOD)
RESULT_RESERVATION_CONFLICT = ScsiResult(RESERVATION_CONFLICT)


_FIXED = struct.Struct(">BBBIBIBBBBH")   # 18 bytes of fixed-format sense


def fixed_sense(key: int, asc: int, ascq: int, info: int | None = None,
                sks: int | None = None) -> bytes:
    """Fixed-format current sense (SPC-4 4.5.3).

    ``info`` fills the INFORMATION field (VALID set) when it fits in 32 bits;
    ``sks`` is the 3-byte sense-key-specific value including SKSV.
    """
    valid = info is not None and 0 <= info <= 0xFFFFFFFF
    sk = sks or 0
    return _FIXED.pack(0xF0 if valid else 0x70, 0, key & 0x0F, info if valid else 0,
                       10, 0, asc, ascq, 0, sk >> 16, sk & 0xFFFF)


def field_pointer(byte: int, bit: int | None = None, in_cdb: bool = True) -> int:
    """Sense-key-specific FIELD POINTER value (SPC-4 4.5.2.4.2)."""
    v = 0x800000 | (0x400000 if in_cdb else 0) | (byte & 0xFFFF)
    if bit is not None:
        v |= 0x080000 | ((bit & 7) << 16)
    return v


class ScsiError(Exception):
    """A command failed with CHECK CONDITION and the given sense."""

    __slots__ = ("key", "asc", "ascq", "info", "sks")

    def __init__(self, key: int, asc_ascq: tuple[int, int], info: int | None = None,
                 sks: int | None = None) -> None:
        super().__init__(f"sense {key:#x}/{asc_ascq[0]:02x}/{asc_ascq[1]:02x}")
        self.key = key
        self.asc, self.ascq = asc_ascq
        self.info = info
        self.sks = sks

    def sense(self) -> bytes:
        return fixed_sense(self.key, self.asc, self.ascq, self.info, self.sks)


class ReservationConflict(Exception):
    """The command conflicts with a reservation: status RESERVATION CONFLICT, no sense."""


# -- constructors for the common cases ------------------------------------------

def invalid_field_in_cdb(byte: int, bit: int | None = None) -> ScsiError:
    return ScsiError(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB, sks=field_pointer(byte, bit))


def invalid_field_in_param(byte: int, bit: int | None = None) -> ScsiError:
    return ScsiError(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_PARAM,
                     sks=field_pointer(byte, bit, in_cdb=False))


def invalid_opcode() -> ScsiError:
    return ScsiError(ILLEGAL_REQUEST, ASC_INVALID_OPCODE, sks=field_pointer(0))


def lba_out_of_range() -> ScsiError:
    return ScsiError(ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE)


def param_list_length_error() -> ScsiError:
    return ScsiError(ILLEGAL_REQUEST, ASC_PARAM_LIST_LENGTH)


def write_protected() -> ScsiError:
    return ScsiError(DATA_PROTECT, ASC_WRITE_PROTECTED)


def miscompare(offset: int) -> ScsiError:
    """MISCOMPARE; INFORMATION = byte offset of the first difference."""
    return ScsiError(MISCOMPARE, ASC_MISCOMPARE_VERIFY, info=offset)


def data_out_too_short() -> ScsiError:
    """The initiator sent less data than the CDB describes (EDTL < SPDTL).

    Nothing is written; the transport reports the residual overflow.  This is
    FCP-4's option (b), which libiscsi's residual tests accept.
    """
    return ScsiError(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_IU)
