"""WRITE AND VERIFY refuses the BYTCHK values SBC-4 reserves (10b, 11b) instead of writing."""

from __future__ import annotations

import pytest

from chunk.scsi.sense import field_pointer

from .helpers import check, good, make_lu, read10, run, rw10, rw12, rw16

CDBS = {"WRITE_VERIFY10": lambda f: rw10(0x2E, 4, 2, f),
        "WRITE_VERIFY12": lambda f: rw12(0xAE, 4, 2, f),
        "WRITE_VERIFY16": lambda f: rw16(0x8E, 4, 2, f)}
DATA = b"\xA5" * 1024


@pytest.mark.parametrize("bytchk", [0b10, 0b11])
@pytest.mark.parametrize("name", CDBS)
async def test_reserved_bytchk_is_an_invalid_field_and_writes_nothing(name, bytchk):
    lu = make_lu()
    cdb = CDBS[name](bytchk << 1)
    assert lu.data_out_length(cdb) == 0                 # no data solicited for it
    s = check(await run(lu, cdb, DATA), 0x5, 0x24, 0x00)
    assert s.sks == field_pointer(1, 2)                 # CDB byte 1, bit 2: BYTCHK
    assert good(await run(lu, read10(4, 2))) == bytes(1024)


@pytest.mark.parametrize("bytchk", [0b00, 0b01])
@pytest.mark.parametrize("name", CDBS)
async def test_defined_bytchk_writes(name, bytchk):
    lu = make_lu()
    cdb = CDBS[name](bytchk << 1)
    assert lu.data_out_length(cdb) == len(DATA)
    good(await run(lu, cdb, DATA))
    assert good(await run(lu, read10(4, 2))) == DATA
