"""Leader loop: degraded extents -> recovery tasks (resync a stale copy, rebuild a new one).

Every ``period`` seconds the meta leader looks at every extent with fewer
in-sync replicas than its volume asks for, fewest live (on an up server) in-sync
copies first (one whose task was just replanned for failing goes behind the
others for ``REPLANNED_BACK``), and keeps at most ``concurrency`` ``RecoveryTask`` records in etcd
(docs/storage.md). An extent with no in-sync replica on an up server has no
source to copy from: it gets no task (and loses any it had) until one returns,
so it cannot hold a slot that an extent with a live source needs.

* a stale replica whose chunk server is live and active -> ``resync`` to it
  (it has most of the data; only the difference is copied), unless an in-sync
  replica holds its failure domain meanwhile (then it is not counted at all);
* else, once the stale chunk server has been down longer than ``grace``, is
  draining, removed, or has no usable disk -> ``rebuild`` on a newly placed
  chunk server, away from the failure domains of the remaining replicas and of
  the stale copies still waited for (they rejoin beside it).

With slots left over, replicas on draining chunk servers are moved: a
``rebuild`` to a new server whose ``join`` replaces the draining replica in
one change, so the extent never has fewer copies while a server drains.
Then, the same way, a replica that shares a failure domain with another of its
extent (its server re-registered with other labels since the extent was
placed), when another domain has room for it and
``meta.allow_shared_failure_domain`` is off.

A replica on a chunk server down past the grace that is still listed as in
sync (nothing wrote the extent, so nobody dropped it) is dropped here first,
if its server is still down when the drop is written (one back since the pass
read it keeps its replicas). The last replica is never dropped.

``stale`` entries are kept while the extent is below its replica count, whatever
their server's state: they name the only other copies there are if the in-sync
ones are lost (and the reclaimer keeps them). Once the extent is back at full
count they are pruned, and the old copies can be reclaimed. A resync that keeps
failing forgets its stale target only when the error was the target's own, not a
source's.

A task whose record has not changed for ``stall_timeout`` (nothing claimed it, reported
progress or an error: an executor's runner that ended or hangs, an assignment it never
saw) is placed again the same way, measured on the leader's own monotonic clock from
when it first saw the record's current version. A running copy rewrites its record
(``report_progress``) after each range it copies, at most once a second: the timeout is
far above that gap (``STALL_TIMEOUT``). A pending task waits without timing out while its
executor's copy slots (``EXECUTOR_SLOTS``: ``zstore.records.RECOVERY_SLOTS``, the engine's)
are all held by running tasks that changed within the timeout, at this pass or the one
before: it is queued for a slot. With a slot free it would have started, so it is timed like any other.

What the timer and the failure count need outlives the leader's term: the leader keeps
them in the task record (``TrackedTask``: for how many seconds the record had not changed
when the note was written, valid while etcd's version of the key is the one that note was
written at; the passes in a row that saw an error), so a leader changing more often than
the timeout or than ``FAILING_PASSES`` passes does not keep a stalled or failing task for
ever. The note holds seconds measured on the noting leaders' monotonic clocks, never a
time of day: the meta servers' wall clocks may disagree, and a leader whose clock is
ahead would otherwise time a task out early. A leader goes on from the note's seconds and
adds only what it observes itself (the time between the note's write and its own first
sight, a leader change, is not counted: the timer can run late, never early); it writes
them again at its second sight of the record, then each time the time it observed since
its last write reaches what it observed before it (a doubling), at the latest every
``1/NOTE_SHARE`` of the timeout: each term of two passes or more adds at least half of what
it observed (a term of one pass observes nothing, and adds nothing).

Each task is run by the volume's live owner (the coordinator: it must order
the copy with its own writes), else by the target, which then acquires
ownership. Tasks whose extent or volume is gone, that are no longer needed,
or whose target became unusable are deleted; a task whose executor is no
longer the right one is handed over. The chunk servers run the tasks
(chunk/storage/recovery.py) and ``join`` the target when done, which deletes
the task.

The extent records come from the leader's ``ExtentView`` (meta/extent_view.py), listed
once per term and followed by a watch, not read and decoded again every pass; every write
the pass makes still compares the record's mod revision, so a view that lags only fails
that write until the view catches up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, ClassVar

from zstore.errors import InsufficientResources, Unavailable
from zstore.etcd import get_prefix_paged
from zstore.records import RECOVERY_SLOTS, ExtentRecord, RecoveryTask, Volume, VolumeOwner

from . import chunks as chunkmod
from . import volops
from .context import Ctx
from .extent_view import Extents, ExtentView, decode_extents, paced
from .extents import EXTENT_SIZE, candidate_of, place_more, usable
from .placement import Candidate, shared_allowed

log = logging.getLogger(__name__)

PERIOD = 2.0
PLACE_YIELD_EVERY = 200  # extents a planning loop places (or fails to) between yields to the loop
FAILING_PASSES = 3       # a rebuild failing this many passes in a row is replanned (maybe elsewhere)
REPLANNED_BACK = 60.0    # seconds such an extent queues behind the degraded ones not failing
LOAD_WAIT = 10.0         # a pass waits this long for the extent view's listing, then gives up
OWN_WRITES_WAIT = 5.0    # ... and this long for the view to show its own writes, then reads them
# A task whose record has not changed this long is placed again. Far above the gap between a
# copy's progress writes: one per range copied (1 MiB in a full copy, a run of dirty blocks in
# a resync, each throttled to chunk.recovery_rate), at most one a second. A 64 MiB run keeps
# under it down to a rate of ~0.11 MiB/s (the default is 64).
STALL_TIMEOUT = 600.0
# The least a configured timeout may be (0 aside, "never"): a copy writes its first progress
# only after its first range, at most once a second after that, so seconds would time out
# copies that progress.
MIN_STALL_TIMEOUT = 60.0
# A leader writes a task's idle note again (adding what it observed) after this share of the
# stall timeout: each term's observation reaches the record, less at most this much.
NOTE_SHARE = 10
# Copies a chunk server runs at once (``zstore.records.RECOVERY_SLOTS``, which the engine's
# semaphore uses too): a pending task of an executor with fewer running copies than this is
# not waiting for a slot.
EXECUTOR_SLOTS = RECOVERY_SLOTS

OK, WAITING, GONE = "ok", "waiting", "gone"


def chunk_state(view: chunkmod.ChunkView | None, grace: float, now: float) -> str:
    """What a (stale) replica's chunk server is good for.

    ok: can be resynced; waiting: down within the grace (it may come back
    with its data); gone: rebuild elsewhere.
    """
    if view is None:
        return GONE                                   # removed from the cluster
    if view.up:
        if view.draining or view.free <= 0:           # free counts only disks in state ok
            return GONE
        if view.stopping:                             # shutting down: a resync would fail;
            return WAITING                            # it is likely back soon (a restart)
        return OK
    # Not an outage recorded before the server's latest registration: it came back since, and
    # the current one has had no grace counted yet (ChunkView.down_since).
    since = view.down_since
    if since is not None and now - since > grace:
        return GONE
    return WAITING


def is_up(view: chunkmod.ChunkView | None) -> bool:
    return view is not None and view.up


def target_failed(task: RecoveryTask) -> bool:
    """Whether the task's last error is its target's own (the copy cannot be written or kept
    there), not a source's (no in-sync replica reachable or readable, the volume's ownership
    moved, a join refused): only then is giving up on a stale target worth it.

    The shapes chunk/storage/coordinator.py and replicas.py record: ``replica on <target>:
    <kind>`` (a call to the target failed), ``target <target> failed during the copy``,
    ``<target> still differs after a full copy``. A fenced call (``stale_epoch``) is the
    coordinator's lost ownership, not the target's.
    """
    if not task.error:
        return False
    t = re.escape(task.target)
    return re.search(rf"(?:^|: )replica on {t}: (?!stale_epoch)|\btarget {t} failed\b|(?:^|\s){t} still differs\b",
                     task.error) is not None


def is_dead(view: chunkmod.ChunkView | None, grace: float, now: float) -> bool:
    """Removed, or down past the grace: its replicas are no longer in sync."""
    return chunk_state(view, grace, now) == GONE and (view is None or not view.up)


@dataclass
class TrackedTask(RecoveryTask):
    """A recovery task as the leader reads and writes it: the record, plus the leader's notes
    on it, kept in it so that the next leader goes on from them instead of starting again.

    ``idle_for`` (seconds): how long the record had not changed when the note was written,
    as the leaders that looked observed it on their monotonic clocks (never a time of day:
    meta servers' wall clocks disagree); it holds only while etcd's version of the key is
    ``idle_version``, the version the note's own write gave it (any other write since, the
    executor's progress or claim or error, is a change). ``failures``: the passes in a row
    that saw the task with an error, across leaders (a pass that sees none sets it back to 0).

    Only the leader writes these; the schema stays 1: code that knows a plain RecoveryTask
    (the chunk servers, older meta servers in a rolling upgrade) reads the record and drops
    the fields, so its next write of the record removes them. For the timer that write is a
    change anyway; the failure count then lives on in this leader's memory, as before. A
    record without them (written before they existed, or by such code) is timed from when
    the leader first sees it and counted from 0. Fresh records are written without them.

    The leader's own writes of a record it read (a note, a handover: ``merged``) change only
    their keys of the record as read: the project adds fields keeping schema 1, and a field
    of newer code (a newer meta or chunk server in a rolling upgrade) must not be erased
    because this code does not know it. ``idle_since`` (RETIRED), the wall-clock note of the
    first version of this (7ae7826), is not read, and these writes remove it: a meta server
    still running that code would take it, with a matching version, as a time on its clock.
    """
    idle_for: float | None = None
    idle_version: int = 0
    failures: int = 0

    NOTES: ClassVar[dict[str, Any]] = {"idle_for": None, "idle_version": 0, "failures": 0}
    RETIRED: ClassVar[tuple[str, ...]] = ("idle_since",)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        for name, default in self.NOTES.items():
            if d.get(name) == default:
                del d[name]
        return d

    @classmethod
    def merged(cls, raw: dict[str, Any], **changes: Any) -> dict[str, Any]:
        """The record as read (``raw``: its JSON object, every key kept, those this code does
        not know too) with ``changes`` made; a note set to its default is left out, as in
        ``to_dict``; a RETIRED note is removed."""
        d = {k: v for k, v in raw.items() if k not in cls.RETIRED}
        for name, value in changes.items():
            if name in cls.NOTES and value == cls.NOTES[name]:
                d.pop(name, None)
            else:
                d[name] = value
        return d

    @staticmethod
    def encoded(d: dict[str, Any]) -> bytes:
        """``d`` as ``Record.encode`` writes a record."""
        return json.dumps(d, separators=(",", ":"), sort_keys=True).encode()

    def noted(self, version: int) -> bool:
        """Whether ``idle_for`` is about the record at ``version`` (etcd's, as read)."""
        return (isinstance(self.idle_for, (int, float)) and not isinstance(self.idle_for, bool)
                and version > 0 and self.idle_version == version)


@dataclass
class World:
    """One consistent-enough read of everything a recovery pass looks at.

    ``extents``' records may be the extent view's own: never changed in place (copy one)."""
    volumes: dict[str, Volume]
    views: dict[str, chunkmod.ChunkView]
    extents: dict[tuple[str, int], tuple[ExtentRecord, int]]
    tasks: dict[tuple[str, int], tuple[TrackedTask, int]]
    owners: dict[str, VolumeOwner]
    # Each task record's etcd identity as read: (create revision, version). The version moves
    # with every write, the create revision tells a record deleted and put again apart.
    task_ids: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)
    # Each task record's JSON object as read, with the keys this code does not know: what the
    # leader's writes of a record change a few keys of (``TrackedTask.merged``).
    task_raw: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    # Placement's inputs, worked out once per pass (a server's free space sums its disks):
    # each chunk server as a candidate, the usable ones, and the sets of failure domains
    # no usable server is outside of (-> why nothing could be placed away from them).
    _cands: dict[str, Candidate] = field(default_factory=dict, repr=False)
    _pool: list[Candidate] | None = field(default=None, repr=False)
    nowhere: dict[frozenset[tuple[str, ...]], str] = field(default_factory=dict, repr=False)

    def candidate(self, chunk_id: str) -> Candidate:
        """A chunk server as placement sees it (a removed one is a domain of its own)."""
        cand = self._cands.get(chunk_id)
        if cand is None:
            view = self.views.get(chunk_id)
            cand = candidate_of(view) if view is not None else Candidate(chunk_id=chunk_id, free=0)
            self._cands[chunk_id] = cand
        return cand

    def pool(self) -> list[Candidate]:
        """The chunk servers that may receive a new copy of an extent (``usable``)."""
        if self._pool is None:
            self._pool = [self.candidate(v.chunk_id) for v in self.views.values()
                          if usable(v, EXTENT_SIZE)]
        return self._pool

    def live(self, rec: ExtentRecord) -> list[str]:
        """The in-sync replicas whose chunk server is up: what a copy can come from."""
        return [c for c in rec.replicas if is_up(self.views.get(c))]

    def executor_for(self, vid: str, target: str) -> str:
        owner = self.owners.get(vid)
        if owner and not owner.released and owner.chunk_id in self.views and self.views[owner.chunk_id].up:
            return owner.chunk_id
        return target


async def read_world(ctx: Ctx, extents: Extents | None = None) -> World:
    """Everything a pass looks at; the extent records read from etcd unless given (the
    extent view's)."""
    vols = {v.volume_id: v for _, v in await ctx.list(ctx.keys.volumes(), Volume)}
    views = {v.chunk_id: v for v in await chunkmod.list_chunks(ctx)}
    if extents is None:
        # Paged (one revision for all pages): one Range over every extent record outgrows
        # gRPC's 4 MiB reply limit at ~13k extents, and then every pass failed.
        kvs, _ = await get_prefix_paged(ctx.etcd, ctx.keys.all_extents())
        extents = await decode_extents(kvs)
    tasks, task_ids, task_raw = {}, {}, {}
    task_kvs, _ = await get_prefix_paged(ctx.etcd, ctx.keys.all_recovery())
    for kv in task_kvs:
        key = ctx.keys.extent_key_parts(kv.key)
        tasks[key] = (TrackedTask.decode(kv.value), kv.mod_revision)
        task_ids[key] = (kv.create_revision, kv.version)
        task_raw[key] = json.loads(kv.value)          # an object: decode checked it
    owners = {o.volume_id: o for _, o in await ctx.list(ctx.keys.owners(), VolumeOwner)}
    return World(vols, views, extents, tasks, owners, task_ids=task_ids, task_raw=task_raw)


@dataclass
class Recovery:
    """The leader's recovery scheduler; ``step`` is one pass (tests call it directly)."""
    ctx: Ctx
    grace: float = 600.0
    concurrency: int = 4
    period: float = PERIOD
    stall_timeout: float = STALL_TIMEOUT  # <= 0: tasks are never placed again for it
    clock: Callable[[], float] = time.monotonic   # the stall timer's (not the wall clock: it jumps)
    _warned: set[tuple[str, int]] = field(default_factory=set)
    # Passes in a row that saw each task with an error (also in the record: ``TrackedTask``).
    _failing: dict[tuple[str, int], int] = field(default_factory=dict)
    # Extents whose task was replanned for failing, and when: for REPLANNED_BACK they queue
    # behind the others, or one whose copy can never succeed (an unreadable only source)
    # would be planned again first at once, pass after pass, and keep the slots from them.
    _replanned: dict[tuple[str, int], float] = field(default_factory=dict)
    _stuck_crowded: int = 0              # crowded extents with no domain to move to, as last logged
    # Each task's record as last seen: its (create revision, version) and since when (``clock``)
    # it has not changed: when this leader first saw that version, or earlier as its note says.
    _seen: dict[tuple[str, int], tuple[tuple[int, int] | None, float]] = field(default_factory=dict)
    # Tasks whose current version this pass is the first to see (this leader observed nothing
    # of it yet: whether or not an earlier note says how long it had been unchanged).
    _unseen: set[tuple[str, int]] = field(default_factory=set)
    # When (``clock``) this leader last wrote each task's idle note, while its version stays.
    _noted_at: dict[tuple[str, int], float] = field(default_factory=dict)
    # When (``clock``) this leader first saw each task's current version (its own note writes
    # aside): where what it observed of the record begins.
    _sighted: dict[tuple[str, int], float] = field(default_factory=dict)
    # Executors whose copy slots were all held at the previous pass (None: no pass yet).
    _full_before: set[str] | None = None
    view: ExtentView | None = None       # while ``following``; else each pass reads etcd

    async def run(self, stop: asyncio.Event) -> None:
        """The passes of one leader term (cancelled when it ends), on one extent view."""
        log.info("recovery scheduler running (grace %.0fs, at most %d task(s))", self.grace, self.concurrency)
        async with self.following():
            while not stop.is_set():
                try:
                    await self.step()
                except asyncio.CancelledError:
                    raise
                except Unavailable as e:
                    log.info("recovery pass stopped: %s", e.message)
                except Exception:  # noqa: BLE001 - keep scheduling through etcd hiccups and bad records
                    log.exception("recovery pass failed; retrying in %.0fs", self.period)
                try:
                    await asyncio.wait_for(stop.wait(), self.period)
                except asyncio.TimeoutError:
                    pass

    @contextlib.asynccontextmanager
    async def following(self) -> AsyncIterator[ExtentView]:
        """Passes run meanwhile take the extent records from a watched view, not etcd."""
        view = ExtentView(self.ctx.etcd, self.ctx.keys)
        view.start()
        self.view = view
        try:
            yield view
        finally:
            self.view = None
            await view.close()

    async def _world(self, written: dict[tuple[str, int], int] | None = None) -> World:
        """What the pass looks at; after its own writes (``written``: extent -> the mod
        revision each compared), one that shows them."""
        view = self.view
        if view is None:
            return await read_world(self.ctx)
        if not await view.wait_ready(LOAD_WAIT):
            raise Unavailable(f"the extent records are not loaded yet (waited {LOAD_WAIT:.0f}s)")
        if written and not await view.wait_past(written, OWN_WRITES_WAIT):
            return await read_world(self.ctx)
        return await read_world(self.ctx, view.snapshot())

    async def step(self, now: float | None = None) -> dict[str, Any]:
        """Drop dead replicas, tidy tasks, plan new ones. Returns what it did."""
        now = time.time() if now is None else now
        ctx = self.ctx
        done: dict[str, Any] = {"dropped": [], "deleted": [], "reassigned": [], "created": []}
        await volops.tidy_ops(ctx, now)
        world = await self._world()
        written = await self._drop_dead(world, now, done)
        written.update(await self._prune_stale(world))
        if written:
            world = await self._world(written)
        await self._tidy(world, now, done)
        await self._plan(world, now, done)
        return done

    async def _drop_dead(self, w: World, now: float, done: dict[str, Any]) -> dict[tuple[str, int], int]:
        """Returns the extents written: each with the mod revision its write compared."""
        written = {}
        async for (vid, index), (seen, rev) in paced(w.extents.items()):
            dropped = []
            dead = [c for c in seen.replicas if is_dead(w.views.get(c), self.grace, now)]
            # Only beside a replica whose server is up: with every replica's server down, the
            # one dropped may be the one that comes back (it holds every acknowledged write)
            # while the kept one never does, and nothing would make it in sync again.
            if not dead or not any((v := w.views.get(c)) is not None and v.up
                                   for c in seen.replicas if c not in dead):
                continue
            rec = ExtentRecord.from_dict(seen.to_dict())     # the world's stays as read
            for c in dead:
                if len(rec.replicas) <= 1:
                    break                             # never the last copy
                rec.replicas.remove(c)
                rec.stale[c] = rec.generation
                rec.generation += 1
                dropped.append(c)
            if not dropped:
                continue
            key = self.ctx.keys.extent(vid, index)
            # Still down when written: a server back since the pass read it (a flap, or a
            # long pass) keeps its replicas, not a resync of each. Not for a removed server
            # (no view): one removed with --force while running puts its live key back, and
            # its replicas must go all the same.
            still_down = [self.ctx.absent(self.ctx.keys.chunk_live(c)) for c in dropped
                          if w.views.get(c) is not None]
            if await self.ctx.txn([self.ctx.unchanged(key, rev), *still_down], [self.ctx.put(key, rec)]):
                written[(vid, index)] = rev
                done["dropped"] += [(vid, index, c) for c in dropped]
                log.warning("extent %s/%d: dropped replica(s) on %s (down longer than %.0fs); in sync: %s",
                            vid, index, ",".join(dropped), self.grace, ",".join(rec.replicas))
        return written

    async def _prune_stale(self, w: World) -> dict[tuple[str, int], int]:
        """Forget the stale copies of extents back at full replica count (not before: until
        then they are the only other copies, and the reclaimer would delete an unlisted one).
        Returns the extents written, as ``_drop_dead``."""
        written = {}
        async for (vid, index), (rec, rev) in paced(w.extents.items()):
            vol = w.volumes.get(vid)
            if vol is None or not rec.stale or len(rec.replicas) < vol.replicas:
                continue
            gone = sorted(rec.stale)
            new = ExtentRecord.from_dict(rec.to_dict())
            new.stale = {}
            key = self.ctx.keys.extent(vid, index)
            if await self.ctx.txn([self.ctx.unchanged(key, rev)], [self.ctx.put(key, new)]):
                written[(vid, index)] = rev
                log.info("extent %s/%d has its %d replicas again: stale copies on %s no longer needed",
                         vid, index, vol.replicas, ",".join(gone))
        return written

    async def _tidy(self, w: World, now: float, done: dict[str, Any]) -> None:
        ctx = self.ctx
        clock = self.clock()
        spared = self._note_revisions(w, clock)
        for (vid, index), (task, rev) in list(w.tasks.items()):
            key = ctx.keys.recovery_task(vid, index)
            vol = w.volumes.get(vid)
            ext = w.extents.get((vid, index))
            why, forget, failures = None, False, 0
            if vol is None or ext is None:
                why = "its volume or extent is gone"
            elif not self._needs_work(ext[0], vol, w):
                why = "the extent has all its replicas"
            elif task.target in ext[0].replicas:
                why = "the target is in sync"
            elif chunk_state(w.views.get(task.target), self.grace, now) != OK:
                why = f"the target {task.target} is not usable"
            elif not w.live(ext[0]):
                # Nothing to copy from: the slot goes to an extent that has a source; this one
                # is planned again when an in-sync replica's server is back.
                why = "no in-sync replica's server is up to copy from"
                self._failing.pop((vid, index), None)
            elif (failures := self._keeps_failing(vid, index, task)) >= FAILING_PASSES:
                why = f"it failed {FAILING_PASSES} times in a row ({task.error}); placing it again"
                self._replanned[(vid, index)] = now
                # A resync that keeps failing because of its target (its copy unusable, no room
                # to replace it) would be planned again onto the same stale copy: that copy is
                # forgotten instead, and the extent gets a rebuild like any other missing
                # replica. Not when a source failed: the stale copy is as good as before.
                forget = (task.kind == "resync" and task.target in ext[0].stale
                          and target_failed(task))
            elif (idle := self._stalled((vid, index), task, clock, spared)) is not None:
                why = (f"its record has not changed for {idle:.0f}s ({task.state}, {task.done_bytes} "
                       f"of {task.total_bytes} bytes copied, run by {task.executor}); placing it again")
                self._replanned[(vid, index)] = now
            if why:
                # The reason holds only for the extent as seen (gone, or this record): a view
                # lagging behind a change fails the txn instead.
                ekey = ctx.keys.extent(vid, index)
                compare = [ctx.unchanged(key, rev), ctx.unchanged(ekey, ext[1]) if ext else ctx.absent(ekey)]
                ops = [ctx.delete(key)]
                if forget:
                    new = ExtentRecord.from_dict(ext[0].to_dict())
                    new.stale.pop(task.target, None)
                    ops.append(ctx.put(ekey, new))
                if await ctx.txn(compare, ops):
                    if forget:
                        w.extents.pop((vid, index), None)      # planned afresh next pass
                    log.info("recovery task %s/%d (%s to %s) removed: %s", vid, index, task.kind,
                             task.target, why)
                    done["deleted"].append((vid, index))
                    del w.tasks[(vid, index)]
                continue
            want = w.executor_for(vid, task.target)
            if want != task.executor:
                old = task.executor
                # A change: the new executor's record is timed afresh (the note no longer
                # matches the key's version); the failure count goes on. Only these two keys
                # of the record as read change (``TrackedTask.merged``).
                task.executor, task.state = want, "pending"
                raw = TrackedTask.merged(w.task_raw.get((vid, index)) or task.to_dict(),
                                         executor=want, state="pending")
                if await ctx.txn([ctx.unchanged(key, rev)], [ctx.put(key, TrackedTask.encoded(raw))]):
                    w.task_raw[(vid, index)] = raw
                    log.info("recovery task %s/%d handed from %s to %s", vid, index, old, want)
                    done["reassigned"].append((vid, index, want))
                continue
            await self._note((vid, index), task, rev, w, failures, clock)

    def _note_revisions(self, w: World, clock: float) -> set[str] | None:
        """Remember since when each task's current record has not changed (forget tasks
        gone): from when this leader first saw its version, or from its note (``TrackedTask``)
        if the note is about that version (left by an earlier term, or another leader).

        Returns the executors whose pending tasks are queued for a copy slot: those whose
        ``EXECUTOR_SLOTS`` slots are all held by running tasks that changed within the stall
        timeout, at this pass or the one before (a slot that frees is taken within moments,
        but this pass may have read the records in between); None at a term's first pass,
        which cannot tell (every pending task is spared, once)."""
        seen, unseen = {}, set()
        for key, (task, _) in w.tasks.items():
            ident = w.task_ids.get(key)
            was = self._seen.get(key)
            if was is not None and was[0] == ident:
                seen[key] = was
                continue
            if ident is not None and task.noted(ident[1]):
                # Seconds earlier leaders observed on their own monotonic clocks, as of the
                # note's write; the time since (a leader change) is not counted: no wall
                # clock, whose skew between meta servers would time the task out early.
                seen[key] = (ident, clock - max(0.0, float(task.idle_for)))
            else:
                seen[key] = (ident, clock)
            unseen.add(key)
        self._seen, self._unseen = seen, unseen
        self._noted_at = {k: t for k, t in self._noted_at.items() if k in seen and k not in unseen}
        self._sighted = {k: clock if k in unseen else self._sighted.get(k, clock) for k in seen}
        copying = Counter(task.executor for key, (task, _) in w.tasks.items()
                          if task.state == "running" and clock - seen[key][1] < self.stall_timeout)
        full = {executor for executor, n in copying.items() if n >= EXECUTOR_SLOTS}
        before, self._full_before = self._full_before, full
        return None if before is None else full | before

    def _stalled(self, key: tuple[str, int], task: RecoveryTask, clock: float,
                 spared: set[str] | None) -> float | None:
        """Seconds the task's record has not changed, if that is past the stall timeout and it
        is not a pending task queued for one of its executor's copy slots (``spared``: the
        executors whose slots are all held; None: all); else None.

        Nothing else notices such a task: it has no error for ``_keeps_failing`` to count, and
        it holds the extent under-replicated and a slot. A copy in progress rewrites its record
        far more often (see STALL_TIMEOUT). A running task is never spared: its own record
        shows whether its copy goes on."""
        if self.stall_timeout <= 0:
            return None
        idle = clock - self._seen[key][1]
        if idle < self.stall_timeout:
            return None
        if task.state != "running" and (spared is None or task.executor in spared):
            return None
        return idle

    def _keeps_failing(self, vid: str, index: int, task: TrackedTask) -> int:
        """Count passes that see the task with an error, going on from the record's count (an
        earlier term's); a pass that sees none (an attempt under way) starts over. Returns the
        count, 0 without an error; at ``FAILING_PASSES`` it is forgotten (the task goes)."""
        key = (vid, index)
        if not task.error:
            self._failing.pop(key, None)
            return 0
        count = max(self._failing.get(key, 0), task.failures) + 1
        if count < FAILING_PASSES:
            self._failing[key] = count
        else:
            self._failing.pop(key, None)
        return count

    async def _note(self, key: tuple[str, int], task: TrackedTask, rev: int, w: World,
                    failures: int, clock: float) -> None:
        """Keep in the task's record what the next leader needs (``TrackedTask``): the failure
        count when it changed, and for how long the record has not changed: once a pass of
        this leader sees it unchanged since its previous one (not at its first sight: a copy
        in progress changes it between passes, and is never written to), then again each time
        the time observed since the last write reaches what this term observed before it, and
        at the latest each ``1/NOTE_SHARE`` of the stall timeout, while it stays so (the next
        leader goes on from the note: at least half of what this term observed reaches it,
        however short the term). Written by compare-and-swap on its
        revision: a record changed meanwhile is a change, seen next pass. At most one write
        per task and pass. Only the note's keys of the record as read change
        (``TrackedTask.merged``)."""
        ident = w.task_ids.get(key)
        if ident is None or not rev:
            return                                   # not read from etcd (planned this pass)
        timed = self.stall_timeout > 0
        last = self._noted_at.get(key)
        # Again once the time observed since the last write reaches what was observed before
        # it in this term (a doubling: a short term's note keeps at least half of what it
        # observed), at the latest each tenth of the timeout.
        due = (timed and key not in self._unseen
               and (last is None or clock - last >= min(self.stall_timeout / NOTE_SHARE,
                                                        last - self._sighted.get(key, last))))
        if task.failures == failures and not due:
            return
        start = self._seen[key][1]
        raw = TrackedTask.merged(w.task_raw.get(key) or task.to_dict(), failures=failures,
                                 idle_for=round(max(0.0, clock - start), 3),
                                 # the version this write gives the key
                                 idle_version=ident[1] + 1)
        tkey = self.ctx.keys.recovery_task(*key)
        if await self.ctx.txn([self.ctx.unchanged(tkey, rev)], [self.ctx.put(tkey, TrackedTask.encoded(raw))]):
            self._seen[key] = ((ident[0], ident[1] + 1), start)   # our own write: no change
            if key not in self._unseen:              # it has what this leader observed
                self._noted_at[key] = clock
            w.tasks[key] = (TrackedTask.from_dict(raw), 0)
            w.task_ids[key] = (ident[0], ident[1] + 1)
            w.task_raw[key] = raw

    @staticmethod
    def _draining(rec: ExtentRecord, w: World) -> list[str]:
        return [c for c in rec.replicas if c in w.views and w.views[c].draining]

    def _crowded(self, rec: ExtentRecord, w: World) -> str | None:
        """A replica of ``rec`` in a failure domain another one is in, or None (always None
        when replicas may share domains).

        Placement never puts two there, but a chunk server's labels can change after (it
        registers again with another zone, rack or host). Of the replicas in that domain,
        one whose server is down, else the one listed last, leaves: the copy that serves
        least."""
        if shared_allowed(None):
            return None
        by_domain: dict[tuple[str, ...], list[str]] = {}
        for c in rec.replicas:
            by_domain.setdefault(w.candidate(c).failure_domain, []).append(c)
        for held in by_domain.values():
            if len(held) > 1:
                return next((c for c in held if not is_up(w.views.get(c))), held[-1])
        return None

    def _needs_work(self, rec: ExtentRecord, vol: Volume, w: World) -> bool:
        """Degraded, or full but with a replica to move (off a draining server, or out of a
        failure domain another replica is in)."""
        return (len(rec.replicas) < vol.replicas or bool(self._draining(rec, w))
                or self._crowded(rec, w) is not None)

    async def _plan(self, w: World, now: float, done: dict[str, Any]) -> None:
        slots = self.concurrency - len(w.tasks)
        # Fewest live copies first (behind the others, one whose task was just replanned for
        # failing); an extent without any has no source and waits.
        degraded, moving, crowded = [], [], []
        async for (vid, index), (rec, rev) in paced(w.extents.items()):
            vol = w.volumes.get(vid)
            if vol is None or not w.live(rec):
                continue
            if len(rec.replicas) < vol.replicas:
                degraded.append((rec, rev))
            elif (vid, index) in w.tasks:
                continue
            elif draining := self._draining(rec, w):
                moving.append(((vid, index), (rec, rev), draining[0]))
            elif (sharing := self._crowded(rec, w)) is not None:
                crowded.append(((vid, index), (rec, rev), sharing))
        self._replanned = {k: t for k, t in self._replanned.items() if now - t < REPLANNED_BACK}
        degraded.sort(key=lambda x: ((x[0].volume_id, x[0].index) in self._replanned, len(w.live(x[0])),
                                     len(x[0].replicas), x[0].volume_id, x[0].index))
        slots = await self._plan_degraded(w, now, done, degraded, slots)
        # Then, with what is left, move replicas off draining servers (the copy joins in
        # place of the draining replica, so the extent never has fewer copies meanwhile),
        # then out of failure domains another replica is in: the same move.
        slots, _ = await self._plan_moves(w, done, sorted(moving), slots, quiet=False)
        if slots > 0:
            # One summary, not a warning per extent: a relabelling can crowd every extent.
            slots, stuck = await self._plan_moves(w, done, sorted(crowded), slots, quiet=True)
            if stuck and stuck != self._stuck_crowded:
                log.warning("%d extent(s) have two replicas in one failure domain (a chunk "
                            "server's labels changed since they were placed) and no other "
                            "domain with room to move one to", stuck)
            self._stuck_crowded = stuck

    async def _plan_moves(self, w: World, done: dict[str, Any],
                          moves: list[tuple[tuple[str, int], tuple[ExtentRecord, int], str]],
                          slots: int, quiet: bool) -> tuple[int, int]:
        """A rebuild per ``(extent, (record, rev), leaving replica)`` while slots last: the copy
        goes away from the domains of the replicas that stay, and joins in place of the one
        leaving. Returns the slots left and how many moves had no place to go."""
        nowhere = 0
        async for _, (rec, rev), leaving in paced(moves, PLACE_YIELD_EVERY):
            if slots <= 0:
                break
            vol = w.volumes[rec.volume_id]
            stay = [c for c in rec.replicas if c != leaving]
            target = self._place(w, rec, stay, vol, quiet=quiet)
            nowhere += target is None
            # The task names the replica it replaces: the join removes that one, not whichever
            # replica happens to be draining by then (the target is away from the others only).
            if target and await self._create(w, rec, rev, rec, vol, "rebuild", target, done,
                                             replaces=leaving):
                slots -= 1
        return slots, nowhere

    def _place(self, w: World, rec: ExtentRecord, keep_ids: list[str], vol: Volume,
               quiet: bool = False) -> str | None:
        """A new chunk server for a copy of ``rec``, away from ``keep_ids``' failure domains.

        ``keep_ids``: the in-sync replicas, and the stale copies the plan counts on (waiting
        to be resynced): the new copy joins beside all of them, so none may share its domain.
        ``quiet``: no warning for this extent when there is none (the caller sums them up).

        The pool is the pass's (``World.pool``). A set of domains that no usable server is
        outside of has no place for any extent: once one extent found that, the others
        kept in the same domains fail at once (a relabel or a lost domain can leave every
        extent so, and each pass would otherwise place each of them again).
        """
        keep = [w.candidate(c) for c in keep_ids]
        held = frozenset(c.failure_domain for c in keep)
        why = None if shared_allowed(None) else w.nowhere.get(held)
        if why is None:
            gone = set(rec.replicas) | set(rec.stale)
            pool = [c for c in w.pool() if c.chunk_id not in gone]
            try:
                target = place_more(pool, keep, 1, EXTENT_SIZE)[0]
            except InsufficientResources as e:
                why = e.message
                # Only when no server outside these domains exists at all: one excluded for
                # this extent only (a stale copy's) may still take another extent's copy.
                if not shared_allowed(None) and all(c.failure_domain in held for c in w.pool()):
                    w.nowhere[held] = why
            else:
                self._warned.discard((rec.volume_id, rec.index))
                return target
        key = (rec.volume_id, rec.index)
        if not quiet and key not in self._warned:
            self._warned.add(key)
            log.warning("extent %s/%d (%d of %d replicas) has no place for a new copy: %s",
                        rec.volume_id, rec.index, len(rec.replicas), vol.replicas, why)
        return None

    async def _create(self, w: World, rec: ExtentRecord, rev: int, new: ExtentRecord, vol: Volume,
                      kind: str, target: str, done: dict[str, Any], replaces: str = "") -> bool:
        """One txn: the task, if the extent is unchanged (and its new record, if it changed).

        ``replaces``: for a move off a draining server, the replica the copy joins in place of.
        """
        ctx, vid, index = self.ctx, rec.volume_id, rec.index
        task = TrackedTask(volume_id=vid, index=index, target=target, kind=kind,
                            executor=w.executor_for(vid, target), generation=rec.generation,
                            total_bytes=EXTENT_SIZE, replaces=replaces)
        tkey, ekey = ctx.keys.recovery_task(vid, index), ctx.keys.extent(vid, index)
        ops = [ctx.put(tkey, task)]
        if new.stale != rec.stale:
            ops.append(ctx.put(ekey, new))
        if not await ctx.txn([ctx.absent(tkey), ctx.unchanged(ekey, rev)], ops):
            return False
        w.tasks[(vid, index)] = (task, 0)
        done["created"].append((vid, index, kind, target))
        log.info("extent %s/%d (%d of %d replicas): %s to %s%s, run by %s", vid, index,
                 len(rec.replicas), vol.replicas, kind, target,
                 f" in place of {replaces}" if replaces else "", task.executor)
        return True

    async def _plan_degraded(self, w: World, now: float, done: dict[str, Any],
                             degraded: list[tuple[ExtentRecord, int]], slots: int) -> int:
        async for rec, rev in paced(degraded, PLACE_YIELD_EVERY):
            if slots <= 0:
                break
            vid, index = rec.volume_id, rec.index
            if (vid, index) in w.tasks or not rec.replicas:
                continue
            vol = w.volumes[vid]
            states = {c: chunk_state(w.views.get(c), self.grace, now)
                      for c in rec.stale if c not in rec.replicas}
            ok_stale = sorted((c for c, s in states.items() if s == OK), key=lambda c: -rec.stale[c])
            waiting = [c for c, s in states.items() if s == WAITING]
            # A stale copy rejoins beside the in-sync replicas: not one in a failure domain one
            # of them already holds (a rebuild placed there meanwhile, say), unless replicas may
            # share domains. Such a copy is neither resynced nor counted; a rebuild elsewhere
            # is planned instead (or, with no free domain, the extent waits).
            shared = shared_allowed(None)
            used = {w.candidate(c).failure_domain for c in rec.replicas}

            def fits(c: str) -> bool:
                return shared or w.candidate(c).failure_domain not in used
            ok_stale = [c for c in ok_stale if fits(c)]
            counted = []
            for c in waiting:
                if fits(c):
                    counted.append(c)
                    used.add(w.candidate(c).failure_domain)
            # The gone stale copies stay listed (``_prune_stale``): a rebuild is only planned
            # here, and if its source dies before it joins they are what is left.
            if ok_stale:
                kind, target = "resync", ok_stale[0]
            elif vol.replicas - len(rec.replicas) > len(counted):
                # Away from the waiting copies' domains too: they rejoin when back.
                target = self._place(w, rec, rec.replicas + counted, vol)
                if target is None:
                    continue
                kind = "rebuild"
            else:
                continue                               # wait for the stale copies' servers to return
            if await self._create(w, rec, rev, rec, vol, kind, target, done):
                slots -= 1
        return slots


# --- status ---------------------------------------------------------------------------

def task_view(task: RecoveryTask, vol: Volume | None) -> dict[str, Any]:
    return {"volume": vol.name if vol else None, "volume_id": task.volume_id, "index": task.index,
            "kind": task.kind, "target": task.target, "executor": task.executor,
            "done_bytes": task.done_bytes, "total_bytes": task.total_bytes, "state": task.state,
            "error": task.error}


async def cluster_status(ctx: Ctx) -> dict[str, Any]:
    """The ``recovery`` block of ``GET /cluster``.

    ``degraded_extents``: fewer in-sync replicas listed than the volume's count (what
    recovery works on). ``degraded_live_extents``: fewer in-sync replicas on up servers than
    that count (also those whose server is down within the grace, not dropped yet).
    ``unavailable_extents``: no in-sync replica on an up server at all: unreadable, and not
    recoverable until one returns.
    """
    w = await read_world(ctx)
    mine = [(rec, w.volumes[vid]) for (vid, _), (rec, _) in w.extents.items() if vid in w.volumes]
    degraded = sum(1 for rec, vol in mine if len(rec.replicas) < vol.replicas)
    degraded_live = sum(1 for rec, vol in mine if len(w.live(rec)) < vol.replicas)
    unavailable = sum(1 for rec, _ in mine if not w.live(rec))
    tasks = [task_view(t, w.volumes.get(vid)) for (vid, _), (t, _) in sorted(w.tasks.items())]
    return {"degraded_extents": degraded, "degraded_live_extents": degraded_live,
            "unavailable_extents": unavailable, "tasks": tasks,
            "bytes_done": sum(t["done_bytes"] for t in tasks),
            "bytes_total": sum(t["total_bytes"] for t in tasks)}


async def volume_status(ctx: Ctx, vol: Volume) -> dict[str, Any]:
    """Extents allocated / degraded and this volume's recovery tasks."""
    vid = vol.volume_id
    kvs, _ = await get_prefix_paged(ctx.etcd, ctx.keys.extents(vid))
    recs = [ExtentRecord.decode(kv.value) for kv in kvs]
    tasks = [task_view(t, vol) for _, t in await ctx.list(ctx.keys.recovery(vid), RecoveryTask)]
    return {"extents": {"total": -(-vol.size // EXTENT_SIZE), "allocated": len(recs),
                        "degraded": sum(1 for r in recs if len(r.replicas) < vol.replicas)},
            "recovery": {"tasks": tasks, "bytes_done": sum(t["done_bytes"] for t in tasks),
                         "bytes_total": sum(t["total_bytes"] for t in tasks)}}
