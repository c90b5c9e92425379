"""Every extent replica on this chunk server's disks, with copy-on-write snapshot versions.

Snapshots are sequence numbers (docs/storage.md, "Snapshots"): each live 4 KiB
block remembers the seq it was last written at; writing block b at seq W when
b is present with seq w < W first preserves the old block as a *version*
(origin=w, key=W-1).  A view at seq s reads the version with origin <= s <= key,
else the live block if its seq <= s, else the block is absent at s.

On-disk layout per extent, in the disk directory (``v`` = volume, ``i`` = index)::

    v.i.data/.crc/.hdr  live data, crc32c per block, header (``ExtentFile``)
    v.i.int             the intent ring of a sole replica's writes (``ExtentFile``; only
                        once a write with ``sole`` came)
    v.i.seq             uint32 LE per block: seq the block was last written or
                        unmapped at (0 = never; an unmap of an absent block keeps
                        its seq); absent blocks keep theirs so a revert knows they
                        changed after the snapshot
    v.i.v/K.ver         versions with key K, sparse: per block b at b*8 a slot
                        (crc32c seeded with b, 0 = none; origin; uint32 LE),
                        then from the next 4 KiB boundary block b's data at b*4096

A block has at most one version per key (once written at W its seq is W, so
its next version gets a larger key), hence one file per key with a
fixed slot per block.  ``trim`` punches dropped versions out of ``K.ver`` and
unlinks a key's file once it holds nothing: the space really is freed.
Versions are verified against their crc on every read, like live blocks.

Order of a write at seq W (crash safety):

1. COW: the old blocks are read (verified) and written to ``K.ver``, the
   file is fdatasync'd, then their slots are written and the file (and the
   directory, for a new key) fdatasync'd again, all *before* step 3, so a
   snapshot's block that was durable stays durable whatever the page cache
   writes back first.  Two syncs, not one: the slot page is overwritten in
   place while the data lands in newly allocated sparse space, so a power
   loss during a single sync could leave the slot on disk over a hole, and
   the retried write (below) would keep that rotten version and overwrite
   the live block, the only good copy.  Checking on load instead (a rotten
   version whose live block still verifies at its origin is copied again)
   cannot tell that state from a version that rotted after a completed COW
   whose ``.seq`` did not reach the disk, and would then serve the new data
   as the snapshot's.  This costs two fdatasyncs per write call that had to
   preserve blocks (the first overwrite of a block after a snapshot), never
   on the no-snapshot path (``cow_sync=False`` turns them off, for tests or
   when the caller accepts snapshot loss on a host crash).
2. ``.seq`` := W for the range.  A block that is absent with seq w < W
   (W > 1) has no version: only its seq keeps the new data out of the
   snapshots in [max(w, 1), W-1], so ``.seq`` is fdatasync'd *before* step 3
   (else writeback could leave the new data and crc under the old seq).  One
   fdatasync per write call that makes an absent block present since a
   snapshot of the volume (its first write, or first since an unmap); none
   when the volume never had a snapshot (W = 1), the block is present, or
   its seq is already W (off with ``cow_sync=False`` too).
3. live data, then its crcs (``ExtentFile.write``); ``fua`` then flushes. A write with
   ``sole`` (the coordinator's: this is the extent's only in-sync replica, so no peer can
   repair a block killed between its data and its crc) writes an intent record first
   (``ExtentFile``'s ``intent``), from which the next open restores such a crc. So do
   the zeros of an ``unmap`` and the blocks a ``revert`` writes back, given ``sole``;
   an import's and a mend's writes never carry it (they come from a peer).

SIGKILL of the process loses nothing that a completed ``pwrite`` put in the
page cache, so every acknowledged write survives.  Killed between steps, the
state is still consistent: versions win over live data in a view, so a
version written in step 1 is correct whatever happens to the live block; a
retried write finds the (b, W-1) version already there and keeps it (a
version is never overwritten by a later COW into the same key); seq W with
the old data (killed after 2) just means the unacknowledged write did not
happen.  ``flush`` fdatasyncs versions, the ``.v`` directory (after
unlinks), ``.seq``, then live data and crcs, so flushed writes survive a host
crash; an unflushed block torn on disk fails its checksum (``ChecksumError``),
it is never returned silently.  A present block whose new data reached the
disk under its old seq still has its version (synced in step 1): views read
it, and ``revert`` counts a block with a version newer than the target as
changed whatever its seq says.

Unmaps zero crcs and fdatasync ``.crc`` before punching (``ExtentFile.punch``,
once per call, only if a block was present).  Removing versions: ``drop``
fdatasyncs the zeroed slots before punching their data; a trim that unlinks
a key's file fsyncs ``.v`` before returning, an import's unlinks are made
durable by the flush its resync ends with.  A mend that stops before writing
the slots of a version file it created (``mend_async``) unlinks that file if
it still holds no slot (in a file that was there, punches the data it wrote
that has no slot), with no sync: brought back by a power loss, the file holds
no slot either and loading drops it.

Errors: ENOSPC/EDQUOT from the file system -> ``StoreFull`` and the disk is
marked full (until a delete or trim frees space on it, or ``usage`` finds room
for an extent on it again); EROFS marks the disk
failed (so does EIO in ``create``, which then tries another disk); a failed
fdatasync/fsync anywhere (``SyncError`` from ``sync_fd``: a flush, and the syncs
inside writes, unmaps, reverts, imports, mends and trims) retires the replica
(``_retire``: ``broken`` from then on, an EIO fails its disk); other
``OSError`` -> ``StoreIOError``; checksum failures -> ``ChecksumError``; stale epochs ->
``StaleEpochError``; a generation going back -> ``StaleGeneration``.  Calls are
synchronous (page-cache I/O); only ``flush``, ``fua`` writes, COW writes, writes
making an absent block present since a snapshot, unmaps of present blocks and
trims wait for the device.  ``flush_async`` and ``set_generation_async`` run
their fdatasync in a worker thread and the rest, a failed flush's clean-up
included, in the event loop's, where every call that changes the store runs;
so does a write given its caller's ``epoch`` that must wait for the device (a
COW, an absent block made present across a snapshot): ``write`` returns it as a
coroutine (``_write_later``), its syncs group-committed per file.
"""

from __future__ import annotations

import asyncio
import bisect
import errno
import hashlib
import logging
import os
import shutil
import stat
import struct
import sys
import threading
from array import array
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from itertools import compress
from pathlib import Path
from typing import Any, Callable, Coroutine, Iterator, NoReturn

import msgpack

from chunk.blockdev import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate

from .extent_file import (
    _MEDIA_ERRORS, BLOCK_SIZE, EXTENT_SIZE, ChecksumError, ExtentError, ExtentFile, ExtentHeader,
    SyncError, block_crc, sync_fd,
)
from .fencing import EpochFence

log = logging.getLogger(__name__)

__all__ = ["StoreError", "NoExtent", "StoreFull", "StoreIOError", "StaleGeneration", "BadBlob",
           "ReplicaStore", "Unmended", "Verdict", "checked_state_of", "unreadable_blocks"]

_MAX_SEQ = 0xFFFFFFFF
_CHUNK = 1 << 20                     # internal unit of large unmaps / reverts


def _pieces(start: int, end: int) -> Iterator[tuple[int, int]]:
    """[start, end) in pieces of at most ``_CHUNK`` bytes that end on block boundaries (but
    the last): only the range's own edges are partial blocks, zeroed rather than punched."""
    a = start
    while a < end:
        b = min(end, a // BLOCK_SIZE * BLOCK_SIZE + _CHUNK)
        yield a, b
        a = b
_ENTRY = struct.Struct("<II")        # version slot: crc, origin
_SEQ = struct.Struct("<I")           # one .seq entry
_BLOB_FORMAT = 1
# A blob naming blocks the exporter could not read: an importer that predates it refuses the
# format outright instead of reading the missing data as absent (zeros).
_BLOB_FORMAT_UNREADABLE = 2
_LITTLE = sys.byteorder == "little"


class StoreError(Exception):
    """Base of the replica store's errors."""


class NoExtent(StoreError):
    """The extent has no replica on this server."""


class StoreFull(StoreError):
    """No space: the file system said ENOSPC, or no disk can take a new extent."""


class StoreIOError(StoreError):
    """The disk failed an I/O (EIO and friends)."""


class BadBlob(StoreError):
    """An export blob that does not decode, fails a check, or covers another range than the
    one asked for: the peer that sent it misbehaves (nothing of it was applied)."""


class StaleGeneration(StoreError):
    """SETGEN would lower the extent's generation: a replica whose generation went backwards
    would look in sync with an older replica set. ``current`` is the extent's generation."""

    def __init__(self, vid: str, idx: int, generation: int, current: int) -> None:
        super().__init__(f"extent {vid}/{idx}: generation {generation} is below its "
                         f"generation {current}; a generation never goes back")
        self.current = current


def _le(a: array) -> bytes:
    if _LITTLE:
        return a.tobytes()
    b = array("I", a)
    b.byteswap()
    return b.tobytes()


def _from_le(raw: bytes) -> array:
    a = array("I")
    a.frombytes(raw)
    if not _LITTLE:
        a.byteswap()
    return a


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _pread_all(fd: int, length: int, offset: int) -> bytearray:
    buf = bytearray(length)
    view = memoryview(buf)
    done = 0
    while done < length:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break                     # short sparse file: the rest reads as zeros
        done += n
    return buf


def _remove_extent(base: Path) -> None:
    """Delete an extent's files, the header first: without it the rest is garbage a restart
    ignores."""
    for suffix in (".hdr", ".data", ".crc", ".seq", ".int"):
        base.with_name(base.name + suffix).unlink(missing_ok=True)
    shutil.rmtree(_vdir(base), ignore_errors=True)
    _fsync_dir(base.parent)


def _copy_allocated(base: Path) -> int:
    """Bytes allocated to an extent's files (``_Replica.allocated``'s, from the paths: data,
    checksums, seqs, versions); files gone (or never made) count nothing. Any other
    ``OSError`` is raised (``_kept_bytes`` counts that copy as nothing)."""
    paths = [base.with_name(base.name + suffix) for suffix in (".data", ".crc", ".seq", ".int")]
    try:
        with os.scandir(_vdir(base)) as found:
            paths += [Path(e.path) for e in found if e.name.endswith(".ver")]
    except OSError as e:
        if e.errno not in _DIR_GONE:
            raise
    total = 0
    for path in paths:
        try:
            total += os.lstat(path).st_blocks * 512
        except OSError as e:
            if e.errno not in _DIR_GONE:
                raise
    return total


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        sync_fd(fd, data_only=False)
    finally:
        os.close(fd)


class _Versions:
    """The versions of one extent with one key, in one file ``K.ver``.

    The file starts with a slot per block (crc, origin; crc 0 = no version),
    ``blocks * 8`` bytes, then block b's data at ``data_at + b*4096``.  One
    file means one fd and one fdatasync per COW; it is sparse, so only the
    versions present take space.
    """

    def __init__(self, vdir: Path, key: int, blocks: int, create: bool) -> None:
        self.key = key
        self.path = vdir / f"{key}.ver"
        self.data_at = -(-blocks * 8 // BLOCK_SIZE) * BLOCK_SIZE
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if create else 0)
        self.fd = os.open(self.path, flags, 0o600)
        self._lock = threading.Lock()        # self.fd against a concurrent close (sync)
        self.group: _GroupSync | None = None  # COWs' syncs (``ReplicaStore._write_later``)
        self.dir_group: _GroupSync | None = None  # its creation's directory fsyncs (same)
        self.unlinked_dirs: list[Path] = []  # directories to fsync before it is relied on
        self.entries: dict[int, tuple[int, int]] = {}     # block -> (origin, crc)
        self._punch = True
        if not create:
            try:
                raw = _from_le(bytes(_pread_all(self.fd, blocks * 8, 0)))
            except BaseException:
                self.close()
                raise
            for b in [k for k, c in enumerate(raw[0::2]) if c]:
                self.entries[b] = (raw[2 * b + 1], raw[2 * b])

    def read(self, block: int, fd: int | None = None) -> bytes:
        """Block ``block``'s version, verified; through ``fd`` (a dup of ``self.fd``) if given."""
        origin, crc = self.entries[block]
        fd = self.fd if fd is None else fd
        data = os.pread(fd, BLOCK_SIZE, self.data_at + block * BLOCK_SIZE)
        if len(data) != BLOCK_SIZE:
            data = data + bytes(BLOCK_SIZE - len(data))
        actual = block_crc(block, data)
        if actual != crc:
            raise ChecksumError(str(self.path), block, crc, actual)
        return data

    def check(self, block: int, fd: int | None = None) -> bool:
        try:
            self.read(block, fd)
        except ChecksumError:
            return False
        return True

    def put(self, blocks: list[tuple[int, int, bytes | memoryview]], barrier: bool = False) -> None:
        """Store (block, origin, data) versions: all data first, then their slots.

        ``barrier``: fdatasync the data before writing the slots.  A slot page is shared and
        overwritten in place, while the data goes to new sparse space whose allocation is
        durable only at the journal commit: one fdatasync of both, cut by a power loss, can
        leave a slot on disk over a hole.  A COW needs the barrier (``_cow``)."""
        self.put_data(blocks)
        if barrier:
            sync_fd(self.fd)
        self.put_slots(blocks)

    def put_data(self, blocks: list[tuple[int, int, bytes | memoryview]]) -> None:
        """``put``'s first half: the versions' data, no slot yet (nothing reads it)."""
        for b, _, data in blocks:
            _pwrite_all(self.fd, data, self.data_at + b * BLOCK_SIZE)

    def put_slots(self, blocks: list[tuple[int, int, bytes | memoryview]]) -> None:
        """``put``'s second half: the slots of data written (and, for a COW, synced) before.

        All or none: a slot write failing part-way (a full disk allocating a new slot page)
        takes back the slots this call wrote. Left, they were unsynced slots a retried COW
        trusted ("keeps the first copy"): it synced nothing and overwrote the live block,
        and a power loss could keep that block and lose the slot, the snapshot's copy."""
        done: list[tuple[int, tuple[int, int] | None]] = []      # (block, its slot before)
        try:
            for b, origin, data in blocks:
                crc = block_crc(b, data)
                before = self.entries.get(b)
                os.pwrite(self.fd, _ENTRY.pack(crc, origin), b * 8)
                self.entries[b] = (origin, crc)
                done.append((b, before))
        except OSError:
            for b, before in reversed(done):
                if before is None:
                    self.entries.pop(b, None)
                else:
                    self.entries[b] = before
                try:                        # a page just written: no allocation to fail
                    os.pwrite(self.fd, _ENTRY.pack(before[1], before[0]) if before else bytes(8),
                              b * 8)
                except OSError:
                    pass       # a COW's slot over data synced before it: still valid
            raise

    def put_unreadable(self, blocks: list[tuple[int, int, int]]) -> None:
        """Store (block, origin, crc) versions whose data no replica could read: a filler
        under the original crc, so a view of them fails its checksum as on the exporter."""
        for b, _, crc in blocks:
            _pwrite_all(self.fd, _filler(b, crc), self.data_at + b * BLOCK_SIZE)
        for b, origin, crc in blocks:
            os.pwrite(self.fd, _ENTRY.pack(crc, origin), b * 8)
            self.entries[b] = (origin, crc)

    def punch_unslotted(self, blocks: list[int]) -> None:
        """Punch the data of those of ``blocks`` that have no slot (a mend's, stopped before
        its slots): nothing reads it, so unlike ``drop`` no sync comes first."""
        gone = sorted(b for b in blocks if b not in self.entries)
        if not self._punch or not gone:
            return
        for start, n in _runs(gone):
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                          self.data_at + start * BLOCK_SIZE, n * BLOCK_SIZE)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._punch = False
                return

    def drop(self, blocks: list[int]) -> None:
        """Forget versions: slots zeroed and fdatasync'd, then the data punched.

        The punch is a journalled metadata change the file system commits within seconds
        on its own; a zeroed slot in the page cache may wait ~30 s for writeback.  Without
        the sync a power loss could pair a live slot with punched data: a rotten version."""
        for b in blocks:
            os.pwrite(self.fd, bytes(8), b * 8)
            self.entries.pop(b, None)
        if not self._punch or not blocks:
            return
        sync_fd(self.fd)
        for start, n in _runs(sorted(blocks)):
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                          self.data_at + start * BLOCK_SIZE, n * BLOCK_SIZE)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._punch = False
                return

    def sync(self) -> None:
        """fdatasync the file; a version closed meanwhile (trim, import) needs none.

        ``flush`` runs in a worker thread while the event loop may close the
        fd: syncing a private dup, taken under the lock ``close`` holds, never
        hits a closed fd (EBADF would break a healthy replica) nor a number
        reused by another file, and the loop never waits for the device.
        """
        with self._lock:
            if self.fd < 0:
                return
            fd = os.dup(self.fd)
        try:
            sync_fd(fd)
        finally:
            os.close(fd)

    def allocated(self) -> int:
        fd = self.fd
        return os.fstat(fd).st_blocks * 512 if fd >= 0 else 0

    def close(self) -> None:
        with self._lock:
            fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def unlink(self) -> None:
        """Unlink, then close: an unlink that fails leaves the file open and usable (closed
        first, it stayed the key's file with fd -1, and every COW or import into the key
        failed EBADF until a restart)."""
        self.path.unlink(missing_ok=True)
        self.close()


