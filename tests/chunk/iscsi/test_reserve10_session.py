"""RESERVE(10) / RELEASE(10) (SPC-2 7.21, 7.23) through the real target: one host's
RESERVE(10) fences another host's session as RESERVE(6) does, RELEASE(10) lifts it, and a
third-party RESERVE(10) is refused with ILLEGAL REQUEST, INVALID FIELD IN CDB."""

from __future__ import annotations

import struct

import pytest

from tests.chunk.iscsi.test_task_management import RESERVE6, Served, served, two_hosts, write10  # noqa: F401

pytestmark = pytest.mark.timeout(60)

GOOD, CHECK_CONDITION, RESERVATION_CONFLICT = 0x00, 0x02, 0x18
INVALID_FIELD_IN_CDB = (0x05, 0x24, 0x00)


def reserve10(byte1: int = 0, device_id: int = 0) -> bytes:
    return struct.pack(">BBBB3xHB", 0x56, byte1, 0, device_id, 0, 0).ljust(16, b"\0")


def release10() -> bytes:
    return bytes([0x57]).ljust(16, b"\0")


async def test_reserve10_fences_the_other_session_until_release10(served: Served):  # noqa: F811
    a, b = await two_hosts(served)
    assert await a.command(1, reserve10(0x10, 7)) == (CHECK_CONDITION, INVALID_FIELD_IN_CDB)
    assert await b.command(1, write10(0, 1), b"\x5b" * 512) == (GOOD, None)   # nothing reserved
    assert await a.command(1, reserve10()) == (GOOD, None)
    assert await b.command(1, write10(0, 1), b"\x5b" * 512) == (RESERVATION_CONFLICT, None)
    assert await b.command(1, RESERVE6) == (RESERVATION_CONFLICT, None)
    assert await a.command(1, write10(0, 1), b"\x5a" * 512) == (GOOD, None)
    assert await a.command(1, release10()) == (GOOD, None)
    assert await b.command(1, write10(0, 1), b"\x5b" * 512) == (GOOD, None)
    assert await b.command(1, reserve10()) == (GOOD, None)
    assert await a.command(1, RESERVE6) == (RESERVATION_CONFLICT, None)
    a.close()
    b.close()
