"""Extent replicas: thin reads, RMW, unmap, checksums, torn writes on disk (no etcd)."""

from __future__ import annotations

import os
from pathlib import Path

import crc32c
import msgpack
import pytest

from chunk.storage import extent_file
from chunk.storage.extent_file import (
    BLOCK_SIZE, EXTENT_SIZE, ChecksumError, ExtentFile, ExtentHeader, HeaderError,
)

SIZE = 64 * BLOCK_SIZE      # small extents keep the tests fast; the default is EXTENT_SIZE


@pytest.fixture
def ext(tmp_path: Path):
    e = ExtentFile.create(tmp_path, "vol1", 3, epoch=2, extent_size=SIZE)
    yield e
    e.close()


def _pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(n))


def test_default_extent_size_and_header_round_trip(tmp_path: Path):
    assert EXTENT_SIZE == 64 << 20
    with ExtentFile.create(tmp_path, "v", 0) as e:
        assert e.size == EXTENT_SIZE and e.allocated_blocks() == []
        assert os.stat(tmp_path / "v.0.data").st_blocks == 0       # sparse
        assert os.path.getsize(tmp_path / "v.0.crc") == EXTENT_SIZE // BLOCK_SIZE * 4
    with ExtentFile.open(tmp_path, "v", 0) as e:
        assert e.header == ExtentHeader("v", 0, 0, 0, EXTENT_SIZE)
    with pytest.raises(FileExistsError):
        ExtentFile.create(tmp_path, "v", 0)


def test_unwritten_reads_as_zeros(ext: ExtentFile):
    assert ext.read(0, SIZE) == bytes(SIZE)
    assert ext.read(100, 5000) == bytes(5000)


