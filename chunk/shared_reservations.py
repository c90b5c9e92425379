"""Persistent reservations shared by every chunk server, kept in etcd.

The redirector sends each (initiator, target) to a chunk server of its own, so the
hosts of a shared LUN (a Windows failover cluster, fence_scsi, VMFS) usually reach
different servers. With reservations in each server's memory they did not see each
other's registrations: a PREEMPT on one server left the preempted host writing through
another. Here a logical unit's registrations and reservation are one
``ReservationRecord`` per LU in etcd:

- every change (PERSISTENT RESERVE OUT, RESERVE/RELEASE(6), the SPC-2 release on nexus
  loss or LU reset) is computed by the in-memory rules (``ReservationState``) on the
  latest record and written back by compare-and-swap on its revision, so two servers'
  changes serialize and the PRgeneration counts them all;
- PERSISTENT RESERVE IN reads the record first, so it answers what etcd holds;
- the per-command check (``conflicts``) reads this server's mirror of the record, kept
  by a watch, so commands pay no etcd round trip;
- a change that can refuse what was allowed before (a new reservation, a removed
  registration: ``confirm``) is answered only once every other live chunk server has
  applied it: each applies it with the LU's writes paused (those in flight finish, new
  ones check again after) and acknowledges the revision in etcd. A server that does not
  acknowledge is waited for until its lease is gone (a server without its lease starts no
  write), at most ``CONFIRM_WAIT``;
- the unit attentions a change establishes travel in the record: the server that made
  the change posts them at once on every LU over the state (a volume's read-write and
  read-only LUs), the others when their mirror takes the record in; each LU only for the
  nexuses it has seen (a new one gets POWER ON first).

State survives a chunk server restart and failover to another server (SPC-4's APTPL
behaviour), and is deleted with the volume. The SPC-2 reservation does not: I_T nexus loss
and power-on release it (SPC-2 5.5.1), so the record names the chunk server whose session
holds it (``spc2_chunk``). A restarted server, once its first listing is in, releases the
ones naming itself (its sessions are all new); the others release those of a server whose
live key is gone (its sessions went with it). The redirector's membership and the meta's
liveness follow the same live keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from typing import Any, Awaitable, Callable

from zstore import etcd as zetcd
from zstore.keys import Keys
from zstore.records import RecordError, ReservationRecord

from .scsi.nexus import Nexus
from .scsi.reservations import Registration, ReservationState
from .scsi.sense import ABORTED_COMMAND, ASC_NO_ADDITIONAL, ReservationConflict, ScsiError

log = logging.getLogger(__name__)

ATTEMPTS = 16            # compare-and-swap rounds before a change gives up (ABORTED COMMAND)
CONFIRM_WAIT = 15.0      # seconds a restricting change waits for the other servers' acks
CLOSE_WAIT = 2.0         # seconds close() lets queued releases (nexus loss) reach etcd
HISTORY = 32             # changes whose unit attentions a record keeps (a mirror may skip some)


def _nexus(raw: list) -> Nexus:
    return Nexus(str(raw[0]), str(raw[1]), int(raw[2]))


def load(state: ReservationState, rec: ReservationRecord) -> None:
    """Make ``state`` hold what ``rec`` says."""
    state.generation = rec.generation
    state.registrations = {_nexus(n): Registration(int(key)) for n, key in rec.registrations}
    state.holder = _nexus(rec.holder) if rec.holder else None
    state.type = rec.type if state.holder is not None else 0
    state.spc2 = _nexus(rec.spc2) if rec.spc2 else None
    state.spc2_chunk = rec.spc2_chunk if state.spc2 is not None else ""


def record_of(state: ReservationState) -> ReservationRecord:
    return ReservationRecord(
        generation=state.generation,
        registrations=[[list(n), r.key] for n, r in state.registrations.items()],
        holder=list(state.holder) if state.holder is not None else None,
        type=state.type if state.holder is not None else 0,
        spc2=list(state.spc2) if state.spc2 is not None else None,
        spc2_chunk=getattr(state, "spc2_chunk", "") if state.spc2 is not None else "")


def _same(a: ReservationRecord, b: ReservationRecord) -> bool:
    return (a.generation, a.registrations, a.holder, a.type, a.spc2, a.spc2_chunk) == \
        (b.generation, b.registrations, b.holder, b.type, b.spc2, b.spc2_chunk)


def restricts(old: ReservationRecord, new: ReservationRecord) -> bool:
    """Can ``new`` refuse a command ``old`` allowed? A new or changed PR or SPC-2 holder, or
    a registration removed (conservative: releasing never restricts, and is not waited on)."""
    if new.spc2 is not None and new.spc2 != old.spc2:
        return True
    if new.holder is not None and (new.holder, new.type) != (old.holder, old.type):
        return True
    kept = {tuple(n) for n, _ in new.registrations}
    return any(tuple(n) not in kept for n, _ in old.registrations)


class _Work(ReservationState):
    """The in-memory rules run on a copy of the record, which also carries ``spc2_chunk``."""

    def __init__(self) -> None:
        super().__init__()
        self.spc2_chunk = ""


class SharedReservationState(ReservationState):
    """One LU's reservations: a mirror of its etcd record, changed only through etcd."""

    def __init__(self, store: "ReservationStore", key: bytes) -> None:
        super().__init__()
        self.spc2_chunk = ""         # chunk server whose session holds ``spc2``
        self._store, self._key = store, key
        self.revision = 0            # mod revision of the record mirrored (0: none yet)
        self.change = 0              # its change counter: attentions up to it were posted
        self._units: weakref.WeakSet = weakref.WeakSet()
        self._lock = asyncio.Lock()  # this server's changes one at a time
        self._unconfirmed = 0        # revision of our last restricting change to be settled
        self._settled = 0            # the newest revision settle() has waited for

    def attach(self, unit: Any) -> None:
        """A LogicalUnit over this state: it gets the attentions other servers establish."""
        self._units.add(unit)

    def attached(self) -> list:
        """The LogicalUnits over this state on this server: a change made through one
        establishes its unit attentions on each."""
        return list(self._units)

    def mirror(self, rec: ReservationRecord | None, revision: int, post: bool = True) -> None:
        """Take in the record at ``revision`` (None: deleted) unless an equal or newer one is
        here already; post the attentions of changes other servers made that this server
        has not posted yet (``post=False``: the caller made the newest change and posts its
        own; older ones are still posted)."""
        if revision and revision <= self.revision:
            return
        rec = rec or ReservationRecord()
        load(self, rec)
        self.revision = revision
        for change, origin, attentions in rec.history:
            if change <= self.change or origin == self._store.chunk_id:
                continue
            if not post and change == rec.change:
                continue
            for n, asc, ascq in attentions:
                for unit in list(self._units):
                    unit.reservation_attention((int(asc), int(ascq)), _nexus(n))
        self.change = max(self.change, rec.change)

    async def apply_paused(self, rec: ReservationRecord, revision: int) -> None:
        """Take in another server's restricting change with every attached LU's writes
        paused: none admitted under the old state is still running afterwards."""
        async with contextlib.AsyncExitStack() as stack:
            for unit in list(self._units):
                await stack.enter_async_context(unit.writes_paused())
            self.mirror(rec, revision)

    async def settle(self) -> None:
        """Return once our restricting changes so far were applied by every other live
        server (see ``ReservationStore.confirmed``). Every caller waits: one command's
        settle does not let a concurrent one answer before the acknowledgements."""
        revision = self._unconfirmed
        if revision > self._settled:
            await self._store.confirmed(self._key, revision)
            self._settled = max(self._settled, revision)

    async def refresh(self) -> None:
        try:
            rec, revision = await self._store.read(self._key)
        except Exception as e:  # noqa: BLE001 - etcd unreachable: the answer would be a guess
            log.warning("reservations %s: cannot read from etcd: %s", self._key.decode(), e)
            raise ScsiError(ABORTED_COMMAND, ASC_NO_ADDITIONAL) from None
        self.mirror(rec, revision)

    async def _mutate(self, op: Callable[[ReservationState], Awaitable[Any]]) -> Any:
        """Run ``op`` (the in-memory rule) on the latest record and store the result by
        compare-and-swap; ``op``'s result (unit attentions for PR OUT). ReservationConflict
        and ScsiError from the rule pass through with nothing written."""
        async with self._lock:
            for _ in range(ATTEMPTS):
                try:
                    rec, revision = await self._store.read(self._key)
                except Exception as e:  # noqa: BLE001
                    log.warning("reservations %s: cannot read from etcd: %s", self._key.decode(), e)
                    raise ScsiError(ABORTED_COMMAND, ASC_NO_ADDITIONAL) from None
                self.mirror(rec, revision)
                work = _Work()
                load(work, rec or ReservationRecord())
                result = await op(work)          # raises: nothing changes
                new = record_of(work)
                if _same(new, rec or ReservationRecord()):
                    # Nothing to store (a no-op RELEASE, ...). When the record's newest change
                    # is a restricting one of ours not settled yet (a retry after its swap
                    # reached etcd but the reply was lost), it is confirmed as a fresh one.
                    if rec is not None and rec.confirm and rec.origin == self._store.chunk_id \
                            and revision > self._settled:
                        self._unconfirmed = max(self._unconfirmed, revision)
                    return result
                new.change = (rec.change if rec else 0) + 1
                new.origin = self._store.chunk_id
                attentions = [[list(n), asc[0], asc[1]] for n, asc in (result or [])]
                new.history = ((rec.history if rec else []) + [[new.change, new.origin, attentions]])[-HISTORY:]
                new.confirm = restricts(rec or ReservationRecord(), new)
                try:
                    stored = await self._store.swap(self._key, revision, new)
                except Exception as e:  # noqa: BLE001 - unknown outcome: the initiator retries
                    # Perhaps applied: a retry finding it in the record waits for the other
                    # servers' acknowledgements before its GOOD (above).
                    log.warning("reservations %s: cannot write to etcd: %s", self._key.decode(), e)
                    raise ScsiError(ABORTED_COMMAND, ASC_NO_ADDITIONAL) from None
                if stored:
                    self.mirror(new, stored, post=False)    # our caller posts our attentions
                    if new.confirm:
                        self._unconfirmed = max(self._unconfirmed, stored)   # see settle()
                    return result
            log.warning("reservations %s: gave up after %d conflicting changes", self._key.decode(), ATTEMPTS)
            raise ScsiError(ABORTED_COMMAND, ASC_NO_ADDITIONAL)

    # -- the changing calls of ReservationState, through etcd ------------------------

    async def prout(self, n: Nexus, cdb: bytes, data: bytes | memoryview):
        data = bytes(data)
        return await self._mutate(lambda s: ReservationState.prout(s, n, cdb, data))

    async def spc2_reserve(self, n: Nexus) -> None:
        chunk = self._store.chunk_id
        self._store.took(self._key, n)       # not taken for a holder of before our restart

        async def reserve(s: ReservationState) -> None:
            await ReservationState.spc2_reserve(s, n)
            s.spc2_chunk = chunk                 # the session holding it is on this server
        await self._mutate(reserve)

    async def spc2_release(self, n: Nexus) -> None:
        await self._mutate(lambda s: ReservationState.spc2_release(s, n))

    async def nexus_lost(self, n: Nexus) -> None:
        self.drop_spc2(n)

    async def reset(self) -> None:
        self.drop_spc2()

    def drop_spc2(self, n: Nexus | None = None) -> None:
        """Nexus loss or LU reset: this server stops honouring the SPC-2 reservation now,
        and etcd is told behind the caller (these come from the transport, not from a
        command that could wait)."""
        if self.spc2 is None or (n is not None and self.spc2 != n):
            return
        self.spc2, self.spc2_chunk = None, ""

        async def drop(s: ReservationState) -> None:
            ReservationState.drop_spc2(s, n)
        self._store.behind(self._mutate(drop), f"release of the SPC-2 reservation of {n}")


