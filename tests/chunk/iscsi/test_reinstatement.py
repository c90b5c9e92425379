"""Session reinstatement (RFC 7143 §6.3.5) through the real target, login and SCSI layer.

A login with the ISID of a live session replaces it. The two sessions have the
same I_T nexus (a Nexus compares by value), so the old session's nexus loss must
be over before the new one runs a command: released later (the old session first
waits for its writes still on the replicas) it would drop the new session's
SPC-2 reservation and unit attentions and make the LU report POWER ON again.
"""

from __future__ import annotations

import asyncio
import struct
from types import SimpleNamespace

from chunk.blockdev import MemoryBlockDevice
from chunk.iscsi.target import IscsiTarget, TargetConfig
from chunk.scsi import LogicalUnit, LunIdentity
from tests.chunk.iscsi.raw_initiator import TUR, Initiator
from tests.cluster import free_port

TARGET = "iqn.2026-01.io.zstore:test.t0000"
H1 = "iqn.2004-10.com.example:h1"
WWN = "6" + "5a5354" + "0123456789abcdef012345678"
RESERVE6 = bytes([0x16]).ljust(16, b"\0")


class SlowDevice(MemoryBlockDevice):
    """Writes wait for ``release`` (a write slow on the replicas); no write fast path."""

    def __init__(self, size: int):
        super().__init__(size)
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.done = 0

    async def write(self, offset, data, fua=False):
        self.started.set()
        await self.release.wait()
        await super().write(offset, data, fua)
        self.done += 1


def fake_catalog():
    return SimpleNamespace(
        synced=True, generation=1, on_change=lambda fn: None,
        target=lambda iqn: object() if iqn == TARGET else None,
        chap_for=lambda target, initiator: None,
        lun_access=lambda target, initiator, lun: "lun1" if lun == 1 else None,
        visible_luns=lambda target, initiator: {},
        visible_targets=lambda initiator: [TARGET])


async def test_reinstatement_waits_for_the_old_session_before_the_new_one_runs():
    dev = SlowDevice(1 << 20)
    unit = LogicalUnit(dev, LunIdentity(wwn=WWN, serial="vol-1", lun=1), power_on_ua=True)
    port = free_port()
    target = IscsiTarget(TargetConfig(port=port, nop_interval=3600, nop_timeout=3600), fake_catalog(),
                         open_device=None)
    target.units = SimpleNamespace(get=lambda ex: unit, opened=lambda ex: unit, close=lambda: None)
    await target.start()
    try:
        a = await Initiator.connect(port, TARGET, H1)
        assert (await a.command(1, TUR))[0] == 2         # POWER ON
        assert await a.command(1, TUR) == (0, None)
        old = next(iter(target.sessions.values()))
        a.send(1, struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0).ljust(16, b"\0"), b"\x5a" * 512)
        await asyncio.wait_for(dev.started.wait(), 5)     # the write waits on the "replicas"

        b = await Initiator.connect(port, TARGET, H1)      # same ISID: reinstatement
        b.send(1, TUR)
        b.send(1, RESERVE6)
        try:    # answered only once the old session is gone (this wait: only for the old code)
            first = (await b.answer(timeout=0.5))[1:]
        except asyncio.TimeoutError:
            first = None
        dev.release.set()
        got = [first] if first else []
        while len(got) < 2:
            got.append((await b.answer())[1:])
        assert dev.done == 1
        while old.tsih in target.tsihs:                   # the old session has ended
            await asyncio.sleep(0.01)
        # The old nexus was lost before the new session's first command: POWER ON for it,
        # then its own reservation, which the old session's end never undoes.
        assert got[1] == (0, None) and unit.reservations.spc2 == next(iter(target.sessions.values())).nexus
        assert got[0] == (2, (0x06, 0x29, 0x00)), got
        assert await b.command(1, TUR) == (0, None)       # no spurious POWER ON
        assert dev.done == 1                              # the old session's write did land
        b.close()
        a.close()
    finally:
        await target.stop()


async def test_reinstatement_past_its_bound_releases_the_old_nexus_once_and_first():
    """The old session's write never finishes within ``reinstate_timeout``: the new session
    runs anyway, after the old nexus was released; the old session's end releases nothing."""
    dev = SlowDevice(1 << 20)
    unit = LogicalUnit(dev, LunIdentity(wwn=WWN, serial="vol-1", lun=1), power_on_ua=True)
    port = free_port()
    cfg = TargetConfig(port=port, nop_interval=3600, nop_timeout=3600)
    cfg.reinstate_timeout = 0.3
    target = IscsiTarget(cfg, fake_catalog(), open_device=None)
    target.units = SimpleNamespace(get=lambda ex: unit, opened=lambda ex: unit, close=lambda: None)
    await target.start()
    try:
        a = await Initiator.connect(port, TARGET, H1)
        assert (await a.command(1, TUR))[0] == 2
        old = next(iter(target.sessions.values()))
        a.send(1, struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0).ljust(16, b"\0"), b"\x5a" * 512)
        await asyncio.wait_for(dev.started.wait(), 5)
        b = await Initiator.connect(port, TARGET, H1)
        assert await b.command(1, TUR) == (2, (0x06, 0x29, 0x00))  # after the bound: a new nexus
        assert await b.command(1, RESERVE6) == (0, None)
        dev.release.set()
        while old.tsih in target.tsihs:
            await asyncio.sleep(0.01)
        assert unit.reservations.spc2 == next(iter(target.sessions.values())).nexus
        assert await b.command(1, TUR) == (0, None)
        b.close()
        a.close()
    finally:
        await target.stop()
