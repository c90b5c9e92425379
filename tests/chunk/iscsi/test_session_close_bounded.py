"""A session that ends waits for its commands still running only so long (``close_grace``),
then cancels them: the target's stop (the chunk server's shutdown) cannot hang on a command
stuck below the SCSI layer."""

from __future__ import annotations

import asyncio
import struct
import time

import pytest

from chunk.iscsi import session as session_mod
from chunk.scsi import LogicalUnit, LunIdentity
from chunk.iscsi.target import IscsiTarget, TargetConfig
from tests.chunk.iscsi.raw_initiator import TUR, Initiator
from tests.chunk.iscsi.test_reinstatement import H1, TARGET, WWN, SlowDevice, fake_catalog
from tests.cluster import free_port

pytestmark = pytest.mark.timeout(30)


async def test_target_stop_cancels_a_command_stuck_past_the_close_grace(monkeypatch):
    monkeypatch.setattr(session_mod.Session, "close_grace", 0.5, raising=False)
    dev = SlowDevice(1 << 20)                 # its write waits for ``release``: never set
    unit = LogicalUnit(dev, LunIdentity(wwn=WWN, serial="vol-1", lun=1), power_on_ua=True)
    port = free_port()
    target = IscsiTarget(TargetConfig(port=port, nop_interval=3600, nop_timeout=3600), fake_catalog(),
                         open_device=None)
    from types import SimpleNamespace
    target.units = SimpleNamespace(get=lambda ex: unit, opened=lambda ex: unit, close=lambda: None)
    await target.start()
    a = None
    try:
        a = await Initiator.connect(port, TARGET, H1)
        await a.command(1, TUR)                                        # POWER ON
        a.send(1, struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0).ljust(16, b"\0"), b"\x5a" * 512)
        await asyncio.wait_for(dev.started.wait(), 5)
        t0 = time.monotonic()
        await asyncio.wait_for(target.stop(), 5)
        # close_grace (0.5 s) for the stuck write, then its cancel (bounded by close_grace
        # again): not the 10 s default, nor the wait_for's 5 s
        assert time.monotonic() - t0 < 3
        assert not target.sessions and dev.done == 0
    finally:
        if a is not None:
            a.close()
        dev.release.set()
        await target.stop()                   # a no-op when the test's own stop ran
