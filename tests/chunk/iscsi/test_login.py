"""login(): the target side of the iSCSI login phase, over real TCP on 127.0.0.1.

First with hand-built Login Requests (every status the target can answer),
then with libiscsi's iscsi-ls against a tiny test-only server that runs
login() and answers just enough of the full feature phase (SendTargets,
REPORT LUNS, Logout) for iscsi-ls to succeed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import struct
from dataclasses import dataclass, field

import pytest

from chunk.iscsi import pdu as P
from chunk.iscsi.chap import chap_response, decode_binary
from chunk.iscsi.constants import (RESERVED_TAG, TARGET_OPCODES, LoginStatus, LogoutResponseCode,
                                   ScsiStatus)
from chunk.iscsi.login import LoginResult, login
from chunk.iscsi.negotiation import TargetPreferences
from chunk.iscsi.text import decode_text, encode_text

pytestmark = pytest.mark.timeout(60)

TARGET = "iqn.2026-01.io.zstore:vol1"
INITIATOR = "iqn.2026-01.io.zstore.test:init1"
ISID = bytes.fromhex("80123456789a")
TSIH = 0x1234
STEP = 5.0                          # seconds any single exchange may take


@dataclass
class Secrets:
    user: str
    secret: str
    mutual_user: str | None = None
    mutual_secret: str | None = None

    def __repr__(self) -> str:
        return f"Secrets({self.user!r})"


@dataclass
class Policy:
    """A LoginPolicy with fixed answers that records what it was asked."""

    targets: tuple[str, ...] = (TARGET,)
    chap: Secrets | None = None
    redirect_to: str | None = None
    fail: bool = False
    calls: list[tuple] = field(default_factory=list)

    def target_exists(self, target_iqn):
        self.calls.append(("target_exists", target_iqn))
        return target_iqn in self.targets

    def chap_for(self, target_iqn, initiator):
        self.calls.append(("chap_for", target_iqn, initiator))
        if self.fail:
            raise RuntimeError("catalog unavailable")
        return self.chap

    def redirect(self, initiator, target_iqn):
        self.calls.append(("redirect", initiator, target_iqn))
        return self.redirect_to

    def new_tsih(self):
        return TSIH


class LoginServer:
    """Runs login() for every connection; ``after`` then serves a logged-in one."""

    def __init__(self, policy: Policy, prefs: TargetPreferences | None = None, after=None,
                 **login_kw):
        self.policy, self.prefs, self.after, self.kw = policy, prefs or TargetPreferences(), after, login_kw
        self.results: asyncio.Queue[LoginResult | None] = asyncio.Queue()
        self.tasks: set[asyncio.Task] = set()
        self.clients: list[Client] = []

    async def __aenter__(self) -> LoginServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        for c in self.clients:
            c.close()
        self.server.close()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()

    async def _handle(self, reader, writer) -> None:
        self.tasks.add(asyncio.current_task())
        try:
            result = await login(reader, writer, self.policy, self.prefs, **self.kw)
            await self.results.put(result)
            if result is not None and self.after is not None:
                await self.after(reader, writer, result, self)
        finally:
            writer.close()

    async def result(self) -> LoginResult | None:
        return await asyncio.wait_for(self.results.get(), STEP)

    async def connect(self) -> Client:
        c = Client(*await asyncio.open_connection("127.0.0.1", self.port))
        self.clients.append(c)
        return c


class Client:
    """Hand-built Login Requests; tracks ExpStatSN like an initiator would."""

    def __init__(self, reader, writer):
        self.r, self.w = reader, writer
        self.itt, self.cid, self.cmdsn, self.expstatsn = 0x10, 1, 5, 100

    async def send(self, pairs=(), *, csg: int, nsg: int = 0, transit: bool = False,
                   cont: bool = False, data: bytes | None = None, **fields) -> None:
        req = P.LoginRequest(transit=transit, cont=cont, csg=csg, nsg=nsg, isid=ISID,
                             itt=self.itt, cid=self.cid, cmdsn=self.cmdsn,
                             expstatsn=self.expstatsn,
                             data=encode_text(pairs) if data is None else data)
        for k, v in fields.items():
            setattr(req, k, v)
        self.w.write(req.to_bytes())
        await self.w.drain()

    async def recv(self) -> P.LoginResponse:
        resp = await asyncio.wait_for(P.read_pdu(self.r, opcodes=TARGET_OPCODES), STEP)
        assert isinstance(resp, P.LoginResponse), resp
        self.expstatsn = resp.statsn + 1
        return resp

    async def step(self, pairs=(), **kw) -> tuple[P.LoginResponse, dict[str, str]]:
        await self.send(pairs, **kw)
        resp = await self.recv()
        return resp, dict(decode_text(resp.data))

    async def closed(self) -> bool:
        """True once the target closed its side (EOF) with nothing more to read."""
        return await asyncio.wait_for(self.r.read(1), STEP) == b""

    def close(self) -> None:
        self.w.close()


def names(session: str = "Normal", target: str | None = TARGET) -> list[tuple[str, str]]:
    out = [("InitiatorName", INITIATOR), ("SessionType", session)]
    if target:
        out.append(("TargetName", target))
    return out


async def failed_with(c: Client, status: LoginStatus, pairs=(), **kw) -> dict[str, str]:
    resp, keys = await c.step(pairs, **kw)
    assert resp.status == status, f"{resp.status:#06x} != {status!r}"
    assert not resp.transit and not resp.cont
    assert await c.closed()
    return keys


# --- plain logins -------------------------------------------------------------------

async def test_operational_only_login_in_one_pdu():
    async with LoginServer(Policy()) as srv:
        c = await srv.connect()
        resp, keys = await c.step(names() + [("MaxRecvDataSegmentLength", "65536")],
                                  csg=1, nsg=3, transit=True)
        assert resp.status == 0 and resp.transit and (resp.csg, resp.nsg) == (1, 3)
        assert resp.tsih == TSIH and resp.isid == ISID and resp.itt == c.itt
        assert resp.statsn == 100                   # the first request's ExpStatSN
        assert (resp.expcmdsn, resp.maxcmdsn) == (5, 5 + 127)
        assert (resp.version_max, resp.version_active) == (0, 0)
        assert keys["TargetPortalGroupTag"] == "1"
        assert keys["MaxRecvDataSegmentLength"] == "262144"
        r = await srv.result()
        assert (r.isid, r.tsih, r.cid, r.statsn, r.expcmdsn) == (ISID, TSIH, 1, 101, 5)
        p = r.params
        assert (p.initiator_name, p.target_name, p.session_type) == (INITIATOR, TARGET, "Normal")
        assert p.max_send_data_segment_length == 65536
        c.close()


async def test_security_then_operational_stage():
    async with LoginServer(Policy()) as srv:
        c = await srv.connect()
        resp, keys = await c.step(names() + [("AuthMethod", "None")], csg=0, nsg=1, transit=True)
        assert resp.status == 0 and resp.transit and (resp.csg, resp.nsg) == (0, 1)
        assert resp.tsih == 0                       # TSIH only in the final response
        assert keys == {"AuthMethod": "None", "TargetPortalGroupTag": "1"}
        resp2, keys2 = await c.step([("HeaderDigest", "CRC32C,None"), ("ImmediateData", "Yes")],
                                    csg=1, nsg=3, transit=True)
        assert resp2.status == 0 and resp2.transit and resp2.nsg == 3 and resp2.tsih == TSIH
        assert resp2.statsn == resp.statsn + 1
        assert keys2["HeaderDigest"] == "CRC32C" and keys2["ImmediateData"] == "Yes"
        r = await srv.result()
        assert r.params.header_digest and r.statsn == resp2.statsn + 1
        c.close()


async def test_security_to_full_feature_request_goes_through_operational():
    """The target may pick a lower NSG; we always do, so our declarations get out."""
    async with LoginServer(Policy()) as srv:
        c = await srv.connect()
        resp, _ = await c.step(names() + [("AuthMethod", "None")], csg=0, nsg=3, transit=True)
        assert resp.transit and (resp.csg, resp.nsg) == (0, 1)
        resp, keys = await c.step([], csg=1, nsg=3, transit=True)
        assert resp.transit and resp.nsg == 3 and "MaxRecvDataSegmentLength" in keys
        assert (await srv.result()).tsih == TSIH
        c.close()


async def test_target_does_not_transit_before_the_initiator_asks():
    async with LoginServer(Policy()) as srv:
        c = await srv.connect()
        resp, _ = await c.step(names(), csg=1)
        assert resp.status == 0 and not resp.transit and resp.csg == 1
        resp, _ = await c.step([], csg=1, nsg=3, transit=True)
        assert resp.transit and resp.nsg == 3
        assert await srv.result() is not None
        c.close()


async def test_discovery_session_without_target_name():
    policy = Policy()
    async with LoginServer(policy) as srv:
        c = await srv.connect()
        resp, keys = await c.step(names("Discovery", None), csg=1, nsg=3, transit=True)
        assert resp.status == 0 and resp.transit
        assert "TargetPortalGroupTag" not in keys
        r = await srv.result()
        assert r.params.discovery and r.params.target_name is None
        assert ("chap_for", None, INITIATOR) in policy.calls
        assert ("redirect", INITIATOR, None) in policy.calls
        c.close()


async def test_operational_offers_are_answered_before_the_final_response():
    """HeaderDigest=CRC32C only is more than the RFC default: we must offer it and
    get an answer, so the initiator's first transit request gets T=0."""
    prefs = TargetPreferences(header_digests=("CRC32C",))
    async with LoginServer(Policy(), prefs) as srv:
        c = await srv.connect()
        resp, keys = await c.step(names(), csg=1, nsg=3, transit=True)
        assert resp.status == 0 and not resp.transit
        assert keys["HeaderDigest"] == "CRC32C"
        resp, keys = await c.step([("HeaderDigest", "CRC32C")], csg=1, nsg=3, transit=True)
        assert resp.transit and resp.nsg == 3
        assert (await srv.result()).params.header_digest
        c.close()


