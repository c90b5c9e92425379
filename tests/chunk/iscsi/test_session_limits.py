"""Limits a session keeps whatever the initiator does, through the real target, login and SCSI
layer over real sockets: an initiator that stops reading, ping data longer than it can take,
immediate data it agreed not to send, and unsolicited data for a command held for CmdSN order."""

from __future__ import annotations

import asyncio
import socket
import struct
from types import SimpleNamespace

import pytest

from chunk.blockdev import MemoryBlockDevice
from chunk.iscsi import pdu as P
from chunk.iscsi.session import WRITE_BUFFER_HIGH
from chunk.iscsi.target import IscsiTarget, TargetConfig
from chunk.scsi import LogicalUnit, LunIdentity
from tests.chunk.iscsi.raw_initiator import Initiator
from tests.cluster import free_port

pytestmark = pytest.mark.timeout(60)

TARGET = "iqn.2026-01.io.zstore:test.t0000"
H1 = "iqn.2004-10.com.example:h1"
WWN = "6" + "5a5354" + "0123456789abcdef012345678"


def fake_catalog():
    return SimpleNamespace(
        synced=True, generation=1, on_change=lambda fn: None,
        target=lambda iqn: object() if iqn == TARGET else None,
        chap_for=lambda target, initiator: None,
        lun_access=lambda target, initiator, lun: "lun1" if lun == 1 else None,
        visible_luns=lambda target, initiator: {},
        visible_targets=lambda initiator: [TARGET])


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0).ljust(16, b"\0")


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0).ljust(16, b"\0")


class Rig:
    """A target with one 64 MiB LU (LUN 1) on a free port."""

    def __init__(self, **cfg):
        self.dev = MemoryBlockDevice(64 << 20)
        self.unit = LogicalUnit(self.dev, LunIdentity(wwn=WWN, serial="vol-1", lun=1))
        self.port = free_port()
        c = TargetConfig(port=self.port, nop_interval=3600, nop_timeout=3600)
        for k, v in cfg.items():
            setattr(c, k, v)
        self.target = IscsiTarget(c, fake_catalog(), open_device=None)
        self.target.units = SimpleNamespace(get=lambda ex: self.unit, opened=lambda ex: self.unit,
                                            close=lambda: None)
        self.clients: list[Initiator] = []

    async def __aenter__(self) -> "Rig":
        await self.target.start()
        return self

    async def __aexit__(self, *exc) -> None:
        for c in self.clients:
            c.w.transport.abort()      # a wedged session (old code) is freed by the RST
        await asyncio.wait_for(self.target.stop(), 20)

    async def login(self, keys: tuple[tuple[str, str], ...] = (), sock=None) -> Initiator:
        i = await Initiator.connect(self.port, TARGET, H1, keys=keys, sock=sock)
        self.clients.append(i)
        await i.ready(1)
        return i

    async def deaf_login(self) -> Initiator:
        """A session whose initiator has a tiny receive buffer (set before connect)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
        return await self.login(sock=sock)

    async def wedge(self, i: Initiator) -> object:
        """Send READs of 1 MiB and never read the answers, until the session has more queued
        than its socket takes (its run loop then waits for the socket). Its Session."""
        session = next(iter(self.target.sessions.values()))
        for _ in range(48):
            i.send(1, read10(0, 2048), read=1 << 20)
        await i.w.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while session.w.transport.get_write_buffer_size() <= WRITE_BUFFER_HIGH:
            assert loop.time() < deadline, "the session never filled its socket"
            await asyncio.sleep(0.02)
        return session


# --- 1. an initiator that stops reading ------------------------------------------------------

async def test_reinstatement_ends_a_session_whose_initiator_stopped_reading():
    """A new login with the ISID of a session whose initiator reads nothing: the old session
    is ended at once (its unsent answers aborted), not after ``reinstate_timeout``, and leaves
    the target (its TSIH freed: its run loop ended)."""
    async with Rig(reinstate_timeout=30) as rig:
        deaf = await rig.deaf_login()
        old = await rig.wedge(deaf)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        fresh = await asyncio.wait_for(Initiator.connect(rig.port, TARGET, H1), 5)
        rig.clients.append(fresh)
        assert loop.time() - t0 < 3                         # at once, not after reinstate_timeout (30 s)
        await asyncio.wait_for(old._ended.wait(), 5)        # noqa: SLF001
        assert old.tsih not in rig.target.tsihs
        assert not old.tasks
        await fresh.ready(1)
        status, sense, data = await fresh.transfer(1, read10(0, 8), read=4096)
        assert (status, sense, data) == (0, None, bytes(4096))


async def test_nop_timeout_drops_a_session_whose_initiator_stopped_reading():
    """Nothing taken from the socket within ``nop_timeout``: the session is dropped from the
    target's table (its tasks ended, on_close called), not kept forever."""
    async with Rig(nop_interval=0.2, nop_timeout=0.5) as rig:
        deaf = await rig.deaf_login()
        session = await rig.wedge(deaf)
        assert session in rig.target.sessions.values()
        await asyncio.wait_for(session._ended.wait(), 5)    # noqa: SLF001
        assert session not in rig.target.sessions.values()
        assert session.tsih not in rig.target.tsihs
        assert session.w.transport.is_closing()


