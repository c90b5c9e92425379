"""iSCSI PDUs (RFC 7143 §11): 48-byte BHS, AHS, padded data segment, digests.

One slotted dataclass per opcode. Each class owns a precompiled
``struct.Struct`` covering all 48 BHS bytes, so decoding is a single
``unpack_from`` plus a constructor call, and encoding a single ``pack``.
``encode()`` returns a list of buffers for ``writer.writelines()`` so large
Data-In payloads are never copied just to prepend a header.

LUN fields are kept as the raw 64-bit SAM value; see ``encode_lun``.
``data`` is always ``bytes`` without the padding. ``read_pdu`` turns every
malformed input into a ``ProtocolError`` subclass (see errors.py).
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field
from typing import ClassVar

from crc32c import crc32c

from .constants import (BHS_LEN, INITIATOR_OPCODES, MAX_DATA_SEGMENT, RESERVED_TAG,
                        Opcode)
from .errors import (DataDigestError, HeaderDigestError, MalformedPDU, ProtocolError,
                     SegmentTooLong, TruncatedPDU, UnknownOpcode)

_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")   # _PAD[n & 3] pads n bytes to a multiple of 4
_LE32 = struct.Struct("<I")
_BE32 = struct.Struct(">I")

AHS_EXTENDED_CDB = 1
AHS_BIDI_READ_LENGTH = 2


def digest(*parts: bytes) -> bytes:
    """CRC32C over ``parts`` as the 4 bytes iSCSI puts on the wire (little-endian).

    RFC 3720 B.4: 32 zero bytes give wire bytes aa 36 91 8a (value 0x8a9136aa).
    """
    crc = 0
    for p in parts:
        crc = crc32c(p, crc)
    return _LE32.pack(crc)


def encode_lun(lun: int) -> int:
    """LUN number -> 64-bit SAM LUN field: peripheral addressing below 256, flat above."""
    if 0 <= lun < 256:
        return lun << 48
    if lun < 16384:
        return (0x4000 | lun) << 48
    raise ValueError(f"LUN {lun} out of range 0..16383")


def decode_lun(raw: int) -> int:
    """64-bit SAM LUN field -> LUN number (single-level peripheral or flat space)."""
    if raw >> 63:
        raise ValueError(f"unsupported LUN addressing method in {raw:#018x}")
    return (raw >> 48) & 0x3FFF


@dataclass(slots=True, kw_only=True)
class PDU:
    """Fields common to every PDU: ITT (bytes 16-19), raw AHS and data segment."""

    opcode: ClassVar[int]
    _S: ClassVar[struct.Struct]
    itt: int = RESERVED_TAG
    data: bytes = field(default=b"", repr=False)   # may be 16 MiB: keep it out of logs
    ahs: bytes = b""

    def _ahs(self) -> bytes:
        return self.ahs

    def _pack(self, word: int) -> bytes:      # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def header(self) -> bytes:
        """BHS followed by the AHS: the bytes the header digest covers."""
        ahs = self._ahs()
        n = len(self.data)
        if n > MAX_DATA_SEGMENT:
            raise ValueError(f"data segment of {n} bytes exceeds {MAX_DATA_SEGMENT}")
        if len(ahs) & 3 or len(ahs) > 1020:
            raise ValueError(f"AHS length {len(ahs)} is not a multiple of 4 up to 1020")
        bhs = self._pack((len(ahs) << 22) | n)          # TotalAHSLength is in words
        return bhs + ahs if ahs else bhs

    def encode(self, header_digest: bool = False, data_digest: bool = False) -> list[bytes]:
        """Wire buffers: header [+ digest], data, padding [+ digest]."""
        hdr = self.header()
        out = [hdr, digest(hdr)] if header_digest else [hdr]
        data = self.data
        if data:
            pad = _PAD[len(data) & 3]
            out.append(data)
            if pad:
                out.append(pad)
            if data_digest:
                out.append(digest(data, pad))
        return out

    def to_bytes(self, header_digest: bool = False, data_digest: bool = False) -> bytes:
        return b"".join(self.encode(header_digest, data_digest))

    @classmethod
    def _decode(cls, b: bytes, ahs: bytes, data: bytes) -> PDU:  # pragma: no cover
        raise NotImplementedError


# --- initiator -> target ---------------------------------------------------------

@dataclass(slots=True, kw_only=True)
class NopOut(PDU):
    opcode = Opcode.NOP_OUT
    _S = struct.Struct(">BBHIQIIII16x")
    immediate: bool = False
    lun: int = 0
    ttt: int = RESERVED_TAG
    cmdsn: int = 0
    expstatsn: int = 0

    def _pack(self, word):
        return self._S.pack(0x40 * self.immediate, 0x80, 0, word, self.lun, self.itt,
                            self.ttt, self.cmdsn, self.expstatsn)

    @classmethod
    def _decode(cls, b, ahs, data):
        b0, _, _, _, lun, itt, ttt, cmdsn, expstatsn = cls._S.unpack_from(b)
        return cls(immediate=bool(b0 & 0x40), lun=lun, itt=itt, ttt=ttt, cmdsn=cmdsn,
                   expstatsn=expstatsn, data=data, ahs=ahs)


@dataclass(slots=True, kw_only=True)
class ScsiCommand(PDU):
    """SCSI Command. ``cdb`` is 16 bytes from the BHS plus any Extended CDB AHS,
    so a decoded 6/10/12-byte CDB comes back zero-padded to 16."""

    opcode = Opcode.SCSI_COMMAND
    _S = struct.Struct(">BBHIQIIII16s")
    immediate: bool = False
    final: bool = True
    read: bool = False
    write: bool = False
    attr: int = 1                     # TaskAttribute.SIMPLE
    lun: int = 0
    expected_length: int = 0          # Expected Data Transfer Length
    cmdsn: int = 0
    expstatsn: int = 0
    cdb: bytes = bytes(16)
    bidi_read_length: int | None = None

    def _ahs(self) -> bytes:
        out = b""
        if len(self.cdb) > 16:
            ext = self.cdb[16:]
            out = struct.pack(">HBx", len(ext) + 1, AHS_EXTENDED_CDB) + ext + _PAD[(len(ext)) & 3]
        if self.bidi_read_length is not None:
            out += struct.pack(">HBxI", 5, AHS_BIDI_READ_LENGTH, self.bidi_read_length)
        return out

    def _pack(self, word):
        flags = 0x80 * self.final | 0x40 * self.read | 0x20 * self.write | (self.attr & 7)
        return self._S.pack(0x01 | 0x40 * self.immediate, flags, 0, word, self.lun, self.itt,
                            self.expected_length, self.cmdsn, self.expstatsn,
                            self.cdb[:16].ljust(16, b"\0"))

    @classmethod
    def _decode(cls, b, ahs, data):
        b0, flags, _, _, lun, itt, edtl, cmdsn, expstatsn, cdb = cls._S.unpack_from(b)
        bidi = None
        if ahs:
            cdb, bidi = _parse_command_ahs(ahs, cdb)
        return cls(immediate=bool(b0 & 0x40), final=bool(flags & 0x80), read=bool(flags & 0x40),
                   write=bool(flags & 0x20), attr=flags & 7, lun=lun, itt=itt,
                   expected_length=edtl, cmdsn=cmdsn, expstatsn=expstatsn, cdb=cdb,
                   bidi_read_length=bidi, data=data)


def _parse_command_ahs(ahs: bytes, cdb: bytes) -> tuple[bytes, int | None]:
    """Extended CDB (type 1) and bidirectional read length (type 2) AHSs."""
    bidi = None
    off, end = 0, len(ahs)
    while off < end:
        if off + 4 > end:
            raise ValueError("truncated AHS")
        length, kind = struct.unpack_from(">HB", ahs, off)
        if length == 0 or off + 3 + length > end:
            raise ValueError(f"AHS length {length} overruns TotalAHSLength")
        if kind == AHS_EXTENDED_CDB:
            cdb = cdb + ahs[off + 4:off + 3 + length]
        elif kind == AHS_BIDI_READ_LENGTH and length == 5:
            bidi, = _BE32.unpack_from(ahs, off + 4)
        else:
            raise ValueError(f"unsupported AHS type {kind} (length {length})")
        off += (3 + length + 3) & ~3
    return cdb, bidi


@dataclass(slots=True, kw_only=True)
class TaskMgmtRequest(PDU):
    opcode = Opcode.TASK_MGMT_REQUEST
    _S = struct.Struct(">BBHIQIIIIII8x")
    immediate: bool = True
    function: int = 1                 # TmfFunction
    lun: int = 0
    referenced_task_tag: int = RESERVED_TAG
    cmdsn: int = 0
    expstatsn: int = 0
    refcmdsn: int = 0
    expdatasn: int = 0

    def _pack(self, word):
        return self._S.pack(0x02 | 0x40 * self.immediate, 0x80 | self.function, 0, word,
                            self.lun, self.itt, self.referenced_task_tag, self.cmdsn,
                            self.expstatsn, self.refcmdsn, self.expdatasn)

    @classmethod
    def _decode(cls, b, ahs, data):
        b0, b1, _, _, lun, itt, rtt, cmdsn, expstatsn, refcmdsn, expdatasn = cls._S.unpack_from(b)
        return cls(immediate=bool(b0 & 0x40), function=b1 & 0x7F, lun=lun, itt=itt,
                   referenced_task_tag=rtt, cmdsn=cmdsn, expstatsn=expstatsn,
                   refcmdsn=refcmdsn, expdatasn=expdatasn, data=data, ahs=ahs)


@dataclass(slots=True, kw_only=True)
class LoginRequest(PDU):
    opcode = Opcode.LOGIN_REQUEST
    _S = struct.Struct(">BBBBI6sHIH2xII16x")
    immediate: bool = True            # RFC 7143 §11.12: always set by initiators
    transit: bool = False
    cont: bool = False
    csg: int = 0
    nsg: int = 0
    version_max: int = 0
    version_min: int = 0
    isid: bytes = bytes(6)
    tsih: int = 0
    cid: int = 0
    cmdsn: int = 0
    expstatsn: int = 0

    def _pack(self, word):
        flags = 0x80 * self.transit | 0x40 * self.cont | (self.csg & 3) << 2 | (self.nsg & 3)
        return self._S.pack(0x03 | 0x40 * self.immediate, flags, self.version_max,
                            self.version_min, word, self.isid, self.tsih, self.itt, self.cid,
                            self.cmdsn, self.expstatsn)

    @classmethod
    def _decode(cls, b, ahs, data):
        b0, f, vmax, vmin, _, isid, tsih, itt, cid, cmdsn, expstatsn = cls._S.unpack_from(b)
        return cls(immediate=bool(b0 & 0x40), transit=bool(f & 0x80), cont=bool(f & 0x40),
                   csg=(f >> 2) & 3, nsg=f & 3, version_max=vmax, version_min=vmin, isid=isid,
                   tsih=tsih, itt=itt, cid=cid, cmdsn=cmdsn, expstatsn=expstatsn, data=data,
                   ahs=ahs)


@dataclass(slots=True, kw_only=True)
class TextRequest(PDU):
    opcode = Opcode.TEXT_REQUEST
    _S = struct.Struct(">BBHIQIIII16x")
    immediate: bool = False
    final: bool = True
    cont: bool = False
    lun: int = 0
    ttt: int = RESERVED_TAG
    cmdsn: int = 0
    expstatsn: int = 0

    def _pack(self, word):
        return self._S.pack(0x04 | 0x40 * self.immediate, 0x80 * self.final | 0x40 * self.cont,
                            0, word, self.lun, self.itt, self.ttt, self.cmdsn, self.expstatsn)

    @classmethod
    def _decode(cls, b, ahs, data):
        b0, f, _, _, lun, itt, ttt, cmdsn, expstatsn = cls._S.unpack_from(b)
        return cls(immediate=bool(b0 & 0x40), final=bool(f & 0x80), cont=bool(f & 0x40),
                   lun=lun, itt=itt, ttt=ttt, cmdsn=cmdsn, expstatsn=expstatsn, data=data,
                   ahs=ahs)


@dataclass(slots=True, kw_only=True)
class DataOut(PDU):
    opcode = Opcode.DATA_OUT
    _S = struct.Struct(">BBHIQII4xI4xII4x")
    final: bool = False
    lun: int = 0
    ttt: int = RESERVED_TAG
    expstatsn: int = 0
    datasn: int = 0
    buffer_offset: int = 0

    def _pack(self, word):
        return self._S.pack(0x05, 0x80 * self.final, 0, word, self.lun, self.itt, self.ttt,
                            self.expstatsn, self.datasn, self.buffer_offset)

    @classmethod
    def _decode(cls, b, ahs, data):
        _, f, _, _, lun, itt, ttt, expstatsn, datasn, offset = cls._S.unpack_from(b)
        return cls(final=bool(f & 0x80), lun=lun, itt=itt, ttt=ttt, expstatsn=expstatsn,
                   datasn=datasn, buffer_offset=offset, data=data, ahs=ahs)


@dataclass(slots=True, kw_only=True)
class LogoutRequest(PDU):
    opcode = Opcode.LOGOUT_REQUEST
    _S = struct.Struct(">BBHI8xIH2xII16x")
    immediate: bool = False
    reason: int = 0                   # LogoutReason
    cid: int = 0
    cmdsn: int = 0
    expstatsn: int = 0

    def _pack(self, word):
        return self._S.pack(0x06 | 0x40 * self.immediate, 0x80 | self.reason, 0, word, self.itt,
                            self.cid, self.cmdsn, self.expstatsn)

    @classmethod
    def _decode(cls, b, ahs, data):
        b0, b1, _, _, itt, cid, cmdsn, expstatsn = cls._S.unpack_from(b)
        return cls(immediate=bool(b0 & 0x40), reason=b1 & 0x7F, itt=itt, cid=cid, cmdsn=cmdsn,
                   expstatsn=expstatsn, data=data, ahs=ahs)


@dataclass(slots=True, kw_only=True)
class SnackRequest(PDU):
    """Decoded only so it can be rejected: we run at ErrorRecoveryLevel 0."""

    opcode = Opcode.SNACK_REQUEST
    _S = struct.Struct(">BBHIQII4xI8xII")
    type: int = 0                     # SnackType
    lun: int = 0
    ttt: int = RESERVED_TAG           # or SNACK Tag
    expstatsn: int = 0
    begrun: int = 0
    runlength: int = 0

    def _pack(self, word):
        return self._S.pack(0x10, 0x80 | (self.type & 0xF), 0, word, self.lun, self.itt,
                            self.ttt, self.expstatsn, self.begrun, self.runlength)

    @classmethod
    def _decode(cls, b, ahs, data):
        _, b1, _, _, lun, itt, ttt, expstatsn, begrun, runlength = cls._S.unpack_from(b)
        return cls(type=b1 & 0xF, lun=lun, itt=itt, ttt=ttt, expstatsn=expstatsn,
                   begrun=begrun, runlength=runlength, data=data, ahs=ahs)


# --- target -> initiator ---------------------------------------------------------

@dataclass(slots=True, kw_only=True)
class NopIn(PDU):
    opcode = Opcode.NOP_IN
    _S = struct.Struct(">BBHIQIIIII12x")
    lun: int = 0
    ttt: int = RESERVED_TAG
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0

    def _pack(self, word):
        return self._S.pack(0x20, 0x80, 0, word, self.lun, self.itt, self.ttt, self.statsn,
                            self.expcmdsn, self.maxcmdsn)

    @classmethod
    def _decode(cls, b, ahs, data):
        _, _, _, _, lun, itt, ttt, statsn, expcmdsn, maxcmdsn = cls._S.unpack_from(b)
        return cls(lun=lun, itt=itt, ttt=ttt, statsn=statsn, expcmdsn=expcmdsn,
                   maxcmdsn=maxcmdsn, data=data, ahs=ahs)


@dataclass(slots=True, kw_only=True)
class ScsiResponse(PDU):
    """SCSI Response. The data segment is SenseLength(2) + sense + response data;
    build it with ``sense_segment`` and read it back with ``sense``."""

    opcode = Opcode.SCSI_RESPONSE
    _S = struct.Struct(">BBBBI8xIIIIIIII")
    bidi_overflow: bool = False       # o
    bidi_underflow: bool = False      # u
    overflow: bool = False            # O
    underflow: bool = False           # U
    response: int = 0                 # ScsiResponseCode
    status: int = 0                   # ScsiStatus
    snack_tag: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    expdatasn: int = 0
    bidi_residual: int = 0
    residual: int = 0

    def _pack(self, word):
        flags = (0x80 | 0x10 * self.bidi_overflow | 0x08 * self.bidi_underflow
                 | 0x04 * self.overflow | 0x02 * self.underflow)
        return self._S.pack(0x21, flags, self.response, self.status, word, self.itt,
                            self.snack_tag, self.statsn, self.expcmdsn, self.maxcmdsn,
                            self.expdatasn, self.bidi_residual, self.residual)

    @classmethod
    def _decode(cls, b, ahs, data):
        (_, f, response, status, _, itt, snack_tag, statsn, expcmdsn, maxcmdsn, expdatasn,
         bidi_residual, residual) = cls._S.unpack_from(b)
        return cls(bidi_overflow=bool(f & 0x10), bidi_underflow=bool(f & 0x08),
                   overflow=bool(f & 0x04), underflow=bool(f & 0x02), response=response,
                   status=status, itt=itt, snack_tag=snack_tag, statsn=statsn,
                   expcmdsn=expcmdsn, maxcmdsn=maxcmdsn, expdatasn=expdatasn,
                   bidi_residual=bidi_residual, residual=residual, data=data, ahs=ahs)

    @staticmethod
    def sense_segment(sense: bytes, response_data: bytes = b"") -> bytes:
        return struct.pack(">H", len(sense)) + sense + response_data

    @property
    def sense(self) -> bytes:
        if len(self.data) < 2:
            return b""
        n, = struct.unpack_from(">H", self.data)
        return self.data[2:2 + n]


@dataclass(slots=True, kw_only=True)
class TaskMgmtResponse(PDU):
    opcode = Opcode.TASK_MGMT_RESPONSE
    _S = struct.Struct(">BBBxI8xI4xIII12x")
    response: int = 0                 # TmfResponse
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0

    def _pack(self, word):
        return self._S.pack(0x22, 0x80, self.response, word, self.itt, self.statsn,
                            self.expcmdsn, self.maxcmdsn)

    @classmethod
    def _decode(cls, b, ahs, data):
        _, _, response, _, itt, statsn, expcmdsn, maxcmdsn = cls._S.unpack_from(b)
        return cls(response=response, itt=itt, statsn=statsn, expcmdsn=expcmdsn,
                   maxcmdsn=maxcmdsn, data=data, ahs=ahs)


@dataclass(slots=True, kw_only=True)
class LoginResponse(PDU):
    opcode = Opcode.LOGIN_RESPONSE
    _S = struct.Struct(">BBBBI6sHI4xIIIBB10x")
    transit: bool = False
    cont: bool = False
    csg: int = 0
    nsg: int = 0
    version_max: int = 0
    version_active: int = 0
    isid: bytes = bytes(6)
    tsih: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    status_class: int = 0
    status_detail: int = 0

    @property
    def status(self) -> int:
        return self.status_class << 8 | self.status_detail

    def _pack(self, word):
        flags = 0x80 * self.transit | 0x40 * self.cont | (self.csg & 3) << 2 | (self.nsg & 3)
        return self._S.pack(0x23, flags, self.version_max, self.version_active, word, self.isid,
                            self.tsih, self.itt, self.statsn, self.expcmdsn, self.maxcmdsn,
                            self.status_class, self.status_detail)

    @classmethod
    def _decode(cls, b, ahs, data):
        (_, f, vmax, vact, _, isid, tsih, itt, statsn, expcmdsn, maxcmdsn, sclass,
         sdetail) = cls._S.unpack_from(b)
        return cls(transit=bool(f & 0x80), cont=bool(f & 0x40), csg=(f >> 2) & 3, nsg=f & 3,
                   version_max=vmax, version_active=vact, isid=isid, tsih=tsih, itt=itt,
                   statsn=statsn, expcmdsn=expcmdsn, maxcmdsn=maxcmdsn, status_class=sclass,
                   status_detail=sdetail, data=data, ahs=ahs)


@dataclass(slots=True, kw_only=True)
class TextResponse(PDU):
    opcode = Opcode.TEXT_RESPONSE
    _S = struct.Struct(">BBHIQIIIII12x")
    final: bool = True
    cont: bool = False
    lun: int = 0
    ttt: int = RESERVED_TAG
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0

    def _pack(self, word):
        return self._S.pack(0x24, 0x80 * self.final | 0x40 * self.cont, 0, word, self.lun,
                            self.itt, self.ttt, self.statsn, self.expcmdsn, self.maxcmdsn)

    @classmethod
    def _decode(cls, b, ahs, data):
        _, f, _, _, lun, itt, ttt, statsn, expcmdsn, maxcmdsn = cls._S.unpack_from(b)
        return cls(final=bool(f & 0x80), cont=bool(f & 0x40), lun=lun, itt=itt, ttt=ttt,
                   statsn=statsn, expcmdsn=expcmdsn, maxcmdsn=maxcmdsn, data=data, ahs=ahs)


@dataclass(slots=True, kw_only=True)
class DataIn(PDU):
    """SCSI Data-In. With ``status_present`` (S) it also completes the command,
    which then needs ``final`` too (RFC 7143 §11.7.3)."""

    opcode = Opcode.DATA_IN
    _S = struct.Struct(">BBBBIQIIIIIIII")
    final: bool = False
    ack: bool = False
    overflow: bool = False
    underflow: bool = False
    status_present: bool = False
    status: int = 0
    lun: int = 0
    ttt: int = RESERVED_TAG
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    datasn: int = 0
    buffer_offset: int = 0
    residual: int = 0

    def _pack(self, word):
        flags = (0x80 * self.final | 0x40 * self.ack | 0x04 * self.overflow
                 | 0x02 * self.underflow | self.status_present)
        return self._S.pack(0x25, flags, 0, self.status, word, self.lun, self.itt, self.ttt,
                            self.statsn, self.expcmdsn, self.maxcmdsn, self.datasn,
                            self.buffer_offset, self.residual)

    @classmethod
    def _decode(cls, b, ahs, data):
        (_, f, _, status, _, lun, itt, ttt, statsn, expcmdsn, maxcmdsn, datasn, offset,
         residual) = cls._S.unpack_from(b)
        return cls(final=bool(f & 0x80), ack=bool(f & 0x40), overflow=bool(f & 0x04),
                   underflow=bool(f & 0x02), status_present=bool(f & 0x01), status=status,
                   lun=lun, itt=itt, ttt=ttt, statsn=statsn, expcmdsn=expcmdsn,
                   maxcmdsn=maxcmdsn, datasn=datasn, buffer_offset=offset, residual=residual,
                   data=data, ahs=ahs)


@dataclass(slots=True, kw_only=True)
class LogoutResponse(PDU):
    opcode = Opcode.LOGOUT_RESPONSE
    _S = struct.Struct(">BBBxI8xI4xIII4xHH4x")
    response: int = 0                 # LogoutResponseCode
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    time2wait: int = 0
    time2retain: int = 0

    def _pack(self, word):
        return self._S.pack(0x26, 0x80, self.response, word, self.itt, self.statsn,
                            self.expcmdsn, self.maxcmdsn, self.time2wait, self.time2retain)

    @classmethod
    def _decode(cls, b, ahs, data):
        _, _, response, _, itt, statsn, expcmdsn, maxcmdsn, t2w, t2r = cls._S.unpack_from(b)
        return cls(response=response, itt=itt, statsn=statsn, expcmdsn=expcmdsn,
                   maxcmdsn=maxcmdsn, time2wait=t2w, time2retain=t2r, data=data, ahs=ahs)


@dataclass(slots=True, kw_only=True)
class R2T(PDU):
    opcode = Opcode.R2T
    _S = struct.Struct(">BBHIQIIIIIIII")
    lun: int = 0
    ttt: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    r2tsn: int = 0
    buffer_offset: int = 0
    desired_length: int = 0

    def _pack(self, word):
        return self._S.pack(0x31, 0x80, 0, word, self.lun, self.itt, self.ttt, self.statsn,
                            self.expcmdsn, self.maxcmdsn, self.r2tsn, self.buffer_offset,
                            self.desired_length)

    @classmethod
    def _decode(cls, b, ahs, data):
        (_, _, _, _, lun, itt, ttt, statsn, expcmdsn, maxcmdsn, r2tsn, offset,
         desired) = cls._S.unpack_from(b)
        return cls(lun=lun, itt=itt, ttt=ttt, statsn=statsn, expcmdsn=expcmdsn,
                   maxcmdsn=maxcmdsn, r2tsn=r2tsn, buffer_offset=offset, desired_length=desired,
                   data=data, ahs=ahs)


@dataclass(slots=True, kw_only=True)
class AsyncMessage(PDU):
    opcode = Opcode.ASYNC_MESSAGE
    _S = struct.Struct(">BBHIQI4xIIIBBHHH4x")
    lun: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    event: int = 0                    # AsyncEvent
    vcode: int = 0
    parameter1: int = 0
    parameter2: int = 0
    parameter3: int = 0

    def _pack(self, word):
        return self._S.pack(0x32, 0x80, 0, word, self.lun, self.itt, self.statsn,
                            self.expcmdsn, self.maxcmdsn, self.event, self.vcode,
                            self.parameter1, self.parameter2, self.parameter3)

    @classmethod
    def _decode(cls, b, ahs, data):
        (_, _, _, _, lun, itt, statsn, expcmdsn, maxcmdsn, event, vcode, p1, p2,
         p3) = cls._S.unpack_from(b)
        return cls(lun=lun, itt=itt, statsn=statsn, expcmdsn=expcmdsn, maxcmdsn=maxcmdsn,
                   event=event, vcode=vcode, parameter1=p1, parameter2=p2, parameter3=p3,
                   data=data, ahs=ahs)


@dataclass(slots=True, kw_only=True)
class Reject(PDU):
    """Reject; ``data`` carries the rejected PDU's header (RFC 7143 §11.17)."""

    opcode = Opcode.REJECT
    _S = struct.Struct(">BBBxI8xI4xIIII8x")
    reason: int = 0                   # RejectReason
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    datasn: int = 0                   # DataSN/R2TSN, only for SNACK rejects

    def _pack(self, word):
        return self._S.pack(0x3F, 0x80, self.reason, word, self.itt, self.statsn,
                            self.expcmdsn, self.maxcmdsn, self.datasn)

    @classmethod
    def _decode(cls, b, ahs, data):
        _, _, reason, _, itt, statsn, expcmdsn, maxcmdsn, datasn = cls._S.unpack_from(b)
        return cls(reason=reason, itt=itt, statsn=statsn, expcmdsn=expcmdsn,
                   maxcmdsn=maxcmdsn, datasn=datasn, data=data, ahs=ahs)


