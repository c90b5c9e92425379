"""The chunk server's storage engine: its replica store and server, and its coordinators.

One ``StorageEngine`` per chunk server. It owns the local ``ReplicaStore``
(served to peers on the replication port), hands the iSCSI target one
``VolumeDevice`` per (volume, read-only) through ``open`` — all backed by one
shared ``Coordinator`` per volume — and runs what is assigned to this server
in etcd: volume operations (snapshot barriers, reverts) and recovery tasks.
Background upkeep (scrubbing, reclaiming) also hangs off it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from urllib.parse import unquote
from pathlib import Path
from typing import Any

from chunk.blockdev import ReadOnlyError
from zstore import etcd as zetcd
from zstore.keys import Keys
from zstore.records import (RECOVERY_SLOTS, ClusterInfo, ExtentRecord, RecordError, RecoveryTask,
                             Volume, VolumeOp)

from . import replicas as rk
from .coordinator import Coordinator, NotServing, ServerStopping
from .host_crash import BootState
from .metaclient import MetaClient, MetaError
from .owner_reads import OwnerReads
from .peer_auth import load_or_create_secret
from .peers import Peers
from .reclaim import Reclaimer
from .repair import LocalRepair
from .replica_client import REVERT_TIMEOUT, ReplicaClient
from .replica_server import ReplicaServer
from .replica_store import ReplicaStore, StoreError
from .scrubber import Scrubber

log = logging.getLogger(__name__)


class VolumeDevice:
    """What the SCSI layer sees: a BlockDevice over the volume's shared coordinator."""

    def __init__(self, engine: "StorageEngine", coord: Coordinator, readonly: bool) -> None:
        self._engine, self._coord = engine, coord
        self.block_size = coord.block_size
        self.thin = coord.thin
        self.readonly = readonly or coord.readonly
        self._closed = False

    @property
    def size(self) -> int:
        return self._coord.size

    def resize(self, size: int) -> None:
        self._coord.resize(size)

    async def read(self, offset: int, length: int):
        return await self._coord.read(offset, length)

    async def write(self, offset: int, data, fua: bool = False) -> None:
        if self.readonly:
            raise ReadOnlyError("read-only")
        await self._coord.write(offset, data, fua)

    async def compare_and_write(self, offset: int, expected, new, fua: bool = False) -> None:
        """COMPARE AND WRITE under the volume's ownership epoch, atomic across chunk servers
        (``Coordinator.compare_and_write``); ``MiscompareError`` when the data differs."""
        if self.readonly:
            raise ReadOnlyError("read-only")
        await self._coord.compare_and_write(offset, expected, new, fua)

    def write_nowait(self, offset: int, data):
        """The coordinator's write fast path (no FUA): a future, or None to use ``write``."""
        return None if self.readonly else self._coord.write_nowait(offset, data)

    async def flush(self) -> None:
        if not self.readonly:
            await self._coord.flush()

    async def unmap(self, offset: int, length: int) -> None:
        if self.readonly:
            raise ReadOnlyError("read-only")
        await self._coord.unmap(offset, length)

    async def write_zeroes(self, offset: int, length: int) -> None:
        if self.readonly:
            raise ReadOnlyError("read-only")
        await self._coord.write_zeroes(offset, length)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._engine._release_soon(self._coord)


