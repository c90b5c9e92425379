"""Persistent reservations with two I_T nexuses, and SPC-2 RESERVE/RELEASE(6)."""

from __future__ import annotations

import asyncio
import struct

import pytest

from chunk.blockdev import MemoryBlockDevice
from chunk.scsi import Nexus
from chunk.scsi.reservations import transport_id
from tests.cluster import until

from .helpers import (H1, H2, TUR, check, good, make_lu, mode_sense6, prin, prout, prout_params,
                      rc10, read10, run, write10)

K1, K2 = 0x1111, 0x2222
REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_ABORT, REGISTER_IGNORE = range(7)
WE, EA, WE_RO, EA_RO, WE_AR, EA_AR = 1, 3, 5, 6, 7, 8
H3 = Nexus("iqn.2004-10.com.example:h3,i,0x23d000000003", H1.target_port, 2)


async def out(lu, nexus, sa, key=0, sark=0, rtype=0, flags=0):
    return await run(lu, prout(sa, rtype), prout_params(key, sark, flags), nexus=nexus)


async def register(lu, nexus, key):
    good(await out(lu, nexus, REGISTER, 0, key))


async def keys(lu, n=H2) -> tuple[int, list[int]]:
    d = good(await run(lu, prin(0), nexus=n))
    gen, n = struct.unpack_from(">II", d)
    return gen, [struct.unpack_from(">Q", d, 8 + i)[0] for i in range(0, n, 8)]


async def reservation(lu, n=H2):
    d = good(await run(lu, prin(1), nexus=n))
    gen, n = struct.unpack_from(">II", d)
    if not n:
        return None
    key, = struct.unpack_from(">Q", d, 8)
    return key, d[21]


async def can_read(lu, n):
    return (await run(lu, read10(0, 1), nexus=n)).status == 0


async def can_write(lu, n):
    return (await run(lu, write10(0, 1), bytes(512), nexus=n)).status == 0


async def test_register_read_keys_and_generation():
    lu = make_lu()
    assert await keys(lu) == (0, [])
    await register(lu, H1, K1)
    await register(lu, H2, K2)
    assert await keys(lu) == (2, [K1, K2])
    # re-REGISTER with a wrong reservation key conflicts and changes nothing
    assert (await out(lu, H1, REGISTER, 0x9999, 0x3333)).status == 0x18
    # unregistered nexus with a non-zero key conflicts
    assert (await out(lu, H3, REGISTER, 0x42, 0x43)).status == 0x18
    good(await out(lu, H1, REGISTER, K1, 0x3333))             # change key
    good(await out(lu, H2, REGISTER_IGNORE, 0, 0x4444))       # ignore existing key
    assert await keys(lu) == (4, [0x3333, 0x4444])
    good(await out(lu, H1, REGISTER, 0x3333, 0))              # unregister
    assert await keys(lu) == (5, [0x4444])


async def test_write_exclusive():
    lu = make_lu()
    await register(lu, H1, K1)
    await register(lu, H2, K2)
    good(await out(lu, H1, RESERVE, K1, rtype=WE))
    assert await reservation(lu) == (K1, WE)
    assert await can_write(lu, H1) and await can_read(lu, H1)
    assert await can_read(lu, H2) and await can_read(lu, H3)
    assert not await can_write(lu, H2) and not await can_write(lu, H3)
    assert (await run(lu, write10(0, 1), bytes(512), nexus=H2)).status == 0x18
    good(await run(lu, TUR, nexus=H3))                        # always allowed
    good(await run(lu, rc10(), nexus=H3))
    good(await run(lu, mode_sense6(0x3F), nexus=H3))
    # reserving again with the same type is fine; another type or holder conflicts
    good(await out(lu, H1, RESERVE, K1, rtype=WE))
    assert (await out(lu, H1, RESERVE, K1, rtype=EA)).status == 0x18
    assert (await out(lu, H2, RESERVE, K2, rtype=WE)).status == 0x18


async def test_exclusive_access():
    lu = make_lu()
    await register(lu, H1, K1)
    await register(lu, H2, K2)
    good(await out(lu, H1, RESERVE, K1, rtype=EA))
    assert not await can_read(lu, H2) and not await can_write(lu, H2)
    assert (await run(lu, mode_sense6(0x3F), nexus=H3)).status == 0x18
    good(await run(lu, TUR, nexus=H3))


