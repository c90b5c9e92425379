"""The I/O coordinator: one volume's BlockDevice over its extents' replicas.

The chunk server that serves a LUN runs one of these per volume. It is the
volume's only writer (ownership epoch, see ``ownership``), which is what lets
it keep the invariants the rest of the engine relies on:

- a write is acknowledged only when every in-sync replica has it, or the
  ones that failed were dropped from the extent in etcd first (through the
  meta leader), so an acknowledged write is never only on a replica the map
  no longer trusts;
- snapshots freeze ``seq`` between writes (``WriteGate``), so a write is
  entirely before or entirely after a snapshot;
- a resync copies a range only while no write to it is in flight
  (``RangeLocks``), and writes behind the copy cursor go to the new replica
  too, so the copy converges while the volume stays online.

A *view* (``view_seq``) is a read-only coordinator of a snapshot: reads carry
the view seq and never take ownership. Clones read absent blocks through
their parent's view (``parent``), recursively.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from chunk.blockdev import MediumError, MiscompareError, NoSpaceError, ReadOnlyError
from chunk.scsi.sense import NOT_READY, ScsiError
from zstore import etcd as zetcd
from zstore.records import ExtentRecord, RecoveryTask, Snapshot, Volume, VolumeOp, VolumeOwner

from . import ownership
from . import replicas as rk
from .extent_file import BLOCK_SIZE, EXTENT_SIZE, block_runs
from .futures import retrieve
from .metaclient import MetaError
from .replica_store import unreadable_blocks
from .wire import MAX_DATA

if TYPE_CHECKING:
    from .engine import StorageEngine

log = logging.getLogger(__name__)

COPY_CHUNK = 1 << 20
# How long one request keeps taking a fenced volume back before failing with FencedError.
# Two servers writing one volume (multipath across chunk servers) alternate ownership;
# each round makes progress, so this only bounds a pathological case.
RETAKE_WINDOW = 20.0
LEASE_POLL = 0.1      # how often a write waiting for the server's etcd lease looks again
READ_LEASE_WAIT = 3.0  # how long a read waits for a lapsed lease before NOT READY
# How long a volume's first I/O waits for the storage engine to start before failing NOT
# READY (the host retries): an engine that cannot start (its port in use) must not hold it.
START_WAIT = 10.0
CLOSE_COW_WAIT = 30.0  # how long a closing volume waits for its local COWs' syncs
# How long a closing volume waits for the writes already admitted to finish their handling
# (retries, drops, a retake) before it releases ownership. Each is bounded (the replica
# timeout, the meta client's retries, RETAKE_WINDOW) except one waiting for a lapsed lease
# of a server not stopping; past this, ownership is left held (see ``close``).
CLOSE_DRAIN_WAIT = 60.0
# How long a host's I/O waits for the volume to open (its extent map listed from etcd, which
# the watch retries for ever while etcd is out of reach) before failing NOT READY; the open
# goes on, and a later I/O finds it done. Volume ops and recoveries wait as long as it takes.
OPEN_WAIT = 15.0
# etcd (or the way to it) failing a call: ownership and the meta leader are looked up there.
_ETCD_UNREACHABLE = zetcd.UNAVAILABLE_ERRORS
FINISH_TRIES = 3       # a volume op's outcome write, tried again at once while etcd is out
FINISH_RETRY = 0.2     # seconds before its second try (doubling)
_CUT_SHORT = object()  # a volume op's work that never ended (cancelled): ``Coordinator._ran_ops``


class FencedError(MediumError):
    """Another chunk server took the volume over while this write was in flight."""


class NotServing(ScsiError):
    """This chunk server cannot serve the volume now. Answered NOT READY, IN PROCESS OF
    BECOMING READY (04/01), which hosts retry (through another server once the session is
    gone), not as a medium error."""

    def __init__(self, message: str) -> None:
        super().__init__(NOT_READY, (0x04, 0x01))
        self.args = (message,)


class ServerStopping(NotServing):
    """This chunk server is stopping: no mutation starts any more (its lease is no longer
    valid for one)."""

    def __init__(self, vid: str) -> None:
        super().__init__(f"volume {vid}: this chunk server is stopping")


class WriteGate:
    """Writes enter shared; a barrier (snapshot, revert) waits for them and holds new ones.

    Entering and leaving touch two plain attributes: they run on every write, and an
    ``asyncio.Event`` set or cleared per write cost more than the rest of the gate. The
    events exist only while a barrier holds the gate."""

    def __init__(self) -> None:
        self._inflight = 0
        self._closed: asyncio.Event | None = None    # set when the barrier's holder reopens
        self._drained: asyncio.Future | None = None  # the barrier's wait for writes in flight
        self._lock = asyncio.Lock()
        self._shut = None                            # ``shut``: the error every enter raises

    async def enter(self) -> None:
        while self._closed is not None:
            if self._shut is not None:
                raise self._shut()
            await self._closed.wait()
        self._inflight += 1

    def try_enter(self) -> bool:
        """``enter`` when it would not wait (the write fast path); False when a barrier holds."""
        if self._closed is not None:
            return False
        self._inflight += 1
        return True

    def leave(self) -> None:
        self._inflight -= 1
        if not self._inflight and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    async def __aenter__(self) -> None:
        await self._lock.acquire()
        self._closed = asyncio.Event()
        if self._inflight:
            self._drained = asyncio.get_running_loop().create_future()
            try:
                await self._drained
            except BaseException:
                self._reopen()
                raise
            finally:
                self._drained = None

    async def __aexit__(self, *exc: object) -> None:
        self._reopen()

    def _reopen(self) -> None:
        closed = self._closed
        if self._shut is None:          # shut: closed for good (``enter`` raises)
            self._closed = None
        if closed is not None:
            closed.set()
        if self._lock.locked():
            self._lock.release()

    def shut(self, error) -> None:
        """Close the gate for good (a closing coordinator): from now on no write enters
        (``enter`` raises ``error()``, those waiting behind a barrier too; ``try_enter`` is
        False). Nothing is added to entering or leaving: a shut gate looks closed to them."""
        self._shut = error
        if self._closed is None:
            self._closed = asyncio.Event()
        self._closed.set()              # wake those parked behind a barrier: they raise

    async def drain(self, timeout: float) -> bool:
        """Once ``shut``: wait up to ``timeout`` for the writes in flight to leave (after a
        barrier holding the gate, a volume op, ends). True if they all left in time."""
        try:
            await asyncio.wait_for(self._drain(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def _drain(self) -> None:
        async with self._lock:
            if self._inflight:
                self._drained = asyncio.get_running_loop().create_future()
                try:
                    await self._drained
                finally:
                    self._drained = None


class RangeLocks:
    """In-flight write ranges per extent, and at most one range a copy holds per extent."""

    def __init__(self) -> None:
        self._inflight: dict[int, dict[int, tuple[int, int]]] = {}
        self._busy: dict[int, tuple[int, int]] = {}
        self._next = 0
        self._waiting = 0                  # begin() calls waiting for an overlapping write
        self._changed = asyncio.Event()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _free(self, idx: int, lo: int, hi: int) -> bool:
        """No copy holds [lo, hi) of extent idx and no write in flight overlaps it.

        Overlapping mutations run one after the other: each reaches the replicas in its own
        order (a remote sent at once, the local one inline or on await, an UNMAP one replica
        after another), so two at once could land in different orders on different replicas
        and leave them disagreeing with both acknowledged."""
        b = self._busy.get(idx)
        if b is not None and lo < b[1] and hi > b[0]:
            return False
        d = self._inflight.get(idx)
        if d:
            for s, e in d.values():
                if lo < e and hi > s:
                    return False
        return True

    async def begin(self, idx: int, lo: int, hi: int) -> int:
        while not self._free(idx, lo, hi):
            self._waiting += 1
            try:
                await self._changed.wait()
            finally:
                self._waiting -= 1
        self._next += 1
        self._inflight.setdefault(idx, {})[self._next] = (lo, hi)
        return self._next

    def try_begin(self, idx: int, lo: int, hi: int) -> int | None:
        """``begin`` when it would not wait, else None (the write fast path)."""
        if not self._free(idx, lo, hi):
            return None
        self._next += 1
        self._inflight.setdefault(idx, {})[self._next] = (lo, hi)
        return self._next

    def end(self, idx: int, token: int) -> None:
        d = self._inflight.get(idx)
        if d is not None:
            d.pop(token, None)
            if not d:
                del self._inflight[idx]
        if self._busy or self._waiting:
            self._wake()

    async def hold(self, idx: int, lo: int, hi: int) -> None:
        """Block new writes to [lo, hi) of extent idx and wait for the ones in flight there."""
        while idx in self._busy:
            await self._changed.wait()
        self._busy[idx] = (lo, hi)
        try:
            while any(not (e <= lo or s >= hi) for s, e in self._inflight.get(idx, {}).values()):
                await self._changed.wait()
        except BaseException:           # cancelled while waiting: the caller's finally never runs
            self.release(idx)
            raise

    def release(self, idx: int) -> None:
        self._busy.pop(idx, None)
        self._wake()


@dataclass
class Dirty:
    """Blocks written to an extent since ``chunk`` was dropped from it by this coordinator."""
    generation: int            # the generation the chunk was dropped at (ExtentRecord.stale)
    seq: int                   # our seq then: a snapshot since makes the log insufficient
    blocks: set[int] = field(default_factory=set)


@dataclass
class Sync:
    target: str
    replica: Any
    cursor: int = 0            # bytes of the extent already copied
    failed: str | None = None


def _blocks(lo: int, hi: int) -> range:
    return range(lo // BLOCK_SIZE, (hi + BLOCK_SIZE - 1) // BLOCK_SIZE)


def _absent_runs(present: bytes, nblocks: int) -> list[tuple[int, int]]:
    """Runs [a, b) of block positions whose bit is clear."""
    runs: list[tuple[int, int]] = []
    full = nblocks // 8
    if present[:full] == b"\xff" * full and all((present[full] >> k) & 1 for k in range(nblocks % 8)):
        return runs
    start = None
    for k in range(nblocks):
        bit = (present[k >> 3] >> (k & 7)) & 1 if (k >> 3) < len(present) else 0
        if not bit and start is None:
            start = k
        elif bit and start is not None:
            runs.append((start, k))
            start = None
    if start is not None:
        runs.append((start, nblocks))
    return runs


def _whole_extent() -> list[tuple[int, int]]:
    """A full copy's ranges: the extent in COPY_CHUNK pieces."""
    return [(o, min(COPY_CHUNK, EXTENT_SIZE - o)) for o in range(0, EXTENT_SIZE, COPY_CHUNK)]


def _never_changed(rec: ExtentRecord) -> bool:
    """The extent's replica set is as allocated (generation 1, nothing dropped): if none of
    its replicas has it, it may never have been CREATEd (the allocator died in between)."""
    return rec.generation == 1 and not rec.stale


def _insync_results(rec: ExtentRecord, pairs) -> list:
    """The (replica, result) pairs of ``rec``'s in-sync replicas (not a recovery copy's)."""
    insync = set(rec.replicas)
    return [(r, res) for r, res in pairs if r.chunk_id in insync]


def _refused_alike(rec: ExtentRecord, mine) -> rk.ReplicaFailed | None:
    """One refusal when every in-sync replica (``mine``: ``_insync_results``) refused the
    request itself alike, all full (NO_SPACE) or all INVALID: nothing is wrong with any one
    of them, so none is dropped. None otherwise."""
    if not mine or len(mine) != len(set(rec.replicas)):
        return None
    kinds = {res.kind if isinstance(res, rk.ReplicaFailed) else rk.IO for _, res in mine}
    if len(kinds) == 1 and kinds <= {rk.NO_SPACE, rk.INVALID}:
        return mine[0][1]
    return None


def _none_reached(rec: ExtentRecord, mine, changes: bool, landed: bool) -> bool:
    """For ``_handle_failures``: every in-sync replica (``mine``: ``_insync_results``) failed
    UNAVAILABLE, and the request cannot have left them differing: it changes nothing on a
    replica (``changes`` False: a flush), or it reached none of them (every one ``unsent``:
    a dial refused or timed out, no registration record, the replica client closed) and no
    earlier attempt of it may have changed one (``landed``)."""
    if not mine or len(mine) != len(set(rec.replicas)):
        return False
    if not all(isinstance(res, rk.ReplicaFailed) and res.kind == rk.UNAVAILABLE for _, res in mine):
        return False
    return not changes or (not landed and all(res.unsent for _, res in mine))


def _may_have_changed(rec: ExtentRecord, targets, results) -> bool:
    """An attempt (``results`` per replica of ``targets``: None when it took it) may have
    changed an in-sync replica of ``rec``: one took it, or failed in a way that does not
    prove it did not. Only a refusal before anything is applied (a fenced epoch, a missing
    extent) or a request never sent (``unsent``) proves it."""
    insync = set(rec.replicas)
    for r, res in zip(targets, results):
        if r.chunk_id not in insync:
            continue
        if not isinstance(res, rk.ReplicaFailed):
            return True             # None: it took it; any other exception: unknown
        if not (res.kind in rk.FENCED or res.kind == rk.NO_EXTENT or res.unsent):
            return True
    return False


_CANCELLED = object()      # a _PendingWrite outcome: the local replica's deferred write was cancelled


def _sole(rec: ExtentRecord) -> bool:
    """The extent has one in-sync replica (a 1-replica volume, or one degraded to one): its
    writes carry ``sole``, so that replica records an intent first (``ExtentFile``): with no
    peer to repair it, a block killed between its data and its crc must mend itself."""
    return len(rec.replicas) == 1


class _PendingWrite:
    """One fast-path write waiting for its remote replicas' replies."""

    __slots__ = ("coord", "done", "idx", "eoff", "n", "view", "rec", "targets", "epoch", "seq",
                 "token", "outcomes", "left")

    def __init__(self, coord, done, idx, eoff, n, view, rec, targets, epoch, seq, token) -> None:
        self.coord, self.done = coord, done
        self.idx, self.eoff, self.n, self.view = idx, eoff, n, view
        self.rec, self.targets, self.epoch, self.seq, self.token = rec, targets, epoch, seq, token
        self.outcomes: list = [None] * len(targets)
        self.left = 0

    def local_callback(self, k: int, local):
        """The done callback of the task finishing the local replica's write (a COW)."""
        def finished(task) -> None:
            if self.outcomes[k] is None:
                if task.cancelled():
                    self.outcomes[k] = _CANCELLED      # shutting down: no replica failed
                elif isinstance(task.exception(), rk.ReplicaFailed):
                    self.outcomes[k] = task.exception()
                elif task.exception() is not None:
                    e = task.exception()
                    self.outcomes[k] = rk.ReplicaFailed(local.chunk_id, rk.IO, f"{type(e).__name__}: {e}")
            self.left -= 1
            if not self.left:
                self.coord._write_settled(self)
        return finished

    def make_callback(self, k: int, replica):
        def replied(reply) -> None:
            # None: a plain OK (send_write); anything else is looked at by ``outcome_of``
            if reply is not None and self.outcomes[k] is None:
                self.outcomes[k] = replica.outcome_of(reply)
            self.left -= 1
            if not self.left:
                self.coord._write_settled(self)
        return replied