PDU_CLASSES: dict[int, type[PDU]] = {c.opcode: c for c in (
    NopOut, ScsiCommand, TaskMgmtRequest, LoginRequest, TextRequest, DataOut, LogoutRequest,
    SnackRequest, NopIn, ScsiResponse, TaskMgmtResponse, LoginResponse, TextResponse, DataIn,
    LogoutResponse, R2T, AsyncMessage, Reject)}

for _cls in PDU_CLASSES.values():
    assert _cls._S.size == BHS_LEN, _cls


# --- framing -----------------------------------------------------------------------

def _parse(bhs: bytes, ahs: bytes, data: bytes, opcodes: frozenset[int]) -> PDU:
    cls = PDU_CLASSES.get(bhs[0] & 0x3F)
    if cls is None or cls.opcode not in opcodes:
        raise UnknownOpcode(f"opcode {bhs[0] & 0x3F:#04x} not accepted here", header=bhs)
    try:
        return cls._decode(bhs, ahs, data)
    except (ValueError, struct.error) as e:
        raise MalformedPDU(f"{cls.__name__}: {e}", header=bhs) from None


def _lengths(bhs: bytes, max_dsl: int) -> tuple[int, int]:
    word, = _BE32.unpack_from(bhs, 4)
    ahs_len, dsl = (word >> 24) * 4, word & 0xFFFFFF
    if dsl > max_dsl:
        raise SegmentTooLong(f"DataSegmentLength {dsl} exceeds {max_dsl}", header=bhs)
    return ahs_len, dsl


