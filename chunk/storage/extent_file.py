"""One extent replica on a local disk directory, with a checksum per 4 KiB block.

Extent size: 64 MiB (``EXTENT_SIZE``; recorded in each header so it can change
later without a format break).  Why 64 MiB and not 256 MiB:

- the whole checksum table (16384 blocks × 4 B = 64 KiB) is held in memory
  per open extent, so a chunk server with thousands of open extents stays
  cheap, and loading it on open is one small read;
- it is the unit of rebuild: a lost replica is re-copied in well under a
  second at disk speed, and recovery work spreads over many servers;
- placement balances better at finer grain; the price is 16 Ki extent
  records per TiB of volume in the extent map, which is still small.

On-disk layout, three files per extent (a fourth, ``.int``, only on a sole
replica: see below) in the directory ``dir`` with the name ``{volume}.{extent}``::

    .data  sparse, EXTENT_SIZE bytes; block i at offset i*4096
    .crc   EXTENT_SIZE/4096 little-endian uint32: crc32c of block i seeded
           with i (a block written at the wrong offset fails too);
           0 = never written (or unmapped) -> reads as zeros without touching
           .data; a real crc of 0 is stored as 1
    .hdr   crc32c(body) as 4 bytes BE + msgpack body {format, volume, extent,
           generation, epoch, extent_size, block_size}; replaced atomically
    .int   optional intent ring: INT_SLOTS slots of INT_SLOT bytes, each 0 or one
           record: magic, crc32c of the rest, record number (u64), first block,
           count (u32 each, LE), then count new block crcs (u32 LE); magic and
           crc zeroed = no record. Made at an extent's first flagged write.

Crash safety: each write puts the data blocks in ``.data`` *before* their
checksums in ``.crc``; ``flush()`` fdatasyncs ``.data`` then ``.crc``.  A
write that was not flushed (not acknowledged as durable) may reach the disk
in any part: a torn 4 KiB block, new data with the old checksum, or the old
data with the new checksum.  Every such block fails its checksum on read and
raises ``ChecksumError`` naming the block, so torn data is never returned as
good; the replica then takes that block from a peer.  A first write to a
never-written block that tears before its checksum lands reads as zeros,
which is exactly its old contents.  Torn writes are detected, not prevented:
there is no journal, because the other replicas are the journal.
A full disk is not a torn write: it must not leave a block failing its checksum
on a replica that stays up. A write covering present and absent blocks first
allocates its range (``_allocate``), so ENOSPC arrives before any block changed;
should a data write fail part-way anyway, the present blocks it reached get the
checksum of what is now on disk (``_rechecksum``).
An unmap sets the checksums to 0 and fdatasyncs ``.crc`` *before* punching
the data (``punch``), because the file system commits a punch on its own
within seconds: a punched block never meets its old checksum after a power
loss.  That sync happens only when a block of the range was present.

Sole replica (the intent ring, ``.int``): with no peer to repair it, a block whose new
data reached ``.data`` but whose checksum did not (the process SIGKILLed between the two
pwrites) would fail its checksum for ever, although its data is whole (a completed pwrite
is in the page cache; a 4 KiB aligned page is copied whole). A write given ``intent=True``
(the replica store passes it for the sole in-sync replica of an extent) first writes a
record of the new checksums into ``{volume}.{extent}.int``, a ring of ``INT_SLOTS`` slots
of ``INT_SLOT`` bytes made at the first such write, then the data, then the checksums; a
write longer than a slot holds does this piece by piece, and once a piece's checksums are
in, or the piece failed, its record is cleared (its magic zeroed): after a kill, only the
records of writes in flight are left. The ring is allocated whole when made (as ``.crc``),
and one that cannot be made or written (a full disk, EMFILE) is logged and left alone for
``INT_RETRY`` seconds while flagged writes go on without records: the ring only mends, it
never fails a write an unflagged one would not. ``open`` reads the ring: a block whose newest record (highest record
number) names the crc its data has now, while its stored crc is another non-zero one, lost
its checksum write to the kill, and gets it back; then the records are cleared. Anything
else is left to fail as before: rot (the data matches no record), a torn block, an
unmapped block (stored crc 0), data matching only an older record. Clearing completed
records is what keeps a record from outliving its write: a block later given data equal to
it on purpose failing (an import's zero filler under the exporter's crc, after a flagged
WRITE ZEROES) would otherwise be "recovered" into silent zeros. No sync: the ring covers a
process kill, not a host crash (which a flush or FUA covers, as before; after one, a
record whose clearing did not reach the disk may outlive its write). An unflagged write
does no extra work.

Page-cache folio size: ext4 (Linux 6.16+) sizes a file's page-cache folios
by the length of the write or readahead that created them, up to 2 MiB.  A
later 4 KiB write into a large folio walks every buffer of the folio: ~25 µs
of kernel CPU against ~3 µs into a small one (measured on the 2-vCPU CI box,
see bench/README.md).  A block device sees mostly small random writes over
data first laid down by large sequential ones, so ``.data`` is written in
pieces of at most ``WRITE_PIECE`` (32 KiB: +50% CPU on a 1 MiB page-cache
write, a few µs of a 1 MiB command's milliseconds) and opened with
``POSIX_FADV_RANDOM`` (no readahead, so a read brings in only what it asked
for, in small folios).  Reads ask for whole commands anyway.

Calls are synchronous: reads and writes hit the page cache (the event loop
may call them directly, as ``chunk/blockdev.py`` does); ``flush()`` and
``write(..., fua=True)`` wait for the device, so callers on an event loop
run them in a worker thread.  An ``unmap`` of present blocks waits for one
``.crc`` fdatasync (before its punch).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
import struct
import sys
from array import array
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import crc32c as _crc32c
import msgpack

from chunk.blockdev import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from chunk.identity import write_atomic

log = logging.getLogger(__name__)

__all__ = [
    "BLOCK_SIZE", "EXTENT_SIZE", "ExtentError", "ChecksumError", "HeaderError",
    "ExtentHeader", "ExtentFile", "SyncError", "block_crc", "sync_fd",
]

BLOCK_SIZE = 4096
EXTENT_SIZE = 64 << 20
WRITE_PIECE = 32 << 10           # largest pwrite into .data: keeps page-cache folios small
FORMAT = 1
_ZERO_BLOCK = bytes(BLOCK_SIZE)
_MEDIA_ERRORS = (errno.EIO, errno.ENODATA)   # an unreadable sector (ENODATA: "critical medium")
_CRC_ENTRY = struct.Struct("<I")               # one .crc entry, little-endian on any host
# The intent ring (``.int``, module docstring): INT_SLOTS records of at most INT_SLOT bytes,
# each a header (magic, crc32c of the rest of the record, record number, first block, count)
# then ``count`` new block crcs, little-endian.
INT_SLOTS = 8
INT_RETRY = 10                      # seconds before a ring that failed is tried again
INT_SLOT = 4096
INT_MAGIC = 0x5A494E54                          # "ZINT"
_INT_HEAD = struct.Struct("<IIQII")
INT_BLOCKS = (INT_SLOT - _INT_HEAD.size) // 4   # blocks one record covers (1018)
_INT_CLEAR = bytes(8)                            # a record's magic and crc zeroed: no record
_INT_PRE = struct.Struct("<II")                  # magic, crc32c of the rest
_INT_ONE = struct.Struct("<QIII")                # the rest of a one-block record
assert array("I").itemsize == 4, "the .crc format needs 4-byte unsigned ints"


class ExtentError(Exception):
    """Base of the extent store's typed errors."""