_DISK_GONE = (errno.EROFS, errno.EIO)    # a create failing so tries another disk
# A create failing so tries another disk only if the disk's own directory is gone
# (``_dir_gone``): the same errno for a file of one extent is that extent's error.
_DIR_GONE = (errno.ENOENT, errno.ENOTDIR)


@dataclass
class _Disk:
    path: Path
    limit: int | None
    failed: bool = False          # the store saw it fail (EIO, EROFS): until a restart
    enospc: bool = False
    replicas: set = field(default_factory=set)     # (vid, idx) on this disk
    error: str | None = None                       # why it failed
    probe_error: str | None = None  # the server's last disk probe failed it (set_probe_error)
    scanned: bool = False           # its headers were listed at the start: its extents are known
    # It failed to prepare at startup (``failed=``): never scanned, opened or written (no
    # mkdir on an unmounted disk's mount point), its extents unknown, until a restart.
    failed_at_start: bool = False
    # (st_dev, st_ino) of its directory when opened: a CREATE checks it is still that one
    # (``_dir_gone``), not an unmounted disk's empty mount point on the root filesystem.
    ident: tuple[int, int] | None = None

    def placeable(self) -> bool:
        return not (self.failed or self.enospc or self.probe_error)

    def fail(self, why: str) -> None:
        if not self.failed:
            log.error("disk %s failed: %s; no new extents there", self.path, why)
        self.failed, self.error = True, self.error or why


class _Replica:
    """One open extent replica: live ExtentFile + seq table + versions by key."""

    def __init__(self, disk: _Disk, ext: ExtentFile, seq_fd: int, seqs: array,
                 vdir: Path) -> None:
        self.disk = disk
        self.ext = ext
        self.seq_fd = seq_fd
        self.seqs = seqs
        self.vdir = vdir
        self.versions: dict[int, _Versions] = {}
        self.keys: list[int] = []              # sorted keys of self.versions
        self.mutations = 0
        self.imports = 0                       # IMPORTs applied: they can bring back trimmed versions
        self.cows = 0                          # COWs that made versions (the reclaimer's memo)
        self.vdir_dirty = False                # a version file unlinked, the directory not fsync'd
        self.seq_group: _GroupSync | None = None   # ``.seq`` syncs of writes that wait for them
        self.crc_group: _GroupSync | None = None   # ``.crc`` syncs of unmaps that wait for them
        self.busy: dict[int, _Hold] = {}       # block -> the deferred write/unmap holding it
        self.pending = 0                       # deferred writes/unmaps in progress (holds)
        # A lower bound of the seqs of present blocks: a write at W <= floor
        # cannot need COW, the no-snapshot fast path.
        self.floor = min((s for s in seqs if s), default=_MAX_SEQ)

    @property
    def blocks(self) -> int:
        return len(self.seqs)

    def base(self) -> Path:
        return self.ext.base

    def load_versions(self) -> None:
        if not self.vdir.is_dir():
            return
        for p in self.vdir.glob("*.ver"):
            if not p.name[:-4].isdigit():
                continue                     # not ours (a stray or temporary file)
            key = int(p.name[:-4])
            v = _Versions(self.vdir, key, self.blocks, create=False)
            if v.entries:
                self.versions[key] = v
            else:
                v.unlink()
        self.keys = sorted(self.versions)

    def versions_for(self, key: int, sync_dir: bool = True) -> _Versions:
        """The version file of ``key``, created if need be and its directory entry fsync'd;
        ``sync_dir=False`` leaves that fsync to the caller (``unlinked_dirs`` names what to
        sync until it is done: ``ReplicaStore._cow_later`` does it in a worker thread)."""
        v = self.versions.get(key)
        if v is None:
            new_dir = not self.vdir.is_dir()
            self.vdir.mkdir(mode=0o700, exist_ok=True)
            v = _Versions(self.vdir, key, self.blocks, create=True)
            self.versions[key] = v
            bisect.insort(self.keys, key)
            v.unlinked_dirs = [self.vdir, self.vdir.parent] if new_dir else [self.vdir]
        if sync_dir and v.unlinked_dirs:          # new, or made by a deferred COW not synced yet
            self.sync_dirs(v)
        return v

    @staticmethod
    def sync_dirs(v: _Versions) -> None:
        """fsync the directories ``v``'s creation changed (any thread: it opens its own fds)."""
        for d in v.unlinked_dirs:
            _fsync_dir(d)
        v.unlinked_dirs = []

    def drop_key_if_empty(self, key: int) -> None:
        v = self.versions.get(key)
        if v is not None and not v.entries:
            self.vdir_dirty = True             # before: a failed unlink may still have happened
            v.unlink()
            del self.versions[key]
            self.keys.remove(key)

    def sync_vdir(self) -> None:
        """fsync ``.v`` if a version file was unlinked since: without it a power loss can
        bring a trimmed version file back, slots and all."""
        if self.vdir_dirty:
            self.vdir_dirty = False            # first: an unlink meanwhile sets it again
            try:
                _fsync_dir(self.vdir)
            except FileNotFoundError:
                pass                           # the extent was deleted meanwhile
            except BaseException:
                self.vdir_dirty = True
                raise

    def store_seqs(self, first: int, new: array) -> None:
        """File first, memory after: a write that fails (a full disk allocating the sparse
        ``.seq``) leaves memory saying what the file says, so a retry writes it again."""
        if self.seqs[first:first + len(new)] == new:
            return
        _pwrite_all(self.seq_fd, _le(new), first * 4)
        self.seqs[first:first + len(new)] = new

    def store_seq(self, block: int, seq: int) -> None:
        """``store_seqs`` of one block whose seq differs (the 4 KiB write path)."""
        _pwrite_all(self.seq_fd, _SEQ.pack(seq), block * 4)
        self.seqs[block] = seq

    def view_source(self, block: int, s: int) -> _Versions | None:
        """The version holding ``block`` at view ``s``, if any."""
        for key in self.keys[bisect.bisect_left(self.keys, s):]:
            e = self.versions[key].entries.get(block)
            if e is not None:
                return self.versions[key] if e[0] <= s else None
        return None

    def block_versions(self, first: int, end: int) -> dict[int, list[tuple[int, int, int]]]:
        """block -> [(key, origin, crc)] (keys ascending) for blocks in [first, end)."""
        out: dict[int, list[tuple[int, int, int]]] = {}
        for key in list(self.keys):          # copies: verify runs in a worker thread
            v = self.versions.get(key)
            if v is None:
                continue
            entries = v.entries
            if end - first < len(entries):
                items = ((b, entries.get(b)) for b in range(first, end))
            else:
                items = ((b, e) for b, e in list(entries.items()) if first <= b < end)
            for b, e in items:
                if e is not None:
                    out.setdefault(b, []).append((key, e[0], e[1]))
        return out

    def flush(self) -> None:
        """Versions, unlinks of versions, ``.seq``, then ``.data`` and ``.crc``.

        ``.seq`` before ``.crc``: a block written at W must never be on disk with its new
        data and checksum under its old seq, which would let older snapshots read it (for
        a block that was absent) and a revert skip it.  ``.seq`` after the versions: seq W
        durable without the version of the old block would lose it from snapshots."""
        for v in list(self.versions.values()):      # may run in a worker thread
            v.sync()
        self.sync_vdir()
        sync_fd(self.seq_fd)
        self.ext.flush()

    def allocated(self) -> int:
        return (self.ext.allocated_bytes() + os.fstat(self.seq_fd).st_blocks * 512
                + sum(v.allocated() for v in list(self.versions.values())))

    def close(self) -> None:
        for v in self.versions.values():
            v.close()
        self.ext.close()
        if self.seq_fd >= 0:
            os.close(self.seq_fd)
            self.seq_fd = -1


class _VerifyPin:
    """Private dups of the fds ``verify`` reads of one replica, for a worker thread.

    The event loop may close a replica's fds while a worker reads through them (DELETE,
    the reclaimer's trim dropping a version file, a failed flush retiring the replica),
    and a closed number can be reused at once by another ``open``: the worker then read
    another file's bytes (false checksum errors handed to repair, or EBADF/ESPIPE taken
    for I/O errors). Dup'd on the loop, these keep the files open and their numbers
    unused until ``close``, whatever the replica closes meanwhile; the worker reads the
    (possibly unlinked) files that were this replica's when the pin was taken."""

    def __init__(self, rep: _Replica) -> None:
        self.rep = rep
        self.fds: list[int] = []
        self.versions: dict[int, tuple[_Versions, int]] = {}    # key -> (version, its dup)
        try:
            data = os.dup(rep.ext._data)                # noqa: SLF001 - verify reads .data only
            self.fds.append(data)
            # .crc is not read (verify checks against the in-memory table): no fd for it.
            self.ext = ExtentFile(rep.ext.base, rep.ext.header, data, -1, rep.ext.crcs)
            for key, v in list(rep.versions.items()):
                if v.fd >= 0:
                    fd = os.dup(v.fd)
                    self.fds.append(fd)
                    self.versions[key] = (v, fd)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)


def _bad_blocks(bad_live, bad_versions) -> list[int]:
    """``verify``'s answer from ``_verify_detail``'s: blocks whose live data or a version fails."""
    return sorted(set(bad_live) | {b for b, _key in bad_versions})


@dataclass(frozen=True, eq=False)
class Verdict:
    """What a verify in a worker thread found (``verify_verdict_async``), and the replica state
    it holds for: ``rep`` still open here with ``mutations`` unchanged. ``mend`` given it
    (``verified``) trusts it instead of reading on the loop, once it checked that."""
    rep: _Replica
    mutations: int
    first: int
    count: int
    bad_live: frozenset[int]                   # live blocks that fail (or do not read)
    bad_versions: frozenset[tuple[int, int]]   # (block, key) of versions that fail

    @property
    def bad(self) -> list[int]:
        """``verify``'s answer: blocks whose live data or a version fails."""
        return _bad_blocks(self.bad_live, self.bad_versions)


@dataclass(frozen=True)
class Unmended:
    """A mend (``ReplicaStore.mend``) that ran to its end but left something of its run failing:
    the peer's blob had no good copy of it (unreadable there too, as an import's filler is;
    that version missing there, or under another origin). Falsy, as a mend that did not
    happen: the block still fails. What it could replace is replaced (the repair flushes it
    and tries the next peer); ``live`` / ``versions`` ((block, key)) are what is left."""
    live: frozenset[int]
    versions: frozenset[tuple[int, int]]

    def __bool__(self) -> bool:
        return False


class _GroupSync:
    """Group commit of one file's fdatasyncs for writes that wait for them (``_write_later``).

    ``wait()`` is a future done once a sync *begun after the call* has completed: waiters
    arriving while one runs share the next, so a burst of COWs into one version file costs
    two syncs, not two each. ``prepare`` runs on the loop as each sync starts and returns
    what the worker thread runs (a sync of a private dup: the loop may close the file)."""

    def __init__(self, prepare: Callable[[], Callable[[], None]]) -> None:
        self._prepare = prepare
        self._current: asyncio.Future | None = None     # done when the running sync ends
        self._next: asyncio.Future | None = None        # done when the one after it ends

    def wait(self) -> asyncio.Future:
        if self._current is None:
            self._current = self._start(asyncio.get_running_loop().create_future())
            return self._current
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        return self._next

    def _start(self, target: asyncio.Future) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        try:
            work = loop.run_in_executor(None, self._prepare())
        except OSError as e:
            target.set_exception(e)
            loop.call_soon(self._ended, None, target)
            return target
        work.add_done_callback(lambda w: self._ended(w, target))
        return target

    def _ended(self, work: asyncio.Future | None, target: asyncio.Future) -> None:
        if work is not None and not target.done():
            if work.cancelled():
                target.cancel()
            elif work.exception() is not None:
                target.set_exception(work.exception())   # type: ignore[arg-type]
            else:
                target.set_result(None)
        self._current = None
        if self._next is not None:
            nxt, self._next = self._next, None
            self._current = self._start(nxt)


class _Hold:
    """The blocks of a deferred write or unmap, or a mend (``mend_async``), in progress
    (``_Replica.busy``).

    Its steps leave slots and ``.seq`` entries written but not yet synced between awaits; a
    second write of those blocks meanwhile would trust them (skip the COW, take the fast path)
    and its live data could reach the disk first. So nobody else writes them until this one is
    over, its last sync included even when it was cancelled (the sync runs on regardless):
    writes of busy blocks with an epoch are deferred and wait here (``take``)."""

    def __init__(self, rep: _Replica, first: int, n: int) -> None:
        self.rep, self.blocks = rep, range(first, first + n)
        self.done = asyncio.get_running_loop().create_future()
        self.sync: asyncio.Future | None = None          # the sync being waited for

    async def take(self) -> None:
        busy = self.rep.busy
        while True:
            others = {h.done for b in self.blocks if (h := busy.get(b)) is not None}
            if not others:
                break
            await asyncio.wait(others)
        for b in self.blocks:
            busy[b] = self
        self.rep.pending += 1

    def release(self) -> None:
        if self.sync is not None and not self.sync.done():
            self.sync.add_done_callback(lambda _f: self._free())
        else:
            self._free()

    def _free(self) -> None:
        busy = self.rep.busy
        for b in self.blocks:
            if busy.get(b) is self:
                del busy[b]
        self.rep.pending -= 1
        if not self.done.done():
            self.done.set_result(None)


def _sync_dup(fd: int) -> None:
    """fdatasync a private dup of an fd (a worker thread), then close it."""
    try:
        sync_fd(fd)
    finally:
        os.close(fd)


def _run_syncs(jobs: list[Callable[[], None]]) -> None:
    """Run every one of ``jobs`` (syncs; each closes the dup it was given), then raise the
    first failure: one failing does not leak the dups of the others."""
    failed: BaseException | None = None
    for job in jobs:
        try:
            job()
        except BaseException as e:  # noqa: BLE001 - raised below, after the others ran
            failed = failed or e
    if failed is not None:
        raise failed


