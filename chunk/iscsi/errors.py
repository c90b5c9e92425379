"""Typed iSCSI errors that carry what the connection must do about them.

A malformed PDU is the initiator's fault, never a reason to crash the target:
each error says whether the byte stream is still framed (``fatal=False``: the
target can answer with a Reject PDU quoting ``header``) or must be dropped.
Login-time errors carry the Login Response status to send instead.
"""

from __future__ import annotations

from .constants import LoginStatus, RejectReason


class IscsiError(Exception):
    """Base of every error raised by chunk.iscsi."""


class ProtocolError(IscsiError):
    """A PDU broke RFC 7143. ``header`` is the offending BHS, if read."""

    reason: RejectReason = RejectReason.PROTOCOL_ERROR
    fatal: bool = True

    def __init__(self, message: str, *, header: bytes | None = None,
                 reason: RejectReason | None = None, fatal: bool | None = None):
        super().__init__(message)
        self.header = header
        if reason is not None:
            self.reason = reason
        if fatal is not None:
            self.fatal = fatal


class TruncatedPDU(ProtocolError):
    """The peer closed the connection in the middle of a PDU."""


class UnknownOpcode(ProtocolError):
    """Opcode is not one this side accepts; the rest of the PDU was consumed."""
    reason, fatal = RejectReason.COMMAND_NOT_SUPPORTED, False


class SegmentTooLong(ProtocolError):
    """DataSegmentLength exceeds what we declared; we will not buffer it."""


class HeaderDigestError(ProtocolError):
    """The header cannot be trusted, so neither can the framing."""


class DataDigestError(ProtocolError):
    """Header was good, payload corrupt: the PDU is consumed (framing kept) and rejected,
    then the connection is dropped.

    At ErrorRecoveryLevel 0, the only level we negotiate, nothing can recover the PDU
    (recovery R2T, SNACK and command retry need ERL 1): a lost Data-Out left its command
    waiting forever and a lost command left a hole in the CmdSN window; the initiator
    recovers the session by logging in again and reissuing (RFC 7143 §7.1.5, §7.8; LIO
    closes the connection too). Reject first, so the initiator sees why."""
    reason, fatal = RejectReason.DATA_DIGEST_ERROR, True


class MalformedPDU(ProtocolError):
    """Framing is fine but a field is invalid (e.g. a bad AHS)."""
    reason, fatal = RejectReason.INVALID_PDU_FIELD, False


class TextError(ProtocolError):
    """Bad key=value text (syntax, encoding, limits). Fails the negotiation."""
    reason, fatal = RejectReason.PROTOCOL_ERROR, False


class LoginError(IscsiError):
    """Login must end with a Login Response carrying ``status``."""

    status: LoginStatus = LoginStatus.INITIATOR_ERROR

    def __init__(self, message: str, status: LoginStatus | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class NegotiationError(LoginError):
    """A text negotiation broke the rules (key repeated, wrong sender, ...)."""


class AuthenticationError(LoginError):
    """CHAP failed. The message never contains secrets or responses."""
    status = LoginStatus.AUTHENTICATION_FAILURE
