"""Unit attentions per I_T nexus: power-on, capacity change, resets, REQUEST SENSE."""

from __future__ import annotations

from chunk.blockdev import FileBlockDevice, MemoryBlockDevice

from .helpers import (H1, H2, TUR, check, good, inquiry, make_lu, rc10, read10, request_sense,
                      run)

MiB = 1 << 20


async def test_power_on_ua_once_per_nexus():
    lu = make_lu(ua=True)
    good(await run(lu, inquiry()))                          # INQUIRY neither reports nor clears
    check(await run(lu, TUR), 0x6, 0x29, 0x00)
    good(await run(lu, TUR))
    check(await run(lu, read10(0, 1), nexus=H2), 0x6, 0x29, 0x00)   # H2 has its own
    good(await run(lu, read10(0, 1), nexus=H2))


async def test_power_on_ua_can_be_disabled():
    good(await run(make_lu(ua=False), TUR))


async def test_request_sense_returns_and_clears_the_ua():
    lu = make_lu(ua=True)
    d = good(await run(lu, request_sense()))
    assert len(d) == 18 and d[0] == 0x70 and d[2] == 0x06 and (d[12], d[13]) == (0x29, 0)
    good(await run(lu, TUR))
    d = good(await run(lu, request_sense()))
    assert d[2] == 0x00 and d[12:14] == b"\0\0"                       # NO SENSE
    assert good(await run(lu, request_sense(alloc=8))) == d[:8]
    check(await run(lu, bytes((0x03, 1, 0, 0, 18, 0))), 0x5, 0x24)   # DESC=1 unsupported


async def test_capacity_change_is_reported_to_every_nexus(tmp_path):
    with FileBlockDevice(tmp_path / "v", MiB) as dev:
        lu = make_lu(dev)
        good(await run(lu, TUR, nexus=H1))
        good(await run(lu, TUR, nexus=H2))
        dev.resize(2 * MiB)
        check(await run(lu, rc10()), 0x6, 0x2A, 0x09)
        assert good(await run(lu, rc10()))[:4] == (2 * MiB // 512 - 1).to_bytes(4, "big")
        check(await run(lu, TUR, nexus=H2), 0x6, 0x2A, 0x09)
        good(await run(lu, read10(2 * MiB // 512 - 1, 1), nexus=H2))  # the new end is readable


async def test_nexus_loss_makes_the_next_login_a_new_nexus():
    lu = make_lu(ua=True)
    check(await run(lu, TUR), 0x6, 0x29, 0x00)
    good(await run(lu, TUR))
    lu.nexus_lost(H1)
    check(await run(lu, TUR), 0x6, 0x29, 0x00)


async def test_uas_are_queued_in_order_without_duplicates():
    lu = make_lu()
    good(await run(lu, TUR))
    lu.post_unit_attention((0x3F, 0x0E))                    # REPORTED LUNS DATA HAS CHANGED
    lu.post_unit_attention((0x3F, 0x0E))
    lu.post_unit_attention((0x2A, 0x09), H1)
    check(await run(lu, TUR), 0x6, 0x3F, 0x0E)
    check(await run(lu, TUR), 0x6, 0x2A, 0x09)
    good(await run(lu, TUR))


async def test_lun_reset_notifies_every_nexus():
    lu = make_lu(MemoryBlockDevice(MiB))
    good(await run(lu, TUR, nexus=H1))
    good(await run(lu, TUR, nexus=H2))
    lu.reset(H1)
    check(await run(lu, TUR, nexus=H1), 0x6, 0x29, 0x03)
    check(await run(lu, TUR, nexus=H2), 0x6, 0x29, 0x03)