@pytest.mark.parametrize("rtype", [WE_RO, EA_RO, WE_AR, EA_AR])
async def test_registrants_types(rtype):
    lu = make_lu()
    await register(lu, H1, K1)
    await register(lu, H2, K2)
    good(await out(lu, H1, RESERVE, K1, rtype=rtype))
    assert await can_write(lu, H2) and await can_read(lu, H2)   # registrants have access
    assert not await can_write(lu, H3)
    assert await can_read(lu, H3) == (rtype in (WE_RO, WE_AR))
    key, t = await reservation(lu)
    assert t == rtype and key == (0 if rtype in (WE_AR, EA_AR) else K1)


async def test_release_rules_and_unit_attention():
    lu = make_lu()
    await register(lu, H1, K1)
    await register(lu, H2, K2)
    good(await out(lu, H1, RESERVE, K1, rtype=WE_RO))
    good(await out(lu, H2, RELEASE, K2, rtype=WE_RO))         # not the holder: no-op
    assert await reservation(lu) == (K1, WE_RO)
    check(await out(lu, H1, RELEASE, K1, rtype=WE), 0x5, 0x26, 0x04)   # wrong type
    assert (await out(lu, H3, RELEASE, 0, rtype=WE_RO)).status == 0x18  # unregistered
    good(await out(lu, H1, RELEASE, K1, rtype=WE_RO))
    assert await reservation(lu, H1) is None
    check(await run(lu, TUR, nexus=H2), 0x6, 0x2A, 0x04)      # RESERVATIONS RELEASED
    good(await run(lu, TUR, nexus=H1))


async def test_unregistering_the_holder_releases():
    lu = make_lu()
    await register(lu, H1, K1)
    good(await out(lu, H1, RESERVE, K1, rtype=WE))
    good(await out(lu, H1, REGISTER, K1, 0))
    assert await reservation(lu) is None
    assert await can_write(lu, H2)


async def test_all_registrants_survive_until_the_last_one_leaves():
    lu = make_lu()
    await register(lu, H1, K1)
    await register(lu, H2, K2)
    good(await out(lu, H1, RESERVE, K1, rtype=WE_AR))
    good(await out(lu, H1, REGISTER, K1, 0))
    assert await reservation(lu) == (0, WE_AR)
    assert not await can_write(lu, H1) and await can_write(lu, H2)
    good(await out(lu, H2, REGISTER, K2, 0))
    assert await reservation(lu) is None


async def test_preempt_takes_over_and_notifies():
    lu = make_lu()
    await register(lu, H1, K1)
    await register(lu, H2, K2)
    await register(lu, H3, 0x3333)
    good(await out(lu, H1, RESERVE, K1, rtype=WE))
    gen = (await keys(lu))[0]
    good(await out(lu, H2, PREEMPT, K2, K1, rtype=EA))
    assert await reservation(lu) == (K2, EA)
    g2, ks = await keys(lu)
    assert g2 == gen + 1 and ks == [K2, 0x3333]
    check(await run(lu, TUR, nexus=H1), 0x6, 0x2A, 0x05)      # REGISTRATIONS PREEMPTED
    check(await run(lu, TUR, nexus=H3), 0x6, 0x2A, 0x04)      # type changed: RELEASED
    assert (await run(lu, read10(0, 1), nexus=H1)).status == 0x18
    # preempting a key nobody holds conflicts; SARK 0 against a non-AR holder is invalid
    assert (await out(lu, H2, PREEMPT, K2, 0x7777, rtype=EA)).status == 0x18
    check(await out(lu, H2, PREEMPT, K2, 0, rtype=EA), 0x5, 0x26)
    # PREEMPT AND ABORT behaves as PREEMPT; removes a plain registrant
    good(await out(lu, H2, PREEMPT_ABORT, K2, 0x3333, rtype=EA))
    assert (await keys(lu))[1] == [K2]


async def test_clear():
    lu = make_lu()
    await register(lu, H1, K1)
    await register(lu, H2, K2)
    good(await out(lu, H1, RESERVE, K1, rtype=EA))
    assert (await out(lu, H3, CLEAR, 0)).status == 0x18
    good(await out(lu, H2, CLEAR, K2))
    assert (await keys(lu))[1] == [] and await reservation(lu) is None
    check(await run(lu, TUR, nexus=H1), 0x6, 0x2A, 0x03)      # RESERVATIONS PREEMPTED
    good(await run(lu, TUR, nexus=H2))