class ReservationStore:
    """A chunk server's shared reservation states, mirrored from etcd by one watch."""

    def __init__(self, etcd, keys: Keys, chunk_id: str) -> None:
        self.etcd, self.keys, self.chunk_id = etcd, keys, chunk_id
        self._states: dict[bytes, SharedReservationState] = {}
        self._seen: dict[bytes, tuple[ReservationRecord, int]] = {}    # key -> (record, revision)
        self._tasks: set[asyncio.Task] = set()
        self._chains: dict[bytes, asyncio.Task] = {}     # key -> its latest mirror update
        self._behind: set[asyncio.Task] = set()          # releases queued by ``behind``
        self._watch: asyncio.Task | None = None
        self._live_watch: asyncio.Task | None = None
        self._stop = asyncio.Event()                     # the watches' stop: the caller's, or close()
        self._follow: asyncio.Task | None = None         # sets _stop when the caller's stop is set
        self._live: set[str] = set()                     # chunk ids whose live key exists
        self._live_synced = False
        self._mine: set[tuple[bytes, Nexus]] = set()     # SPC-2 reservations taken since start
        self.synced = asyncio.Event()

    def state(self, vid: str, view: int = 0) -> SharedReservationState:
        """The one state of the LU (volume ``vid``, or its snapshot at seq ``view``) on this
        server: its read-write and read-only LogicalUnits share it."""
        key = self.keys.reservation(vid, view)
        st = self._states.get(key)
        if st is None:
            st = self._states[key] = SharedReservationState(self, key)
            seen = self._seen.get(key)
            if seen is not None:
                st.mirror(seen[0], seen[1], post=False)
        return st

    def forget(self, vid: str, view: int = 0) -> None:
        self._states.pop(self.keys.reservation(vid, view), None)

    # -- etcd ------------------------------------------------------------------------

    async def read(self, key: bytes) -> tuple[ReservationRecord | None, int]:
        got = await self.etcd.get(key)
        if got is None:
            return None, 0
        return self._decode(key, got.value), got.mod_revision

    async def swap(self, key: bytes, revision: int, rec: ReservationRecord) -> int:
        """Write ``rec`` if the record is still at ``revision`` (0: absent); the new
        revision, or 0 when another change came first."""
        t = self.etcd.transactions
        compare = [t.mod(key) == revision] if revision else [t.version(key) == 0]
        ok, responses = await self.etcd.transaction(compare=compare, success=[t.put(key, rec.encode())],
                                                    failure=[])
        if not ok:
            return 0
        return responses[0].response_put.header.revision

    @staticmethod
    def _decode(key: bytes, raw: bytes) -> ReservationRecord | None:
        try:
            return ReservationRecord.decode(raw)
        except RecordError as e:
            # Unreadable: treated as no reservation here, and overwritten by the next change.
            log.error("reservations %s: %s", key.decode(), e)
            return None

    def start(self, stop: asyncio.Event) -> None:
        """Mirror until ``stop`` is set or ``close()``."""
        if self._watch is None:
            self._stop.clear()

            async def follow() -> None:
                await stop.wait()
                self._stop.set()
            self._follow = asyncio.ensure_future(follow())
            self._watch = asyncio.ensure_future(zetcd.watch_prefix(
                self.etcd, self.keys.all_reservations(), self._snapshot, self._event, self._stop,
                with_revision=True))
            self._live_watch = asyncio.ensure_future(zetcd.watch_prefix(
                self.etcd, self.keys.chunks(), self._chunks_snapshot, self._chunk_event, self._stop))

    async def close(self) -> None:
        """Stop mirroring. Releases queued by nexus loss (the sessions closed just before) are
        given ``CLOSE_WAIT`` to reach etcd, then cancelled: a stop is not a crash. Returns
        within ``2 * CLOSE_WAIT``, logging any task still running then.

        The watches are stopped by their stop event, not only cancelled: a cancel can be lost.
        Python 3.11's ``asyncio.wait_for`` (aetcd's watch creation) returns the result instead
        of raising when the awaited reply is in as the cancel comes, so a watch cancelled
        while being created went on to watch, with nothing left to end it: close() waited
        for it forever (a chunk server whose frontend failed to start never exited)."""
        self._stop.set()
        watches = [t for t in (self._watch, self._live_watch, self._follow) if t is not None]
        for t in watches:
            t.cancel()
        if self._behind:
            await asyncio.wait(set(self._behind), timeout=CLOSE_WAIT)
        tasks = watches + [*self._tasks, *self._behind]
        for t in tasks:
            t.cancel()
        self._watch = self._live_watch = self._follow = None
        if not tasks:
            return
        done, running = await asyncio.wait(tasks, timeout=CLOSE_WAIT)
        for t in done:
            if not t.cancelled():
                t.exception()                    # retrieved: logged where it matters already
        if running:
            log.error("reservations: %d task(s) still running after close: %s", len(running),
                      ", ".join(sorted(repr(t.get_coro()) for t in running)))

    def behind(self, coro, what: str) -> None:
        """Run ``coro`` in the background, logging its failure."""
        async def run() -> None:
            try:
                await coro
            except (ScsiError, ReservationConflict) as e:
                log.warning("%s not stored: %s", what, e)
            except Exception:  # noqa: BLE001
                log.exception("%s not stored", what)
        task = asyncio.ensure_future(run())
        self._behind.add(task)
        task.add_done_callback(self._behind.discard)

    # -- SPC-2 reservations whose session is gone: power-on and nexus loss ------------

    def took(self, key: bytes, n: Nexus) -> None:
        """``n`` reserves ``key`` through this server (since it started): not one to release
        as held before the restart."""
        self._mine.add((key, n))

    def _sweep(self, own: bool = False, only: str | None = None) -> None:
        """Release the SPC-2 reservations held through a server whose sessions are gone:
        this one before its restart (``own``: at the first listing), or one whose live key
        is gone (``only``: just that one)."""
        for key, (rec, _) in list(self._seen.items()):
            chunk = rec.spc2_chunk
            if rec.spc2 is None or not chunk or (only is not None and chunk != only):
                continue
            if chunk == self.chunk_id:
                if own and (key, _nexus(rec.spc2)) not in self._mine:
                    self._release_orphan(key, chunk, "restart of this server")
            elif self._live_synced and chunk not in self._live:
                self._release_orphan(key, chunk, f"loss of chunk server {chunk}")

    def _release_orphan(self, key: bytes, chunk: str, why: str) -> None:
        st = self._states.get(key) or SharedReservationState(self, key)

        async def drop(s: ReservationState) -> None:
            held = s.spc2
            if held is None or getattr(s, "spc2_chunk", "") != chunk:
                return                               # released or taken again meanwhile
            if chunk == self.chunk_id and (key, held) in self._mine:
                return
            if chunk != self.chunk_id and chunk in self._live:
                return
            log.info("reservations %s: SPC-2 reservation of %s released (%s)", key.decode(), held, why)
            s.spc2, s.spc2_chunk = None, ""
        self.behind(st._mutate(drop), f"release of an SPC-2 reservation on {why}")

    async def _chunks_snapshot(self, kvs: list[tuple[bytes, bytes]]) -> None:
        base = self.keys.chunks()
        live = set()
        for key, _ in kvs:
            p = Keys.chunk_key_parts(key, base)
            if p is not None and p[1] == "live":
                live.add(p[0])
        self._live, self._live_synced = live, True
        self._sweep()

    async def _chunk_event(self, ev) -> None:
        p = Keys.chunk_key_parts(ev.kv.key, self.keys.chunks())
        if p is None or p[1] != "live":
            return
        if ev.kind == "PUT":
            self._live.add(p[0])
        else:
            self._live.discard(p[0])
            self._sweep(only=p[0])

    async def _snapshot(self, kvs: list[tuple[bytes, bytes]], revision: int) -> None:
        # The listing's revision, not each record's: no state goes back past a change this
        # server stored after the listing was taken. Keys absent were deleted meanwhile.
        present = {key for key, _ in kvs}
        for key, value in kvs:
            await self._take(key, self._decode(key, value), revision)
        for key in list(self._seen):
            if key not in present:
                self._drop(key)
        # The first listing since start: SPC-2 holders naming this server held sessions of
        # the process before (power-on releases them). Later relists keep them: ours live.
        self._sweep(own=not self.synced.is_set())
        self.synced.set()

    async def _event(self, ev) -> None:
        if ev.kind == "PUT":
            await self._take(ev.kv.key, self._decode(ev.kv.key, ev.kv.value), ev.kv.mod_revision)
        else:
            self._drop(ev.kv.key)

    async def _take(self, key: bytes, rec: ReservationRecord | None, revision: int) -> None:
        """Mirror a record from the watch, in order per key but without one LU that drains
        slowly holding up the others: each key's updates run in a chain of their own."""
        if rec is None:
            return
        before = self._seen.get(key)
        self._seen[key] = (rec, revision)
        # Pause writes and acknowledge when the record restricts what this server held before
        # (after a relist the newest record may be a plain registration on top of a
        # restricting change never seen here), or when its origin asks for it.
        theirs = rec.origin != self.chunk_id and (
            rec.confirm or restricts(before[0] if before else ReservationRecord(), rec))

        async def apply() -> None:
            st = self._states.get(key)
            if st is not None:
                if theirs:
                    await st.apply_paused(rec, revision)
                else:
                    st.mirror(rec, revision)
            if theirs:
                await self._acknowledge(key, revision)
        self._chain(key, apply)

    def _chain(self, key: bytes, work) -> None:
        """Run ``work()`` after the key's previous update, in a task: updates of one key stay
        in watch order, and one LU draining its writes holds up no other."""
        previous = self._chains.get(key)

        async def run() -> None:
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)
            await work()

        chain = self._chains[key] = asyncio.ensure_future(run())
        self._tasks.add(chain)

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            if self._chains.get(key) is t:
                del self._chains[key]
            if not t.cancelled() and t.exception() is not None:
                log.error("reservations %s: mirror update failed: %r", key.decode(), t.exception())
        chain.add_done_callback(done)

    async def _acknowledge(self, key: bytes, revision: int) -> None:
        parts = self.keys.reservation_key_parts(key)
        if parts is None:
            return
        try:
            await self.etcd.put(self.keys.reservation_ack(*parts, self.chunk_id), str(revision).encode())
        except Exception as e:  # noqa: BLE001 - the origin then waits for our lease instead
            log.warning("reservations %s: cannot acknowledge revision %d: %s", key.decode(), revision, e)

    async def confirmed(self, key: bytes, revision: int, wait: float | None = None) -> None:
        """Return once every other live chunk server acknowledged ``revision`` of ``key`` or
        lost its lease; after ``wait`` (``CONFIRM_WAIT``) at most, logged."""
        parts = self.keys.reservation_key_parts(key)
        if parts is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (CONFIRM_WAIT if wait is None else wait)
        pause = 0.005
        while True:
            try:
                missing = await self._unacknowledged(parts, revision)
            except Exception as e:  # noqa: BLE001 - etcd trouble: keep trying until the deadline
                missing = {f"? ({e})"}
            if not missing:
                return
            if loop.time() >= deadline:
                log.error("reservations %s: revision %d not acknowledged by %s; answering anyway",
                          key.decode(), revision, ", ".join(sorted(missing)))
                return
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.1)

    async def _unacknowledged(self, parts: tuple[str, int], revision: int) -> set[str]:
        chunks = self.keys.chunks()
        live = set()
        for kv in await self.etcd.get_prefix(chunks):
            p = Keys.chunk_key_parts(kv.key, chunks)
            if p is not None and p[1] == "live":
                live.add(p[0])
        live.discard(self.keys.reservation_ack(*parts, self.chunk_id).rsplit(b"/", 1)[1].decode())
        if not live:
            return set()
        acks_dir = self.keys.reservation_acks(*parts)
        acked = set()
        for kv in await self.etcd.get_prefix(acks_dir):
            try:
                if int(kv.value) >= revision:
                    acked.add(kv.key[len(acks_dir):].decode())
            except ValueError:
                pass
        return live - acked

    def _drop(self, key: bytes) -> None:
        self._seen.pop(key, None)

        async def drop() -> None:
            st = self._states.get(key)
            if st is not None:
                st.mirror(None, 0)
                st.revision = 0
        self._chain(key, drop)
