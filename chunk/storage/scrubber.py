"""Background scrubbing: find rotten blocks before a read does, and replicas that disagree.

Two checks per local extent, one extent at a time, forever (a pass, then a
pause until ``interval`` after the pass started):

- checksums: ``store.verify_async`` over the extent in slices of at most 4 MiB, each
  in a worker thread (it reads the disk; the event loop keeps serving I/O),
  throttled by a token bucket to ``rate_bytes_per_s`` so client I/O keeps
  the disk. A bad block (checksum failure, or a live block the disk cannot
  read: ``ExtentFile.verify`` reports both) is confirmed by verifying it again,
  in a worker thread too (a failing disk can take seconds per read: never on
  the event loop), with the extent's mutation counter unchanged across that
  verify (a write racing the threaded read can look torn: the confirmation
  is then taken again), and handed to ``LocalRepair``, which copies it from an
  in-sync peer. A slice whose verify still fails with an I/O error (e.g. an
  unreadable snapshot version) is verified block by block, each block and
  each confirmation charged to the token bucket like the slices (a disk
  full of errors is not read faster than a healthy one); the blocks that keep failing are
  counted and logged as ``unreadable`` (repair cannot take them: it verifies
  the block first) and the scrub goes on with the rest of the extent. They
  are verified again ``recheck_delay`` seconds later; if some still do not
  read, this chunk is an in-sync replica and another in-sync replica reads
  them (its EXPORT of those blocks carries every version, none marked
  unreadable), this replica drops itself from the extent through ``drop``
  (``status()["unreadable_drops"]``): recovery then resyncs it in full from
  a good copy. Before, such a block was only counted, pass after pass.
- agreement: when this chunk is an in-sync replica, the extent's digest is
  compared with every other in-sync replica's (DIGEST, epoch 0). Writes in
  flight make replicas differ for a moment, so a difference counts only when
  it is seen again ``recheck_delay`` seconds later. The local digest is taken
  before the peers answer: a check during which the local extent changed
  (its mutation counter moved between the local digest and the last peer's
  answer) compared two different moments and is *inconclusive*, the first
  check as well as the recheck: nothing is suspected or confirmed from it
  (``status()["inconclusive"]``), and a suspicion from an earlier pass is kept
  as it is. Under steady writes every check differed (the local copy at t0,
  the peer's a network hop later, each holding writes the other had not
  received yet), so a hot extent's in-sync replica was dropped and resynced. Each server's reclaimer
  trims versions of a deleted snapshot on its own schedule, so replicas can
  also differ for up to a reclaim interval; a difference seen twice is
  therefore only *suspected* (``status()["suspected"]``) until it shows again
  in the next pass (``confirm_passes``; passes are hours apart). Confirmed
  mismatches are logged, counted and listed in ``status()``, and repaired when
  a ``drop`` callback is given (the engine's goes through the meta leader):
  both copies verify, so nothing local says which is right; the majority of
  the in-sync replicas that answered wins, a tie goes to the side holding the
  extent record's first replica, and only the winning side acts: it drops each
  replica that disagrees with it from the extent (generation +1), which makes
  the meta's recovery loop resync it in full from an agreeing replica, digests
  compared at the end. Replicas differing there only ever held writes that
  were never acknowledged (an acknowledged write is on every in-sync replica),
  so either copy is a correct outcome; what matters is that they converge.
  Except when they differ only where no checksum looks: seqs and version
  origins (``ReplicaStore.checked_state``). A write changes a crc or adds a
  version, so such a difference is rot in one copy's metadata (a flipped
  ``.seq`` entry changes what snapshots read and still verifies), and a tie
  cannot say which: the record's first replica may be the rotten one, and
  copying it over the other would destroy the good copy. So in a tie the
  peers' checked state is compared with this replica's and, if it is the
  same, nothing is dropped: the extent is logged and reported as *unresolved*
  (``status()["unresolved"]``, and ``unresolved_extents`` until the replicas
  agree again) for an operator. A majority still wins. The comparison is by
  DIGEST with ``args.checked`` (a hash of the peer's checked state: one round
  trip, no disk read), in a few probes each inside a moment when neither
  replica is being written (no local write, no deferred write in progress on
  either side, the peer's mutation count unchanged: ``_peer_same``), so it
  concludes on an extent written every few hundred milliseconds; it used to
  EXPORT the peer's whole extent at the scrub rate (seconds), which any write
  spoiled, so such a tie was never resolved. A peer without checked digests is still EXPORTed.

Reported disagreements (``mismatched``, ``unresolved_extents``) are cleared by a comparison
that finds the replicas agreeing, and at the end of a pass for extents no longer here. A
deleted extent's go (its volume deleted, or reclaimed: an operator's way out). A copy
*retired* here (a failed flush made it ``broken``: it serves nothing, and is resynced over or
reclaimed) no longer counts as a live disagreement either, but its entries move to
``status()["retired"]`` (what was reported, against which peers, why it was retired, when;
the last ``RETIRED_KEPT``; ``retired_reports`` counts them since start, published by the
engine as ``scrub_retired``) with an error in the log, and stay there after its files are gone:
they may be the only evidence left (an unresolved tie names two copies one of which is rotten;
with this one retired the extent is resynced from the other). They move when the store
retires the copy (``ReplicaStore.retire_listeners``, which the scrubber joins): a pass takes
days, and the reclaimer deletes the broken copy, or a resync's CREATE replaces it, long before
the pass ends, when it is neither here nor ``broken`` any more (db80aea looked only then, and
such a copy's report vanished). The end of a pass still moves the entries of a copy it finds
``broken`` (a report made after the retirement, a store without listeners).

Progress survives a restart: at the throttled rate a large server needs days
per pass, and a pass that started from the first extent after every restart
never reached the last ones. The last extent scrubbed is kept in
``CURSOR_FILE`` in the store's first disk directory (at most every
``cursor_every`` seconds, and when the scrubber is stopped; tmp + rename), a
pass resumes after it and wraps around to the extents before it, and the file
is removed when a pass completes. A missing or unreadable file means: start
from the first extent.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from .extent_file import BLOCK_SIZE, EXTENT_SIZE
from .replica_client import PeerUnavailable, ReplicaError
from .repair import PartsMismatch
from .replica_server import checked_digest
from .replica_store import StoreError, StoreIOError, _parse_blob, checked_state_of, unreadable_blocks

log = logging.getLogger(__name__)

MAX_SLICE = 4 << 20
CURSOR_FILE = ".scrub-cursor"
# The tie check's probes of a peer's checked state (``Scrubber._peer_same``): a probe counts
# when no local write lands within TIE_QUIET seconds of it on either side (far longer than
# one write reaches the replicas apart) and neither replica has a deferred write in progress
# or a mutation between the peer's last two replies; "different" takes TIE_DIFFER of them
# with the same pair of digests, and a check gives up (decided in a later pass) after
# TIE_PROBES probes: under a second. An unresolved tie is checked again every pass, so a
# false "different" must stay improbable.
TIE_QUIET = 0.02
TIE_DIFFER = 3
TIE_PROBES = 32
# Reports of copies retired here (``Scrubber._copy_retired``): the last this many are listed.
RETIRED_KEPT = 64


class TokenBucket:
    """At most ``rate`` bytes per second on average, bursts up to ``burst`` bytes."""

    def __init__(self, rate: float, burst: float) -> None:
        if rate <= 0:
            raise ValueError(f"scrub rate must be positive, got {rate}")
        self.rate, self.burst = float(rate), float(burst)
        self._tokens = self.burst
        self._last = time.monotonic()

    async def take(self, n: int) -> None:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= n
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / self.rate)


class Scrubber:
    def __init__(self, store, repair, rate_bytes_per_s: float = 16 << 20,
                 interval: float = 86400.0, *, recheck_delay: float = 3.0,
                 compare_digests: bool = True, confirm_passes: int = 2, drop=None,
                 cursor_file: str | os.PathLike | None = None, cursor_every: float = 10.0) -> None:
        self.store = store
        # None: CURSOR_FILE in the store's first disk directory (no file when it has none).
        self.cursor_file = Path(cursor_file) if cursor_file is not None else _default_cursor(store)
        self.cursor_every = cursor_every
        self.repair = repair
        self.drop = drop                  # async (vid, idx, chunk_id, generation, reason) or None
        self.interval = interval
        self.recheck_delay = recheck_delay
        self.compare_digests = compare_digests
        self.confirm_passes = max(1, confirm_passes)
        # One slice is at most a second's worth of budget, so the throttle stays smooth.
        blocks = max(1, min(MAX_SLICE, int(rate_bytes_per_s)) // BLOCK_SIZE)
        self.slice_blocks = blocks
        self.bucket = TokenBucket(rate_bytes_per_s, blocks * BLOCK_SIZE)
        self.passes = 0
        self.extents_scrubbed = 0     # since start
        self.bytes_scrubbed = 0
        self.errors = 0               # bad blocks found (and handed to repair)
        self.unreadable = 0           # blocks whose verify failed with an I/O error (not repairable here)
        self.mismatches = 0           # confirmed digest disagreements
        self.inconclusive = 0         # comparisons spoiled by a local write (see the module doc)
        self.unreadable_drops = 0     # this replica dropped (to be resynced) for unreadable blocks
        self._lost: list[int] = []    # the current extent's unreadable blocks
        self.mismatched: dict[tuple[str, int], list[str]] = {}
        self.resyncs_requested = 0    # replicas dropped (to be resynced) after a confirmed mismatch
        self.unresolved = 0           # confirmed ties in unchecked metadata only, left undecided
        self.unresolved_extents: dict[tuple[str, int], list[str]] = {}
        self.suspected: dict[tuple[str, int], tuple[list[str], int]] = {}   # -> (peers, passes seen)
        # Reports of copies retired here (a failed flush: ``broken``), oldest first.
        # One entry per retirement: a later copy of the same extent retired again adds its own
        # (one dict per extent let the second overwrite the first's evidence).
        self.retired: deque[dict[str, Any]] = deque(maxlen=RETIRED_KEPT)
        self.retired_reports = 0      # reports moved to ``retired`` since start
        self.last_pass_start: float | None = None
        self.last_pass_end: float | None = None
        self.last_pass_duration: float | None = None
        self.current: tuple[str, int] | None = None
        self._seen_this_pass: set[tuple[str, int]] = set()
        self._task: asyncio.Task | None = None
        self._done: tuple[str, int] | None = None     # last extent scrubbed in this pass
        self._saved_at = 0.0
        # Told the moment a copy is retired, before a reclaim or a resync removes it.
        listeners = getattr(store, "retire_listeners", None)
        if listeners is not None:
            listeners.append(self._copy_retired)

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Start scrubbing (and the repair worker it hands bad blocks to)."""
        self.repair.start()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="scrubber")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.run_pass()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a broken pass must not end scrubbing
                log.exception("scrub pass failed")
            await asyncio.sleep(max(1.0, self.interval - (time.monotonic() - started)))

    def status(self) -> dict[str, Any]:
        return {
            "passes": self.passes, "extents_scrubbed": self.extents_scrubbed,
            "bytes_scrubbed": self.bytes_scrubbed, "errors": self.errors,
            "unreadable": self.unreadable,
            "mismatches": self.mismatches, "resyncs_requested": self.resyncs_requested,
            "inconclusive": self.inconclusive, "unreadable_drops": self.unreadable_drops,
            "mismatched": [{"volume": v, "extent": i, "peers": p}
                           for (v, i), p in sorted(self.mismatched.items())],
            "unresolved": self.unresolved,
            "unresolved_extents": [{"volume": v, "extent": i, "peers": p}
                                   for (v, i), p in sorted(self.unresolved_extents.items())],
            "suspected": [{"volume": v, "extent": i, "peers": p, "passes": n}
                          for (v, i), (p, n) in sorted(self.suspected.items())],
            "retired": [dict(r) for r in self.retired],
            "retired_reports": self.retired_reports,
            "current": list(self.current) if self.current else None,
            "last_pass_start": self.last_pass_start, "last_pass_end": self.last_pass_end,
            "last_pass_duration": self.last_pass_duration,
            "repair": self.repair.status(),
        }

    # -- passes ----------------------------------------------------------------

    async def run_pass(self) -> dict[str, int]:
        """Scrub every local extent once; returns this pass's counts."""
        self.last_pass_start = time.time()
        t0 = time.monotonic()
        counts = {"extents": 0, "bytes": 0, "bad_blocks": 0, "unreadable": 0, "mismatches": 0}
        self._seen_this_pass = set()
        order = sorted(self.store.extents())
        after = self._load_cursor()
        if after is not None:
            cut = bisect.bisect_right(order, after)
            order = order[cut:] + order[:cut]        # resume, then wrap around to the first ones
            log.info("scrub pass resumes after %s/%d", *after)
        self._done, self._saved_at = None, time.monotonic()
        try:
            for vid, idx in order:
                self.current = (vid, idx)
                try:
                    got = await self.scrub_extent(vid, idx)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - deleted meanwhile, or one broken extent
                    if self.store.has(vid, idx):
                        log.warning("scrubbing %s/%d failed: %s", vid, idx, e)
                        self._seen_this_pass.add((vid, idx))    # keep a suspicion we could not check
                    got = {}
                for k, v in got.items():
                    counts[k] += v
                self._done = (vid, idx)
                if self.cursor_every <= 0 or time.monotonic() - self._saved_at >= self.cursor_every:
                    self._saved_at = time.monotonic()
                    await asyncio.to_thread(self._save_cursor, self._done)
        except asyncio.CancelledError:
            if self._done is not None:
                self._save_cursor(self._done)      # stopped: the next process goes on from here
            raise
        self._clear_cursor()
        self.current = None
        for key in [k for k in self.suspected if k not in self._seen_this_pass]:
            del self.suspected[key]        # agreed this pass (or the extent is gone)
        self._forget_gone()
        self.passes += 1
        self.last_pass_end = time.time()
        self.last_pass_duration = time.monotonic() - t0
        log.info("scrub pass %d: %d extents, %d bytes, %d bad blocks, %d unreadable, "
                 "%d mismatches in %.1fs", self.passes, counts["extents"], counts["bytes"],
                 counts["bad_blocks"], counts["unreadable"], counts["mismatches"],
                 self.last_pass_duration)
        return counts

    def _forget_gone(self) -> None:
        """Drop reported disagreements of extents no longer here (their volume deleted, or
        reclaimed once moved away): only a comparison cleared them, and a gone extent is
        never compared again, so it stayed listed (``needs an operator``) until a restart.

        A copy retired here (a failed flush made it ``broken``: it serves nothing and is
        replaced by a resync or reclaimed) no longer counts as a live disagreement either, but
        its entries move to ``retired``, logged, instead of vanishing: its data may have been
        the only evidence (an unresolved tie says one of two copies is rotten; with this one
        retired the extent is resynced from the other, which may be the rotten one). That
        happens when the store retires it (``_copy_retired``); here only for a copy still
        ``broken`` whose entries are left (made after it was retired, or a store without
        ``retire_listeners``)."""
        for key in [k for k in (*self.mismatched, *self.unresolved_extents)
                    if not self.store.has(*k)]:
            broken = self.store.broken.get(key)
            if broken is not None:
                self._move_retired(key, broken[0])
            else:
                self.mismatched.pop(key, None)
                self.unresolved_extents.pop(key, None)

    def _copy_retired(self, vid: str, idx: int, why: str) -> None:
        """``ReplicaStore.retire_listeners``: the store retired this copy (it is ``broken``
        now). Its reports move to ``retired`` at once: by the end of the pass a reclaim or a
        resync has usually removed the copy, and nothing would say it was retired."""
        self._move_retired((vid, idx), why)

    def _move_retired(self, key: tuple[str, int], why: str) -> None:
        """Move ``key``'s ``mismatched`` / ``unresolved_extents`` entries (a tie is in both)
        to ``retired`` as one report; nothing when it has none."""
        mismatch = self.mismatched.pop(key, None)
        tie = self.unresolved_extents.pop(key, None)
        if mismatch is None and tie is None:
            return
        peers = sorted(set(mismatch or ()) | set(tie or ()))
        self._report_retired(key, "mismatched" if tie is None else "unresolved", peers, why)

    def _report_retired(self, key: tuple[str, int], was: str, peers: list[str], why: str) -> None:
        """List ``key``'s report as a retired copy's (the last ``RETIRED_KEPT``), and log it."""
        self.retired.append({"volume": key[0], "extent": key[1], "was": was,
                             "peers": sorted(peers), "why": why, "at": time.time()})
        self.retired_reports += 1
        log.error("scrub: %s/%d: this copy (%s), reported %s against %s, was retired (%s): no "
                  "longer counted, listed as retired; the copies left were never shown right",
                  *key, self.repair.chunk_id, was, ", ".join(sorted(peers)) or "-", why)

    # -- cursor ----------------------------------------------------------------

    def _load_cursor(self) -> tuple[str, int] | None:
        """The last extent an earlier pass (or process) scrubbed; None for "from the start"."""
        if self.cursor_file is None:
            return None
        try:
            raw = json.loads(self.cursor_file.read_bytes())
            vid, idx = raw["volume"], raw["extent"]
            if not isinstance(vid, str) or type(idx) is not int or idx < 0:
                raise ValueError(f"bad fields {raw!r:.80}")
            return vid, idx
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("scrub cursor %s unusable (%s): scrubbing from the first extent",
                        self.cursor_file, e)
            return None

    def _save_cursor(self, key: tuple[str, int]) -> None:
        """tmp + rename, so a crash leaves the old cursor or the new one, never half of one."""
        path = self.cursor_file
        if path is None:
            return
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, json.dumps({"volume": key[0], "extent": key[1]}).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as e:          # a lost cursor costs re-scrubbing, never data
            log.warning("scrub cursor %s not saved: %s", path, e)
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass

    def _clear_cursor(self) -> None:
        if self.cursor_file is not None:
            try:
                self.cursor_file.unlink(missing_ok=True)
            except OSError as e:
                log.warning("scrub cursor %s not removed: %s", self.cursor_file, e)

    # -- verification ----------------------------------------------------------

    async def _verify(self, vid: str, idx: int, first: int, count: int) -> list[int]:
        """``store.verify`` in a worker thread; on the loop if the threaded read keeps racing.

        The store's own structures are changed by the event loop only; a
        version added while the thread walks them raises RuntimeError
        ("changed size during iteration"), which just means: try again.
        ``verify_async`` reads through dups of the replica's fds: the loop may
        close the replica's own (DELETE, reclaim, trim, a failed flush) while
        the worker reads, and a reused number made it read another file.
        """
        for _ in range(3):
            try:
                return await self.store.verify_async(vid, idx, first, count)
            except RuntimeError:
                await asyncio.sleep(0.01)
        return self.store.verify(vid, idx, first, count)

    async def _verify_slice(self, vid: str, idx: int, first: int, count: int,
                            counts: dict[str, int]) -> list[int]:
        """Bad blocks of a slice; an I/O error costs only the blocks it is in.

        Letting the error escape abandoned the rest of the extent (and its
        digest comparison) on every pass, for one unreadable block.
        """
        try:
            return await self._verify(vid, idx, first, count)
        except StoreIOError as e:
            if not self.store.has(vid, idx):
                raise                    # deleted or retired meanwhile: nothing left to scrub
            log.warning("scrubbing %s/%d blocks %d-%d: %s; verifying them one by one",
                        vid, idx, first, first + count - 1, e)
        bad: list[int] = []
        for block in range(first, first + count):
            await self._charge(BLOCK_SIZE, counts)
            try:
                bad.extend(await self._verify(vid, idx, block, 1))
            except StoreIOError as e:
                if not self.store.has(vid, idx):
                    raise
                self._unreadable(vid, idx, block, e, counts)
        return bad

    async def _charge(self, n: int, counts: dict[str, int]) -> None:
        """Take ``n`` bytes of reading from the throttle (and count them as scrubbed)."""
        await self.bucket.take(n)
        counts["bytes"] += n
        self.bytes_scrubbed += n

    async def _confirm(self, vid: str, idx: int, block: int, counts: dict[str, int]) -> bool:
        """Is ``block`` still bad? Verified in a worker thread; a result is kept only when no
        write changed the extent meanwhile (a racing write can look torn), else asked again.
        After three racing attempts the block goes to repair anyway: it checks on its own."""
        for _ in range(3):
            await self._charge(BLOCK_SIZE, counts)
            before = self.store.stat(vid, idx)["mutations"]
            bad = block in await self._verify(vid, idx, block, 1)
            if not bad or self.store.stat(vid, idx)["mutations"] == before:
                return bad
        return True

    def _unreadable(self, vid: str, idx: int, block: int, e: Exception, counts: dict[str, int]) -> None:
        counts["unreadable"] += 1
        self.unreadable += 1
        self._lost.append(block)
        log.error("scrub: %s/%d block %d cannot be verified (%s); not repairable here, "
                  "the extent needs a resync if it persists", vid, idx, block, e)

    async def scrub_extent(self, vid: str, idx: int) -> dict[str, int]:
        counts = {"extents": 1, "bytes": 0, "bad_blocks": 0, "unreadable": 0, "mismatches": 0}
        blocks = getattr(self.store, "extent_size", EXTENT_SIZE) // BLOCK_SIZE
        # verify reads only where something is allocated: charge the throttle
        # for what the disk holds, not for the extent's nominal size.
        budget = int(self.store.stat(vid, idx)["allocated"])
        bad: list[int] = []
        self._lost = []
        if budget:                       # nothing allocated: nothing on disk to read
            for first in range(0, blocks, self.slice_blocks):
                count = min(self.slice_blocks, blocks - first)
                charge = min(budget, count * BLOCK_SIZE)
                if charge:
                    await self._charge(charge, counts)
                    budget -= charge
                bad.extend(await self._verify_slice(vid, idx, first, count, counts))
        for block in bad:
            try:
                confirmed = await self._confirm(vid, idx, block, counts)
            except StoreIOError as e:
                if not self.store.has(vid, idx):
                    raise
                self._unreadable(vid, idx, block, e, counts)
                continue
            if confirmed:
                counts["bad_blocks"] += 1
                self.errors += 1
                self.repair.schedule(vid, idx, block)
        if counts["bad_blocks"] and self.repair.running:
            # Compare digests only after the repairs: a rotten block is not a disagreement.
            await self.repair.wait_idle(timeout=60.0)
        if self._lost:
            await self._still_unreadable(vid, idx, sorted(set(self._lost)), counts)
        if self.compare_digests:
            counts["mismatches"] = await self._compare(vid, idx)
        self.extents_scrubbed += 1
        return counts

    async def _still_unreadable(self, vid: str, idx: int, lost: list[int],
                                counts: dict[str, int]) -> None:
        """Blocks that did not read, verified again after ``recheck_delay``; if some still do
        not and another in-sync replica reads them, drop this replica for a resync."""
        await asyncio.sleep(self.recheck_delay)
        still = []
        for block in lost:
            await self._charge(BLOCK_SIZE, counts)
            try:
                await self._verify(vid, idx, block, 1)
            except StoreIOError:
                if not self.store.has(vid, idx):
                    raise
                still.append(block)
        if not still:
            log.info("scrub: %s/%d blocks %s read again", vid, idx, lost[:16])
            return
        if self.drop is None:
            return
        rec, peers = await self.repair.extent_peers(vid, idx)
        if rec is None or self.repair.chunk_id not in rec.replicas:
            return          # not in sync here: a resync owns this copy already
        good = None
        for cid, addr in peers:
            if await self._peer_reads(addr, vid, idx, still):
                good = cid
                break
        if good is None:
            log.error("scrub: %s/%d blocks %s unreadable here and no other in-sync replica reads "
                      "them; this copy is kept", vid, idx, still[:16])
            return
        try:
            await self.drop(vid, idx, self.repair.chunk_id, rec.generation,
                            f"scrub: blocks {still[:8]} unreadable on {self.repair.chunk_id}, "
                            f"{good} reads them")
        except Exception as e:  # noqa: BLE001 - reported, tried again next pass
            log.error("scrub: %s/%d: could not drop this replica (%s) for a resync: %s",
                      vid, idx, self.repair.chunk_id, e)
            return
        self.unreadable_drops += 1
        self.resyncs_requested += 1
        log.warning("scrub: %s/%d blocks %s unreadable here, %s reads them: dropped this replica "
                    "(%s); recovery resyncs it", vid, idx, still[:16], good, self.repair.chunk_id)

    async def _peer_reads(self, addr, vid: str, idx: int, blocks: list[int]) -> bool:
        """Does the peer read (live data and every version, checksums included) all ``blocks``?"""
        for block in blocks:
            try:
                blob = await self.repair.fetch_block(addr, vid, idx, block)
                _parse_blob(blob)
                if unreadable_blocks(blob):
                    return False
            except (PeerUnavailable, ReplicaError, OSError, asyncio.TimeoutError,
                    PartsMismatch, StoreError) as e:
                log.info("scrub: %s/%d block %d from %s: %s", vid, idx, block, addr, e)
                return False
        return True

    async def _differing(self, vid: str, idx: int, peers,
                         agreeing: list[str] | None = None) -> list[str] | None:
        """The peers whose digest differs from the local one; None when that is inconclusive:
        the local extent changed (a write landed) while the peers were asked, so the local
        digest and theirs are of different moments (see the module doc)."""
        before = self.store.stat(vid, idx)["mutations"]      # no await until the digest
        local = self.store.digest(vid, idx)
        differ: list[str] = []
        for cid, addr in peers:
            try:
                theirs = await self.repair.client.digest(addr, vid, idx)
            except (PeerUnavailable, ReplicaError, OSError, asyncio.TimeoutError) as e:
                log.info("digest of %s/%d from %s unavailable: %s", vid, idx, cid, e)
                continue
            if theirs != local:
                differ.append(cid)
            elif agreeing is not None:
                agreeing.append(cid)
        if differ and self.store.stat(vid, idx)["mutations"] != before:
            return None
        return differ

    async def _compare(self, vid: str, idx: int) -> int:
        rec, peers = await self.repair.extent_peers(vid, idx)
        if rec is None or self.repair.chunk_id not in rec.replicas or not peers:
            return 0        # not an in-sync replica: a resync owns this copy, nothing to compare
        key = (vid, idx)
        agreeing: list[str] = []
        differ = await self._differing(vid, idx, peers, agreeing)
        if differ is None:
            return self._inconclusive(key)
        if differ:
            await asyncio.sleep(self.recheck_delay)
            rec, peers = await self.repair.extent_peers(vid, idx)
            if rec is None or self.repair.chunk_id not in rec.replicas:
                return 0
            again = await self._differing(vid, idx, [p for p in peers if p[0] in differ])
            if again is None:
                return self._inconclusive(key)
            differ = [c for c in differ if c in again]
            agreeing = [c for c in agreeing if c in rec.replicas]
        if not differ:
            was = self.mismatched.pop(key, None)
            self.suspected.pop(key, None)
            tie = self.unresolved_extents.pop(key, None)
            if tie is not None:
                # Nobody decided the tie here: a resync of one side (the peer's copy retired
                # and replaced, a drop) or writes made them agree; the survivor may be the rot.
                # (A copy retired here has left its tie for ``retired`` already.)
                log.warning("replicas of %s/%d agree again: no longer unresolved (the tie with "
                            "%s in unchecked metadata was not decided by the scrubber)",
                            vid, idx, ", ".join(tie))
            elif was is not None:
                log.info("replicas of %s/%d agree again: no longer mismatched with %s",
                         vid, idx, ", ".join(was))
            return 0
        self._seen_this_pass.add(key)
        if key in self.mismatched:           # already reported; still disagreeing
            self.mismatched[key] = sorted(differ)
            await self._resolve(rec, differ, agreeing, peers)
            return 1
        prev_peers, seen = self.suspected.get(key, ([], 0))
        if set(differ) & set(prev_peers) or not prev_peers:
            seen += 1
        else:
            seen = 1
        self.suspected[key] = (sorted(differ), seen)
        if seen < self.confirm_passes:
            log.warning("replicas of %s/%d differ from %s twice %.0fs apart; confirming next pass "
                        "(a snapshot trim may not have reached every replica yet)",
                        vid, idx, ", ".join(differ), self.recheck_delay)
            return 0
        del self.suspected[key]
        self.mismatches += 1
        self.mismatched[key] = sorted(differ)
        log.error("replicas of %s/%d disagree: this chunk (%s) and %s have different digests "
                  "in %d passes", vid, idx, self.repair.chunk_id, ", ".join(differ), self.confirm_passes)
        await self._resolve(rec, differ, agreeing, peers)
        return 1

    def _inconclusive(self, key: tuple[str, int]) -> int:
        """A comparison a local write spoiled: nothing learnt, an earlier suspicion kept."""
        self.inconclusive += 1
        if key in self.suspected or key in self.mismatched:
            self._seen_this_pass.add(key)
        log.debug("replicas of %s/%d: written during the digest comparison; inconclusive", *key)
        return 0

    async def _resolve(self, rec, differ: list[str], agreeing: list[str], peers) -> None:
        """If this side wins (see the module doc), drop the replicas that disagree with it."""
        if self.drop is None:
            return
        mine = 1 + len(agreeing)
        if mine + len(differ) < len(rec.replicas):
            # A replica did not answer (or changed its mind on the recheck): with its vote
            # missing, a copy in the minority of the whole set could win a tie and drop a
            # good one. Decided in a pass where every replica answers.
            log.warning("replicas of %s/%d: not every replica answered; deciding in a later pass",
                        rec.volume_id, rec.index)
            return
        key = (rec.volume_id, rec.index)
        self.unresolved_extents.pop(key, None)
        if mine == len(differ):
            same = await self._same_checked_state(rec, [p for p in peers if p[0] in differ])
            if same:
                self._unresolvable(key, differ)
            if same is not False:
                return          # rot in unchecked metadata, or not known this pass: no drop
        if mine < len(differ) or (mine == len(differ) and rec.replicas[0] not in
                                  [self.repair.chunk_id, *agreeing]):
            log.warning("replicas of %s/%d: this chunk's copy is the minority; the other side resyncs it",
                        rec.volume_id, rec.index)
            return
        for cid in differ:
            try:
                await self.drop(rec.volume_id, rec.index, cid, rec.generation,
                                f"scrub: digest differs from {self.repair.chunk_id}'s")
                rec, _ = await self.repair.extent_peers(rec.volume_id, rec.index)   # generation +1
                if rec is None:
                    return
            except Exception as e:  # noqa: BLE001 - reported, tried again next pass
                log.error("replicas of %s/%d: could not drop %s for a resync: %s",
                          rec.volume_id, rec.index, cid, e)
                continue
            self.resyncs_requested += 1
            log.warning("replicas of %s/%d: dropped %s (its copy disagrees); recovery resyncs it",
                        rec.volume_id, rec.index, cid)

    async def _same_checked_state(self, rec, peers) -> bool | None:
        """Do ``peers`` hold this replica's checked state (``ReplicaStore.checked_state``)?
        None when that cannot be told now: a peer did not answer, or writes kept landing."""
        vid, idx = rec.volume_id, rec.index
        same = []
        for cid, addr in peers:
            try:
                got = await self._peer_same(addr, vid, idx)
            except (PeerUnavailable, ReplicaError, OSError, asyncio.TimeoutError, StoreError) as e:
                log.warning("replicas of %s/%d: checked state of %s unavailable (%s); deciding "
                            "in a later pass", vid, idx, cid, e)
                return None
            if got is None:
                log.warning("replicas of %s/%d: written throughout the checked-state comparison "
                            "with %s; deciding in a later pass", vid, idx, cid)
                return None
            same.append(got)
        return all(same)

    async def _peer_same(self, addr, vid: str, idx: int) -> bool | None:
        """Does the peer's checked digest (``ReplicaClient.checked_probe``) match this
        replica's? A false "different" drops the good copy of a tie in unchecked metadata, so
        a probe (a DIGEST round trip) counts only with both replicas at rest around it:

        - here: no deferred write in progress (``stat()["pending"]``) and ``mutations``
          unchanged from ``TIE_QUIET`` before the DIGEST to ``TIE_QUIET`` after it (a write
          that had reached only one replica then: the coordinator sends to each);
        - the peer: its reply and the one before carry ``pending`` 0, the same ``mutations``
          and the same digest. A copy-on-write waits for fdatasyncs between its steps
          (``ReplicaStore._write_later``) and a peer's disk may lag: a digest taken half-way
          shows a difference neither replica keeps (5072ce6 looked at local writes only, and
          dropped the good copy behind an 80 ms sync).

        "Same" takes one such probe; "different" ``TIE_DIFFER`` of them seeing the same pair
        of digests (another pair starts the count again); None after ``TIE_PROBES`` probes
        without a verdict. A peer without checked digests or without ``mutations`` in its
        reply (before this) is EXPORTed instead (``_exported_same``)."""
        store = self.store

        def here() -> tuple[int, int]:
            st = store.stat(vid, idx)
            return st["mutations"], st.get("pending", 0)

        prev = None                          # the peer's previous reply
        pair, seen = None, 0                 # the differing (mine, theirs) and its counted probes
        quiet = here()                       # TIE_QUIET before the next DIGEST
        await asyncio.sleep(TIE_QUIET)
        for _ in range(TIE_PROBES):
            before = here()
            got = await self.repair.client.checked_probe(addr, vid, idx)
            if got is None or got.mutations is None or got.pending is None:
                return await self._exported_same(addr, vid, idx)    # a peer from before
            mine = checked_digest(store.checked_state(vid, idx))     # no await since the reply
            after = here()
            await asyncio.sleep(TIE_QUIET)
            later = here()
            last, prev = prev, got
            at_rest_here = (quiet == before == after == later and later[1] == 0)
            quiet = after
            at_rest_there = (last is not None and last.pending == 0 and got.pending == 0
                             and last.mutations == got.mutations and last.digest == got.digest)
            if not (at_rest_here and at_rest_there):
                continue
            if got.digest == mine:
                return True
            if (mine, got.digest) != pair:
                pair, seen = (mine, got.digest), 0
            seen += 1
            if seen >= TIE_DIFFER:
                return False
        return None

    async def _exported_same(self, addr, vid: str, idx: int) -> bool | None:
        """``_peer_same`` for a peer without checked digests: its EXPORT, no local write during it."""
        before = self.store.stat(vid, idx)["mutations"]
        theirs = await self._peer_checked_state(addr, vid, idx)
        if self.store.stat(vid, idx)["mutations"] != before:
            return None
        return theirs == self.store.checked_state(vid, idx)

    async def _peer_checked_state(self, addr, vid: str, idx: int) -> set[tuple]:
        """The peer's checked state, from an EXPORT of its whole extent (throttled): seconds,
        which only a peer without checked digests costs."""
        size = getattr(self.store, "extent_size", EXTENT_SIZE)
        out: set[tuple] = set()
        off: int | None = 0
        while off is not None:
            start = off
            blob, off = await self.repair.client.export(addr, vid, idx, off, size - off)
            await self.bucket.take(len(blob))
            out |= checked_state_of(_parse_blob(blob))
            if off is not None and not start < off <= size:
                # a peer that does not move on would keep this scrub exporting forever
                raise StoreError(f"export of {vid}/{idx} from {addr}: next offset {off} after {start}")
        return out

    def _unresolvable(self, key: tuple[str, int], differ: list[str]) -> None:
        """A tie in metadata no checksum covers: either copy may be the rotten one."""
        self.unresolved += 1
        self.unresolved_extents[key] = sorted(differ)
        log.error("replicas of %s/%d: this chunk (%s) and %s differ only in seqs or version "
                  "origins, which no checksum covers, and no majority says which is rotten; "
                  "nothing is repaired, the extent needs an operator", *key,
                  self.repair.chunk_id, ", ".join(differ))


def _default_cursor(store) -> Path | None:
    """CURSOR_FILE in the store's first disk directory: a place the chunk server already owns."""
    try:
        return Path(store.usage()[0]["path"]) / CURSOR_FILE
    except (AttributeError, IndexError, KeyError, TypeError, OSError):
        return None