async def read_pdu(reader: asyncio.StreamReader, header_digest: bool = False,
                   data_digest: bool = False, max_recv_data_segment_length: int = 8192,
                   opcodes: frozenset[int] = INITIATOR_OPCODES) -> PDU | None:
    """Read one PDU. ``None`` on a clean EOF between PDUs, ``ProtocolError`` on bad input.

    The whole PDU is consumed before an unknown opcode or a data digest error is
    raised, so the stream stays framed and the caller may answer with Reject.
    """
    try:
        bhs = await reader.readexactly(BHS_LEN)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise TruncatedPDU(f"connection closed after {len(e.partial)} header bytes") from None
    ahs_len, dsl = _lengths(bhs, max_recv_data_segment_length)
    ahs = data = b""
    try:
        if ahs_len or header_digest:
            ext = await reader.readexactly(ahs_len + 4 * header_digest)
            ahs = ext[:ahs_len]
            if header_digest and ext[ahs_len:] != digest(bhs, ahs):
                raise HeaderDigestError("header digest mismatch", header=bhs)
        if dsl:
            padded = (dsl + 3) & ~3
            data = await reader.readexactly(padded)
            if data_digest and await reader.readexactly(4) != digest(data):
                raise DataDigestError("data digest mismatch", header=bhs)
            if padded != dsl:
                data = data[:dsl]
    except asyncio.IncompleteReadError:
        raise TruncatedPDU("connection closed inside a PDU", header=bhs) from None
    return _parse(bhs, ahs, data, opcodes)