# --- CHAP -----------------------------------------------------------------------------

CHAP = Secrets("alice", "alice-secret-12")
MUTUAL = Secrets("alice", "alice-secret-12", "zstore", "target-secret-34")


async def chap_login(c: Client, secret: str, extra=()) -> tuple[P.LoginResponse, dict[str, str]]:
    """AuthMethod -> CHAP_A -> CHAP_N/CHAP_R the way open-iscsi orders it."""
    resp, keys = await c.step(names() + [("AuthMethod", "CHAP,None")], csg=0, nsg=1, transit=True)
    assert resp.status == 0 and not resp.transit and keys["AuthMethod"] == "CHAP"
    resp, keys = await c.step([("CHAP_A", "5")], csg=0, nsg=1, transit=True)
    assert resp.status == 0 and not resp.transit and keys["CHAP_A"] == "5"
    answer = chap_response(5, int(keys["CHAP_I"]), secret.encode(),
                           decode_binary(keys["CHAP_C"]))
    return await c.step([("CHAP_N", "alice"), ("CHAP_R", "0x" + answer.hex()), *extra],
                        csg=0, nsg=1, transit=True)


async def test_chap_md5_success():
    async with LoginServer(Policy(chap=CHAP)) as srv:
        c = await srv.connect()
        resp, keys = await chap_login(c, CHAP.secret)
        assert resp.status == 0 and resp.transit and (resp.csg, resp.nsg) == (0, 1)
        assert keys == {}
        resp, _ = await c.step([], csg=1, nsg=3, transit=True)
        assert resp.transit and resp.tsih == TSIH
        assert await srv.result() is not None
        c.close()


