"""PDU encode/decode against RFC 7143 layouts, RFC 3720 B.4 vectors and real libiscsi bytes."""

from __future__ import annotations

import asyncio
import struct

import pytest

from chunk.iscsi import pdu as P
from chunk.iscsi.constants import (INITIATOR_OPCODES, TARGET_OPCODES, Opcode, RejectReason,
                                   ScsiStatus)
from chunk.iscsi.errors import (DataDigestError, HeaderDigestError, MalformedPDU,
                                ProtocolError, SegmentTooLong, TruncatedPDU, UnknownOpcode)
from chunk.iscsi.text import decode_text

# RFC 3720 appendix B.4 (carried into RFC 7143): CRC32C as the 4 bytes on the wire.
DIGEST_VECTORS = [
    (bytes(32), "aa36918a"),
    (b"\xff" * 32, "43aba862"),
    (bytes(range(32)), "4e79dd46"),
    (bytes(range(31, -1, -1)), "5cdb3f11"),
]
# The same appendix's "iSCSI Read (10) command PDU", CRC 56 3a 96 d9.
READ10_PDU = bytes.fromhex(
    "01c00000" "00000000" "00000000" "00000000" "14000000" "00000400"
    "00000014" "00000018" "28000000" "00000000" "02000000" "00000000")

# First Login Request of `iscsi-ls iscsi://127.0.0.1:PORT` (libiscsi 1.19), captured
# from the wire: discovery session, no CHAP, so it starts in operational negotiation.
LIBISCSI_LOGIN = bytes.fromhex(
    "438700000000018b803c8e57000000004bf9c964000000001f1d298a00000001"
    "00000000000000000000000000000000"
) + (
    b"InitiatorName=iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-ls\x00"
    b"SessionType=Discovery\x00HeaderDigest=None\x00DataDigest=None\x00InitialR2T=No\x00"
    b"ImmediateData=Yes\x00MaxBurstLength=262144\x00FirstBurstLength=262144\x00"
    b"DefaultTime2Wait=2\x00DefaultTime2Retain=0\x00MaxOutstandingR2T=1\x00"
    b"ErrorRecoveryLevel=0\x00IFMarker=No\x00OFMarker=No\x00MaxConnections=1\x00"
    b"MaxRecvDataSegmentLength=262144\x00DataPDUInOrder=Yes\x00DataSequenceInOrder=Yes\x00"
    b"\x00")                                          # one pad byte: 395 -> 396


@pytest.mark.parametrize("data,wire", DIGEST_VECTORS)
def test_crc32c_digest_vectors(data, wire):
    assert P.digest(data).hex() == wire
    # the same CRC fed in pieces, as encode() does for data + padding
    assert P.digest(data[:7], data[7:]).hex() == wire


def test_rfc3720_read10_pdu_vector():
    assert P.digest(READ10_PDU).hex() == "563a96d9"
    cmd, used = P.decode_pdu(READ10_PDU)
    assert used == 48
    assert isinstance(cmd, P.ScsiCommand)
    assert (cmd.immediate, cmd.final, cmd.read, cmd.write, cmd.attr) == (False, True, True,
                                                                         False, 0)
    assert cmd.itt == 0x14000000 and cmd.expected_length == 1024
    assert (cmd.cmdsn, cmd.expstatsn) == (0x14, 0x18)
    assert cmd.cdb == bytes.fromhex("28000000000000000200000000000000")
    # and with a header digest it is exactly the RFC's bytes followed by the RFC's CRC
    assert cmd.to_bytes(header_digest=True) == READ10_PDU + bytes.fromhex("563a96d9")


