"""Third-party RESERVE/RELEASE, the same for the 6-byte and the 10-byte forms.

A third-party reservation (3RDPTY, CDB byte 1 bit 4: in RESERVE(10)/RELEASE(10) per SPC-2
7.21/7.23, in RESERVE(6)/RELEASE(6) per SCSI-2, obsolete there since SPC-2) reserves the LU
for another SCSI device named by a THIRD PARTY DEVICE ID. Such an ID names no iSCSI
initiator port, so none is ever made here:

* RESERVE with 3RDPTY, either length: ILLEGAL REQUEST, INVALID FIELD IN CDB, pointing at
  byte 1 bit 4; nothing is reserved. Taking it for the sender (LIO ignores the bit) would
  give the LU to the host that asked for it on another's behalf.
* RELEASE with 3RDPTY, either length: it ends only a third-party reservation this nexus made
  for that device; there is none, and releasing nothing is GOOD (as a non-holder's RELEASE).
  The sender's own reservation stays (LIO, ignoring the bit, releases it). With PR
  registrations it conflicts as every RELEASE does (SPC-2 5.5.1, SPC-3 5.6.3).

Before: RESERVE(6) with the bit reserved the LU for the sender, RELEASE(6) with it released
the sender's reservation, and RELEASE(10) with it answered CHECK CONDITION."""

from __future__ import annotations

import struct

import pytest

from chunk.scsi.sense import field_pointer

from .helpers import H1, H2, check, good, make_lu, read10, rsoc, run, write10
from .test_reserve10 import RELEASE10, RESERVE10, release10, reserve10
from .test_spc2_with_registrations import (CONFLICT, K1, RELEASE6, RESERVE6, WE_RO, new_lu,  # noqa: F401
                                           register, reserve)

pytestmark = pytest.mark.timeout(60)

ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB = 0x5, 0x24
DEVICE_ID = 5


def reserve6(byte1: int) -> bytes:
    return bytes((0x16, byte1, 0, 0, 0, 0))


def release6(byte1: int) -> bytes:
    return bytes((0x17, byte1, 0, 0, 0, 0))


# SCSI-2's RESERVE(6)/RELEASE(6) byte 1: 3RDPTY (bit 4), THIRD PARTY DEVICE ID (bits 3-1)
THIRD_PARTY_RESERVES = {
    "reserve6": reserve6(0x10 | DEVICE_ID << 1),
    "reserve10": reserve10(0x10, DEVICE_ID),
    "reserve10-longid": reserve10(0x12, 0, 8),
}
THIRD_PARTY_RELEASES = {
    "release6": release6(0x10 | DEVICE_ID << 1),
    "release10": release10(0x10, DEVICE_ID),
    "release10-longid": release10(0x12, 0, 8),
}


def _plen(cdb: bytes) -> int:
    return struct.unpack_from(">H", cdb, 7)[0] if cdb[0] in (0x56, 0x57) else 0


async def status(lu, cdb: bytes, n) -> int:
    return (await run(lu, cdb, nexus=n)).status


@pytest.mark.parametrize("cdb", THIRD_PARTY_RESERVES.values(), ids=THIRD_PARTY_RESERVES.keys())
async def test_a_third_party_reserve_is_refused_in_both_lengths(cdb):
    lu = make_lu()
    s = check(await run(lu, cdb, bytes(_plen(cdb)), nexus=H1), ILLEGAL_REQUEST,
              INVALID_FIELD_IN_CDB)
    assert s.sks == field_pointer(1, 4), hex(s.sks)
    # nothing was reserved for the sender: another host writes and reserves
    good(await run(lu, write10(0, 1), bytes(512), nexus=H2))
    good(await run(lu, RESERVE6, nexus=H2))


@pytest.mark.parametrize("cdb", THIRD_PARTY_RELEASES.values(), ids=THIRD_PARTY_RELEASES.keys())
async def test_a_third_party_release_is_good_and_leaves_the_senders_reservation(new_lu, cdb):  # noqa: F811
    lu = new_lu()
    good(await run(lu, cdb, bytes(_plen(cdb)), nexus=H1))        # no reservation at all: GOOD
    for own in (RESERVE6, RESERVE10):
        good(await run(lu, own, nexus=H1))
        good(await run(lu, cdb, bytes(_plen(cdb)), nexus=H1))    # the holder's: nothing released
        assert await status(lu, read10(0, 1), H2) == CONFLICT
        assert await status(lu, RESERVE6, H2) == CONFLICT
        good(await run(lu, cdb, bytes(_plen(cdb)), nexus=H2))    # another host's: the same
        assert await status(lu, read10(0, 1), H2) == CONFLICT
        good(await run(lu, RELEASE10 if own == RESERVE6 else RELEASE6, nexus=H1))
        good(await run(lu, read10(0, 1), nexus=H2))


@pytest.mark.parametrize("cdb", THIRD_PARTY_RELEASES.values(), ids=THIRD_PARTY_RELEASES.keys())
async def test_a_third_party_release_follows_the_registration_rules(new_lu, cdb):  # noqa: F811
    """SPC-2 5.5.1 / SPC-3 5.6.3, as for every RELEASE: with registrations an unregistered
    nexus conflicts; the PR holder's is GOOD and changes nothing."""
    lu = new_lu()
    await register(lu, H1, K1)
    assert (await run(lu, cdb, bytes(_plen(cdb)), nexus=H2)).status == CONFLICT
    await reserve(lu, H1, K1, WE_RO)
    good(await run(lu, cdb, bytes(_plen(cdb)), nexus=H1))
    assert await status(lu, write10(0, 1), H2) == CONFLICT       # the PR still fences H2


@pytest.mark.parametrize("opcode", [0x16, 0x17], ids=["reserve6", "release6"])
async def test_report_supported_operation_codes_marks_the_3rdpty_bit_of_the_6_byte_forms(opcode):
    d = good(await run(make_lu(), rsoc(1, opcode)))
    assert d[1] & 0x07 == 0x03 and struct.unpack_from(">H", d, 2)[0] == 6
    assert d[4:] == bytes((opcode, 0x10, 0, 0, 0, 0))


async def test_a_first_party_reserve6_still_ignores_the_lun_field():
    """SCSI-2's LUN field (byte 1 bits 7-5) is not looked at, as before (and as RSOC says):
    a RESERVE(6) without 3RDPTY is the sender's."""
    lu = make_lu()
    good(await run(lu, bytes((0x16, 0xE0, 0, 0, 0, 0)), nexus=H1))
    assert await status(lu, read10(0, 1), H2) == CONFLICT
    good(await run(lu, bytes((0x17, 0xE0, 0, 0, 0, 0)), nexus=H1))
    good(await run(lu, read10(0, 1), nexus=H2))
