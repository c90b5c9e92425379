"""Local repair: replace a block that failed its checksum with an in-sync peer's copy.

A replica that finds a bad block (a read by the replica server, or the
scrubber) does not wait for the coordinator: it fetches that block's state
from another in-sync replica (EXPORT, epoch 0: read-only) and mends only what
fails here (``ReplicaStore.mend``), never the whole block state: the rot may
be in a snapshot version while the live block holds a write the peer has not
received yet, and installing the peer's copy would undo it. The coordinator
stays the only writer, so the mend is also conditional: it carries the
extent's mutation counter taken at the same instant the block was found still
bad, and any write that lands afterwards makes it a CONFLICT (checked again)
instead of racing the peer's possibly older copy.

The checks read the disk, which is failing when repair runs (a read can take
seconds), so they run in a worker thread (``verify_verdict_async``), never on
the event loop that serves every volume. The invariant holds as follows: the
counter is read on the loop before the worker's reads and compared, back on
the loop with no await in between, after them; unchanged, nothing that
changes a live block or adds a version landed while the worker read, so its
verdict is the state at that instant and the counter is its token (moved: the
verdict may mix two states, and is taken again). The mend is given the
verdict (``verified``) and checks the token against the counter before it
changes anything, again with no await: it trusts the worker's reads instead of
reading on the loop, and a write landing anywhere between the verdict and the
mend makes it a CONFLICT as before.

The mend (``ReplicaStore.mend_async``) keeps a write's durable order: it holds
its block as a deferred write does (``_Hold``), so it waits for one in
progress there, whose snapshot copy may not be synced yet (a mended live block
written back first would outlive that copy on a power loss), and checks the
token only then; its versions are synced before the live block, and its syncs
run in worker threads, like the flush that follows it. An IMPORT, trim or
revert does not wait for the hold: one that changes the block during a sync
of the mend makes it stop there (False), and the block is verified again. A
mend whose peer has no good copy of something that fails here (unreadable
there too, as an import's filler is, or missing) answers ``Unmended``, not
True: what it could replace is synced and verified, and the next peer tried.

A block with too many versions for one export frame comes in parts
(``ReplicaStore.export``: each part the live block and a slice of the
versions, the next part's offset inside the block). The repair fetches every
part and mends once from their union (``fetch_block``), not part by part:
one ``if_unchanged`` token then covers the whole fetch (a write landing
between two parts is a CONFLICT, not half a mend), and ``mend`` decides once,
seeing every version, whether the live block fails and which versions to add
with the peer's live block (after a first part had mended the live block, the
later parts would no longer add the versions it needs). The parts must agree
(same live block, each continuing where the one before ended), or the peer's
block changed while it was fetched and the attempt is retried; a peer that
sends more than ``max_parts`` parts fails the attempt.

Repairs are queued (deduplicated, bounded: a disk that rots everywhere must
not make this server hoard work) and run one at a time in the background.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgpack

from zstore.keys import Keys
from zstore.records import ExtentRecord

from .extent_file import BLOCK_SIZE
from .peers import Address, Peers, UnknownPeer
from .replica_client import PeerUnavailable, ReplicaError
from .replica_store import (
    _BLOB_FORMAT_UNREADABLE, BadBlob, StoreError, Unmended, Verdict, _parse_blob,
)

log = logging.getLogger(__name__)

BlockKey = tuple[str, int, int]          # (volume id, extent index, block index)

# Parts of one block's export before the peer is given up on: a part holds ~189 versions
# (the server's 768 KiB exports), so 64 parts are ~12000 versions, ~48 MiB held at once.
MAX_PARTS = 64


class PartsMismatch(Exception):
    """A block's export parts do not make one state (the peer changed it, or misbehaves)."""