class ChecksumError(ExtentError):
    """A block's data does not match its stored checksum (torn write, bit rot)."""

    def __init__(self, path: str, block: int, expected: int, actual: int) -> None:
        super().__init__(f"{path}: block {block} (offset {block * BLOCK_SIZE}) checksum "
                         f"mismatch: stored {expected:#010x}, data {actual:#010x}")
        self.path = path
        self.block = block
        self.expected = expected
        self.actual = actual


class HeaderError(ExtentError):
    """The header file is missing, corrupt, or of an unknown format."""


class SyncError(OSError):
    """An fdatasync (or a directory's fsync) failed. An ``OSError`` with the sync's errno, so
    callers that handle I/O errors still do; its own type tells the replica store to retire
    the replica (``ReplicaStore._durable``): after a failed sync the kernel may have dropped
    the dirty pages it could not write and report success on the next sync."""


def sync_fd(fd: int, data_only: bool = True) -> None:
    """``os.fdatasync(fd)`` (``os.fsync`` if not ``data_only``); a failure is a ``SyncError``.
    Every sync of the extent and replica stores goes through here."""
    try:
        if data_only:
            os.fdatasync(fd)
        else:
            os.fsync(fd)
    except OSError as e:
        raise SyncError(e.errno, f"{'fdatasync' if data_only else 'fsync'}: "
                                 f"{e.strerror or e}") from e


def block_crc(index: int, block: bytes | memoryview) -> int:
    """crc32c of one block seeded with its index; never 0 (0 means unwritten)."""
    return _crc32c.crc32c(block, index & 0xFFFFFFFF) or 1


def block_runs(blocks) -> list[tuple[int, int]]:
    """Ascending block indexes -> (byte offset, length) runs of adjacent blocks."""
    runs: list[tuple[int, int]] = []
    for b in blocks:
        off = b * BLOCK_SIZE
        if runs and runs[-1][0] + runs[-1][1] == off:
            runs[-1] = (runs[-1][0], runs[-1][1] + BLOCK_SIZE)
        else:
            runs.append((off, BLOCK_SIZE))
    return runs