async def test_chap_wrong_secret_fails_and_closes():
    async with LoginServer(Policy(chap=CHAP)) as srv:
        c = await srv.connect()
        resp, _ = await chap_login(c, "not-the-secret")
        assert resp.status == LoginStatus.AUTHENTICATION_FAILURE and not resp.transit
        assert await c.closed()
        assert await srv.result() is None


async def test_chap_wrong_user_fails():
    async with LoginServer(Policy(chap=Secrets("bob", CHAP.secret))) as srv:
        c = await srv.connect()
        resp, _ = await chap_login(c, CHAP.secret)          # answers as "alice"
        assert resp.status == LoginStatus.AUTHENTICATION_FAILURE
        assert await srv.result() is None


async def test_mutual_chap():
    async with LoginServer(Policy(chap=MUTUAL)) as srv:
        c = await srv.connect()
        challenge = bytes(range(100, 116))
        resp, keys = await chap_login(c, MUTUAL.secret,
                                      [("CHAP_I", "77"), ("CHAP_C", "0x" + challenge.hex())])
        assert resp.status == 0 and resp.transit
        assert keys["CHAP_N"] == "zstore"
        expected = chap_response(5, 77, MUTUAL.mutual_secret.encode(), challenge)
        assert decode_binary(keys["CHAP_R"]) == expected
        resp, _ = await c.step([], csg=1, nsg=3, transit=True)
        assert resp.transit and resp.tsih == TSIH
        c.close()