class LocalRepair:
    def __init__(self, store, client, peers: Peers, keys: Keys, etcd, chunk_id: str, *,
                 max_queue: int = 4096, retries: int = 4, retry_delay: float = 0.05,
                 max_parts: int = MAX_PARTS) -> None:
        self.store = store
        self.client = client
        self.peers = peers
        self.keys = keys
        self.etcd = etcd
        self.chunk_id = chunk_id
        self.retries = retries
        self.retry_delay = retry_delay
        self.max_parts = max_parts
        self.checksum_errors = 0     # distinct bad blocks reported (scheduled)
        self.repaired = 0
        self.repair_failed = 0
        self.dropped = 0             # reports refused because the queue was full
        self._queue: asyncio.Queue[BlockKey] = asyncio.Queue(max_queue)
        self._pending: set[BlockKey] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task | None = None

    # -- queue -----------------------------------------------------------------

    def schedule(self, vid: str, idx: int, block: int) -> bool:
        """Queue a repair of one block; False when already queued or the queue is full."""
        key = (vid, int(idx), int(block))
        if key in self._pending:
            return False
        try:
            self._queue.put_nowait(key)
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("repair queue full: %s/%d block %d not queued (the scrubber finds it again)",
                        vid, idx, block)
            return False
        self._pending.add(key)
        self._idle.clear()
        self.checksum_errors += 1
        log.warning("checksum error in %s/%d block %d: repair queued", vid, idx, block)
        return True

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="local-repair")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every queued repair has finished; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def status(self) -> dict[str, Any]:
        return {"checksum_errors": self.checksum_errors, "repaired": self.repaired,
                "repair_failed": self.repair_failed, "dropped": self.dropped,
                "queued": len(self._pending)}

    async def _run(self) -> None:
        while True:
            key = await self._queue.get()
            try:
                ok = await self.repair_block(*key)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - one bad repair must not stop the worker
                log.exception("repair of %s/%d block %d crashed", *key)
                ok = False
            finally:
                self._pending.discard(key)
                if not self._pending:
                    self._idle.set()
            if ok:
                self.repaired += 1
            else:
                self.repair_failed += 1

    # -- one repair ------------------------------------------------------------

    async def extent_peers(self, vid: str, idx: int) -> tuple[ExtentRecord | None, list[tuple[str, Address]]]:
        """The extent record and (chunk id, address) of its in-sync replicas other than this one.

        Read fresh from etcd: a cached replica set could name a replica that
        was dropped because it missed writes, and copying from it would
        install old data.
        """
        got = await self.etcd.get(self.keys.extent(vid, idx))
        if got is None:
            return None, []
        rec = ExtentRecord.decode(got.value)
        out = []
        for cid in rec.replicas:
            if cid == self.chunk_id:
                continue
            try:
                out.append((cid, await self.peers.address(cid)))
            except UnknownPeer as e:
                log.warning("%s/%d: %s", vid, idx, e)
        return rec, out

    async def in_sync_peers(self, vid: str, idx: int) -> list[tuple[str, Address]]:
        return (await self.extent_peers(vid, idx))[1]

    async def _verdict(self, vid: str, idx: int, block: int) -> Verdict | None:
        """``block`` verified, with its token (see the module docstring): in a worker thread,
        and if the extent changed during those reads (written anywhere: the token covers the
        whole extent), once more on the loop, where nothing lands meanwhile, so that a busy
        extent is repaired as before (a read of one block; it stalls the loop as every repair
        did before the worker). None when the extent is gone."""
        if not self.store.has(vid, idx):
            return None
        verdict = await self.store.verify_verdict_async(vid, idx, block, 1)
        if verdict is None and self.store.has(vid, idx):
            verdict = self.store.verify_verdict(vid, idx, block, 1)
        return verdict

    async def _still_bad(self, vid: str, idx: int, block: int, when: str) -> Verdict | bool:
        """``block`` verified (``_verdict``), the one verdict check of a repair: the verdict when
        the block still fails (its token for the mend), else how the repair ends: False when
        the extent is gone (logged, ``when``), True when the block verifies."""
        verdict = await self._verdict(vid, idx, block)
        if verdict is None:
            log.info("repair %s/%d block %d: extent gone %s", vid, idx, block, when)
            return False
        return verdict if block in verdict.bad else True

    async def _durable(self, vid: str, idx: int, block: int) -> bool:
        """Sync the mend (``flush_async``: in a worker thread) before it counts: left in the
        page cache, a power loss would bring the rotten bytes back from the disk. A failed
        sync retires the replica (a coordinator resyncs it in full): the repair failed."""
        try:
            await self.store.flush_async(vid, idx)
        except StoreError as e:
            log.error("repair %s/%d block %d: the mend did not sync: %s", vid, idx, block, e)
            return False
        return True

    async def fetch_block(self, addr: Address, vid: str, idx: int, block: int) -> bytes:
        """The peer's state of ``block`` as one blob for ``mend``, however many parts
        its EXPORT ships it in (see the module docstring).

        Raises ``PartsMismatch`` when the parts do not make one state or do not end
        within ``max_parts``, ``BadBlob`` when a part is malformed. A blob in one part is
        not checked here: ``mend`` checks it (``BadBlob``: malformed, or not this block's
        range), and the repair then goes on to the next peer, as for a failed export.
        """
        start, end = block * BLOCK_SIZE, (block + 1) * BLOCK_SIZE
        blob, pos = await self.client.export(addr, vid, idx, start, BLOCK_SIZE)
        if pos is None or pos >= end:
            return blob                                  # one part: the whole block
        if pos <= start:
            raise PartsMismatch(f"export of block {block} goes on at {pos}")
        parts = [_parse_blob(blob)]
        while pos is not None and pos < end:
            if len(parts) >= self.max_parts:
                raise PartsMismatch(f"more than {self.max_parts} export parts")
            blob, nxt = await self.client.export(addr, vid, idx, pos, end - pos)
            parts.append(_parse_blob(blob))
            if nxt is not None and nxt <= pos:
                raise PartsMismatch(f"export part at {pos} goes on at {nxt}")
            pos = nxt
        return _join_parts(parts, start, end)

    async def repair_block(self, vid: str, idx: int, block: int) -> bool:
        """Make ``block`` verify again from a peer's copy; True when it does."""
        for attempt in range(self.retries):
            if attempt:
                await asyncio.sleep(self.retry_delay * attempt)
            try:
                peers = await self.in_sync_peers(vid, idx)
            except Exception as e:  # noqa: BLE001 - etcd down: retry, then give up
                log.warning("repair %s/%d block %d: extent record unreadable: %s", vid, idx, block, e)
                continue
            if not self.store.has(vid, idx):
                log.info("repair %s/%d block %d: extent deleted meanwhile", vid, idx, block)
                return False
            # The verdict is its own token (see the module docstring).
            verdict = await self._still_bad(vid, idx, block, "during its verify")
            if not isinstance(verdict, Verdict):
                if verdict:
                    log.info("%s/%d block %d verifies again (rewritten meanwhile)", vid, idx, block)
                return verdict
            if not peers:
                log.error("repair %s/%d block %d: no other in-sync replica", vid, idx, block)
                return False
            for cid, addr in peers:
                try:
                    blob = await self.fetch_block(addr, vid, idx, block)
                except (PeerUnavailable, ReplicaError, OSError, asyncio.TimeoutError) as e:
                    log.warning("repair %s/%d block %d: export from %s failed: %s",
                                vid, idx, block, cid, e)
                    self.peers.forget(cid)
                    continue
                except (PartsMismatch, StoreError) as e:
                    log.warning("repair %s/%d block %d: export from %s unusable: %s",
                                vid, idx, block, cid, e)
                    continue
                if not self.store.has(vid, idx):
                    # Deleted (reclaimed) during the export: nothing left to mend.
                    log.info("repair %s/%d block %d: extent deleted meanwhile", vid, idx, block)
                    return False
                try:
                    mended = await self.store.mend_async(vid, idx, blob, verified=verdict)
                except BadBlob as e:                 # garbled, or another range: this peer's fault
                    log.warning("repair %s/%d block %d: export from %s unusable: %s",
                                vid, idx, block, cid, e)
                    continue
                except StoreError as e:
                    # An I/O error of the mend: a failed sync (the replica is retired), a full
                    # disk (StoreFull from a write), the extent's files gone under it (deleted
                    # mid-mend): this repair ends; the next verify or read finds what is left.
                    log.error("repair %s/%d block %d: the mend failed: %s", vid, idx, block, e)
                    return False
                if mended is False:
                    log.info("repair %s/%d block %d: the extent changed meanwhile (a write, "
                             "import, trim or revert); checking again", vid, idx, block)
                    break
                # True, or ``Unmended``: the peer has no good copy of part of what fails here
                # (what it had is mended). Either way synced, then verified again (the next
                # peer's mend needs a fresh verdict: this one moved the counter).
                if not await self._durable(vid, idx, block):
                    return False
                verdict = await self._still_bad(vid, idx, block, "after the mend")
                if not isinstance(verdict, Verdict):
                    if verdict:
                        log.warning("repaired %s/%d block %d from %s", vid, idx, block, cid)
                    return verdict
                if isinstance(mended, Unmended):
                    log.warning("repair %s/%d block %d: %s has no good copy of it either "
                                "(live %s, versions (block, key) %s fail here and are unreadable "
                                "or missing there)", vid, idx, block, cid,
                                sorted(mended.live), sorted(mended.versions))
                else:
                    log.error("repair %s/%d block %d: the copy from %s does not verify either",
                              vid, idx, block, cid)
        if await self._still_bad(vid, idx, block, "after the last attempt") is True:
            return True
        log.error("repair of %s/%d block %d failed", vid, idx, block)
        return False