# --- 2. ping data longer than the initiator's MaxRecvDataSegmentLength -----------------------

async def test_nop_in_echo_is_limited_to_the_initiators_max_recv_data_segment_length():
    """RFC 7143 §11.18.3: ping data is reflected, its length limited to MaxRecvDataSegmentLength.
    An initiator declaring 512 pings with 4096 bytes: it gets back the first 512, and the
    session goes on."""
    async with Rig() as rig:
        i = await rig.login(keys=(("MaxRecvDataSegmentLength", "512"),))
        ping = bytes(range(256)) * 16
        for immediate in (False, True):
            i.itt += 1
            i.w.write(P.NopOut(itt=i.itt, ttt=0xFFFFFFFF, immediate=immediate, cmdsn=i.cmdsn,
                               lun=0, data=ping).to_bytes())
            if not immediate:
                i.cmdsn += 1
            pong = await i.pdu()
            assert isinstance(pong, P.NopIn) and pong.itt == i.itt, pong
            assert pong.data == ping[:512]
        i.itt += 1                                      # a ping that fits comes back whole
        i.w.write(P.NopOut(itt=i.itt, ttt=0xFFFFFFFF, cmdsn=i.cmdsn, data=ping[:300]).to_bytes())
        i.cmdsn += 1
        pong = await i.pdu()
        assert isinstance(pong, P.NopIn) and pong.data == ping[:300]
        assert (await i.transfer(1, read10(0, 1), read=512))[:2] == (0, None)


# --- 3. immediate data under ImmediateData=No ------------------------------------------------

async def expect_reject(i: Initiator, itt: int) -> None:
    rej = await i.pdu()
    assert isinstance(rej, P.Reject) and rej.reason == 0x04, rej          # Protocol Error
    assert struct.unpack_from(">I", rej.data, 16)[0] == itt                 # the command's header


@pytest.mark.parametrize("initial_r2t", ["Yes", "No"])
async def test_immediate_data_is_rejected_when_immediate_data_is_no(initial_r2t):
    """ImmediateData=No (RFC 7143 §13.11): a WRITE carrying immediate data is rejected
    (Reject, Protocol Error, no SCSI response) and not run: none of its data is written.
    The session goes on: a write sent as agreed (its data solicited) is taken."""
    async with Rig() as rig:
        i = await rig.login(keys=(("ImmediateData", "No"), ("InitialR2T", initial_r2t)))
        payload = b"\xa5" * 4096
        itt = i.send(1, write10(0, 8), payload)                # all of it immediate
        await expect_reject(i, itt)
        itt = i.send(1, write10(8, 8), payload[:1024], edtl=4096)   # some immediate, rest by R2T
        await expect_reject(i, itt)
        if initial_r2t == "No":     # immediate data and an unsolicited Data-Out to follow
            i.itt += 1
            i.w.write(P.ScsiCommand(itt=i.itt, cmdsn=i.cmdsn, lun=P.encode_lun(1), write=True,
                                    final=False, expected_length=4096, cdb=write10(0, 8),
                                    data=payload[:1024]).to_bytes())
            i.cmdsn += 1
            i.w.write(P.DataOut(itt=i.itt, ttt=0xFFFFFFFF, lun=P.encode_lun(1), final=True, datasn=0,
                                buffer_offset=1024, data=payload[1024:]).to_bytes())
            await expect_reject(i, i.itt)                       # the Data-Out: taken and dropped
        await i.quiet()                                         # no R2T, no response
        assert (await i.transfer(1, read10(0, 16), read=8192)) == (0, None, bytes(8192))
        assert rig.dev.buf[:8192] == bytes(8192)

        itt = i.send(1, write10(0, 8), edtl=4096)               # no immediate data: solicited
        r2t = await i.pdu()
        assert isinstance(r2t, P.R2T) and r2t.itt == itt and r2t.desired_length == 4096, r2t
        i.data_out(r2t, payload)
        assert (await i.answer())[:2] == (itt, 0)
        assert (await i.transfer(1, read10(0, 8), read=4096)) == (0, None, payload)


