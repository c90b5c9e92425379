"""CommandLoop: commands from a (fake, bytearray) TCMU ring run through the real
LogicalUnit over a real file-backed BlockDevice, answers land where the kernel reads them."""

from __future__ import annotations

import asyncio
import os
import struct

import pytest

from chunk.blockdev import FileBlockDevice, MemoryBlockDevice
from chunk.scsi import LogicalUnit, LunIdentity
from chunk.tcmu import ring
from chunk.tcmu.loop import CommandLoop
from tests.cluster import until

from .fakering import FakeKernel

WWN = "6" + "5a5354" + "0123456789abcdef012345678"
MiB = 1 << 20


def lu_over(dev) -> LogicalUnit:
    return LogicalUnit(dev, LunIdentity(wwn=WWN, serial="vol-tcmu", lun=1), power_on_ua=False)


def write10(lba: int, n: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, n, 0)


def read10(lba: int, n: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, n, 0)


def tur() -> bytes:
    return bytes(6)


async def settle(k: FakeKernel, ids, timeout: float = 5.0) -> None:
    await until(lambda: all("status" in k.answers[i] for i in ids), f"answers to commands {ids}",
                timeout, 0.005)


@pytest.mark.parametrize("flags", [ring.CAP_OOOC | ring.CAP_READ_LEN, ring.CAP_READ_LEN])
async def test_write_then_read_back_through_the_ring(tmp_path, flags):
    k = FakeKernel(cmdr_size=2048, data_size=4 * MiB, flags=flags)
    dev = FileBlockDevice(tmp_path / "vol.img", 8 * MiB)
    loop = CommandLoop(k, lu_over(dev))
    loop.start()
    try:
        payload = bytes(range(256)) * 256                    # 64 KiB
        w = k.queue(write10(100, 128), payload, iov_split=4096)
        await settle(k, [w])
        assert k.answers[w]["status"] == 0
        assert bytes(await dev.read(100 * 512, len(payload))) == payload
        r = k.queue(read10(100, 128), length=len(payload), iov_split=8192)
        await settle(k, [r])
        assert k.answers[r]["status"] == 0 and k.data_in(r) == payload
        assert k.tail == k.head                               # everything answered
    finally:
        await loop.stop()
        dev.close()
        k.close()


async def test_many_commands_wrap_the_ring_and_all_answer(tmp_path):
    k = FakeKernel(cmdr_size=1024, data_size=4 * MiB)
    dev = MemoryBlockDevice(4 * MiB)
    loop = CommandLoop(k, lu_over(dev))
    loop.start()
    try:
        for rnd in range(6):                                  # 6 x 6 entries of 128 bytes: wraps 4 times
            ids = [k.queue(write10(i * 8, 8), bytes([rnd * 8 + i]) * 4096) for i in range(6)]
            await settle(k, ids)
            assert all(k.answers[i]["status"] == 0 for i in ids)
        for i in range(6):
            assert bytes(await dev.read(i * 8 * 512, 4096)) == bytes([40 + i]) * 4096
        assert loop.commands == 36 and k.tail == k.head
    finally:
        await loop.stop()
        k.close()


async def test_short_data_in_reports_read_len():
    k = FakeKernel()
    loop = CommandLoop(k, lu_over(MemoryBlockDevice(MiB)))
    loop.start()
    try:
        cid = k.queue(bytes([0x12, 0, 0, 0, 255, 0]), length=255)        # INQUIRY, 255 allowed
        await settle(k, [cid])
        a = k.answers[cid]
        assert a["status"] == 0 and a["uflags"] & ring.UFLAG_READ_LEN
        assert 36 <= a["read_len"] < 255
        data = k.data_in(cid)
        assert len(data) == a["read_len"] and data[8:16] == b"ZSTORE  "
    finally:
        await loop.stop()
        k.close()


async def test_scsi_errors_come_back_as_sense_in_the_entry():
    k = FakeKernel()
    loop = CommandLoop(k, lu_over(MemoryBlockDevice(MiB)))
    loop.start()
    try:
        bad = k.queue(read10(1 << 20, 1), length=512)                     # past the end
        unknown = k.queue(bytes([0xC7]) + bytes(5))                        # no such opcode
        await settle(k, [bad, unknown])
        for cid, asc in ((bad, 0x21), (unknown, 0x20)):
            a = k.answers[cid]
            assert a["status"] == 2 and a["sense"][2] & 0x0F == 0x5 and a["sense"][12] == asc
    finally:
        await loop.stop()
        k.close()


async def test_entry_pointing_outside_the_map_fails_with_internal_target_failure():
    k = FakeKernel()
    dev = MemoryBlockDevice(MiB)
    loop = CommandLoop(k, lu_over(dev))
    loop.start()
    try:
        bad = k.queue(write10(0, 1), b"z" * 512, bad_iov=True)
        ok = k.queue(write10(1, 1), b"k" * 512)
        await settle(k, [bad, ok])
        a = k.answers[bad]
        assert a["status"] == 2 and (a["sense"][2] & 0x0F, a["sense"][12]) == (0x4, 0x44)
        assert k.answers[ok]["status"] == 0 and loop.failed_entries == 1
        assert bytes(await dev.read(0, 512)) == bytes(512)                 # nothing written
    finally:
        await loop.stop()
        k.close()