async def test_unsupported_options_are_refused():
    lu = make_lu()
    check(await out(lu, H1, REGISTER, 0, K1, flags=0x04), 0x5, 0x26)    # ALL_TG_PT
    check(await out(lu, H1, REGISTER, 0, K1, flags=0x08), 0x5, 0x26)    # SPEC_I_PT
    check(await run(lu, prout(7), prout_params()), 0x5, 0x24)            # REGISTER AND MOVE
    check(await run(lu, prout(REGISTER, plen=20), bytes(20)), 0x5, 0x1A)
    await register(lu, H1, K1)
    check(await out(lu, H1, RESERVE, K1, rtype=2), 0x5, 0x24)            # no such type
    check(await run(lu, prout(RESERVE, WE, scope=1), prout_params(K1)), 0x5, 0x24)
    check(await run(lu, prin(4)), 0x5, 0x24)
    assert (await keys(lu))[1] == [K1]


async def test_report_capabilities_and_full_status():
    lu = make_lu()
    caps = good(await run(lu, prin(2)))
    assert caps == bytes((0, 8, 0x11, 0x81, 0xEA, 0x01, 0, 0))     # PTPL_C, PTPL_A: see test_pr_flags
    await register(lu, H1, K1)
    await register(lu, H3, K2)
    good(await out(lu, H1, RESERVE, K1, rtype=WE))
    d = good(await run(lu, prin(3)))
    gen, n = struct.unpack_from(">II", d)
    assert n == len(d) - 8
    pos, seen = 8, []
    while pos < len(d):
        key, flags, st, rel, tlen = struct.unpack_from(">Q4xBB4xHI", d, pos)
        tid = d[pos + 24:pos + 24 + tlen]
        seen.append((key, flags, st, rel, tid))
        pos += 24 + tlen
    assert seen[0] == (K1, 0x01, WE, 1, transport_id(H1.initiator))
    assert seen[1] == (K2, 0x00, 0, 2, transport_id(H3.initiator))
    tid = transport_id(H1.initiator)
    assert tid[0] == 0x45 and struct.unpack_from(">H", tid, 2)[0] == len(tid) - 4
    assert tid[4:].rstrip(b"\0") == H1.initiator.encode() and len(tid) % 4 == 0


async def test_prin_allocation_length_cuts():
    lu = make_lu()
    await register(lu, H1, K1)
    await register(lu, H2, K2)
    d = good(await run(lu, prin(0, alloc=12)))
    assert len(d) == 12 and struct.unpack_from(">I", d, 4)[0] == 16


async def test_spc2_reserve_release():
    lu = make_lu()
    good(await run(lu, bytes((0x16,)) + bytes(5)))            # RESERVE(6) by H1
    good(await run(lu, bytes((0x16,)) + bytes(5)))            # again: fine
    assert (await run(lu, bytes((0x16,)) + bytes(5), nexus=H2)).status == 0x18
    good(await run(lu, bytes((0x17,)) + bytes(5), nexus=H2))  # RELEASE by non-holder: no-op
    assert (await run(lu, mode_sense6(0x3F), nexus=H2)).status == 0x18
    assert (await run(lu, TUR, nexus=H2)).status == 0x18
    good(await run(lu, bytes((0x12, 0, 0, 0, 36, 0)), nexus=H2))   # INQUIRY always works
    assert (await run(lu, prin(0), nexus=H2)).status == 0x18
    good(await run(lu, mode_sense6(0x3F)))
    good(await run(lu, bytes((0x17,)) + bytes(5)))
    good(await run(lu, bytes((0x16,)) + bytes(5), nexus=H2))
    lu.nexus_lost(H2)                                          # logout releases it
    good(await run(lu, write10(0, 1), bytes(512)))


async def test_spc2_reserve_conflicts_with_registrations():
    lu = make_lu()
    await register(lu, H2, K2)
    assert (await run(lu, bytes((0x16,)) + bytes(5))).status == 0x18
    # SPC-2 5.5.1: with a registration in place every RELEASE conflicts too (SPC-3 5.6.3
    # excepts only the PR holder and registrants under a registrants-only/all-registrants type)
    assert (await run(lu, bytes((0x17,)) + bytes(5))).status == 0x18


async def test_lun_reset_drops_spc2_but_keeps_persistent_reservations():
    lu = make_lu()
    await register(lu, H1, K1)
    good(await out(lu, H1, RESERVE, K1, rtype=EA))
    lu.reset(H1)
    check(await run(lu, TUR, nexus=H1), 0x6, 0x29, 0x03)      # BUS DEVICE RESET, issuer too
    assert await reservation(lu, H1) == (K1, EA)
    lu2 = make_lu()
    good(await run(lu2, bytes((0x16,)) + bytes(5)))
    lu2.reset(H1)
    check(await run(lu2, TUR, nexus=H1), 0x6, 0x29, 0x03)
    good(await run(lu2, write10(0, 1), bytes(512), nexus=H2))


