"""Bounded fuzzing of the PDU parser and the full-feature session (hypothesis).

Properties: arbitrary bytes never raise anything but ProtocolError from the
parser; arbitrary PDU sequences never crash a session — afterwards it either
still answers a NOP-Out or has closed the connection, and no exception escaped.
"""

from __future__ import annotations

import asyncio
import logging
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chunk.iscsi import pdu as P
from chunk.iscsi.errors import ProtocolError
from tests.chunk.iscsi.test_session import Harness, params

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(min_size=0, max_size=400), st.booleans(), st.booleans())
def test_parser_only_raises_protocol_errors(raw, hd, dd):
    try:
        P.decode_pdu(raw, header_digest=hd, data_digest=dd, max_recv_data_segment_length=1 << 16)
    except ProtocolError:
        pass


@FUZZ
@given(st.binary(min_size=48, max_size=48), st.binary(max_size=64))
def test_mutated_headers_of_every_opcode_parse_or_raise_protocol_errors(bhs, data):
    for opcode in P.PDU_CLASSES:
        raw = bytearray(bhs)
        raw[0] = (raw[0] & 0xC0) | opcode
        raw[4] = 0                                           # no AHS
        raw[5:8] = len(data).to_bytes(3, "big")
        try:
            P.decode_pdu(bytes(raw) + data + bytes(-len(data) % 4))
        except ProtocolError:
            pass


u32 = st.integers(0, 0xFFFFFFFF)
small = st.integers(0, 40)


def cdbs():
    op = st.sampled_from([0x28, 0x2A, 0x00, 0x12, 0xA0, 0xFF, 0x35, 0x9E])
    return st.builds(lambda o, rest: bytes([o]) + rest, op, st.binary(min_size=15, max_size=15))


pdus = st.one_of(
    st.builds(lambda itt, sn, cdb, r, w, edtl, data, imm, fin, lun: P.ScsiCommand(
        itt=itt, cmdsn=sn, cdb=cdb, read=r, write=w, expected_length=edtl, data=data, immediate=imm,
        final=fin, lun=P.encode_lun(lun)),
        u32, small, cdbs(), st.booleans(), st.booleans(), st.integers(0, 70000), st.binary(max_size=600),
        st.booleans(), st.booleans(), st.integers(0, 3)),
    st.builds(lambda itt, ttt, off, data, fin: P.DataOut(itt=itt, ttt=ttt, buffer_offset=off, data=data,
                                                          final=fin),
              small, st.one_of(st.just(P.RESERVED_TAG), u32), st.integers(0, 70000), st.binary(max_size=600),
              st.booleans()),
    st.builds(lambda itt, sn, imm, data: P.NopOut(itt=itt, cmdsn=sn, immediate=imm, data=data),
              u32, small, st.booleans(), st.binary(max_size=64)),
    st.builds(lambda itt, sn, fn, ref, lun: P.TaskMgmtRequest(itt=itt, cmdsn=sn, function=fn,
                                                               referenced_task_tag=ref, lun=P.encode_lun(lun)),
              u32, small, st.integers(0, 10), small, st.integers(0, 3)),
    st.builds(lambda itt, sn, data: P.TextRequest(itt=itt, cmdsn=sn, data=data),
              u32, small, st.binary(max_size=128)),
    st.builds(lambda itt: P.SnackRequest(itt=itt), u32),
)


@FUZZ
@given(st.lists(pdus, min_size=1, max_size=12))
def test_session_survives_arbitrary_pdu_sequences(seq):
    async def scenario():
        errors: list[logging.LogRecord] = []

        class Catch(logging.Handler):
            def emit(self, record):
                if record.levelno >= logging.ERROR:
                    errors.append(record)

        handler = Catch()
        logging.getLogger("chunk.iscsi").addHandler(handler)
        try:
            async with Harness(params()) as h:
                h.unit.release.set()
                for p in seq:
                    h.send(p)
                h.send(P.NopOut(itt=0x7777, cmdsn=0, immediate=True, data=b"still there?"))
                deadline = asyncio.get_running_loop().time() + 5
                alive = False
                while asyncio.get_running_loop().time() < deadline:
                    try:
                        got = await h.recv(timeout=max(deadline - asyncio.get_running_loop().time(), 0.01))
                    except (ProtocolError, asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError):
                        break
                    if got is None:
                        break                                  # closed cleanly
                    if isinstance(got, P.NopIn) and got.itt == 0x7777:
                        alive = True
                        break
                closed = h.r.at_eof() or not alive
                assert alive or closed
        finally:
            logging.getLogger("chunk.iscsi").removeHandler(handler)
        assert not errors, [e.getMessage() for e in errors]

    asyncio.run(scenario())


def test_lun_encoding_round_trips():
    for n in (0, 1, 255, 256, 16383):
        assert P.decode_lun(P.encode_lun(n)) == n
    assert struct.pack(">Q", P.encode_lun(1))[:2] == b"\x00\x01"