def _settle_lost_seqs(seqs: array, ext: ExtentFile) -> array:
    """Present blocks whose seq on disk is 0 get seq 1, in memory (at open).

    No write stores seq 0, but a write at seq 1 syncs nothing before its checksum (no
    snapshot can have seen the block absent), so a power loss can keep its ``.crc`` entry and
    lose its ``.seq`` one. Such a block was written at seq 1: an absent block made present at
    a higher seq had its ``.seq`` synced first (step 2; not when an unmap at that seq had
    raised the seq in memory only, a known gap). Left at 0 it fell below the COW floor
    (a snapshot's first overwrite made no copy: the snapshot read it absent) and exported as
    seq 0, which an import refuses (a resync from it failed for good). The file keeps its 0
    until the block is written again; every open settles it alike."""
    crcs = ext.crcs
    lost = [b for b in compress(range(len(seqs)), crcs) if not seqs[b]] if 0 in seqs else []
    for b in lost:
        seqs[b] = 1
    if lost:
        log.warning("%s: %d present block(s) had no seq on disk (a power loss before their "
                    "write at seq 1 was flushed): taken as seq 1", ext.base, len(lost))
    return seqs


def _seq_path(base: Path) -> Path:
    return base.with_name(base.name + ".seq")


def _vdir(base: Path) -> Path:
    return base.with_name(base.name + ".v")


def _check_seq(seq: int) -> None:
    if type(seq) is not int or not 0 < seq <= _MAX_SEQ:
        raise ValueError(f"seq {seq!r} out of range 1..{_MAX_SEQ}")