def read_buffered(reader: asyncio.StreamReader, header_digest: bool = False,
                  data_digest: bool = False, max_recv_data_segment_length: int = 8192,
                  opcodes: frozenset[int] = INITIATOR_OPCODES) -> list[PDU | ProtocolError]:
    """Every complete PDU already in ``reader``'s buffer, taken without awaiting.

    A busy initiator's commands arrive several to a segment: one call here
    replaces two ``readexactly`` awaits and their copies per PDU. Each PDU
    consumes the same bytes and fails with the same error as in ``read_pdu``;
    an error is returned in place and ends the list. An incomplete PDU stays in
    the buffer for ``read_pdu``, and so does everything while the reader holds
    an exception (``read_pdu`` raises it first). Uses StreamReader's
    ``_buffer`` and ``_maybe_resume_transport`` (CPython internals).
    """
    buf = reader._buffer                       # noqa: SLF001
    n = len(buf)
    if n < BHS_LEN or reader._exception is not None:   # noqa: SLF001
        return []
    out: list[PDU | ProtocolError] = []
    off = 0
    hd = 4 if header_digest else 0
    fast_cmd = not hd and not data_digest and Opcode.SCSI_COMMAND in opcodes
    unpack_cmd = _SCSI_COMMAND.unpack_from
    new = object.__new__
    mv = memoryview(buf)
    try:
        while n - off >= BHS_LEN:
            word, = _BE32.unpack_from(buf, off + 4)
            ahs_len, dsl = (word >> 24) * 4, word & 0xFFFFFF
            start = off + BHS_LEN
            if dsl > max_recv_data_segment_length:
                out.append(SegmentTooLong(f"DataSegmentLength {dsl} exceeds {max_recv_data_segment_length}",
                                          header=mv[off:start].tobytes()))
                off = start
                break
            padded = (dsl + 3) & ~3
            dpos = start + ahs_len + hd
            end = dpos + padded + (4 if data_digest and dsl else 0)
            if end > n:
                break
            if fast_cmd and not ahs_len and buf[off] & 0x3F == 1:
                # ScsiCommand._decode inlined for the common case (no AHS, no digests).
                # Fields set one by one: a quarter of the cost of the keyword __init__
                # (tests compare the result with the general decode, field for field).
                c = new(ScsiCommand)
                b0, flags, _, _, c.lun, c.itt, c.expected_length, c.cmdsn, c.expstatsn, c.cdb = \
                    unpack_cmd(buf, off)
                c.immediate = bool(b0 & 0x40)
                c.final = bool(flags & 0x80)
                c.read = bool(flags & 0x40)
                c.write = bool(flags & 0x20)
                c.attr = flags & 7
                c.bidi_read_length = None
                c.ahs = b""
                c.data = mv[start:start + dsl].tobytes() if dsl else b""
                out.append(c)
                off = end
                continue
            bhs = mv[off:start].tobytes()
            ahs = mv[start:start + ahs_len].tobytes() if ahs_len else b""
            if hd and mv[dpos - 4:dpos].tobytes() != digest(bhs, ahs):
                out.append(HeaderDigestError("header digest mismatch", header=bhs))
                off = dpos
                break
            off = end
            data = b""
            if dsl:
                data = mv[dpos:dpos + padded].tobytes()
                if data_digest and mv[end - 4:end].tobytes() != digest(data):
                    out.append(DataDigestError("data digest mismatch", header=bhs))
                    break
                if padded != dsl:
                    data = data[:dsl]
            try:
                out.append(_parse(bhs, ahs, data, opcodes))
            except ProtocolError as e:
                out.append(e)
                break
    finally:
        mv.release()
        if off:
            del buf[:off]
            reader._maybe_resume_transport()   # noqa: SLF001 - as readexactly does
    return out


