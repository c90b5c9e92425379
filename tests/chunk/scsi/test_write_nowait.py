"""The write fast path (``LogicalUnit.write_nowait``): taken only for plain writes, and a
write started there answers and orders exactly like one through ``execute``."""

from __future__ import annotations

import asyncio

import pytest

from chunk.blockdev import MediumError, MemoryBlockDevice, NoSpaceError

from .helpers import H1, H2, caw, check, good, inquiry, make_lu, read10, rw6, rw16, run, write10

BS = 512


class NowaitDevice(MemoryBlockDevice):
    """A memory device with a ``write_nowait`` whose futures the test completes."""

    def __init__(self, size: int = 1 << 20) -> None:
        super().__init__(size)
        self.started: list[tuple[int, bytes, asyncio.Future]] = []
        self.decline = False

    def write_nowait(self, offset, data):
        if self.decline:
            return None
        fut = asyncio.get_running_loop().create_future()
        self.started.append((offset, bytes(data), fut))
        return fut

    async def land(self, k: int = -1, error: BaseException | None = None) -> None:
        offset, data, fut = self.started[k]
        if error is None:
            await self.write(offset, data)
            fut.set_result(None)
        else:
            fut.set_exception(error)


async def seen(lu, nexus=H1):
    """The first command of a nexus goes through execute (new nexus): make it known."""
    good(await run(lu, inquiry(), nexus=nexus))


async def test_plain_write_takes_the_fast_path_and_lands():
    dev = NowaitDevice()
    lu = make_lu(dev)
    await seen(lu)
    data = b"A" * (2 * BS)
    fut = lu.write_nowait(write10(8, 2), memoryview(data), H1)
    assert fut is not None and dev.started[0][:2] == (8 * BS, data)
    await dev.land()
    good(lu.finish_nowait(fut))
    assert good(await run(lu, read10(8, 2))) == data
    fut = lu.write_nowait(rw16(0x8A, 3, 1), memoryview(b"B" * BS), H1)    # WRITE(16) too
    assert fut is not None and dev.started[1][0] == 3 * BS


@pytest.mark.parametrize("case", ["new nexus", "unit attention", "fua", "write-through",
                                  "protection", "out of range", "short data", "zero length",
                                  "write(6)", "write and verify", "device declines"])
async def test_unusual_writes_take_the_general_path(case):
    dev = NowaitDevice()
    lu = make_lu(dev, ua=case == "unit attention")
    cdb, data, nexus = write10(0, 1), memoryview(b"x" * BS), H1
    if case != "new nexus":
        lu._seen.add(H1) if case == "unit attention" else await seen(lu)
        if case == "unit attention":
            lu.post_unit_attention((0x29, 0x00), H1)
    if case == "fua":
        cdb = write10(0, 1, 0x08)
    elif case == "write-through":
        lu.modes.wce = False
    elif case == "protection":
        cdb = write10(0, 1, 0x20)
    elif case == "out of range":
        cdb = write10(lu.num_blocks, 1)
    elif case == "short data":
        cdb = write10(0, 2)
    elif case == "zero length":
        cdb, data = write10(0, 0), memoryview(b"")
    elif case == "write(6)":
        cdb = rw6(0x0A, 0, 1)
    elif case == "write and verify":
        cdb = rw16(0x8E, 0, 1)
    elif case == "device declines":
        dev.decline = True
    assert lu.write_nowait(cdb, data, nexus) is None
    assert not dev.started


async def test_read_only_and_reservations_take_the_general_path():
    ro = NowaitDevice()
    ro.readonly = True
    lu = make_lu(ro)
    await seen(lu)
    assert lu.write_nowait(write10(0, 1), memoryview(b"x" * BS), H1) is None
    check(await run(lu, write10(0, 1), b"x" * BS), 0x07, 0x27)          # the general path's answer

    lu = make_lu(NowaitDevice())
    await seen(lu)
    good(await run(lu, bytes([0x16, 0, 0, 0, 0, 0])))                   # SPC-2 RESERVE(6) by H1
    assert lu.write_nowait(write10(0, 1), memoryview(b"x" * BS), H1) is None
    await seen(lu, H2)
    assert (await run(lu, write10(0, 1), b"x" * BS, nexus=H2)).status == 0x18


@pytest.mark.parametrize("error,key,asc", [(MediumError("gone"), 0x03, 0x0C),
                                           (NoSpaceError("full"), 0x07, 0x27)])
async def test_failures_answer_like_the_general_path(error, key, asc):
    dev = NowaitDevice()
    lu = make_lu(dev)
    await seen(lu)
    fut = lu.write_nowait(write10(0, 1), memoryview(b"x" * BS), H1)
    await dev.land(error=error)
    check(lu.finish_nowait(fut), key, asc, 0x07 if isinstance(error, NoSpaceError) else 0x00)


async def test_compare_and_write_waits_for_a_fast_path_write_in_flight():
    dev = NowaitDevice()
    lu = make_lu(dev)
    await seen(lu)
    fut = lu.write_nowait(write10(0, 1), memoryview(b"W" * BS), H1)
    cmp = asyncio.ensure_future(run(lu, caw(0, 1), b"W" * BS + b"C" * BS))
    await asyncio.sleep(0.05)
    assert not cmp.done()                      # atomic: waits for the write in flight
    await dev.land()
    lu.finish_nowait(fut)
    good(await asyncio.wait_for(cmp, 5))       # and compares against its data
    assert good(await run(lu, read10(0, 1))) == b"C" * BS
    # while a COMPARE AND WRITE runs, new writes are not fast-pathed past it
    lu._exclusive = asyncio.Event()
    assert lu.write_nowait(write10(0, 1), memoryview(b"x" * BS), H1) is None