class ReplicaStore:
    """All extent replicas on this server's disks; see the module docstring."""

    def __init__(self, disks: list[tuple[str | Path, int | None]], *,
                 failed: dict[str | Path, str] | None = None,
                 extent_size: int = EXTENT_SIZE, cow_sync: bool = True) -> None:
        """``disks``: (path, byte limit or None) of every configured disk. ``failed``: path ->
        why, for those of them that failed to prepare at startup (not mounted, unreadable
        disk-id): kept (after the others) so a missing extent answers "may be there" and the
        disk is reported failed, but nothing there is scanned, opened, served or created."""
        self.extent_size = extent_size
        self.cow_sync = cow_sync
        self.fence = EpochFence()
        self.bad: list[Path] = []
        # Extents whose files are here but did not open (a flipped bit in the header, EIO):
        # they answer IO errors, never NO_EXTENT, which a coordinator reads as zeros.
        self.broken: dict[tuple[str, int], tuple[str, Path]] = {}    # -> (why, its .hdr)
        # More .hdr files of a broken extent than the one ``broken`` names (two copies of it on
        # two disks that could not be told apart): a DELETE removes them all.
        self._more_copies: dict[tuple[str, int], list[Path]] = {}
        # .hdr of a kept copy whose files did not stat -> the errno logged (``_kept_bytes``).
        self._kept_unread: dict[Path, int | None] = {}
        # fn(volume, index, why), called by ``_retire`` once a copy is ``broken`` (on the loop):
        # the scrubber's (``Scrubber._copy_retired``) keeps the copy's reports before a reclaim
        # or a resync removes it. Must be cheap; an exception is logged, never raised.
        self.retire_listeners: list[Callable[[str, int, str], None]] = []
        self._disks: list[_Disk] = []
        self._replicas: dict[tuple[str, int], _Replica] = {}
        copies: dict[tuple[str, int], list[tuple[_Disk, Path, ExtentHeader]]] = {}
        held = {Path(p): why for p, why in (failed or {}).items()}
        # Failed ones last: the scrubber keeps its cursor on the first disk (_default_cursor).
        for path, limit in sorted(disks, key=lambda d: Path(d[0]) in held):
            disk = _Disk(Path(path), limit)
            self._disks.append(disk)
            if disk.path in held:
                disk.failed_at_start = True
                disk.fail(f"it failed at startup: {held[disk.path]}")
                continue
            try:
                disk.path.mkdir(parents=True, exist_ok=True)
                st = os.stat(disk.path)
                disk.ident = (st.st_dev, st.st_ino)
                self.bad.extend(self.fence.scan(disk.path))
                headers = sorted(disk.path.glob("*.hdr"))
            except OSError as e:
                disk.fail(f"it did not open: {e}")
                continue
            disk.scanned = True
            for hdr in headers:
                if hdr in self.bad:
                    self._broken(hdr, "its fence record did not read")
                    continue
                try:
                    header = ExtentHeader.decode(hdr.read_bytes(), str(hdr))
                except (ExtentError, OSError, ValueError) as e:
                    self.bad.append(hdr)
                    self._broken(hdr, str(e))
                    continue
                copies.setdefault((header.volume, header.extent), []).append((disk, hdr, header))
        for key, found in copies.items():
            if key in self.broken:
                # Another copy's header did not read: its generation is unknown, so the one
                # that did read may be the stale one. Neither is served (``_choose_copy``).
                self.bad.extend(hdr for _, hdr, _ in found)
                self._more_copies[key] = [hdr for _, hdr, _ in found]
                continue
            disk, hdr, _ = self._choose_copy(key, found)
            if disk is None:
                continue
            try:
                self._replicas[key] = self._open(disk, *key)
                disk.replicas.add(key)
            except (ExtentError, StoreError, OSError, ValueError) as e:
                self.bad.append(hdr)
                self._broken(hdr, str(e))
                self._more_copies[key] = [c[1] for c in found if c[1] != hdr]
                continue
            self._drop_stale_copies(key, [c for c in found if c[1] != hdr])
        for key, (why, _) in self.broken.items():
            log.error("extent %s/%d is on disk but does not open (%s): it answers I/O errors "
                      "until it is repaired or deleted", key[0], key[1], why)

    def _choose_copy(self, key: tuple[str, int], found: list[tuple[_Disk, Path, ExtentHeader]]
                     ) -> tuple[_Disk | None, Path, ExtentHeader | None]:
        """Which of an extent's copies to open at the start, whatever the disks' order.

        Two copies on two disks happen when one disk was unmounted (or failed) while the
        extent was created again on another, then came back. The one with the highest
        generation is the later resync target made in sync (SETGEN); the lower ones are stale,
        and are removed once it opened (``_drop_stale_copies``). When the highest generation is
        not unique, nothing tells them apart: neither is served, both are ``broken`` (I/O
        errors, never stale data as good) until a DELETE, or a CREATE discarding them,
        removes both. Returns (disk, hdr, header) to open, or disk None."""
        if len(found) == 1:
            return found[0]
        top = max(h.generation for _, _, h in found)
        best = [c for c in found if c[2].generation == top]
        where = ", ".join(f"{d.path} (generation {h.generation})" for d, _, h in found)
        if len(best) == 1:
            log.warning("extent %s/%d has copies on %s: serving the one of generation %d",
                        key[0], key[1], where, top)
            return best[0]
        why = f"copies on several disks with the same generation: {where}"
        self.bad.extend(hdr for _, hdr, _ in found)
        self.broken[key] = (f"it did not open: {why}", found[0][1])
        self._more_copies[key] = [hdr for _, hdr, _ in found[1:]]
        return None, found[0][1], None

    def _drop_stale_copies(self, key: tuple[str, int],
                           stale: list[tuple[_Disk, Path, ExtentHeader]]) -> None:
        """Remove the copies of ``key`` older than the one opened. One that does not go would
        come back as the only copy after a DELETE of the opened one: then the extent is not
        served at all (``broken``, with every copy to remove on DELETE)."""
        left = []
        for disk, hdr, header in stale:
            log.warning("extent %s/%d: removing the stale copy on %s (generation %d)",
                        key[0], key[1], disk.path, header.generation)
            if self._leftover(hdr.with_name(hdr.name[:-len(".hdr")])):
                left.append(hdr)
        if left:
            rep = self._replicas.pop(key)
            rep.disk.replicas.discard(key)
            rep.close()
            self.bad.extend(left)
            why = f"it did not open: stale copies that would not go: {', '.join(map(str, left))}"
            self.broken[key] = (why, rep.base().with_name(rep.base().name + ".hdr"))
            self._more_copies[key] = left

    def _broken(self, hdr: Path, why: str) -> None:
        """Remember the extent ``hdr`` names (``<volume>.<index>.hdr``) as broken."""
        vid, _, idx = hdr.name[:-len(".hdr")].rpartition(".")
        if vid and idx.isdigit() and (vid, int(idx)) not in self._replicas:
            if (vid, int(idx)) in self.broken:     # a second copy that does not open either
                self._more_copies.setdefault((vid, int(idx)), []).append(hdr)
                return
            self.broken[(vid, int(idx))] = (f"it did not open: {why}", hdr)

    # -- lifecycle -------------------------------------------------------------

    def _open(self, disk: _Disk, vid: str, idx: int) -> _Replica:
        ext = ExtentFile.open(disk.path, vid, idx)
        try:
            seq_path = _seq_path(ext.base)
            seq_fd = os.open(seq_path, os.O_RDWR | os.O_CLOEXEC)
        except BaseException:
            ext.close()
            raise
        rep = None
        try:
            want = ext.size // BLOCK_SIZE * 4
            raw = bytes(_pread_all(seq_fd, want, 0))
            if os.fstat(seq_fd).st_size != want:
                raise StoreError(f"{seq_path}: {os.fstat(seq_fd).st_size} bytes, expected {want}")
            rep = _Replica(disk, ext, seq_fd, _settle_lost_seqs(_from_le(raw), ext), _vdir(ext.base))
            rep.load_versions()
            return rep
        except BaseException:
            if rep is not None:
                rep.close()
            else:
                ext.close()
                os.close(seq_fd)
            raise

    def close(self) -> None:
        for rep in self._replicas.values():
            rep.close()
        self._replicas.clear()

    def __enter__(self) -> ReplicaStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _fail(disk: _Disk | None, e: OSError) -> StoreError:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            if disk is not None:
                disk.enospc = True
            return StoreFull(str(e))
        if e.errno == errno.EROFS and disk is not None:
            disk.fail(str(e))             # remounted read-only: nothing new can go there
        return StoreIOError(str(e))

    def set_probe_error(self, path: str | Path, error: str | None) -> None:
        """The chunk server's disk probe says the disk at ``path`` failed (``error``: its
        disk-id vanished, it is read-only...) or is fine again (None). A failed one takes no
        new extent; what is open on it still serves what it can."""
        for disk in self._disks:
            if disk.path == Path(path):
                disk.probe_error = error

    @contextmanager
    def _io(self, disk: _Disk | None) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            raise self._fail(disk, e) from e

    @contextmanager
    def _rep_io(self, rep: _Replica) -> Iterator[None]:
        """``_io`` for a call that changes ``rep``: a failed sync retires it (``_failed``)."""
        try:
            yield
        except OSError as e:
            raise self._failed(rep, e) from e

    def _failed(self, rep: _Replica, e: OSError) -> StoreError:
        """The store error for ``e`` from an I/O on ``rep``. A failed sync (``SyncError``: the
        fdatasyncs inside a write, unmap, revert, import, mend or trim, not only ``flush``'s)
        retires the replica as ``_durable`` does: pages the kernel could not write back may be
        gone while the page cache, and the next sync, say they are there."""
        if isinstance(e, SyncError):
            self._retire(rep, e)
        return self._fail(rep.disk, e)

    def _get(self, vid: str, idx: int) -> _Replica:
        rep = self._replicas.get((vid, idx))
        if rep is None:
            self._absent(vid, idx)
        return rep

    def _absent(self, vid: str, idx: int) -> NoReturn:
        broken = self.broken.get((vid, idx))
        if broken is not None:
            raise StoreIOError(f"extent {vid}/{idx} is here but unusable: {broken[0]}")
        lost = next((d for d in self._disks if d.failed or d.probe_error), None)
        if lost is not None:
            # Not "not here": it may sit on the disk that did not open or mount (an unmounted
            # disk shows its empty mount point). NO_EXTENT from every replica once made the
            # coordinator create the extent afresh, empty; an I/O error drops this replica.
            raise StoreIOError(f"extent {vid}/{idx} is not on a usable disk here, and disk "
                               f"{lost.path} is unusable ({lost.error or lost.probe_error}): "
                               f"it may be there")
        raise NoExtent(f"extent {vid}/{idx} is not on this server")

    def _used(self, disk: _Disk) -> tuple[int, int]:
        """(capacity, used) bytes of a disk: our allocations against a limit, else the fs.
        Ours are the open replicas' and the copies kept that are not open (``_kept_bytes``)."""
        if disk.limit is not None:
            used = sum(self._replicas[k].allocated() for k in disk.replicas)
            return disk.limit, used + self._kept_bytes(disk)
        st = os.statvfs(disk.path)
        total = st.f_blocks * st.f_frsize
        return total, total - st.f_bavail * st.f_frsize

    def _kept_bytes(self, disk: _Disk) -> int:
        """Bytes of the copies on ``disk`` that are kept but not open: ``broken`` ones (they
        did not open at the start, or were retired by a failed sync) and their other copies
        (``_more_copies``). Their files stay until a DELETE removes them, and take space
        meanwhile: left out, a limited disk took new extents past its limit. Counted from
        the files (a few ``lstat``s each; nothing is open to ``fstat``), as ``allocated``
        counts an open one: data, checksums, seqs and versions.

        A copy whose files do not stat (EIO, ESTALE, EACCES on its inodes) counts as nothing,
        logged once until it reads again: it is a broken copy, kept because it is, and says
        nothing of the disk; raised, it failed the whole disk in ``usage`` and every CREATE."""
        hdrs = {hdr for _why, hdr in self.broken.values()}
        for more in self._more_copies.values():
            hdrs.update(more)
        for h in [h for h in self._kept_unread if h not in hdrs]:
            del self._kept_unread[h]                 # deleted (or open again)
        total = 0
        for h in hdrs:
            if h.parent != disk.path:
                continue
            try:
                total += _copy_allocated(h.with_name(h.name[:-len(".hdr")]))
            except OSError as e:
                if h not in self._kept_unread or self._kept_unread[h] != e.errno:
                    log.warning("disk %s: the copy kept at %s is not counted in its used bytes "
                                "(its files do not stat: %s)", disk.path, h, e)
                self._kept_unread[h] = e.errno
            else:
                self._kept_unread.pop(h, None)
        return total

    def _room_again(self, disk: _Disk, capacity: int, used: int) -> None:
        """Clear a full disk's ``enospc`` once it has room for an extent (and inodes) again:
        space freed by UNMAP hole punching, or outside zstore. From ``usage`` (each disk
        probe), never a write: one statvfs per full disk. Not from ``_place``: a create that
        just hit ENOSPC must not find the same disk placeable again at once."""
        if not disk.enospc or disk.failed or capacity - used < self.extent_size:
            return
        try:
            st = os.statvfs(disk.path)
        except OSError:
            return
        if st.f_bavail * st.f_frsize >= self.extent_size and (st.f_favail > 0 or not st.f_files):
            disk.enospc = False
            log.info("disk %s has room for new extents again", disk.path)

    def _state(self, disk: _Disk, capacity: int, used: int) -> str:
        if disk.failed or disk.probe_error:
            return "failed"
        if disk.enospc or used >= capacity:
            return "full"
        return "ok"

    def create(self, vid: str, idx: int, generation: int, discard_broken: bool = False) -> None:
        """Make an empty replica here (nothing if one is here). A copy that did not open is
        refused, untouched, unless ``discard_broken``: a recovery target, whose copy is not
        in sync anyway and is about to be copied in full from an in-sync one.

        Refused (``StoreIOError``, nothing touched) while a disk that did not open at start
        is configured: its extents were never listed, this one may be there, and a copy made
        on another disk would meet it at the next start. A disk that failed later (EIO,
        EROFS) does not refuse: its extents were listed and are open or ``broken``.

        A disk with a probe error (not mounted: its empty mount point scanned as empty), or
        that failed at startup (``failed``: not scanned at all), does not refuse either,
        though it may hold this extent: an allocation's CREATE must still place new extents
        beside it (docs/storage.md, "A disk that fails at startup"), and the store cannot
        tell it from a recovery's CREATE (both come with generation 1). A
        second copy made meanwhile is settled at the next start by generation, never by
        disk order (``_choose_copy``): a recovery ends with SETGEN above the old copy's."""
        if (vid, idx) in self._replicas:
            return
        hidden = next((d for d in self._disks if not (d.scanned or d.failed_at_start)), None)
        if hidden is not None:
            raise StoreIOError(f"extent {vid}/{idx} is not on a usable disk here, and disk "
                               f"{hidden.path} did not open ({hidden.error}): it may be there; "
                               f"no second copy is made")
        if (vid, idx) in self.broken:       # refused before anything of it is touched
            if not discard_broken:
                self._absent(vid, idx)
            log.warning("extent %s/%d: discarding the copy that did not open (%s) for a fresh one",
                        vid, idx, self.broken[(vid, idx)][0])
            self.delete(vid, idx)
        if "/" in vid or vid.startswith(".") or not vid or idx < 0 \
                or len(vid.encode()) > MAX_VOLUME_ID:
            raise ValueError(f"bad extent name {vid!r:.80}/{idx}")
        # A disk that fails the create (read-only, EIO, full) is marked and the next one
        # tried: the most free space is often a failed disk's, and would fail every CREATE.
        tried, last = "", None
        while (disk := self._place()) is not None:
            # Still the directory opened? An unmount (or a lazy one after a failure) leaves
            # its empty mount point: a replica made there sits on the root filesystem, hidden
            # once the disk is mounted again. The probe would notice only seconds later.
            why = self._dir_gone(disk)
            if why is not None:
                disk.fail(why)
                log.warning("extent %s/%d: disk %s: %s; trying another disk", vid, idx, disk.path, why)
                tried += f"; {disk.path}: {why}"
                last = StoreIOError(f"disk {disk.path}: {why}")
                continue
            try:
                self._create_on(disk, vid, idx, generation)
                return
            except OSError as e:
                last = self._fail(disk, e)
                gone = e.errno in _DISK_GONE or (
                    e.errno in _DIR_GONE and (why := self._dir_gone(disk)) is not None)
                if not gone and e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise last from e
                if gone:
                    disk.fail(why if e.errno in _DIR_GONE else str(e))
                if self._leftover(disk.path / f"{vid}.{idx}"):
                    raise last from e       # two copies would meet at the next start
                log.warning("extent %s/%d: disk %s: %s; trying another disk", vid, idx, disk.path, e)
                tried += f"; {disk.path}: {e.strerror or e}"
        raise (type(last) if last else StoreFull)(f"no disk can take extent {vid}/{idx}{tried}")

    @staticmethod
    def _dir_gone(disk: _Disk) -> str | None:
        """Why ``disk``'s directory can take no extent (removed, not a directory, not the one
        opened), or None.

        Tells a vanished disk (its directory removed: every CREATE there would fail, and
        with a limit ``_place`` would keep choosing it) from one extent's missing file. The
        directory's (st_dev, st_ino), not its disk-id: one stat, no file to open and read,
        no id the store must be told, and it also catches an unmount (the mount point is
        on another filesystem: st_dev differs) and a directory replaced on the same one
        (st_ino differs); the same disk mounted again has the same root inode and device."""
        try:
            st = os.stat(disk.path)
        except OSError as e:
            if e.errno in _DIR_GONE or e.errno in _DISK_GONE:
                return f"its directory is gone: {e}"
            return None     # transient (ENOMEM, ESTALE...): not a reason to fail it for good
        if not stat.S_ISDIR(st.st_mode):
            return "its directory is gone: not a directory"
        if disk.ident is not None and (st.st_dev, st.st_ino) != disk.ident:
            return ("its directory is not the one opened (unmounted? replaced?): "
                    f"device {st.st_dev:#x} inode {st.st_ino}, was {disk.ident[0]:#x} {disk.ident[1]}")
        return None

    def _place(self) -> _Disk | None:
        """The placeable disk with the most room for one more extent."""
        best, best_free = None, -1
        for disk in self._disks:
            if not disk.placeable():
                continue
            try:
                capacity, used = self._used(disk)
            except OSError:
                continue
            free = capacity - used
            if free >= self.extent_size and free > best_free:
                best, best_free = disk, free
        return best

    def _create_on(self, disk: _Disk, vid: str, idx: int, generation: int) -> None:
        base = disk.path / f"{vid}.{idx}"
        # The .seq table before the header: the header marks the extent complete.
        seq_path = _seq_path(base)
        fd = os.open(seq_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, self.extent_size // BLOCK_SIZE * 4)
            os.posix_fallocate(fd, 0, self.extent_size // BLOCK_SIZE * 4)   # as .crc: no ENOSPC later
            os.fsync(fd)
        finally:
            os.close(fd)
        shutil.rmtree(_vdir(base), ignore_errors=True)     # leftovers of a torn delete
        ExtentFile.create(disk.path, vid, idx, generation=generation,
                          epoch=self.fence.highest(vid),
                          extent_size=self.extent_size).close()
        self._replicas[(vid, idx)] = self._open(disk, vid, idx)
        disk.replicas.add((vid, idx))

    @staticmethod
    def _leftover(base: Path) -> bool:
        """Remove what a failed create left; True if its header may still be there."""
        try:
            _remove_extent(base)
        except OSError:
            pass
        try:
            os.lstat(base.with_name(base.name + ".hdr"))
        except FileNotFoundError:
            return False
        except OSError:
            return True
        return True

    def has(self, vid: str, idx: int) -> bool:
        return (vid, idx) in self._replicas

    def extents(self) -> list[tuple[str, int]]:
        return sorted(self._replicas)

    def delete(self, vid: str, idx: int) -> None:
        """Remove the extent's files. On a disk whose directory vanished (removed, not a
        directory, not the one opened: ``_dir_gone``, one stat) the disk is failed, as a
        CREATE does, and ``StoreIOError`` names it; nothing is removed or forgotten (what is
        open still serves). Its files are not there to remove: an unmounted disk keeps them,
        to come back at its next mount, and the fsync of a removed directory raised ENOENT
        after the replica was already forgotten, the disk still taking new extents."""
        broken = self.broken.get((vid, idx))
        if broken is not None and (vid, idx) not in self._replicas:
            # Forgotten only once its files are gone: one that failed to go (its disk dying)
            # still answers I/O errors, never NO_EXTENT, and a later DELETE tries again.
            hdrs = self._more_copies.get((vid, idx), []) + [broken[1]]
            for disk in self._disks:
                if any(h.parent == disk.path for h in hdrs):
                    self._check_dir(disk, vid, idx)
            with self._io(None):
                for hdr in hdrs:
                    _remove_extent(hdr.with_name(hdr.name[:-len(".hdr")]))
            del self.broken[(vid, idx)]
            self._more_copies.pop((vid, idx), None)
            return
        rep = self._get(vid, idx)
        self._check_dir(rep.disk, vid, idx)
        self.broken.pop((vid, idx), None)
        base = rep.base()
        try:
            with self._io(rep.disk):
                rep.close()
                del self._replicas[(vid, idx)]
                rep.disk.replicas.discard((vid, idx))
                _remove_extent(base)
                rep.disk.enospc = False
        except StoreIOError as e:
            cause = e.__cause__
            if isinstance(cause, OSError) and cause.errno in _DIR_GONE:
                self._check_dir(rep.disk, vid, idx)      # it vanished meanwhile: say so
            raise

    def _check_dir(self, disk: _Disk, vid: str, idx: int) -> None:
        """Fail ``disk`` and raise ``StoreIOError`` if its directory vanished (``_dir_gone``:
        one stat; a transient stat error is not a vanished disk)."""
        why = self._dir_gone(disk)
        if why is not None:
            disk.fail(why)
            raise StoreIOError(f"extent {vid}/{idx} not deleted: disk {disk.path} failed: {why}")

    def usage(self) -> list[dict]:
        """Each disk's capacity, used bytes and state (each disk probe of the chunk server).

        A statvfs (or, with a limit, fstat) error fails the disk for good only when it says
        the disk is gone, as ``_dir_gone`` decides for a CREATE or DELETE: ENOENT/ENOTDIR
        (its directory removed or replaced, a mount point gone) and EIO/EROFS (the disk's own
        failure). Any other error says nothing about the disk and is reported ``failed`` for
        this probe only (no new extent placed meanwhile: ``_place`` skips a disk whose
        statvfs fails) and tried again at the next: EINTR (a signal interrupted the call;
        Python retries it itself, a wrapper may not), EAGAIN/ETIMEDOUT (a network or FUSE
        filesystem's server slow to answer), ENOMEM (the kernel short of memory for the
        call), ESTALE (an NFS handle the client revalidates).
        Failed for good, one such error kept a healthy disk out of placement until a restart."""
        out = []
        for disk in self._disks:
            transient = None
            if disk.probe_error or disk.failed_at_start:
                # Its statvfs may be the root filesystem's (unmounted), or fail (no mount point).
                capacity, used = disk.limit or 0, 0
            else:
                try:
                    capacity, used = self._used(disk)
                except OSError as e:
                    capacity, used = disk.limit or 0, 0
                    if e.errno in _DIR_GONE or e.errno in _DISK_GONE:
                        disk.fail(f"statvfs: {e}")
                    else:
                        transient = f"statvfs: {e} (checked again at the next probe)"
                        log.warning("disk %s: %s", disk.path, transient)
                else:
                    self._room_again(disk, capacity, used)
            state = "failed" if transient else self._state(disk, capacity, used)
            out.append({"path": str(disk.path), "capacity": capacity, "used": used, "state": state}
                       | ({"error": disk.error or disk.probe_error or transient}
                          if state == "failed" else {}))
        return out

    # -- metadata --------------------------------------------------------------

    def admit(self, vid: str, idx: int, epoch: int) -> None:
        """Fence: raise ``StaleEpochError`` if ``epoch`` is below the volume's highest.

        Epoch 0 (read-only users) always passes.  For an extent not here the
        volume's epoch is checked and remembered (so CREATE or IMPORT of a new
        extent can be admitted first; the created header then carries it).
        """
        if epoch == 0:
            return
        rep = self._replicas.get((vid, idx))
        if rep is None:
            self.fence.admit_volume(vid, epoch)
            return
        if rep.ext.header.epoch == epoch and self.fence.highest(vid) == epoch:
            return                         # hot path: the owner we already know, on its extent
        with self._io(rep.disk):
            self.fence.admit(rep.ext, epoch)

    def stat(self, vid: str, idx: int) -> dict:
        rep = self._get(vid, idx)
        with self._io(rep.disk):
            allocated = rep.allocated()
        h = rep.ext.header
        return {"generation": h.generation, "epoch": h.epoch, "mutations": rep.mutations,
                "imports": rep.imports, "cows": rep.cows, "allocated": allocated,
                "disk": str(rep.disk.path), "pending": rep.pending}

    def set_generation(self, vid: str, idx: int, generation: int) -> None:
        """Durably record the generation; the extent is flushed first, because a
        generation claims the data is in sync (after a resync's imports). A generation
        below the extent's is refused (``StaleGeneration``), nothing flushed or written.
        From a coroutine, ``set_generation_async`` (the flush off the event loop)."""
        rep = self._get(vid, idx)
        self._check_generation(rep, generation)
        self._durable(rep)
        self._record_generation(rep, generation)

    async def set_generation_async(self, vid: str, idx: int, generation: int) -> None:
        """``set_generation`` with its flush in a worker thread (``flush_async``): the loop
        serves other requests meanwhile, and the header, written after the flush succeeded
        (back on the loop, where epoch changes rewrite it too), never claims data that is
        not on disk yet. Checked again after the flush: a SETGEN may have raised it since."""
        rep = self._get(vid, idx)
        self._check_generation(rep, generation)       # before a long flush, for nothing
        await self._durable_async(rep)
        self._record_generation(rep, generation)

    async def set_generation_at_epoch_async(self, vid: str, idx: int, generation: int,
                                            epoch: int) -> None:
        """SETGEN of the owner at ``epoch`` (the replica server): the extent flushed in a
        worker (``flush_async``), then ``epoch`` admitted again and the generation recorded
        with no await in between. The flush is an await: a newer owner admitted meanwhile
        fenced this one, whose generation must not reach the header (``set_generation_async``
        records it unfenced). The extent is looked up and the generation checked again after
        the flush: it may be gone, or a SETGEN may have raised it since."""
        await self.flush_async(vid, idx)
        self.admit(vid, idx, epoch)
        self._record_generation(self._get(vid, idx), generation)

    @staticmethod
    def _check_generation(rep: _Replica, generation: int) -> None:
        h = rep.ext.header
        if generation < h.generation:
            raise StaleGeneration(h.volume, h.extent, generation, h.generation)

    def _record_generation(self, rep: _Replica, generation: int) -> None:
        self._check_generation(rep, generation)
        with self._io(rep.disk):
            rep.ext.set_header(generation=generation)

    def flush(self, vid: str, idx: int) -> None:
        """fdatasync the extent here, in the thread that owns the store (a failure retires the
        replica: see ``_durable``). From a coroutine, ``flush_async``."""
        self._durable(self._get(vid, idx))

    async def flush_async(self, vid: str, idx: int) -> None:
        """``flush`` with the fdatasync in a worker thread; see ``_durable_async``."""
        await self._durable_async(self._get(vid, idx))

    def _durable(self, rep: _Replica) -> None:
        """``rep.flush()``. A failed fdatasync breaks the replica for good: the kernel may
        have dropped the dirty pages it could not write and will report success next time,
        so nothing written to it since its last good flush can be trusted to be on disk.
        It answers I/O errors from then on (``broken``), and an EIO marks its disk failed
        (no new extents there); a coordinator drops it and copies it in full elsewhere."""
        try:
            rep.flush()
        except OSError as e:
            self._retire(rep, e)
            raise self._fail(rep.disk, e) from e

    async def _durable_async(self, rep: _Replica) -> None:
        """``_durable`` with ``rep.flush()`` in a worker thread, everything else on the loop.

        The worker only syncs and reports. Retiring a replica whose sync failed closes its
        fds, and a write on the loop may be using them: closed from the worker, a number
        could be reused by another ``open`` at once and the write land in another file. So
        the retirement runs on the loop, between two store calls, in the future's done
        callback: as soon as the sync ends (before any request served after that), even if
        the awaiting request was cancelled meanwhile (``shield``). A sync that succeeds on a
        replica retired or deleted meanwhile (another flush of it failed) is no success."""
        done = asyncio.get_running_loop().run_in_executor(None, rep.flush)
        done.add_done_callback(lambda f: self._synced(rep, f))
        try:
            await asyncio.shield(done)
        except OSError as e:
            raise self._fail(rep.disk, e) from e
        key = (rep.ext.header.volume, rep.ext.header.extent)
        if self._replicas.get(key) is not rep:
            if key not in self._replicas:
                self._absent(*key)
            raise StoreIOError(f"extent {key[0]}/{key[1]} was replaced during its flush")

    def _synced(self, rep: _Replica, done: asyncio.Future) -> None:
        # A failed sync (``SyncError``), not any OSError: an EMFILE from dup'ing the fd to sync
        # is no reason to break a replica (as on the inline path, ``_failed``).
        if not done.cancelled() and isinstance(done.exception(), SyncError):
            self._retire(rep, done.exception())          # type: ignore[arg-type]

    def _retire(self, rep: _Replica, e: OSError) -> None:
        """A flush of ``rep`` failed: it is ``broken`` from now on, its fds closed. In the
        thread that owns the store (the event loop's), never in a flush's worker."""
        key = (rep.ext.header.volume, rep.ext.header.extent)
        if self._replicas.get(key) is not rep:
            return                                       # deleted (or retired) meanwhile
        del self._replicas[key]
        rep.disk.replicas.discard(key)
        self.broken[key] = (f"a flush failed: {e}", rep.base().with_name(rep.base().name + ".hdr"))
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            rep.disk.failed, rep.disk.error = True, rep.disk.error or f"fdatasync: {e}"
        log.error("extent %s/%d: fdatasync failed (%s): replica broken%s", key[0], key[1], e,
                  "" if e.errno in (errno.ENOSPC, errno.EDQUOT) else f", disk {rep.disk.path} failed")
        try:
            rep.close()
        except OSError:
            pass
        for listener in self.retire_listeners:
            try:
                listener(key[0], key[1], self.broken[key][0])
            except Exception:  # noqa: BLE001 - a listener's bug must not fail a flush's caller
                log.exception("extent %s/%d: a retire listener failed", key[0], key[1])

    # -- I/O -------------------------------------------------------------------

    def _blocks(self, rep: _Replica, offset: int, length: int) -> tuple[int, int]:
        if offset < 0 or length < 0 or offset + length > rep.ext.size:
            raise ValueError(f"range {offset}+{length} outside the extent ({rep.ext.size} bytes)")
        if length == 0:
            return offset // BLOCK_SIZE, 0
        first = offset // BLOCK_SIZE
        return first, (offset + length - 1) // BLOCK_SIZE - first + 1

    def read(self, vid: str, idx: int, offset: int, length: int, view: int = 0) -> tuple[bytes, bytes]:
        rep = self._get(vid, idx)
        first, n = self._blocks(rep, offset, length)
        if n == 0:
            return b"", b""
        crcs = rep.ext.crcs[first:first + n]
        if view == 0:                        # live: straight to the ExtentFile
            try:
                data = rep.ext.read(offset, length)
            except OSError as e:
                raise self._fail(rep.disk, e) from e
            if 0 not in crcs:
                return data, _bitmap((n, True))
            if not any(crcs):
                return data, _bitmap((n, False))
            return data, _bitmap([c != 0 for c in crcs])
        with self._io(rep.disk):
            return self._read_view(rep, offset, length, first, n, crcs, view)

    def _read_view(self, rep: _Replica, offset: int, length: int, first: int, n: int,
                   crcs: array, view: int) -> tuple[bytes, bytes]:
        start = offset - first * BLOCK_SIZE
        buf = bytearray(n * BLOCK_SIZE)
        present = [False] * n
        seqs = rep.seqs[first:first + n]
        live_run: list[int] = []

        def read_live() -> None:
            if live_run:
                a = live_run[0]
                buf[(a - first) * BLOCK_SIZE:(a - first + len(live_run)) * BLOCK_SIZE] = \
                    rep.ext.read_blocks(a, len(live_run))
                live_run.clear()

        for k in range(n):
            b = first + k
            src = rep.view_source(b, view) if rep.keys else None
            if src is not None:
                read_live()
                buf[k * BLOCK_SIZE:(k + 1) * BLOCK_SIZE] = src.read(b)
                present[k] = True
            elif crcs[k] and seqs[k] <= view:
                live_run.append(b)
                present[k] = True
            else:
                read_live()
        read_live()
        return bytes(buf[start:start + length]), _bitmap(present)

    def _cow(self, rep: _Replica, first: int, n: int, seq: int, floor: int | None = None) -> None:
        """Preserve every present block of the run with block seq < ``seq`` (step 1).
        ``floor``: ``rep.floor`` as it was before the caller lowered it (a call changing
        blocks in several runs lowers it before the first, ``unmap``)."""
        copied = self._cow_copy(rep, first, n, seq, floor)
        if copied is None:
            return
        v, items = copied
        # The barrier: a slot on disk over a hole would be kept by the retried COW above, and
        # the live block, the snapshot's only good copy, overwritten (step 1).
        if self.cow_sync:
            sync_fd(v.fd)
        v.put_slots(items)
        if self.cow_sync:
            v.sync()

    def _cow_copy(self, rep: _Replica, first: int, n: int, seq: int,
                  floor: int | None = None, sync_dir: bool = True) -> tuple[_Versions, list] | None:
        """Step 1's first half: the blocks to preserve read (verified) and written to their
        version's data, slots not yet (nothing reads them before the barrier, ``_cow``).
        None if nothing needs preserving."""
        if seq <= (rep.floor if floor is None else floor):
            return None
        crcs, seqs = rep.ext.crcs, rep.seqs
        need = [b for b in range(first, first + n) if crcs[b] and seqs[b] < seq]
        if not need:
            return None
        key = seq - 1
        existing = rep.versions.get(key)
        if existing is not None:     # a retried COW: the first copy is the true old block
            need = [b for b in need if b not in existing.entries]
            if not need:
                return None
        items = []
        for run_start, run_len in _runs(need):
            data = rep.ext.read_blocks(run_start, run_len)
            for k in range(run_len):
                b = run_start + k
                items.append((b, seqs[b], memoryview(data)[k * BLOCK_SIZE:(k + 1) * BLOCK_SIZE]))
        # Counted before: a COW that fails half-way may still have made some. After a snapshot's
        # deletion the volume's seq stays above its blocks', so writes go on making versions no
        # snapshot reads; the reclaimer trims again when this count moved (``stat``).
        rep.cows += 1
        v = rep.versions_for(key, sync_dir)
        v.put_data(items)
        return v, items

    def _store_seqs(self, rep: _Replica, first: int, n: int, seq: int, present: bool,
                    span: tuple[int, int] = (0, 0)) -> None:
        """Step 2: ``.seq`` := ``seq`` for the run.  When the blocks are about to be
        ``present`` (written) and one of them is absent with a seq below ``seq`` (and
        ``seq`` > 1), a snapshot may have seen it absent; nothing but its seq keeps the new
        data out of that snapshot (there is no version), so ``.seq`` is fdatasync'd before
        the data and checksums are written (one sync per such write call, with ``cow_sync``).
        Not ``present`` (an unmap of the bytes ``span``): see ``_new_seqs``."""
        new, cross = self._new_seqs(rep, first, n, seq, present, span)
        if new is None:
            return
        rep.store_seqs(first, new)
        if cross:
            sync_fd(rep.seq_fd)

    def _new_seqs(self, rep: _Replica, first: int, n: int, seq: int, present: bool,
                  span: tuple[int, int]) -> tuple[array | None, bool]:
        """(the run's new seqs, or None when unchanged; whether ``.seq`` must be durable
        before the data changes): step 2 for a write (``present``) or an unmap of ``span``.

        An unmap leaves ``seq`` on the blocks it removes (present: a COW keeps their old
        contents for the snapshots first) and on partial edges (zeros written: present), the
        old seq on whole blocks already absent, whose view it changes at no seq. Raised to
        ``seq`` in the page cache only, such a block's seq let the next write at ``seq`` skip
        the sync below, and a power loss keeping that write's checksum but not the seq put
        its data into the snapshots before ``seq``, where the block was absent. A partial
        edge of an absent block becomes present (its zeros) at ``seq`` like a write, so it
        crosses like one."""
        if present:
            new = array("I", [seq]) * n
            if rep.seqs[first:first + n] == new:
                return None, False
            return new, self._crosses(rep, first, n, seq)
        crcs, seqs = rep.ext.crcs, rep.seqs
        new = array("I", [seq if crcs[b] else seqs[b] for b in range(first, first + n)])
        cross = False
        for edge, k in ((span[0] % BLOCK_SIZE, 0), (span[1] % BLOCK_SIZE, n - 1)):
            if edge:
                new[k] = seq
                cross = cross or self._crosses(rep, first + k, 1, seq)
        return (None, False) if seqs[first:first + n] == new else (new, cross)

    def _edge_crosses(self, rep: _Replica, start: int, end: int, seq: int) -> bool:
        """An unmap of the bytes [start, end) zeroes part of an absent block across a possible
        snapshot: that block's ``.seq`` sync (``_new_seqs``) is due, off the loop with an epoch."""
        edges = {b for b, cut in ((start // BLOCK_SIZE, start % BLOCK_SIZE),
                                  ((end - 1) // BLOCK_SIZE, end % BLOCK_SIZE)) if cut}
        return any(self._crosses(rep, b, 1, seq) for b in edges)

    def _crosses(self, rep: _Replica, first: int, n: int, seq: int) -> bool:
        """Writing the run at ``seq`` makes an absent block present across a possible
        snapshot: its ``.seq`` must be durable before its data (step 2)."""
        crcs, seqs = rep.ext.crcs, rep.seqs
        return (seq > 1 and self.cow_sync and 0 in crcs[first:first + n]
                and any(not crcs[b] and seqs[b] < seq for b in range(first, first + n)))

    def write(self, vid: str, idx: int, offset: int, data, seq: int, fua: bool = False,
              epoch: int = 0, sole: bool = False) -> Coroutine[Any, Any, None] | None:
        """Write ``data`` at ``offset`` at ``seq`` (steps 1-3 of the module docstring).

        ``epoch``: the caller admitted the write at it, and runs in the event loop. A write
        that must wait for the device first (a COW, or an absent block made present across a
        snapshot: steps 1-2 with ``cow_sync``) is then not done here but returned as a
        coroutine that does it, its fdatasyncs in worker threads (``_write_later``): the loop,
        and every other request on it, does not wait for the disk. Without ``epoch`` those
        syncs run inline. None when the write is done. ``sole``: this is the extent's only
        in-sync replica: record an intent first (step 3)."""
        rep = self._replicas.get((vid, idx))
        if rep is None:
            self._absent(vid, idx)
        return self._write(rep, offset, data, seq, fua, epoch, sole)

    def admit_write(self, vid: str, idx: int, epoch: int, offset: int, data, seq: int,
                    sole: bool = False) -> Coroutine[Any, Any, None] | None:
        """``admit`` then ``write`` (not FUA, with ``epoch``), the replica server's WRITE hot
        path: the known owner's epoch on an extent that is here costs one lookup for both."""
        rep = self._replicas.get((vid, idx))
        if rep is None or rep.ext.header.epoch != epoch or self.fence.highest(vid) != epoch:
            self.admit(vid, idx, epoch)
            return self.write(vid, idx, offset, data, seq, epoch=epoch, sole=sole)
        return self._write(rep, offset, data, seq, False, epoch, sole)

    def _write(self, rep: _Replica, offset: int, data, seq: int, fua: bool,
               epoch: int = 0, sole: bool = False) -> Coroutine[Any, Any, None] | None:
        tp = type(data)
        ext = rep.ext
        if (not offset % BLOCK_SIZE and (data.nbytes if tp is memoryview and data.c_contiguous
                                         else len(data) if tp is bytes else 0) == BLOCK_SIZE
                and not fua and type(seq) is int and 0 < seq <= _MAX_SEQ
                and 0 <= offset < ext.size):
            # One aligned block (every replicated 4 KiB write): the steps below without the
            # run arithmetic; COW (a snapshot since the block was written) takes the long way.
            b = offset // BLOCK_SIZE
            if rep.busy and b in rep.busy and epoch:
                return self._write_later(rep, offset, data, seq, epoch, sole)   # after the one there
            floor, seqs = rep.floor, rep.seqs
            if seq <= floor or not ext.crcs[b] or seqs[b] >= seq:
                if not ext.crcs[b] and seqs[b] < seq > 1 and epoch and self.cow_sync:
                    return self._write_later(rep, offset, data, seq, epoch, sole)   # step 2 waits
                rep.mutations += 1
                if seq < floor:                 # before: it must bound even a half-done write
                    rep.floor = seq
                try:
                    old = seqs[b]
                    if old != seq:
                        rep.store_seq(b, seq)
                        # An absent block made present across a possible snapshot (one with
                        # seq in [max(old, 1), seq-1]): only its seq keeps the new data out of
                        # that snapshot, so it is durable before the checksum (step 2).
                        if old < seq > 1 and self.cow_sync and not ext.crcs[b]:
                            sync_fd(rep.seq_fd)
                    ext.write_block(b, data, sole)
                except OSError as e:
                    raise self._failed(rep, e) from e
                return
        view = memoryview(data).cast("B")
        first, n = self._blocks(rep, offset, len(view))
        _check_seq(seq)
        if n == 0:
            return None
        if epoch and not fua and (self._waits(rep, first, n, seq) or self._busy(rep, first, n)):
            return self._write_later(rep, offset, view, seq, epoch, sole)
        rep.mutations += 1
        with self._rep_io(rep):
            if seq > rep.floor:
                self._cow(rep, first, n, seq)
            rep.floor = min(rep.floor, seq)     # before the blocks change, as above
            self._store_seqs(rep, first, n, seq, present=True)
            rep.ext.write(offset, view, intent=sole)
        if fua:
            self._durable(rep)
        return None

    def _waits(self, rep: _Replica, first: int, n: int, seq: int) -> bool:
        """Writing the run at ``seq`` waits for the device (steps 1-2 with ``cow_sync``): a
        block older than ``seq``, present (COW: its seq is below ``seq`` only if ``seq`` is
        above ``rep.floor``) or absent (its ``.seq`` first)."""
        return seq > 1 and self.cow_sync and min(rep.seqs[first:first + n]) < seq

    @staticmethod
    def _busy(rep: _Replica, first: int, n: int) -> bool:
        """A block of the run is held by a deferred write or unmap (``_Hold``)."""
        busy = rep.busy
        return bool(busy) and any(b in busy for b in range(first, first + n))

    async def _write_later(self, rep: _Replica, offset: int, data, seq: int, epoch: int,
                           sole: bool = False) -> None:
        """``_write`` of a write that waits for the device, with the loop free meanwhile.

        The steps and their order are ``_cow`` and ``_store_seqs``'s; only each fdatasync
        runs in a worker thread, on a private dup of the fd (``_Versions.sync``,
        ``_sync_dup``), and a failed one retires the replica as a failed flush does. Other
        requests run between the steps. Its blocks are held (``_Hold``): another write of
        them (a new owner's after a failover, a retry after a cancel) waits until this one
        and its last sync are over, so it never trusts a slot or ``.seq`` not yet durable.
        The extent may be deleted or retired meanwhile, or a newer owner admitted: at the
        start and after each wait the write checks the replica is still this one and admits
        ``epoch`` again, so a fenced write stops there (what it did so far is a state a crash
        between steps leaves, which the order makes safe) and is never written over the
        newer owner's. A version key trimmed meanwhile is copied into again. ``mutations`` moves
        at each change as it lands (the scrubber's and repair's "nothing changed" checks)."""
        vid, idx = rep.ext.header.volume, rep.ext.header.extent
        view = memoryview(bytes(data))       # ours: the caller's buffer lives on without us
        first, n = self._blocks(rep, offset, len(view))
        hold = _Hold(rep, first, n)
        await hold.take()
        try:
            self._still_ours(rep, vid, idx, epoch)   # begun a loop turn (or a wait) after the call
            rep.mutations += 1
            await self._cow_later(rep, vid, idx, epoch, first, n, seq, hold)
            rep.floor = min(rep.floor, seq)                      # before the blocks change
            await self._store_seqs_later(rep, vid, idx, epoch, first, n, seq, True, hold)
            rep.mutations += 1                                   # each change counted as it lands
            with self._rep_io(rep):
                rep.ext.write(offset, view, intent=sole)
        finally:
            hold.release()

    async def _unmap_later(self, rep: _Replica, offset: int, length: int, seq: int, zero: bool,
                           epoch: int, sole: bool = False) -> None:
        """``unmap`` of blocks some of which are present, its syncs off the loop as
        ``_write_later``'s: the COWs of each 1 MiB piece, ``.seq`` where zeros become present
        across a snapshot, and the zeroed checksums' sync before the punch."""
        vid, idx = rep.ext.header.volume, rep.ext.header.extent
        first, n = self._blocks(rep, offset, length)
        hold = _Hold(rep, first, n)
        await hold.take()
        try:
            self._still_ours(rep, vid, idx, epoch)
            rep.mutations += 1
            end = offset + length
            holes = []
            floor, rep.floor = rep.floor, min(rep.floor, seq)    # as ``unmap``
            for a, b in _pieces(offset, end):
                f, m = self._blocks(rep, a, b - a)
                await self._cow_later(rep, vid, idx, epoch, f, m, seq, hold, floor)
                await self._store_seqs_later(rep, vid, idx, epoch, f, m, seq, zero, hold, (a, b))
                rep.mutations += 1
                with self._rep_io(rep):
                    if zero:
                        rep.ext.write(a, bytes(b - a), intent=sole)
                    else:
                        holes.append(rep.ext.unmap_checksums(a, b - a, sole))
            if any(lo < hi and present for lo, hi, present in holes):
                if rep.crc_group is None:
                    rep.crc_group = _GroupSync(lambda: partial(_sync_dup, os.dup(rep.ext.crc_fd)))
                await self._sync_later(rep, rep.crc_group, hold)
                self._still_ours(rep, vid, idx, epoch)
            rep.mutations += 1
            with self._rep_io(rep):
                rep.ext.punch(holes, synced=True)
        finally:
            hold.release()

    async def _cow_later(self, rep: _Replica, vid: str, idx: int, epoch: int, first: int, n: int,
                         seq: int, hold: _Hold, floor: int | None = None) -> None:
        """``_cow`` with its syncs in worker threads (``_write_later``). A version file trimmed
        (or replaced) meanwhile is copied into again, in a new file: the trim could not see
        this COW's blocks (their slots are written after the barrier), so unlinking the key
        proves only that its *other* entries were unread; a snapshot may still read these
        through it (returning there lost that snapshot's copy of the block)."""
        while True:
            with self._rep_io(rep):
                copied = self._cow_copy(rep, first, n, seq, floor, sync_dir=False)
            if copied is None:
                return
            v, items = copied
            if v.unlinked_dirs:              # a new version file: its directory entry first
                if v.dir_group is None:
                    v.dir_group = _GroupSync(lambda v=v: partial(_Replica.sync_dirs, v))
                await self._sync_later(rep, v.dir_group, hold)
                self._still_ours(rep, vid, idx, epoch)
            if self.cow_sync:
                if v.group is None:
                    v.group = _GroupSync(lambda v=v: v.sync)     # v: this one (the loop rebinds it)
                await self._sync_later(rep, v.group, hold)        # the barrier (``_cow``)
                self._still_ours(rep, vid, idx, epoch)
            if v.fd >= 0 and rep.versions.get(v.key) is v:
                break                        # else trimmed during a wait: copy again
        rep.mutations += 1
        with self._rep_io(rep):
            v.put_slots(items)
        rep.cows += 1                  # again, slots in place: the reclaimer's memo sees them
        if self.cow_sync:
            await self._sync_later(rep, v.group, hold)
            self._still_ours(rep, vid, idx, epoch)

    async def _store_seqs_later(self, rep: _Replica, vid: str, idx: int, epoch: int, first: int,
                                n: int, seq: int, present: bool, hold: _Hold,
                                span: tuple[int, int] = (0, 0)) -> None:
        """``_store_seqs`` with its sync in a worker thread (``_write_later``)."""
        new, cross = self._new_seqs(rep, first, n, seq, present, span)
        if new is None:
            return
        rep.mutations += 1
        with self._rep_io(rep):
            rep.store_seqs(first, new)
        if cross:
            if rep.seq_group is None:
                rep.seq_group = _GroupSync(lambda: partial(_sync_dup, os.dup(rep.seq_fd)))
            await self._sync_later(rep, rep.seq_group, hold)
            self._still_ours(rep, vid, idx, epoch)

    async def _sync_later(self, rep: _Replica, group: _GroupSync, hold: _Hold) -> None:
        """A sync of ``group``'s file begun after now, in a worker thread; a failure retires
        ``rep`` on the loop, as a failed ``flush_async`` does (``_durable_async``: shielded,
        so a cancelled caller still has the outcome acted on, and ``hold`` kept until it ends)."""
        await self._await_sync(rep, group.wait(), hold)

    async def _await_sync(self, rep: _Replica, done: asyncio.Future, hold: _Hold) -> None:
        """Wait for the sync ``done`` of ``rep``'s files, held by ``hold`` until it ends (a
        cancelled caller's too: shielded); a failure retires ``rep`` on the loop."""
        hold.sync = done
        done.add_done_callback(lambda f: self._synced(rep, f))
        try:
            await asyncio.shield(done)
        except OSError as e:
            raise self._fail(rep.disk, e) from e

    def _still_ours(self, rep: _Replica, vid: str, idx: int, epoch: int) -> None:
        """After a wait of ``_write_later``: the replica still open here, ``epoch`` still
        admitted."""
        if self._replicas.get((vid, idx)) is not rep:
            if (vid, idx) not in self._replicas:
                self._absent(vid, idx)
            raise StoreIOError(f"extent {vid}/{idx} was replaced during a write")
        self.admit(vid, idx, epoch)

    def unmap(self, vid: str, idx: int, offset: int, length: int, seq: int,
              zero: bool = False, epoch: int = 0,
              sole: bool = False) -> Coroutine[Any, Any, None] | None:
        """Unmap (or, ``zero``, write zeros over) the range at ``seq``. ``epoch`` as in
        ``write``: an unmap touching present blocks (a COW, the zeroed checksums' sync before
        the punch) comes back as a coroutine with its syncs off the loop (``_unmap_later``).
        ``sole`` as in ``write``, for the zeros it writes (``zero``, partial edges)."""
        rep = self._get(vid, idx)
        first, n = self._blocks(rep, offset, length)
        _check_seq(seq)
        if n == 0:
            return None
        if epoch and (any(rep.ext.crcs[first:first + n]) or self._busy(rep, first, n)
                      or (zero and self._crosses(rep, first, n, seq))
                      or (not zero and self._edge_crosses(rep, offset, offset + length, seq))):
            return self._unmap_later(rep, offset, length, seq, zero, epoch, sole)
        with self._rep_io(rep):
            rep.mutations += 1
            end = offset + length
            holes = []
            # Zeros (or partial edges) become present at seq: the floor goes down before the
            # first block changes, as in a write, so a failure part-way leaves it a true bound
            # (after the loop, a failed unmap(zero) left zeros at seq under a higher floor, and
            # the next write at seq+1 skipped the COW a snapshot at seq needed).
            floor, rep.floor = rep.floor, min(rep.floor, seq)
            for a, b in _pieces(offset, end):
                f, m = self._blocks(rep, a, b - a)
                self._cow(rep, f, m, seq, floor)
                # Punched blocks stay absent, keeping their seq if they were already (a clone
                # unmaps with ``zero``); a partial edge of an absent block syncs its seq before
                # its zeros, as a write (``_new_seqs``).
                self._store_seqs(rep, f, m, seq, present=zero, span=(a, b))
                if zero:
                    rep.ext.write(a, bytes(b - a), intent=sole)
                else:
                    holes.append(rep.ext.unmap_checksums(a, b - a, sole))
            rep.ext.punch(holes)                 # one .crc sync for the whole range, then punches
        return None

    def revert(self, vid: str, idx: int, to_seq: int, seq: int, sole: bool = False) -> None:
        """Every block changed since ``to_seq`` back to its view there, written at ``seq``;
        in one call on the loop. From a coroutine (the replica server), ``revert_async``.
        ``sole`` as in ``write``, for the blocks it writes back."""
        for _ in self._revert_steps(self._get(vid, idx), to_seq, seq, sole):
            pass

    async def revert_async(self, vid: str, idx: int, to_seq: int, seq: int, epoch: int = 0,
                           sole: bool = False) -> None:
        """``revert`` one 1 MiB run at a time, yielding to the event loop between runs, so a
        whole extent's revert on a slow disk does not hold up every other request (other
        volumes' writes would time out and their replicas be dropped). Each run is on the loop
        as every store change is. Between runs the extent may be deleted or retired (the
        revert stops: NO_EXTENT, I/O error) and ``epoch``, if given, is admitted again, so a
        revert whose owner was fenced meanwhile stops before its next run."""
        rep = self._get(vid, idx)
        key = (vid, idx)
        for _ in self._revert_steps(rep, to_seq, seq, sole):
            await asyncio.sleep(0)
            if self._replicas.get(key) is not rep:
                if key not in self._replicas:
                    self._absent(vid, idx)
                raise StoreIOError(f"extent {vid}/{idx} was replaced during its revert")
            if epoch:
                self.admit(vid, idx, epoch)

    def _revert_steps(self, rep: _Replica, to_seq: int, seq: int,
                      sole: bool = False) -> Iterator[None]:
        """The revert, one ``_revert_run`` per step (the caller may yield in between)."""
        _check_seq(seq)
        if to_seq < 0:
            raise ValueError(f"to_seq {to_seq} < 0")
        with self._rep_io(rep):
            rep.mutations += 1
            floor, rep.floor = rep.floor, min(rep.floor, seq)     # before any block: see unmap
            seqs = rep.seqs
            changed = [b for b in range(rep.blocks) if seqs[b] > to_seq]
            # A version with key >= to_seq was made by a write after to_seq: its block
            # changed even if a power loss kept its old seq on disk (.seq is synced after
            # the version, the data may have reached the disk first).
            later = {b for key in rep.keys[bisect.bisect_left(rep.keys, to_seq):]
                     for b in rep.versions[key].entries}
            if later:
                changed = sorted(later.union(changed))
        for run_start, run_len in _runs(changed):
            for a in range(run_start, run_start + run_len, _CHUNK // BLOCK_SIZE):
                m = min(_CHUNK // BLOCK_SIZE, run_start + run_len - a)
                with self._rep_io(rep):
                    rep.mutations += 1       # a repair's token taken between runs is stale
                    self._revert_run(rep, a, m, to_seq, seq, floor, sole)
                yield

    def _revert_run(self, rep: _Replica, first: int, n: int, to_seq: int, seq: int,
                    floor: int, sole: bool = False) -> None:
        # The view at to_seq: only versions can hold it (these blocks' live seq > to_seq).
        targets: list[bytes | None] = []
        for b in range(first, first + n):
            src = rep.view_source(b, to_seq) if rep.keys else None
            targets.append(src.read(b) if src is not None else None)
        self._cow(rep, first, n, seq, floor)
        self._store_seqs(rep, first, n, seq, present=True)
        k = 0
        while k < n:
            j = k
            while j < n and (targets[j] is None) == (targets[k] is None):
                j += 1
            off, ln = (first + k) * BLOCK_SIZE, (j - k) * BLOCK_SIZE
            if targets[k] is None:
                if any(rep.ext.crcs[first + k:first + j]):
                    rep.ext.unmap(off, ln)
            else:
                rep.ext.write(off, b"".join(targets[k:j]), intent=sole)   # type: ignore[arg-type]
            k = j

    # -- replication -----------------------------------------------------------

    def export(self, vid: str, idx: int, offset: int, length: int,
               max_bytes: int = 768 << 10) -> tuple[bytes, int | None]:
        """The full state of a block-aligned range as a msgpack blob for ``import_``.

        ``{format, offset, end, live: [[block, seq, crc, data|None]],
        versions: [[block, origin, key, crc, data]]}``: every block of
        [offset, end) not listed is absent with seq 0 and has no versions.
        Stops before a block that would push the blob past ``max_bytes``
        and returns where to go on.  A block that alone exceeds it (a hot
        block with a version per retained snapshot: 256 of them no longer fit
        a wire frame, so it could never be copied) is shipped in parts of
        ``_versions_per_part(max_bytes)`` versions (keys ascending), each with
        its live state: the returned offset is then ``block * BLOCK_SIZE + j``
        (not block-aligned) to export its part ``j``, and part ``j > 0``
        carries ``after``, the last key of the parts before it, which
        ``import_`` keeps.  The range's end stays block-aligned.

        A live block or version that fails its checksum or does not read (a
        media error) is never shipped: it is listed, without data, in
        ``bad_live: [[block, seq, crc]]`` / ``bad_versions: [[block, origin,
        key, crc]]`` (format 2), so a recovery can take it from another
        replica or, if none reads it, copy it as unreadable and still copy
        the rest of the extent (raising here stopped the whole copy).
        """
        blob, nxt, _ = self.export_detail(vid, idx, offset, length, max_bytes)
        return blob, nxt

    def export_detail(self, vid: str, idx: int, offset: int, length: int,
                      max_bytes: int = 768 << 10) -> tuple[bytes, int | None, list[int]]:
        """``export`` and the blocks it marked unreadable (the server schedules their repair)."""
        rep = self._get(vid, idx)
        part = offset % BLOCK_SIZE                   # > 0: part ``part`` of the first block
        if (offset + length) % BLOCK_SIZE or length <= 0 < part:
            raise ValueError(f"export range {offset}+{length} is not {BLOCK_SIZE}-aligned")
        offset, length = offset - part, length + part
        first, n = self._blocks(rep, offset, length)
        end = first + n
        per_part = _versions_per_part(max_bytes)
        live, versions, bad_live, bad_versions = [], [], [], []
        size, nxt, after = 64, None, None
        with self._io(rep.disk):
            vers = rep.block_versions(first, end) if rep.keys else {}
            crcs, seqs = rep.ext.crcs, rep.seqs
            for b in range(first, end):
                vlist = vers.get(b, ())
                if not seqs[b] and not crcs[b] and not vlist:
                    continue
                cost = 24 + (BLOCK_SIZE + 8 if crcs[b] else 0) + len(vlist) * (BLOCK_SIZE + 24)
                shipped = live or versions or bad_live or bad_versions
                j = part if b == first else 0
                if j or (not shipped and size + cost > max_bytes and len(vlist) > per_part):
                    # One part of a block too big for one export: no other block joins it.
                    skip = j * per_part
                    if skip:
                        # The last key of the parts before; if trimmed meanwhile to fewer,
                        # nothing is added (the digest check after a copy sees a difference).
                        after = vlist[min(skip, len(vlist)) - 1][0] if vlist else _MAX_SEQ
                    vlist = vlist[skip:skip + per_part]
                    if len(vers.get(b, ())) > skip + per_part:
                        nxt = b * BLOCK_SIZE + j + 1
                    elif b + 1 < end:
                        nxt = (b + 1) * BLOCK_SIZE
                    end = b + 1                     # the loop stops after this block
                elif size + cost > max_bytes and shipped:
                    nxt = b * BLOCK_SIZE
                    break
                size += cost
                if crcs[b]:
                    data = _readable(lambda: bytes(rep.ext.read_blocks(b, 1)))
                    if data is None:
                        bad_live.append([b, seqs[b], crcs[b]])
                    else:
                        live.append([b, seqs[b], crcs[b], data])
                elif seqs[b]:
                    live.append([b, seqs[b], 0, None])
                for key, origin, crc in vlist:
                    data = _readable(lambda: rep.versions[key].read(b))
                    if data is None:
                        bad_versions.append([b, origin, key, crc])
                    else:
                        versions.append([b, origin, key, crc, data])
                if b + 1 == end:
                    break
        blob_end = nxt if nxt is not None and nxt % BLOCK_SIZE == 0 else end * BLOCK_SIZE
        state = {"format": _BLOB_FORMAT, "offset": offset, "end": blob_end}
        if after is not None:
            state["after"] = after
        unreadable = sorted({e[0] for e in bad_live} | {e[0] for e in bad_versions})
        if unreadable:
            log.error("export of %s/%d: block(s) %s do not read here; exported as unreadable",
                      vid, idx, unreadable[:16])
            state.update(format=_BLOB_FORMAT_UNREADABLE, bad_live=bad_live,
                         bad_versions=bad_versions)
        state.update(live=live, versions=versions)
        return msgpack.packb(state), nxt, unreadable

    def import_(self, vid: str, idx: int, blob: bytes, if_unchanged: int | None = None) -> bool:
        """Make the blob's range exactly the exported state (live, seqs, versions).

        The blob is checked whole (crc of every block) before anything is
        applied or created; an extent created for it is deleted again if it
        fails to apply (a disk error).  Not flushed: a resync ends with
        ``set_generation``, which flushes first.  Blocks the exporter could not
        read are stored failing their checksum (``_filler`` under the exported
        crc): reads of them get a checksum error, the scrubber and repair see
        them as bad, and the digest still equals the exporter's.
        """
        state = _parse_blob(blob)
        rep = self._replicas.get((vid, idx))
        if rep is not None:
            if if_unchanged is not None and rep.mutations != if_unchanged:
                return False
            self._import(rep, state)
            return True
        if if_unchanged not in (None, 0):         # a missing extent has had no mutations
            return False
        # Created for the blob, so a failed IMPORT leaves nothing: an empty (or half-imported)
        # extent left behind would pass for a real copy with a reader or a recovery.
        if state["end"] > self.extent_size:      # the blob's one check left: before the create
            raise ValueError(f"import: range {state['offset']}..{state['end']} outside the "
                             f"extent ({self.extent_size} bytes)")
        self.create(vid, idx, 0)
        try:
            self._import(self._get(vid, idx), state)
        except BaseException as e:
            self._discard_created(vid, idx, e)
            raise
        return True

    def _discard_created(self, vid: str, idx: int, why: BaseException) -> None:
        """Delete the extent a failed IMPORT created. Files that do not go (the disk failing)
        leave it ``broken`` (I/O errors until a DELETE, or a CREATE discarding it), never
        served as a copy of the extent."""
        rep = self._replicas.get((vid, idx))
        if rep is not None:
            base = rep.base()
        elif (vid, idx) in self.broken:      # retired by the failure (a sync): delete it all the same
            hdr = self.broken[(vid, idx)][1]
            base = hdr.with_name(hdr.name[:-len(".hdr")])
        else:
            return
        try:
            self.delete(vid, idx)
        except StoreError as e:
            log.error("extent %s/%d: created for an IMPORT that failed (%s), not removed: %s",
                      vid, idx, why, e)
            if (vid, idx) not in self._replicas and self._leftover(base):
                self.broken[(vid, idx)] = (f"an IMPORT that created it failed: {why}",
                                           base.with_name(base.name + ".hdr"))

    def _import(self, rep: _Replica, state: dict) -> None:
        """Apply a checked blob (``import_``) to ``rep``."""
        first, n = self._blocks(rep, state["offset"], state["end"] - state["offset"])
        if n == 0:
            return
        end = first + n
        with self._rep_io(rep):
            rep.mutations += 1
            rep.imports += 1
            # Versions: replace every version of the range by the blob's; a later part of a
            # block split over several exports keeps the parts before it (keys <= after).
            after = state.get("after")
            for key in list(rep.keys):
                v = rep.versions[key]
                gone = [b for b in v.entries if first <= b < end
                        and (after is None or b != first or key > after)]
                if gone:
                    v.drop(gone)
                    rep.drop_key_if_empty(key)
            by_key: dict[int, list] = {}
            for b, origin, key, _crc, data in state["versions"]:
                by_key.setdefault(key, []).append((b, origin, data))
            for key, items in sorted(by_key.items()):
                rep.versions_for(key).put(items)
            bad_by_key: dict[int, list] = {}
            for b, origin, key, crc in state.get("bad_versions", ()):
                bad_by_key.setdefault(key, []).append((b, origin, crc))
            for key, bad in sorted(bad_by_key.items()):
                rep.versions_for(key).put_unreadable(bad)
            # Live blocks: seqs, then data runs, absent runs punched, unreadable ones failing.
            new_seqs = array("I", bytes(4 * n))
            data: dict[int, bytes] = {}
            for b, s, _crc, d in state["live"]:
                new_seqs[b - first] = s
                if d is not None:
                    data[b] = d
            for b, s, _crc in state.get("bad_live", ()):
                new_seqs[b - first] = s
            present = [s for s in new_seqs if s]
            if present:                          # before the blocks change: see unmap
                rep.floor = min(rep.floor, min(present))
            rep.store_seqs(first, new_seqs)
            k = first
            while k < end:
                j = k
                while j < end and (j in data) == (k in data):
                    j += 1
                if k in data:
                    rep.ext.write(k * BLOCK_SIZE, b"".join(data[b] for b in range(k, j)))
                elif any(rep.ext.crcs[k:j]):
                    rep.ext.unmap(k * BLOCK_SIZE, (j - k) * BLOCK_SIZE)
                k = j
            for b, _s, crc in state.get("bad_live", ()):
                rep.ext.write(b * BLOCK_SIZE, _filler(b, crc))
                rep.ext._store_crcs(b, array("I", [crc]))     # noqa: SLF001 - the exporter's crc

    def mend(self, vid: str, idx: int, blob: bytes, if_unchanged: int | None = None,
             verified: Verdict | None = None) -> bool | Unmended:
        """Repair from a peer's export blob only what fails its checksum here.

        Not ``import_``: the peer may not have received a write this replica
        already took, and a live block that verifies is a finished write, so
        installing the peer's state wholesale could undo an acknowledged write.
        A failing version is replaced by the blob's with the same (key, origin);
        a failing live block by the blob's, and only then are versions the
        blob has and this replica lacks added (its new seq may need them).
        Nothing that verifies is dropped, and nothing the peer marks unreadable
        is taken (its live block as absent would be zeros).  False when the extent is not here or
        its mutation counter is not ``if_unchanged`` (a write landed). ``Unmended`` (falsy)
        when it ran but something of its run that fails here has no good copy in the blob (the
        peer cannot read it either, lacks that version, or has it under another origin): what
        it could replace is replaced, the block still fails. True: nothing of the run fails
        any more.

        ``verified``: what fails here, from ``verify_verdict_async`` (the run's reads done in
        a worker thread, not here on the loop, which a failing disk's seconds-long reads would
        stall for every volume). It holds while its replica is the one open here and the
        mutation counter has not moved since (checked here, no await after): nothing that
        changes a live block or adds a version got in between. False otherwise, as for
        ``if_unchanged``, which it implies. The blob's run must lie in the verdict's
        (``BadBlob`` otherwise, as for a malformed blob: nothing changed).

        The order is a write's (``_mend_steps``): versions durable before the live blocks
        they keep the snapshots' copies of. Here its syncs run inline, on the caller's thread;
        a block held by a deferred write or unmap (``_Hold``: its version slots or ``.seq``
        may not be durable yet) makes it False, as a write landing would. From a coroutine,
        ``mend_async``: it waits for such a hold, and syncs in worker threads."""
        state = _parse_blob(blob)
        rep = self._mend_target(vid, idx, if_unchanged, verified)
        if rep is None:
            return False
        first, n = self._mend_run(rep, state, verified)
        if self._busy(rep, first, n):
            return False
        ok: list[bool | Unmended] = [True]
        steps = self._mend_steps(rep, state, first, n, verified, ok)
        try:
            with self._rep_io(rep):
                for jobs in steps:
                    _run_syncs(jobs)
        finally:
            steps.close()
        return ok[0]

    async def mend_async(self, vid: str, idx: int, blob: bytes, if_unchanged: int | None = None,
                         verified: Verdict | None = None) -> bool | Unmended:
        """``mend`` in the durable order of a deferred write (``_write_later``), from the loop.

        Its blocks are held (``_Hold``) as a deferred write's: a deferred write or unmap
        holding one of them is waited for, its last sync included (its COW's version slot
        may be in the page cache only, and a mended live block written back first would
        outlive it on a power loss), and writes of them wait for the mend in turn. Then,
        with no await in between, the replica and the token (``if_unchanged``, ``verified``)
        are checked (False if either moved, as ``mend``) and the mend begins; its syncs
        (``_mend_steps``) run in worker threads, a failed one retiring the replica as a
        failed flush does (``StoreIOError``). False too when the extent is deleted or
        retired meanwhile, or a version file it was writing is trimmed (checked again).

        The hold keeps out writes and unmaps with an epoch only: ``import_``, ``trim``,
        ``revert`` (and a write or unmap without an epoch) do not wait for it. So after each
        sync the state of the mend's blocks (``_mend_state``: seqs, checksums, version
        entries) is compared with what the mend left before it, and a change makes it stop
        there, False (the repair verifies again): going on, it wrote its older blob over an
        IMPORT of the peer's newer state, or a version slot back over data a trim had just
        punched. What it did so far is a state a crash between its steps leaves; a version
        file it created and left without a slot (stopped, or cancelled, before its slots) is
        unlinked, the data it wrote in another without a slot punched (``_drop_unslotted``),
        not left until a restart."""
        state = _parse_blob(blob)
        rep = self._mend_target(vid, idx, if_unchanged, verified)
        if rep is None:
            return False
        first, n = self._mend_run(rep, state, verified)
        hold = _Hold(rep, first, n)
        await hold.take()
        try:
            if self._mend_target(vid, idx, if_unchanged, verified) is not rep:
                return False
            ok: list[bool | Unmended] = [True]
            steps = self._mend_steps(rep, state, first, n, verified, ok)
            try:
                while True:
                    with self._rep_io(rep):
                        jobs = next(steps, None)
                    if jobs is None:
                        return ok[0]
                    left = self._mend_state(rep, first, n)
                    await self._syncs_later(rep, jobs, hold)
                    if self._replicas.get((vid, idx)) is not rep:
                        return False             # deleted (or retired) during the sync
                    if self._mend_state(rep, first, n) != left:
                        return False             # changed by one that ignores the hold
            finally:
                steps.close()
        finally:
            hold.release()

    @staticmethod
    def _mend_state(rep: _Replica, first: int, n: int) -> tuple:
        """What a mend of blocks [first, first+n) relies on between its steps (``mend_async``):
        their seqs, live checksums and version entries (key, origin, crc). Not
        ``rep.mutations``, which writes of other blocks move too."""
        end = first + n
        return rep.seqs[first:end], rep.ext.crcs[first:end], rep.block_versions(first, end)

    def _mend_target(self, vid: str, idx: int, if_unchanged: int | None,
                     verified: Verdict | None) -> _Replica | None:
        """The replica to mend, or None when it is gone or a token moved (``mend``)."""
        rep = self._replicas.get((vid, idx))
        if rep is None or (if_unchanged is not None and rep.mutations != if_unchanged):
            return None
        if verified is not None and (verified.rep is not rep or verified.mutations != rep.mutations):
            return None
        return rep

    def _mend_run(self, rep: _Replica, state: dict, verified: Verdict | None) -> tuple[int, int]:
        """(first block, count) of a parsed blob to mend; ``BadBlob`` when outside the extent
        or the verdict's run (the peer answered for another range)."""
        try:
            first, n = self._blocks(rep, state["offset"], state["end"] - state["offset"])
        except ValueError as e:
            raise BadBlob(f"mend: {e}") from None
        if verified is not None and not (verified.first <= first
                                         and first + n <= verified.first + verified.count):
            raise BadBlob(f"mend: blocks {first}+{n} outside the verdict's "
                          f"{verified.first}+{verified.count}")
        return first, n

    def _mend_steps(self, rep: _Replica, state: dict, first: int, n: int,
                    verified: Verdict | None, ok: list[bool | Unmended]
                    ) -> Iterator[list[Callable[[], None]]]:
        """``_mend_plan``; what it leaves of versions' data without a slot (stopped before
        their slots: an import, trim or revert changed the block during a sync, a trim took
        another of its files, a cancel, an error) is removed when it ends (``_drop_unslotted``)."""
        written: list[tuple[_Versions, list[int], bool]] = []
        try:
            yield from self._mend_plan(rep, state, first, n, verified, ok, written)
        finally:
            self._drop_unslotted(rep, written)

    @staticmethod
    def _drop_unslotted(rep: _Replica, written: list[tuple[_Versions, list[int], bool]]) -> None:
        """For each (version file, blocks whose data a mend wrote there, whether it created the
        file) still ``rep``'s and open: a file it created that holds no slot is unlinked, as a
        trim does (``drop_key_if_empty``); else the data of those blocks that have no slot is
        punched (``punch_unslotted``). Nothing reads either (no slot), so no sync comes first,
        and the unlink is not synced here (``vdir_dirty``: the next flush does it): brought
        back by a power loss, the file holds no slot either and loading drops it. A slot
        written meanwhile (a deferred COW of another block, an import) keeps its file and its
        block; a COW that wrote data there and waits for its barrier sees the file gone and
        copies again (``_cow_later``)."""
        for v, blocks, created in written:
            if v.fd < 0 or rep.versions.get(v.key) is not v:
                continue
            try:
                if created and not v.entries:
                    rep.drop_key_if_empty(v.key)
                else:
                    v.punch_unslotted(blocks)
            except OSError as e:
                log.warning("%s: a mend's version data without a slot is left until a restart "
                            "drops its file (%s)", v.path, e)

    def _mend_plan(self, rep: _Replica, state: dict, first: int, n: int,
                   verified: Verdict | None, ok: list[bool | Unmended],
                   written: list[tuple[_Versions, list[int], bool]]
                   ) -> Iterator[list[Callable[[], None]]]:
        """The mend of blocks [first, first+n), yielding each batch of syncs its order needs
        (the caller runs them, inline or in a worker thread, before going on; it checks the
        replica is still open here after each). ``ok[0]`` is set False when it stopped short,
        an ``Unmended`` when the blob cannot replace all that fails (it goes on with the rest).

        The order is a write's (module docstring): 1. versions (failing ones replaced by the
        peer's, and for a live block mended the ones the peer has and this replica lacks): a
        new version file's directory entries, their data, the barrier, their slots, synced
        (a COW's); 2. the mended blocks' ``.seq`` entries, synced when one changed; 3. their
        data (or, absent on the peer, their checksums zeroed, synced, then punched). Without
        ``cow_sync`` only the directory and the zeroed checksums are synced, as a write's. The
        live blocks are synced by the caller's flush (repair), as any write's by FLUSH."""
        live = {b: (s, d) for b, s, _crc, d in state["live"]}
        unreadable = {e[0] for e in state.get("bad_live", ())}   # the peer's rot: not absent
        peer: dict[int, list[tuple[int, int, bytes]]] = {}
        for b, origin, key, _crc, d in state["versions"]:
            peer.setdefault(b, []).append((key, origin, d))
        rep.mutations += 1
        if verified is None:
            bad_live, bad_versions = self._verify_detail(rep, None, first, n)
        else:
            bad_live, bad_versions = verified.bad_live, verified.bad_versions
        end = first + n
        mend_live = [b for b in range(first, end) if b in bad_live and b not in unreadable]
        puts: dict[int, list[tuple[int, int, bytes]]] = {}
        for b in range(first, end):
            for key, origin, data in self._mend_versions(rep, b, peer.get(b, ()),
                                                         fill=b in mend_live,
                                                         fails=bad_versions.__contains__):
                puts.setdefault(key, []).append((b, origin, data))
        # What fails here and the blob cannot replace: the mend does what it can, but the
        # block still fails (not "mended"; ``Unmended``).
        left_live = {b for b in bad_live if first <= b < end} - set(mend_live)
        left_versions = {(b, key) for b, key in bad_versions if first <= b < end
                         and b in getattr(rep.versions.get(key), "entries", ())} - {
            (b, key) for key, items in puts.items() for b, _, _ in items}   # trimmed: gone
        if left_live or left_versions:
            ok[0] = Unmended(frozenset(left_live), frozenset(left_versions))
        if puts:
            files = []
            for key, items in sorted(puts.items()):
                new = key not in rep.versions
                v = rep.versions_for(key, sync_dir=False)
                written.append((v, [b for b, _, _ in items], new))   # undone if no slot follows
                v.put_data(items)
                files.append((v, items))
            jobs: list[Callable[[], None]] = [partial(_Replica.sync_dirs, v)
                                              for v, _ in files if v.unlinked_dirs]
            if self.cow_sync:
                jobs += [v.sync for v, _ in files]          # the barrier (``_cow``)
            if jobs:
                yield jobs
            if any(v.fd < 0 or rep.versions.get(v.key) is not v for v, _ in files):
                ok[0] = False                    # trimmed during the sync: verify again
                return
            rep.mutations += 1
            for v, items in files:
                v.put_slots(items)
            if self.cow_sync:
                yield [v.sync for v, _ in files]
        if not mend_live:
            return
        rep.mutations += 1
        seqs = rep.seqs
        changed = False
        for b in mend_live:
            seq, data = live.get(b, (0, None))
            if data is not None:
                rep.floor = min(rep.floor, seq)      # before the block changes, as in a write
            if seqs[b] != seq:
                rep.store_seq(b, seq)
                changed = True
        if changed and self.cow_sync:
            yield [partial(_sync_dup, os.dup(rep.seq_fd))]
        rep.mutations += 1
        holes = []
        for b in mend_live:
            data = live.get(b, (0, None))[1]
            if data is not None:
                rep.ext.write(b * BLOCK_SIZE, data)
            else:
                holes.append(rep.ext.unmap_checksums(b * BLOCK_SIZE, BLOCK_SIZE))
        if any(present for _lo, _hi, present in holes):
            yield [partial(_sync_dup, os.dup(rep.ext.crc_fd))]     # zero checksums, then punch
        rep.ext.punch(holes, synced=True)

    async def _syncs_later(self, rep: _Replica, jobs: list[Callable[[], None]],
                           hold: _Hold) -> None:
        """``jobs`` (syncs) in one worker thread, as ``_sync_later`` runs one: a failure
        retires ``rep`` on the loop, a cancelled caller's ``hold`` lasts until they end."""
        await self._await_sync(
            rep, asyncio.get_running_loop().run_in_executor(None, _run_syncs, jobs), hold)

    @staticmethod
    def _mend_versions(rep: _Replica, b: int, peer: list | tuple, fill: bool,
                       fails: Callable[[tuple[int, int]], bool] | None = None
                       ) -> list[tuple[int, int, bytes]]:
        """The peer's versions of block ``b`` to put here, (key, origin, data): those replacing
        failing ones, and if ``fill`` those missing here. ``fails((b, key))`` says whether a
        version fails (a verdict's); None: read it here."""
        out = []
        for key, origin, data in peer:
            v = rep.versions.get(key)
            entry = v.entries.get(b) if v is not None else None
            if entry is None and fill:
                rep.imports += 1                 # it may be one the reclaimer trimmed here
            elif entry is None or entry[0] != origin or (
                    v.check(b) if fails is None else not fails((b, key))):
                continue
            out.append((key, origin, data))
        return out

    def digest(self, vid: str, idx: int) -> bytes:
        """sha256 of the logical state (not the layout): live (block, seq, crc) of
        present blocks, then versions (block, origin, key, crc), sorted."""
        rep = self._get(vid, idx)
        h = hashlib.sha256()
        crcs, seqs = rep.ext.crcs, rep.seqs
        pack = struct.Struct("<III").pack
        h.update(b"live")
        h.update(b"".join(pack(b, seqs[b], c) for b, c in enumerate(crcs) if c))
        h.update(b"versions")
        vers = rep.block_versions(0, rep.blocks)
        vpack = struct.Struct("<IIII").pack
        h.update(b"".join(vpack(b, origin, key, crc)
                          for b in sorted(vers) for key, origin, crc in vers[b]))
        return h.digest()

    def checked_state(self, vid: str, idx: int) -> set[tuple]:
        """The part of ``digest``'s state that checksums cover: (block, crc) of present blocks
        and (block, key, crc) of versions; not seqs nor version origins, which nothing verifies
        (a rotten one still passes ``verify``). ``checked_state_of`` gives it for an export."""
        rep = self._get(vid, idx)
        out: set[tuple] = {("live", b, c) for b, c in enumerate(rep.ext.crcs) if c}
        for b, vlist in rep.block_versions(0, rep.blocks).items():
            out.update(("version", b, key, crc) for key, _origin, crc in vlist)
        return out

    # -- maintenance -----------------------------------------------------------

    def verify(self, vid: str, idx: int, first_block: int = 0, count: int | None = None) -> list[int]:
        """Blocks in the range whose live data or a version fails its checksum (or does not
        read); on the event loop. A worker thread uses ``verify_async``."""
        rep = self._get(vid, idx)
        count = self._verify_range(rep, first_block, count)
        with self._io(rep.disk):
            return _bad_blocks(*self._verify_detail(rep, None, first_block, count))

    async def verify_async(self, vid: str, idx: int, first_block: int = 0,
                           count: int | None = None) -> list[int]:
        """``verify`` in a worker thread, through private dups of the replica's fds taken
        here on the loop (``_VerifyPin``), closed by the worker when it is done: never
        through a number the loop closed (and another ``open`` reused) meanwhile. Shielded,
        so a cancelled caller neither leaks the dups (a worker cancelled before it started)
        nor closes them under a running one. An extent deleted (or retired) meanwhile is
        verified as it was; the caller's next store call finds it gone."""
        rep = self._get(vid, idx)
        count = self._verify_range(rep, first_block, count)
        return _bad_blocks(*await self._verify_detail_in_worker(rep, first_block, count))

    async def verify_verdict_async(self, vid: str, idx: int, first_block: int = 0,
                                   count: int | None = None) -> Verdict | None:
        """``verify_async`` for a decision that must hold until a later change (a repair's
        mend): the replica's mutation counter is read on the loop before the pin, the worker
        verifies, and back on the loop the counter and the replica are compared with no await
        in between. None when either moved (a write, unmap, revert, import or mend landed
        while the worker read: it may have seen half of it); else the verdict is the
        replica's state now, and stays so while ``mutations`` does not move (a trim only
        drops versions: a block it cleans is found good on the next verify). The disk's
        reads, seconds each when it is failing, never run on the loop."""
        rep = self._get(vid, idx)
        count = self._verify_range(rep, first_block, count)
        before = rep.mutations
        bad_live, bad_versions = await self._verify_detail_in_worker(rep, first_block, count)
        if self._replicas.get((vid, idx)) is not rep or rep.mutations != before:
            return None
        return Verdict(rep, before, first_block, count, frozenset(bad_live),
                       frozenset(bad_versions))

    def verify_verdict(self, vid: str, idx: int, first_block: int = 0,
                       count: int | None = None) -> Verdict:
        """``verify_verdict_async`` read on the event loop: nothing can land during it, so it
        always holds. For a few blocks of an extent that is written too often for a worker's
        verdict to ever stand (a repair's fallback); the reads stall the loop meanwhile."""
        rep = self._get(vid, idx)
        count = self._verify_range(rep, first_block, count)
        with self._io(rep.disk):
            bad_live, bad_versions = self._verify_detail(rep, None, first_block, count)
        return Verdict(rep, rep.mutations, first_block, count, frozenset(bad_live),
                       frozenset(bad_versions))

    async def _verify_detail_in_worker(self, rep: _Replica, first: int, count: int
                                       ) -> tuple[set[int], set[tuple[int, int]]]:
        """``_verify_detail`` in a worker thread through a ``_VerifyPin`` taken here on the loop
        (see ``verify_async``), shielded: a cancelled caller neither leaks nor closes the dups."""
        with self._io(rep.disk):
            pin = _VerifyPin(rep)
        try:
            done = asyncio.get_running_loop().run_in_executor(
                None, self._verify_detail_pinned, pin, first, count)
        except BaseException:
            pin.close()
            raise
        return await asyncio.shield(done)

    def _verify_detail_pinned(self, pin: _VerifyPin, first: int, count: int
                              ) -> tuple[set[int], set[tuple[int, int]]]:
        try:
            with self._io(pin.rep.disk):
                return self._verify_detail(pin.rep, pin, first, count)
        finally:
            pin.close()

    @staticmethod
    def _verify_range(rep: _Replica, first_block: int, count: int | None) -> int:
        if count is None:
            count = rep.blocks - first_block
        if first_block < 0 or count < 0 or first_block + count > rep.blocks:
            raise ValueError(f"blocks {first_block}+{count} outside the extent ({rep.blocks})")
        return count

    @staticmethod
    def _verify_detail(rep: _Replica, pin: _VerifyPin | None, first: int, count: int
                       ) -> tuple[set[int], set[tuple[int, int]]]:
        """(live blocks, (block, key) of versions) in the run that fail their checksum."""
        bad = set((rep.ext if pin is None else pin.ext).verify(first, count))
        bad_versions: set[tuple[int, int]] = set()
        for b, vlist in rep.block_versions(first, first + count).items():
            for key, _, _ in vlist:
                if pin is None:
                    v, fd = rep.versions.get(key), None
                else:
                    v, fd = pin.versions.get(key, (None, None))    # None: made after the pin
                try:
                    if v is not None and not v.check(b, fd):
                        bad_versions.add((b, key))
                except KeyError:
                    pass                 # trimmed meanwhile (worker thread)
                except OSError:
                    if pin is not None or v.fd >= 0:
                        raise
        return bad, bad_versions

    def trim(self, vid: str, idx: int, snapshot_seqs: set[int]) -> int:
        """Drop versions no snapshot in ``snapshot_seqs`` reads; returns blocks freed."""
        rep = self._get(vid, idx)
        snaps = sorted(snapshot_seqs)
        freed = 0
        with self._rep_io(rep):
            for key in list(rep.keys):
                v = rep.versions[key]
                gone = []
                for b, (origin, _) in v.entries.items():
                    i = bisect.bisect_left(snaps, origin)
                    if i == len(snaps) or snaps[i] > key:
                        gone.append(b)
                if not gone:
                    continue
                freed += len(gone)
                if len(gone) == len(v.entries):
                    v.entries.clear()
                else:
                    v.drop(gone)
                rep.drop_key_if_empty(key)
            rep.sync_vdir()                      # trimmed files stay gone after a power loss
            if freed:
                rep.disk.enospc = False
        return freed


def _versions_per_part(max_bytes: int) -> int:
    """Versions in one part of a block too big for one export (``export``): what fits
    ``max_bytes`` beside the blob's header and the block's live data; at least one."""
    return max(1, (max_bytes - 64 - 24 - BLOCK_SIZE - 8) // (BLOCK_SIZE + 24))


def _runs(blocks: list[int]) -> list[tuple[int, int]]:
    """Sorted block indexes as (start, length) runs."""
    runs: list[tuple[int, int]] = []
    for b in blocks:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs


def _bitmap(present) -> bytes:
    """1 bit per block, LSB first; ``present`` is a list of bools or (n, all_value)."""
    if isinstance(present, tuple):
        n, value = present
        if not value:
            return bytes((n + 7) // 8)
        out = bytearray(b"\xff" * ((n + 7) // 8))
        if n % 8:
            out[-1] = (1 << (n % 8)) - 1
        return bytes(out)
    out = bytearray((len(present) + 7) // 8)
    for k, p in enumerate(present):
        if p:
            out[k >> 3] |= 1 << (k & 7)
    return bytes(out)


def _readable(read) -> bytes | None:
    """``read()``, or None when the block fails its checksum or its sector does not read."""
    try:
        return read()
    except ChecksumError:
        return None
    except OSError as e:
        if e.errno not in _MEDIA_ERRORS:
            raise
        return None


def _filler(block: int, crc: int) -> bytes:
    """What an unreadable block is stored as: data that fails ``crc`` (zeros, unless they
    happen to match it), never something that reads as good."""
    zeros = bytes(BLOCK_SIZE)
    return zeros if block_crc(block, zeros) != crc else b"\xff" * BLOCK_SIZE


def unreadable_blocks(blob: bytes) -> list[int]:
    """The blocks an export blob marks unreadable, without decoding its data (a 1 MiB blob
    per copied piece: the usual answer, format 1, is one key in)."""
    u = msgpack.Unpacker()
    u.feed(blob)
    bad: set[int] = set()
    for _ in range(u.read_map_header()):
        key = u.unpack()
        if key == "format":
            if u.unpack() == _BLOB_FORMAT:
                return []
        elif key in ("bad_live", "bad_versions"):
            bad.update(e[0] for e in u.unpack())
        else:
            u.skip()
    return sorted(bad)


def checked_state_of(state: dict) -> set[tuple]:
    """``ReplicaStore.checked_state`` of the range of a parsed export blob (``_parse_blob``);
    unreadable entries count with their crc, as they stand on the exporter."""
    out: set[tuple] = {("live", b, crc) for b, _seq, crc, _data in state["live"] if crc}
    out.update(("live", b, crc) for b, _seq, crc in state.get("bad_live", ()))
    out.update(("version", b, key, crc) for b, _origin, key, crc, _data in state["versions"])
    out.update(("version", b, key, crc) for b, _origin, key, crc in state.get("bad_versions", ()))
    return out


# Volume ids are 32 hex digits (meta/volumes.py); a longer one would make file names past the
# file system's 255 bytes (an EIO-like failure, logged whole) instead of a refused request.
MAX_VOLUME_ID = 128


def _check_ints(what: str, *values) -> None:
    """Block numbers, seqs and crcs of an import blob are ints (msgpack also has floats and
    bools, which passed the range checks and broke ``_import`` half-way through)."""
    for v in values:
        if type(v) is not int:
            raise BadBlob(f"import: {what} field {v!r:.40} is not an integer")


def _parse_blob(blob: bytes) -> dict:
    """Decode and check an export blob; bad input raises ``BadBlob``, nothing applied."""
    try:
        state = msgpack.unpackb(blob)
    except Exception as e:            # msgpack raises several unrelated types
        raise BadBlob(f"import: blob is not msgpack: {e}") from None
    if not isinstance(state, dict) or state.get("format") not in (_BLOB_FORMAT,
                                                                  _BLOB_FORMAT_UNREADABLE):
        raise BadBlob("import: unknown blob format")
    try:
        o, e = state["offset"], state["end"]
        if not (isinstance(o, int) and isinstance(e, int) and 0 <= o <= e
                and o % BLOCK_SIZE == 0 and e % BLOCK_SIZE == 0):
            raise BadBlob(f"import: bad range {o}..{e}")
        lo, hi = o // BLOCK_SIZE, e // BLOCK_SIZE
        for b, s, crc, d in state["live"]:
            _check_ints("live block", b, s, crc)
            if not lo <= b < hi or not 0 < s <= _MAX_SEQ:
                raise BadBlob(f"import: bad live block {b} seq {s}")
            if d is not None and (len(d) != BLOCK_SIZE or block_crc(b, d) != crc):
                raise BadBlob(f"import: live block {b} fails its checksum")
        after = state.get("after")
        if after is not None and not (isinstance(after, int) and 0 <= after <= _MAX_SEQ):
            raise BadBlob(f"import: bad after {after!r}")
        for b, origin, key, crc, d in state["versions"]:
            _check_ints("version", b, origin, key, crc)
            if not lo <= b < hi or not 0 <= origin <= key <= _MAX_SEQ:
                raise BadBlob(f"import: bad version of block {b} ({origin}, {key})")
            if after is not None and b == lo and key <= after:
                raise BadBlob(f"import: version ({origin}, {key}) of block {b} is not after {after}")
            if len(d) != BLOCK_SIZE or block_crc(b, d) != crc:
                raise BadBlob(f"import: version ({origin}, {key}) of block {b} fails its checksum")
        if state["format"] == _BLOB_FORMAT_UNREADABLE:
            shipped = {e[0] for e in state["live"]}
            for b, s, crc in state["bad_live"]:
                _check_ints("unreadable block", b, s, crc)
                if not lo <= b < hi or not 0 < s <= _MAX_SEQ or not 0 < crc <= 0xFFFFFFFF \
                        or b in shipped:
                    raise BadBlob(f"import: bad unreadable block {b} seq {s}")
            shipped = {(e[0], e[2]) for e in state["versions"]}
            for b, origin, key, crc in state["bad_versions"]:
                _check_ints("unreadable version", b, origin, key, crc)
                if not lo <= b < hi or not 0 <= origin <= key <= _MAX_SEQ \
                        or not 0 < crc <= 0xFFFFFFFF or (b, key) in shipped \
                        or (after is not None and b == lo and key <= after):
                    raise BadBlob(f"import: bad unreadable version of block {b} ({origin}, {key})")
    except (KeyError, TypeError, ValueError) as err:
        raise BadBlob(f"import: malformed blob: {err}") from None
    return state