def test_libiscsi_login_request_hand_computed_layout():
    isid = bytes.fromhex("803c8e570000")    # libiscsi: random ISID type (0x80)
    expected_bhs = (
        bytes([0x40 | 0x03,                 # I bit + Login Request
               0x80 | 1 << 2 | 3,           # T=1, CSG=operational, NSG=full feature
               0x00, 0x00])                 # Version-max, Version-min
        + bytes([0]) + (395).to_bytes(3, "big")   # TotalAHSLength, DataSegmentLength
        + isid + (0).to_bytes(2, "big")     # ISID, TSIH=0: new session
        + (0x4BF9C964).to_bytes(4, "big")   # ITT
        + (0).to_bytes(2, "big") + bytes(2)  # CID, reserved
        + (0x1F1D298A).to_bytes(4, "big")   # CmdSN
        + (1).to_bytes(4, "big")            # ExpStatSN
        + bytes(16))
    assert LIBISCSI_LOGIN[:48] == expected_bhs

    req, used = P.decode_pdu(LIBISCSI_LOGIN)
    assert used == len(LIBISCSI_LOGIN) == 48 + 396
    assert isinstance(req, P.LoginRequest)
    assert (req.immediate, req.transit, req.cont, req.csg, req.nsg) == (True, True, False, 1, 3)
    assert (req.isid, req.tsih, req.cid, req.itt) == (isid, 0, 0, 0x4BF9C964)
    assert (req.cmdsn, req.expstatsn, req.version_max, req.version_min) == (0x1F1D298A, 1, 0, 0)
    pairs = dict(decode_text(req.data))
    assert pairs["SessionType"] == "Discovery" and pairs["MaxBurstLength"] == "262144"
    assert req.to_bytes() == LIBISCSI_LOGIN


def _samples() -> list[P.PDU]:
    """One instance per opcode with every field set away from its default."""
    d = b"\x01\x02\x03\x04\x05"             # odd length to exercise padding
    return [
        P.NopOut(immediate=True, lun=P.encode_lun(3), itt=11, ttt=12, cmdsn=13, expstatsn=14,
                 data=d),
        P.ScsiCommand(immediate=True, final=False, read=True, write=True, attr=2,
                      lun=P.encode_lun(300), itt=21, expected_length=4096, cmdsn=22,
                      expstatsn=23, cdb=bytes(range(0x80, 0x90)), data=b"x" * 512),
        P.ScsiCommand(cdb=bytes(range(32)), bidi_read_length=8192, itt=24),
        P.TaskMgmtRequest(immediate=False, function=5, lun=P.encode_lun(1), itt=31,
                          referenced_task_tag=32, cmdsn=33, expstatsn=34, refcmdsn=35,
                          expdatasn=36),
        P.LoginRequest(transit=True, cont=True, csg=1, nsg=3, version_max=1, version_min=0,
                       isid=b"\x80\x01\x02\x03\x04\x05", tsih=41, itt=42, cid=43, cmdsn=44,
                       expstatsn=45, data=b"InitiatorName=iqn.x\0"),
        P.TextRequest(immediate=True, final=False, cont=True, lun=5, itt=51, ttt=52, cmdsn=53,
                      expstatsn=54, data=b"SendTargets=All\0"),
        P.DataOut(final=True, lun=P.encode_lun(2), itt=61, ttt=62, expstatsn=63, datasn=64,
                  buffer_offset=65536, data=d * 3),
        P.LogoutRequest(immediate=True, reason=1, itt=71, cid=72, cmdsn=73, expstatsn=74),
        P.SnackRequest(type=1, lun=8, itt=81, ttt=82, expstatsn=83, begrun=84, runlength=85),
        P.NopIn(lun=9, itt=91, ttt=92, statsn=93, expcmdsn=94, maxcmdsn=95, data=d),
        P.ScsiResponse(bidi_overflow=True, bidi_underflow=False, overflow=False, underflow=True,
                       response=1, status=ScsiStatus.CHECK_CONDITION, itt=101, snack_tag=102,
                       statsn=103, expcmdsn=104, maxcmdsn=105, expdatasn=106,
                       bidi_residual=107, residual=108,
                       data=P.ScsiResponse.sense_segment(bytes(18))),
        P.TaskMgmtResponse(response=255, itt=111, statsn=112, expcmdsn=113, maxcmdsn=114),
        P.LoginResponse(transit=True, cont=False, csg=1, nsg=3, version_max=0, version_active=0,
                        isid=b"\x40\x00\x01\x37\x00\x00", tsih=121, itt=122, statsn=123,
                        expcmdsn=124, maxcmdsn=125, status_class=2, status_detail=1,
                        data=b"TargetPortalGroupTag=1\0"),
        P.TextResponse(final=False, cont=True, lun=13, itt=131, ttt=132, statsn=133,
                       expcmdsn=134, maxcmdsn=135, data=b"TargetName=iqn.y\0"),
        P.DataIn(final=True, ack=True, overflow=True, underflow=False, status_present=True,
                 status=0x18, lun=14, itt=141, ttt=142, statsn=143, expcmdsn=144,
                 maxcmdsn=145, datasn=146, buffer_offset=147, residual=148, data=d * 7),
        P.LogoutResponse(response=2, itt=151, statsn=152, expcmdsn=153, maxcmdsn=154,
                         time2wait=155, time2retain=156),
        P.R2T(lun=16, itt=161, ttt=162, statsn=163, expcmdsn=164, maxcmdsn=165, r2tsn=166,
              buffer_offset=167, desired_length=168),
        P.AsyncMessage(lun=17, statsn=172, expcmdsn=173, maxcmdsn=174, event=4, vcode=175,
                       parameter1=176, parameter2=177, parameter3=178, data=d),
        P.Reject(reason=RejectReason.PROTOCOL_ERROR, statsn=182, expcmdsn=183, maxcmdsn=184,
                 datasn=185, data=READ10_PDU),
    ]


