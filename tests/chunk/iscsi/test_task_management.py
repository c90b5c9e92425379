"""Task management across sessions (SAM-5 7, SPC-4, RFC 7143 §11.5), through the real target.

Several sessions share one LU (multipath, or a cluster of hosts). LOGICAL UNIT RESET and
CLEAR TASK SET act on every task of the LU, whichever session sent it; ABORT TASK SET only
on the issuing nexus's own; a target reset on every LU of the target the issuer may access,
and a cold reset ends every session of the target. A task aborted by another session's TMF
gets no response, its Data-Out is dropped, its session learns the window it freed and is
told of the abort by a unit attention on its next command. Raw sessions on loopback, a
device whose I/O waits on an event so that commands are in flight when the TMF comes.
"""

from __future__ import annotations

import asyncio
import shutil
import struct
from types import SimpleNamespace

import pytest

from chunk.blockdev import MemoryBlockDevice
from chunk.iscsi import pdu as P
from chunk.iscsi.constants import TmfFunction, TmfResponse
from chunk.iscsi.target import IscsiTarget, TargetConfig
from chunk.scsi import LogicalUnit, LunIdentity
from tests.chunk.iscsi.raw_initiator import TUR, Initiator
from tests.cluster import free_port

TARGET = "iqn.2026-01.io.zstore:test.t0000"
H1 = "iqn.2004-10.com.example:h1"
H2 = "iqn.2004-10.com.example:h2"
ISID_A = bytes.fromhex("80aabbcc0001")
ISID_B = bytes.fromhex("80aabbcc0002")
WWN = "6" + "5a5354" + "0123456789abcdef012345678"
RESERVE6 = bytes([0x16]).ljust(16, b"\0")

BUS_DEVICE_RESET = (0x06, 0x29, 0x03)
COMMANDS_CLEARED = (0x06, 0x2F, 0x00)


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0).ljust(16, b"\0")


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0).ljust(16, b"\0")


class SlowDevice(MemoryBlockDevice):
    """Writes and reads wait for ``release`` while it is clear (I/O slow on the replicas)."""

    def __init__(self, size: int):
        super().__init__(size)
        self.release = asyncio.Event()
        self.release.set()
        self.waiting = 0
        self.writes = 0

    async def write(self, offset, data, fua=False):
        self.waiting += 1
        await self.release.wait()
        self.waiting -= 1
        await super().write(offset, data, fua)
        self.writes += 1

    async def read(self, offset, length):
        self.waiting += 1
        await self.release.wait()
        self.waiting -= 1
        return await super().read(offset, length)

    async def stalled(self, n: int = 1, timeout: float = 10.0) -> None:
        for _ in range(int(timeout / 0.005)):
            if self.waiting >= n:
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"{self.waiting} I/Os waiting after {timeout:g} s, expected {n}")


def fake_catalog():
    return SimpleNamespace(
        synced=True, generation=1, on_change=lambda fn: None,
        target=lambda iqn: object() if iqn == TARGET else None,
        chap_for=lambda target, initiator: None,
        lun_access=lambda target, initiator, lun: "lun1" if lun == 1 else None,
        visible_luns=lambda target, initiator: {1: SimpleNamespace(export_id="vol-1")},
        visible_targets=lambda initiator: [TARGET])


class Served:
    def __init__(self, target: IscsiTarget, dev: SlowDevice, unit: LogicalUnit, port: int):
        self.target, self.dev, self.unit, self.port = target, dev, unit, port

    def session(self, initiator: str):
        return next(s for (i, _, _), s in self.target.sessions.items() if i == initiator)


async def serve(window: int = 128) -> Served:
    dev = SlowDevice(1 << 20)
    unit = LogicalUnit(dev, LunIdentity(wwn=WWN, serial="vol-1", lun=1), power_on_ua=True)
    port = free_port()
    target = IscsiTarget(TargetConfig(port=port, nop_interval=3600, nop_timeout=3600, window=window),
                         fake_catalog(), open_device=None)
    target.units = SimpleNamespace(get=lambda ex: unit, opened=lambda ex: unit, close=lambda: None)
    await target.start()
    return Served(target, dev, unit, port)


@pytest.fixture
async def served():
    s = await serve()
    try:
        yield s
    finally:
        s.dev.release.set()
        await s.target.stop()


async def two_hosts(s: Served, same_initiator: bool = False) -> tuple[Initiator, Initiator]:
    a = await Initiator.connect(s.port, TARGET, H1, ISID_A)
    b = await Initiator.connect(s.port, TARGET, H1 if same_initiator else H2, ISID_B)
    await a.ready(1)
    await b.ready(1)
    return a, b