def encode_scsi_response(itt: int, status: int, statsn: int, expcmdsn: int, maxcmdsn: int,
                         expdatasn: int = 0, residual: int = 0) -> bytes:
    """BHS of a SCSI Response without sense data, in one pack: the answer to almost
    every command. ``residual`` > 0 is an underflow, < 0 an overflow. Byte-identical
    to ``ScsiResponse(...).header()`` with the same fields."""
    flags = 0x82 if residual > 0 else 0x84 if residual < 0 else 0x80
    return _SCSI_RESPONSE.pack(0x21, flags, 0, status, 0, itt, 0, statsn, expcmdsn, maxcmdsn,
                               expdatasn, 0, abs(residual))


def encode_data_in(itt: int, lun: int, length: int, statsn: int, expcmdsn: int, maxcmdsn: int,
                   datasn: int, buffer_offset: int, final: bool = False, status: int | None = None,
                   residual: int = 0) -> bytes:
    """BHS of a Data-In carrying ``length`` bytes, in one pack; with ``status`` it also
    completes the command (S and F set, ``residual`` as in ``encode_scsi_response``).
    Byte-identical to ``DataIn(...).header()`` with the same fields."""
    if status is None:
        flags, status, residual = 0x80 * final, 0, 0
    else:
        flags = 0x83 if residual > 0 else 0x85 if residual < 0 else 0x81
    return _DATA_IN.pack(0x25, flags, 0, status, length, lun, itt, RESERVED_TAG, statsn, expcmdsn,
                         maxcmdsn, datasn, buffer_offset, abs(residual))


