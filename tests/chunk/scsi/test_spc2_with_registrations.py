"""RESERVE(6)/RELEASE(6) while persistent reservation registrations exist.

SPC-2 5.5.1: while any I_T nexus is registered, every RESERVE and every RELEASE conflicts,
whichever nexus sends it. SPC-3 5.6.3 (CRH=1, which REPORT CAPABILITIES reports) excepts the
persistent reservation holder and, under a registrants-only or all-registrants reservation,
every registered nexus: their RESERVE or RELEASE completes GOOD and changes nothing. LIO's
target_check_scsi2_reservation_conflict implements the same.

Before, RELEASE(6) answered GOOD from any nexus (an unregistered host was told its release
worked while registrations fenced it), and RESERVE(6) from the PR holder conflicted.

Each scenario runs on the in-memory state and on the state shared through a real etcd.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from chunk.scsi import Nexus
from chunk.shared_reservations import ReservationStore
from zstore.keys import Keys

from .helpers import H1, H2, good, make_lu, prin, prout, prout_params, read10, run, write10

RESERVE6, RELEASE6 = bytes((0x16,)) + bytes(5), bytes((0x17,)) + bytes(5)
K1, K2 = 0x1111, 0x2222
REGISTER, RESERVE = 0, 1
WE, WE_RO, EA_AR = 1, 5, 8
CONFLICT = 0x18
H3 = Nexus("iqn.2004-10.com.example:h3,i,0x23d000000003", H1.target_port, 2)


@pytest.fixture(params=["memory", "shared"])
async def new_lu(request, etcd_client, etcd_config):
    """A factory of LUs over a fresh reservation state: in memory, or in etcd."""
    if request.param == "memory":
        yield make_lu
        return
    stop = asyncio.Event()
    store = ReservationStore(etcd_client, Keys(etcd_config.prefix), "chunk-a")
    store.start(stop)
    try:
        await asyncio.wait_for(store.synced.wait(), 10)
        yield lambda: make_lu(reservations=store.state(str(uuid.uuid4())))
    finally:
        stop.set()
        await asyncio.wait_for(store.close(), 15)


async def register(lu, n: Nexus, key: int) -> None:
    good(await run(lu, prout(REGISTER), prout_params(0, key), nexus=n))


async def reserve(lu, n: Nexus, key: int, rtype: int) -> None:
    good(await run(lu, prout(RESERVE, rtype), prout_params(key), nexus=n))


async def reservation(lu) -> bytes:
    """READ RESERVATION's data, generation included: equal means nothing changed."""
    return good(await run(lu, prin(1), nexus=H1))


async def status(lu, cdb: bytes, n: Nexus) -> int:
    return (await run(lu, cdb, nexus=n)).status


async def test_any_registration_makes_reserve_and_release_conflict(new_lu):
    lu = new_lu()
    await register(lu, H2, K2)                        # registered, no reservation
    for n in (H1, H2):                                # unregistered, and registered
        assert await status(lu, RESERVE6, n) == CONFLICT
        assert await status(lu, RELEASE6, n) == CONFLICT
    assert (await run(lu, write10(0, 1), bytes(512), nexus=H1)).status == 0   # nothing reserved


async def test_the_pr_holder_gets_good_and_nothing_changes(new_lu):
    lu = new_lu()
    await register(lu, H1, K1)
    await register(lu, H2, K2)
    await reserve(lu, H1, K1, WE)
    before = await reservation(lu)
    good(await run(lu, RESERVE6, nexus=H1))
    # no SPC-2 reservation was taken: H3 may still read under WRITE EXCLUSIVE
    good(await run(lu, read10(0, 1), nexus=H3))
    good(await run(lu, RELEASE6, nexus=H1))
    assert await reservation(lu) == before            # the persistent reservation stays
    # a registrant that is not the holder, under WRITE EXCLUSIVE, and an unregistered nexus
    for n in (H2, H3):
        assert await status(lu, RESERVE6, n) == CONFLICT
        assert await status(lu, RELEASE6, n) == CONFLICT
    assert await reservation(lu) == before


@pytest.mark.parametrize("rtype", [WE_RO, EA_AR])
async def test_registrants_under_a_registrants_type_get_good_and_nothing_changes(new_lu, rtype):
    lu = new_lu()
    await register(lu, H1, K1)
    await register(lu, H2, K2)
    await reserve(lu, H1, K1, rtype)
    before = await reservation(lu)
    good(await run(lu, RESERVE6, nexus=H2))
    good(await run(lu, write10(0, 1), bytes(512), nexus=H1))   # H2 took no SPC-2 reservation
    good(await run(lu, RELEASE6, nexus=H2))
    assert await reservation(lu) == before
    assert await status(lu, RESERVE6, H3) == CONFLICT
    assert await status(lu, RELEASE6, H3) == CONFLICT


async def test_without_registrations_spc2_rules_apply_again(new_lu):
    lu = new_lu()
    await register(lu, H2, K2)
    assert await status(lu, RESERVE6, H1) == CONFLICT
    good(await run(lu, prout(REGISTER), prout_params(K2, 0), nexus=H2))   # unregister
    good(await run(lu, RESERVE6, nexus=H1))
    assert await status(lu, RESERVE6, H2) == CONFLICT
    good(await run(lu, RELEASE6, nexus=H2))           # a non-holder's RELEASE: GOOD, no effect
    assert (await run(lu, write10(0, 1), bytes(512), nexus=H2)).status == CONFLICT
    good(await run(lu, RELEASE6, nexus=H1))
    good(await run(lu, write10(0, 1), bytes(512), nexus=H2))
