"""The protocol library against real initiators (libiscsi's iscsi-ls and iscsi-inq).

A deliberately tiny target, written only with chunk.iscsi's codec, negotiator
and CHAP, logs the initiator in (optionally with one-way or mutual CHAP and
header digests), answers SendTargets, a standard INQUIRY and Logout. If these
tools accept its bytes, the PDU layouts, text encoding, negotiation answers and
CHAP math agree with an independent implementation.
"""

from __future__ import annotations

import asyncio
import shutil
import struct

import pytest

from chunk.iscsi import pdu as P
from chunk.iscsi.chap import ChapCredentials, ChapTarget, select_auth_method
from chunk.iscsi.constants import RESERVED_TAG, LoginStatus, ScsiStatus, Stage
from chunk.scsi.sense import ILLEGAL_REQUEST
from chunk.iscsi.errors import IscsiError, LoginError
from chunk.iscsi.negotiation import LoginNegotiator, TargetPreferences, negotiate_full_feature
from chunk.iscsi.text import TextAssembler, encode_text

pytestmark = pytest.mark.skipif(not (shutil.which("iscsi-ls") and shutil.which("iscsi-inq")),
                                reason="libiscsi-bin not installed")

TARGET = "iqn.2026-01.io.zstore:test.t0001"
INITIATOR = "iqn.2026-01.io.zstore:test.client"


class MiniTarget:
    """Just enough target to get a real initiator to full feature phase."""

    def __init__(self, chap: ChapCredentials | None = None,
                 mutual: ChapCredentials | None = None, prefs: TargetPreferences | None = None):
        self.chap, self.mutual, self.prefs = chap, mutual, prefs
        self.events: list[str] = []
        self.errors: list[IscsiError] = []
        self.port = 0

    async def __aenter__(self):
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()

    async def serve(self, reader, writer):
        self.statsn = 1000
        try:
            params = await self.login(reader, writer)
            if params is not None:
                await self.full_feature(reader, writer, params)
        except IscsiError as e:
            self.errors.append(e)
        finally:
            writer.close()

    def send(self, writer, pdu: P.PDU, hd=False, dd=False) -> None:
        writer.writelines(pdu.encode(hd, dd))

    async def login(self, reader, writer):
        neg = LoginNegotiator(self.prefs)
        text = TextAssembler()
        auth = ChapTarget(self.chap, self.mutual) if self.chap else None
        method = None
        while True:
            req = await P.read_pdu(reader, max_recv_data_segment_length=8192)
            if req is None:
                return None
            assert isinstance(req, P.LoginRequest)
            rsp = P.LoginResponse(isid=req.isid, itt=req.itt, statsn=self.statsn,
                                  expcmdsn=req.cmdsn, maxcmdsn=req.cmdsn + 32, csg=req.csg)
            try:
                pairs = text.feed(req.data, req.cont)
                if pairs is None:                    # more text to come: ask for it
                    self.send(writer, rsp)
                    continue
                answer, security = neg.process(pairs, Stage(req.csg))
                keys = dict(security)
                if "AuthMethod" in keys:
                    method = select_auth_method(keys["AuthMethod"],
                                                ["CHAP"] if auth else ["None"])
                    answer.append(("AuthMethod", method))
                    if method == "Reject":
                        raise LoginError("no acceptable AuthMethod",
                                         LoginStatus.AUTHENTICATION_FAILURE)
                if "CHAP_A" in keys:
                    answer += auth.challenge(keys["CHAP_A"])
                if "CHAP_R" in keys:
                    answer += auth.verify(keys)
                    self.events.append("chap-ok")
                if auth and not auth.authenticated and req.csg != Stage.SECURITY:
                    raise LoginError("CHAP required", LoginStatus.AUTHENTICATION_FAILURE)
                transit = req.transit and (req.csg != 0 or method == "None"
                                           or (auth is not None and auth.authenticated))
                if transit and req.nsg == Stage.FULL_FEATURE:
                    answer += neg.offers()
                    transit = not neg.awaiting_answers
            except LoginError as e:
                self.errors.append(e)
                rsp.status_class, rsp.status_detail = e.status >> 8, e.status & 0xFF
                self.send(writer, rsp)
                return None
            rsp.transit, rsp.nsg = transit, req.nsg if transit else 0
            rsp.data = encode_text(answer)
            if transit and req.nsg == Stage.FULL_FEATURE:
                rsp.tsih = 1
            self.send(writer, rsp)
            self.statsn += 1
            if rsp.tsih:
                self.events.append("logged-in")
                self.expcmdsn = req.cmdsn
                return neg.params()

    async def full_feature(self, reader, writer, params):
        hd, dd = params.header_digest, params.data_digest
        self.events.append(f"digests:{hd}:{dd}")
        while True:
            req = await P.read_pdu(reader, hd, dd, params.max_recv_data_segment_length)
            if req is None:
                return
            if not req.immediate:
                self.expcmdsn = req.cmdsn + 1
            common = dict(itt=req.itt, statsn=self.statsn, expcmdsn=self.expcmdsn,
                          maxcmdsn=self.expcmdsn + 32)
            self.statsn += 1
            if isinstance(req, P.TextRequest):
                answer, params, requests = negotiate_full_feature(
                    TextAssembler().feed(req.data, False), params)
                if ("SendTargets", "All") in requests:
                    answer += [("TargetName", TARGET),
                               ("TargetAddress", f"127.0.0.1:{self.port},1")]
                self.events.append("sendtargets")
                self.send(writer, P.TextResponse(ttt=RESERVED_TAG, data=encode_text(answer),
                                                 **common), hd, dd)
            elif isinstance(req, P.ScsiCommand) and req.cdb[0] == 0x12 and not req.cdb[1] & 1:
                inquiry = (bytes([0, 0, 6, 2, 31, 0, 0, 0]) + b"ZSTORE  "
                           + b"protocol-test   " + b"0001")
                alloc = struct.unpack_from(">H", req.cdb, 3)[0]
                data = inquiry[:min(alloc, req.expected_length)]
                self.events.append("inquiry")
                self.send(writer, P.DataIn(
                    final=True, status_present=True, status=ScsiStatus.GOOD, lun=req.lun,
                    ttt=RESERVED_TAG, datasn=0, buffer_offset=0,
                    underflow=len(data) < req.expected_length,
                    residual=req.expected_length - len(data), data=data, **common), hd, dd)
            elif isinstance(req, P.ScsiCommand) and req.cdb[0] == 0x00:   # TEST UNIT READY
                self.send(writer, P.ScsiResponse(status=ScsiStatus.GOOD, **common), hd, dd)
            elif isinstance(req, P.ScsiCommand):
                sense = bytes([0x70, 0, ILLEGAL_REQUEST, 0, 0, 0, 0, 10]) \
                    + bytes(4) + bytes([0x20, 0]) + bytes(4)
                self.send(writer, P.ScsiResponse(status=ScsiStatus.CHECK_CONDITION,
                                                 data=P.ScsiResponse.sense_segment(sense),
                                                 **common), hd, dd)
            elif isinstance(req, P.NopOut):
                self.send(writer, P.NopIn(ttt=RESERVED_TAG, lun=req.lun, data=req.data,
                                          **common), hd, dd)
            elif isinstance(req, P.LogoutRequest):
                self.events.append("logout")
                self.send(writer, P.LogoutResponse(time2wait=params.default_time2wait,
                                                   time2retain=params.default_time2retain,
                                                   **common), hd, dd)
                await writer.drain()
                return
            else:
                self.send(writer, P.Reject(reason=4, data=req.header()[:48], **common), hd, dd)