def test_aligned_and_unaligned_writes_read_back(ext: ExtentFile):
    model = bytearray(SIZE)
    for off, n, seed in [(0, BLOCK_SIZE, 1), (3 * BLOCK_SIZE, 2 * BLOCK_SIZE, 2),
                         (100, 50, 3), (BLOCK_SIZE - 10, 20, 4), (7 * BLOCK_SIZE + 1, 3 * BLOCK_SIZE, 5),
                         (SIZE - 1, 1, 6)]:
        data = _pattern(n, seed)
        ext.write(off, data)
        model[off:off + n] = data
    assert ext.read(0, SIZE) == model
    assert ext.read(BLOCK_SIZE - 12, 30) == model[BLOCK_SIZE - 12:BLOCK_SIZE + 18]
    assert ext.allocated_blocks() == [0, 1, 3, 4, 7, 8, 9, 10, SIZE // BLOCK_SIZE - 1]
    ext.flush()
    ext.close()
    with ExtentFile.open(ext.base.parent, "vol1", 3) as again:       # checksums persisted
        assert again.read(0, SIZE) == model


def test_allocated_ranges_and_unmap(ext: ExtentFile):
    ext.write(0, _pattern(4 * BLOCK_SIZE))
    ext.write(10 * BLOCK_SIZE, _pattern(BLOCK_SIZE))
    assert ext.allocated_ranges() == [(0, 4 * BLOCK_SIZE), (10 * BLOCK_SIZE, BLOCK_SIZE)]
    ext.unmap(BLOCK_SIZE + 100, 2 * BLOCK_SIZE)       # zero tail of 1, punch 2, zero head of 3
    expect = bytearray(_pattern(4 * BLOCK_SIZE))
    expect[BLOCK_SIZE + 100:3 * BLOCK_SIZE + 100] = bytes(2 * BLOCK_SIZE)
    assert ext.read(0, 4 * BLOCK_SIZE) == expect
    assert ext.allocated_blocks() == [0, 1, 3, 10]
    ext.unmap(0, SIZE)
    assert ext.allocated_blocks() == [] and ext.read(0, SIZE) == bytes(SIZE)


def test_out_of_range_is_rejected(ext: ExtentFile):
    with pytest.raises(ValueError):
        ext.read(SIZE - 1, 2)
    with pytest.raises(ValueError):
        ext.write(-1, b"x")


def _corrupt(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def test_flipped_byte_on_disk_raises_checksum_error_naming_the_block(ext: ExtentFile, tmp_path: Path):
    ext.write(0, _pattern(8 * BLOCK_SIZE))
    ext.flush()
    _corrupt(tmp_path / "vol1.3.data", 5 * BLOCK_SIZE + 17, b"\xff")
    with pytest.raises(ChecksumError) as info:
        ext.read(0, 8 * BLOCK_SIZE)
    assert info.value.block == 5 and "block 5" in str(info.value)
    assert ext.read(0, 5 * BLOCK_SIZE) == _pattern(8 * BLOCK_SIZE)[:5 * BLOCK_SIZE]   # others fine
    with pytest.raises(ChecksumError):                # a partial write needs the old block: RMW fails too
        ext.write(5 * BLOCK_SIZE + 1, b"x")
    ext.write(5 * BLOCK_SIZE, _pattern(BLOCK_SIZE, 9))   # a whole-block write repairs it
    assert ext.read(5 * BLOCK_SIZE, BLOCK_SIZE) == _pattern(BLOCK_SIZE, 9)


def test_torn_write_after_crash_is_detected(ext: ExtentFile, tmp_path: Path):
    """Simulate a crash mid-write: only the first sectors of the new block reached .data
    (the new checksum did), or the new data did but the checksum is still the old one."""
    old, new = _pattern(2 * BLOCK_SIZE, 1), _pattern(2 * BLOCK_SIZE, 2)
    ext.write(0, old)
    ext.flush()
    crc_before = (tmp_path / "vol1.3.crc").read_bytes()
    ext.write(0, new)
    ext.flush()
    ext.close()
    # Torn: block 0 keeps only its first 512 B of new data, the rest is old.
    _corrupt(tmp_path / "vol1.3.data", 512, old[512:BLOCK_SIZE])
    # Stale checksum: block 1 has the new data but the old checksum.
    _corrupt(tmp_path / "vol1.3.crc", 4, crc_before[4:8])
    with ExtentFile.open(tmp_path, "vol1", 3) as e:
        with pytest.raises(ChecksumError) as info:
            e.read(0, BLOCK_SIZE)
        assert info.value.block == 0
        with pytest.raises(ChecksumError) as info:
            e.read(BLOCK_SIZE, 10)
        assert info.value.block == 1


def test_first_write_torn_before_its_checksum_reads_as_zeros(ext: ExtentFile, tmp_path: Path):
    _corrupt(tmp_path / "vol1.3.data", 0, _pattern(BLOCK_SIZE))   # data landed, checksum did not
    assert ext.read(0, BLOCK_SIZE) == bytes(BLOCK_SIZE)


def test_misdirected_block_fails_its_checksum(ext: ExtentFile, tmp_path: Path):
    ext.write(0, _pattern(BLOCK_SIZE))
    ext.write(BLOCK_SIZE, _pattern(BLOCK_SIZE))        # identical contents, other index
    crcs = (tmp_path / "vol1.3.crc").read_bytes()
    assert crcs[0:4] != crcs[4:8]


def test_corrupt_header_is_a_typed_error(ext: ExtentFile, tmp_path: Path):
    ext.close()
    hdr = tmp_path / "vol1.3.hdr"
    raw = bytearray(hdr.read_bytes())
    raw[-1] ^= 1
    hdr.write_bytes(raw)
    with pytest.raises(HeaderError, match="checksum"):
        ExtentFile.open(tmp_path, "vol1", 3)
    with pytest.raises(HeaderError, match="no header"):
        ExtentFile.open(tmp_path, "vol1", 4)


def test_set_header_persists_epoch(ext: ExtentFile, tmp_path: Path):
    ext.set_header(epoch=9, generation=4)
    assert ext.epoch == 9
    with ExtentFile.open(tmp_path, "vol1", 3) as again:
        assert (again.header.epoch, again.header.generation) == (9, 4)


def test_header_with_wrong_field_types_is_rejected():
    body = msgpack.packb({"format": 1, "volume": "v", "extent": "0", "epoch": 0})
    with pytest.raises(HeaderError, match="bad header fields"):
        ExtentHeader.decode(crc32c.crc32c(body).to_bytes(4, "big") + body)


def test_write_block_leaves_the_same_files_as_write(ext: ExtentFile, tmp_path: Path):
    """The 4 KiB hot path: same .data and .crc bytes as ``write``, from bytes or a view."""
    other = ExtentFile.create(tmp_path, "vol1", 4, extent_size=SIZE)
    try:
        blocks = {0: _pattern(BLOCK_SIZE, 1), 5: _pattern(BLOCK_SIZE, 2),
                  SIZE // BLOCK_SIZE - 1: _pattern(BLOCK_SIZE, 3)}
        buf = b"hdr" + blocks[5] + b"tail"
        for b, data in blocks.items():
            other.write(b * BLOCK_SIZE, data)
            ext.write_block(b, memoryview(buf)[3:3 + BLOCK_SIZE] if b == 5 else data)
        ext.write_block(0, blocks[0])                                  # rewrite: same crc
        for suffix in (".data", ".crc"):
            assert (tmp_path / f"vol1.3{suffix}").read_bytes() == \
                (tmp_path / f"vol1.4{suffix}").read_bytes()
        assert ext.crcs == other.crcs and ext.allocated_blocks() == sorted(blocks)
        ext.close()
        with ExtentFile.open(tmp_path, "vol1", 3) as again:           # the crcs were persisted
            assert again.read(5 * BLOCK_SIZE, BLOCK_SIZE) == blocks[5]
    finally:
        other.close()


def test_write_block_errors_are_those_of_write(ext: ExtentFile):
    for index in (-1, SIZE // BLOCK_SIZE):
        with pytest.raises(ValueError, match="outside the extent"):
            ext.write_block(index, bytes(BLOCK_SIZE))
    ext.write_block(2, b"short")                      # not a whole block: a partial write
    assert ext.read(2 * BLOCK_SIZE, 8) == b"short\0\0\0"
    ext.close()
    with pytest.raises(ValueError, match="closed"):
        ext.write_block(0, bytes(BLOCK_SIZE))


def test_large_writes_reach_data_in_small_pieces_even_when_short(ext: ExtentFile, monkeypatch):
    """A 200 KiB write goes to .data as pwrites of at most WRITE_PIECE (large ones would make
    the kernel cache it in large folios, which makes every later 4 KiB write there slow), and
    short pwrites are resumed where they stopped."""
    real = os.pwrite
    sizes: list[int] = []

    def short_pwrite(fd, data, offset):
        if fd == ext._data:                                 # noqa: SLF001
            sizes.append(len(data))
            data = memoryview(data)[:max(BLOCK_SIZE, len(data) // 2)]   # the kernel may stop early
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", short_pwrite)
    payload = _pattern(50 * BLOCK_SIZE, seed=9)
    ext.write(4 * BLOCK_SIZE, payload)
    monkeypatch.undo()
    assert sizes and max(sizes) <= extent_file.WRITE_PIECE and sum(sizes) > len(payload)
    assert ext.read(4 * BLOCK_SIZE, len(payload)) == payload
    with ExtentFile.open(ext.base.parent, "vol1", 3) as again:      # checksums on disk agree
        assert again.read(4 * BLOCK_SIZE, len(payload)) == payload


def test_verify_reports_only_the_unreadable_blocks_of_a_failed_read(ext: ExtentFile, tmp_path: Path,
                                                                  monkeypatch):
    """A media error (EIO) on one block fails the whole 1 MiB read; verify retries block by
    block and reports that block like a checksum failure (both need a peer's copy) instead of
    raising, which made the scrubber abandon the rest of the extent."""
    import errno
    ext.write(0, _pattern(10 * BLOCK_SIZE))
    _corrupt(tmp_path / "vol1.3.data", 7 * BLOCK_SIZE + 3, b"\xff")
    real = os.preadv
    reads: list[tuple[int, int]] = []

    def preadv(fd, buffers, offset):
        length = sum(len(b) for b in buffers)
        if fd == ext._data:                                 # noqa: SLF001
            reads.append((offset, length))
            if offset < 4 * BLOCK_SIZE < offset + length or offset == 4 * BLOCK_SIZE:
                raise OSError(errno.EIO, "Input/output error")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    assert ext.verify(0, SIZE // BLOCK_SIZE) == [4, 7]
    assert (4 * BLOCK_SIZE, BLOCK_SIZE) in reads              # retried alone
    assert all(off // BLOCK_SIZE < 10 for off, _ in reads)     # unwritten blocks not read

    def ebadf(fd, buffers, offset):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(os, "preadv", ebadf)                 # not a media error: still raised
    with pytest.raises(OSError):
        ext.verify(0, 8)
