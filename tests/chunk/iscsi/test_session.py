"""Full-feature phase over a real TCP socket, with hand-built initiator PDUs.

The SCSI layer is replaced by a small recording unit behind the same narrow
interface (execute / data_out_length); the real one is exercised end to end
by tests/chunk/iscsi/test_initiators.py with real initiators.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass
from types import SimpleNamespace


from chunk.iscsi import pdu as P
from chunk.iscsi.constants import RESERVED_TAG, RejectReason, TmfFunction, TmfResponse
from chunk.iscsi.negotiation import SessionParams
from chunk.iscsi.session import Session, sn_lt
from chunk.scsi import Nexus
from tests.cluster import until as poll_until


@dataclass
class Result:
    status: int
    data: bytes | None = None
    sense: bytes | None = None


class RecordingUnit:
    """READ(10) returns a pattern; WRITE(10) records data; opcode 0xFF blocks until released."""

    fast_writes = False                 # no write_nowait: every command takes execute()

    def __init__(self):
        self.writes: list[tuple[int, bytes]] = []
        self.order: list[int] = []
        self.release = asyncio.Event()

    def data_out_length(self, cdb: bytes) -> int:
        if cdb[0] == 0x2A:
            return struct.unpack_from(">H", cdb, 7)[0] * 512
        return 0

    async def execute(self, cdb, data_out, expected_length, nexus):
        self.order.append(cdb[1])
        if cdb[0] == 0x28:
            lba, = struct.unpack_from(">I", cdb, 2)
            n, = struct.unpack_from(">H", cdb, 7)
            return Result(0, bytes((lba + i) & 0xFF for i in range(n * 512)))
        if cdb[0] == 0x2A:
            if data_out is None or len(data_out) != self.data_out_length(cdb):
                return Result(2, None, bytes([0x70, 0, 5, 0, 0, 0, 0, 10] + [0] * 4 + [0x24, 0, 0, 0, 0, 0]))
            lba, = struct.unpack_from(">I", cdb, 2)
            self.writes.append((lba, bytes(data_out)))
            return Result(0)
        if cdb[0] == 0xFF:
            await self.release.wait()
            return Result(0)
        return Result(2, None, bytes([0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0]))


class Resolver:
    def __init__(self, unit):
        self.u = unit

    def unit(self, lun):
        return self.u if lun == 1 else None

    def visible_luns(self):
        return [1]

    def send_targets(self, which):
        return [("iqn.2026-01.io.zstore:test.t0000", ["127.0.0.1:3260,1"])]


FAKE_SCSI = SimpleNamespace(
    report_luns=lambda luns, cdb: Result(0, struct.pack(">I4x", 8 * len(luns)) + b"".join(
        struct.pack(">Q", P.encode_lun(n)) for n in luns)),
    lun_not_supported=lambda cdb: Result(2, None, bytes([0x70, 0, 5, 0, 0, 0, 0, 10] + [0] * 4 + [0x25, 0, 0, 0, 0, 0])),
    internal_error=lambda: Result(2, None, bytes([0x70, 0, 4, 0, 0, 0, 0, 10] + [0] * 4 + [0x44, 0, 0, 0, 0, 0])),
)


def params(**kw) -> SessionParams:
    base = dict(initiator_name="iqn.2026-01.test:i", target_name="iqn.2026-01.test:t",
                max_recv_data_segment_length=65536, max_send_data_segment_length=8192,
                max_burst_length=65536, first_burst_length=16384, initial_r2t=False,
                immediate_data=True, max_outstanding_r2t=1)
    base.update(kw)
    return SessionParams(**base)


class Harness:
    def __init__(self, p: SessionParams, unit=None, window=128, resolver_cls=None, setup=None):
        self.p = p
        self.setup = setup                  # called with the Session once made
        self.unit = unit or RecordingUnit()
        self.resolver_cls = resolver_cls or Resolver
        self.window = window
        self.session: Session | None = None

    async def __aenter__(self):
        async def handle(r, w):
            self.session = Session(r, w, self.p, isid=b"\x80" + bytes(5), tsih=7, statsn=100, expcmdsn=1,
                                   resolver=self.resolver_cls(self.unit), scsi=FAKE_SCSI,
                                   nexus=Nexus("i", "t"), window=self.window,
                                   nop_interval=3600, nop_timeout=3600)
            if self.setup:
                self.setup(self.session)
            await self.session.run()
        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.r, self.w = await asyncio.open_connection("127.0.0.1", port)
        return self

    async def __aexit__(self, *exc):
        self.w.close()
        self.server.close()

    def send(self, pdu: P.PDU) -> None:
        self.w.write(pdu.to_bytes())

    async def recv(self, timeout: float = 5) -> P.PDU:
        return await asyncio.wait_for(
            P.read_pdu(self.r, max_recv_data_segment_length=1 << 20, opcodes=frozenset(range(0x20, 0x40))),
            timeout)


def read10(lba: int, blocks: int, itt: int, cmdsn: int) -> P.ScsiCommand:
    cdb = struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0).ljust(16, b"\0")
    return P.ScsiCommand(itt=itt, cmdsn=cmdsn, lun=P.encode_lun(1), read=True, expected_length=blocks * 512,
                         cdb=cdb)


def write10(lba: int, blocks: int, itt: int, cmdsn: int, data: bytes = b"", final: bool = True,
            edtl: int | None = None) -> P.ScsiCommand:
    cdb = struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0).ljust(16, b"\0")
    return P.ScsiCommand(itt=itt, cmdsn=cmdsn, lun=P.encode_lun(1), write=True, final=final,
                         expected_length=blocks * 512 if edtl is None else edtl, cdb=cdb, data=data)


async def until(cond, timeout: float = 5.0) -> None:
    """Wait for a condition on the server side (never a fixed sleep)."""
    await poll_until(cond, "the condition", timeout, 0.005, message="condition not reached in time")


def test_serial_number_arithmetic_wraps():
    assert sn_lt(0xFFFFFFFF, 0) and sn_lt(1, 2) and not sn_lt(2, 1) and not sn_lt(5, 5)


async def test_read_is_split_into_data_in_pdus_with_status_in_the_last():
    async with Harness(params(max_send_data_segment_length=8192)) as h:
        h.send(read10(0, 64, itt=1, cmdsn=1))          # 32 KiB -> four 8 KiB Data-In PDUs
        got = [await h.recv() for _ in range(4)]
        assert all(isinstance(x, P.DataIn) for x in got)
        assert [x.datasn for x in got] == [0, 1, 2, 3]
        assert [x.buffer_offset for x in got] == [0, 8192, 16384, 24576]
        assert not any(x.status_present for x in got[:3]) and got[3].status_present and got[3].final
        assert b"".join(x.data for x in got) == bytes(i & 0xFF for i in range(64 * 512))
        assert got[3].statsn == 100 and got[3].expcmdsn == 2


async def test_residual_underflow_and_overflow_on_reads():
    async with Harness(params()) as h:
        cmd = read10(0, 2, itt=1, cmdsn=1)
        cmd.expected_length = 2048                      # asks for more than the command returns
        h.send(cmd)
        d = await h.recv()
        assert d.status_present and d.underflow and d.residual == 1024
        cmd = read10(0, 2, itt=2, cmdsn=2)
        cmd.expected_length = 512                       # less than the command returns
        h.send(cmd)
        d = await h.recv()
        assert d.status_present and d.overflow and d.residual == 512 and len(d.data) == 512


async def test_write_with_immediate_unsolicited_and_r2t_data():
    p = params(first_burst_length=8192, max_burst_length=16384, initial_r2t=False)
    async with Harness(p) as h:
        payload = bytes(range(256)) * 128               # 32 KiB
        h.send(write10(10, 64, itt=5, cmdsn=1, data=payload[:4096], final=False))
        h.send(P.DataOut(itt=5, ttt=RESERVED_TAG, final=True, datasn=0, buffer_offset=4096,
                         data=payload[4096:8192]))
        r2t = await h.recv()
        assert isinstance(r2t, P.R2T) and r2t.buffer_offset == 8192 and r2t.desired_length == 16384
        h.send(P.DataOut(itt=5, ttt=r2t.ttt, final=True, datasn=0, buffer_offset=8192,
                         data=payload[8192:24576]))
        r2t2 = await h.recv()
        assert isinstance(r2t2, P.R2T) and r2t2.buffer_offset == 24576 and r2t2.r2tsn == 1
        h.send(P.DataOut(itt=5, ttt=r2t2.ttt, final=True, datasn=0, buffer_offset=24576,
                         data=payload[24576:]))
        resp = await h.recv()
        assert isinstance(resp, P.ScsiResponse) and resp.status == 0 and resp.itt == 5
        assert h.unit.writes == [(10, payload)]


async def test_out_of_order_cmdsn_is_held_until_the_gap_fills():
    async with Harness(params()) as h:
        h.send(read10(2, 1, itt=12, cmdsn=3))
        h.send(read10(1, 1, itt=11, cmdsn=2))
        await asyncio.sleep(0.1)
        assert h.unit.order == []                       # CmdSN 1 is missing: nothing runs yet
        h.send(read10(0, 1, itt=10, cmdsn=1))
        got = [await h.recv() for _ in range(3)]
        assert sorted(x.itt for x in got) == [10, 11, 12]
        assert got[-1].expcmdsn == 4


async def test_commands_outside_the_window_are_ignored():
    async with Harness(params(), window=4) as h:
        h.send(read10(0, 1, itt=1, cmdsn=50))           # far beyond MaxCmdSN: silently dropped
        h.send(P.NopOut(itt=9, cmdsn=1, immediate=True, data=b"ping"))
        nop = await h.recv()
        assert isinstance(nop, P.NopIn) and nop.itt == 9 and nop.data == b"ping"
        assert nop.maxcmdsn == 4                        # ExpCmdSN 1 + window 4 - 1


async def test_abort_task_suppresses_the_response():
    unit = RecordingUnit()
    async with Harness(params(), unit=unit) as h:
        cdb = bytes([0xFF, 7]).ljust(16, b"\0")
        h.send(P.ScsiCommand(itt=21, cmdsn=1, lun=P.encode_lun(1), cdb=cdb))
        await until(lambda: unit.order)                       # the command is running
        h.send(P.TaskMgmtRequest(itt=22, cmdsn=2, immediate=True, function=TmfFunction.ABORT_TASK,
                                 lun=P.encode_lun(1), referenced_task_tag=21, refcmdsn=1))
        await until(lambda: 21 not in h.session.tasks)        # the abort has taken it
        unit.release.set()
        tmf = await h.recv()
        assert isinstance(tmf, P.TaskMgmtResponse) and tmf.itt == 22
        assert tmf.response == TmfResponse.FUNCTION_COMPLETE
        h.send(P.NopOut(itt=23, cmdsn=2, immediate=True))
        nxt = await h.recv()
        assert isinstance(nxt, P.NopIn) and nxt.itt == 23   # no SCSI Response for task 21 came first


async def test_abort_of_unknown_task_reports_it():
    async with Harness(params()) as h:
        h.send(P.TaskMgmtRequest(itt=30, cmdsn=1, immediate=True, function=TmfFunction.ABORT_TASK,
                                 lun=P.encode_lun(1), referenced_task_tag=999, refcmdsn=5))
        tmf = await h.recv()
        assert tmf.response == TmfResponse.TASK_DOES_NOT_EXIST


async def test_masked_lun_and_report_luns():
    async with Harness(params()) as h:
        cmd = read10(0, 1, itt=1, cmdsn=1)
        cmd.lun = P.encode_lun(5)
        h.send(cmd)
        resp = await h.recv()
        assert isinstance(resp, P.ScsiResponse) and resp.status == 2 and resp.sense[12] == 0x25
        cdb = struct.pack(">BBBBBBIBB", 0xA0, 0, 0, 0, 0, 0, 4096, 0, 0).ljust(16, b"\0")
        h.send(P.ScsiCommand(itt=2, cmdsn=2, read=True, expected_length=4096, cdb=cdb))
        d = await h.recv()
        assert d.status_present and d.data[8:16] == struct.pack(">Q", P.encode_lun(1))


async def test_text_send_targets_and_logout():
    async with Harness(params()) as h:
        h.send(P.TextRequest(itt=40, cmdsn=1, final=True, data=b"SendTargets=All\0"))
        t = await h.recv()
        assert isinstance(t, P.TextResponse)
        assert t.data == b"TargetName=iqn.2026-01.io.zstore:test.t0000\0TargetAddress=127.0.0.1:3260,1\0"
        h.send(P.LogoutRequest(itt=41, cmdsn=2, reason=0))
        lo = await h.recv()
        assert isinstance(lo, P.LogoutResponse) and lo.response == 0
        assert await asyncio.wait_for(h.r.read(), 5) == b""      # the target closed the connection


async def test_garbage_gets_reject_and_snack_is_not_supported():
    async with Harness(params()) as h:
        h.send(P.SnackRequest(itt=50))
        rej = await h.recv()
        assert isinstance(rej, P.Reject) and rej.reason == 0x05
        bad = bytearray(P.NopOut(itt=51, cmdsn=1, immediate=True).to_bytes())
        bad[0] = 0x1C                                   # no such opcode
        h.w.write(bytes(bad))
        rej = await h.recv()
        assert isinstance(rej, P.Reject)
        h.send(P.NopOut(itt=52, cmdsn=1, immediate=True))
        assert (await h.recv()).itt == 52               # the connection still works


async def test_data_out_with_a_wrong_datasn_ends_the_connection():
    p = params(initial_r2t=True, immediate_data=False, max_burst_length=1024)
    async with Harness(p) as h:
        h.send(write10(0, 2, itt=60, cmdsn=1, final=True))
        r2t = await h.recv()
        assert isinstance(r2t, P.R2T) and r2t.desired_length == 1024
        h.send(P.DataOut(itt=60, ttt=r2t.ttt, datasn=1, buffer_offset=0, data=bytes(512)))   # should be 0
        rej = await h.recv()
        assert isinstance(rej, P.Reject) and rej.reason == 0x04
        assert await asyncio.wait_for(h.r.read(), 5) == b""
        assert h.unit.writes == []


async def test_abort_of_a_command_already_answered_is_task_does_not_exist():
    async with Harness(params()) as h:
        h.send(read10(0, 1, itt=70, cmdsn=1))
        assert (await h.recv()).itt == 70
        h.send(P.TaskMgmtRequest(itt=71, cmdsn=2, immediate=True, function=TmfFunction.ABORT_TASK,
                                 lun=P.encode_lun(1), referenced_task_tag=70, refcmdsn=1))
        assert (await h.recv()).response == TmfResponse.TASK_DOES_NOT_EXIST


async def test_abort_of_a_lost_command_consumes_its_cmdsn():
    async with Harness(params()) as h:
        # CmdSN 1 never arrives; the initiator aborts it, then sends CmdSN 2.
        h.send(P.TaskMgmtRequest(itt=80, cmdsn=2, immediate=True, function=TmfFunction.ABORT_TASK,
                                 lun=P.encode_lun(1), referenced_task_tag=79, refcmdsn=1))
        tmf = await h.recv()
        assert tmf.response == TmfResponse.FUNCTION_COMPLETE and tmf.expcmdsn == 2
        h.send(read10(0, 1, itt=81, cmdsn=2))
        d = await h.recv()
        assert d.itt == 81 and d.status_present


async def test_long_send_targets_answer_is_continued():
    class Many(Resolver):
        def send_targets(self, which):
            return [(f"iqn.2026-01.io.zstore:test.t{i:04d}", ["127.0.0.1:3260,1"]) for i in range(400)]

    async with Harness(params(max_send_data_segment_length=1024), resolver_cls=Many) as h:
        h.send(P.TextRequest(itt=90, cmdsn=1, final=True, data=b"SendTargets=All\0"))
        body = b""
        cmdsn = 2
        while True:
            t = await h.recv()
            assert isinstance(t, P.TextResponse) and len(t.data) <= 1024
            body += t.data
            if t.final:
                break
            assert t.cont and t.ttt != RESERVED_TAG
            h.send(P.TextRequest(itt=90, cmdsn=cmdsn, final=True, ttt=t.ttt))
            cmdsn += 1
        names = [kv for kv in body.split(b"\0") if kv.startswith(b"TargetName=")]
        assert len(names) == 400 and names[-1].endswith(b"t0399")


async def test_silent_initiator_is_pinged_then_dropped():
    h = Harness(params())
    async with h:
        h.send(P.NopOut(itt=1, cmdsn=1, immediate=True))
        assert (await h.recv()).itt == 1
        h.session.nop_interval = h.session.nop_timeout = 0.2      # shorten for the test
        h.session._pinger_task.cancel()
        h.session._pinger_task = asyncio.ensure_future(h.session._pinger())
        ping = await h.recv(timeout=5)
        assert isinstance(ping, P.NopIn) and ping.itt == RESERVED_TAG and ping.ttt != RESERVED_TAG
        # We never answer: the target gives up on us and closes the connection.
        assert await asyncio.wait_for(h.r.read(), 5) == b""


async def test_answered_pings_keep_the_connection():
    h = Harness(params())
    async with h:
        h.send(P.NopOut(itt=1, cmdsn=1, immediate=True))
        assert (await h.recv()).itt == 1
        h.session.nop_interval = h.session.nop_timeout = 0.2
        h.session._pinger_task.cancel()
        h.session._pinger_task = asyncio.ensure_future(h.session._pinger())
        for _ in range(3):
            ping = await h.recv(timeout=5)
            assert isinstance(ping, P.NopIn) and ping.ttt != RESERVED_TAG
            h.send(P.NopOut(itt=RESERVED_TAG, ttt=ping.ttt, immediate=True, cmdsn=1))
        h.send(P.NopOut(itt=2, cmdsn=1, immediate=True))
        got = await h.recv()
        while isinstance(got, P.NopIn) and got.itt == RESERVED_TAG:
            got = await h.recv()
        assert got.itt == 2


async def test_logout_request_is_an_async_message_sent_once():
    async with Harness(params()) as h:
        h.send(P.NopOut(itt=1, cmdsn=1, immediate=True))
        assert (await h.recv()).itt == 1
        await h.session.request_logout(within=7)
        await h.session.request_logout(within=7)          # asked already: not twice
        h.send(P.NopOut(itt=2, cmdsn=1, immediate=True))
        msg = await h.recv()
        assert isinstance(msg, P.AsyncMessage) and msg.event == 1 and msg.parameter3 == 7
        assert (await h.recv()).itt == 2
        assert h.session.logout_requested
        h.session.forget_logout_request()
        await h.session.request_logout(within=7)          # a later drain asks again
        assert isinstance(await h.recv(), P.AsyncMessage)


async def test_close_when_idle_answers_in_flight_commands_first_and_grants_no_new_cmdsn():
    unit = RecordingUnit()
    async with Harness(params(), unit=unit) as h:
        h.send(P.NopOut(itt=1, cmdsn=1, immediate=True))
        granted = (await h.recv()).maxcmdsn
        h.send(P.ScsiCommand(itt=2, cmdsn=1, lun=P.encode_lun(1), cdb=bytes([0xFF, 1]).ljust(16, b"\0")))
        await until(lambda: unit.order)
        closing = asyncio.ensure_future(h.session.close_when_idle(timeout=10))
        await asyncio.sleep(0.2)
        assert not closing.done()                          # the command is still running
        unit.release.set()
        rsp = await h.recv()
        assert isinstance(rsp, P.ScsiResponse) and rsp.itt == 2 and rsp.status == 0
        assert rsp.maxcmdsn == granted                    # the window stopped moving
        await asyncio.wait_for(closing, 5)
        assert await asyncio.wait_for(h.r.read(), 5) == b""


async def test_close_when_idle_gives_up_waiting_after_the_timeout():
    unit = RecordingUnit()
    async with Harness(params(), unit=unit) as h:
        h.send(P.ScsiCommand(itt=2, cmdsn=1, lun=P.encode_lun(1), cdb=bytes([0xFF, 1]).ljust(16, b"\0")))
        await until(lambda: unit.order)
        await asyncio.wait_for(h.session.close_when_idle(timeout=0.3), 5)
        assert await asyncio.wait_for(h.r.read(), 5) == b""
        unit.release.set()


# --- reading several PDUs per segment, and PDUs split across segments -------------

async def test_every_command_of_one_segment_is_answered_in_order():
    async with Harness(params()) as h:
        cmds = []
        for i in range(40):
            if i % 2:
                cmds.append(read10(i, 1, itt=100 + i, cmdsn=1 + i))
            else:
                cmds.append(write10(i, 1, itt=100 + i, cmdsn=1 + i, data=bytes([i]) * 512))
        h.w.write(b"".join(c.to_bytes() for c in cmds))       # one segment: one batch on the target
        got = [await h.recv() for _ in cmds]
        assert [g.itt for g in got] == [c.itt for c in cmds]
        assert [g.statsn for g in got] == list(range(100, 140))
        assert all((g.status_present if i % 2 else isinstance(g, P.ScsiResponse)) for i, g in enumerate(got))
        assert got[-1].expcmdsn == 41
        assert h.unit.writes == [(i, bytes([i]) * 512) for i in range(0, 40, 2)]


async def test_pdus_split_across_segments_are_reassembled():
    async with Harness(params()) as h:
        wire = b"".join(c.to_bytes() for c in (
            write10(7, 8, itt=1, cmdsn=1, data=bytes(range(256)) * 16), read10(3, 1, itt=2, cmdsn=2),
            write10(9, 1, itt=3, cmdsn=3, data=b"\xab" * 512)))
        for a, b in ((0, 20), (20, 47), (47, 48), (48, 3000), (3000, 4200), (4200, len(wire) - 10),
                     (len(wire) - 10, len(wire))):
            h.w.write(wire[a:b])
            await h.w.drain()
            await asyncio.sleep(0.01)                          # lets the target read each piece alone
        got = [await h.recv() for _ in range(3)]
        assert [g.itt for g in got] == [1, 2, 3] and [g.statsn for g in got] == [100, 101, 102]
        assert got[1].data == bytes(3 + i & 0xFF for i in range(512))
        assert h.unit.writes == [(7, bytes(range(256)) * 16), (9, b"\xab" * 512)]


async def test_an_error_inside_a_batch_is_rejected_in_place():
    """A malformed PDU between good ones: the earlier ones are answered, the bad one
    gets a Reject, and the later ones still run (the stream stayed framed)."""
    bad = bytearray(P.NopOut(data=b"abcd").to_bytes())
    bad[0] = 0x07
    async with Harness(params()) as h:
        h.w.write(read10(0, 1, itt=1, cmdsn=1).to_bytes() + bytes(bad) + read10(1, 1, itt=2, cmdsn=2).to_bytes())
        got = [await h.recv() for _ in range(3)]
        assert got[0].itt == 1 and isinstance(got[1], P.Reject) and got[1].data == bytes(bad[:48])
        assert got[2].itt == 2 and got[2].status_present


# --- the write fast path (unit.write_nowait) ------------------------------------

class NowaitUnit(RecordingUnit):
    """WRITE(10) through write_nowait: immediately done for LBA 0, else when the test lands it."""

    fast_writes = True

    def __init__(self):
        super().__init__()
        self.futs: list[asyncio.Future] = []

    def write_nowait(self, cdb, data, nexus):
        if cdb[0] != 0x2A:
            return None
        lba, = struct.unpack_from(">I", cdb, 2)
        self.writes.append((lba, bytes(data)))
        fut = asyncio.get_running_loop().create_future()
        if lba == 0:
            fut.set_result(None)
        else:
            self.futs.append(fut)
        return fut

    def finish_nowait(self, fut):
        return Result(0) if fut.exception() is None else Result(2, None, bytes([0x70, 0, 3] + [0] * 15))


async def test_fast_path_writes_are_answered_when_their_future_completes():
    async with Harness(params(), unit=NowaitUnit()) as h:
        h.w.write(write10(5, 1, itt=1, cmdsn=1, data=b"a" * 512).to_bytes()
                  + write10(0, 1, itt=2, cmdsn=2, data=b"b" * 512).to_bytes()
                  + read10(0, 1, itt=3, cmdsn=3).to_bytes())
        first = [await h.recv() for _ in range(2)]           # done at once: answered first
        assert [g.itt for g in first] == [2, 3] and first[0].status == 0 and first[0].statsn == 100
        await until(lambda: h.unit.futs)
        h.unit.futs[0].set_exception(OSError("lost"))
        late = await h.recv()
        assert isinstance(late, P.ScsiResponse) and late.itt == 1 and late.status == 2 and late.sense
        assert late.statsn == 102 and not h.session.tasks


async def test_header_and_data_digests_on_batched_requests_and_packed_answers():
    async with Harness(params(header_digest=True, data_digest=True)) as h:
        cmds = [write10(4, 1, itt=1, cmdsn=1, data=b"w" * 512), read10(4, 1, itt=2, cmdsn=2),
                read10(0, 64, itt=3, cmdsn=3)]                   # 32 KiB: four Data-In
        h.w.write(b"".join(c.to_bytes(True, True) for c in cmds))
        kw = dict(header_digest=True, data_digest=True, max_recv_data_segment_length=1 << 20,
                  opcodes=frozenset(range(0x20, 0x40)))
        got = [await asyncio.wait_for(P.read_pdu(h.r, **kw), 5) for _ in range(6)]   # digests checked
        assert isinstance(got[0], P.ScsiResponse) and got[0].itt == 1 and got[0].status == 0
        assert got[1].itt == 2 and got[1].status_present and got[1].data == bytes((4 + i) & 0xFF for i in range(512))
        assert [g.datasn for g in got[2:]] == [0, 1, 2, 3] and got[5].status_present
        assert [g.statsn for g in (got[0], got[1], got[5])] == [100, 101, 102]
        assert h.unit.writes == [(4, b"w" * 512)]


async def test_a_fast_path_that_raises_answers_internal_error_and_the_session_goes_on():
    class Broken(NowaitUnit):
        def write_nowait(self, cdb, data, nexus):
            raise RuntimeError("bug")

    async with Harness(params(), unit=Broken()) as h:
        h.w.write(write10(5, 1, itt=1, cmdsn=1, data=b"a" * 512).to_bytes()
                  + read10(0, 1, itt=2, cmdsn=2).to_bytes())
        got = [await h.recv() for _ in range(2)]
        assert isinstance(got[0], P.ScsiResponse) and got[0].itt == 1 and got[0].status == 2
        assert got[1].itt == 2 and got[1].status_present and not h.session.tasks


async def test_the_last_command_in_flight_is_answered_at_once_others_wait_for_the_turn():
    """Outside a batch, an answer waits for the end of the loop turn so that completions
    arriving together share a send; but when no other command is in flight (QD1) there is
    nothing to wait for, and it goes out at once."""
    async with Harness(params(), unit=NowaitUnit()) as h:
        h.w.write(write10(5, 1, itt=1, cmdsn=1, data=b"a" * 512).to_bytes()
                  + write10(6, 1, itt=2, cmdsn=2, data=b"b" * 512).to_bytes())
        await until(lambda: len(h.unit.futs) == 2)
        s = h.session
        h.unit.futs[0].set_result(None)
        await asyncio.sleep(0)                     # its completion ran; itt 2 is still in flight
        assert s._out and s._flush_pending        # noqa: SLF001 - queued for the turn's end
        await asyncio.sleep(0)
        assert not s._out                          # noqa: SLF001
        h.unit.futs[1].set_result(None)
        await asyncio.sleep(0)                     # the last one in flight
        assert not s._out and not s.tasks          # noqa: SLF001 - already handed to the socket
        got = [await h.recv() for _ in range(2)]
        assert [g.itt for g in got] == [1, 2] and all(g.status == 0 for g in got)


async def test_a_huge_expected_length_buffers_only_what_the_command_uses():
    """EDTL is the initiator's word: a WRITE(10) of one block claiming 4 GiB must not make the
    target allocate 4 GiB. It solicits the block, drops nothing it needs, and answers the rest
    as an underflow residual."""
    async with Harness(params(initial_r2t=True)) as h:
        h.send(write10(3, 1, itt=1, cmdsn=1, edtl=0xFFFFFFFF))
        r2t = await h.recv()
        assert isinstance(r2t, P.R2T) and r2t.buffer_offset == 0 and r2t.desired_length == 512
        task = h.session.tasks[1]
        assert len(task.buf) == 512
        h.send(P.DataOut(itt=1, ttt=r2t.ttt, final=True, datasn=0, buffer_offset=0, data=b"\x5a" * 512))
        resp = await h.recv()
        assert isinstance(resp, P.ScsiResponse) and resp.status == 0
        assert resp.underflow and resp.residual == 0xFFFFFFFF - 512
        assert h.unit.writes == [(3, b"\x5a" * 512)]


async def test_unsolicited_data_beyond_what_the_command_uses_is_taken_and_dropped():
    async with Harness(params(initial_r2t=False)) as h:
        h.send(write10(4, 1, itt=2, cmdsn=1, data=b"\x11" * 512, final=False, edtl=2048))
        h.send(P.DataOut(itt=2, ttt=RESERVED_TAG, final=True, datasn=0, buffer_offset=512,
                         data=b"\x22" * 1536))
        resp = await h.recv()
        assert isinstance(resp, P.ScsiResponse) and resp.status == 0
        assert resp.underflow and resp.residual == 1536
        assert h.unit.writes == [(4, b"\x11" * 512)]


async def test_a_solicited_sequence_ending_short_ends_the_connection():
    """F=1 on a Data-Out before the R2T's length is reached: nothing would ever complete the
    command (it held its buffer and a window slot for good); a protocol error instead."""
    async with Harness(params(initial_r2t=True)) as h:
        h.send(write10(0, 4, itt=3, cmdsn=1))
        r2t = await h.recv()
        h.send(P.DataOut(itt=3, ttt=r2t.ttt, final=True, datasn=0, buffer_offset=0, data=b"x" * 512))
        rej = await h.recv()
        assert isinstance(rej, P.Reject)
        assert await asyncio.wait_for(h.r.read(), 5) == b""          # the target closed it


async def test_a_full_window_takes_no_more_commands_and_immediate_ones_are_bounded():
    """In-order commands beyond the MaxCmdSN granted are ignored (they used to become tasks
    without limit); immediate ones, which have no window, are refused past twice its size."""
    async with Harness(params(), window=2) as h:
        for i in range(2):
            h.send(P.ScsiCommand(itt=10 + i, cmdsn=1 + i, lun=P.encode_lun(1), cdb=bytes([0xFF]) + bytes(15)))
        await until(lambda: len(h.session.tasks) == 2)
        h.send(read10(0, 1, itt=20, cmdsn=3))                         # the window is full: ignored
        for i in range(4):
            h.send(P.ScsiCommand(itt=30 + i, cmdsn=3, immediate=True, lun=P.encode_lun(1),
                                 cdb=bytes([0xFF]) + bytes(15)))
        for _ in range(2):                                            # 32 and 33: tasks at 4
            rej = await h.recv()
            assert isinstance(rej, P.Reject) and rej.reason == RejectReason.IMMEDIATE_COMMAND_REJECT
        assert sorted(h.session.tasks) == [10, 11, 30, 31]
        h.unit.release.set()
        got = [await h.recv() for _ in range(4)]
        assert sorted(r.itt for r in got) == [10, 11, 30, 31]
        assert all(isinstance(r, P.ScsiResponse) for r in got)
        assert h.session.expcmdsn == 3                                # CmdSN 3 was not taken


async def test_a_write_sent_without_the_w_bit_is_not_a_plain_good():
    """WRITE(10) of 2 blocks with W=0 and EDTL=0: no data came, so the answer must say so (an
    overflow residual of the whole transfer, as with W=1), never GOOD with no residual."""
    async with Harness(params()) as h:
        cdb = struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 2, 0).ljust(16, b"\0")
        h.send(P.ScsiCommand(itt=40, cmdsn=1, lun=P.encode_lun(1), expected_length=0, cdb=cdb))
        resp = await h.recv()
        assert isinstance(resp, P.ScsiResponse)
        assert resp.overflow and resp.residual == 1024


async def test_unsolicited_data_of_a_write_answered_at_once_is_dropped_not_fatal():
    """A WRITE to a LUN this initiator may not see (masked mid-I/O) is answered at once; the
    Data-Out the initiator had still to send for it (InitialR2T=No) is dropped, and the
    session goes on, as with LIO."""
    async with Harness(params(initial_r2t=False)) as h:
        cmd = write10(0, 4, itt=50, cmdsn=1, data=b"a" * 512, final=False)
        cmd.lun = P.encode_lun(5)                                     # masked
        h.send(cmd)
        resp = await h.recv()
        assert isinstance(resp, P.ScsiResponse) and resp.status == 2 and resp.itt == 50
        h.send(P.DataOut(itt=50, ttt=RESERVED_TAG, final=True, datasn=0, buffer_offset=512, data=b"b" * 1536))
        h.send(P.NopOut(itt=51, cmdsn=2, immediate=True, data=b"still here"))
        nop = await h.recv()
        assert isinstance(nop, P.NopIn) and nop.itt == 51 and not h.session._discarding   # noqa: SLF001


async def test_a_text_request_continued_by_the_initiator_carries_the_ttt_given_for_it():
    """RFC 7143 11.10.4: the initiator sends its text in pieces (C bit); the target answers
    each with an empty response and a TTT, which the next piece carries. That piece used to be
    rejected (the TTT was looked up among the target's own pieces only)."""
    async with Harness(params()) as h:
        h.send(P.TextRequest(itt=60, cmdsn=1, final=False, cont=True, data=b"SendTar"))
        ask = await h.recv()
        assert isinstance(ask, P.TextResponse) and not ask.final and ask.ttt != RESERVED_TAG
        h.send(P.TextRequest(itt=60, cmdsn=2, final=True, ttt=ask.ttt, data=b"gets=All\0"))
        t = await h.recv()
        assert isinstance(t, P.TextResponse) and t.final
        assert t.data.startswith(b"TargetName=iqn.2026-01.io.zstore:test.t0000\0")


async def test_a_write_with_an_edtl_but_no_w_bit_is_never_run_as_a_write_of_nothing():
    """WRITE(10) of 8 blocks, EDTL 4096, neither R nor W (RFC 7143 §11.3.1: EDTL MUST then be
    0): no data can come. The real LU would write nothing and answer GOOD, and the residual
    (EDTL - 4096) said nothing was missing; it is the iSCSI condition "Incorrect amount of
    data" instead (ABORTED COMMAND 0C/0D, §11.4.7.2), residual the whole EDTL."""
    from chunk.blockdev import MemoryBlockDevice
    from chunk.scsi import LogicalUnit, LunIdentity
    dev = MemoryBlockDevice(1 << 20)
    dev.buf[:4096] = b"\x77" * 4096
    unit = LogicalUnit(dev, LunIdentity(wwn="6" + "5a5354" + "0123456789abcdef012345678", serial="v"),
                       power_on_ua=False)
    async with Harness(params(), unit=unit) as h:
        cdb = struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 8, 0).ljust(16, b"\0")
        h.send(P.ScsiCommand(itt=41, cmdsn=1, lun=P.encode_lun(1), expected_length=4096, cdb=cdb))
        resp = await h.recv()
        assert isinstance(resp, P.ScsiResponse) and resp.itt == 41
        assert resp.status == 2 and (resp.sense[2] & 0x0F, resp.sense[12], resp.sense[13]) == (0x0B, 0x0C, 0x0D)
        assert resp.underflow and resp.residual == 4096
        assert bytes(dev.buf[:4096]) == b"\x77" * 4096
        h.send(P.ScsiCommand(itt=42, cmdsn=2, lun=P.encode_lun(1), expected_length=0, cdb=cdb))
        resp = await h.recv()                                          # EDTL 0: the legal overflow
        assert resp.status == 0 and resp.overflow and resp.residual == 4096
        # R alone (a read's direction) on the same WRITE: no data-out can come either; it was
        # run as a write of nothing and answered GOOD
        h.send(P.ScsiCommand(itt=43, cmdsn=3, lun=P.encode_lun(1), read=True, expected_length=4096,
                             cdb=cdb))
        resp = await h.recv()
        assert isinstance(resp, P.ScsiResponse) and resp.itt == 43
        assert resp.status == 2 and (resp.sense[2] & 0x0F, resp.sense[12], resp.sense[13]) == (0x0B, 0x0C, 0x0D)
        assert resp.underflow and resp.residual == 4096
        assert bytes(dev.buf[:4096]) == b"\x77" * 4096


