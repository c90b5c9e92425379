"""A Logout waits for the connection's commands only ``close_grace``: one stuck below (a hung
replica, an ownership wait) is cancelled unanswered (RFC 7143 §11.14: the target terminates
pending commands; no responses follow), and the Logout Response is sent, last."""

from __future__ import annotations

import asyncio
import time

import pytest

from chunk.iscsi import pdu as P
from tests.chunk.iscsi.test_session import Harness, RecordingUnit, Result, params, read10, until

pytestmark = pytest.mark.timeout(30)

GRACE = 0.5


def blocking(itt: int, cmdsn: int, opcode: int = 0xFF) -> P.ScsiCommand:
    return P.ScsiCommand(itt=itt, cmdsn=cmdsn, lun=P.encode_lun(1),
                         cdb=bytes([opcode, itt]).ljust(16, b"\0"))


class StubbornUnit(RecordingUnit):
    """Opcode 0xFE: a write already on its way that outlives its cancel and then ends GOOD."""

    def __init__(self):
        super().__init__()
        self.late = asyncio.Event()

    async def execute(self, cdb, data_out, expected_length, nexus):
        if cdb[0] != 0xFE:
            return await super().execute(cdb, data_out, expected_length, nexus)
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            await self.late.wait()
        return Result(0)


def short_grace(session) -> None:
    session.close_grace = GRACE


async def running(h: Harness, itt: int):
    await until(lambda: itt in h.session.tasks and h.session.tasks[itt].runner is not None)
    return h.session.tasks[itt].runner


async def logout(h: Harness, itt: int, cmdsn: int) -> float:
    """Send a Logout; its response is the next PDU. Returns the seconds it took."""
    t0 = time.monotonic()
    h.send(P.LogoutRequest(itt=itt, cmdsn=cmdsn, reason=0))
    lo = await h.recv(timeout=10)
    assert isinstance(lo, P.LogoutResponse) and lo.response == 0 and lo.itt == itt
    return time.monotonic() - t0


async def test_logout_cancels_a_command_that_never_completes():
    async with Harness(params(), setup=short_grace) as h:
        h.send(blocking(itt=1, cmdsn=1))                   # its unit waits for ever
        runner = await running(h, 1)
        assert await logout(h, itt=2, cmdsn=2) < 3 * GRACE
        assert runner.cancelled()
        # no answer for the stuck command after the Logout Response: the target just closes
        assert await asyncio.wait_for(h.r.read(), 5) == b""
        await asyncio.wait_for(h.session._ended.wait(), 5)     # noqa: SLF001
        assert not h.session.tasks


async def test_a_command_ending_good_after_its_cancel_is_not_answered_after_the_logout():
    unit = StubbornUnit()
    try:
        async with Harness(params(), unit=unit, setup=short_grace) as h:
            h.send(blocking(itt=1, cmdsn=1, opcode=0xFE))
            runner = await running(h, 1)
            # close_grace to finish, then close_grace more for the cancel to take
            assert await logout(h, itt=2, cmdsn=2) < 3 * 2 * GRACE
            unit.late.set()                                 # it ends GOOD now: too late
            await asyncio.wait_for(runner, 5)
            assert await asyncio.wait_for(h.r.read(), 5) == b""
            await asyncio.wait_for(h.session._ended.wait(), 5)     # noqa: SLF001
    finally:
        unit.late.set()              # a failed run leaves no task that outlives its cancel


async def test_commands_that_complete_are_answered_before_the_logout():
    async with Harness(params()) as h:                      # the default close_grace (10 s)
        h.send(read10(0, 1, itt=1, cmdsn=1))
        h.send(blocking(itt=2, cmdsn=2))
        await running(h, 2)
        asyncio.get_running_loop().call_later(0.05, h.unit.release.set)
        h.send(P.LogoutRequest(itt=3, cmdsn=3, reason=0))
        got = [await h.recv() for _ in range(3)]
        assert isinstance(got[0], P.DataIn) and got[0].itt == 1 and got[0].status_present
        assert isinstance(got[1], P.ScsiResponse) and got[1].itt == 2 and got[1].status == 0
        assert isinstance(got[2], P.LogoutResponse) and got[2].response == 0
        assert await asyncio.wait_for(h.r.read(), 5) == b""