async def test_mutual_chap_without_target_credentials_fails():
    async with LoginServer(Policy(chap=CHAP)) as srv:
        c = await srv.connect()
        resp, _ = await chap_login(c, CHAP.secret, [("CHAP_I", "1"), ("CHAP_C", "0x" + "ab" * 16)])
        assert resp.status == LoginStatus.AUTHENTICATION_FAILURE
        assert await c.closed()


async def test_unusable_chap_configuration_is_a_target_error():
    same = Secrets("alice", CHAP.secret, "zstore", CHAP.secret)   # RFC 7143 §12.1.3 forbids
    async with LoginServer(Policy(chap=same)) as srv:
        c = await srv.connect()
        await failed_with(c, LoginStatus.TARGET_ERROR, names() + [("AuthMethod", "CHAP")],
                          csg=0, nsg=1, transit=True)


async def test_chap_required_but_initiator_offers_none():
    async with LoginServer(Policy(chap=CHAP)) as srv:
        c = await srv.connect()
        await failed_with(c, LoginStatus.AUTHENTICATION_FAILURE, names() + [("AuthMethod", "None")],
                          csg=0, nsg=1, transit=True)


async def test_chap_required_but_initiator_skips_security_stage():
    async with LoginServer(Policy(chap=CHAP)) as srv:
        c = await srv.connect()
        await failed_with(c, LoginStatus.AUTHENTICATION_FAILURE, names(), csg=1, nsg=3, transit=True)
        c = await srv.connect()          # or transits out of security without AuthMethod
        await failed_with(c, LoginStatus.AUTHENTICATION_FAILURE, names(), csg=0, nsg=1, transit=True)


async def test_no_chap_needed_but_initiator_insists_on_chap_gets_reject():
    async with LoginServer(Policy()) as srv:
        c = await srv.connect()
        resp, keys = await c.step(names() + [("AuthMethod", "CHAP")], csg=0, nsg=1, transit=True)
        assert resp.status == 0 and keys["AuthMethod"] == "Reject"
        c.close()


async def test_chap_keys_without_chap_method_fail():
    async with LoginServer(Policy()) as srv:
        c = await srv.connect()
        await c.step(names() + [("AuthMethod", "None")], csg=0)
        await failed_with(c, LoginStatus.AUTHENTICATION_FAILURE, [("CHAP_A", "5")], csg=0)


async def test_secrets_and_responses_never_logged(caplog):
    caplog.set_level(logging.DEBUG)
    for secret in (MUTUAL.secret, "wrong-secret-99"):
        async with LoginServer(Policy(chap=MUTUAL)) as srv:
            c = await srv.connect()
            resp, keys = await chap_login(c, secret, [("CHAP_I", "9"), ("CHAP_C", "0x" + "cd" * 16)])
            c.close()
    assert "refused (AUTHENTICATION_FAILURE)" in caplog.text
    for s in (MUTUAL.secret, MUTUAL.mutual_secret, "wrong-secret-99", "cdcdcdcd"):
        assert s not in caplog.text


# --- redirect and refusals -----------------------------------------------------------------

