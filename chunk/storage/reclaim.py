"""Reclaim space: delete local extents nobody needs, trim unneeded COW versions.

Three things free space on a chunk server (docs/storage.md, "Deleting a
snapshot"):

- the volume record is gone: every local extent of it goes;
- the extent moved elsewhere: its record exists, names this chunk neither as
  in-sync nor as stale, has a newer generation than the local copy, has all the
  replicas its volume asks for, and no recovery task is copying onto this
  chunk: the local extent goes. The task and the record are read together (one
  txn, one revision) right before each such deletion, not from a listing read
  earlier in the run: a move planned onto this server meanwhile reuses this
  copy. While the extent is degraded every local copy is kept, listed or not:
  if its in-sync replicas are lost before a new copy joins, an older copy is
  better than none (docs/storage.md, "Recovery").
  A copy that did not open (``store.broken``: a rotten header, a failed
  fdatasync) has no generation to compare: it goes when the rest holds, and
  with its volume, like any other;
- a snapshot was deleted: versions no remaining snapshot record of the volume
  (tombstones included: clones read through them) needs are trimmed, once
  per change of that set, of the extent's generation (a resync or rebuild
  may import versions its source had not trimmed yet, and ends with SETGEN),
  of its import count (a block repair imports without SETGEN) or of its COW
  count (writes after a snapshot's deletion still make versions nobody reads).

Every decision comes from a fresh etcd read, never from a cache, and any
failed read ends the run before anything else is deleted. A local store
failure (a disk gone read-only or answering EIO) on one extent's stat, trim or
delete costs only that extent: it is logged and counted (``status()["failed"]``,
``"last_failure"``) and the run goes on with the others (raising it stopped the
run at the same extent every time, so nothing after it was ever reclaimed). A missing cluster
record means a wrong prefix or an empty etcd, where every volume would look
deleted: the reclaimer then refuses to delete at all.

Snapshot race: a snapshot taken between our listing and the trim is not in
the listing, so its versions must be protected another way. Its seq is at
least the volume's ``snap_seq`` S read *before* the listing, and a version
it needs contains its seq. The run's reads take seconds on a big server, so
``snap_seq`` is read again (S') just before the volume's trims, with no await
between them: seqs S .. S'+``SEQ_MARGIN``-1 are kept too. (Kept from S only,
a burst of more than SEQ_MARGIN snapshots during the run lost the versions of
the later ones.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import Any

from zstore import etcd as zetcd
from zstore.keys import Keys
from zstore.records import ExtentRecord, RecoveryTask, Snapshot, Volume

from .replica_store import StoreError

log = logging.getLogger(__name__)

SEQ_MARGIN = 16


class ReclaimRefused(RuntimeError):
    """The run stopped without deleting: etcd does not look like this cluster's."""


