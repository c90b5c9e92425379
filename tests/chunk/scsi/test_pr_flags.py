"""PR OUT parameter flags: ALL_TG_PT outside REGISTER, and APTPL.

SPC-4 6.16.3: ALL_TG_PT is ignored by every service action but REGISTER and REGISTER AND
IGNORE EXISTING KEY; it was refused on all of them, so a host setting it on RESERVE,
PREEMPT, RELEASE or CLEAR (some always send the same flags) could not reserve. APTPL was
refused although the shared state persists through restarts anyway; REPORT CAPABILITIES
now says so (PTPL_C=1: APTPL supported; PTPL_A=1: persist through power loss is active).
"""

from __future__ import annotations

import struct

from .helpers import H1, H2, TUR, check, good, make_lu, prin, run
from .test_reservations import H3, K1, K2, keys, out

REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_AND_ABORT, REGISTER_IGNORE = range(7)
WE, EA = 1, 3
ALL_TG_PT, APTPL = 0x04, 0x01


async def test_all_tg_pt_is_ignored_outside_the_register_actions():
    lu = make_lu()
    good(await out(lu, H1, REGISTER, 0, K1))
    good(await out(lu, H2, REGISTER, 0, K2))
    good(await out(lu, H1, RESERVE, K1, rtype=WE, flags=ALL_TG_PT))
    good(await out(lu, H1, RELEASE, K1, rtype=WE, flags=ALL_TG_PT))
    good(await out(lu, H1, RESERVE, K1, rtype=WE))
    good(await out(lu, H2, PREEMPT, K2, K1, rtype=EA, flags=ALL_TG_PT))
    assert (await keys(lu))[1] == [K2]
    check(await run(lu, TUR, nexus=H1), 0x6, 0x2A, 0x05)      # REGISTRATIONS PREEMPTED
    good(await out(lu, H1, REGISTER, 0, K1))
    good(await out(lu, H1, PREEMPT_AND_ABORT, K1, K2, rtype=WE, flags=ALL_TG_PT))
    check(await run(lu, TUR, nexus=H2), 0x6, 0x2A, 0x05)
    good(await out(lu, H2, REGISTER, 0, K2))
    good(await out(lu, H2, CLEAR, K2, flags=ALL_TG_PT))
    assert (await keys(lu))[1] == []


async def test_all_tg_pt_is_still_refused_on_register():
    lu = make_lu()
    check(await out(lu, H1, REGISTER, 0, K1, flags=ALL_TG_PT), 0x5, 0x26)        # ATP_C=0
    check(await out(lu, H1, REGISTER_IGNORE, 0, K1, flags=ALL_TG_PT), 0x5, 0x26)
    assert (await keys(lu))[1] == []


async def test_aptpl_is_accepted():
    lu = make_lu()
    good(await out(lu, H1, REGISTER, 0, K1, flags=APTPL))
    good(await out(lu, H1, REGISTER_IGNORE, 0, K2, flags=APTPL))
    good(await out(lu, H1, RESERVE, K2, rtype=WE, flags=APTPL))   # ignored outside REGISTER
    assert (await keys(lu))[1] == [K2]
    assert (await run(lu, TUR, nexus=H3)).status == 0


async def test_report_capabilities_says_persist_through_power_loss():
    lu = make_lu()
    caps = good(await run(lu, prin(2)))
    length, b2, b3, mask = struct.unpack_from(">HBBH", caps)
    assert length == 8
    assert b2 & 0x01                       # PTPL_C: APTPL supported
    assert b3 & 0x01                       # PTPL_A: persistence through power loss active
    assert b2 & 0x10 and not b2 & 0x0C     # CRH; no SIP_C, no ATP_C
    assert b3 & 0x80 and mask == 0xEA01    # TMV, every type
