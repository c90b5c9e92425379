"""READ CAPACITY answers every nexus while another holds an SPC-2 RESERVE(6); TEST UNIT
READY, GET LBA STATUS and medium access still conflict."""

from __future__ import annotations

import struct

from .helpers import H1, H2, TUR, get_lba_status, good, make_lu, rc10, rc16, read10, run

RESERVE6 = bytes((0x16,)) + bytes(5)
RELEASE6 = bytes((0x17,)) + bytes(5)


async def test_read_capacity_is_allowed_under_another_nexus_reserve6():
    lu = make_lu(size=1 << 20)
    good(await run(lu, RESERVE6, nexus=H1))
    assert struct.unpack(">II", good(await run(lu, rc10(), nexus=H2))) == (2047, 512)
    assert struct.unpack_from(">QI", good(await run(lu, rc16(), nexus=H2))) == (2047, 512)


async def test_other_commands_still_conflict_under_another_nexus_reserve6():
    lu = make_lu()
    good(await run(lu, RESERVE6, nexus=H1))
    for cdb in (TUR, get_lba_status(0), read10(0, 1)):
        assert (await run(lu, cdb, nexus=H2)).status == 0x18, cdb.hex()
    good(await run(lu, get_lba_status(0), nexus=H1))           # the holder: everything
    good(await run(lu, RELEASE6, nexus=H1))
    good(await run(lu, TUR, nexus=H2))