_SCSI_COMMAND = ScsiCommand._S
_SCSI_RESPONSE = ScsiResponse._S
_DATA_IN = DataIn._S


def decode_pdu(buf: bytes, header_digest: bool = False, data_digest: bool = False,
               max_recv_data_segment_length: int = MAX_DATA_SEGMENT,
               opcodes: frozenset[int] = frozenset(PDU_CLASSES)) -> tuple[PDU, int]:
    """Decode the PDU at the start of ``buf``; returns it and the bytes it used."""
    buf = bytes(buf)
    if len(buf) < BHS_LEN:
        raise TruncatedPDU(f"{len(buf)} bytes is shorter than a BHS")
    bhs = buf[:BHS_LEN]
    ahs_len, dsl = _lengths(bhs, max_recv_data_segment_length)
    padded = (dsl + 3) & ~3
    hd, dd = 4 * header_digest, 4 * (data_digest and dsl > 0)
    end = BHS_LEN + ahs_len + hd + padded + dd
    if len(buf) < end:
        raise TruncatedPDU(f"PDU needs {end} bytes, have {len(buf)}", header=bhs)
    off = BHS_LEN + ahs_len
    ahs = buf[BHS_LEN:off]
    if hd and buf[off:off + 4] != digest(bhs, ahs):
        raise HeaderDigestError("header digest mismatch", header=bhs)
    off += hd
    data = buf[off:off + padded]
    if dd and buf[off + padded:end] != digest(data):
        raise DataDigestError("data digest mismatch", header=bhs)
    return _parse(bhs, ahs, data[:dsl], opcodes), end
