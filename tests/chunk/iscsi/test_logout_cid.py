"""A Logout that closes a connection other than the one it arrives on (RFC 7143 §11.14,
reason "close the connection" with another CID). We negotiate MaxConnections=1, so no such
connection exists in the session: the Response is "CID not found" (§11.15.1) and the session
and this connection go on. A Logout naming this connection's CID, or closing the session
(whose CID field is not valid, §11.14.3), still closes."""

from __future__ import annotations

import asyncio

import pytest

from chunk.iscsi import pdu as P
from chunk.iscsi.constants import LogoutReason, LogoutResponseCode
from tests.chunk.iscsi.raw_initiator import TUR, Initiator
from tests.chunk.iscsi.test_session import Harness, params, read10
from tests.chunk.iscsi.test_task_management import H1, TARGET, Served, served  # noqa: F401

pytestmark = pytest.mark.timeout(30)

THIS_CID = 1


def logged_in_as_cid_1(session) -> None:
    session.cid = THIS_CID            # what the target passes from the Login (LoginResult.cid)


async def logout(h: Harness, reason: int, cid: int) -> P.LogoutResponse:
    h.send(P.LogoutRequest(itt=0x40, cmdsn=1, reason=reason, cid=cid))
    resp = await h.recv()
    assert isinstance(resp, P.LogoutResponse) and resp.itt == 0x40, resp
    return resp


async def assert_still_serves(h: Harness) -> None:
    """The Logout took CmdSN 1; the next command (CmdSN 2) runs and is answered."""
    h.send(read10(0, 1, itt=0x41, cmdsn=2))
    d = await h.recv()
    assert isinstance(d, P.DataIn) and d.itt == 0x41 and d.status_present and d.status == 0, d
    assert not h.session._closing                  # noqa: SLF001


async def assert_closed(h: Harness) -> None:
    assert await asyncio.wait_for(h.r.read(), 5) == b""
    await asyncio.wait_for(h.session._ended.wait(), 5)     # noqa: SLF001


async def test_close_connection_for_another_cid_is_cid_not_found_and_the_session_goes_on():
    async with Harness(params(), setup=logged_in_as_cid_1) as h:
        resp = await logout(h, LogoutReason.CLOSE_CONNECTION, cid=THIS_CID + 1)
        assert resp.response == LogoutResponseCode.CID_NOT_FOUND
        await assert_still_serves(h)


async def test_close_connection_for_this_cid_closes():
    async with Harness(params(), setup=logged_in_as_cid_1) as h:
        resp = await logout(h, LogoutReason.CLOSE_CONNECTION, cid=THIS_CID)
        assert resp.response == LogoutResponseCode.SUCCESS
        await assert_closed(h)


async def test_close_session_closes_whatever_its_cid_field():
    async with Harness(params(), setup=logged_in_as_cid_1) as h:
        resp = await logout(h, LogoutReason.CLOSE_SESSION, cid=THIS_CID + 7)
        assert resp.response == LogoutResponseCode.SUCCESS
        await assert_closed(h)


async def test_remove_for_recovery_of_another_cid_is_still_recovery_not_supported():
    """ErrorRecoveryLevel 0: recovery is refused whatever the CID, as LIO does."""
    async with Harness(params(), setup=logged_in_as_cid_1) as h:
        resp = await logout(h, LogoutReason.REMOVE_CONNECTION_FOR_RECOVERY, cid=THIS_CID + 1)
        assert resp.response == LogoutResponseCode.RECOVERY_NOT_SUPPORTED
        await assert_still_serves(h)


async def test_through_the_real_target_the_login_cid_is_this_connection(served: Served):  # noqa: F811
    """The target tells the session its Login's CID (raw_login logs in with CID 1): a
    Logout closing CID 2 is "CID not found" and the session serves on; one closing CID 1
    ends it."""
    h = await Initiator.connect(served.port, TARGET, H1)
    try:
        await h.ready(1)
        for cid, answer in ((2, LogoutResponseCode.CID_NOT_FOUND), (1, LogoutResponseCode.SUCCESS)):
            h.itt += 1
            h.w.write(P.LogoutRequest(itt=h.itt, cmdsn=h.cmdsn, reason=LogoutReason.CLOSE_CONNECTION,
                                      cid=cid).to_bytes())
            h.cmdsn += 1
            resp = await h.pdu()
            assert isinstance(resp, P.LogoutResponse) and resp.response == answer, (cid, resp)
            if answer == LogoutResponseCode.CID_NOT_FOUND:
                assert (await h.transfer(1, TUR))[:2] == (0, None)
        assert await asyncio.wait_for(h.r.read(), 5) == b""
    finally:
        h.close()