async def test_redirect_before_security():
    policy = Policy(chap=CHAP, redirect_to="192.0.2.7:3261")
    async with LoginServer(policy) as srv:
        c = await srv.connect()
        keys = await failed_with(c, LoginStatus.TARGET_MOVED_TEMPORARILY,
                                 names() + [("AuthMethod", "CHAP,None")], csg=0, nsg=1, transit=True)
        assert keys == {"TargetAddress": "192.0.2.7:3261"}     # no ",tpgt", no TPGT key
        assert ("redirect", INITIATOR, TARGET) in policy.calls
        assert not any(call[0] == "chap_for" for call in policy.calls)
        assert await srv.result() is None


async def test_unknown_target_not_found():
    async with LoginServer(Policy()) as srv:
        c = await srv.connect()
        await failed_with(c, LoginStatus.NOT_FOUND, names(target="iqn.2026-01.io.zstore:nope"),
                          csg=1, nsg=3, transit=True)


async def test_missing_initiator_name():
    async with LoginServer(Policy()) as srv:
        c = await srv.connect()
        await failed_with(c, LoginStatus.MISSING_PARAMETER, [("TargetName", TARGET)],
                          csg=1, nsg=3, transit=True)


async def test_missing_target_name_in_normal_session():
    async with LoginServer(Policy()) as srv:
        c = await srv.connect()
        await failed_with(c, LoginStatus.MISSING_PARAMETER, names(target=None),
                          csg=1, nsg=3, transit=True)


async def test_unsupported_version():
    async with LoginServer(Policy()) as srv:
        c = await srv.connect()
        resp, _ = await c.step(names(), csg=1, nsg=3, transit=True, version_max=3, version_min=2)
        assert resp.status == LoginStatus.UNSUPPORTED_VERSION
        assert resp.version_active == 0                 # the lowest version we support
        assert await c.closed()


async def test_nonzero_tsih_session_does_not_exist():
    async with LoginServer(Policy()) as srv:
        c = await srv.connect()
        await failed_with(c, LoginStatus.SESSION_DOES_NOT_EXIST, names(), csg=1, nsg=3,
                          transit=True, tsih=99)


@pytest.mark.parametrize("flags", [dict(csg=0, nsg=0, transit=True),      # transit backwards
                                   dict(csg=1, nsg=2, transit=True),      # reserved stage
                                   dict(csg=3, nsg=3, transit=True),      # start in FFP
                                   dict(csg=1, nsg=3, transit=True, cont=True)])
async def test_invalid_stage_or_flags_initiator_error(flags):
    async with LoginServer(Policy()) as srv:
        c = await srv.connect()
        await failed_with(c, LoginStatus.INITIATOR_ERROR, names(), **flags)


async def test_stage_change_without_transit_is_an_error():
    async with LoginServer(Policy()) as srv:
        c = await srv.connect()
        resp, _ = await c.step(names() + [("AuthMethod", "None")], csg=0)
        assert not resp.transit
        await failed_with(c, LoginStatus.INITIATOR_ERROR, [], csg=1, nsg=3, transit=True)


async def test_changed_itt_is_an_error():
    async with LoginServer(Policy()) as srv:
        c = await srv.connect()
        await c.step(names(), csg=1)
        c.itt += 1
        await failed_with(c, LoginStatus.INITIATOR_ERROR, [], csg=1, nsg=3, transit=True)


async def test_negotiation_error_status():
    async with LoginServer(Policy()) as srv:
        c = await srv.connect()
        await failed_with(c, LoginStatus.INITIATOR_ERROR,
                          names() + [("MaxBurstLength", "65536"), ("MaxBurstLength", "8192")],
                          csg=1, nsg=3, transit=True)


async def test_security_key_in_operational_stage_is_an_error():
    async with LoginServer(Policy()) as srv:
        c = await srv.connect()
        await failed_with(c, LoginStatus.INITIATOR_ERROR, names() + [("AuthMethod", "None")],
                          csg=1, nsg=3, transit=True)


async def test_bad_text_is_an_initiator_error():
    async with LoginServer(Policy()) as srv:
        c = await srv.connect()
        await failed_with(c, LoginStatus.INITIATOR_ERROR, csg=1, data=b"InitiatorName\0")