async def run(*argv: str, timeout: float = 20) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode(errors="replace")


async def test_iscsi_ls_discovery_session():
    async with MiniTarget() as t:
        code, out = await run("iscsi-ls", f"iscsi://127.0.0.1:{t.port}")
    assert code == 0, out
    assert f"Target:{TARGET} Portal:127.0.0.1:{t.port},1" in out
    assert t.events[:3] == ["logged-in", "digests:False:False", "sendtargets"]
    assert not t.errors


async def test_iscsi_inq_normal_session_with_header_digest():
    # iscsi-inq always offers HeaderDigest=None,CRC32C; a target that accepts only
    # CRC32C gets it, and every full feature PDU then carries a header digest.
    async with MiniTarget(prefs=TargetPreferences(header_digests=("CRC32C",))) as t:
        code, out = await run("iscsi-inq", "-i", INITIATOR,
                              f"iscsi://127.0.0.1:{t.port}/{TARGET}/0")
    assert code == 0, out
    assert "ZSTORE" in out and "protocol-test" in out
    assert "digests:True:False" in t.events and "inquiry" in t.events
    assert not t.errors


async def test_iscsi_inq_with_chap():
    creds = ChapCredentials("alice", "chap-secret-123")
    async with MiniTarget(chap=creds) as t:
        code, out = await run("iscsi-inq", "-i", INITIATOR,
                              f"iscsi://alice%chap-secret-123@127.0.0.1:{t.port}/{TARGET}/0")
    assert code == 0, out
    assert "chap-ok" in t.events and "inquiry" in t.events
    assert not t.errors


async def test_iscsi_inq_with_mutual_chap():
    async with MiniTarget(chap=ChapCredentials("alice", "chap-secret-123"),
                          mutual=ChapCredentials("zstore", "target-secret-456")) as t:
        code, out = await run(
            "iscsi-inq", "-i", INITIATOR,
            f"iscsi://alice%chap-secret-123@127.0.0.1:{t.port}/{TARGET}/0"
            "?target_user=zstore&target_password=target-secret-456")
    assert code == 0, out
    assert "chap-ok" in t.events and "inquiry" in t.events
    assert not t.errors


async def test_wrong_chap_secret_is_an_authentication_failure():
    async with MiniTarget(chap=ChapCredentials("alice", "chap-secret-123")) as t:
        code, out = await run("iscsi-inq", "-i", INITIATOR,
                              f"iscsi://alice%not-the-secret@127.0.0.1:{t.port}/{TARGET}/0")
    assert code != 0
    assert "Authentication failure" in out
    assert [e.status for e in t.errors] == [LoginStatus.AUTHENTICATION_FAILURE]
    assert "logged-in" not in t.events


async def test_mutual_chap_with_wrong_target_secret_is_refused_by_the_initiator():
    async with MiniTarget(chap=ChapCredentials("alice", "chap-secret-123"),
                          mutual=ChapCredentials("zstore", "target-secret-456")) as t:
        code, out = await run(
            "iscsi-inq", "-i", INITIATOR,
            f"iscsi://alice%chap-secret-123@127.0.0.1:{t.port}/{TARGET}/0"
            "?target_user=zstore&target_password=something-else")
    assert code != 0, out
    assert "chap-ok" in t.events and "inquiry" not in t.events
