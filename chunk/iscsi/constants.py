"""Numbers from RFC 7143 (iSCSI) and SAM-5 status codes; sense keys and ASC/ASCQ live with
the SCSI layer in chunk/scsi/sense.py, the one place that builds sense data.

IntEnums so that logs and test failures print names, while the values stay
plain ints on the hot path (``Opcode.SCSI_COMMAND == 0x01``).
"""

from __future__ import annotations

from enum import IntEnum

BHS_LEN = 48
DIGEST_LEN = 4
RESERVED_TAG = 0xFFFFFFFF          # ITT/TTT "no tag" value
MAX_DATA_SEGMENT = (1 << 24) - 1   # DataSegmentLength is a 24-bit field
ISCSI_VERSION = 0x00               # the only version ever defined


class Opcode(IntEnum):
    """RFC 7143 §11.2.1.2. Initiator opcodes are 0x00-0x1f, target 0x20-0x3f."""
    NOP_OUT = 0x00
    SCSI_COMMAND = 0x01
    TASK_MGMT_REQUEST = 0x02
    LOGIN_REQUEST = 0x03
    TEXT_REQUEST = 0x04
    DATA_OUT = 0x05
    LOGOUT_REQUEST = 0x06
    SNACK_REQUEST = 0x10
    NOP_IN = 0x20
    SCSI_RESPONSE = 0x21
    TASK_MGMT_RESPONSE = 0x22
    LOGIN_RESPONSE = 0x23
    TEXT_RESPONSE = 0x24
    DATA_IN = 0x25
    LOGOUT_RESPONSE = 0x26
    R2T = 0x31
    ASYNC_MESSAGE = 0x32
    REJECT = 0x3F


INITIATOR_OPCODES = frozenset(o for o in Opcode if o < 0x20)
TARGET_OPCODES = frozenset(o for o in Opcode if o >= 0x20)


class Stage(IntEnum):
    """Login stages carried in CSG/NSG (RFC 7143 §11.12.3)."""
    SECURITY = 0
    OPERATIONAL = 1
    FULL_FEATURE = 3


class LoginStatus(IntEnum):
    """Status-Class << 8 | Status-Detail (RFC 7143 §11.13.5)."""
    SUCCESS = 0x0000
    TARGET_MOVED_TEMPORARILY = 0x0101
    TARGET_MOVED_PERMANENTLY = 0x0102
    INITIATOR_ERROR = 0x0200
    AUTHENTICATION_FAILURE = 0x0201
    AUTHORIZATION_FAILURE = 0x0202
    NOT_FOUND = 0x0203
    TARGET_REMOVED = 0x0204
    UNSUPPORTED_VERSION = 0x0205
    TOO_MANY_CONNECTIONS = 0x0206
    MISSING_PARAMETER = 0x0207
    CANT_INCLUDE_IN_SESSION = 0x0208
    SESSION_TYPE_NOT_SUPPORTED = 0x0209
    SESSION_DOES_NOT_EXIST = 0x020A
    INVALID_DURING_LOGIN = 0x020B
    TARGET_ERROR = 0x0300
    SERVICE_UNAVAILABLE = 0x0301
    OUT_OF_RESOURCES = 0x0302

    @property
    def status_class(self) -> int:
        return self >> 8

    @property
    def status_detail(self) -> int:
        return self & 0xFF


class RejectReason(IntEnum):
    """Reject PDU reason codes (RFC 7143 §11.17.1)."""
    DATA_DIGEST_ERROR = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_COMMAND_REJECT = 0x06
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    LONG_OPERATION_REJECT = 0x0A
    DEPRECATED = 0x0B              # "negotiation reset" in RFC 3720
    WAITING_FOR_LOGOUT = 0x0C


class TaskAttribute(IntEnum):
    """ATTR field of the SCSI Command PDU (RFC 7143 §11.3.1)."""
    UNTAGGED = 0
    SIMPLE = 1
    ORDERED = 2
    HEAD_OF_QUEUE = 3
    ACA = 4


class TmfFunction(IntEnum):
    """Task Management Function Request codes (RFC 7143 §11.5.1)."""
    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LOGICAL_UNIT_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8


class TmfResponse(IntEnum):
    """Task Management Function Response codes (RFC 7143 §11.6.1)."""
    FUNCTION_COMPLETE = 0
    TASK_DOES_NOT_EXIST = 1
    LUN_DOES_NOT_EXIST = 2
    TASK_STILL_ALLEGIANT = 3
    REASSIGNMENT_NOT_SUPPORTED = 4
    NOT_SUPPORTED = 5
    AUTHORIZATION_FAILED = 6
    FUNCTION_REJECTED = 255


class LogoutReason(IntEnum):
    CLOSE_SESSION = 0
    CLOSE_CONNECTION = 1
    REMOVE_CONNECTION_FOR_RECOVERY = 2


class LogoutResponseCode(IntEnum):
    SUCCESS = 0
    CID_NOT_FOUND = 1
    RECOVERY_NOT_SUPPORTED = 2
    CLEANUP_FAILED = 3


class AsyncEvent(IntEnum):
    """Asynchronous Message AsyncEvent codes (RFC 7143 §11.9.1)."""
    SCSI_EVENT = 0
    LOGOUT_REQUESTED = 1
    CONNECTION_DROP = 2
    SESSION_DROP = 3
    NEGOTIATION_REQUESTED = 4
    TASK_TERMINATION = 5
    VENDOR = 255


class SnackType(IntEnum):
    DATA_R2T = 0
    STATUS = 1
    DATA_ACK = 2
    R_DATA = 3


class ScsiResponseCode(IntEnum):
    """SCSI Response PDU "Response" byte (RFC 7143 §11.4.3)."""
    COMPLETED = 0x00
    TARGET_FAILURE = 0x01


class ScsiStatus(IntEnum):
    """SAM-5 status codes."""
    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    ACA_ACTIVE = 0x30
    TASK_ABORTED = 0x40


class ChapAlgorithm(IntEnum):
    """CHAP_A values: the IANA PPP "Authentication Algorithms" registry.

    RFC 7143 names only MD5 (5); the Linux target and open-iscsi also use
    SHA-1 (6), SHA-256 (7) and SHA3-256 (8) from that registry.
    """
    MD5 = 5
    SHA1 = 6
    SHA256 = 7
    SHA3_256 = 8