def test_samples_cover_every_opcode():
    assert {type(p).opcode for p in _samples()} == INITIATOR_OPCODES | TARGET_OPCODES


@pytest.mark.parametrize("hd,dd", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("pdu", _samples(), ids=lambda p: type(p).__name__)
def test_round_trip_every_pdu(pdu, hd, dd):
    wire = pdu.to_bytes(header_digest=hd, data_digest=dd)
    n = len(pdu.data)
    ahs_len = len(pdu.header()) - 48
    assert len(wire) == 48 + ahs_len + 4 * hd + ((n + 3) & ~3) + 4 * (dd and n > 0)
    assert wire[0] & 0x3F == type(pdu).opcode
    assert wire[4] == ahs_len // 4 and int.from_bytes(wire[5:8], "big") == n
    back, used = P.decode_pdu(wire + b"trailing", header_digest=hd, data_digest=dd)
    assert used == len(wire)
    assert type(back) is type(pdu)
    assert back == pdu


@pytest.mark.parametrize("pdu", _samples(), ids=lambda p: type(p).__name__)
async def test_round_trip_through_read_pdu(pdu):
    reader = asyncio.StreamReader()
    reader.feed_data(pdu.to_bytes(True, True) * 2)
    reader.feed_eof()
    kw = dict(header_digest=True, data_digest=True, max_recv_data_segment_length=8192,
              opcodes=INITIATOR_OPCODES | TARGET_OPCODES)
    assert await P.read_pdu(reader, **kw) == pdu
    assert await P.read_pdu(reader, **kw) == pdu
    assert await P.read_pdu(reader, **kw) is None           # clean EOF between PDUs


def test_field_offsets_in_bhs():
    """Spot checks of byte positions straight from the RFC 7143 §11 diagrams."""
    r2t = P.R2T(itt=1, ttt=2, statsn=3, expcmdsn=4, maxcmdsn=5, r2tsn=6, buffer_offset=7,
                desired_length=8).header()
    assert r2t[0:2] == b"\x31\x80"
    assert struct.unpack(">8I", r2t[16:48]) == (1, 2, 3, 4, 5, 6, 7, 8)

    rsp = P.LoginResponse(status_class=0x02, status_detail=0x03, tsih=0xABCD).header()
    assert rsp[36:38] == b"\x02\x03" and rsp[14:16] == b"\xab\xcd"

    din = P.DataIn(final=True, status_present=True, underflow=True, status=0x02,
                   residual=99).header()
    assert din[1] == 0x83 and din[3] == 0x02 and din[44:48] == (99).to_bytes(4, "big")

    scsi = P.ScsiResponse(overflow=True, response=0, status=0x02).header()
    assert scsi[1:4] == b"\x84\x00\x02"

    tmf = P.TaskMgmtRequest(function=1, referenced_task_tag=0x55).header()
    assert tmf[0] == 0x42 and tmf[1] == 0x81 and tmf[20:24] == (0x55).to_bytes(4, "big")

    logout = P.LogoutResponse(time2wait=2, time2retain=20).header()
    assert logout[40:44] == b"\x00\x02\x00\x14"

    async_msg = P.AsyncMessage(event=1, parameter3=5).header()
    assert async_msg[16:20] == b"\xff\xff\xff\xff" and async_msg[36] == 1
    assert async_msg[42:44] == b"\x00\x05"


def test_extended_cdb_and_bidi_ahs_layout():
    cmd = P.ScsiCommand(cdb=bytes(range(32)), bidi_read_length=0x1000)
    hdr = cmd.header()
    # extended CDB AHS: AHSLength = CDB length - 15, type 1, reserved, 16 bytes;
    # bidirectional read AHS: length 5, type 2, reserved, 4 bytes.
    assert hdr[4] == (20 + 8) // 4
    assert hdr[32:48] == bytes(range(16))
    assert hdr[48:52] == b"\x00\x11\x01\x00" and hdr[52:68] == bytes(range(16, 32))
    assert hdr[68:76] == b"\x00\x05\x02\x00\x00\x00\x10\x00"


def test_data_segment_padding_is_zero_and_not_in_dsl():
    wire = P.NopIn(data=b"abcde").to_bytes()
    assert len(wire) == 56 and wire[48:] == b"abcde\0\0\0"
    assert int.from_bytes(wire[5:8], "big") == 5


def test_oversize_data_refused_on_encode():
    with pytest.raises(ValueError):
        P.DataIn(data=bytes(1 << 24)).header()


def test_lun_encoding():
    assert P.encode_lun(0) == 0
    assert P.encode_lun(5).to_bytes(8, "big") == b"\x00\x05" + bytes(6)
    assert P.encode_lun(300).to_bytes(8, "big") == b"\x41\x2c" + bytes(6)   # flat space
    for n in (0, 1, 255, 256, 16383):
        assert P.decode_lun(P.encode_lun(n)) == n
    with pytest.raises(ValueError):
        P.encode_lun(16384)
    with pytest.raises(ValueError):
        P.decode_lun(0xC0 << 56)                  # extended addressing: not ours


def test_scsi_response_sense_segment():
    sense = bytes([0x70, 0, 0x05, 0, 0, 0, 0, 10]) + bytes(10)
    rsp = P.ScsiResponse(status=ScsiStatus.CHECK_CONDITION,
                         data=P.ScsiResponse.sense_segment(sense))
    assert rsp.data[:2] == b"\x00\x12"
    back, _ = P.decode_pdu(rsp.to_bytes())
    assert back.sense == sense


# --- malformed input -------------------------------------------------------------

def _reader(*chunks: bytes) -> asyncio.StreamReader:
    r = asyncio.StreamReader()
    for c in chunks:
        r.feed_data(c)
    r.feed_eof()
    return r


async def test_clean_eof_returns_none():
    assert await P.read_pdu(_reader()) is None


async def test_short_header_is_truncated():
    with pytest.raises(TruncatedPDU) as e:
        await P.read_pdu(_reader(READ10_PDU[:20]))
    assert e.value.fatal


async def test_eof_inside_data_segment_is_truncated():
    wire = P.DataOut(itt=1, data=bytes(512)).to_bytes()
    with pytest.raises(TruncatedPDU) as e:
        await P.read_pdu(_reader(wire[:300]))
    assert e.value.fatal and e.value.header == wire[:48]


async def test_unknown_opcode_is_consumed_and_rejectable():
    bad = bytearray(P.NopOut(data=b"abcd").to_bytes())
    bad[0] = 0x07                                             # not an iSCSI opcode
    good = P.NopOut(itt=9).to_bytes()
    reader = _reader(bytes(bad), good)
    with pytest.raises(UnknownOpcode) as e:
        await P.read_pdu(reader)
    assert not e.value.fatal
    assert e.value.reason == RejectReason.COMMAND_NOT_SUPPORTED
    assert e.value.header == bytes(bad[:48])
    assert (await P.read_pdu(reader)).itt == 9                # framing survived


async def test_target_opcode_from_initiator_is_unknown():
    with pytest.raises(UnknownOpcode):
        await P.read_pdu(_reader(P.NopIn().to_bytes()))


async def test_oversize_data_segment_is_fatal_before_reading_it():
    hdr = P.DataOut(data=bytes(9000)).header()
    with pytest.raises(SegmentTooLong) as e:
        await P.read_pdu(_reader(hdr), max_recv_data_segment_length=8192)
    assert e.value.fatal and isinstance(e.value, ProtocolError)


async def test_header_digest_mismatch_is_fatal():
    wire = bytearray(P.NopOut(itt=3).to_bytes(header_digest=True))
    wire[20] ^= 1                                             # flip a TTT bit
    with pytest.raises(HeaderDigestError) as e:
        await P.read_pdu(_reader(bytes(wire)), header_digest=True)
    assert e.value.fatal


async def test_data_digest_mismatch_keeps_framing():
    wire = bytearray(P.DataOut(itt=4, data=b"hello").to_bytes(data_digest=True))
    wire[49] ^= 0x20
    reader = _reader(bytes(wire), P.NopOut(itt=5).to_bytes(data_digest=True))
    with pytest.raises(DataDigestError) as e:
        await P.read_pdu(reader, data_digest=True)
    # ERL 0: the connection is dropped (after a Reject), though the framing is kept
    assert e.value.fatal and e.value.reason == RejectReason.DATA_DIGEST_ERROR
    nop = await P.read_pdu(reader, data_digest=True)        # no data: no data digest
    assert nop.itt == 5


async def test_corrupt_ahs_is_malformed_not_a_crash():
    wire = bytearray(P.ScsiCommand(cdb=bytes(32)).to_bytes())
    wire[48:50] = b"\x00\x40"                                 # AHSLength runs past the AHS
    with pytest.raises(MalformedPDU) as e:
        await P.read_pdu(_reader(bytes(wire)))
    assert not e.value.fatal


def test_decode_pdu_short_buffers():
    with pytest.raises(TruncatedPDU):
        P.decode_pdu(READ10_PDU[:47])
    with pytest.raises(TruncatedPDU):
        P.decode_pdu(LIBISCSI_LOGIN[:100])


def test_every_opcode_value_has_a_class():
    assert set(P.PDU_CLASSES) == {int(o) for o in Opcode}


# --- read_buffered: every complete PDU in the reader's buffer, without awaiting ------

def _initiator_samples() -> list[P.PDU]:
    return [p for p in _samples() if type(p).opcode in INITIATOR_OPCODES]


@pytest.mark.parametrize("hd,dd", [(False, False), (True, False), (False, True), (True, True)])
async def test_read_buffered_takes_every_complete_pdu_and_leaves_a_partial_one(hd, dd):
    pdus = _initiator_samples() + [P.ScsiCommand(itt=7, cmdsn=8, write=True, data=b"abcdefg"),
                                   P.ScsiCommand(itt=9, read=True, expected_length=512)]
    wire = b"".join(p.to_bytes(hd, dd) for p in pdus)
    partial = P.DataOut(itt=3, data=bytes(100)).to_bytes(hd, dd)[:90]
    kw = dict(header_digest=hd, data_digest=dd, max_recv_data_segment_length=8192)
    reader = asyncio.StreamReader()
    reader.feed_data(wire + partial)
    assert P.read_buffered(reader, **kw) == pdus
    assert bytes(reader._buffer) == partial                  # waits for read_pdu
    assert P.read_buffered(reader, **kw) == []
    ref = asyncio.StreamReader()                               # read_pdu decodes the same
    ref.feed_data(wire)
    assert [await P.read_pdu(ref, **kw) for _ in pdus] == pdus


async def test_read_buffered_needs_a_whole_header():
    reader = asyncio.StreamReader()
    reader.feed_data(READ10_PDU[:47])
    assert P.read_buffered(reader) == [] and len(reader._buffer) == 47


async def test_read_buffered_leaves_everything_when_the_reader_failed():
    reader = asyncio.StreamReader()
    reader.feed_data(P.NopOut(itt=1).to_bytes())
    reader.set_exception(ConnectionResetError())
    assert P.read_buffered(reader) == [] and len(reader._buffer) == 48


def _bad_unknown_opcode() -> bytes:
    bad = bytearray(P.NopOut(data=b"abcd").to_bytes())
    bad[0] = 0x07
    return bytes(bad)


def _bad_header_digest() -> bytes:
    wire = bytearray(P.NopOut(itt=3, data=b"xy").to_bytes(header_digest=True))
    wire[20] ^= 1
    return bytes(wire)


def _bad_data_digest() -> bytes:
    wire = bytearray(P.DataOut(itt=4, data=b"hello").to_bytes(data_digest=True))
    wire[49] ^= 0x20
    return bytes(wire)


def _bad_ahs() -> bytes:
    wire = bytearray(P.ScsiCommand(cdb=bytes(32)).to_bytes())
    wire[48:50] = b"\x00\x40"
    return bytes(wire)


@pytest.mark.parametrize("bad,kw,error", [
    (_bad_unknown_opcode(), {}, UnknownOpcode),
    (P.NopIn().to_bytes(), {}, UnknownOpcode),                 # a target opcode from the initiator
    (P.DataOut(data=bytes(9000)).to_bytes(), {}, SegmentTooLong),
    (_bad_header_digest(), {"header_digest": True}, HeaderDigestError),
    (_bad_data_digest(), {"data_digest": True}, DataDigestError),
    (_bad_ahs(), {}, MalformedPDU),
], ids=["unknown", "target-opcode", "too-long", "header-digest", "data-digest", "ahs"])
async def test_read_buffered_fails_like_read_pdu(bad, kw, error):
    """Same error, same header, same bytes consumed; the PDUs before it are kept."""
    first = P.NopOut(itt=1, cmdsn=1)
    after = P.NopOut(itt=2, cmdsn=2)
    hd, dd = kw.get("header_digest", False), kw.get("data_digest", False)
    wire = first.to_bytes(hd, dd) + bad + after.to_bytes(hd, dd)
    reader = asyncio.StreamReader()
    reader.feed_data(wire)
    got = P.read_buffered(reader, **kw)
    ref = asyncio.StreamReader()
    ref.feed_data(wire)
    assert await P.read_pdu(ref, **kw) == first
    with pytest.raises(error) as e:
        await P.read_pdu(ref, **kw)
    assert got[0] == first and len(got) == 2
    assert type(got[1]) is error and got[1].header == e.value.header and got[1].fatal == e.value.fatal
    assert bytes(reader._buffer) == bytes(ref._buffer)


async def test_read_buffered_resumes_a_paused_transport():
    """A burst far past the reader's limit (which pauses the transport) arrives whole
    when most of it is taken by read_buffered."""
    got = asyncio.Queue()

    async def handle(r, w):
        while True:
            for pdu in P.read_buffered(r):
                got.put_nowait(pdu)
            pdu = await P.read_pdu(r)
            if pdu is None:
                break
            got.put_nowait(pdu)
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, limit=4096)
    try:
        _, w = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        cmds = [P.ScsiCommand(itt=i, cmdsn=i, write=True, expected_length=4096, data=bytes([i & 0xFF]) * 4096)
                for i in range(200)]
        w.write(b"".join(c.to_bytes() for c in cmds))
        await w.drain()
        back = [await asyncio.wait_for(got.get(), 5) for _ in cmds]
        assert back == cmds
        w.close()
    finally:
        server.close()