class _PiecewiseWrite(_PendingWrite):
    """A fast-path write of more than one frame: a remote replica may take some frames and
    fail others (fenced between two by another owner), so which frames failed where is kept
    (``missed``: position -> frame numbers), and each frame is recovered with its own
    outcomes (``piece_outcomes``). One outcome for the whole write made a replica that
    took frame 0 look as if it missed it, and ``_split_by_snapshot`` then kept replicas
    that disagree on a snapshot."""

    __slots__ = ("missed",)

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.missed: dict[int, set[int]] = {}

    def send(self, k: int, replica, vid: str, idx: int, epoch: int, seq: int,
             sole: bool = False) -> None:
        """Send every frame of the write to remote ``replica`` (position ``k``)."""
        view, eoff, n = self.view, self.eoff, self.n
        for i, pos in enumerate(range(0, n, MAX_DATA)):
            part = view[pos:pos + MAX_DATA]
            if not (replica.send_write(vid, idx, eoff + pos, part, epoch, seq,
                                       self.frame_callback(k, replica, i), sole=True) if sole
                    else replica.send_write(vid, idx, eoff + pos, part, epoch, seq,
                                            self.frame_callback(k, replica, i))):
                # One outcome for every frame: unsent only if no frame left for it.
                self.outcomes[k] = rk.ReplicaFailed(replica.chunk_id, rk.UNAVAILABLE,
                                                    "request not sent", unsent=not i)
                self.missed.setdefault(k, set()).update(range(i, -(-n // MAX_DATA)))
                return
            self.left += 1

    def frame_callback(self, k: int, replica, i: int):
        def replied(reply) -> None:
            failure = replica.outcome_of(reply) if reply is not None else None
            if failure is not None:
                self.missed.setdefault(k, set()).add(i)
                if self.outcomes[k] is None:
                    self.outcomes[k] = failure
            self.left -= 1
            if not self.left:
                self.coord._write_settled(self)
        return replied

    def piece_outcomes(self, i: int) -> list:
        """The outcomes of frame ``i``: a remote replica's failure only if that frame failed
        there; the local replica's (one call for the whole write) for every frame."""
        return [o if o is not None and (k not in self.missed or i in self.missed[k]) else None
                for k, o in enumerate(self.outcomes)]


def _runs(offsets: list[int], step: int) -> list[tuple[int, int]]:
    """Ascending offsets of ``step``-byte blocks -> [start, end) runs of adjacent ones."""
    out: list[tuple[int, int]] = []
    for k in offsets:
        if out and out[-1][1] == k:
            out[-1] = (out[-1][0], k + step)
        else:
            out.append((k, k + step))
    return out


def _first_difference(a, b) -> int:
    """Offset of the first differing byte of two equal-length buffers that differ."""
    a, b = memoryview(a), memoryview(b)
    lo, step = 0, 4096
    while a[lo:lo + step] == b[lo:lo + step]:
        lo += step
    for i, (x, y) in enumerate(zip(bytes(a[lo:lo + step]), bytes(b[lo:lo + step]))):
        if x != y:
            return lo + i
    return lo + min(len(a) - lo, len(b) - lo, step)


class _Unreachable:
    """A replica whose handle could not be had: its chunk server has no registration record
    (``Peers.address`` raises UnknownPeer, a LookupError: never registered, or removed). It
    stands in as a peer that does not answer: every request fails UNAVAILABLE, so a
    mutation drops it as it drops a dead peer (the raw LookupError was answered INTERNAL
    TARGET FAILURE on every write to the extent, and the replica never dropped)."""

    connected = True                  # nothing to dial: ``_replicate`` sends at once

    def __init__(self, chunk_id: str, why: str = "no registration record") -> None:
        self.chunk_id, self.why = chunk_id, why

    async def _fail(self, *args, **kw):
        raise rk.ReplicaFailed(self.chunk_id, rk.UNAVAILABLE, self.why, unsent=True)

    read = write = start_write = unmap = flush = create = fence = revert = _fail
    export = import_ = setgen = digest = _fail


class Coordinator:
    def __init__(self, engine: "StorageEngine", volume: Volume, view_seq: int = 0) -> None:
        self.engine = engine
        self.volume = volume
        self.vid = volume.volume_id
        self.block_size = volume.block_size
        self.thin = volume.thin
        self._size = volume.size
        self.view_seq = view_seq
        self.readonly = bool(view_seq)
        self.epoch = 0
        self.owner_rev = 0
        self.seq = volume.snap_seq
        self.extents: dict[int, ExtentRecord] = {}
        self.parent: Coordinator | None = None
        self.refs = 0
        self._ready_task: asyncio.Task | None = None
        self._is_ready = False
        self._stop = asyncio.Event()
        self._closing: asyncio.Future | None = None   # ``close`` began (its task)
        self._closed = False                      # ``close`` drained: ownership is never taken again
        # Ownership was taken (a retake, a flush's take-back) after ``close`` began: ``close``
        # leaves it held, never released (see ``_close``).
        self._taken_closing = False
        self._watch: asyncio.Task | None = None
        self._synced = asyncio.Event()
        self._gate = WriteGate()
        # Volume ops whose work ran under a claim of ours and whose outcome is not yet
        # written: op id -> (the claimed record, its error or None; _CUT_SHORT while it runs
        # or if it never ended). A rerun of such an op only writes the outcome (run_volop).
        self._ran_ops: dict[str, tuple[bytes, Any]] = {}
        self._locks = RangeLocks()
        self._alloc: dict[int, asyncio.Future] = {}
        self._drops: dict[tuple[int, str], asyncio.Future] = {}
        self._owner_lock = asyncio.Lock()
        self._lease_gen = 0                      # the server lease generation ownership was taken in
        self._taken_epoch = 0                    # the last epoch ``_acquire`` took (0: none)
        self._flush_lock = asyncio.Lock()
        self._dirty: dict[tuple[int, str], Dirty] = {}
        self._sync: dict[int, Sync] = {}
        self._unflushed: set[int] = set()
        self._routes: dict[int, tuple] = {}      # idx -> the write fast path's replica route
        self._short: set[int] = set()            # extents with fewer in-sync replicas than _need
        self._loop: asyncio.AbstractEventLoop | None = None   # the write fast path's, cached
        self._recovering: set[asyncio.Task] = set()   # fast-path writes whose replicas failed
        self._local_later: set[asyncio.Task] = set()  # fast-path writes' local COWs (the disk)
        self.counters = {"read_retries": 0, "checksum_errors": 0, "drops": 0, "fenced": 0,
                         "fast_writes": 0, "fast_write_handoffs": 0,
                         # recovery: pieces or blocks taken from another source than the first,
                         # and blocks no in-sync replica could read (copied as unreadable)
                         "copy_source_retries": 0, "unreadable_copied": 0,
                         # copies whose replicas still differed at the digest: copied again in full
                         "copy_full_fallbacks": 0}

    # -- geometry ----------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    def resize(self, size: int) -> None:
        if size > self._size:
            self._size = size

    @property
    def is_clone(self) -> bool:
        return bool(self.volume.source_snapshot)

    # -- lifecycle ---------------------------------------------------------------

    async def ready(self, wait: float | None = None) -> None:
        """Open the volume once (``_open``); ``wait``: fail NOT READY after that many seconds
        (a host's I/O: it waited for ever while etcd was out of reach, with no answer at
        all), the open going on for the next caller."""
        if self._is_ready:                       # hot path: every I/O passes here
            return
        if self._closing is not None:
            raise NotServing(f"volume {self.vid}: closed on this chunk server")
        if self._ready_task is None:
            self._ready_task = asyncio.ensure_future(self._open())
        task = self._ready_task
        try:
            await asyncio.wait_for(asyncio.shield(task), wait)
        except BaseException as e:
            if not task.done():             # still opening: this caller gave up or was cancelled
                if isinstance(e, asyncio.TimeoutError):
                    raise NotServing(f"volume {self.vid}: not open within {wait:.0f}s (its "
                                     f"extent map cannot be read from etcd)") from None
                raise
            if not task.cancelled() and self._ready_task is task:
                self._ready_task = None     # it failed (etcd, say): the next I/O tries again
            raise
        self._is_ready = True

    async def _open(self) -> None:
        e = self.engine
        if not e.started.is_set():
            try:
                await asyncio.wait_for(e.started.wait(), START_WAIT)
            except asyncio.TimeoutError:
                raise NotServing(f"volume {self.vid}: the storage engine has not started "
                                 f"within {START_WAIT:.0f}s") from None
        if self.volume.source_snapshot and self.parent is None:
            got = await e.etcd.get(e.keys.snapshot(self.volume.source_snapshot))
            if got is None:
                raise MediumError(f"volume {self.vid}: source snapshot {self.volume.source_snapshot} is gone")
            snap = Snapshot.decode(got.value)
            self.parent = await e.view(snap.volume_id, snap.seq)

        async def on_snapshot(kvs):
            fresh = {}
            for _, v in kvs:
                rec = ExtentRecord.decode(v)
                fresh[rec.index] = rec
            for idx, rec in fresh.items():
                self._adopt(rec)
            for idx in list(self.extents):
                if idx not in fresh:
                    self.extents.pop(idx)
            self._synced.set()

        async def on_event(ev):
            if ev.kind == "PUT":
                self._adopt(ExtentRecord.decode(ev.kv.value))
            else:
                _, idx = e.keys.extent_key_parts(ev.kv.key)
                self.extents.pop(idx, None)

        self._watch = asyncio.ensure_future(
            zetcd.watch_prefix(e.etcd, e.keys.extents(self.vid), on_snapshot, on_event, self._stop))
        await self._synced.wait()

    def _adopt(self, rec: ExtentRecord) -> None:
        cur = self.extents.get(rec.index)
        if cur is None or rec.generation >= cur.generation:
            self.extents[rec.index] = rec
            if len(rec.replicas) < self._need():
                self._short.add(rec.index)
            elif self._short:
                self._short.discard(rec.index)

    def _need(self) -> int:
        """In-sync replicas a write must be on to be acknowledged: ``min_write_replicas``,
        at most the volume's replica count (a 1-replica volume is not unwritable for it)."""
        return max(1, min(self.engine.min_write_replicas, self.volume.replicas))

    def _too_few(self, idx: int) -> MediumError | None:
        """The error a write to extent ``idx`` fails with while fewer than ``_need`` replicas
        are in sync (the one ``_handle_failures`` raises), else None."""
        rec = self.extents.get(idx)
        left = len(rec.replicas) if rec is not None else 0
        if left < self._need():
            return MediumError(f"volume {self.vid} extent {idx}: only {left} replica(s) left")
        return None

    async def close(self) -> None:
        """Stop serving the volume: no write is admitted from now on (NOT READY), the writes
        in flight finish, then ownership is released, or left held when a write outlived the
        drain or ownership was taken back while closing (``_close``). A second call waits
        for the first; a caller cancelled meanwhile leaves it going."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
            self._closing.add_done_callback(retrieve)
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        # No write is admitted from here (the gate raises NotServing, the fast path declines
        # to the gate); those admitted already finish their whole handling, retries, drops,
        # a retake and ``_split_by_snapshot`` included, before ownership is released: once
        # released, the meta may take a snapshot by itself at our seq, and an attempt still
        # retrying would land inside it. Failing them instead (17256e8 reverted that) left
        # a write that had landed on some replicas only without its split, and answered a
        # COMPARE AND WRITE that may have landed NOT READY (its retry is not idempotent).
        self._gate.shut(lambda: NotServing(f"volume {self.vid}: closed on this chunk server"))
        if self._ready_task is not None and not self._ready_task.done():
            self._ready_task.cancel()        # an open waiting for etcd: nobody waits for it now
            await asyncio.gather(self._ready_task, return_exceptions=True)
        # Bounded: every attempt waits at most the replica timeout, a drop the meta client's
        # retries, a retake RETAKE_WINDOW; only a write waiting for this server's lapsed lease
        # (etcd out of reach, the server not stopping: a stopping one fails it at once) can
        # wait longer, and it sends nothing while it waits.
        drained = await self._gate.drain(CLOSE_DRAIN_WAIT)
        self._closed = True                  # ``_acquire`` refuses from now on
        if self._local_later:
            # Local COWs still waiting for the disk land before ownership goes and the engine
            # flushes for its clean stop (which assumes nothing writes any more).
            await asyncio.wait(set(self._local_later), timeout=CLOSE_COW_WAIT)
        self._stop.set()
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        # Under the owner lock: a retake in flight (a flush's, say) ends first; none starts
        # after (``_closed``).
        async with self._owner_lock:
            if self.epoch and not drained:
                # A write still in flight may yet go out at our seq: released, the meta could
                # commit a snapshot by itself under it. Held, a snapshot goes through this
                # server as an op (a new coordinator takes the volume with a new epoch, which
                # fences the write), or through the meta once this server's lease is gone.
                log.error("volume %s: writes still in flight %.0fs after its close began; "
                          "ownership (epoch %d) is left held", self.vid, CLOSE_DRAIN_WAIT, self.epoch)
            elif self.epoch and self._taken_closing:
                # Taken back while closing: a write in flight was fenced (or a flush found the
                # owner record moved) because another coordinator took the volume, this LU
                # mapped again on this server (``engine.release`` forgets us before our close)
                # or another server. That one still believes it owns the volume at its older
                # epoch and writes on wherever ours never fenced it. Released, the meta could
                # commit a snapshot by itself under those writes; held, a snapshot goes
                # through an owner as an op, under a new epoch that fences them first.
                log.warning("volume %s: ownership taken back (epoch %d) while closing, from a "
                            "coordinator that may still write; left held, not released",
                            self.vid, self.epoch)
            elif self.epoch:
                try:
                    await ownership.release(self.engine.etcd, self.engine.keys, self.vid,
                                            self.engine.chunk_id, self.epoch)
                except Exception as e:  # noqa: BLE001 - best effort; the epoch still fences
                    log.warning("volume %s: could not release ownership: %s", self.vid, e)
        if self.parent is not None:
            await self.engine.release(self.parent)

    async def ensure_owner(self) -> None:
        if self.view_seq:
            raise ReadOnlyError("snapshot views are read-only")
        lease = self.engine.lease
        if lease is not None:
            # No write starts while this server's etcd lease may have lapsed: by then the meta
            # may have taken a snapshot itself or handed the volume on, and only a write at a
            # fresh seq under a fresh epoch is safe. A new lease means exactly that happened
            # or could have: ownership is taken again (new epoch, the volume's current seq).
            # A stopping server's lease is kept alive only until its sessions and engine are
            # down, and never valid for a write again: waiting would hold its shutdown forever.
            await self._await_lease(lease, None, lambda: ServerStopping(self.vid))
            if self.epoch and lease.lease_gen == self._lease_gen:
                return
        elif self.epoch:
            return
        async with self._owner_lock:
            # The check and the re-take in one section, and the epoch in use left in place
            # until ``_acquire`` replaces it: ``self.epoch`` is never 0 once taken (a request
            # that read 0 meanwhile sent it unfenced, and replicas refuse a mutation at 0).
            # Requests in flight check ``_owns`` before each attempt, so none is sent under the
            # old epoch once the lease changed: they wait here for the new one.
            if not self.epoch or (lease is not None and lease.lease_gen != self._lease_gen):
                await self._acquire()

    def _owns(self) -> bool:
        """Ownership is held and current: an epoch taken under this server's present etcd
        lease, whose deadline has not passed. Every attempt of a mutation checks this right
        before it is sent (at ``self.epoch``, ``self.seq``), not only the request's
        ``ensure_owner``: a request waits (range lock, gate, a slow replica, a meta call) and
        the lease may lapse meanwhile; once it may have, the meta may commit a snapshot at our
        seq by itself, and a write sent then at that seq would land inside it."""
        if not self.epoch:
            return False
        lease = self.engine.lease
        return lease is None or (lease.lease_gen == self._lease_gen
                                 and time.monotonic() < lease.lease_deadline)

    async def _epoch(self) -> int:
        """The epoch to send a mutation at now (``_owned``), as one call for the copies."""
        if not self._owns():
            await self._owned()
        return self.epoch

    async def _owned(self) -> tuple[int, int]:
        """(epoch, seq) to send an attempt at, ownership re-taken first if not ``_owns``."""
        while not self._owns():
            await self.ensure_owner()
        return self.epoch, self.seq

    async def _acquire(self) -> None:
        """Take ownership in etcd (see ``_take``); etcd out of reach is NOT READY, which the
        host retries, as a flush that cannot read the owner record answers: nothing failed
        on the replicas (a raw etcd error was answered INTERNAL TARGET FAILURE). Never once
        closed (``close`` drained): ownership was released, or is left to whoever takes the
        volume over; a write left behind past the drain fails NOT READY instead."""
        if self._closed:
            raise NotServing(f"volume {self.vid}: closed on this chunk server")
        try:
            await self._take()
        except _ETCD_UNREACHABLE as err:
            raise NotServing(f"volume {self.vid}: cannot take ownership in etcd: {err}") from None
        finally:
            # Taken, or perhaps (etcd failed after the swap, the refresh failed): the owner
            # record may name a new epoch of ours.
            if self._closing is not None:
                self._taken_closing = True

    async def _take(self) -> None:
        lease = self.engine.lease
        lease_gen = lease.lease_gen if lease is not None else 0
        try:
            epoch, rev, vol = await ownership.acquire(self.engine.etcd, self.engine.keys,
                                                      self.vid, self.engine.chunk_id)
        except ownership.OwnershipError as e:
            raise MediumError(str(e)) from None
        # Every acquire raises the owner record's epoch by one, so ``epoch == last + 1`` proves
        # the record still held the epoch we took last: nobody owned the volume in between,
        # and our dirty logs hold every write since their drops. Any other epoch means
        # another server (or the meta) took it meanwhile and may have written without the
        # logs (a lease lapse lets that happen without any replica fencing us, so ``_retake``
        # never runs): a resync planned from them would miss its writes, so they go, and
        # those replicas get a full copy. The epoch is noted before the refresh below: one
        # we took and could not use was still nobody else's.
        foreign = epoch != self._taken_epoch + 1
        if foreign:
            self._dirty.clear()
        self._taken_epoch = epoch
        # The extent map first, ownership second: ``ensure_owner`` trusts a nonzero epoch, so
        # a refresh that fails or is cancelled must leave none behind (the next attempt takes
        # a new epoch, fencing only this one).
        await self._refresh_extents()
        if foreign:
            # The other owner's acknowledged writes may sit unflushed in the replicas' page
            # cache, and a SYNCHRONIZE CACHE through us must make them durable too: ours to
            # flush from now on is every extent, not only those we write.
            self._unflushed |= set(self.extents)
        self._lease_gen = lease_gen
        self.epoch, self.owner_rev, self.seq = epoch, rev, vol.snap_seq
        self.volume = vol
        self._size = max(self._size, vol.size)

    async def _refresh_extents(self) -> None:
        """Read the extent map after taking ownership: the watch may still lag behind changes
        made before our ownership transaction (a replica joined by the previous owner), and a
        write must not go to a replica set older than that."""
        e = self.engine
        # paged: one Range reply is capped at 4 MiB by gRPC (a volume of ~13k extents)
        kvs, _ = await zetcd.get_prefix_paged(e.etcd, e.keys.extents(self.vid))
        for kv in kvs:
            self._adopt(ExtentRecord.decode(kv.value))

    async def _retake(self, lost: int, attempt: int, deadline: float) -> None:
        """A replica refused epoch ``lost``: another server took the volume over; take it back.

        Once per lost epoch, not once per fenced request (a burst of fenced requests would
        otherwise raise the epoch once each and fence the other server as many times), and
        after a random pause growing with ``attempt``, so two servers writing one volume
        alternate in bursts that each complete instead of fencing each other forever.
        """
        self.counters["fenced"] += 1
        if time.monotonic() > deadline:
            raise FencedError(f"volume {self.vid}: lost ownership repeatedly; request not done")
        async with self._owner_lock:
            if self.epoch != lost:
                return                         # already taken back since that request left
            log.warning("volume %s: fenced at epoch %d (another server took it over); "
                        "taking it back", self.vid, lost)
            # The other owner wrote without our dirty logs: resyncs planned from them would
            # miss its writes, so those replicas get a full copy instead.
            self._dirty.clear()
            await asyncio.sleep(random.uniform(0, min(0.2, 0.002 * 2 ** attempt)))
            await self._acquire()

    async def _replicas(self, chunk_ids) -> list:
        """The handles of ``chunk_ids`` for a mutation's attempt. A peer not cached (one that
        failed is forgotten) is looked up in etcd: out of reach is NOT READY, nothing sent
        (a raw etcd error was answered INTERNAL TARGET FAILURE); one with no registration
        record is ``_Unreachable`` (it fails the attempt UNAVAILABLE)."""
        out = []
        for c in chunk_ids:
            try:
                out.append(await self.engine.replica(c))
            except _ETCD_UNREACHABLE as err:
                raise NotServing(f"volume {self.vid}: cannot look its replicas up in etcd: "
                                 f"{err}") from None
            except LookupError as err:
                out.append(_Unreachable(c, str(err)))
        return out

    @staticmethod
    def _fenced(failed) -> bool:
        """A replica refused the attempt's epoch: stale (another owner), or none (DENIED: a
        mutation at epoch 0). Ownership is taken (back) and the attempt repeated; never a
        reason to drop the replica."""
        return any(isinstance(res, rk.ReplicaFailed) and res.kind in rk.FENCED for _, res in failed)

    async def _on_replicas(self, idx: int, op, lo: int = 0, hi: int = 0, rec: ExtentRecord | None = None,
                           keep: bool = False, absent_ok: bool = False, partial: bool = False,
                           creating: bool = False, changes: bool = True, retried: bool = True):
        """Run ``op(replica, epoch)`` on every replica of extent ``idx`` in parallel.

        Each attempt is sent only while ownership is held and current (``_owns``), else it is
        re-taken first; ``keep``: raise instead (an operation bound to the ownership it was
        claimed under, a revert).

        A fenced epoch is taken back and the whole call repeated (never a reason to drop
        a replica); any other failure drops that replica through the meta
        (``_handle_failures``). ``rec`` pins the replica set (allocation, before the record
        is adopted); it is adopted before failures are handled. ``partial``: ``op`` may fail
        part-way, its changes made (a revert): see ``_handle_failures``.

        ``absent_ok`` (a revert, a flush): an extent whose record never changed (``_never_changed``)
        may never have been CREATEd; it then reads as absent, and an operation on what is
        absent everywhere has nothing to do. NO_EXTENT from every in-sync replica is that
        case: done, nobody dropped. NO_EXTENT from some while none succeeded (the others
        failed otherwise) cannot tell "not created" from "lost": the call fails and nobody
        is dropped, since any drop raises the generation and from then on the extent's
        absence would read as lost (MEDIUM ERROR), not as never written.

        ``creating`` (an allocation's CREATE): when no in-sync replica confirmed it, none
        has the extent for certain, so none is dropped for failing (a drop would make the
        extent's absence read as lost for good): the record stays as allocated and the call
        fails NOT READY; the next write finds NO_EXTENT everywhere and creates it
        (``_await_creation``). Every replica refusing alike (all full) is kept, as always.

        ``changes`` False: ``op`` changes no data on a replica (a FLUSH); ``retried`` False:
        the request's host must not retry it (a COMPARE AND WRITE's flush); see
        ``_handle_failures``.
        """
        deadline = time.monotonic() + RETAKE_WINDOW
        landed = False                  # a fenced attempt repeated may have changed a replica
        for attempt in range(1 << 30):
            while True:
                if not self._owns():
                    if keep:
                        raise MediumError(f"volume {self.vid}: this server's etcd lease may have "
                                          f"lapsed (the volume may have been snapshotted or handed "
                                          f"on meanwhile); stopping")
                    await self._owned()
                cur = rec or self.extents[idx]
                targets = await self._replicas(cur.replicas)
                if self._owns():
                    break
            epoch = self.epoch
            results = await asyncio.gather(*(op(r, epoch) for r in targets), return_exceptions=True)
            failed = [(r, res) for r, res in zip(targets, results) if isinstance(res, BaseException)]
            if self._fenced(failed):
                landed = landed or _may_have_changed(cur, targets, results)
                await self._retake(epoch, attempt, deadline)
                continue
            if rec is not None:
                self._adopt(rec)
            if failed and absent_ok and self._never_created(idx, cur, targets, results):
                return
            if failed and creating:
                self._none_created(idx, cur, targets, results)
            if failed:
                await self._handle_failures(idx, cur, failed, lo, hi, partial, landed=landed,
                                            changes=changes, retried=retried)
            return

    def _none_created(self, idx: int, rec: ExtentRecord, targets, results) -> None:
        """For ``_on_replicas(creating=True)``: NotServing, nobody dropped, when no in-sync
        replica confirmed the CREATE (unless they all refused alike: ``_handle_failures``
        keeps them all and says why)."""
        mine = _insync_results(rec, zip(targets, results))
        if not mine or any(not isinstance(res, BaseException) for _, res in mine):
            return
        if _refused_alike(rec, mine) is not None:
            return
        why = "; ".join(str(res) for _, res in mine)
        log.warning("volume %s extent %d: no replica confirmed its CREATE (%s); keeping them "
                    "all, the next write creates it", self.vid, idx, why)
        raise NotServing(f"volume {self.vid} extent {idx}: no replica could create it ({why})")

    def _never_created(self, idx: int, rec: ExtentRecord, targets, results) -> bool:
        """For ``_on_replicas(absent_ok=True)``: True when no in-sync replica of a record that
        never changed has the extent (nothing to do there); MediumError, nobody dropped,
        when some lack it and none of the others succeeded; False otherwise (the extent is
        somewhere: a replica missing it lost it and is dropped as usual)."""
        if not _never_changed(rec):
            return False
        mine = _insync_results(rec, zip(targets, results))
        missing = [r.chunk_id for r, res in mine
                   if isinstance(res, rk.ReplicaFailed) and res.kind == rk.NO_EXTENT]
        if not missing or any(not isinstance(res, BaseException) for _, res in mine):
            return False
        if len(missing) == len(set(rec.replicas)):
            log.info("volume %s extent %d: allocated, never created on any replica: it reads "
                     "as absent and has nothing to revert", self.vid, idx)
            return True
        others = "; ".join(str(res) for r, res in mine if r.chunk_id not in missing)
        raise MediumError(f"volume {self.vid} extent {idx}: {sorted(missing)} do not have it and "
                          f"no other replica answered ({others}); cannot tell whether it was ever "
                          f"created, so no replica is dropped")

    # -- reads -------------------------------------------------------------------

    def _split(self, offset: int, length: int):
        end = offset + length
        pos = offset
        while pos < end:
            idx = pos // EXTENT_SIZE
            eoff = pos - idx * EXTENT_SIZE
            n = min(end - pos, EXTENT_SIZE - eoff, MAX_DATA)   # one frame's worth per call
            yield idx, eoff, n
            pos += n

    async def _read_lease(self, lease) -> None:
        """A read found this server's etcd lease lapsed: the meta may have handed the volume on
        and dropped our replica, which would serve old data from then on. Like a write, it
        waits for the lease (a keepalive late on a busy box, an etcd leader change), but only
        ``READ_LEASE_WAIT``, and not once the server is stopping; then NOT READY, which the
        host retries (through a server that holds a lease)."""
        await self._await_lease(lease, time.monotonic() + READ_LEASE_WAIT, lambda: NotServing(
            f"volume {self.vid}: this chunk server's etcd lease may have lapsed; not serving "
            f"reads until it holds one again"))

    @staticmethod
    async def _await_lease(lease, give_up: float | None, error) -> None:
        """Wait until this server's etcd lease holds again; ``error()`` is raised once the
        server is stopping (never again valid: the host retries elsewhere) or at ``give_up``
        (monotonic time; None: wait as long as it takes)."""
        while time.monotonic() >= lease.lease_deadline:
            if getattr(lease, "stopping", False) or (give_up is not None and time.monotonic() >= give_up):
                raise error()
            await asyncio.sleep(LEASE_POLL)

    async def read(self, offset: int, length: int) -> bytes:
        if not self._is_ready:
            await self.ready(OPEN_WAIT)
        lease = self.engine.lease
        if lease is not None and time.monotonic() >= lease.lease_deadline:
            await self._read_lease(lease)
        if length <= 0:
            return b""
        # Hot path: inside one extent, no clone parent, our own replica in sync -> the store.
        idx, eoff = divmod(offset, EXTENT_SIZE)
        if self.parent is None and eoff + length <= EXTENT_SIZE and offset + length <= self._size:
            rec = self.extents.get(idx)
            if rec is None:
                return bytes(length)
            local = self.engine.local_store_for(rec)
            if local is not None:
                try:
                    return local.read(self.vid, idx, eoff, length, self.view_seq)[0]
                except Exception:  # noqa: BLE001 - the general path retries elsewhere and repairs
                    pass
        if offset + length > self._size:           # a parent view smaller than its clone
            keep = max(0, self._size - offset)
            head = await self.read(offset, keep) if keep else b""
            return head + bytes(length - keep)
        parts = list(self._split(offset, length))
        if len(parts) == 1:
            return await self._read_part(*parts[0])
        return b"".join(await asyncio.gather(*(self._read_part(*p) for p in parts)))

    async def _read_part(self, idx: int, eoff: int, n: int) -> bytes:
        rec = self.extents.get(idx)
        if rec is None or not rec.replicas:
            return await self._absent(idx, eoff, n)
        data, present = await self._read_replicas(rec, eoff, n)
        if present is None:                          # no replica has the extent yet
            return await self._absent(idx, eoff, n)
        return await self._fill_absent(idx, eoff, n, data, present)

    def _read_order(self, rec: ExtentRecord) -> list[str]:
        me = self.engine.chunk_id
        order = list(rec.replicas)
        if me in order:
            order.remove(me)
            order.insert(0, me)
        return order

    async def _read_replicas(self, rec: ExtentRecord, eoff: int, n: int) -> tuple[bytes, bytes | None]:
        last: Exception | None = None
        missing = 0
        order = self._read_order(rec)
        for cid in order:
            try:
                r = self.engine.cached_replica(cid) or await self.engine.replica(cid)
                return await r.read(self.vid, rec.index, eoff, n, 0, self.view_seq)
            except rk.ReplicaFailed as e:
                last = e
                self.counters["read_retries"] += 1
                if e.kind == rk.UNAVAILABLE:
                    self.engine.forget_peer(cid)
                if e.kind == rk.CHECKSUM:
                    self.counters["checksum_errors"] += 1
                    log.warning("volume %s extent %d: %s; reading another replica", self.vid, rec.index, e)
                elif e.kind == rk.NO_EXTENT:
                    missing += 1
                else:
                    log.warning("volume %s extent %d: read failed on %s: %s", self.vid, rec.index, cid, e)
            except Exception as e:  # noqa: BLE001 - e.g. unknown peer
                last = e
        if missing == len(order):
            if _never_changed(rec):
                return b"", None        # allocated, not CREATEd yet: nothing was written
            last = "no in-sync replica has it"
        raise MediumError(f"volume {self.vid} extent {rec.index}: no replica could serve the read ({last})")

    # -- writes ------------------------------------------------------------------

    async def write(self, offset: int, data, fua: bool = False) -> None:
        await self.ready(OPEN_WAIT)
        await self.ensure_owner()
        view = memoryview(data).cast("B")
        if self.is_clone and (offset % BLOCK_SIZE or len(view) % BLOCK_SIZE):
            await self._clone_blocks(offset, view, fua)
            return
        await self._mutate("write", offset, view, len(view), fua=fua)

    async def unmap(self, offset: int, length: int) -> None:
        await self.ready(OPEN_WAIT)
        await self.ensure_owner()
        await self._zero_range(offset, length, zero=self.is_clone)

    async def write_zeroes(self, offset: int, length: int) -> None:
        await self.ready(OPEN_WAIT)
        await self.ensure_owner()
        await self._zero_range(offset, length, zero=self.is_clone or not self.thin)

    async def _zero_range(self, offset: int, length: int, zero: bool) -> None:
        """A clone's block that is absent reads as its parent's: zeroing part of one must
        write that block whole (the rest of it from the parent), or the replica stores the
        block as present with zeros around the range. Its partial edge blocks go through
        ``_clone_blocks``; whole blocks are unmapped (zeroed) as on any volume."""
        end = offset + length
        if not self.is_clone or not (offset % BLOCK_SIZE or end % BLOCK_SIZE) or length <= 0:
            await self._mutate("unmap", offset, None, length, zero=zero)
            return
        lo = -(-offset // BLOCK_SIZE) * BLOCK_SIZE           # first whole block
        hi = end // BLOCK_SIZE * BLOCK_SIZE                   # end of the last whole block
        if lo >= hi:                                          # inside one block
            await self._clone_blocks(offset, memoryview(bytes(length)), False)
            return
        if offset < lo:
            await self._clone_blocks(offset, memoryview(bytes(lo - offset)), False)
        await self._mutate("unmap", lo, None, hi - lo, zero=zero)
        if hi < end:
            await self._clone_blocks(hi, memoryview(bytes(end - hi)), False)

    async def _clone_blocks(self, offset: int, view, fua: bool) -> None:
        """Write ``view`` to a clone as whole blocks, the rest of each edge block read back
        (ours or the parent's) under the range lock of the widened blocks, so a concurrent
        write to the same block waits instead of being overwritten by stale bytes it read."""
        end = offset + len(view)
        lo = offset // BLOCK_SIZE * BLOCK_SIZE
        hi = -(-end // BLOCK_SIZE) * BLOCK_SIZE
        await self._gate.enter()
        try:
            for idx, eoff, n in self._split(lo, hi - lo):
                base = idx * EXTENT_SIZE
                if idx not in self.extents or idx in self._alloc:
                    await self._allocate(idx)
                token = await self._locks.begin(idx, eoff, eoff + n)
                try:
                    a, b = max(offset, base + eoff), min(end, base + eoff + n)   # ours in this piece
                    buf = bytearray(n)
                    if a > base + eoff:                                       # head: read back
                        buf[:a - base - eoff] = await self._read_part(idx, eoff, a - base - eoff)
                    if b < base + eoff + n:                                   # tail: read back
                        buf[b - base - eoff:] = await self._read_part(idx, b - base, base + eoff + n - b)
                    buf[a - base - eoff:b - base - eoff] = view[a - offset:b - offset]
                    await self._replicate("write", idx, eoff, n, memoryview(buf), fua, False)
                finally:
                    self._locks.end(idx, token)
        finally:
            self._gate.leave()

    async def _mutate(self, op: str, offset: int, view, length: int, fua: bool = False,
                      zero: bool = False) -> None:
        await self._gate.enter()
        try:
            jobs = []
            for idx, eoff, n in self._split(offset, length):
                if op == "unmap" and not zero and idx not in self.extents:
                    continue                       # absent already reads as zeros
                part = view[idx * EXTENT_SIZE + eoff - offset:][:n] if view is not None else None
                jobs.append(self._mutate_extent(op, idx, eoff, n, part, fua, zero))
            if len(jobs) == 1:
                await jobs[0]
            elif jobs:
                results = await asyncio.gather(*jobs, return_exceptions=True)
                for r in results:
                    if isinstance(r, BaseException):
                        raise r
        finally:
            self._gate.leave()

    async def _mutate_extent(self, op, idx, eoff, n, part, fua, zero) -> None:
        # The record can arrive by watch before its replicas are CREATEd: wait for those too.
        if idx not in self.extents or idx in self._alloc:
            await self._allocate(idx)
        token = await self._locks.begin(idx, eoff, eoff + n)
        try:
            await self._replicate(op, idx, eoff, n, part, fua, zero)
        finally:
            self._locks.end(idx, token)

    async def _replicate(self, op, idx, eoff, n, part, fua, zero, first=None) -> None:
        """Apply one mutation to every replica of an extent until it is acknowledged.

        ``first``: (record, replicas, outcomes, epoch, seq) of an attempt already made (the
        fast path's, whose outcomes are None or the ReplicaFailed of each replica); its
        failures are handled like those of any other attempt.
        """
        deadline, absent_waits = 0.0, 0
        last = None                     # (replicas, outcomes, seq) of a failed attempt
        landed = False                  # an attempt repeated may have changed an in-sync replica
        for attempt in range(1 << 30):
            if first is not None:
                rec, targets, results, epoch, seq = first
                first = None
            else:
                dialled: set[str] = set()
                while True:
                    # Sent only under ownership held and current (``_owns``): a request that
                    # waited (range lock, gate, a replica, a meta call) since its
                    # ``ensure_owner`` may find the lease lapsed or changed, ownership re-taken.
                    if not self._owns():
                        await self._owned()
                    if last is not None and last[2] != self.seq:
                        # A snapshot was committed since the last attempt (fenced, or sent before
                        # a lease lapse): it holds that attempt where it landed and not elsewhere,
                        # and the repeat at the new seq cannot change that.
                        await self._split_by_snapshot(idx, last[0], last[1], last[2], eoff, eoff + n)
                        last = None
                        continue
                    rec = self.extents[idx]
                    targets = self.engine.cached_replicas(rec.replicas) or \
                        await self._replicas(rec.replicas)
                    sync = self._sync.get(idx)
                    if sync is not None and sync.failed is None and eoff < sync.cursor:
                        targets.append(sync.replica)
                    # A replica not connected would dial on await and send when connected: up
                    # to the connect timeout later, past the lease deadline perhaps. Dialled
                    # here (once per attempt), and ownership looked at again after.
                    dial = [r for r in targets
                            if not getattr(r, "connected", True) and r.chunk_id not in dialled]
                    if dial:
                        dialled.update(r.chunk_id for r in dial)
                        await asyncio.gather(*(r.connect() for r in dial))
                        continue
                    if self._owns():
                        break
                epoch, seq = self.epoch, self.seq
                if op == "write":
                    # Remote writes leave now (no task per replica); the local one runs on await.
                    # ``sole`` passed only when true: the unflagged calls stay as they were.
                    calls = ([r.start_write(self.vid, idx, eoff, part, epoch, seq, fua, sole=True)
                              for r in targets] if _sole(rec) else
                             [r.start_write(self.vid, idx, eoff, part, epoch, seq, fua)
                              for r in targets])
                else:
                    calls = ([r.unmap(self.vid, idx, eoff, n, epoch, seq, zero, sole=True)
                              for r in targets] if _sole(rec) else
                             [r.unmap(self.vid, idx, eoff, n, epoch, seq, zero) for r in targets])
                results = [None] * len(calls)
                # The local replica's call first: it runs on await, and awaited after a remote
                # reply it would run up to a replica timeout later (the lease may lapse meanwhile).
                for k in sorted(range(len(calls)), key=lambda k: not isinstance(targets[k], rk.LocalReplica)):
                    try:
                        await calls[k]
                    except Exception as e:  # noqa: BLE001 - sorted out below
                        results[k] = e
            failed = [(r, res) for r, res in zip(targets, results) if isinstance(res, BaseException)]
            if not failed:
                break
            last = targets, results, seq
            if self._fenced(failed):
                landed = landed or _may_have_changed(rec, targets, results)
                deadline = deadline or time.monotonic() + RETAKE_WINDOW
                await self._retake(epoch, attempt, deadline)
                continue                # a snapshot meanwhile: split at the next attempt
            if all(isinstance(res, rk.ReplicaFailed) and res.kind == rk.NO_EXTENT for _, res in failed):
                if await self._await_creation(idx, rec, targets, failed, absent_waits):
                    landed = landed or _may_have_changed(rec, targets, results)
                    absent_waits += 1
                    continue
            await self._handle_failures(idx, rec, failed, eoff, eoff + n, landed=landed)
            break
        self._written(idx, eoff, eoff + n, fua)
        # ``min_write_replicas`` holds for every write, not only the one that saw a replica
        # fail: after an earlier write left the extent on fewer, this one is on fewer too.
        err = self._too_few(idx)
        if err is not None:
            raise err

    def _written(self, idx: int, lo: int, hi: int, fua: bool) -> None:
        """[lo, hi) of extent ``idx`` is on every replica kept: a resync copies it again
        (dirty log) and, unless it was FUA, the next SYNCHRONIZE CACHE flushes the extent.
        (The fast path's ``_write_settled`` does the same inline.)"""
        self._mark_dirty(idx, lo, hi)
        if not fua:
            self._unflushed.add(idx)

    # -- COMPARE AND WRITE ---------------------------------------------------------

    async def compare_and_write(self, offset: int, expected, new, fua: bool = False) -> None:
        """Write ``new`` at ``offset`` if the data there is ``expected``, atomically with
        respect to every writer of the volume, on any chunk server; else raise
        ``MiscompareError`` (the offset of the first difference) with nothing written.

        The unit's own lock orders it against this server's writes; the range locks against
        this coordinator's. Across servers the ownership epoch does it: the compare reads the
        range from every in-sync replica *at our epoch* E, which fences every older owner
        there (a deposed owner's write that reaches a replica after our read is refused, so
        it cannot slip between our compare and our write, or be acknowledged as well as
        ours); a newer owner's write fences ours. The write then goes out ONCE at E: a plain
        write repeats a fenced attempt, which for a CAW would no longer be conditional
        (another server may have written in between). A fenced attempt is reconciled
        instead (``_caw_reconcile``): the range read back from every in-sync replica under
        the retaken epoch says whether ours landed everywhere (GOOD), partly (completed,
        GOOD) or nowhere that still shows (redone from the compare).
        """
        await self.ready(OPEN_WAIT)
        await self.ensure_owner()
        exp = memoryview(expected).cast("B")
        mine = memoryview(new).cast("B")
        n = len(mine)
        if len(exp) != n:
            raise ValueError("compare_and_write: expected and new differ in length")
        if n <= 0:
            return
        lo, hi = offset, offset + n
        if self.is_clone and (lo % BLOCK_SIZE or hi % BLOCK_SIZE):
            # A clone's block is stored whole (an absent one reads as the parent's): the
            # write covers whole blocks, their edges as the compare read them.
            lo, hi = lo // BLOCK_SIZE * BLOCK_SIZE, -(-hi // BLOCK_SIZE) * BLOCK_SIZE
        parts = list(self._split(lo, hi - lo))
        await self._gate.enter()
        try:
            for idx in sorted({p[0] for p in parts}):
                if idx not in self.extents or idx in self._alloc:
                    await self._allocate(idx)
                err = self._too_few(idx)
                if err is not None:
                    raise err           # min_write_replicas, before anything is compared
            tokens: list[tuple[int, int]] = []
            try:
                for idx, eoff, m in parts:          # ascending: two CAWs never wait on each other
                    tokens.append((idx, await self._locks.begin(idx, eoff, eoff + m)))
                await self._caw_locked(parts, lo, offset - lo, exp, mine, fua)
            finally:
                for idx, token in tokens:
                    self._locks.end(idx, token)
        finally:
            self._gate.leave()

    async def _caw_locked(self, parts, lo: int, at: int, exp, mine, fua: bool) -> None:
        """``compare_and_write`` under the gate and the range locks of ``parts`` ([lo, ...));
        the compared bytes are at ``at`` of the range."""
        n = len(mine)
        deadline = time.monotonic() + RETAKE_WINDOW
        attempt = 0
        while True:
            epoch, seq = await self._owned()        # held and current (the lease may have changed)
            have = await self._caw_read(parts, epoch)
            if have is None:                        # fenced before anything was written
                await self._retake(epoch, attempt, deadline)
                attempt += 1
                continue
            if have[at:at + n] != exp:
                raise MiscompareError(_first_difference(exp, have[at:at + n]))
            buf = bytearray(have)
            buf[at:at + n] = mine
            sent = await self._caw_send(parts, lo, buf, epoch, seq, fua)
            if sent is None:                        # every replica took it (or was dropped)
                self._caw_written(parts, fua)
                self._caw_check_need(parts)
                return
            self._caw_written(parts, True)          # possibly landed somewhere: dirty logs
            # Fenced: another server owns the volume now and may have written the range
            # since our compare. The attempt is not repeated; what it left is looked at.
            while True:
                if self._owns():                    # else not sent for a changed lease: no fence
                    await self._retake(epoch, attempt, deadline)
                attempt += 1
                await self._owned()                 # taken back by another request meanwhile
                if self.seq != seq and sent is not None:
                    # A snapshot was committed since the attempt: it holds it where it landed
                    # and not elsewhere; the smaller side goes (see _split_by_snapshot).
                    for (idx, eoff, m), (targets, results) in zip(parts, sent):
                        if targets is not None:
                            await self._split_by_snapshot(idx, targets, results, seq, eoff, eoff + m)
                epoch, seq = self.epoch, self.seq
                verdict, again = await self._caw_reconcile(parts, lo, have, buf, epoch, seq, fua)
                if verdict != "fenced":
                    break
                if again is not None:
                    sent = again                    # the completing attempt is the one to split
            if verdict == "done":
                if fua:
                    await self._caw_flush(parts)
                else:
                    self._caw_written(parts, False)
                self._caw_check_need(parts)
                return
            # "redo": ours shows nowhere. The compare again, under the epoch now held (it
            # reads whatever the other server wrote meanwhile).

    def _caw_written(self, parts, fua: bool) -> None:
        for idx, eoff, m in parts:
            self._written(idx, eoff, eoff + m, fua)

    def _caw_check_need(self, parts) -> None:
        """``min_write_replicas`` after the write, as ``_replicate`` checks it: a replica
        dropped between the compare and the write (a concurrent write's failure) leaves the
        CAW on fewer replicas, and it is then not acknowledged (MEDIUM ERROR)."""
        for idx in sorted({p[0] for p in parts}):
            err = self._too_few(idx)
            if err is not None:
                raise err

    async def _caw_flush(self, parts) -> None:
        for idx in sorted({p[0] for p in parts}):
            # retried False: the CAW has landed; NOT READY would have the host retry it, and
            # the retry miscompare against the CAW's own data (MEDIUM ERROR instead)
            await self._on_replicas(idx, lambda r, epoch, idx=idx: r.flush(self.vid, idx, epoch),
                                    changes=False, retried=False)

    async def _caw_read_all(self, idx: int, eoff: int, m: int, epoch: int):
        """Read [eoff, eoff + m) of extent ``idx`` from every in-sync replica at ``epoch``:
        (record, [(replica or chunk id, data or the failure)]) in read order."""
        rec = self.extents[idx]
        order = self._read_order(rec)

        async def one(cid: str):
            try:
                r = await self.engine.replica(cid)
            except Exception as e:  # noqa: BLE001 - e.g. an unknown peer: it cannot answer
                return _Unreachable(cid, str(e)), rk.ReplicaFailed(cid, rk.UNAVAILABLE, str(e))
            try:
                data, present = await r.read(self.vid, idx, eoff, m, epoch, 0)
            except Exception as e:  # noqa: BLE001 - sorted out by the caller
                return r, e
            return r, await self._fill_absent(idx, eoff, m, bytes(data), present)

        return rec, list(await asyncio.gather(*(one(c) for c in order)))

    async def _fill_absent(self, idx: int, eoff: int, m: int, data: bytes, present) -> bytes:
        """A replica's data with a clone's absent blocks read from the parent (reads and the
        compare of COMPARE AND WRITE); the data as given when nothing is absent or no parent."""
        if self.parent is None or present is None:
            return data
        first = eoff // BLOCK_SIZE
        runs = _absent_runs(present, len(_blocks(eoff, eoff + m)))
        if not runs:
            return data
        buf = bytearray(data)
        for a, b in runs:
            s = max(eoff, (first + a) * BLOCK_SIZE)
            e = min(eoff + m, (first + b) * BLOCK_SIZE)
            buf[s - eoff:e - eoff] = await self.parent.read(idx * EXTENT_SIZE + s, e - s)
        return bytes(buf)

    async def _absent(self, idx: int, eoff: int, m: int) -> bytes:
        if self.parent is not None:
            return await self.parent.read(idx * EXTENT_SIZE + eoff, m)
        return bytes(m)

    async def _caw_read(self, parts, epoch: int) -> bytes | None:
        """The compare's read: the range as the first in-sync replica (in read order) that
        reads it has it, every in-sync replica having been read at ``epoch`` (each admits it:
        older owners are fenced there from now on); None if one refused the epoch."""
        out = []
        for idx, eoff, m in parts:
            rec, got = await self._caw_read_all(idx, eoff, m, epoch)
            data, missing, last = None, 0, None
            for r, res in got:
                if isinstance(res, rk.ReplicaFailed) and res.kind in rk.FENCED:
                    return None
                if isinstance(res, BaseException):
                    last = res
                    self.counters["read_retries"] += 1
                    if isinstance(res, rk.ReplicaFailed):
                        missing += res.kind == rk.NO_EXTENT
                        if res.kind == rk.UNAVAILABLE:
                            self.engine.forget_peer(res.chunk_id)
                        if res.kind == rk.CHECKSUM:
                            self.counters["checksum_errors"] += 1
                    continue
                if data is None:
                    data = res
            if data is None:
                if got and missing == len(got) and _never_changed(rec):
                    data = await self._absent(idx, eoff, m)   # allocated, not CREATEd yet
                else:
                    raise MediumError(f"volume {self.vid} extent {idx}: no replica could serve "
                                      f"the compare ({last or 'no in-sync replica'})")
            out.append(data)
        return b"".join(out)

    async def _caw_send(self, parts, lo: int, buf, epoch: int, seq: int, fua: bool,
                        runs=None, differ=None):
        """Write ``buf`` (the range from ``lo``) to every replica of each part ONCE at
        ``epoch``; ``runs`` (per part, [(offset in extent, length)]) restricts it to those
        runs, and ``differ`` (per part) says whose replicas already hold different data (a
        completion round there starts as landed: see ``_caw_send_part``). None when no
        replica was fenced (failures handled as a write handles them: the failed replica is
        dropped), else per part (replicas, outcomes) of the attempt (replicas None for a
        part not sent)."""
        view = memoryview(buf)
        jobs = []
        for k, (idx, eoff, m) in enumerate(parts):
            pieces = [(eoff, m)] if runs is None else runs[k]
            jobs.append(self._caw_send_part(idx, eoff, m, pieces, lo, view, epoch, seq, fua,
                                            completing=bool(differ and differ[k])))
        sent = await asyncio.gather(*jobs)
        if all(s is None or s[0] is None for s in sent):
            return None
        return [s if s is not None else (None, None) for s in sent]

    async def _caw_send_part(self, idx, eoff, m, pieces, lo, view, epoch, seq, fua,
                             completing: bool = False):
        """One extent's share of ``_caw_send``: (replicas, outcomes) if fenced, (None, None)
        if not, None with nothing to send. ``completing``: the round completes an attempt
        that landed on some replicas only, so they already differ (``landed`` from the
        start: a round reaching none of them must not keep them all in sync)."""
        if not pieces:
            return None
        base = idx * EXTENT_SIZE - lo
        absent_waits = 0
        last = None                                 # (replicas, outcomes) of the round sent last
        landed = completing                         # a round repeated may have changed a replica
        while True:
            rec = self.extents[idx]
            targets = await self._replicas(rec.replicas)
            sync = self._sync.get(idx)
            if sync is not None and sync.failed is None and eoff < sync.cursor:
                targets.append(sync.replica)
            if not self._owns() or self.epoch != epoch:
                # Ownership changed since the compare (the lease, or a retake for another
                # request): a send at ``epoch`` is no longer conditional, nor safe. As if
                # fenced: the caller reconciles under the epoch it takes now (an earlier round
                # here landed where its outcome is None).
                return last or (targets, [rk.ReplicaFailed(r.chunk_id, rk.STALE_EPOCH, "not sent: "
                                                           "ownership changed") for r in targets])
            results = [None] * len(targets)
            took = [False] * len(targets)           # took a piece of this round
            order = sorted(range(len(targets)), key=lambda k: not isinstance(targets[k], rk.LocalReplica))
            sole = _sole(rec)
            for s, n in pieces:
                part = view[base + s:base + s + n]
                calls = ([r.start_write(self.vid, idx, s, part, epoch, seq, fua, sole=True)
                          for r in targets] if sole else
                         [r.start_write(self.vid, idx, s, part, epoch, seq, fua) for r in targets])
                for i in order:                     # the local one first: it runs on await
                    try:
                        await calls[i]
                    except Exception as e:  # noqa: BLE001 - sorted out below
                        if results[i] is None:
                            results[i] = e
                    else:
                        took[i] = True
            # A replica that took one piece and was never sent the next is changed, however
            # its failure reads (``unsent`` names the last piece only).
            landed = landed or any(t and res is not None for t, res in zip(took, results))
            failed = [(r, res) for r, res in zip(targets, results) if res is not None]
            if not failed:
                return None, None
            if self._fenced(failed):
                return targets, results
            last = targets, results
            # Not fenced: nobody else wrote since our compare (every in-sync replica admitted
            # our epoch then), so a retry at the same epoch is still conditional.
            if all(isinstance(res, rk.ReplicaFailed) and res.kind == rk.NO_EXTENT for _, res in failed):
                if await self._await_creation(idx, rec, targets, failed, absent_waits):
                    landed = landed or _may_have_changed(rec, targets, results)
                    absent_waits += 1
                    continue
            await self._handle_failures(idx, rec, failed, eoff, eoff + m, retried=False,
                                        landed=landed)
            return None, None

    async def _caw_reconcile(self, parts, lo: int, old, buf, epoch: int, seq: int, fua: bool):
        """After a fenced attempt, with ownership retaken (``epoch``): what did it leave?

        Every in-sync replica's copy of the range is read at ``epoch`` (fencing the other
        server again). Per block of the volume that ours changes (``buf`` against ``old``, what
        the compare read): every replica holds ours; they differ and one holds ours (a partial
        landing); every replica still holds what we compared (untouched); or someone else's
        data. If ours shows anywhere, the attempt landed: ours is
        written where it is missing, on the differing and the untouched blocks (the CAW
        completes, before the other server's writes, which are kept where they cover it),
        and the answer is GOOD. If every block holds ours, GOOD. Otherwise ours shows
        nowhere: "redo" from the compare. Returns (verdict, attempt): "fenced" (with the
        completing attempt's (replicas, outcomes) per part, or None if nothing was sent)
        when fenced again meanwhile."""
        bs = self.block_size
        view, before = memoryview(buf), memoryview(old)
        fill: list[list[int]] = []
        differ: list[bool] = []                     # per part: its replicas hold different data
        landed = False
        everywhere = True
        for idx, eoff, m in parts:
            rec, got = await self._caw_read_all(idx, eoff, m, epoch)
            if any(isinstance(res, rk.ReplicaFailed) and res.kind in rk.FENCED for _, res in got):
                return "fenced", None
            bad = [(r, res) for r, res in got if isinstance(res, BaseException)]
            copies = [res for _, res in got if not isinstance(res, BaseException)]
            if not copies and _never_changed(rec) and all(
                    isinstance(res, rk.ReplicaFailed) and res.kind == rk.NO_EXTENT for _, res in bad):
                copies, bad = [await self._absent(idx, eoff, m)], []
            if bad:
                # What a replica that does not read holds is unknown: it goes, as a replica
                # failing a write would (it is resynced later).
                # The attempt reconciled may have landed on any of them (``landed``).
                await self._handle_failures(idx, rec, bad, eoff, eoff + m, retried=False,
                                            landed=True)
            base = idx * EXTENT_SIZE + eoff - lo
            part: list[int] = []
            differs = False
            for k in range(0, m, bs):
                ours = bytes(view[base + k:base + k + bs])
                was = bytes(before[base + k:base + k + bs])
                if ours == was:
                    continue                        # nothing of ours to see or to complete here
                held = {bytes(c[k:k + bs]) for c in copies}
                if held == {ours}:
                    landed = True
                    continue
                everywhere = False
                differs = differs or len(held) > 1
                if ours in held:
                    landed = True
                    part.append(k)
                elif held == {was}:
                    part.append(k)
            fill.append(part)
            differ.append(differs)
        if everywhere:
            return "done", None
        if not landed:
            return "redo", None
        runs = [[(eoff + a, b - a) for a, b in _runs(ks, bs)] for (idx, eoff, m), ks in zip(parts, fill)]
        log.warning("volume %s: a fenced COMPARE AND WRITE at %d landed on some replicas only; "
                    "completing it on every replica", self.vid, lo)
        sent = await self._caw_send(parts, lo, buf, epoch, seq, fua, runs, differ)
        self._caw_written(parts, True)
        return ("fenced", sent) if sent is not None else ("done", None)

    # -- the write fast path -------------------------------------------------------

    def write_nowait(self, offset: int, data) -> asyncio.Future | None:
        """``write`` (no FUA) without a Task or coroutine: a future, or None with nothing done.

        The general path cost a Task and a chain of resumed coroutines per replicated
        write, a large share of the coordinator's CPU. This one is taken when nothing is
        unusual: ready and owned, no barrier, one mapped extent not being allocated or
        copied, every replica cached and every remote one connected, no copy holding the
        range. The local replica is written inline, remote writes leave on their
        pipelines, and the future completes from the replies' callbacks. A failed or
        fenced replica goes to ``_replicate`` in a Task (failures are rare), which handles
        it exactly as on the general path before the future completes.
        """
        if not self._is_ready or not self.epoch or self.view_seq:
            return None
        lease = self.engine.lease
        if lease is not None and (lease.lease_gen != self._lease_gen
                                  or time.monotonic() >= lease.lease_deadline):
            return None                 # ensure_owner (general path) waits or re-takes ownership
        view = memoryview(data).cast("B")
        n = len(view)
        idx, eoff = divmod(offset, EXTENT_SIZE)
        if eoff + n > EXTENT_SIZE or idx in self._alloc or idx in self._sync:
            return None
        if self.is_clone and (offset % BLOCK_SIZE or n % BLOCK_SIZE):
            return None
        rec = self.extents.get(idx)
        if rec is None:
            return None
        route = self._routes.get(idx)
        if route is None or route[0] is not rec or route[1] != self.engine.replicas_version:
            route = self._route(idx, rec)
            if route is None:
                return None
        _, _, targets, local, remotes, sole = route
        for _, r in remotes:
            if not r.connected:
                return None
        if not self._gate.try_enter():
            return None
        token = self._locks.try_begin(idx, eoff, eoff + n)
        if token is None:
            self._gate.leave()
            return None
        vid, epoch, seq = self.vid, self.epoch, self.seq
        self.counters["fast_writes"] += 1
        loop = self._loop
        if loop is None:
            # cached: asyncio.get_running_loop() is a getpid() syscall, once per write here
            loop = self._loop = asyncio.get_running_loop()
        done = loop.create_future()
        if n <= MAX_DATA:                                   # one frame carries MAX_DATA at most
            pending = _PendingWrite(self, done, idx, eoff, n, view, rec, targets, epoch, seq, token)
            outcomes = pending.outcomes
            for k, r in remotes:                            # replies come later, never inside
                if (r.send_write(vid, idx, eoff, view, epoch, seq, pending.make_callback(k, r),
                                 sole=True)
                        if sole else r.send_write(vid, idx, eoff, view, epoch, seq,
                                                  pending.make_callback(k, r))):
                    pending.left += 1
                else:
                    outcomes[k] = rk.ReplicaFailed(r.chunk_id, rk.UNAVAILABLE, "request not sent",
                                                   unsent=True)
        else:
            pending = _PiecewiseWrite(self, done, idx, eoff, n, view, rec, targets, epoch, seq, token)
            outcomes = pending.outcomes
            for k, r in remotes:
                pending.send(k, r, vid, idx, epoch, seq, sole)
        if local is not None:
            try:
                later = (local.write_now(vid, idx, eoff, view, epoch, seq, sole=True) if sole
                         else local.write_now(vid, idx, eoff, view, epoch, seq))
            except rk.ReplicaFailed as e:
                outcomes[targets.index(local)] = e
            else:
                if later is not None:                       # a COW: it waits for the disk
                    pending.left += 1
                    task = loop.create_task(local.finish(vid, idx, later))
                    self._local_later.add(task)             # the loop keeps only a weak reference
                    task.add_done_callback(self._local_later.discard)
                    task.add_done_callback(pending.local_callback(targets.index(local), local))
        if not pending.left:
            self._write_settled(pending)
        return done

    def _route(self, idx: int, rec: ExtentRecord):
        """(rec, replicas version, replicas, local one or None, [(position, remote)], sole) for
        the fast path, cached per extent until the record or a replica handle changes. ``sole``
        (``_sole``) is the O(1) check: the writes pass ``sole=True`` only when it is true."""
        if len(rec.replicas) < self._need():
            return None                 # too few in sync: the general path fails the write
        targets = self.engine.cached_replicas(rec.replicas)
        if not targets:
            return None
        local = next((r for r in targets if isinstance(r, rk.LocalReplica)), None)
        remotes = [(k, r) for k, r in enumerate(targets) if r is not local]
        route = self._routes[idx] = (rec, self.engine.replicas_version, targets, local, remotes,
                                     _sole(rec))
        return route

    def _write_settled(self, p: "_PendingWrite") -> None:
        """Every replica of a fast-path write answered: finish it, or hand failures on."""
        outcomes = p.outcomes
        # A failure (no generator: every write), or the extent left with too few replicas in
        # sync since the write left (dropped by another write): the general path's retry loop.
        if outcomes.count(None) != len(outcomes) or (self._short and p.idx in self._short):
            if _CANCELLED in outcomes:                 # the local write was cancelled (a stop)
                self._locks.end(p.idx, p.token)
                self._gate.leave()
                p.done.cancel()
                return
            self.counters["fast_write_handoffs"] += 1
            task = asyncio.get_running_loop().create_task(self._write_recover(p))
            self._recovering.add(task)                 # the loop keeps only a weak reference
            task.add_done_callback(self._recovering.discard)
            return
        self._mark_dirty(p.idx, p.eoff, p.eoff + p.n)
        self._unflushed.add(p.idx)
        self._locks.end(p.idx, p.token)
        self._gate.leave()
        if not p.done.done():
            p.done.set_result(None)

    async def _write_recover(self, p: "_PendingWrite") -> None:
        try:
            # The general path's unit is one frame's worth: a longer write is recovered frame
            # by frame, each with the fast attempt's outcomes of that frame (a replica may have
            # taken one and been fenced on the next: ``_split_by_snapshot`` must see which).
            for i, pos in enumerate(range(0, p.n, MAX_DATA)):
                m = min(MAX_DATA, p.n - pos)
                outcomes = p.piece_outcomes(i) if isinstance(p, _PiecewiseWrite) else p.outcomes
                await self._replicate("write", p.idx, p.eoff + pos, m, p.view[pos:pos + m], False,
                                      False, first=(p.rec, p.targets, outcomes, p.epoch, p.seq))
        except asyncio.CancelledError:          # shutting down: the session gets no answer
            p.done.cancel()
            raise
        except Exception as e:  # noqa: BLE001 - the initiator gets it as the write's outcome
            if not p.done.done():
                p.done.set_exception(e)
        else:
            if not p.done.done():
                p.done.set_result(None)
        finally:
            self._locks.end(p.idx, p.token)
            self._gate.leave()

    async def _await_creation(self, idx: int, rec: ExtentRecord, targets, failed, waits: int) -> bool:
        """Replicas of a mapped extent said NO_EXTENT: True to retry the request, False to drop them.

        Another server may have allocated the extent and not CREATEd its replicas yet (we saw the
        record by watch): wait a little for that. If every replica of the record still lacks
        it, nothing was ever acknowledged there, so create it as the allocator would have (it may
        have died in between). A replica missing an extent the others have lost it: dropped.
        """
        if waits < 6:
            await asyncio.sleep(0.01 * 2 ** waits)          # 0.63 s in all
            return True
        if waits == 6 and len(failed) == len(rec.replicas) and all(r.chunk_id in rec.replicas for r, _ in failed):
            if not _never_changed(rec):
                # Its replica set changed since allocation, so it was CREATEd somewhere and may
                # hold acknowledged data: every copy missing means lost (a disk not mounted, a
                # disk replaced), not "not created yet". Creating it empty would turn every
                # block written so far into zeros, silently.
                raise MediumError(f"volume {self.vid} extent {idx}: no in-sync replica has it "
                                  f"(generation {rec.generation}, stale {sorted(rec.stale)})")
            log.warning("volume %s extent %d: no replica has it; creating it", self.vid, idx)
            await self._on_replicas(idx, lambda r, epoch: r.create(self.vid, idx, epoch, rec.generation),
                                    creating=True)
            return True
        return False

    async def _split_by_snapshot(self, idx, targets, results, seq, lo, hi) -> None:
        """A fenced attempt at ``seq`` landed on some replicas, and a snapshot was committed
        before it could be repeated (the new seq is higher): the snapshot holds this write
        on the replicas that took it and not on the others, and the repeat at the new seq
        cannot change that. The smaller of the two groups is dropped (resynced in full
        later: a retake clears the dirty logs), so every replica left agrees on the
        snapshot; the other group keeps the extent's redundancy."""
        insync = set(self.extents[idx].replicas)
        took = [r for r, res in zip(targets, results) if res is None and r.chunk_id in insync]
        missed = [r for r, res in zip(targets, results) if res is not None and r.chunk_id in insync]
        if not took or not missed:
            return                      # every replica agrees: all took it, or none did
        drop = took if len(took) < len(missed) else missed
        why = (f"a write at seq {seq} landed on {sorted(r.chunk_id for r in took)} only, and a "
               f"snapshot was committed before it was repeated")
        log.warning("volume %s extent %d: %s; dropping %s", self.vid, idx, why,
                    sorted(r.chunk_id for r in drop))
        await self._handle_failures(idx, self.extents[idx],
                                    [(r, rk.ReplicaFailed(r.chunk_id, rk.IO, why)) for r in drop], lo, hi)

    async def _handle_failures(self, idx, rec, failed, lo, hi, partial: bool = False,
                               retried: bool = True, landed: bool = False,
                               changes: bool = True) -> None:
        """Drop the replicas that failed (through the meta; never the last). When every
        in-sync replica refused alike (NO_SPACE, INVALID) they are all kept, as nothing is
        wrong with any one of them; ``partial``: a request that may have been refused
        part-way, its earlier steps done (a revert stopped by a full disk after some of its
        runs), so refusals alike do not prove the replicas still alike, and only one set of
        agreeing replicas is kept (``_keep_agreeing``).

        When every in-sync replica failed to answer (UNAVAILABLE: this server then holds
        none of them, a local replica never fails so) and none can differ from the others
        for it (``_none_reached``: the request was sent to none of them, ``unsent``, and no
        earlier attempt of it, ``landed``, may have changed one; or it changes nothing,
        ``changes`` False, a flush), the trouble is most likely ours (our network cut, this
        server stopping: its replica client closed): dropping all but the last, one after
        another, cost the extent its redundancy and the request failed anyway. All are kept
        and the request fails NOT READY (04/01, ``NotServing``; ``ServerStopping`` once the
        replica client is closed), which the host retries, as etcd out of reach is
        answered; ``retried`` False (a COMPARE AND WRITE, whose retry after an attempt that
        may have landed would miscompare against itself): MEDIUM ERROR. A request that may
        have reached one of them (a reply overdue, a connection lost with it on it, the
        replica client closed under it) may have left them differing: they are dropped as
        any failed replica, those it was never sent to first (the last one, which the meta
        refuses to drop, is then one that may have taken it), and so is a failed replica
        whenever another in-sync replica took the request. A revert (``partial``) reaching
        none of them is kept alike; one that may have reached some keeps its own handling."""
        mine = _insync_results(rec, failed)
        # A revert (``partial``) too: one sent to no replica changed none of them.
        if _none_reached(rec, mine, changes, landed):
            self._none_answered(idx, rec, failed, retried)
        res = _refused_alike(rec, mine)
        if res is not None:
            # Dropping all but the last would cost the extent its redundancy for a full cluster.
            if partial:
                await self._keep_agreeing(idx, res)
            else:
                log.warning("volume %s extent %d: every replica refused (%s); keeping them all",
                            self.vid, idx, res)
            if res.kind == rk.NO_SPACE:
                raise NoSpaceError(f"volume {self.vid} extent {idx}: no replica has space left ({res})")
            raise MediumError(f"volume {self.vid} extent {idx}: every replica refused: {res}")
        no_space = 0
        # Those never sent the request first: were the meta to refuse the last, the one kept
        # is then one that may hold it and answers, not one that is down.
        for r, res in sorted(failed, key=lambda f: not getattr(f[1], "unsent", False)):
            kind = res.kind if isinstance(res, rk.ReplicaFailed) else rk.IO
            if kind == rk.UNAVAILABLE:
                self.engine.forget_peer(r.chunk_id)
            sync = self._sync.get(idx)
            if sync is not None and r is sync.replica and r.chunk_id not in rec.replicas:
                sync.failed = f"{kind}: {res}"
                continue
            no_space += kind == rk.NO_SPACE
            log.warning("volume %s extent %d: replica %s failed (%s); dropping it", self.vid, idx,
                        r.chunk_id, res)
            try:
                await self._drop(idx, r.chunk_id, f"{kind}: {res}")
            except MediumError:
                if kind == rk.NO_SPACE:       # the last replica is full: say so, not "I/O error"
                    raise NoSpaceError(f"volume {self.vid} extent {idx}: {res}") from None
                raise
        left = len(self.extents[idx].replicas)
        if left < self._need():
            if no_space:
                raise NoSpaceError(f"volume {self.vid} extent {idx}: no replica has space left")
            raise MediumError(f"volume {self.vid} extent {idx}: only {left} replica(s) left")

    def _none_answered(self, idx: int, rec: ExtentRecord, failed, retried: bool) -> None:
        """For ``_handle_failures``: no in-sync replica answered. Nobody dropped; raises."""
        for r, res in failed:
            if isinstance(res, rk.ReplicaFailed) and res.kind == rk.UNAVAILABLE:
                self.engine.forget_peer(r.chunk_id)       # looked up afresh next time
            sync = self._sync.get(idx)
            if sync is not None and r is sync.replica and r.chunk_id not in rec.replicas:
                sync.failed = f"{getattr(res, 'kind', rk.IO)}: {res}"
        why = "; ".join(str(res) for _, res in failed)
        stopping = getattr(self.engine, "replicas_closed", False)
        log.warning("volume %s extent %d: no in-sync replica answered (%s); keeping them all "
                    "(%s)", self.vid, idx, why, "this server is stopping: its replica client "
                    "is closed" if stopping else "most likely this server is cut off")
        msg = f"volume {self.vid} extent {idx}: no in-sync replica answered ({why})"
        if not retried:
            raise MediumError(msg)
        raise ServerStopping(self.vid) if stopping else NotServing(msg)

    async def _keep_agreeing(self, idx: int, why) -> None:
        """Every in-sync replica of extent ``idx`` failed a request that may have changed it
        part-way (a revert whose disk filled up after some runs): each may hold a different
        mix of old and new blocks. They are compared by DIGEST (the logical state: live
        blocks, seqs, versions) and the largest group that agrees is kept (ties: the one
        with this server's replica, then the record's order); every other replica, and
        every one whose digest fails, is dropped and later copied in full from the kept
        ones. Replicas that all agree (refused before changing anything) are all kept."""
        rec = self.extents[idx]
        order = self._read_order(rec)
        reps = await self._replicas(order)        # an unregistered one's digest fails
        digests = await asyncio.gather(*(r.digest(self.vid, idx) for r in reps),
                                       return_exceptions=True)
        groups: dict[bytes, list[str]] = {}
        for c, d in zip(order, digests):
            if not isinstance(d, BaseException):
                groups.setdefault(bytes(d), []).append(c)
        # ``order`` puts this server first, then the record's order: max() keeps the first best
        keep = max(groups.values(), key=len) if groups else order[:1]
        drop = [c for c in order if c not in keep]
        if not drop:
            log.warning("volume %s extent %d: every replica refused (%s) and they still agree; "
                        "keeping them all", self.vid, idx, why)
            return
        log.warning("volume %s extent %d: every replica refused part-way (%s) and they now "
                    "differ; keeping %s, dropping %s for a full copy", self.vid, idx, why,
                    keep, drop)
        for c, d in zip(order, digests):
            if c in drop:
                detail = f"digest failed: {d}" if isinstance(d, BaseException) else "differs"
                await self._drop(idx, c, f"{rk.IO}: stopped part-way ({why}); {detail} from {keep}")
                self._dirty.pop((idx, c), None)     # its differences are not in any log

    async def _drop(self, idx: int, chunk_id: str, reason: str) -> None:
        key = (idx, chunk_id)
        fut = self._drops.get(key)
        if fut is None:
            fut = self._drops[key] = asyncio.ensure_future(self._drop_once(idx, chunk_id, reason))
            fut.add_done_callback(lambda _f: self._drops.pop(key, None))
        await asyncio.shield(fut)

    async def _drop_once(self, idx: int, chunk_id: str, reason: str) -> None:
        for _ in range(5):
            rec = self.extents[idx]
            if chunk_id not in rec.replicas:
                return
            try:
                data = await self.engine.meta.call("POST", f"/extents/{self.vid}/{idx}/drop", {
                    "chunk_id": chunk_id, "generation": rec.generation, "reason": reason[:200]})
            except (MetaError, *_ETCD_UNREACHABLE) as e:
                # The meta client finds the leader in etcd: out of reach is as the meta out of
                # reach (a raw etcd error was answered INTERNAL TARGET FAILURE).
                raise MediumError(f"volume {self.vid} extent {idx}: cannot drop failed replica "
                                  f"{chunk_id}: {e}") from None
            new = ExtentRecord.from_dict(data.get("extent", data))
            self._adopt(new)
            if chunk_id not in new.replicas:
                self.counters["drops"] += 1
                gen = new.stale.get(chunk_id)
                # The writes from now on are logged so a replica that comes back needs only
                # those. Not after an I/O or checksum failure: the replica may also have lost
                # writes from before (a failed fdatasync drops dirty pages), so it is copied
                # whole when it returns.
                if gen is not None and not reason.startswith((rk.IO + ":", rk.CHECKSUM + ":")):
                    self._dirty[(idx, chunk_id)] = Dirty(generation=gen, seq=self.seq)
                return
        raise MediumError(f"volume {self.vid} extent {idx}: could not drop replica {chunk_id}")

    def _mark_dirty(self, idx: int, lo: int, hi: int) -> None:
        if not self._dirty:
            return
        for (i, _c), d in self._dirty.items():
            if i == idx:
                d.blocks.update(_blocks(lo, hi))

    async def _allocate(self, idx: int) -> None:
        fut = self._alloc.get(idx)
        if fut is None:
            if idx in self.extents:
                return
            fut = self._alloc[idx] = asyncio.ensure_future(self._allocate_once(idx))
            fut.add_done_callback(lambda _f: self._alloc.pop(idx, None))
        await asyncio.shield(fut)

    async def _allocate_once(self, idx: int) -> None:
        try:
            data = await self.engine.meta.call("POST", f"/extents/{self.vid}/{idx}", {})
        except MetaError as e:
            if e.status == 507:
                raise NoSpaceError(f"volume {self.vid}: cannot place extent {idx}: {e}") from None
            raise MediumError(f"volume {self.vid}: cannot allocate extent {idx}: {e}") from None
        rec = ExtentRecord.from_dict(data.get("extent", data))
        await self._on_replicas(idx, lambda r, epoch: r.create(self.vid, idx, epoch, rec.generation),
                                rec=rec, creating=True)

    async def flush(self) -> None:
        """Make every write acknowledged so far durable on every replica.

        One flush at a time: a second SYNCHRONIZE CACHE arriving while one is in flight
        must not answer GOOD before the extents the first took are durable, so it waits
        for it, then flushes what was written since. Extents taken by a flush that fails or
        is cancelled go back to the unflushed set.

        Ownership taken (back) during the flush (a replica fenced it: another server wrote
        the volume meanwhile, e.g. multipath across chunk servers) marks every extent
        unflushed (``_acquire``), after this flush took its set: it runs again over them,
        so GOOD means the other owner's acknowledged writes are durable too.

        A replica fences us only if a round sends it something: an idle deposed owner (or one
        whose extents lie on other replicas than the new owner's writes) would answer GOOD
        over the other owner's unflushed writes. So the owner record is read beside the first
        round (linearizable, after the command arrived: a write acknowledged through another
        server before then shows there), and an epoch we did not take means taking the
        volume back, which marks every extent unflushed, and flushing again."""
        await self.ready(OPEN_WAIT)
        if self.view_seq:
            return                      # a view writes nothing
        if self._closing is not None:   # as a write: none starts once closing began
            raise NotServing(f"volume {self.vid}: closed on this chunk server")
        await self.ensure_owner()       # a FLUSH needs an epoch, as any mutation
        async with self._flush_lock:
            e = self.engine
            check = asyncio.ensure_future(self._owner_epoch())
            check.add_done_callback(retrieve)
            try:
                while await self._flush_round():
                    pass
                current = await check
            except BaseException:
                check.cancel()
                raise
            if current is not None and current > self._taken_epoch:
                await self._take_back(current)
                while await self._flush_round():
                    pass

    async def _owner_epoch(self) -> int | None:
        """The epoch the owner record holds now (``OwnerReads``: a linearizable read begun after
        this call, shared with other volumes' flushes); etcd unreachable is NOT READY (the host
        retries the SYNCHRONIZE CACHE), not a medium error: nothing failed on the replicas."""
        try:
            return await self.engine.owner_reads.epoch(self.vid)    # coalesced per server
        except (*zetcd.UNAVAILABLE_ERRORS, ConnectionError, OSError) as err:
            raise NotServing(f"volume {self.vid}: cannot confirm its owner in etcd: {err}") from None

    async def _take_back(self, current: int, at: str = "a SYNCHRONIZE CACHE; taking it back "
                         "to flush every extent") -> None:
        """The owner record holds ``current``, an epoch another server (or the meta) took: take
        the volume back (``_acquire`` then makes every extent ours to flush)."""
        async with self._owner_lock:
            if current > self._taken_epoch:
                log.warning("volume %s: owned by epoch %d, not ours (%d), at %s", self.vid,
                            current, self.epoch, at)
                await self._acquire()

    async def _flush_round(self) -> bool:
        """One round of ``flush``: True if ownership was taken (back) meanwhile (another
        round is due)."""
        taken = self._taken_epoch
        pending, self._unflushed = self._unflushed, set()
        if not pending:
            return False

        def flush_one(idx: int):
            # absent_ok: an extent allocated and never CREATEd (its allocator died, or
            # every CREATE failed) has nothing to flush; its NO_EXTENTs drop nobody.
            return self._on_replicas(idx, lambda r, epoch: r.flush(self.vid, idx, epoch),
                                     absent_ok=True, changes=False)

        try:
            results = await asyncio.gather(*(flush_one(i) for i in sorted(pending)),
                                           return_exceptions=True)
        except BaseException:
            self._unflushed |= pending
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            self._unflushed |= pending
            raise errors[0]
        return self._taken_epoch != taken

    # -- volume operations (snapshot barrier, revert) ----------------------------

    async def run_volop(self, op: VolumeOp) -> None:
        """Run a snapshot barrier or a revert as this volume's owner; record the outcome.

        Never twice under one claim: a rerun of an op whose work ran here under the claim
        still on its record (its outcome write failed on etcd; a rerun queued meanwhile by
        the claim's own watch event or the engine's NotServing retry) only writes the
        outcome. Before, ``_claim_op`` took the record, still ``running`` at this epoch,
        as resumable and a revert was applied again, rolling back the writes made after
        the first one completed. The outcome is written after the barrier opens; etcd out
        of reach for it is NotServing (``_finish_op``) and the engine tries again."""
        e = self.engine
        ran = self._ran_ops.get(op.op_id)
        if ran is not None:
            claimed, outcome = ran
            kind = VolumeOp.decode(claimed).kind
            if outcome is _CUT_SHORT:
                outcome = (f"interrupted: this {kind} was cut short on this server after it "
                           f"was claimed (it may have been applied in part); not run again")
            key = e.keys.volop(self.vid, op.op_id)
            try:
                got = await e.etcd.get(key)
            except (*_ETCD_UNREACHABLE, ConnectionError, OSError) as err:
                raise NotServing(f"volume {self.vid}: cannot read {kind} {op.op_id} in etcd: "
                                 f"{err}") from None
            if got is not None and got.value == claimed:
                await self._finish_op(VolumeOp.decode(claimed), outcome, claimed)
                return
            # The record moved on since (finished; or moved away and handed back, pending
            # again): the memory is stale (review, session 19: the outcome write's compare
            # failed, "handed elsewhere", and an op handed back here stayed pending for good).
            self._ran_ops.pop(op.op_id, None)
            cur = (VolumeOp.decode(got.value) if got is not None else None)
            if (cur is None or cur.executor != e.chunk_id
                    or cur.state not in ("pending", "running")):
                return                      # finished, or not ours
            if cur.kind == "revert":
                # It ran (or began) here: run again it would roll back the writes made since.
                # Remembered again under the record as it is until the outcome is written (a
                # NotServing here left no memory, and the next try claimed and ran it again).
                if cur.claim_epoch and cur.claim_epoch != VolumeOp.decode(claimed).claim_epoch:
                    outcome = (f"interrupted: this revert was claimed again elsewhere (epoch "
                               f"{cur.claim_epoch}) after it ran here; the volume may have been "
                               f"written since; not run again (check the volume)")
                self._ran_ops[op.op_id] = (got.value, outcome)
                await self._finish_op(cur, outcome, got.value)
                return
            op = cur                        # a snapshot barrier: a new run is a sound point
        await self.ready()
        async with self._gate:
            await self.ensure_owner()
            await self._owner_confirmed(op)
            try:
                claimed = await self._claim_op(op)
            except _ETCD_UNREACHABLE as err:
                # Not claimed, or claimed at this epoch with the reply lost: either way the
                # next try (the engine's) claims it again under this ownership and runs it.
                raise NotServing(f"volume {self.vid}: cannot claim {op.kind} {op.op_id} in "
                                 f"etcd: {err}") from None
            if claimed is None:
                return                  # reassigned, finished or interrupted: not ours to run
            op = VolumeOp.decode(claimed)   # what is reported keeps the claim (its epoch)
            error = None
            self._ran_ops[op.op_id] = (claimed, _CUT_SHORT)
            try:
                snap_got = await e.etcd.get(e.keys.snapshot(op.snapshot_id))
                if snap_got is None:
                    raise MediumError(f"snapshot {op.snapshot_id} not found")
                snap = Snapshot.decode(snap_got.value)
                if op.kind == "snapshot":
                    await self._fence_all()
                    if await self._commit_snapshot(op, snap, snap_got.mod_revision, claimed):
                        self._ran_ops.pop(op.op_id, None)      # the commit wrote "done"
                        return
                    # committed already (not by us): reported done below, as a revert is
                elif op.kind == "revert":
                    if snap.volume_id != self.vid or not snap.seq:
                        raise MediumError(f"snapshot {snap.snapshot_id} is not a ready snapshot of this volume")
                    await self._revert(snap.seq, op, claimed)
                else:
                    raise MediumError(f"unknown volume operation {op.kind!r}")
            except Exception as ex:  # noqa: BLE001 - reported on the op record
                error = str(ex) or type(ex).__name__
                log.error("volume %s: %s %s failed: %s", self.vid, op.kind, op.op_id, error)
            self._ran_ops[op.op_id] = (claimed, error)
        await self._finish_op(op, error, claimed)

    async def _owner_confirmed(self, op: VolumeOp) -> None:
        """Before an op is claimed: the owner record still holds the epoch we took last, else
        the volume is taken back. Another coordinator may have taken it since without fencing
        us anywhere we wrote: the closing coordinator of this volume on this server (the LU
        mapped again meanwhile) retaking it to finish a write, and leaving it held
        (``_close``). The meta sends the op to the record's holder, this server, and run at
        our older epoch it would be fenced at its first step (``_fence_all``), every time
        until a write of ours happened to be fenced.

        etcd out of reach is NotServing, as taking ownership (``_acquire``) and a flush's
        owner read (``_owner_epoch``) map it: nothing is claimed, the op stays assigned and
        pending (a raw etcd error ended the op's task the same way but untyped)."""
        e = self.engine
        try:
            got = await e.etcd.get(e.keys.owner(self.vid))
        except (*_ETCD_UNREACHABLE, ConnectionError, OSError) as err:
            raise NotServing(f"volume {self.vid}: cannot confirm its owner in etcd before a "
                             f"{op.kind}: {err}") from None
        if got is not None:
            current = VolumeOwner.decode(got.value).epoch
            if current > self._taken_epoch:
                await self._take_back(current, f"a {op.kind}; taking it back to run it")

    async def _fence_all(self) -> None:
        """Before a snapshot commits: every chunk server has admitted our epoch for the volume.

        Replicas learn a new epoch only from requests carrying it, so a deposed owner (paths
        to two chunk servers, or a server whose lease lapsed with writes in flight) could go
        on writing, at the old seq, to extents we never touched, and a write landing after
        the commit would join the snapshot. Fenced, every replica of every extent refuses
        it, and so does every server a new extent could be created on. A server that does
        not answer is dropped from the extents it holds while another of their replicas was
        fenced (they resync in full later); the snapshot fails if it is an extent's only
        replica. One request per server, so the cost does not grow with the volume."""
        holds: dict[str, list[int]] = {}
        for idx, rec in sorted(self.extents.items()):
            for c in rec.replicas:
                holds.setdefault(c, []).append(idx)
        servers = sorted(set(holds) | set(await self.engine.chunk_ids()))
        epoch = self.epoch

        async def fence(chunk_id: str) -> None:
            try:
                r = await self.engine.replica(chunk_id)
            except LookupError as e:                   # registered meanwhile unregistered
                raise rk.ReplicaFailed(chunk_id, rk.UNAVAILABLE, str(e)) from None
            await r.fence(self.vid, holds[chunk_id][0] if chunk_id in holds else 0, epoch)

        results = await asyncio.gather(*(fence(c) for c in servers), return_exceptions=True)
        failed = {c: res for c, res in zip(servers, results) if res is not None}
        for c, res in failed.items():
            if isinstance(res, rk.ReplicaFailed) and res.kind in rk.FENCED:
                raise FencedError(f"volume {self.vid}: another server took it over; snapshot not taken")
            if not isinstance(res, Exception):
                raise res
        for c, res in failed.items():
            if c not in holds:
                log.info("volume %s: %s not fenced before a snapshot (%s); it holds none of it", self.vid, c, res)
                continue
            for idx in holds[c]:
                if not any(o not in failed for o in self.extents[idx].replicas if o != c):
                    raise MediumError(f"volume {self.vid} extent {idx}: no replica could be fenced "
                                      f"before the snapshot ({c}: {res})")
                log.warning("volume %s extent %d: %s not fenced before a snapshot (%s); dropping it",
                            self.vid, idx, c, res)
                await self._drop(idx, c, f"{rk.UNAVAILABLE}: not fenced before a snapshot: {res}")

    async def _claim_op(self, op: VolumeOp) -> bytes | None:
        """Mark ``op`` running here, by compare-and-swap on its record; the bytes written, or
        None if the record no longer assigns it to this server (the meta re-routed it, it
        finished, or it was interrupted and is failed here: a ``running`` op is resumed only
        under the ownership epoch it was claimed in). Finishing compares those bytes, so a
        server that lost the op (its lease lapsed and the meta gave it to another) can
        neither report on it nor go on with it (``_revert`` checks before each extent): a
        late "done" from it once let a revert still running elsewhere roll back writes made
        after the user saw it finish."""
        e = self.engine
        key = e.keys.volop(self.vid, op.op_id)
        got = await e.etcd.get(key)
        if got is None:
            return None
        cur = VolumeOp.decode(got.value)
        if cur.executor != e.chunk_id or cur.state not in ("pending", "running"):
            return None
        t = e.etcd.transactions
        if ((cur.state == "running" and cur.claim_epoch != self.epoch)
                or (cur.kind == "revert" and cur.state == "pending" and cur.claim_epoch)):
            # A pending revert with a claim was claimed before and moved here by the meta
            # (its executor not live): it may have been applied, in part or in full, and the
            # volume written since; run again here it would roll those writes back.
            # Claimed here before, under another ownership (a restart of this server, a
            # lease lapse, a fence): it was interrupted, and the volume may have been
            # written since by whoever owned it in between, this server included. Run again,
            # it would roll those writes back; it fails instead and the user decides.
            if cur.state == "pending":
                why = (f"it was claimed (epoch {cur.claim_epoch}) by a server that stopped "
                       f"answering and then moved here")
            else:
                why = (f"ownership of the volume moved since it was claimed (epoch "
                       f"{cur.claim_epoch}, now {self.epoch})")
            cur.state = "failed"
            cur.error = (f"interrupted: {why}, so the volume may have been written since; not "
                         f"resumed (this {cur.kind} may have been applied in part, or in full "
                         f"with its outcome not recorded: check the volume)")
            ok, _ = await e.etcd.transaction(compare=[t.mod(key) == got.mod_revision],
                                             success=[t.put(key, cur.encode())], failure=[])
            if ok:
                log.warning("volume %s: %s %s %s", self.vid, cur.kind, cur.op_id, cur.error)
            return None
        cur.state, cur.claim_epoch = "running", self.epoch
        claimed = cur.encode()
        ok, _ = await e.etcd.transaction(compare=[t.mod(key) == got.mod_revision],
                                         success=[t.put(key, claimed)], failure=[])
        return claimed if ok else None

    async def _still_claimed(self, op: VolumeOp, claimed: bytes) -> bool:
        got = await self.engine.etcd.get(self.engine.keys.volop(self.vid, op.op_id))
        return got is not None and got.value == claimed

    def _seq_unknown(self) -> None:
        """A snapshot commit whose outcome is unknown (its reply lost): if it landed, the
        volume's seq is one higher and every write from now on must carry it, or it lands
        inside the snapshot, ready and reported done. Still inside the barrier: ownership is
        taken again before the next write (a new epoch, the volume's current ``snap_seq``;
        the fast path declines meanwhile), and the new epoch's owner record fails a commit
        that lands late. (Review, session 19: ``self.seq`` stayed at the snapshot's own seq
        until the next ownership change.)"""
        if self.engine.lease is not None:
            self._lease_gen = -1            # ``ensure_owner`` and ``_owns`` see a lease change
        else:
            self.epoch = 0                  # no lease gate (tests): no request in flight here

    async def _commit_snapshot(self, op: VolumeOp, snap: Snapshot, snap_rev: int, claimed: bytes) -> bool:
        """Commit the snapshot and the op "done" in one txn: True. False: the snapshot was
        ready already (the op is still to be reported done, by the caller)."""
        e = self.engine
        t = e.etcd.transactions
        attempts = 8
        for _ in range(attempts):
            vol_got = await e.etcd.get(e.keys.volume(self.vid))
            if vol_got is None:
                raise MediumError(f"volume {self.vid} is gone")
            vol = Volume.decode(vol_got.value)
            if snap.state != "creating":
                break
            old = vol.snap_seq
            vol.snap_seq = old + 1
            # The size at the barrier, not at the create (an expand may have come between):
            # the volume record is compared unchanged below.
            snap.seq, snap.state, snap.size = old, "ready", vol.size
            op.state, op.error = "done", None
            try:
                ok, _ = await e.etcd.transaction(
                    compare=[t.mod(e.keys.owner(self.vid)) == self.owner_rev,
                             t.mod(e.keys.volume(self.vid)) == vol_got.mod_revision,
                             t.mod(e.keys.snapshot(snap.snapshot_id)) == snap_rev,
                             t.value(e.keys.volop(self.vid, op.op_id)) == claimed],
                    success=[t.put(e.keys.volume(self.vid), vol.encode()),
                             t.put(e.keys.snapshot(snap.snapshot_id), snap.encode()),
                             t.put(e.keys.volop(self.vid, op.op_id), op.encode())], failure=[])
            except BaseException:
                self._seq_unknown()
                raise
            if ok:
                self.seq = old + 1
                self.volume = vol
                self._dirty.clear()            # logs from before a snapshot cannot resync versions
                log.info("volume %s: snapshot %s at seq %d", self.vid, snap.snapshot_id, old)
                return True
            got = await e.etcd.get(e.keys.snapshot(snap.snapshot_id))
            if got is None:
                raise MediumError("snapshot deleted while being taken")
            snap, snap_rev = Snapshot.decode(got.value), got.mod_revision
            owner = await e.etcd.get(e.keys.owner(self.vid))
            if owner is None or owner.mod_revision != self.owner_rev:
                raise MediumError("ownership moved during the snapshot")
            if not await self._still_claimed(op, claimed):
                raise MediumError(f"snapshot op {op.op_id} was handed to another server")
        if snap.state == "ready":
            return False                                    # committed already: nothing to do
        if snap.state != "creating":
            raise MediumError(f"snapshot {snap.snapshot_id} is {snap.state!r}; not committed")
        # Out of compare retries (the volume record kept changing): nothing was committed,
        # and "done" would leave the snapshot "creating" for ever behind a successful op.
        raise MediumError(f"gave up committing snapshot {snap.snapshot_id} after {attempts} attempts: "
                          f"the volume or snapshot record kept changing")

    async def _revert(self, to_seq: int, op: VolumeOp | None = None, claimed: bytes = b"") -> None:
        for idx in sorted(self.extents):
            # Every REVERT goes out at the seq read when ownership was taken. Once this
            # server's lease may have lapsed, the meta may have taken a snapshot itself
            # (raising the seq) or handed the volume on: a REVERT sent then would land inside
            # that snapshot. Like a write (ensure_owner), it must not start; the revert stops.
            lease = self.engine.lease
            if lease is not None and (lease.lease_gen != self._lease_gen
                                      or time.monotonic() >= lease.lease_deadline):
                raise MediumError(f"interrupted before extent {idx}: this server's etcd lease may "
                                  f"have lapsed (the volume may have been snapshotted or handed "
                                  f"on meanwhile); stopping")
            if op is not None and not await self._still_claimed(op, claimed):
                raise MediumError(f"revert {op.op_id} was handed to another server; stopping")
            # Held: a recovery copy of this extent must not join between the revert of the
            # in-sync replicas and its own (it would join unreverted).
            await self._locks.hold(idx, 0, EXTENT_SIZE)

            def revert(r, epoch, idx=idx):
                # ``sole`` (the blocks it writes back) passed only when true, as for writes.
                if _sole(self.extents[idx]):
                    return r.revert(self.vid, idx, epoch, to_seq, self.seq, sole=True)
                return r.revert(self.vid, idx, epoch, to_seq, self.seq)
            try:
                await self._on_replicas(idx, revert, 0, EXTENT_SIZE, keep=True, absent_ok=True,
                                        partial=True)
            finally:
                self._locks.release(idx)
        self._dirty.clear()
        log.info("volume %s reverted to seq %d", self.vid, to_seq)

    async def _finish_op(self, op: VolumeOp, error: str | None, claimed: bytes) -> None:
        """Report the op done or failed, only over the record we claimed. etcd out of reach:
        tried ``FINISH_TRIES`` times, then NotServing; the op stays in ``_ran_ops`` and the
        engine's retry of it (with back-off, while the record assigns it here, until the
        server stops) writes only this outcome, never runs the op again."""
        e = self.engine
        op.state, op.error = ("failed", error) if error else ("done", None)
        key = e.keys.volop(self.vid, op.op_id)
        t = e.etcd.transactions
        report = op.encode()
        delay = FINISH_RETRY
        for attempt in range(1, FINISH_TRIES + 1):
            try:
                ok, _ = await e.etcd.transaction(compare=[t.value(key) == claimed],
                                                 success=[t.put(key, report)], failure=[])
                break
            except (*_ETCD_UNREACHABLE, ConnectionError, OSError) as err:
                if attempt == FINISH_TRIES:
                    raise NotServing(f"volume {self.vid}: {op.kind} {op.op_id} ran; cannot "
                                     f"report it {op.state} in etcd: {err}") from None
                await asyncio.sleep(delay)
                delay *= 2
        self._ran_ops.pop(op.op_id, None)
        if not ok:
            try:
                got = await e.etcd.get(key)
            except (*_ETCD_UNREACHABLE, ConnectionError, OSError):
                got = None
            if got is not None and got.value == report:
                return                  # an earlier try landed, its reply lost
            log.warning("volume %s: %s %s was handed elsewhere meanwhile; not reporting %s",
                        self.vid, op.kind, op.op_id, op.state)

    # -- recovery ----------------------------------------------------------------

    async def run_recovery(self, task: RecoveryTask, task_rev: int, rate: float) -> None:
        """Copy extent ``task.index`` to ``task.target`` online, then have the meta join it."""
        e = self.engine
        await self.ready()
        await self.ensure_owner()
        idx = task.index
        got = await e.etcd.get(e.keys.extent(self.vid, idx))   # the watch may lag: "in sync" is
        if got is not None:                                    # taken from etcd, not the cache
            self._adopt(ExtentRecord.decode(got.value))
        rec = self.extents.get(idx)
        if rec is None:
            raise MediumError(f"extent {idx} of {self.vid} is not allocated")
        if task.target in rec.replicas:
            return
        sources = self._read_order(rec)
        if not sources:
            raise MediumError(f"extent {idx} of {self.vid} has no in-sync replica to copy from")
        # An in-sync replica whose chunk server has no registration record (never
        # registered, or unregistered meanwhile: ``Peers.address`` raises UnknownPeer, a
        # LookupError) cannot help; the copy comes from the others. None registered, or the
        # target not registered: the attempt fails as a replica that does not answer
        # (UNAVAILABLE, naming the chunk server), the shape the task's error takes for any
        # other call to it, which the meta's planner reads (``target_failed``); the raw
        # LookupError said neither which server nor what it was to the copy.
        handles, unregistered = [], []
        for cid in sources:
            try:
                handles.append(await e.replica(cid))
            except LookupError as ex:
                unregistered.append(cid)
                log.warning("volume %s extent %d: in-sync replica %s is not reachable as a "
                            "copy source: %s", self.vid, idx, cid, ex)
        if not handles:
            raise rk.ReplicaFailed(unregistered[0], rk.UNAVAILABLE,
                                   f"no in-sync replica to copy from is registered "
                                   f"({', '.join(unregistered)}: no registration record)",
                                   unsent=True)
        source, others = handles[0], handles[1:]   # others: asked when the first cannot read
        try:
            target = await e.replica(task.target)
        except LookupError as ex:
            raise rk.ReplicaFailed(task.target, rk.UNAVAILABLE,
                                   f"the copy's target is not registered ({ex})",
                                   unsent=True) from None
        gen = rec.generation
        dirty = self._dirty.get((idx, task.target))
        ranges: list[tuple[int, int]] = []
        if (task.kind == "resync" and dirty is not None and dirty.seq == self.seq
                and rec.stale.get(task.target) == dirty.generation):
            mode = "dirty"                 # the blocks are read from the log below, once
        else:                              # every write from then on reaches the target
            ranges = _whole_extent()
            mode = "full"
        try:
            await target.create(self.vid, idx, await self._epoch(), 1)
        except rk.ReplicaFailed as ex:
            if ex.kind != rk.IO:
                raise
            # Its copy is here but does not open: not in sync, so not needed. A fresh one,
            # copied in full (the dirty blocks alone would sit on nothing).
            log.warning("volume %s extent %d: %s holds a copy that does not open (%s); replacing it",
                        self.vid, idx, task.target, ex.detail)
            await target.create(self.vid, idx, await self._epoch(), 1, discard_broken=True)
            ranges = _whole_extent()
            mode = "full"
        # A dirty-block copy: the target is in sync everywhere else, so it takes every write
        # from now on (cursor at the end). A full copy: only writes behind the cursor.
        sync = self._sync[idx] = Sync(task.target, target, 0 if mode == "full" else EXTENT_SIZE)
        try:
            if mode == "dirty":
                # Writes that left before ``_sync`` was set (the fast path was open until now,
                # through the CREATE round trip) do not reach the target, and are logged only
                # when they end. The log is read once they have all ended, under a hold of the
                # extent: each such write is in it then, and every later one includes the
                # target, so the copy misses nothing and the digest needs no full copy.
                await self._locks.hold(idx, 0, EXTENT_SIZE)
                try:
                    blocks = sorted(dirty.blocks)
                finally:
                    self._locks.release(idx)
                ranges = block_runs(blocks)
                mode = f"{len(blocks)} dirty blocks"
            for attempt in range(2):
                total = sum(n for _, n in ranges)
                log.info("volume %s extent %d: %s to %s (%s, %d bytes) from %s", self.vid, idx,
                         task.kind, task.target, mode, total, source.chunk_id)
                sync.cursor = 0 if mode == "full" else EXTENT_SIZE
                task_rev = await self._copy(task, task_rev, [source, *others], target, sync,
                                            ranges, rate, total)
                sync.cursor = EXTENT_SIZE
                await target.flush(self.vid, idx, await self._epoch())   # so SETGEN's flush is short
                # Proof, not hope: with the extent quiet, both replicas must agree exactly.
                # Quiet until the join: a write, flush or revert between the proof and the
                # join would reach the target only through ``_sync`` (or not at all) and
                # could fail there unseen while it joins as in sync.
                await self._locks.hold(idx, 0, EXTENT_SIZE)
                try:
                    if sync.failed:
                        raise MediumError(f"target {task.target} failed during the copy: {sync.failed}")
                    epoch = await self._epoch()
                    if await self._source_digest([source, *others], idx) == \
                            await target.digest(self.vid, idx):
                        if not self._owns() or self.epoch != epoch:
                            # The proof was taken under an ownership that changed meanwhile:
                            # another owner may have written the sources since. Not joined.
                            raise MediumError(f"extent {idx}: ownership changed during the "
                                              f"digest of {task.target}; not joined")
                        await target.setgen(self.vid, idx, epoch, gen + 1)
                        try:
                            data = await e.meta.call("POST", f"/extents/{self.vid}/{idx}/join",
                                                     {"chunk_id": task.target, "generation": gen,
                                                      "epoch": epoch})
                        except Exception as ex:  # noqa: BLE001 - the outcome is read from etcd
                            # The join may have committed with its reply lost (MetaClient's
                            # retry then gets 409 "already in sync", or gives up on 503): the
                            # record etcd holds now is adopted under the hold, so no write
                            # passes with the old replica set while the target is in sync.
                            if not await self._joined_anyway(idx, task.target):
                                if isinstance(ex, MetaError):
                                    raise MediumError(f"join of {task.target} refused: {ex}") from None
                                raise
                            data = None
                        if data is not None:
                            self._adopt(ExtentRecord.from_dict(data.get("extent", data)))
                        self._dirty.pop((idx, task.target), None)
                        self._sync.pop(idx, None)
                        log.info("volume %s extent %d: %s joined at generation %d", self.vid, idx,
                                 task.target, self.extents[idx].generation)
                        return
                finally:
                    self._locks.release(idx)
                self.counters["copy_full_fallbacks"] += 1
                log.warning("volume %s extent %d: %s differs from %s after a %s copy; copying in full",
                            self.vid, idx, task.target, source.chunk_id, mode)
                mode = "full"
                ranges = _whole_extent()
            raise MediumError(f"extent {idx}: {task.target} still differs after a full copy")
        finally:
            self._sync.pop(idx, None)

    async def _joined_anyway(self, idx: int, target: str, tries: int = 5) -> bool:
        """After a join call that failed: adopt extent ``idx``'s record as etcd holds it (the
        watch may lag) and tell whether ``target`` is in sync in it. Called under the hold:
        etcd is retried a few times (bounded) since a wrong "no" lets writes miss the target."""
        e = self.engine
        delay = 0.2
        for attempt in range(tries):
            try:
                got = await e.etcd.get(e.keys.extent(self.vid, idx))
            except asyncio.CancelledError:
                raise
            except Exception as ex:  # noqa: BLE001 - etcd; retried, then reported
                if attempt == tries - 1:
                    log.error("volume %s extent %d: cannot read the extent record after the "
                              "failed join of %s (%s); if it committed, writes miss it until "
                              "the extent watch delivers it", self.vid, idx, target, ex)
                    return False
                await asyncio.sleep(delay)
                delay *= 2
                continue
            if got is None:
                return False
            rec = ExtentRecord.decode(got.value)
            self._adopt(rec)
            if target in rec.replicas:
                log.warning("volume %s extent %d: the join of %s failed to answer but committed "
                            "(generation %d)", self.vid, idx, target, rec.generation)
                return True
            return False
        return False

    async def _copy(self, task, task_rev, sources, target, sync, ranges, rate, total) -> int:
        idx = task.index
        done = 0
        last_report = time.monotonic()
        for off, n in ranges:
            await self._locks.hold(idx, off, off + n)
            try:
                pos, end = off, off + n
                while pos is not None and pos < end:
                    pos = await self._copy_piece(task, sources, target, pos, end)
                sync.cursor = max(sync.cursor, off + n)
            finally:
                self._locks.release(idx)
            if sync.failed:
                raise MediumError(f"target {task.target} failed during the copy: {sync.failed}")
            done += n
            if rate > 0:
                await asyncio.sleep(n / rate)
            if time.monotonic() - last_report > 1.0:
                last_report = time.monotonic()
                task_rev = await self.engine.report_progress(task, task_rev, done, total)
        # No "total of total" here: the digest or the join may still fail, and the task would
        # then show as copied while pending. A join that succeeds deletes the task.
        return task_rev

    # A source failing a whole EXPORT this way may be alone in it: the next one is asked.
    _SOURCE_FAILURES = (rk.CHECKSUM, rk.IO, rk.UNAVAILABLE)

    async def _copy_piece(self, task, sources, target, pos: int, end: int) -> int | None:
        """Copy [pos, end) (up to one export's worth) to the target; returns where to go on
        (inside a block when the export shipped a part of a block with too many versions).

        One rotten block on the first source must not stop the copy of the whole extent
        (it left the other blocks at one copy for good): the piece comes from the first
        source that exports it, every block it marks unreadable from another in-sync
        source that reads it, and a block none reads is copied as unreadable (it fails
        its checksum on the target as on the sources: MEDIUM ERROR, never zeros).
        """
        idx = task.index
        last: Exception | None = None
        for i, source in enumerate(sources):
            try:
                blob, nxt = await source.export(self.vid, idx, pos, end - pos, self.epoch)
                break
            except rk.ReplicaFailed as ex:
                if ex.kind not in self._SOURCE_FAILURES:
                    raise
                last = ex
                self.counters["copy_source_retries"] += 1
                log.warning("volume %s extent %d: export of %d+%d from %s failed (%s); "
                            "trying another in-sync replica", self.vid, idx, pos, end - pos,
                            source.chunk_id, ex)
        else:
            raise MediumError(f"extent {idx}: no in-sync replica exports {pos}+{end - pos}: {last}")
        await target.import_(self.vid, idx, blob, await self._epoch())
        for block in unreadable_blocks(blob):
            await self._copy_unreadable(task, [*sources[:i], *sources[i + 1:]], target,
                                        block, source.chunk_id)
        return nxt

    async def _copy_unreadable(self, task, others, target, block: int, bad_on: str) -> None:
        """Replace ``block``, imported as unreadable from ``bad_on``, by the first readable
        copy among ``others``; with none, it stays unreadable and is counted."""
        idx = task.index
        end = (block + 1) * BLOCK_SIZE
        for source in others:
            # A block with many versions comes in several parts (``ReplicaStore.export``):
            # all of them, or its first part alone would replace every version on the target.
            blobs: list[bytes] = []
            pos: int | None = block * BLOCK_SIZE
            readable = True
            try:
                while readable and pos is not None and pos < end:
                    blob, pos = await source.export(self.vid, idx, pos, end - pos, self.epoch)
                    readable = not unreadable_blocks(blob)
                    blobs.append(blob)
            except rk.ReplicaFailed as ex:
                if ex.kind not in self._SOURCE_FAILURES:
                    raise
                log.warning("volume %s extent %d block %d: export from %s failed: %s",
                            self.vid, idx, block, source.chunk_id, ex)
                continue
            if not readable:                        # a part of it does not read there either
                continue
            for blob in blobs:
                await target.import_(self.vid, idx, blob, await self._epoch())
            self.counters["copy_source_retries"] += 1
            log.warning("volume %s extent %d block %d: unreadable on %s, copied to %s from %s",
                        self.vid, idx, block, bad_on, task.target, source.chunk_id)
            return
        self.counters["unreadable_copied"] += 1
        log.error("volume %s extent %d block %d: no in-sync replica can read it (%s); %s gets "
                  "it as unreadable (reads fail with MEDIUM ERROR) and the rest of the extent "
                  "is copied", self.vid, idx, block, ", ".join([bad_on] + [s.chunk_id for s in others]),
                  task.target)

    async def _source_digest(self, sources, idx: int) -> bytes:
        """The digest of the first source that answers: a copy may have gone around one."""
        last: Exception | None = None
        for source in sources:
            try:
                return await source.digest(self.vid, idx)
            except rk.ReplicaFailed as ex:
                if ex.kind not in self._SOURCE_FAILURES:
                    raise
                last = ex
        raise MediumError(f"extent {idx}: no in-sync replica answers DIGEST: {last}")