async def test_policy_failure_is_a_target_error():
    async with LoginServer(Policy(fail=True)) as srv:
        c = await srv.connect()
        await failed_with(c, LoginStatus.TARGET_ERROR, names(), csg=1, nsg=3, transit=True)


async def test_non_login_pdu_during_login():
    async with LoginServer(Policy()) as srv:
        c = await srv.connect()
        await c.step(names(), csg=1)
        c.w.write(P.NopOut(itt=0x99, immediate=True).to_bytes())
        resp = await c.recv()
        assert resp.status == LoginStatus.INVALID_DURING_LOGIN
        assert await c.closed()
        assert await srv.result() is None


# --- C bit ----------------------------------------------------------------------------------

async def test_request_text_continued_over_pdus():
    text = encode_text(names() + [("MaxRecvDataSegmentLength", "16384")])
    async with LoginServer(Policy()) as srv:
        c = await srv.connect()
        resp, _ = await c.step(csg=1, cont=True, data=text[:20])    # cut inside a key
        assert resp.status == 0 and not resp.transit and not resp.cont and resp.data == b""
        resp, keys = await c.step(csg=1, nsg=3, transit=True, data=text[20:])
        assert resp.transit and keys["TargetPortalGroupTag"] == "1"
        assert (await srv.result()).params.max_send_data_segment_length == 16384
        c.close()


async def test_response_text_continued_over_pdus():
    """400 unknown keys need ~12 KiB of NotUnderstood: more than the 8192 bytes
    an initiator accepts per PDU during login, so the answer comes in pieces,
    each fetched with an empty request."""
    unknown = [(f"X-io.zstore.k{i:03}", "v") for i in range(400)]
    text = encode_text(names() + unknown)
    async with LoginServer(Policy()) as srv:
        c = await srv.connect()
        await c.step(csg=1, cont=True, data=text[:8000])
        await c.send(csg=1, nsg=3, transit=True, data=text[8000:])
        body, pieces = b"", []
        while True:
            resp = await c.recv()
            assert resp.status == 0 and len(resp.data) <= 8192
            body += resp.data
            pieces.append(resp)
            if not resp.cont:
                break
            assert not resp.transit
            await c.send(csg=1, nsg=3, transit=True, data=b"")
        assert len(pieces) == 2 and pieces[-1].transit and pieces[-1].tsih == TSIH
        keys = dict(decode_text(body))
        assert all(keys[k] == "NotUnderstood" for k, _ in unknown)
        assert [p.statsn for p in pieces] == [101, 102]
        assert (await srv.result()).statsn == 103
        c.close()


async def test_text_in_a_continuation_acknowledgement_is_an_error():
    unknown = [(f"X-io.zstore.k{i:03}", "v") for i in range(400)]
    text = encode_text(names() + unknown)
    async with LoginServer(Policy()) as srv:
        c = await srv.connect()
        await c.step(csg=1, cont=True, data=text[:8000])
        await c.send(csg=1, data=text[8000:])
        assert (await c.recv()).cont
        await failed_with(c, LoginStatus.INITIATOR_ERROR, [("X-more", "1")], csg=1)


# --- garbage, time and PDU bounds -------------------------------------------------------------

async def test_garbage_first_pdu_closes_without_answer():
    async with LoginServer(Policy()) as srv:
        c = await srv.connect()
        c.w.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".ljust(48, b"x"))
        assert await c.closed()
        assert await srv.result() is None


async def test_oversized_segment_closes():
    async with LoginServer(Policy()) as srv:
        c = await srv.connect()
        await c.send(csg=1, data=b"X-a=" + b"b" * 9000 + b"\0")
        assert await c.closed()
        assert await srv.result() is None


async def test_eof_before_first_pdu():
    async with LoginServer(Policy()) as srv:
        c = await srv.connect()
        c.w.write_eof()
        assert await c.closed()
        assert await srv.result() is None


async def test_first_pdu_timeout():
    async with LoginServer(Policy(), first_pdu_timeout=0.2) as srv:
        c = await srv.connect()
        assert await c.closed()
        assert await srv.result() is None