@dataclass(frozen=True)
class ExtentHeader:
    volume: str
    extent: int
    generation: int = 0
    epoch: int = 0
    extent_size: int = EXTENT_SIZE
    block_size: int = BLOCK_SIZE
    format: int = FORMAT

    def encode(self) -> bytes:
        body = msgpack.packb(asdict(self))
        return _crc32c.crc32c(body).to_bytes(4, "big") + body

    @classmethod
    def decode(cls, raw: bytes, path: str = "") -> ExtentHeader:
        if len(raw) < 5:
            raise HeaderError(f"{path}: header truncated ({len(raw)} bytes)")
        body = raw[4:]
        if _crc32c.crc32c(body) != int.from_bytes(raw[:4], "big"):
            raise HeaderError(f"{path}: header checksum mismatch")
        try:
            fields = msgpack.unpackb(body)
        except Exception as e:        # msgpack raises several unrelated types
            raise HeaderError(f"{path}: header is not msgpack: {e}") from None
        if not isinstance(fields, dict) or fields.get("format") != FORMAT:
            raise HeaderError(f"{path}: unknown header format {fields!r:.80}")
        known = {k: fields[k] for k in cls.__dataclass_fields__ if k in fields}
        if not isinstance(known.get("volume"), str) or any(
                type(v) is not int or v < 0 for k, v in known.items() if k != "volume"):
            raise HeaderError(f"{path}: bad header fields {fields!r:.120}")
        try:
            return cls(**known)
        except TypeError as e:
            raise HeaderError(f"{path}: {e}") from None