async def stall_writes(s: Served, a: Initiator) -> tuple[int, int, P.R2T]:
    """Two writes in flight in ``a``'s session: one running on the device, one waiting for
    its Data-Out (its R2T already sent)."""
    s.dev.release.clear()
    running = a.send(1, write10(0, 1), b"\x5a" * 512)
    await s.dev.stalled()
    solicited = a.send(1, write10(8, 8), edtl=4096)
    r2t = await a.pdu()
    assert isinstance(r2t, P.R2T) and r2t.itt == solicited, r2t
    return running, solicited, r2t


async def test_lun_reset_from_another_host_aborts_this_sessions_commands(served: Served):
    s = served
    a, b = await two_hosts(s)
    running, solicited, r2t = await stall_writes(s, a)
    reset = b.tmf(1, TmfFunction.LOGICAL_UNIT_RESET)
    # RFC 7143: the response only once every affected task is done (the running write too)
    await b.quiet(0.3)
    s.dev.release.set()
    resp = await b.pdu()
    assert isinstance(resp, P.TaskMgmtResponse) and resp.itt == reset, resp
    assert resp.response == TmfResponse.FUNCTION_COMPLETE
    assert s.dev.writes == 1                  # the running write finished before the response
    assert not s.session(H1).tasks

    # Session a: no answer for the aborted writes; their Data-Out still coming is dropped
    # (not a protocol error ending the session); the next command reports the reset.
    a.data_out(r2t, b"\xa5" * 4096)
    await a.quiet(0.2)
    assert a.nops, "the session was never told the window the aborted commands freed"
    assert await a.command(1, TUR) == (2, BUS_DEVICE_RESET)
    assert await a.command(1, TUR) == (0, None)
    assert await a.command(1, write10(16, 1), b"\x11" * 512) == (0, None)  # CmdSN went on
    # the issuer's nexus has it too (SAM-5: every nexus)
    assert await b.command(1, TUR) == (2, BUS_DEVICE_RESET)
    assert await b.command(1, TUR) == (0, None)
    assert s.dev.writes == 2


async def test_clear_task_set_clears_every_nexus_and_tells_the_others(served: Served):
    """Multipath: one initiator, two sessions (two I_T nexuses). CLEAR TASK SET from one
    aborts the other's commands, which gets COMMANDS CLEARED BY ANOTHER INITIATOR (TAS=0);
    no reset happened: the issuer gets no unit attention."""
    s = served
    a, b = await two_hosts(s, same_initiator=True)
    s.dev.release.clear()
    reads = [a.send(1, read10(i, 1), read=512) for i in range(3)]
    await s.dev.stalled(3)
    clear = b.tmf(1, TmfFunction.CLEAR_TASK_SET)
    await b.quiet(0.2)
    s.dev.release.set()
    resp = await b.pdu()
    assert isinstance(resp, P.TaskMgmtResponse) and resp.itt == clear, resp
    assert resp.response == TmfResponse.FUNCTION_COMPLETE
    await a.quiet(0.2)                        # none of the reads is answered
    assert reads and a.nops
    assert await a.command(1, TUR) == (2, COMMANDS_CLEARED)
    assert await a.command(1, read10(0, 1), read=512) == (0, None)
    assert await b.command(1, TUR) == (0, None)


async def test_abort_task_set_stays_with_the_issuing_nexus(served: Served):
    s = served
    a, b = await two_hosts(s)
    s.dev.release.clear()
    running = a.send(1, write10(0, 1), b"\x5a" * 512)
    await s.dev.stalled()
    abort = b.tmf(1, TmfFunction.ABORT_TASK_SET)
    resp = await b.pdu()
    assert isinstance(resp, P.TaskMgmtResponse) and resp.itt == abort, resp
    assert resp.response == TmfResponse.FUNCTION_COMPLETE
    s.dev.release.set()
    assert await a.answer() == (running, 0, None)
    assert await a.command(1, TUR) == (0, None)
    assert await b.command(1, TUR) == (0, None)


async def test_lun_reset_frees_a_full_window_in_the_other_session():
    """The aborted commands had filled ``a``'s window: it may send nothing until told a new
    MaxCmdSN, and they get no response, so the target says it with a NOP-In."""
    s = await serve(window=4)
    try:
        a, b = await two_hosts(s)
        # the login grants what the session takes: a window of 4, not 128
        assert (a.login.maxcmdsn - a.login.expcmdsn) & 0xFFFFFFFF == 3
        s.dev.release.clear()
        for i in range(4):
            a.send(1, write10(i, 1), b"\x5a" * 512)
        await s.dev.stalled(4)
        assert a.cmdsn - 1 == a.maxcmdsn       # the window is full
        reset = b.tmf(1, TmfFunction.LOGICAL_UNIT_RESET)
        await b.quiet(0.2)
        s.dev.release.set()
        resp = await b.pdu()
        assert isinstance(resp, P.TaskMgmtResponse) and resp.itt == reset, resp
        await a.quiet(0.2)
        assert a.nops and ((a.maxcmdsn - a.cmdsn) & 0xFFFFFFFF) < 0x80000000
        assert (a.maxcmdsn - a.cmdsn + 1) & 0xFFFFFFFF == 4      # the whole window again
        assert await a.command(1, TUR) == (2, BUS_DEVICE_RESET)
        for i in range(4):                        # the window keeps moving
            assert await a.command(1, write10(i, 1), b"\x22" * 512) == (0, None)
    finally:
        s.dev.release.set()
        await s.target.stop()