async def test_broken_ring_is_reset_and_serving_goes_on():
    k = FakeKernel()
    loop = CommandLoop(k, lu_over(MemoryBlockDevice(MiB)), reset_ring=k.reset)
    loop.start()
    try:
        k.queue_raw(16 | ring.OP_CMD)                  # a CMD entry too short to answer in
        async def reset():
            while not loop.resets:
                await asyncio.sleep(0.005)
        await asyncio.wait_for(reset(), 5)
        assert k.tail == 0 and k.head == 0
        cid = k.queue(bytes(6))                        # TEST UNIT READY after the reset
        await settle(k, [cid])
        assert k.answers[cid]["status"] == 0
    finally:
        await loop.stop()
        k.close()


async def test_a_new_loop_never_runs_what_was_queued_before_it_started():
    """A loop used to start at the tail and run every entry up to the head: a WRITE queued while
    no server ran (which the kernel may have timed out, the host having since written newer
    data) landed on restart. The kernel fails such entries (reset_ring, by the frontend); the
    loop itself serves only what comes after it starts."""
    k = FakeKernel()
    dev = MemoryBlockDevice(MiB)
    await dev.write(3 * 512, b"N" * 512)                    # newer data, written elsewhere
    w = k.queue(write10(3, 1), b"O" * 512, notify=False)   # queued while no server ran
    loop = CommandLoop(k, lu_over(dev))
    loop.start()
    try:
        os.write(k.w, b"\1\0\0\0")                          # a kick, as for any later command
        await asyncio.sleep(0.1)
        assert "status" not in k.answers[w] and loop.commands == 0
        assert bytes(await dev.read(3 * 512, 512)) == b"N" * 512
    finally:
        await loop.stop()
        k.close()


async def test_restart_after_an_out_of_order_answer_answers_nothing_twice():
    """A answered out of order by B's slot, the server stops with A still running: the next
    loop on the same ring (after the kernel's reset) must not run A or B again (B answered
    twice: the kernel declares the ring broken)."""
    gate = asyncio.Event()

    class Unit:
        def data_out_length(self, cdb):
            return 0

        async def execute(self, cdb, data_out, n, nexus):
            if cdb[0] == 0x28:
                await gate.wait()
            from chunk.scsi import ScsiResult
            return ScsiResult(0, None, None)
    k = FakeKernel()
    loop = CommandLoop(k, Unit())
    loop.start()
    a = k.queue(read10(0, 1), length=512)
    b = k.queue(tur())
    await settle(k, [b])
    await loop.stop(timeout=0.05)                          # A still in flight
    k.reset()                                              # what LioFrontend._attach has the kernel do
    loop2 = CommandLoop(k, Unit())
    loop2.start()
    try:
        c = k.queue(tur())
        await settle(k, [c])
        assert k.answers[c]["status"] == 0 and k.answers[a]["status"] == "reset"
        assert loop2.commands == 1 and k.tail == k.head
    finally:
        await loop2.stop()
        k.close()


async def test_stop_returns_only_after_cancelled_commands_have_finished():
    """stop() used to cancel the commands still running and return at once: the caller then
    closed the mmap under tasks that had not yet unwound."""
    k = FakeKernel(cmdr_size=1024, data_size=1 * MiB)
    gate = asyncio.Event()
    unwound = []

    class Stuck:
        def data_out_length(self, cdb):
            return 0

        async def execute(self, cdb, data_out, n, nexus):
            try:
                await gate.wait()
            finally:
                await asyncio.sleep(0.05)          # still touching state while unwinding
                unwound.append(cdb[0])
    loop = CommandLoop(k, Stuck())
    loop.start()
    try:
        k.queue(read10(0, 1), length=512)
        await asyncio.sleep(0.05)
        assert len(loop._tasks) == 1
        await loop.stop(timeout=0.05)
        assert unwound == [0x28] and not loop._tasks
    finally:
        k.close()


async def test_while_stale_every_command_is_answered_not_ready():
    """The LIO path used to serve commands from a stale catalog (an ACL revoked meanwhile
    included); like the built-in target, it now answers NOT READY, IN PROCESS OF BECOMING READY
    (02/04/01) and runs nothing; REQUEST SENSE gets that sense as data."""
    k = FakeKernel()
    dev = MemoryBlockDevice(MiB)
    stale = [True]
    loop = CommandLoop(k, lu_over(dev), stale=lambda: stale[0])
    loop.start()
    try:
        w = k.queue(write10(3, 1), b"w" * 512)
        rs = k.queue(bytes([0x03, 0, 0, 0, 18, 0]), length=18)
        await settle(k, [w, rs])
        a = k.answers[w]
        assert a["status"] == 2 and (a["sense"][2] & 0x0F, a["sense"][12], a["sense"][13]) == (0x02, 0x04, 0x01)
        assert bytes(await dev.read(3 * 512, 512)) == bytes(512)
        data = k.data_in(rs)
        assert k.answers[rs]["status"] == 0 and (data[2] & 0x0F, data[12], data[13]) == (0x02, 0x04, 0x01)
        stale[0] = False
        w = k.queue(write10(3, 1), b"w" * 512)
        await settle(k, [w])
        assert k.answers[w]["status"] == 0 and bytes(await dev.read(3 * 512, 512)) == b"w" * 512
    finally:
        await loop.stop()
        k.close()