# --- 4. unsolicited Data-Out for a write held for CmdSN order -----------------------------------

def write_pdu(itt: int, cmdsn: int, lba: int, data: bytes, edtl: int, final: bool) -> bytes:
    return P.ScsiCommand(itt=itt, cmdsn=cmdsn, lun=P.encode_lun(1), write=True, final=final,
                         expected_length=edtl, cdb=write10(lba, edtl // 512), data=data).to_bytes()


def data_out(itt: int, datasn: int, offset: int, data: bytes, final: bool) -> bytes:
    return P.DataOut(itt=itt, ttt=0xFFFFFFFF, lun=P.encode_lun(1), final=final, datasn=datasn,
                     buffer_offset=offset, data=data).to_bytes()


@pytest.mark.parametrize("split", [False, True])
async def test_unsolicited_data_out_for_a_write_held_for_cmdsn_order(split):
    """InitialR2T=No: CmdSN N+1, a WRITE whose unsolicited Data-Out follows it, arrives with
    that Data-Out before CmdSN N (legal: the initiator may send in any order across CmdSNs).
    Its data is held until its turn and used then; with ``split`` part of it comes only after
    CmdSN N. Both writes complete GOOD and read back as sent."""
    async with Rig() as rig:
        i = await rig.login(keys=(("InitialR2T", "No"),))
        a, b = bytes([0x11]) * 4096, bytes(range(256)) * 32     # 8 KiB: 1 KiB immediate, 7 by Data-Out
        n = i.cmdsn
        itt_a, itt_b = 0x900, 0x901
        i.w.write(write_pdu(itt_b, n + 1, 64, b[:1024], 8192, final=False))
        i.w.write(data_out(itt_b, 0, 1024, b[1024:4096], final=False))
        if not split:
            i.w.write(data_out(itt_b, 1, 4096, b[4096:], final=True))
        await i.w.drain()
        await i.quiet(0.3)                                  # held: no answer, no Reject
        i.w.write(write_pdu(itt_a, n, 0, a, 4096, final=True))
        if split:
            i.w.write(data_out(itt_b, 1, 4096, b[4096:], final=True))
        i.cmdsn += 2
        answers = {(await i.answer())[:2] for _ in range(2)}
        assert answers == {(itt_a, 0), (itt_b, 0)}, answers
        assert (await i.transfer(1, read10(0, 8), read=4096)) == (0, None, a)
        assert (await i.transfer(1, read10(64, 16), read=8192)) == (0, None, b)
        session = next(iter(rig.target.sessions.values()))
        assert not session._early and session._early_bytes == 0   # noqa: SLF001


async def test_held_write_aborted_drops_its_early_data_out():
    """ABORT TASK of a write held for CmdSN order whose Data-Out already came: the data is
    dropped (never written), the rest of its Data-Out too, and the session goes on."""
    async with Rig() as rig:
        i = await rig.login(keys=(("InitialR2T", "No"),))
        n = i.cmdsn
        i.w.write(write_pdu(0x901, n + 1, 64, b"\x77" * 1024, 8192, final=False))
        i.w.write(data_out(0x901, 0, 1024, b"\x77" * 3072, final=False))
        i.itt += 1
        i.w.write(P.TaskMgmtRequest(itt=i.itt, cmdsn=n, immediate=True, function=1, lun=P.encode_lun(1),
                                    referenced_task_tag=0x901, refcmdsn=n + 1).to_bytes())
        resp = await i.pdu()
        assert isinstance(resp, P.TaskMgmtResponse) and resp.response == 0, resp
        i.w.write(data_out(0x901, 1, 4096, b"\x77" * 4096, final=True))    # dropped
        i.w.write(write_pdu(0x900, n, 0, b"\x11" * 512, 512, final=True))
        i.cmdsn += 2
        assert (await i.answer())[:2] == (0x900, 0)
        await i.quiet(0.3)
        assert (await i.transfer(1, read10(64, 16), read=8192)) == (0, None, bytes(8192))
        session = next(iter(rig.target.sessions.values()))
        assert not session._early and session._early_bytes == 0   # noqa: SLF001