async def test_a_write_reusing_a_live_itt_with_data_to_follow_closes_the_connection():
    """A second WRITE with the ITT of one still waiting for unsolicited Data-Out, its own data
    to follow (F=0): its Data-Out (that ITT, no TTT) cannot be told from the live task's, which
    took it: the rejected command's data was written at the live one's LBA and answered GOOD.
    A protocol error closes the connection instead; nothing is written."""
    async with Harness(params(first_burst_length=16384, initial_r2t=False)) as h:
        h.send(write10(0, 16, itt=5, cmdsn=1, data=b"A" * 4096, final=False))
        h.send(write10(100, 16, itt=5, cmdsn=2, data=b"B" * 4096, final=False))
        h.send(P.DataOut(itt=5, ttt=RESERVED_TAG, final=True, datasn=0, buffer_offset=4096,
                         data=b"B" * 4096))
        rej = await h.recv()
        assert isinstance(rej, P.Reject) and rej.reason == RejectReason.PROTOCOL_ERROR
        await until(lambda: h.session._ended.is_set())                # noqa: SLF001
        assert h.unit.writes == []


async def test_max_cmdsn_never_goes_back_below_one_already_granted():
    """Immediate commands take window slots without moving ExpCmdSN, which lowered the
    MaxCmdSN computed; the initiator ignores a lower one (RFC 7143 §4.2.2.1) and sends up to
    the one it has, which the target then dropped as out of window: the session stalled."""
    async with Harness(params(), window=4) as h:
        h.send(P.NopOut(itt=1, cmdsn=1))
        nop = await h.recv()
        assert nop.expcmdsn == 2 and nop.maxcmdsn == 5                # CmdSN 2..5 granted
        h.send(P.ScsiCommand(itt=9, cmdsn=2, immediate=True, lun=P.encode_lun(1), cdb=bytes([0xFF]) + bytes(15)))
        for i in range(4):                                            # CmdSN 2, 3, 4, 5
            h.send(P.ScsiCommand(itt=10 + i, cmdsn=2 + i, lun=P.encode_lun(1), cdb=bytes([0xFF, i]) + bytes(14)))
        await until(lambda: h.session.expcmdsn == 6)                  # all four taken
        h.unit.release.set()
        got = [await h.recv() for _ in range(5)]
        assert sorted(r.itt for r in got) == [9, 10, 11, 12, 13]
        assert all(isinstance(r, P.ScsiResponse) and r.status == 0 for r in got)
        assert all(r.maxcmdsn in (5, 6, 7, 8, 9) for r in got) and got[-1].maxcmdsn == 9


