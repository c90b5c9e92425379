"""VERIFY with BYTCHK=0 checks the medium: an unreadable block fails as READ does."""

from __future__ import annotations

import pytest

from chunk.blockdev import MediumError, MemoryBlockDevice

from .helpers import check, good, make_lu, read10, run, rw10, rw12, rw16

BAD = 4096                      # byte offset of an unreadable block: LBA 8


class BadBlockDevice(MemoryBlockDevice):
    """A memory device whose block at byte ``BAD`` cannot be read; records each read."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.reads: list[tuple[int, int]] = []

    async def read(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        if offset <= BAD < offset + length:
            raise MediumError("unrecovered read")
        return await super().read(offset, length)


@pytest.mark.parametrize("cdb", [rw10(0x2F, 0, 16), rw12(0xAF, 0, 16), rw16(0x8F, 0, 16)],
                         ids=["VERIFY10", "VERIFY12", "VERIFY16"])
async def test_verify_without_compare_fails_on_an_unreadable_block_as_read_does(cdb):
    lu = make_lu(BadBlockDevice(1 << 20))
    check(await run(lu, read10(0, 16)), 0x3, 0x11, 0x00)
    check(await run(lu, cdb), 0x3, 0x11, 0x00)


async def test_verify_without_compare_of_readable_blocks_is_good():
    lu = make_lu(BadBlockDevice(1 << 20))
    assert good(await run(lu, rw10(0x2F, 9, 100))) == b""
    assert good(await run(lu, rw10(0x2F, 9, 0))) == b""        # no blocks: nothing to read


async def test_verify_reads_the_whole_range_in_bounded_pieces():
    dev = BadBlockDevice(16 << 20)
    lu = make_lu(dev)
    n = lu.limits.max_transfer                                  # the largest VERIFY allowed
    good(await run(lu, rw16(0x8F, 16, n)))
    pieces = dev.reads
    assert pieces[0][0] == 16 * 512 and sum(length for _, length in pieces) == n * 512
    assert all(a + la == b for (a, la), (b, _) in zip(pieces, pieces[1:]))     # contiguous
    assert max(length for _, length in pieces) < n * 512                  # never all at once
