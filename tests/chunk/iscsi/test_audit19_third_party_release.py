"""A third-party RELEASE(10) through the real target, over TCP, from two iSCSI sessions.

The target makes no third-party reservation (a THIRD PARTY DEVICE ID names no iSCSI
initiator port: ``chunk.scsi.reservations.check_spc2_cdb``), so a RELEASE(10) with 3RDPTY
has nothing to release: it is GOOD and the SPC-2 reservation held by the other session (or
by the sender itself) stays in force, as the WRITEs and RESERVE that still conflict show.
"""

from __future__ import annotations

import struct

import pytest

from tests.chunk.iscsi.test_task_management import (RESERVE6, Served, read10, served,  # noqa: F401
                                                    two_hosts, write10)

pytestmark = pytest.mark.timeout(60)

GOOD, RESERVATION_CONFLICT = 0x00, 0x18
THIRD_PARTY = 0x10


def reserve10() -> bytes:
    return bytes([0x56]).ljust(16, b"\0")


def release10(byte1: int = 0, device_id: int = 0) -> bytes:
    return struct.pack(">BBBB3xHB", 0x57, byte1, 0, device_id, 0, 0).ljust(16, b"\0")


async def test_third_party_release_from_a_non_holder_is_good_and_releases_nothing(
        served: Served):  # noqa: F811
    a, b = await two_hosts(served)
    try:
        assert await a.command(1, reserve10()) == (GOOD, None)
        assert served.unit.reservations.spc2 is not None
        assert await b.command(1, write10(0, 1), b"\x5b" * 512) == (RESERVATION_CONFLICT, None)

        # B, not the holder, asks to release a third-party reservation for device 7 (and
        # for device 0): GOOD, and A's reservation is untouched
        for device_id in (7, 0):
            assert await b.command(1, release10(THIRD_PARTY, device_id)) == (GOOD, None)
            assert await b.command(1, write10(0, 1), b"\x5b" * 512) == \
                (RESERVATION_CONFLICT, None)
            assert await b.command(1, read10(0, 1), read=512) == (RESERVATION_CONFLICT, None)
            assert await b.command(1, reserve10()) == (RESERVATION_CONFLICT, None)

        # A's own third-party RELEASE(10) ends no third-party reservation (it made none) and
        # leaves its own logical-unit reservation in place
        assert await a.command(1, release10(THIRD_PARTY, 7)) == (GOOD, None)
        assert await b.command(1, write10(0, 1), b"\x5b" * 512) == (RESERVATION_CONFLICT, None)
        assert await a.command(1, write10(0, 1), b"\x5a" * 512) == (GOOD, None)

        # only A's plain RELEASE(10) ends it
        assert await a.command(1, release10()) == (GOOD, None)
        assert served.unit.reservations.spc2 is None
        assert await b.command(1, write10(0, 1), b"\x5b" * 512) == (GOOD, None)
        assert await b.command(1, RESERVE6) == (GOOD, None)
    finally:
        a.close()
        b.close()