async def test_a_data_out_with_a_bad_data_digest_ends_the_connection_at_erl_0():
    """The Data-Out used to be rejected and forgotten: its command waited for data that
    never came (no recovery R2T at ErrorRecoveryLevel 0) until the initiator timed out.
    Now a Reject (data digest error), then the connection ends: session recovery."""
    async with Harness(params(initial_r2t=True, data_digest=True)) as h:
        h.w.write(write10(0, 1, itt=70, cmdsn=1).to_bytes(data_digest=True))
        r2t = await asyncio.wait_for(P.read_pdu(h.r, data_digest=True, opcodes=frozenset(range(0x20, 0x40))), 5)
        assert isinstance(r2t, P.R2T)
        wire = bytearray(P.DataOut(itt=70, ttt=r2t.ttt, final=True, datasn=0, buffer_offset=0,
                                   data=b"\x5a" * 512).to_bytes(data_digest=True))
        wire[-1] ^= 0x01                                              # the data digest
        h.w.write(bytes(wire))
        rej = await asyncio.wait_for(P.read_pdu(h.r, data_digest=True, opcodes=frozenset(range(0x20, 0x40))), 5)
        assert isinstance(rej, P.Reject) and rej.reason == RejectReason.DATA_DIGEST_ERROR
        assert await asyncio.wait_for(h.r.read(), 5) == b""           # the target closed it
        assert h.unit.writes == []


