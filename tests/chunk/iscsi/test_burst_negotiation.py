"""FirstBurstLength never exceeds MaxBurstLength (RFC 7143 §13.14), and the session runs with
the FirstBurstLength the initiator was told: over real TCP with hand-built Login Requests, the
login() of tests/chunk/iscsi/test_login.py."""

from __future__ import annotations

import pytest

from chunk.iscsi.constants import LoginStatus

from .test_login import LoginServer, Policy, failed_with, names

pytestmark = pytest.mark.timeout(60)


async def test_max_burst_alone_below_the_default_first_burst_gets_a_first_burst_offer():
    """The initiator lowers MaxBurstLength only: it still believes the default FirstBurstLength
    65536, so the target offers the smaller one and waits for the answer before transiting."""
    async with LoginServer(Policy()) as srv:
        c = await srv.connect()
        resp, keys = await c.step(names() + [("MaxBurstLength", "16384")], csg=1, nsg=3, transit=True)
        assert resp.status == 0 and not resp.transit
        assert (keys["MaxBurstLength"], keys["FirstBurstLength"]) == ("16384", "16384")
        resp, keys = await c.step([("FirstBurstLength", "8192")], csg=1, nsg=3, transit=True)
        assert resp.status == 0 and resp.transit and resp.nsg == 3
        p = (await srv.result()).params
        assert (p.max_burst_length, p.first_burst_length) == (16384, 8192)    # as said on the wire
        c.close()


async def test_max_burst_below_a_first_burst_agreed_earlier_fails_the_login():
    """FirstBurstLength=262144 answered 65536; MaxBurstLength=16384 in the next request would
    leave the first burst above the maximum, and it may not be negotiated again (§6.2): the
    login fails (initiator error) instead of running with 16384 where the initiator has 65536."""
    async with LoginServer(Policy()) as srv:
        c = await srv.connect()
        resp, keys = await c.step(names() + [("FirstBurstLength", "262144")], csg=1)
        assert resp.status == 0 and keys["FirstBurstLength"] == "65536"
        await failed_with(c, LoginStatus.INITIATOR_ERROR, [("MaxBurstLength", "16384")],
                          csg=1, nsg=3, transit=True)
        assert await srv.result() is None


async def test_both_in_one_request_need_no_second_round():
    """What initiators send (open-iscsi, libiscsi): both keys at once, answered consistently."""
    async with LoginServer(Policy()) as srv:
        c = await srv.connect()
        resp, keys = await c.step(names() + [("FirstBurstLength", "262144"), ("MaxBurstLength", "16384")],
                                  csg=1, nsg=3, transit=True)
        assert resp.status == 0 and resp.transit
        assert (keys["MaxBurstLength"], keys["FirstBurstLength"]) == ("16384", "16384")
        p = (await srv.result()).params
        assert (p.max_burst_length, p.first_burst_length) == (16384, 16384)
        c.close()