class Reclaimer:
    def __init__(self, store, etcd, keys: Keys, chunk_id: str, interval: float = 60.0) -> None:
        self.store = store
        self.etcd = etcd
        self.keys = keys
        self.chunk_id = chunk_id
        self.interval = interval
        self.deleted = 0              # extents deleted, since start
        self.trimmed = 0              # versions trimmed, since start
        self.failed = 0               # extents whose stat/trim/delete failed (store error), since start
        self.last_failure: str | None = None
        self.runs = 0
        self.last_run: float | None = None
        self.last_error: str | None = None
        # (vid, idx) -> (keep set, generation, imports, cows) of its last trim
        self._trimmed_with: dict[tuple[str, int], tuple[frozenset[int], int, int, int]] = {}
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="reclaimer")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - keep going; the next run reads afresh
                log.warning("reclaim run failed, nothing more deleted: %s", e)

    def status(self) -> dict[str, Any]:
        return {"runs": self.runs, "deleted": self.deleted, "trimmed": self.trimmed,
                "failed": self.failed, "last_failure": self.last_failure,
                "last_run": self.last_run, "last_error": self.last_error}

    # -- one run ---------------------------------------------------------------

    def _moved(self, vid: str, idx: int, rec: ExtentRecord | None, vol: Volume,
               is_broken: bool) -> bool | None:
        """``_moved_away`` for a copy whose record may be gone (not moved: kept), or None
        when the copy cannot be looked at (counted as a failure; tried again next run)."""
        try:
            return rec is not None and self._moved_away(vid, idx, rec, vol, is_broken)
        except StoreError as e:
            self._failure(vid, idx, "stat", e)
            return None

    async def _listing(self, prefix: bytes) -> list:
        """Every kv under ``prefix``, paged at one revision: a volume's extent records (a
        few TiB of it) or every snapshot of the cluster can be more than gRPC's 4 MiB reply
        limit, and one Range would fail every run from then on (nothing reclaimed again)."""
        kvs, _ = await zetcd.get_prefix_paged(self.etcd, prefix)
        return kvs

    async def run_once(self) -> dict[str, Any]:
        """One pass over the local extents; raises (having stopped) when an etcd read fails."""
        async with self._lock:
            try:
                summary = await self._run()
            except Exception as e:
                self.last_error = f"{type(e).__name__}: {e}"
                raise
            self.runs += 1
            self.last_run = time.time()
            self.last_error = None
            return summary

    async def _run(self) -> dict[str, Any]:
        summary: dict[str, Any] = {"deleted": [], "trimmed": 0, "extents": 0}
        local: dict[str, list[int]] = defaultdict(list)
        for vid, idx in self.store.extents():
            local[vid].append(idx)
        # Copies that did not open (a rotten header, a failed fdatasync): not in extents(), but
        # their files take space until deleted, by the same rules (``_moved_away``).
        broken: dict[str, list[int]] = defaultdict(list)
        for vid, idx in sorted(self.store.broken):
            if not self.store.has(vid, idx):
                broken[vid].append(idx)
        summary["extents"] = sum(map(len, local.values()))
        for key in [k for k in self._trimmed_with if k[1] not in local.get(k[0], ())]:
            del self._trimmed_with[key]       # deleted by someone else meanwhile
        if not local and not broken:
            return summary
        if await self.etcd.get(self.keys.cluster()) is None:
            raise ReclaimRefused(f"no cluster record at {self.keys.cluster().decode()}: "
                                 "wrong prefix or empty etcd; not deleting anything")

        # Volume records first, the snapshot listing after (see the module docstring).
        volumes: dict[str, Volume | None] = {}
        for vid in sorted(set(local) | set(broken)):
            got = await self.etcd.get(self.keys.volume(vid))
            volumes[vid] = None if got is None else Volume.decode(got.value)
        seqs: dict[str, set[int]] = defaultdict(set)
        for kv in await self._listing(self.keys.snapshots()):
            snap = Snapshot.decode(kv.value)
            if snap.seq > 0:
                seqs[snap.volume_id].add(snap.seq)

        for vid in sorted(volumes):
            vol, indexes, unusable = volumes[vid], local.get(vid, []), broken.get(vid, [])
            if vol is None:
                for idx in sorted(indexes):
                    if self._delete(vid, idx, "its volume is deleted"):
                        summary["deleted"].append((vid, idx))
                for idx in unusable:
                    if self._delete_broken(vid, idx, "its volume is deleted"):
                        summary["deleted"].append((vid, idx))
                continue
            records = {}
            for kv in await self._listing(self.keys.extents(vid)):
                rec = ExtentRecord.decode(kv.value)
                records[rec.index] = rec
            trims: list[int] = []
            copies = sorted([(i, False) for i in indexes] + [(i, True) for i in unusable])
            for idx, is_broken in copies:
                moved = self._moved(vid, idx, records.get(idx), vol, is_broken)
                if moved is None:
                    continue
                if moved:
                    # Read again right before the deletion, not from a listing of the volume's
                    # tasks read when its first deletion came up: a task placed on this server
                    # after that (a move off a draining server, whose CREATE reuses this copy)
                    # would not be in it, and its copy would go as an orphan.
                    rec, moved = await self._orphan(vid, idx, vol, is_broken)
                    if moved is None:
                        continue
                    if moved:
                        why = f"moved to {rec.replicas} at generation {rec.generation}"
                        if not is_broken:
                            if self._delete(vid, idx, why):
                                summary["deleted"].append((vid, idx))
                        elif self._delete_broken(vid, idx, why):
                            summary["deleted"].append((vid, idx))
                        continue
                if not is_broken:           # nothing to trim in a copy that did not open
                    trims.append(idx)
            await self._trim_volume(vid, vol, seqs[vid], trims, summary)
        return summary

    async def _orphan(self, vid: str, idx: int, vol: Volume,
                      is_broken: bool) -> tuple[ExtentRecord | None, bool | None]:
        """The extent's record and whether the local copy is still an orphan (``_moved``),
        from the recovery task and the record read in one txn (one revision, one round trip),
        right before the deletion: no await from here to the deletion.

        Both at one revision: a rebuild onto this server that joins (its task deleted and
        this server made in sync, in one txn) shows in one or the other, never in neither.
        A task onto this server keeps the copy: it is the target, or about to be (a CREATE
        reuses a copy that is here). Left open: a task placed after this read whose
        executor's CREATE reaches this server before the reply reaches the run (a copy
        deleted under it fails and is redone, as before; nothing is lost)."""
        t = self.etcd.transactions
        _, (task_kvs, rec_kvs) = await self.etcd.transaction(
            compare=[], success=[t.get(self.keys.recovery_task(vid, idx)),
                                 t.get(self.keys.extent(vid, idx))], failure=[])
        if task_kvs and RecoveryTask.decode(task_kvs[0][0]).target == self.chunk_id:
            return None, False
        rec = ExtentRecord.decode(rec_kvs[0][0]) if rec_kvs else None
        return rec, self._moved(vid, idx, rec, vol, is_broken)

    async def _trim_volume(self, vid: str, vol: Volume, listed: set[int], indexes: list[int],
                           summary: dict[str, Any]) -> None:
        """Trim ``indexes`` of ``vid`` to what its snapshots read, with ``snap_seq`` read again
        just before (no await from then on): the run's reads since the first one (every
        volume's extent records, tasks, moved records) take seconds on a big server, and a
        snapshot committed meanwhile is not in ``listed``. Its seq lies between the first
        ``snap_seq`` and the fresh one, so that whole range is kept, and SEQ_MARGIN from the
        fresh one up; the margin from the first alone lost the versions of a burst of more
        than SEQ_MARGIN snapshots taken during the run."""
        if not indexes:
            return
        got = await self.etcd.get(self.keys.volume(vid))
        if got is None:
            return                          # deleted meanwhile: the next run deletes its extents
        fresh = max(vol.snap_seq, Volume.decode(got.value).snap_seq)
        keep = frozenset(listed) | frozenset(range(vol.snap_seq, fresh + SEQ_MARGIN))
        for idx in indexes:
            summary["trimmed"] += self._trim(vid, idx, keep, listed)

    def _trim(self, vid: str, idx: int, keep: frozenset[int], listed: set[int]) -> int:
        """Trim one extent to ``keep`` unless nothing changed since its last trim; versions freed.
        A store failure is logged and counted, and the extent tried again next run."""
        # A resync/rebuild can import versions a peer had not trimmed yet (it ends with
        # a new generation), and so can a block repair (it does not): both count. So do
        # the replica's own COWs: after a snapshot's deletion the volume's seq stays above
        # its blocks' seqs, and the first overwrite of each block makes a version no
        # snapshot reads (replicas that trimmed them and replicas that did not would
        # differ for good, and the scrubber would drop one of them again and again).
        if not self.store.has(vid, idx):
            return 0                        # deleted (a DELETE) during the run's reads
        try:
            st = self.store.stat(vid, idx)
            memo = (keep, int(st["generation"]), int(st["imports"]), int(st["cows"]))
            if self._trimmed_with.get((vid, idx)) == memo:
                return 0
            n = self.store.trim(vid, idx, set(keep))
        except StoreError as e:
            # Its disk failing (EROFS, EIO): this extent is tried again next run, the
            # others are reclaimed now (raising stopped every run at this extent).
            self._trimmed_with.pop((vid, idx), None)
            self._failure(vid, idx, "trim", e)
            return 0
        self._trimmed_with[(vid, idx)] = memo
        if n:
            log.info("trimmed %d versions of %s/%d (snapshot seqs %s)", n, vid, idx, sorted(listed))
        self.trimmed += n
        return n

    def _moved_away(self, vid: str, idx: int, rec: ExtentRecord, vol: Volume,
                    broken: bool = False) -> bool:
        if self.chunk_id in rec.replicas or self.chunk_id in rec.stale:
            return False
        if len(rec.replicas) < vol.replicas:
            return False                      # degraded: this copy may be the last one left
        if broken:
            # A copy that did not open has no generation to compare: it goes only once the
            # extent is whole elsewhere and this server is neither in sync nor awaiting a resync.
            return True
        return rec.generation > int(self.store.stat(vid, idx)["generation"])

    def _failure(self, vid: str, idx: int, what: str, e: Exception) -> None:
        self.failed += 1
        self.last_failure = f"{what} {vid}/{idx}: {type(e).__name__}: {e}"
        log.error("reclaim: %s of local extent %s/%d failed (%s); going on with the others",
                  what, vid, idx, e)

    def _delete(self, vid: str, idx: int, why: str) -> bool:
        """Delete a local extent; a store failure is logged and counted, not raised (it must
        not stop the run for every extent after it), and the next run tries again."""
        log.warning("deleting local extent %s/%d: %s", vid, idx, why)
        try:
            self.store.delete(vid, idx)
        except StoreError as e:
            self._failure(vid, idx, "delete", e)
            return False
        self._trimmed_with.pop((vid, idx), None)
        self.deleted += 1
        return True

    def _delete_broken(self, vid: str, idx: int, why: str) -> bool:
        """Delete a copy that did not open, if it still is one (a rebuild onto this server may
        have replaced it by a fresh copy during the run's etcd reads). A failure (its disk
        dying) is logged, not raised: it must not stop the run for every extent after it."""
        if (vid, idx) not in self.store.broken or self.store.has(vid, idx):
            return False
        log.warning("deleting local extent %s/%d, which did not open (%s): %s",
                    vid, idx, self.store.broken[(vid, idx)][0], why)
        try:
            self.store.delete(vid, idx)
        except StoreError as e:
            log.error("extent %s/%d: its broken copy was not deleted: %s", vid, idx, e)
            return False
        self.deleted += 1
        return True
