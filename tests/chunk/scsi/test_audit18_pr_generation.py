"""PRgeneration is "a 32-bit wrapping counter" (SPC-4 6.16.2, READ KEYS): it wraps from
FFFFFFFFh to 0. It was a plain Python int, so once it passed 2**32 - 1 every PERSISTENT
RESERVE IN that reports it (READ KEYS, READ RESERVATION, READ FULL STATUS) failed packing
it, answered as an internal error instead of the data."""

from __future__ import annotations

import struct

import pytest

from .helpers import H1, H2, good, make_lu, prin, prout, prout_params, run

pytestmark = pytest.mark.timeout(60)

REGISTER, RESERVE, CLEAR, PREEMPT = 0, 1, 3, 4
K1, K2 = 0x1111, 0x2222


async def generation(lu, sa: int) -> int:
    return struct.unpack_from(">I", good(await run(lu, prin(sa), nexus=H1)))[0]


@pytest.mark.parametrize("sa, params, nexus", [
    (REGISTER, prout_params(0, K2), H2),                      # a new registration
    (REGISTER, prout_params(K1, K2), H1),                     # a key changed
    (CLEAR, prout_params(K1), H1),
    (PREEMPT, prout_params(K1, K2), H1),                      # registrations removed
], ids=["register", "change-key", "clear", "preempt"])
async def test_prgeneration_wraps_at_32_bits(sa, params, nexus):
    lu = make_lu()
    good(await run(lu, prout(REGISTER), prout_params(0, K1), nexus=H1))
    if sa == PREEMPT:
        good(await run(lu, prout(REGISTER), prout_params(0, K2), nexus=H2))
    lu.reservations.generation = 0xFFFFFFFF
    good(await run(lu, prout(sa, 1), params, nexus=nexus))
    for prin_sa in (0, 1, 3):                                 # READ KEYS, RESERVATION, FULL STATUS
        assert await generation(lu, prin_sa) == 0