# --- hand-packed response headers ---------------------------------------------------

@pytest.mark.parametrize("resid", [0, 512, -512])
@pytest.mark.parametrize("status", [ScsiStatus.GOOD, ScsiStatus.CHECK_CONDITION])
def test_encode_scsi_response_matches_the_pdu_class(status, resid):
    fast = P.encode_scsi_response(0xDEADBEEF, status, 7, 8, 40, 3, resid)
    ref = P.ScsiResponse(itt=0xDEADBEEF, status=status, statsn=7, expcmdsn=8, maxcmdsn=40, expdatasn=3,
                         underflow=resid > 0, overflow=resid < 0, residual=abs(resid)).header()
    assert fast == ref


@pytest.mark.parametrize("final", [False, True])
def test_encode_data_in_without_status_matches_the_pdu_class(final):
    lun = P.encode_lun(3)
    fast = P.encode_data_in(11, lun, 4096, 9, 10, 42, 2, 8192, final)
    ref = P.DataIn(itt=11, lun=lun, statsn=9, expcmdsn=10, maxcmdsn=42, datasn=2, buffer_offset=8192,
                   final=final, data=bytes(4096)).header()
    assert fast == ref


@pytest.mark.parametrize("resid", [0, 100, -100])
def test_encode_data_in_with_status_matches_the_pdu_class(resid):
    fast = P.encode_data_in(12, 0, 1000, 9, 10, 42, 0, 0, True, ScsiStatus.GOOD, resid)
    ref = P.DataIn(itt=12, statsn=9, expcmdsn=10, maxcmdsn=42, final=True, status_present=True,
                   status=ScsiStatus.GOOD, underflow=resid > 0, overflow=resid < 0, residual=abs(resid),
                   data=bytes(1000)).header()
    assert fast == ref