async def test_write_buffers_beyond_the_session_budget_wait_for_their_r2ts():
    """Each WRITE's buffer (up to 8 MiB) was allocated when the command came, data or not:
    128 of them pinned a GiB per connection. Past the session's budget a command now gets
    no buffer (only room for unsolicited data) and its R2Ts wait until one is released."""
    p = params(initial_r2t=True, max_burst_length=65536)
    async with Harness(p, setup=lambda s: setattr(s, "write_buffer_budget", 8192)) as h:
        for i in range(3):
            h.send(write10(16 * i, 16, itt=80 + i, cmdsn=1 + i))     # 8 KiB each, no data yet
        r2t = await h.recv()
        assert isinstance(r2t, P.R2T) and r2t.itt == 80
        await until(lambda: len(h.session.tasks) == 3)
        assert sum(len(t.buf) for t in h.session.tasks.values()) <= 8192
        for i in range(3):
            assert r2t.itt == 80 + i and r2t.desired_length == 8192
            h.send(P.DataOut(itt=80 + i, ttt=r2t.ttt, final=True, datasn=0, buffer_offset=0,
                             data=bytes([i + 1]) * 8192))
            got = [await h.recv() for _ in range(2 if i < 2 else 1)]
            resp = next(x for x in got if isinstance(x, P.ScsiResponse))
            assert resp.itt == 80 + i and resp.status == 0
            r2t = next((x for x in got if isinstance(x, P.R2T)), None)
        assert h.unit.writes == [(16 * i, bytes([i + 1]) * 8192) for i in range(3)]
        assert h.session._buf_bytes == 0 and h.session._buf_full == 0      # noqa: SLF001