async def test_later_pdu_timeout_and_deadline():
    async with LoginServer(Policy(), pdu_timeout=0.2) as srv:
        c = await srv.connect()
        await c.step(names(), csg=1)
        assert await c.closed()
    async with LoginServer(Policy(), deadline=0.3) as srv:
        c = await srv.connect()
        await c.step(names(), csg=1)
        await asyncio.sleep(0.2)
        await c.step([], csg=1)
        assert await c.closed()


async def test_pdu_count_is_bounded():
    async with LoginServer(Policy(), max_pdus=4) as srv:
        c = await srv.connect()
        await c.step(names(), csg=1)
        for _ in range(4):
            resp, _ = await c.step([], csg=1)
        assert resp.status == LoginStatus.INITIATOR_ERROR
        assert await c.closed()


# --- real initiators: libiscsi's iscsi-ls -------------------------------------------------------

needs_libiscsi = pytest.mark.skipif(not shutil.which("iscsi-ls"), reason="libiscsi-bin missing")
LS_INITIATOR = "iqn.2026-01.io.zstore.test:iscsi-ls"


async def serve_minimal(reader, writer, result: LoginResult, srv: LoginServer) -> None:
    """Just enough full feature phase for iscsi-ls: SendTargets, REPORT LUNS (no
    LUNs), NOP and Logout; every other command gets CHECK CONDITION."""
    statsn, expcmdsn = result.statsn, result.expcmdsn
    hd, dd = result.params.header_digest, result.params.data_digest

    def send(pdu, status=True):
        nonlocal statsn
        pdu.statsn, pdu.expcmdsn, pdu.maxcmdsn = statsn, expcmdsn, expcmdsn + 31
        statsn += status
        writer.writelines(pdu.encode(hd, dd))

    while True:
        pdu = await asyncio.wait_for(P.read_pdu(reader, hd, dd, 262144), 30)
        if pdu is None:
            return
        if not pdu.immediate and hasattr(pdu, "cmdsn"):
            expcmdsn += 1
        if isinstance(pdu, P.TextRequest):
            body = [("TargetName", TARGET), ("TargetAddress", f"127.0.0.1:{srv.port},1")]
            if dict(decode_text(pdu.data)).get("SendTargets") is None:
                body = []
            send(P.TextResponse(itt=pdu.itt, data=encode_text(body)))
        elif isinstance(pdu, P.LogoutRequest):
            send(P.LogoutResponse(itt=pdu.itt, response=LogoutResponseCode.SUCCESS))
            await writer.drain()
            return
        elif isinstance(pdu, P.NopOut) and pdu.itt != RESERVED_TAG:
            send(P.NopIn(itt=pdu.itt, data=pdu.data))
        elif isinstance(pdu, P.ScsiCommand) and pdu.cdb[0] == 0xA0:       # REPORT LUNS
            data = struct.pack(">I4x", 0)[:pdu.expected_length]
            send(P.DataIn(itt=pdu.itt, final=True, status_present=True, status=ScsiStatus.GOOD,
                          data=data, underflow=pdu.expected_length > len(data),
                          residual=pdu.expected_length - len(data)))
        elif isinstance(pdu, P.ScsiCommand):
            sense = bytes([0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0])
            send(P.ScsiResponse(itt=pdu.itt, status=ScsiStatus.CHECK_CONDITION,
                                data=P.ScsiResponse.sense_segment(sense)))
        await writer.drain()


async def iscsi_ls(url: str, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "iscsi-ls", "-i", LS_INITIATOR, *args, url, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env={**os.environ, "LIBISCSI_CHAP_USERNAME": "",
                                               "LIBISCSI_CHAP_PASSWORD": ""})
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode(errors="replace")


@needs_libiscsi
async def test_iscsi_ls_discovery_and_normal_login():
    async with LoginServer(Policy(), after=serve_minimal) as srv:
        rc, out = await iscsi_ls(f"iscsi://127.0.0.1:{srv.port}", "-s")
        assert rc == 0, out
        assert f"Target:{TARGET} Portal:127.0.0.1:{srv.port},1" in out
        discovery, normal = await srv.result(), await srv.result()
        assert discovery.params.discovery and discovery.params.initiator_name == LS_INITIATOR
        assert normal.params.target_name == TARGET and not normal.params.discovery


