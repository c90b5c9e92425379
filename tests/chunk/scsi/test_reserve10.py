"""RESERVE(10) / RELEASE(10) (SPC-2 7.21, 7.23): the 10-byte forms of RESERVE(6)/RELEASE(6),
still sent by older initiators. They act on the same SPC-2 reservation with the same rules
(conflicts, the holder's repeats, PR registrations, a read-only view); what they add, a
third-party reservation (3RDPTY, LONGID, a parameter list), is refused with ILLEGAL REQUEST,
INVALID FIELD IN CDB, except that a third-party RELEASE(10) is GOOD and releases nothing (see
test_audit18_third_party). REPORT SUPPORTED OPERATION CODES lists them with their usage data.

The reservation scenarios run on the in-memory state and on the state shared through a
real etcd (the ``new_lu`` fixture of test_spc2_with_registrations)."""

from __future__ import annotations

import struct

import pytest

from chunk.scsi.sense import field_pointer

from .helpers import H1, H2, check, good, make_lu, read10, rsoc, run, write10
from .test_reservations import _rw_and_ro_views
from .test_spc2_with_registrations import (CONFLICT, K1, K2, RELEASE6, RESERVE6, WE_RO, new_lu,  # noqa: F401
                                           register, reserve)

pytestmark = pytest.mark.timeout(60)

ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB = 0x5, 0x24


def reserve10(byte1: int = 0, device_id: int = 0, plen: int = 0) -> bytes:
    return struct.pack(">BBBB3xHB", 0x56, byte1, 0, device_id, plen, 0)


def release10(byte1: int = 0, device_id: int = 0, plen: int = 0) -> bytes:
    return struct.pack(">BBBB3xHB", 0x57, byte1, 0, device_id, plen, 0)


RESERVE10, RELEASE10 = reserve10(), release10()


async def status(lu, cdb: bytes, n) -> int:
    return (await run(lu, cdb, nexus=n)).status


async def test_reserve10_takes_the_reservation_reserve6_sees(new_lu):     # noqa: F811
    lu = new_lu()
    good(await run(lu, RESERVE10, nexus=H1))
    good(await run(lu, RESERVE10, nexus=H1))                  # the holder again: GOOD
    good(await run(lu, RESERVE6, nexus=H1))                   # the same reservation
    assert await status(lu, RESERVE10, H2) == CONFLICT
    assert await status(lu, RESERVE6, H2) == CONFLICT
    assert await status(lu, read10(0, 1), H2) == CONFLICT
    good(await run(lu, RELEASE10, nexus=H2))                  # a non-holder's: GOOD, no-op
    assert await status(lu, write10(0, 1), H2) == CONFLICT
    good(await run(lu, write10(0, 1), bytes(512), nexus=H1))
    good(await run(lu, RELEASE6, nexus=H1))                   # RELEASE(6) ends RESERVE(10)'s
    good(await run(lu, RESERVE6, nexus=H2))
    assert await status(lu, RESERVE10, H1) == CONFLICT
    good(await run(lu, RELEASE10, nexus=H2))                  # RELEASE(10) ends RESERVE(6)'s
    good(await run(lu, write10(0, 1), bytes(512), nexus=H1))


async def test_reserve10_and_release10_follow_the_registration_rules(new_lu):  # noqa: F811
    """SPC-2 5.5.1 / SPC-3 5.6.3 as for the 6-byte forms: with registrations, an unregistered
    nexus conflicts; the PR holder's RESERVE/RELEASE is GOOD and changes nothing."""
    lu = new_lu()
    await register(lu, H1, K1)
    assert await status(lu, RESERVE10, H2) == CONFLICT
    assert await status(lu, RELEASE10, H2) == CONFLICT
    await reserve(lu, H1, K1, WE_RO)
    good(await run(lu, RESERVE10, nexus=H1))
    good(await run(lu, RELEASE10, nexus=H1))
    assert await status(lu, write10(0, 1), H2) == CONFLICT     # the PR still fences H2
    await register(lu, H2, K2)
    good(await run(lu, write10(0, 1), bytes(512), nexus=H2))   # a registrant: no SPC-2 one taken


@pytest.mark.parametrize("byte1, device_id, plen, pointer", [
    (0x10, 5, 0, field_pointer(1, 4)),          # 3RDPTY: a reservation for another device
    (0x12, 0, 8, field_pointer(1, 4)),          # 3RDPTY with a long ID in a parameter list
    (0x02, 0, 0, field_pointer(1, 1)),          # LONGID
    (0x00, 0, 8, field_pointer(7)),             # a parameter list
], ids=["3rdpty", "3rdpty-longid", "longid", "parameter-list"])
async def test_third_party_forms_are_invalid_field_in_cdb(byte1, device_id, plen, pointer):
    lu = make_lu()
    s = check(await run(lu, reserve10(byte1, device_id, plen), bytes(plen), nexus=H1),
              ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)
    assert s.sks == pointer, hex(s.sks)
    good(await run(lu, RESERVE10, nexus=H2))                  # nothing was reserved for H1
    # a third-party RELEASE(10) releases nothing (test_audit18_third_party); the other
    # forms are refused, the holder's reservation left in place
    r = await run(lu, release10(byte1, device_id, plen), bytes(plen), nexus=H2)
    if byte1 & 0x10:
        good(r)
    else:
        s = check(r, ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)
        assert s.sks == pointer, hex(s.sks)
    assert await status(lu, read10(0, 1), H1) == CONFLICT


async def test_a_read_only_view_cannot_reserve10():
    rw, ro = _rw_and_ro_views()
    check(await run(ro, RESERVE10, nexus=H2), 0x7, 0x27)      # DATA PROTECT, WRITE PROTECTED
    good(await run(rw, write10(0, 1), bytes(512), nexus=H1))


async def test_nexus_loss_releases_a_reserve10_reservation():
    lu = make_lu()
    good(await run(lu, RESERVE10, nexus=H2))
    lu.nexus_lost(H2)
    good(await run(lu, write10(0, 1), bytes(512), nexus=H1))


@pytest.mark.parametrize("opcode", [0x56, 0x57], ids=["reserve10", "release10"])
async def test_report_supported_operation_codes_lists_them_with_usage_data(opcode):
    d = good(await run(make_lu(), rsoc(1, opcode)))
    assert d[1] & 0x07 == 0x03 and struct.unpack_from(">H", d, 2)[0] == 10
    assert d[4:] == bytes((opcode, 0x12, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0))