async def test_unsolicited_data_beyond_first_burst_length_is_a_protocol_error():
    """RFC 7143 §13.14: immediate plus unsolicited data never exceed FirstBurstLength; a buffer
    made for a command past the budget has room for that much only."""
    async with Harness(params(initial_r2t=False, first_burst_length=4096)) as h:
        h.send(write10(0, 16, itt=90, cmdsn=1, data=b"a" * 2048, final=False))
        h.send(P.DataOut(itt=90, ttt=RESERVED_TAG, final=True, datasn=0, buffer_offset=2048, data=b"b" * 4096))
        rej = await h.recv()
        assert isinstance(rej, P.Reject) and rej.reason == RejectReason.PROTOCOL_ERROR
        assert await asyncio.wait_for(h.r.read(), 5) == b""


async def test_data_out_of_an_aborted_write_is_dropped_not_fatal():
    """libiscsi sends an immediate ABORT TASK ahead of Data-Out it had already queued: the
    unsolicited and the solicited Data-Out of the aborted write come after the TMF. They
    once ended the connection (unsolicited: protocol error) or drew a Reject per PDU."""
    p = params(first_burst_length=8192, max_burst_length=16384, initial_r2t=False)
    async with Harness(p) as h:
        payload = bytes(range(256)) * 128               # 32 KiB
        h.send(write10(10, 64, itt=5, cmdsn=1, data=payload[:4096], final=False))
        await until(lambda: 5 in h.session.tasks)
        h.send(P.TaskMgmtRequest(itt=6, cmdsn=2, immediate=True, function=TmfFunction.ABORT_TASK,
                                 lun=P.encode_lun(1), referenced_task_tag=5, refcmdsn=1))
        tmf = await h.recv()
        assert isinstance(tmf, P.TaskMgmtResponse) and tmf.response == TmfResponse.FUNCTION_COMPLETE
        h.send(P.DataOut(itt=5, ttt=RESERVED_TAG, final=True, datasn=0, buffer_offset=4096,
                         data=payload[4096:8192]))
        # a second write, solicited, aborted with an R2T outstanding
        h.send(write10(20, 16, itt=7, cmdsn=2, data=b"", final=True))
        r2t = await h.recv()
        assert isinstance(r2t, P.R2T) and r2t.itt == 7
        h.send(P.TaskMgmtRequest(itt=8, cmdsn=3, immediate=True, function=TmfFunction.ABORT_TASK,
                                 lun=P.encode_lun(1), referenced_task_tag=7, refcmdsn=2))
        tmf = await h.recv()
        assert isinstance(tmf, P.TaskMgmtResponse) and tmf.response == TmfResponse.FUNCTION_COMPLETE
        h.send(P.DataOut(itt=7, ttt=r2t.ttt, final=True, datasn=0, buffer_offset=0, data=bytes(8192)))
        h.send(P.NopOut(itt=9, cmdsn=3, immediate=True, data=b"still here"))
        nop = await h.recv()
        assert isinstance(nop, P.NopIn) and nop.itt == 9 and nop.data == b"still here"   # no Reject first
        assert h.unit.writes == []


async def test_answers_completed_outside_a_batch_leave_in_pieces():
    """Twenty commands complete together outside a batch (the replicas' replies came in one
    segment): their answers go out FLUSH_EVERY pieces at a time, so the initiator sends its
    next commands while the rest are finished, not all of them at the end of the turn."""
    from chunk.iscsi.session import FLUSH_EVERY
    unit = RecordingUnit()
    sends: list[int] = []

    def count(session):
        real = session.w.writelines

        def writelines(pieces):
            pieces = list(pieces)
            sends.append(len(pieces))
            real(pieces)
        session.w.writelines = writelines
    async with Harness(params(), unit=unit, setup=count) as h:
        for k in range(20):
            h.send(P.ScsiCommand(itt=k + 1, cmdsn=k + 1, lun=P.encode_lun(1),
                                 cdb=bytes([0xFF, k]).ljust(16, b"\0")))
        await until(lambda: len(unit.order) == 20)
        sends.clear()
        unit.release.set()
        got = {(await h.recv()).itt for _ in range(20)}
        assert got == set(range(1, 21))
        assert sum(sends) == 20 and max(sends) <= FLUSH_EVERY, sends