class _GatedDevice(MemoryBlockDevice):
    """Writes wait for ``gate`` while it is set: a write that is slow on the device."""

    def __init__(self, size: int):
        super().__init__(size)
        self.gate: asyncio.Event | None = None

    async def write(self, offset, data, fua=False):
        if self.gate is not None:
            await self.gate.wait()
        await super().write(offset, data, fua)


async def _until(cond, timeout: float = 5.0) -> None:
    """Let the loop run until ``cond()`` holds (each task step is one yield)."""
    await until(cond, "the condition", timeout, 0, message="condition not reached")


async def test_preempt_and_abort_lets_no_write_of_the_preempted_host_land_after_it():
    """PREEMPT AND ABORT answered GOOD while the preempted host's writes were still running
    or queued, and they then landed: fence_scsi and cluster managers rely on nothing of the
    fenced host reaching the disk after the PR OUT completes. A write already on the device
    now finishes first; one that arrived meanwhile gets RESERVATION CONFLICT."""
    dev = _GatedDevice(1 << 20)
    lu = make_lu(dev)
    await register(lu, H1, K1)
    await register(lu, H2, K2)
    good(await out(lu, H1, RESERVE, K1, rtype=WE_RO))
    dev.gate = asyncio.Event()
    on_device = asyncio.create_task(run(lu, write10(0, 1), b"\x01" * 512, nexus=H1))
    await _until(lambda: lu._inflight == 1)                          # H1's write is on the device
    preempt = asyncio.create_task(out(lu, H2, PREEMPT_ABORT, K2, K1, rtype=WE_RO))
    await _until(lambda: lu._exclusive is not None or preempt.done())
    queued = asyncio.create_task(run(lu, write10(1, 1), b"\x02" * 512, nexus=H1))
    await asyncio.sleep(0)                                           # it reaches its wait
    assert not preempt.done(), "PREEMPT AND ABORT completed with a write of H1 still running"
    dev.gate.set()
    good(await asyncio.wait_for(preempt, 5))
    assert on_device.done() and on_device.result().status == 0
    assert (await asyncio.wait_for(queued, 5)).status == 0x18
    assert bytes(await dev.read(512, 512)) == bytes(512)
    assert await reservation(lu) == (K2, WE_RO)
    assert not await can_write(lu, H1) and await can_write(lu, H2)


# --- a read-only grant sharing the volume's reservation state --------------------------

def _rw_and_ro_views():
    """The read-write LU of a volume and a read-only one (a read-only ACL entry, or a
    snapshot export's readers) over one reservation state, as the target builds them."""
    from chunk.scsi import LogicalUnit
    from .helpers import IDENT
    rw = make_lu()
    ro = LogicalUnit(MemoryBlockDevice(1 << 20, readonly=True), IDENT, power_on_ua=False,
                     reservations=rw.reservations)
    return rw, ro


async def test_a_read_only_view_cannot_reserve_or_preempt_the_writers_away():
    """A host granted read-only access took RESERVE(6) or a PR reservation, or preempted the
    writer's registration, and the read-write host's READ and WRITE then got RESERVATION
    CONFLICT: a read grant could lock every writer out."""
    rw, ro = _rw_and_ro_views()
    check(await run(ro, bytes((0x16,)) + bytes(5), nexus=H2), 0x7, 0x27)       # RESERVE(6)
    assert await can_write(rw, H1) and await can_read(rw, H1)
    await register(rw, H1, K1)
    await register(ro, H2, K2)                        # registering its own key stays allowed
    for sa, rtype in ((RESERVE, EA), (PREEMPT, EA), (PREEMPT_ABORT, EA), (CLEAR, 0)):
        check(await out(ro, H2, sa, K2, K1, rtype), 0x7, 0x27)
    assert await keys(rw) == (2, [K1, K2])            # nothing changed
    assert await reservation(rw) is None
    assert await can_write(rw, H1) and await can_read(rw, H1)
    good(await out(ro, H2, REGISTER, K2, 0))          # and unregistering it
    assert (await keys(rw))[1] == [K1]


async def test_a_read_only_view_still_reads_under_the_writers_reservation():
    rw, ro = _rw_and_ro_views()
    await register(rw, H1, K1)
    good(await out(rw, H1, RESERVE, K1, 0, WE))       # Write Exclusive: others may read
    assert await can_read(ro, H2)
    # RELEASE(6) from the unregistered reader while H1 is registered: SPC-2 5.5.1's conflict
    assert (await run(ro, bytes((0x17,)) + bytes(5), nexus=H2)).status == 0x18