async def test_lun_reset_aborts_a_command_held_for_its_cmdsn_turn(served: Served):
    """A command that came ahead of its CmdSN turn in the other session (held, not yet run)
    is aborted too, and keeps its CmdSN: once the gap fills the session goes on past it."""
    s = served
    a, b = await two_hosts(s)
    gap = a.cmdsn
    a.cmdsn += 1
    held = a.send(1, write10(0, 1), b"\x5a" * 512)         # CmdSN gap + 1: held
    await a.quiet(0.1)
    reset = b.tmf(1, TmfFunction.LOGICAL_UNIT_RESET)
    resp = await b.pdu()
    assert isinstance(resp, P.TaskMgmtResponse) and resp.itt == reset, resp
    after = a.cmdsn
    a.cmdsn = gap
    first = a.send(1, TUR)                                   # fills the gap
    a.cmdsn = after
    assert await a.answer() == (first, 2, BUS_DEVICE_RESET)
    assert await a.command(1, TUR) == (0, None)              # not wedged behind the aborted one
    assert s.dev.writes == 0 and held


async def test_target_warm_reset_reaches_every_session_of_the_target(served: Served):
    s = served
    a, b = await two_hosts(s)
    assert await a.command(1, RESERVE6) == (0, None)       # SPC-2: released by the reset
    _, solicited, r2t = await stall_writes(s, a)
    reset = b.tmf(1, TmfFunction.TARGET_WARM_RESET)
    await b.quiet(0.2)
    s.dev.release.set()
    resp = await b.pdu()
    assert isinstance(resp, P.TaskMgmtResponse) and resp.itt == reset, resp
    assert resp.response == TmfResponse.FUNCTION_COMPLETE
    a.data_out(r2t, b"\xa5" * 4096)
    await a.quiet(0.2)
    assert await a.command(1, TUR) == (2, BUS_DEVICE_RESET)
    assert await b.command(1, TUR) == (2, BUS_DEVICE_RESET)
    assert await b.command(1, write10(0, 1), b"\x33" * 512) == (0, None)  # no reservation left
    assert s.unit.reservations.spc2 is None


async def test_target_cold_reset_ends_every_session_of_the_target(served: Served):
    s = served
    a, b = await two_hosts(s)
    s.dev.release.clear()
    a.send(1, write10(0, 1), b"\x5a" * 512)
    await s.dev.stalled()
    reset = b.tmf(1, TmfFunction.TARGET_COLD_RESET)
    await b.quiet(0.2)
    s.dev.release.set()
    resp = await b.pdu()
    assert isinstance(resp, P.TaskMgmtResponse) and resp.itt == reset, resp
    assert resp.response == TmfResponse.FUNCTION_COMPLETE
    for host in (a, b):                      # no answer for the write; the connection ends
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
            pdu = await host.pdu(timeout=5)
            if pdu is None:
                raise ConnectionError("EOF")
            raise AssertionError(f"unexpected {pdu}")
    for _ in range(200):
        if not s.target.sessions:
            break
        await asyncio.sleep(0.01)
    assert not s.target.sessions


@pytest.mark.skipif(not shutil.which("iscsi-test-cu"), reason="libiscsi-bin is not installed")
async def test_libiscsi_reset_and_tmf_tests_pass(served: Served, tmp_path):
    """libiscsi's own checks of these functions, two initiators on the LU (MultipathIO.Reset:
    every path sees the reset)."""
    tests = ("SCSI.MultipathIO.Reset,iSCSI.iSCSITMF,SCSI.Reserve6.LUNReset,"
             "SCSI.Reserve6.TargetWarmReset,SCSI.Reserve6.TargetColdReset")
    url = f"iscsi://127.0.0.1:{served.port}/{TARGET}/1"
    proc = await asyncio.create_subprocess_exec(
        "iscsi-test-cu", "-d", "-x", "-i", H1, "-I", H2, "-t", tests, url, url,
        cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    text = out.decode(errors="replace")
    import xml.etree.ElementTree as ET
    root = ET.parse(tmp_path / "CUnitAutomated-Results.xml").getroot()
    ran = {(rec.findtext("TEST_NAME") or "").strip(): rec.tag
           for res in root.iter("CUNIT_RUN_TEST_RECORD") for rec in res}
    assert ran, text
    failed = sorted(name for name, tag in ran.items() if tag != "CUNIT_RUN_TEST_SUCCESS")
    assert not failed, f"{failed}\n{text[-4000:]}"
