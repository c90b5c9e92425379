"""START STOP UNIT and PREVENT ALLOW MEDIUM REMOVAL under persistent reservations.

SBC-4 table 13 ("SBC-4 commands that are allowed in the presence of various reservations";
SBC-3 has the same rows), columns: Write Exclusive, Exclusive Access (from any I_T nexus not
holding the reservation), RR all types from a registered I_T nexus, Write Exclusive - RR and
Exclusive Access - RR from an I_T nexus not registered (RR = Registrants Only or All
Registrants):

    START STOP UNIT with START=1 and POWER CONDITION=0h   Allowed  Allowed  Allowed  Allowed  Allowed
    START STOP UNIT with START=0 or POWER CONDITION!=0h  Conflict Conflict Allowed  Conflict Conflict
    PREVENT ALLOW MEDIUM REMOVAL (Prevent=0)              Allowed  Allowed  Allowed  Allowed  Allowed
    PREVENT ALLOW MEDIUM REMOVAL (Prevent!=0)             Conflict Conflict Allowed  Conflict Conflict

and "Commands from I_T nexuses holding a reservation should complete normally".
"""

from __future__ import annotations

import pytest

from chunk.scsi import Nexus

from .helpers import H1, H2, TUR, good, make_lu, prout, prout_params, run

K1, K2 = 0x1111, 0x2222
REGISTER, RESERVE = 0, 1
WE, EA, WE_RO, EA_RO, WE_AR, EA_AR = 1, 3, 5, 6, 7, 8
H3 = Nexus("iqn.2004-10.com.example:h3,i,0x23d000000003", H1.target_port, 2)   # not registered


def start_stop(b4: int) -> bytes:
    return bytes((0x1B, 0, 0, 0, b4, 0))


def prevent_allow(prevent: int) -> bytes:
    return bytes((0x1E, 0, 0, 0, prevent, 0))


START = start_stop(0x01)                      # START=1, POWER CONDITION=0h
STOP = start_stop(0x00)                       # START=0
STOP_NO_FLUSH = start_stop(0x04)              # START=0, NO_FLUSH
START_ACTIVE = start_stop(0x11)               # START=1, POWER CONDITION=1h (ACTIVE)
IDLE = start_stop(0x20)                       # START=0, POWER CONDITION=2h (IDLE)
ALLOW = prevent_allow(0)
PREVENT = prevent_allow(1)

ALWAYS_ALLOWED = [START, ALLOW]
RESTRICTED = [STOP, STOP_NO_FLUSH, START_ACTIVE, IDLE, PREVENT, prevent_allow(2), prevent_allow(3)]


async def reserved_lu(rtype: int):
    """H1 registered and holding a ``rtype`` reservation, H2 registered, H3 not."""
    lu = make_lu()
    good(await run(lu, prout(REGISTER), prout_params(0, K1), nexus=H1))
    good(await run(lu, prout(REGISTER), prout_params(0, K2), nexus=H2))
    good(await run(lu, prout(RESERVE, rtype), prout_params(K1), nexus=H1))
    return lu


def status(r) -> int:
    return r.status


@pytest.mark.parametrize("rtype", [WE, EA, WE_RO, EA_RO, WE_AR, EA_AR])
@pytest.mark.parametrize("cdb", ALWAYS_ALLOWED)
async def test_start_and_allow_are_allowed_from_every_nexus(rtype, cdb):
    lu = await reserved_lu(rtype)
    for n in (H1, H2, H3):
        good(await run(lu, cdb, nexus=n))


@pytest.mark.parametrize("cdb", RESTRICTED)
@pytest.mark.parametrize("rtype", [WE, EA])
async def test_stop_and_prevent_conflict_for_non_holders_of_write_or_exclusive(rtype, cdb):
    lu = await reserved_lu(rtype)
    good(await run(lu, cdb, nexus=H1))                                  # the holder
    assert status(await run(lu, cdb, nexus=H2)) == 0x18               # registered, not holder
    assert status(await run(lu, cdb, nexus=H3)) == 0x18               # not registered


@pytest.mark.parametrize("cdb", RESTRICTED)
@pytest.mark.parametrize("rtype", [WE_RO, EA_RO, WE_AR, EA_AR])
async def test_stop_and_prevent_allowed_for_registrants_only_under_rr(rtype, cdb):
    lu = await reserved_lu(rtype)
    good(await run(lu, cdb, nexus=H1))
    good(await run(lu, cdb, nexus=H2))                                  # registered: allowed
    assert status(await run(lu, cdb, nexus=H3)) == 0x18               # not registered


async def test_conflict_is_checked_before_the_cdb_fields():
    """A restricted START STOP UNIT with an invalid field from a non-holder gets RESERVATION
    CONFLICT (the check comes when processing begins, SPC-4 5.13.1), as any other command."""
    lu = await reserved_lu(WE)
    assert status(await run(lu, start_stop(0x02), nexus=H3)) == 0x18   # LOEJ, START=0


async def test_loej_does_not_make_a_start_restricted():
    """Table 13 goes by START and POWER CONDITION only: a non-holder's START=1 with LOEJ is
    not a conflict; it is refused for its field (the medium is not removable)."""
    lu = await reserved_lu(WE)
    r = await run(lu, start_stop(0x03), nexus=H3)
    assert status(r) == 0x02                                           # CHECK CONDITION
    assert r.sense[2] & 0x0F == 0x05                                   # ILLEGAL REQUEST


async def test_unchanged_without_a_reservation_and_under_spc2():
    lu = make_lu()
    for cdb in ALWAYS_ALLOWED + RESTRICTED:
        good(await run(lu, cdb, nexus=H3))
    good(await run(lu, bytes((0x16,)) + bytes(5), nexus=H1))            # RESERVE(6) by H1
    for cdb in ALWAYS_ALLOWED + RESTRICTED:
        good(await run(lu, cdb, nexus=H1))
        assert status(await run(lu, cdb, nexus=H2)) == 0x18
    assert status(await run(lu, TUR, nexus=H2)) == 0x18