@needs_libiscsi
async def test_iscsi_ls_with_chap():
    async with LoginServer(Policy(chap=CHAP), after=serve_minimal) as srv:
        rc, out = await iscsi_ls(f"iscsi://alice%{CHAP.secret}@127.0.0.1:{srv.port}", "-s")
        assert rc == 0, out
        assert f"Target:{TARGET}" in out
        rc, out = await iscsi_ls(f"iscsi://alice%wrong-secret-99@127.0.0.1:{srv.port}")
        assert rc != 0 and TARGET not in out, out
        rc, out = await iscsi_ls(f"iscsi://127.0.0.1:{srv.port}")          # no credentials
        assert rc != 0 and TARGET not in out, out


@needs_libiscsi
async def test_iscsi_ls_with_mutual_chap():
    async with LoginServer(Policy(chap=MUTUAL), after=serve_minimal) as srv:
        base = f"iscsi://alice%{MUTUAL.secret}@127.0.0.1:{srv.port}"
        rc, out = await iscsi_ls(f"{base}?target_user=zstore&target_password={MUTUAL.mutual_secret}")
        assert rc == 0, out
        assert f"Target:{TARGET}" in out
        # The initiator checks our answer: a different expected target secret fails.
        rc, out = await iscsi_ls(f"{base}?target_user=zstore&target_password=other-secret-56")
        assert rc != 0 and TARGET not in out, out


@dataclass
class RedirectNormal(Policy):
    """Serves discovery here, sends normal sessions to ``redirect_to``."""

    def redirect(self, initiator, target_iqn):
        self.calls.append(("redirect", initiator, target_iqn))
        return self.redirect_to if target_iqn else None


@needs_libiscsi
async def test_iscsi_ls_follows_redirect():
    """iscsi-ls discovers at the redirector, whose normal login answers 0x0101;
    libiscsi reconnects to the given address and lists the LUNs there."""
    async with LoginServer(Policy(), after=serve_minimal) as real:
        policy = RedirectNormal(redirect_to=f"127.0.0.1:{real.port}")
        async with LoginServer(policy, after=serve_minimal) as redirector:
            rc, out = await iscsi_ls(f"iscsi://127.0.0.1:{redirector.port}", "-s")
            assert rc == 0, out
            assert f"Target:{TARGET} Portal:127.0.0.1:{redirector.port},1" in out
            assert (await redirector.result()).params.discovery
            assert await redirector.result() is None                # the redirected login
            assert (await real.result()).params.target_name == TARGET


@needs_libiscsi
async def test_iscsi_ls_header_digest_takes_effect_after_login():
    """Digests are negotiated in login and used from the first full-feature PDU on."""
    async with LoginServer(Policy(), after=serve_minimal) as srv:
        rc, out = await iscsi_ls(f"iscsi://127.0.0.1:{srv.port}?header_digest=crc32c")
        assert rc == 0, out
        assert f"Target:{TARGET}" in out
        assert (await srv.result()).params.header_digest


async def test_a_connection_closed_before_any_pdu_is_a_probe_logged_at_debug(caplog):
    """The redirector's VIP holder probes every chunk portal with a TCP connect every 2 s: a
    connection closed before its first byte is logged at DEBUG, not as a dropped login at
    INFO (a line per chunk server every 2 s); one closed after a Login Request still is."""
    caplog.set_level(logging.DEBUG, logger="chunk.iscsi.login")
    async with LoginServer(Policy()) as srv:
        c = await srv.connect()
        c.close()
        assert await srv.result() is None
        probe = [r for r in caplog.records if "before a first PDU" in r.getMessage()]
        assert [r.levelno for r in probe] == [logging.DEBUG]
        caplog.clear()
        c = await srv.connect()
        await c.send(names(), csg=1, nsg=3, transit=False)
        await c.recv()
        c.close()
        assert await srv.result() is None
        dropped = [r for r in caplog.records if "dropped" in r.getMessage()]
        assert [r.levelno for r in dropped] == [logging.INFO]