class ExtentFile:
    """One open extent replica.  Use ``create`` or ``open``; ``close`` when done."""

    def __init__(self, base: Path, header: ExtentHeader, data_fd: int, crc_fd: int,
                 crcs: array) -> None:
        self.base = base
        self.header = header
        self._data = data_fd
        self._crc = crc_fd
        self._crcs = crcs            # in-memory copy of .crc, the one reads verify against
        self._punch = True           # cleared once the file system says EOPNOTSUPP
        self._reserve = True         # likewise for fallocate (_write_blocks)
        self._int = -1               # the intent ring's fd, opened at the first flagged write
        self._int_lock = threading.Lock()    # slot choice only, never held across I/O
        self._int_free = threading.Condition(self._int_lock)
        self._int_held = [False] * INT_SLOTS  # slots of flagged writes in progress
        self._int_next = 1           # the next record's number (above any in the ring)
        self._int_retry = 0.0        # monotonic time before which a failed ring is not tried

    # -- lifecycle -------------------------------------------------------------

    @staticmethod
    def paths(directory: str | os.PathLike, volume: str, extent: int) -> tuple[Path, Path, Path]:
        base = Path(directory) / f"{volume}.{extent}"
        return base.with_name(base.name + ".data"), base.with_name(base.name + ".crc"), \
            base.with_name(base.name + ".hdr")

    @staticmethod
    def intent_path(directory: str | os.PathLike, volume: str, extent: int) -> Path:
        """The extent's intent ring, ``.int`` (module docstring); it may not exist."""
        return Path(directory) / f"{volume}.{extent}.int"

    @classmethod
    def create(cls, directory: str | os.PathLike, volume: str, extent: int, *,
               generation: int = 0, epoch: int = 0,
               extent_size: int = EXTENT_SIZE) -> ExtentFile:
        """Create an empty (all-zero, nothing allocated) extent; fails if it exists."""
        if extent_size <= 0 or extent_size % BLOCK_SIZE:
            raise ValueError(f"extent size {extent_size} is not a multiple of {BLOCK_SIZE}")
        data, crc, hdr = cls.paths(directory, volume, extent)
        if hdr.exists():
            raise FileExistsError(str(hdr))
        # A ring a removed extent of this name left (a crash part-way through removing it)
        # names blocks of other data: gone before the new extent can be opened.
        cls.intent_path(directory, volume, extent).unlink(missing_ok=True)
        blocks = extent_size // BLOCK_SIZE
        for path, size in ((data, extent_size), (crc, blocks * 4)):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, size)
                if path is crc:
                    # Allocated now (0.1% of the extent), so a checksum write never meets a
                    # full disk: only the data write can, and it comes first.
                    os.posix_fallocate(fd, 0, size)
                os.fsync(fd)
            finally:
                os.close(fd)
        header = ExtentHeader(volume, extent, generation, epoch, extent_size)
        write_atomic(hdr, header.encode(), 0o600)   # the header last: it marks the extent complete
        return cls.open(directory, volume, extent)

    @classmethod
    def open(cls, directory: str | os.PathLike, volume: str, extent: int) -> ExtentFile:
        data, crc, hdr = cls.paths(directory, volume, extent)
        try:
            raw = hdr.read_bytes()
        except FileNotFoundError:
            raise HeaderError(f"{hdr}: no header") from None
        header = ExtentHeader.decode(raw, str(hdr))
        if (header.volume, header.extent) != (volume, extent):
            raise HeaderError(f"{hdr}: belongs to {header.volume}.{header.extent}")
        if header.block_size != BLOCK_SIZE or header.extent_size % BLOCK_SIZE:
            raise HeaderError(f"{hdr}: unsupported geometry {header.extent_size}/{header.block_size}")
        data_fd = os.open(data, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.posix_fadvise(data_fd, 0, 0, os.POSIX_FADV_RANDOM)   # small folios (docstring)
        except OSError:
            pass                       # advice only: a file system may not take it
        try:
            crc_fd = os.open(crc, os.O_RDWR | os.O_CLOEXEC)
        except BaseException:
            os.close(data_fd)
            raise
        try:
            blocks = header.extent_size // BLOCK_SIZE
            raw_crcs = os.pread(crc_fd, blocks * 4, 0)
            if len(raw_crcs) != blocks * 4:
                raise HeaderError(f"{crc}: {len(raw_crcs)} bytes, expected {blocks * 4}")
            crcs = array("I")
            crcs.frombytes(raw_crcs)
            if sys.byteorder != "little":
                crcs.byteswap()
        except BaseException:
            os.close(data_fd)
            os.close(crc_fd)
            raise
        ext = cls(hdr.with_suffix(""), header, data_fd, crc_fd, crcs)
        try:
            ext._recover_intents()
        except OSError as e:
            # The ring only mends; without it the extent is what it was before rings existed
            # (a block killed between data and crc fails its checksum): not worth failing
            # the whole open over. A flagged write that cannot use the ring goes on without
            # its record (``_ring_ready``).
            log.warning("%s: intent ring not used at open: %s", ext.base, e)
        except BaseException:
            ext.close()
            raise
        return ext

    def close(self) -> None:
        for fd in (self._data, self._crc, self._int):
            if fd >= 0:
                os.close(fd)
        self._data = self._crc = self._int = -1

    def __enter__(self) -> ExtentFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def size(self) -> int:
        return self.header.extent_size

    @property
    def epoch(self) -> int:
        return self.header.epoch

    def set_header(self, **changes: int) -> None:
        """Durably replace header fields (epoch, generation) before returning."""
        new = replace(self.header, **changes)
        write_atomic(self.base.with_name(self.base.name + ".hdr"), new.encode(), 0o600)
        self.header = new

    # -- I/O -------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """The bytes at [offset, offset+length); every touched block is verified."""
        self._check_range(offset, length)
        if length == 0:
            return b""
        first, last = offset // BLOCK_SIZE, (offset + length - 1) // BLOCK_SIZE
        count = last - first + 1
        start = offset - first * BLOCK_SIZE
        if 0 not in self._crcs[first:first + count]:
            # All present (the common case): one pread into a bytes object and
            # no further copy when aligned; large buffers cost page faults.
            raw = os.pread(self._data, count * BLOCK_SIZE, first * BLOCK_SIZE)
            if len(raw) == count * BLOCK_SIZE:
                self._verify_buf(first, memoryview(raw))
                return raw if start == 0 and length == len(raw) else raw[start:start + length]
        buf = self._read_blocks(first, count)
        return bytes(memoryview(buf)[start:start + length])

    def write(self, offset: int, data: bytes | memoryview, fua: bool = False,
              intent: bool = False) -> None:
        """Write ``data`` at ``offset``; partial blocks are read-modify-write. ``intent``: this is
        the sole replica, record the new checksums in the ring first (module docstring)."""
        view = memoryview(data).cast("B")
        self._check_range(offset, len(view))
        if not view:
            return
        first, last = offset // BLOCK_SIZE, (offset + len(view) - 1) // BLOCK_SIZE
        head, tail = offset % BLOCK_SIZE, (offset + len(view)) % BLOCK_SIZE
        if head or tail:
            # Only the partial edge blocks need their old contents.
            buf = bytearray((last - first + 1) * BLOCK_SIZE)
            if head:
                buf[:BLOCK_SIZE] = self._read_blocks(first, 1)
            if tail and (last != first or not head):
                buf[-BLOCK_SIZE:] = self._read_blocks(last, 1)
            buf[head:head + len(view)] = view
            view = memoryview(buf)
        self._write_blocks(first, view, intent)
        if fua:
            self.flush()

    def write_block(self, index: int, block: bytes | memoryview, intent: bool = False) -> None:
        """``write(index * BLOCK_SIZE, block)`` of exactly one whole block (bytes or a contiguous
        byte view): the replicated 4 KiB write's hot path, without the range and partial-block
        arithmetic and with one crc entry packed instead of an array.  Anything else
        (out of range, closed, another size) goes through ``write`` and fails there alike, as
        does a write with ``intent`` (the sole replica's, not this hot path)."""
        if intent or self._data < 0 or not 0 <= index < len(self._crcs) or len(block) != BLOCK_SIZE:
            if (intent and self._int >= 0 and self._data >= 0 and 0 <= index < len(self._crcs)
                    and len(block) == BLOCK_SIZE):
                self._write_one_intended(index, block)
            else:
                self.write(index * BLOCK_SIZE, block, intent=intent)
            return
        crc = _crc32c.crc32c(block, index & 0xFFFFFFFF) or 1
        off = index * BLOCK_SIZE
        done = os.pwrite(self._data, block, off)     # data before checksums
        while done < BLOCK_SIZE:
            done += os.pwrite(self._data, memoryview(block)[done:], off + done)
        entry = _CRC_ENTRY.pack(crc)
        done = os.pwrite(self._crc, entry, index * 4)
        while done < 4:
            done += os.pwrite(self._crc, entry[done:], index * 4 + done)
        self._crcs[index] = crc                      # after the file: see _store_crcs

    def unmap(self, offset: int, length: int) -> None:
        """Deallocate: whole blocks are punched out, partial edges are zeroed."""
        self.punch([self.unmap_checksums(offset, length)])

    def unmap_checksums(self, offset: int, length: int,
                        intent: bool = False) -> tuple[int, int, bool]:
        """The first half of ``unmap``: partial edges zeroed (written; ``intent`` as in
        ``write``), the whole blocks' checksums set to 0 (file, then memory).  Returns the hole
        for ``punch``: (first byte, end byte, whether any of its blocks was present).  A caller
        unmapping a long range in pieces collects the holes and punches them together (one
        ``.crc`` sync for all)."""
        self._check_range(offset, length)
        end = offset + length
        lo = -(-offset // BLOCK_SIZE) * BLOCK_SIZE       # first whole block
        hi = end // BLOCK_SIZE * BLOCK_SIZE              # end of the last whole block
        if lo >= hi:                                      # inside one block
            self.write(offset, bytes(length), intent=intent)
            return lo, lo, False
        if offset < lo:
            self.write(offset, bytes(lo - offset), intent=intent)
        if hi < end:
            self.write(hi, bytes(end - hi), intent=intent)
        first, count = lo // BLOCK_SIZE, (hi - lo) // BLOCK_SIZE
        present = any(self._crcs[first:first + count])
        if present:
            self._store_crcs(first, array("I", bytes(count * 4)))
        return lo, hi, present

    @property
    def crc_fd(self) -> int:
        """The ``.crc`` file's fd (-1 once closed), for a caller syncing a dup of it."""
        return self._crc

    def punch(self, holes: list[tuple[int, int, bool]], synced: bool = False) -> None:
        """Punch the holes ``unmap_checksums`` returned out of ``.data``.

        Their zeroed checksums are fdatasync'd first when any block was present: a punch is
        a journalled metadata change the file system commits within seconds on its own,
        while a dirty ``.crc`` page may wait ~30 s for writeback, so on a power loss the
        punched (zero) data could meet its old checksum and fail it (a ChecksumError
        where the unmap should read zeros).  Checksum 0 first, durably: a crash in between
        leaves "unwritten" (reads zeros), never zeroed data under an old checksum.  Blocks
        already absent need no sync: their 0 is durable (``create`` or an earlier punch).
        ``synced``: the caller synced ``.crc`` after the last ``unmap_checksums`` itself."""
        holes = [h for h in holes if h[0] < h[1]]
        if not holes or not self._punch:
            return
        if not synced and any(h[2] for h in holes):
            sync_fd(self._crc)
        for lo, hi, _ in holes:
            try:
                fallocate(self._data, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, lo, hi - lo)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._punch = False    # the blocks stay allocated but read as zeros
                return

    def flush(self) -> None:
        """Make every write so far durable: data first, then its checksums.

        Data before checksums is the right order for writes (a first write torn between
        the two reads as zeros, its old contents).  Unmaps need the opposite order, and
        got it already: ``punch`` synced their zeroed checksums before punching."""
        sync_fd(self._data)
        sync_fd(self._crc)

    def allocated_blocks(self) -> list[int]:
        """Indexes of the blocks ever written and not unmapped since."""
        return [i for i, c in enumerate(self._crcs) if c]

    def allocated_ranges(self) -> list[tuple[int, int]]:
        """The allocated blocks as (offset, length) byte runs: what a rebuild copies."""
        return block_runs(self.allocated_blocks())

    # -- for the replica store ---------------------------------------------------

    @property
    def crcs(self) -> array:
        """The in-memory checksum table (0 = absent block); read-only for callers."""
        return self._crcs

    def read_blocks(self, first: int, count: int) -> bytearray:
        """Whole blocks ``first .. first+count-1``, verified (absent ones as zeros)."""
        self._check_range(first * BLOCK_SIZE, count * BLOCK_SIZE)
        return self._read_blocks(first, count)

    def verify(self, first: int, count: int) -> list[int]:
        """Indexes of present blocks in the run whose data fails its checksum or cannot be
        read (a media error: EIO), for the scrub; either way the block needs a peer's copy.

        Reads 1 MiB at a time; one unreadable sector fails the whole read, so a failed read
        is retried block by block and only the blocks that really do not read are reported
        (raising instead abandoned the rest of the extent, on every scrub pass)."""
        self._check_range(first * BLOCK_SIZE, count * BLOCK_SIZE)
        bad = []
        step = 256                              # 1 MiB reads
        for start in range(first, first + count, step):
            n = min(step, first + count - start)
            if not any(self._crcs[start:start + n]):
                continue
            try:
                self._verify_run(start, n, bad)
            except OSError as e:
                if e.errno not in _MEDIA_ERRORS:
                    raise
                for b in range(start, start + n):
                    if not self._crcs[b]:
                        continue
                    try:
                        self._verify_run(b, 1, bad)
                    except OSError as e:
                        if e.errno not in _MEDIA_ERRORS:
                            raise
                        bad.append(b)
        return bad

    def _verify_run(self, start: int, n: int, bad: list[int]) -> None:
        """Append the blocks of ``start .. start+n-1`` that fail their checksum to ``bad``."""
        buf = memoryview(bytearray(n * BLOCK_SIZE))
        done = 0
        while done < len(buf):
            got = os.preadv(self._data, [buf[done:]], start * BLOCK_SIZE + done)
            if got == 0:
                break
            done += got
        for k in range(n):
            stored = self._crcs[start + k]
            if stored and block_crc(start + k, buf[k * BLOCK_SIZE:(k + 1) * BLOCK_SIZE]) != stored:
                bad.append(start + k)

    def allocated_bytes(self) -> int:
        """Bytes the file system allocated for this extent's files."""
        return sum(os.fstat(fd).st_blocks * 512 for fd in (self._data, self._crc, self._int)
                   if fd >= 0)

    # -- internals -------------------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.header.extent_size:
            raise ValueError(f"range {offset}+{length} outside the extent "
                             f"({self.header.extent_size} bytes)")
        if self._data < 0:
            raise ValueError(f"{self.base}: closed")

    def _read_blocks(self, first: int, count: int) -> bytearray:
        buf = bytearray(count * BLOCK_SIZE)
        crcs = self._crcs
        if any(crcs[first:first + count]):
            view = memoryview(buf)
            done = 0
            while done < len(buf):
                n = os.preadv(self._data, [view[done:]], first * BLOCK_SIZE + done)
                if n == 0:
                    break                      # a short data file reads as zeros
                done += n
        path = str(self.base)
        for k in range(count):
            i = first + k
            stored = crcs[i]
            block = memoryview(buf)[k * BLOCK_SIZE:(k + 1) * BLOCK_SIZE]
            if stored == 0:
                block[:] = _ZERO_BLOCK         # unwritten: whatever is on disk is not data
                continue
            actual = block_crc(i, block)
            if actual != stored:
                raise ChecksumError(path, i, stored, actual)
        return buf

    def _verify_buf(self, first: int, view: memoryview) -> None:
        crcs = self._crcs
        for k in range(len(view) // BLOCK_SIZE):
            actual = _crc32c.crc32c(view[k * BLOCK_SIZE:(k + 1) * BLOCK_SIZE],
                                    (first + k) & 0xFFFFFFFF) or 1
            if actual != crcs[first + k]:
                raise ChecksumError(str(self.base), first + k, crcs[first + k], actual)

    def _write_blocks(self, first: int, view: memoryview, intent: bool = False) -> None:
        count = len(view) // BLOCK_SIZE
        crc = _crc32c.crc32c
        if count == 1:                          # the hot path: one 4 KiB block
            new = array("I", [crc(view, first & 0xFFFFFFFF) or 1])
        else:
            new = array("I", [crc(view[k * BLOCK_SIZE:(k + 1) * BLOCK_SIZE], (first + k) & 0xFFFFFFFF) or 1
                              for k in range(count)])
        off = first * BLOCK_SIZE
        done, total = 0, len(view)                  # data before checksums
        if count > 1 and self._reserve:
            # Present blocks beside absent ones: the absent ones need allocating, which can
            # fail (ENOSPC) after earlier pieces overwrote present blocks, leaving new data
            # under old checksums for good. Allocate the whole range first, so a full disk
            # fails the write before anything changed. Only here: a one-block write fails
            # before it changes anything anyway, and a range all present or all absent
            # cannot be corrupted by a failure part-way (absent blocks read as zeros).
            old = self._crcs[first:first + count]
            if 0 in old and any(old):
                self._allocate(off, total)
        if intent and self._ring_ready():
            self._write_intended(first, view, new)
            return
        try:
            while done < total:                     # WRITE_PIECE at a time: small folios
                done += os.pwrite(self._data, view[done:done + WRITE_PIECE], off + done)
        except OSError:
            if done:
                self._rechecksum(first, done, new)
            raise
        self._store_crcs(first, new)

    def _allocate(self, off: int, length: int) -> None:
        """Allocate ``.data``'s [off, off+length) before a write (``_write_blocks``).

        The libc ``fallocate`` with ``FALLOC_FL_KEEP_SIZE``, not ``os.posix_fallocate``:
        ``.data`` is already ``extent_size`` long (``create`` truncates it so), so the size
        is the same either way, but KEEP_SIZE guarantees it; and where the file system has no
        fallocate, glibc's ``posix_fallocate`` emulates it by writing a byte into every block
        (slow, and itself a write that can fail part-way), while the syscall says EOPNOTSUPP:
        then this is skipped from then on and ``_rechecksum`` is the only safeguard."""
        try:
            fallocate(self._data, FALLOC_FL_KEEP_SIZE, off, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            self._reserve = False

    def _rechecksum(self, first: int, done: int, new: array) -> None:
        """A ``.data`` write failed after ``done`` bytes (a full disk despite ``_allocate``:
        a copy-on-write file system, a present block whose data never reached the disk).
        Present blocks it overwrote get the checksum of what is now on disk, or they would
        fail theirs forever: a wholly written block the new one, a partly written one that of
        its bytes read back. Absent blocks stay absent: they still read as zeros, their old
        contents. Best effort: if that fails too, the original error is the one raised."""
        whole, part = divmod(done, BLOCK_SIZE)
        fixed = array("I", self._crcs[first:first + whole + (1 if part else 0)])
        for k in range(len(fixed)):
            if not fixed[k]:
                continue
            if k < whole:
                fixed[k] = new[k]
            else:
                try:
                    block = os.pread(self._data, BLOCK_SIZE, (first + k) * BLOCK_SIZE)
                except OSError:
                    return
                fixed[k] = block_crc(first + k, block.ljust(BLOCK_SIZE, b"\0"))
        if fixed != self._crcs[first:first + len(fixed)]:
            try:
                self._store_crcs(first, fixed)
            except OSError:
                pass

    def _store_crcs(self, first: int, new: array) -> None:
        """Checksums to the file, then to memory. The other order let a failed write (a full
        disk allocating the sparse ``.crc``) leave memory ahead of the file: reads and flushes
        went on fine, and after a restart the block failed its checksum on every replica."""
        raw = new
        if sys.byteorder != "little":
            raw = array("I", new)
            raw.byteswap()
        data = memoryview(raw).cast("B")        # no copy
        done = os.pwrite(self._crc, data, first * 4)
        while done < len(data):
            done += os.pwrite(self._crc, data[done:], first * 4 + done)
        self._crcs[first:first + len(new)] = new

    # -- the intent ring (module docstring) ----------------------------------------

    def _write_intended(self, first: int, view: memoryview, new: array) -> None:
        """``_write_blocks``' pwrites for a sole replica: per piece of at most ``INT_BLOCKS``
        blocks, its record in a slot no other write in progress holds, then its data, then
        its crcs, then the record cleared. The slot is held until then, so no later record
        overwrites it while this one is still the only trace of them."""
        count = len(new)
        for k in range(0, count, INT_BLOCKS):
            m = min(INT_BLOCKS, count - k)
            piece = new[k:k + m]
            slot, number = self._take_slot()
            recorded = False
            try:
                recorded = self._put_record(slot, number, first + k, piece)
                off, total, done = (first + k) * BLOCK_SIZE, m * BLOCK_SIZE, 0
                part = view[k * BLOCK_SIZE:(k + m) * BLOCK_SIZE]
                try:
                    while done < total:
                        done += os.pwrite(self._data, part[done:done + WRITE_PIECE], off + done)
                except OSError:
                    if done:
                        self._rechecksum(first + k, done, piece)
                    raise
                self._store_crcs(first + k, piece)
            finally:
                if recorded:
                    # Failed or not, the write is over: a record left behind could later
                    # "restore" a block that fails on purpose (an import's filler).
                    self._clear_record(slot)
                self._free_slot(slot)

    def _write_one_intended(self, index: int, block: bytes | memoryview) -> None:
        """``write_block`` with ``intent`` (a sole replica's 4 KiB write): ``_write_intended``
        for one block, without its arrays and loops (once the ring is open)."""
        crc = _crc32c.crc32c(block, index & 0xFFFFFFFF) or 1
        slot, number = self._take_slot()
        recorded = False
        try:
            rest = _INT_ONE.pack(number, index, 1, crc)
            record = _INT_PRE.pack(INT_MAGIC, _crc32c.crc32c(rest)) + rest
            at = slot * INT_SLOT
            try:
                done = os.pwrite(self._int, record, at)
                while done < len(record):
                    done += os.pwrite(self._int, record[done:], at + done)
                recorded = True
            except OSError as e:
                self._ring_failed(e)            # the write goes on without its record
            off = index * BLOCK_SIZE
            done = os.pwrite(self._data, block, off)
            while done < BLOCK_SIZE:
                done += os.pwrite(self._data, memoryview(block)[done:], off + done)
            entry = _CRC_ENTRY.pack(crc)
            done = os.pwrite(self._crc, entry, index * 4)
            while done < 4:
                done += os.pwrite(self._crc, entry[done:], index * 4 + done)
            self._crcs[index] = crc                  # after the file: see _store_crcs
        finally:
            if recorded:
                self._clear_record(slot)             # failed or not (``_write_intended``)
            self._free_slot(slot)

    def _take_slot(self) -> tuple[int, int]:
        """(a slot no flagged write in progress holds, the number of the record to put in it);
        waits if every slot is held (``INT_SLOTS`` flagged writes at once)."""
        with self._int_lock:
            while True:
                number = self._int_next
                start = number % INT_SLOTS
                held = self._int_held
                for j in range(INT_SLOTS):
                    slot = (start + j) % INT_SLOTS
                    if not held[slot]:
                        held[slot] = True
                        self._int_next = number + 1
                        return slot, number
                self._int_free.wait()

    def _free_slot(self, slot: int) -> None:
        with self._int_lock:
            self._int_held[slot] = False
            self._int_free.notify()

    def _put_record(self, slot: int, number: int, first: int, crcs: array) -> bool:
        """Write record ``number`` into ``slot`` (page cache only: a process kill keeps it);
        whether it was. A ring that fails is logged and the write goes on without its record:
        the ring only mends, it must never refuse a write."""
        if self._int < 0 and not self._ring_ready():
            return False
        body = array("I", crcs)
        if sys.byteorder != "little":
            body.byteswap()
        rest = struct.pack("<QII", number, first, len(crcs)) + body.tobytes()
        record = _INT_PRE.pack(INT_MAGIC, _crc32c.crc32c(rest)) + rest
        try:
            done = os.pwrite(self._int, record, slot * INT_SLOT)
            while done < len(record):
                done += os.pwrite(self._int, record[done:], slot * INT_SLOT + done)
        except OSError as e:
            self._ring_failed(e)
            return False
        return True

    def _ring_ready(self) -> bool:
        """Whether the ring is open, opening it if needed. One that cannot be opened and
        allocated (a full disk, EMFILE, something else at its path) is logged and tried again
        ``INT_RETRY`` seconds later; meanwhile flagged writes go without records, as before
        rings existed (a full disk must fail a write no sooner than an unflagged one would)."""
        if self._int >= 0:
            return True
        if time.monotonic() < self._int_retry:
            return False
        try:
            self._open_ring()
        except OSError as e:
            self._ring_failed(e)
            return False
        return True

    def _ring_failed(self, e: OSError) -> None:
        if time.monotonic() >= self._int_retry:
            log.warning("%s: intent ring not used for %d s: %s", self.base, INT_RETRY, e)
        self._int_retry = time.monotonic() + INT_RETRY

    def _open_ring(self) -> None:
        """Open (creating) ``.int`` and allocate it whole, so a record's pwrite never meets a
        full disk (as ``.crc``, allocated at ``create``): at the first flagged write of an
        extent that has none."""
        with self._int_lock:
            if self._int < 0:
                if self._data < 0:
                    raise ValueError(f"{self.base}: closed")
                path = self.base.with_name(self.base.name + ".int")
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    os.posix_fallocate(fd, 0, INT_SLOTS * INT_SLOT)
                except BaseException:
                    os.close(fd)
                    raise
                self._int = fd

    def _clear_record(self, slot: int) -> None:
        """Invalidate the record in ``slot``: its write is over, done or failed. Best effort: a
        record left behind is what the ring held before clearing was added (a risk only to a
        block later given its data while failing on purpose)."""
        try:
            os.pwrite(self._int, _INT_CLEAR, slot * INT_SLOT)
        except OSError:
            pass

    def _recover_intents(self) -> None:
        """``open``'s recovery from the ring (module docstring): each block's newest record
        is checked, and a block whose data has that record's crc while its stored crc is
        another non-zero one gets the record's crc (file, then memory). Every such block is
        logged; every other state is left as it is. The records are cleared after (their
        writes are over); new ones are numbered above them all the same."""
        path = self.base.with_name(self.base.name + ".int")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        self._int = fd
        raw = os.pread(fd, INT_SLOTS * INT_SLOT, 0)
        newest: dict[int, tuple[int, int]] = {}        # block -> (record number, its crc)
        top = 0
        valid = []
        blocks = len(self._crcs)
        for slot in range(INT_SLOTS):
            at = slot * INT_SLOT
            if len(raw) < at + _INT_HEAD.size:
                break
            magic, crc, number, first, count = _INT_HEAD.unpack_from(raw, at)
            end = at + _INT_HEAD.size + 4 * count
            if (magic != INT_MAGIC or not 0 < count <= INT_BLOCKS or end > len(raw)
                    or first + count > blocks or _crc32c.crc32c(raw[at + 8:end]) != crc):
                continue
            top = max(top, number)
            valid.append(slot)
            crcs = array("I")
            crcs.frombytes(raw[at + _INT_HEAD.size:end])
            if sys.byteorder != "little":
                crcs.byteswap()
            for k in range(count):
                had = newest.get(first + k)
                if had is None or had[0] < number:
                    newest[first + k] = (number, crcs[k])
        self._int_next = top + 1
        fixed = []
        for b in sorted(newest):
            stored, want = self._crcs[b], newest[b][1]
            if not stored or stored == want:
                continue
            block = os.pread(self._data, BLOCK_SIZE, b * BLOCK_SIZE).ljust(BLOCK_SIZE, b"\0")
            actual = block_crc(b, block)
            if actual == want and actual != stored:
                self._store_crcs(b, array("I", [actual]))
                fixed.append(b)
        for slot in valid:
            self._clear_record(slot)
        try:
            os.posix_fallocate(fd, 0, INT_SLOTS * INT_SLOT)    # as ``_open_ring``
        except OSError:
            self._int = -1                  # the first flagged write tries again (_ring_ready)
            os.close(fd)
        if fixed:
            log.warning("%s: %d block(s) had new data under the old checksum (a write killed "
                        "before its checksum landed); checksums restored from the intent "
                        "ring: blocks %s", self.base, len(fixed), fixed[:32])
