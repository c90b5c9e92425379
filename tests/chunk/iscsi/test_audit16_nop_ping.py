"""A target ping (NOP-In with a valid TTT) answered by a NOP-Out that copies the TTT and also
carries a valid ITT (a ping of its own, RFC 7143 §11.18.1: the ITT is valid when a NOP-In is
wanted back) is an answer: the connection stays, and the initiator's ping is answered."""

from __future__ import annotations

import asyncio

import pytest

from chunk.iscsi import pdu as P
from chunk.iscsi.constants import RESERVED_TAG
from tests.chunk.iscsi.test_session import Harness, params

pytestmark = pytest.mark.timeout(30)


def fast_ping(session) -> None:
    session.nop_interval, session.nop_timeout = 0.1, 0.3


async def test_a_ping_answered_by_a_nop_out_with_a_valid_itt_keeps_the_connection():
    async with Harness(params(), setup=fast_ping) as h:
        pings = answers = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.5           # several ping intervals and timeouts
        while loop.time() < deadline:
            nop = await h.recv(timeout=2)
            assert isinstance(nop, P.NopIn), f"connection dropped: {nop}"
            if nop.itt == RESERVED_TAG and nop.ttt != RESERVED_TAG:
                pings += 1
                h.send(P.NopOut(itt=0x50 + pings, ttt=nop.ttt, lun=nop.lun, immediate=True, cmdsn=1))
            else:
                assert nop.itt == 0x50 + pings and nop.ttt == RESERVED_TAG
                answers += 1
        assert pings >= 3 and answers >= pings - 1
        assert not h.session._closing            # noqa: SLF001
