"""WCE and SWP are not changeable by MODE SELECT.

The mode parameters lived in each LogicalUnit object: a host that set SWP=1 (write
protect) or WCE=0 (write-through) through one chunk server was obeyed by that server only
(any chunk server may serve a LUN; another host, or the same host after a redirect or a
restart, went on writing or caching through another). Neither is shared nor persistent,
so both are reported not changeable and a MODE SELECT changing them is refused with
INVALID FIELD IN PARAMETER LIST, as SPC-4 says for a field that is not changeable.
libiscsi's ModeSense6.Control-SWP skips itself when SWP is not changeable.
"""

from __future__ import annotations

from chunk.blockdev import MemoryBlockDevice

from .helpers import (H1, H2, TUR, check, good, make_lu, mode_select6, mode_select10, mode_sense6,
                      run, write10)

MiB = 1 << 20


def caching_page(wce: bool) -> bytes:
    p = bytearray(20)
    p[0], p[1], p[2] = 0x08, 0x12, 0x04 if wce else 0
    return bytes(p)


def control_page(swp: bool) -> bytes:
    p = bytearray(12)
    p[0], p[1], p[2], p[3], p[4] = 0x0A, 0x0A, 0x02, 0x10, 0x08 if swp else 0
    return bytes(p)


async def test_the_changeable_mask_has_neither_wce_nor_swp():
    lu = make_lu()
    caching = good(await run(lu, mode_sense6(0x08, pc=1, dbd=True)))
    assert caching[4:6] == bytes((0x08, 0x12)) and caching[6] & 0x04 == 0      # WCE
    control = good(await run(lu, mode_sense6(0x0A, pc=1, dbd=True)))
    assert control[4:6] == bytes((0x0A, 0x0A)) and control[8] & 0x08 == 0     # SWP
    every = good(await run(lu, mode_sense6(0x3F, pc=1, dbd=True)))
    assert not any(b for i, b in enumerate(every[4:]) if i not in (0, 1, 20, 21, 32, 33))


async def test_mode_select_setting_swp_is_refused_and_another_server_agrees():
    dev = MemoryBlockDevice(MiB)
    a, b = make_lu(dev), make_lu(dev)                        # one volume on two chunk servers
    params = bytes(4) + control_page(True)
    check(await run(a, mode_select6(len(params)), params, nexus=H1), 0x5, 0x26)   # INVALID FIELD IN PARAM LIST
    assert a.modes.swp is False
    good(await run(a, write10(0, 1), bytes(512), nexus=H1))
    good(await run(b, write10(0, 1), bytes(512), nexus=H2))
    assert not good(await run(a, mode_sense6(0x0A)))[2] & 0x80     # WP stays clear


async def test_mode_select_clearing_wce_is_refused():
    dev = MemoryBlockDevice(MiB)
    lu = make_lu(dev)
    good(await run(lu, TUR, nexus=H2))
    for params, cdb in ((bytes(4) + caching_page(False), mode_select6),
                        (bytes(8) + caching_page(False), mode_select10)):
        check(await run(lu, cdb(len(params)), params), 0x5, 0x26)
    assert lu.modes.wce is True
    assert good(await run(lu, mode_sense6(0x08, dbd=True)))[6] & 0x04
    good(await run(lu, write10(0, 1), bytes(512)))
    assert dev.fua_writes == 0                               # still write-back
    good(await run(lu, TUR, nexus=H2))                       # nothing changed: no attention


async def test_a_write_cache_off_lu_stays_off():
    lu = make_lu(write_cache=False)                          # set at creation, not by a host
    params = bytes(4) + caching_page(True)
    check(await run(lu, mode_select6(len(params)), params), 0x5, 0x26)
    good(await run(lu, mode_select6(len(bytes(4) + caching_page(False))), bytes(4) + caching_page(False)))
    assert lu.modes.wce is False