class StorageEngine:
    lease = None        # the server's Registration (lease_deadline, lease_gen); None: no gate
    def __init__(self, etcd, keys: Keys, chunk_id: str, disks: list[tuple[str | Path, int | None]], *,
                 failed_disks: dict[str | Path, str] | None = None,
                 listen: tuple[str, int], token: str | None, meta_ca: str | None = None,
                 replica_timeout: float = 5.0, revert_timeout: float = REVERT_TIMEOUT,
                 min_write_replicas: int = 1, recovery_rate: float = 64 << 20, scrub_rate: float = 16 << 20,
                 scrub_interval: float = 3600.0, reclaim_interval: float = 30.0,
                 boot_state: BootState | None = None) -> None:
        self.etcd, self.keys, self.chunk_id = etcd, keys, chunk_id
        self.owner_reads = OwnerReads(etcd, keys)     # SYNCHRONIZE CACHE's owner checks
        self.store = ReplicaStore(disks, failed=failed_disks)     # failed: never opened
        # Host crash detection (host_crash.py): recorded before anything can write here.
        self.boot_state = boot_state
        self._broken_at_start = set(self.store.broken)
        self.suspect: set[tuple[str, int]] = set()
        if boot_state is not None:
            disks = self.store._disks                                   # noqa: SLF001
            self.suspect = boot_state.begin(
                self.store.extents(), unscanned=[str(d.path) for d in disks if not d.scanned],
                by_disk={str(d.path): set(d.replicas) for d in disks if d.scanned})
            if boot_state.host_crash:
                log.error("the host crashed since this chunk server last ran (boot id changed, no "
                          "clean stop): writes not flushed may be lost, so its %d extent "
                          "replica(s) are dropped and resynced before it serves them",
                          len(self.suspect))
            elif self.suspect:
                log.warning("%d extent replica(s) still suspect since a host crash", len(self.suspect))
        self.listen = listen
        self.meta = MetaClient(etcd, keys, token, ca_file=meta_ca)
        self.peers = Peers(etcd, keys)
        self.replica_timeout, self.revert_timeout = replica_timeout, revert_timeout
        self.min_write_replicas = min_write_replicas
        self.recovery_rate = recovery_rate
        self.scrub_rate, self.scrub_interval = scrub_rate, scrub_interval
        self.reclaim_interval = reclaim_interval
        self.client: ReplicaClient | None = None
        # ``stop`` closed the replica client: a request it fails from then on was never sent
        # (``unsent``) or was cut off in flight; the coordinator tells the stop apart only
        # in how it answers a request that reached no replica (``ServerStopping``).
        self.replicas_closed = False
        self.server: ReplicaServer | None = None
        self.repair: LocalRepair | None = None
        self.scrubber: Scrubber | None = None
        self.reclaimer: Reclaimer | None = None
        self._local: rk.LocalReplica | None = None
        self._remote: dict[str, rk.RemoteReplica] = {}
        self.replicas_version = 0          # bumped when a replica handle appears or is forgotten
        self._retired: dict[str, int] = {}   # counters of coordinators closed since start
        self._coords: dict[tuple[str, int], Coordinator] = {}
        self._tasks: list[asyncio.Task] = []
        self._releasing: set[asyncio.Task] = set()   # coordinators released by a closed device
        self._running: dict[str, asyncio.Task] = {}          # op/task key -> task
        self._rerun: dict[str, Any] = {}                     # key -> start again when it ends
        self._recovery_slots = asyncio.Semaphore(RECOVERY_SLOTS)   # the meta counts on it
        self._stop = asyncio.Event()
        self.started = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------

    async def run_start(self, stop: asyncio.Event, retry: float = 1.0) -> None:
        """``start``, retried until etcd answers: a chunk server may come up before etcd, and
        its registration must not wait for the engine. I/O waits on ``started``."""
        warned = False
        while not stop.is_set():
            try:
                await self.start(stop)
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - etcd not there yet, port busy...
                if not warned:
                    log.warning("storage engine cannot start yet (%s); retrying", e)
                    warned = True
                try:
                    await asyncio.wait_for(stop.wait(), retry)
                except asyncio.TimeoutError:
                    pass

    async def start(self, stop: asyncio.Event) -> None:
        """Start serving replicas and following assignments; returns once the port listens."""
        secret = await load_or_create_secret(self.etcd, self.keys)
        cluster_id = await self._cluster_id(stop)
        if self.suspect:
            # Before the replication port listens and local I/O starts (``started``): a
            # suspect replica must not serve as in sync beside a peer that has what it lost.
            await self._settle_suspects()
        self.client = ReplicaClient(secret, cluster_id, self.chunk_id, timeout=self.replica_timeout,
                                    revert_timeout=self.revert_timeout)
        self.repair = LocalRepair(self.store, self.client, self.peers, self.keys, self.etcd, self.chunk_id)
        self._local = rk.LocalReplica(self.chunk_id, self.store, on_checksum_error=self.repair.schedule)
        self.server = ReplicaServer(self.store, secret, cluster_id, self.listen[0], self.listen[1],
                                    on_checksum_error=self.repair.schedule)
        await self.server.start()
        self.scrubber = Scrubber(self.store, self.repair, rate_bytes_per_s=self.scrub_rate,
                                 interval=self.scrub_interval, drop=self._drop_replica)
        self.reclaimer = Reclaimer(self.store, self.etcd, self.keys, self.chunk_id,
                                   interval=self.reclaim_interval)
        for worker in (self.repair, self.scrubber, self.reclaimer):
            worker.start()
        for coro in (self._follow(self.keys.all_volops(), self._on_volop),
                     self._follow(self.keys.all_recovery(), self._on_recovery)):
            self._tasks.append(asyncio.ensure_future(coro))
        if self.suspect or self.boot_state is not None and self.boot_state.unsaved:
            self._tasks.append(asyncio.ensure_future(self._settle_later()))
        self.started.set()
        log.info("storage engine: %d extent(s) on %d disk(s); replication port %s:%d",
                 len(self.store.extents()), len(self.store.usage()), self.listen[0], self.server.port)

    async def _cluster_id(self, stop: asyncio.Event) -> str:
        """The cluster id (peers prove it in the handshake); created here if no meta has yet.

        The record is write-once, put-if-absent, exactly as the meta does it, so
        whoever comes first defines it and everybody reads the same value.
        """
        key = self.keys.cluster()
        t = self.etcd.transactions
        fresh = ClusterInfo(cluster_id=uuid.uuid4().hex)
        await self.etcd.transaction(compare=[t.version(key) == 0], success=[t.put(key, fresh.encode())],
                                    failure=[])
        got = await self.etcd.get(key)
        return ClusterInfo.decode(got.value).cluster_id

    async def stop(self) -> None:
        self._stop.set()
        for t in [*self._tasks, *self._running.values()]:
            t.cancel()
        await asyncio.gather(*self._tasks, *self._running.values(), return_exceptions=True)
        for worker in (self.scrubber, self.reclaimer, self.repair):
            if worker is not None:
                await worker.stop()
        # Every coordinator closes (each drains its writes in flight, bounded, then releases
        # ownership) before the replica client does: a write still waiting for a reply would
        # fail "client closed" and its handling drop a healthy peer. All at once: a stop
        # waits for the slowest drain, not their sum. Releases under way (an LU unmapped
        # just before) are waited for, not cancelled: their volume is no longer in
        # ``_coords``, and cut short its writes would outlive the client.
        await asyncio.gather(*(c.close() for c in list(self._coords.values())),
                             *self._releasing, return_exceptions=True)
        self._coords.clear()
        if self.server is not None:
            await self.server.stop()
        if self.client is not None:
            self.replicas_closed = True
            await self.client.close()
        await self.meta.close()
        if self.boot_state is not None and await asyncio.to_thread(self._flush_all):
            try:
                self.boot_state.write(self.suspect, clean=True)
            except OSError as e:
                log.error("cannot record the clean stop: %s", e)
        self.store.close()

    def _flush_all(self) -> bool:
        """fdatasync every extent replica (nothing writes any more): True if all of them
        are on disk, which makes this a clean stop (a reboot then loses nothing)."""
        ok = True
        for vid, idx in self.store.extents():
            try:
                self.store.flush(vid, idx)
            except (StoreError, OSError) as e:
                ok = False
                log.error("extent %s/%d: flush at stop failed: %s", vid, idx, e)
        if set(self.store.broken) - self._broken_at_start:
            ok = False                     # a replica whose flush failed while running
        if not ok:
            log.error("not a clean stop: a reboot before the next start counts as a host crash")
        return ok

    # -- host crash: suspect replicas (host_crash.py) ------------------------------

    async def _settle_suspects(self) -> None:
        """Drop this replica from each suspect extent beside an in-sync replica on an up
        chunk server (the meta bumps the generation; recovery resyncs it here). Settled
        too: an extent gone, one that no longer lists this replica, and one listing only
        it (the only copy there is). Left suspect: an extent whose other in-sync replicas
        are all on servers that are down (one may come back with writes this one lost;
        past the grace the meta drops them and this one is the copy)."""
        settled: list[tuple[str, int]] = []
        up: dict[str, bool] = {}
        for vid, idx in sorted(self.suspect):
            for _ in range(3):                  # a record changing under the drop: read again
                got = await self.etcd.get(self.keys.extent(vid, idx))
                rec = ExtentRecord.decode(got.value) if got is not None else None
                if rec is None or self.chunk_id not in rec.replicas or rec.replicas == [self.chunk_id]:
                    settled.append((vid, idx))
                    break
                live = False
                for c in rec.replicas:
                    if c != self.chunk_id and c not in up:
                        up[c] = await self.etcd.get(self.keys.chunk_live(c)) is not None
                    live = live or (c != self.chunk_id and up[c])
                if not live:
                    break
                try:
                    await self.meta.call("POST", f"/extents/{vid}/{idx}/drop", {
                        "chunk_id": self.chunk_id, "generation": rec.generation,
                        "reason": "its host crashed: writes not flushed may be lost"})
                except MetaError as e:
                    if e.status != 409:
                        raise
        if settled or self.boot_state.unsaved:
            self.suspect -= set(settled)
            # Failing (ENOSPC): kept in memory, written again at the next round or stop.
            self.boot_state.save(self.suspect, clean=False)
        if self.suspect:
            log.warning("%d suspect extent replica(s) wait for an in-sync peer's server to be up",
                        len(self.suspect))

    async def _settle_later(self, period: float = 5.0) -> None:
        while self.suspect or self.boot_state.unsaved:
            try:
                await asyncio.wait_for(self._stop.wait(), period)
                return
            except asyncio.TimeoutError:
                pass
            try:
                await self._settle_suspects()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - meta or etcd away: next round
                log.warning("suspect extent replicas: %s", e)

    # -- replicas and coordinators -----------------------------------------------

    async def replica(self, chunk_id: str):
        if chunk_id == self.chunk_id:
            assert self._local is not None
            return self._local
        r = self._remote.get(chunk_id)
        if r is None:
            addr = await self.peers.address(chunk_id)
            r = self._remote[chunk_id] = rk.RemoteReplica(chunk_id, addr, self.client)
            self.replicas_version += 1
        return r

    async def chunk_ids(self) -> list[str]:
        """Every chunk server registered in the cluster (live or not)."""
        base = self.keys.chunks()
        out = set()
        for kv in await self.etcd.get_prefix(base):
            kp = self.keys.chunk_key_parts(kv.key, base)
            if kp and kp[1] == "info":
                out.add(unquote(kp[0]))
        return sorted(out)

    def local_store_for(self, rec):
        """This server's store if it holds an in-sync replica of ``rec`` (reads go there)."""
        return self.store if self._local is not None and self.chunk_id in rec.replicas else None

    def cached_replica(self, chunk_id: str):
        """The replica handle without an await, or None (hot path: one per I/O)."""
        return self._local if chunk_id == self.chunk_id else self._remote.get(chunk_id)

    def cached_replicas(self, chunk_ids: list[str]):
        out = []
        for c in chunk_ids:
            r = self._local if c == self.chunk_id else self._remote.get(c)
            if r is None:
                return None
            out.append(r)
        return out

    def forget_peer(self, chunk_id: str) -> None:
        self._remote.pop(chunk_id, None)
        self.replicas_version += 1
        self.peers.forget(chunk_id)

    def open(self, volume: Volume, readonly: bool, view_seq: int = 0) -> VolumeDevice:
        """The opener the iSCSI target (and TCMU) calls: synchronous; I/O waits for readiness.

        ``view_seq`` > 0 opens the volume as of that snapshot seq, read-only (a snapshot
        exported as a LUN)."""
        key = (volume.volume_id, view_seq)
        coord = self._coords.get(key)
        if coord is None:
            coord = self._coords[key] = Coordinator(self, volume, view_seq=view_seq)
        coord.refs += 1
        return VolumeDevice(self, coord, readonly or bool(view_seq))

    async def coordinator(self, vid: str) -> Coordinator:
        """A referenced coordinator for ``vid`` (fresh volume record); ``release`` it after."""
        coord = self._coords.get((vid, 0))
        if coord is None:
            got = await self.etcd.get(self.keys.volume(vid))
            if got is None:
                raise LookupError(f"volume {vid} does not exist")
            coord = self._coords.get((vid, 0))
            if coord is None:
                coord = self._coords[(vid, 0)] = Coordinator(self, Volume.decode(got.value))
        coord.refs += 1
        return coord

    async def view(self, vid: str, seq: int) -> Coordinator:
        """A read-only coordinator of volume ``vid`` as of snapshot seq ``seq`` (clone parents)."""
        key = (vid, seq)
        coord = self._coords.get(key)
        if coord is None:
            got = await self.etcd.get(self.keys.volume(vid))
            if got is None:
                raise LookupError(f"volume {vid} (a clone's parent) does not exist")
            coord = self._coords.get(key)
            if coord is None:
                coord = self._coords[key] = Coordinator(self, Volume.decode(got.value), view_seq=seq)
        coord.refs += 1
        return coord

    async def release(self, coord: Coordinator) -> None:
        coord.refs -= 1
        if coord.refs <= 0:
            key = (coord.vid, coord.view_seq)
            if self._coords.get(key) is coord:
                del self._coords[key]
            for name, n in coord.counters.items():     # `chunk list` counts since start
                self._retired[name] = self._retired.get(name, 0) + n
            await coord.close()

    def _release_soon(self, coord: Coordinator) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            coord.refs -= 1
            return
        t = asyncio.ensure_future(self.release(coord))
        self._releasing.add(t)                  # ``stop`` waits for it (never cancels it)
        t.add_done_callback(self._releasing.discard)

    # -- assignments: volume operations and recovery tasks ------------------------

    async def _follow(self, prefix: bytes, handler) -> None:
        async def on_snapshot(kvs):
            for key, value in kvs:
                await handler(key, value)

        async def on_event(ev):
            if ev.kind == "PUT":
                await handler(ev.kv.key, ev.kv.value)

        await zetcd.watch_prefix(self.etcd, prefix, on_snapshot, on_event, self._stop)

    def _spawn(self, key: str, start) -> None:
        """Run ``start()`` as the one task for ``key``. An assignment arriving while it runs
        starts it once more after it ends: the running one may have read the record just
        before the meta handed it back here, and would otherwise end with nobody on it."""
        if key in self._running:
            self._rerun[key] = start
            return
        t = asyncio.ensure_future(start())
        self._running[key] = t

        def ended(_t) -> None:
            self._running.pop(key, None)
            again = self._rerun.pop(key, None)
            if again is not None and not self._stop.is_set():
                self._spawn(key, again)
        t.add_done_callback(ended)

    async def _on_volop(self, key: bytes, value: bytes) -> None:
        op = _decoded(VolumeOp, key, value, "volume op")
        # "running" here too: this server claimed it before a restart (it claims it again).
        if op is None or op.executor != self.chunk_id or op.state not in ("pending", "running"):
            return
        self._spawn(f"op/{op.op_id}", lambda: self._run_volop(op))

    async def _run_volop(self, op: VolumeOp) -> None:
        """Run the op; tried again, with backoff, while it fails NotServing and its record
        still assigns it here (pending or running). NotServing comes before the op is
        claimed (etcd out of reach for the owner read or ownership, the volume not open in
        time), or after it ran, when etcd kept refusing its outcome write: the op is left
        assigned here, and nothing else starts it again (the meta moves an op only off an
        executor that is not live); it ended the task, the op pending until the next
        restart. A try after the op ran only writes its outcome: the coordinator, kept
        across the tries, remembers it ran under that claim (``Coordinator._ran_ops``) and
        never runs it again. Not once the server stops (ServerStopping)."""
        key = self.keys.volop(op.volume_id, op.op_id)
        backoff = 1.0
        coord = None
        try:
            while True:
                # One coordinator across the tries: released in between, an unmapped volume's
                # closed, and the next try's new one took a new epoch (a claim that landed
                # with its reply lost then failed the op "interrupted", never run) and read
                # the volume record from etcd again, unguarded (review of a0a8d9a).
                if coord is None:
                    try:
                        coord = await self.coordinator(op.volume_id)
                    except LookupError as e:
                        log.warning("volume op %s: %s", op.op_id, e)
                        return
                    except (*zetcd.UNAVAILABLE_ERRORS, ConnectionError, OSError) as e:
                        log.warning("volume op %s (%s of %s): cannot open the volume (%s); "
                                    "trying again in %.0fs", op.op_id, op.kind, op.volume_id, e,
                                    backoff)
                if coord is not None:
                    try:
                        await coord.run_volop(op)
                        return
                    except ServerStopping:
                        raise
                    except NotServing as e:
                        log.warning("volume op %s (%s of %s): %s; trying again in %.0fs",
                                    op.op_id, op.kind, op.volume_id, e, backoff)
                try:
                    await asyncio.wait_for(self._stop.wait(), backoff)
                    return
                except asyncio.TimeoutError:
                    pass
                backoff = min(backoff * 2, 15.0)
                try:
                    got = await self.etcd.get(key)
                except (*zetcd.UNAVAILABLE_ERRORS, ConnectionError, OSError) as e:
                    log.warning("volume op %s: cannot read it in etcd (%s); trying again",
                                op.op_id, e)
                    continue
                cur = (_decoded(VolumeOp, key, got.value, "volume op") if got is not None
                       else None)
                if (cur is None or cur.executor != self.chunk_id
                        or cur.state not in ("pending", "running")):
                    return                      # finished, moved or gone meanwhile
                op = cur
        finally:
            if coord is not None:
                await self.release(coord)

    async def _on_recovery(self, key: bytes, value: bytes) -> None:
        task = _decoded(RecoveryTask, key, value, "recovery task")
        if task is None or task.executor != self.chunk_id:
            return
        self._spawn(f"recovery/{task.volume_id}/{task.index}", lambda: self._run_recovery(task))

    async def _run_recovery(self, task: RecoveryTask) -> None:
        """Run the task while it stays assigned to us, retrying with backoff: a target can be
        unreachable for a while (killed, its lease not yet expired, restarting), and nothing
        else re-triggers a task that failed here (the meta only re-plans failing rebuilds).

        Any error of an attempt is retried, not only the copy's: one outside it (the task's
        read or claim, the coordinator's volume read, the failure's record; an etcd "leader
        changed" or Unavailable) would otherwise end the runner with the task left pending or
        running and no error on it, which nothing re-plans or starts again."""
        key = self.keys.recovery_task(task.volume_id, task.index)
        backoff = 1.0
        while not self._stop.is_set():
            try:
                async with self._recovery_slots:
                    outcome = await self._recovery_attempt(key)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - etcd mostly; the task is read again
                log.warning("recovery task of %s extent %d: attempt failed (%s: %s); retrying "
                            "in %.0fs", task.volume_id, task.index, type(e).__name__, e, backoff)
                outcome = False
            if outcome is not False:
                return                               # done, or no longer ours / gone
            try:
                await asyncio.wait_for(self._stop.wait(), backoff)
            except asyncio.TimeoutError:
                pass
            backoff = min(backoff * 2, 15.0)

    async def _recovery_attempt(self, key: bytes) -> bool | None:
        """True: copied and joined. None: nothing to do (gone, reassigned). False: failed."""
        got = await self.etcd.get(key)
        if got is None:
            return None
        created = got.create_revision           # this task, not one re-created at the same key
        task = RecoveryTask.decode(got.value)
        if task.executor != self.chunk_id:
            return None
        # Each attempt copies the extent from its beginning: its progress starts at 0.
        task.state, task.error, task.done_bytes = "running", None, 0
        rev = await self._put_task(key, task, got.mod_revision)
        if rev is None:
            return False                             # changed under us: read it again
        try:
            coord = await self.coordinator(task.volume_id)
        except LookupError:
            return None
        try:
            await coord.run_recovery(task, rev, self.recovery_rate)
            return True
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - recorded on the task for the status; retried
            log.error("recovery of %s extent %d to %s failed: %s", task.volume_id, task.index,
                      task.target, e)
            # A few tries: the meta leader writes the task too (its idle note), and a note
            # landing between this read and the write lost the attempt's error (never counted
            # by the leader's failure count, never shown). A task re-planned meanwhile (onto
            # another executor, or deleted and planned again, maybe here) is not ours to write.
            for _ in range(3):
                got = await self.etcd.get(key)
                if got is None or got.create_revision != created:
                    break
                cur = RecoveryTask.decode(got.value)
                if cur.executor != self.chunk_id:
                    break
                # Nothing of the failed attempt carries over to the next (it copies from the
                # beginning): a pending task shows no bytes done.
                cur.state, cur.error, cur.done_bytes = "pending", str(e)[:300], 0
                if await self._put_task(key, cur, got.mod_revision) is not None:
                    break
            else:
                log.warning("recovery of %s extent %d: its error not recorded (the task kept "
                            "changing under 3 attempts)", task.volume_id, task.index)
            return False
        finally:
            await self.release(coord)

    async def _put_task(self, key: bytes, task: RecoveryTask, rev: int) -> int | None:
        """Write the task if it is still at ``rev``; the revision of our write, or None.

        The revision is read inside the transaction: a ``get`` after it could see the meta's
        reassignment instead of our write, and the next put compared against that would
        overwrite the reassignment with this server as the executor."""
        t = self.etcd.transactions
        ok, responses = await self.etcd.transaction(compare=[t.mod(key) == rev],
                                                    success=[t.put(key, task.encode()), t.get(key)],
                                                    failure=[])
        if not ok:
            return None
        return responses[1][0][1].mod_revision        # the get's [(value, metadata)]

    async def report_progress(self, task: RecoveryTask, rev: int, done: int, total: int) -> int:
        """Write copy progress to the task (for `zstore cluster status`); the new mod revision."""
        key = self.keys.recovery_task(task.volume_id, task.index)
        task.done_bytes, task.total_bytes = done, total
        new = await self._put_task(key, task, rev)
        if new is None:
            got = await self.etcd.get(key)
            if got is None:
                raise RuntimeError("recovery task deleted")
            cur = RecoveryTask.decode(got.value)
            if cur.executor != self.chunk_id:
                raise RuntimeError(f"task reassigned to {cur.executor}")
            cur.done_bytes, cur.total_bytes, cur.state = done, total, "running"
            new = await self._put_task(key, cur, got.mod_revision) or got.mod_revision
        return new

    async def _drop_replica(self, vid: str, idx: int, chunk_id: str, generation: int, reason: str) -> None:
        """Drop a replica from an extent through the meta leader (the scrubber's repair)."""
        await self.meta.call("POST", f"/extents/{vid}/{idx}/drop",
                             {"chunk_id": chunk_id, "generation": generation, "reason": reason[:200]})

    def _coordinator_total(self, name: str) -> int:
        """A coordinator counter summed over the open ones and those closed since start."""
        return self._retired.get(name, 0) + sum(c.counters[name] for c in self._coords.values())

    def status(self) -> dict[str, Any]:
        """Counters an admin sees in `zstore chunk list/show` (published with the live record)."""
        rep = self.repair.status() if self.repair else {}
        scrub = self.scrubber.status() if self.scrubber else {}
        reads = self._coordinator_total("checksum_errors")
        return {
            "extents": len(self.store.extents()), "open_volumes": len(self._coords),
            "allocated": sum(self.store.stat(*k)["allocated"] for k in self.store.extents()),  # ours
            "checksum_errors": max(rep.get("checksum_errors", 0), reads),
            "repaired": rep.get("repaired", 0), "repair_failed": rep.get("repair_failed", 0),
            "scrub_passes": scrub.get("passes", 0), "scrubbed_bytes": scrub.get("bytes_scrubbed", 0),
            "scrub_mismatches": scrub.get("mismatches", 0),
            "scrub_resyncs": scrub.get("resyncs_requested", 0),
            # bad blocks the scrubber found (handed to repair), and blocks it could not read at
            # all (a snapshot version on a failing sector: repair cannot take them)
            "scrub_errors": scrub.get("errors", 0), "scrub_unreadable": scrub.get("unreadable", 0),
            # replicas left disagreeing in metadata no checksum covers (a 1:1 tie): an operator's call
            "scrub_unresolved": scrub.get("unresolved", 0),
            # reports (a mismatch, an unresolved tie) of copies retired here by a failed flush:
            # moved to the scrubber's status()["retired"] (the last 64) and its error log
            "scrub_retired": scrub.get("retired_reports", 0),
            "replica_drops": self._coordinator_total("drops"),
            # writes that took the coordinator's fast path, and those of them handed to the
            # general path because a replica failed or was fenced
            "fast_writes": self._coordinator_total("fast_writes"),
            "fast_write_handoffs": self._coordinator_total("fast_write_handoffs"),
            "recovering": sorted(k for k in self._running if k.startswith("recovery/")),
        }


def _decoded(cls, key: bytes, value: bytes, what: str):
    """The record a watched key holds, or None (logged) when it cannot be read."""
    try:
        return cls.decode(value)
    except RecordError as e:
        log.error("ignoring unreadable %s %s: %s", what, key.decode(), e)
        return None