def _join_parts(parts: list[dict], start: int, end: int) -> bytes:
    """One blob of a block's export parts: their live block (the same in each) and the
    versions of all of them. ``mend`` checks it again."""
    first = parts[0]
    live = (first["live"], first.get("bad_live", []))
    versions, bad_versions = [], []
    last: int | None = None                 # the highest version key of the parts so far
    for part in parts:
        if (part["offset"], part["end"]) != (start, end):
            raise PartsMismatch(f"export part of {part['offset']}..{part['end']}, "
                                f"not the block {start}..{end}")
        if part is not first and (last is None or part.get("after") != last):
            raise PartsMismatch(f"export part after version {part.get('after')}, "
                                f"the parts before ended at {last}")
        if (part["live"], part.get("bad_live", [])) != live:
            raise PartsMismatch("the live block changed between export parts")
        versions += part["versions"]
        bad_versions += part.get("bad_versions", [])
        keys = [v[2] for v in part["versions"]] + [v[2] for v in part.get("bad_versions", [])]
        if keys:
            last = max(keys)
    state = {"format": first["format"], "offset": start, "end": end,
             "live": first["live"], "versions": versions}
    if any(p.get("bad_live") or p.get("bad_versions") for p in parts):
        state.update(format=_BLOB_FORMAT_UNREADABLE, bad_live=live[1], bad_versions=bad_versions)
    return msgpack.packb(state)
