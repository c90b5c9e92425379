"""One interface over "a replica of an extent", local or remote.

The coordinator talks to its own chunk server's store directly (no socket,
no copy) and to peers through the replica client; both look the same here,
and every failure becomes one ``ReplicaFailed`` whose ``kind`` tells the
coordinator what to do: try another replica (read), drop it (write), or stop
because it was fenced.
"""

from __future__ import annotations

import errno

from .extent_file import ChecksumError
from .fencing import StaleEpochError
from .wire import Status

OK = _OK = Status.OK

# kinds
UNAVAILABLE = "unavailable"      # no answer: dead, partitioned, timed out
CHECKSUM = "checksum"
IO = "io"
NO_EXTENT = "no_extent"
NO_SPACE = "no_space"
STALE_EPOCH = "stale_epoch"
INVALID = "invalid"
CONFLICT = "conflict"
STALE_GENERATION = "stale_generation"    # SETGEN below the replica's generation: refused
DENIED = "denied"                # a mutation without an ownership epoch (epoch 0): refused
# The replica refused the request's epoch: take ownership (back) and repeat, never drop it.
FENCED = (STALE_EPOCH, DENIED)


class ReplicaFailed(Exception):
    """``unsent`` (UNAVAILABLE only): the request never reached the replica (not sent: no
    connection could be had, the replica client is closed, no registration record), so the
    replica cannot have applied it. False when it may have: an UNAVAILABLE after the request
    left (a reply overdue, the connection lost) says nothing of what the replica did."""

    def __init__(self, chunk_id: str, kind: str, detail: str = "", *, unsent: bool = False) -> None:
        super().__init__(f"replica on {chunk_id}: {kind}{': ' + detail if detail else ''}")
        self.chunk_id, self.kind, self.detail = chunk_id, kind, detail
        self.unsent = unsent


class LocalReplica:
    """This server's own ReplicaStore, called inline (page-cache I/O)."""

    def __init__(self, chunk_id: str, store, on_checksum_error=None) -> None:
        self.chunk_id, self.store = chunk_id, store
        self._on_checksum = on_checksum_error

    def _fail(self, vid: str, idx: int, e: Exception) -> ReplicaFailed:
        from .replica_store import NoExtent, StaleGeneration, StoreFull
        if isinstance(e, StaleEpochError):
            return ReplicaFailed(self.chunk_id, STALE_EPOCH, str(e))
        if isinstance(e, StaleGeneration):
            return ReplicaFailed(self.chunk_id, STALE_GENERATION, str(e))
        if isinstance(e, ChecksumError):
            if self._on_checksum:
                self._on_checksum(vid, idx, e.block)
            return ReplicaFailed(self.chunk_id, CHECKSUM, str(e))
        if isinstance(e, NoExtent):
            return ReplicaFailed(self.chunk_id, NO_EXTENT, str(e))
        if isinstance(e, StoreFull) or (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)):
            return ReplicaFailed(self.chunk_id, NO_SPACE, str(e))
        if isinstance(e, ValueError):
            return ReplicaFailed(self.chunk_id, INVALID, str(e))
        return ReplicaFailed(self.chunk_id, IO, f"{type(e).__name__}: {e}")

    def _run(self, vid, idx, epoch, fn, *args, **kw):
        """A read-only request: epoch 0 (a view, an export) runs without admission."""
        try:
            if epoch:
                self.store.admit(vid, idx, epoch)
            return fn(*args, **kw)
        except Exception as e:  # noqa: BLE001 - every store failure maps to a kind
            raise self._fail(vid, idx, e) from None

    def _unfenced(self, what: str) -> ReplicaFailed:
        """A mutation at epoch 0: DENIED, as the replica server answers it; never run unfenced."""
        return ReplicaFailed(self.chunk_id, DENIED, f"{what} needs an ownership epoch")

    def _mutate(self, vid, idx, epoch, fn, *args, **kw):
        if not epoch:
            raise self._unfenced(getattr(fn, "__name__", "a mutation").upper())
        return self._run(vid, idx, epoch, fn, *args, **kw)

    async def _mutate_async(self, vid, idx, epoch, what, fn, *args):
        """``_mutate`` for a store coroutine ``fn``: admitted before it runs, its failures
        (also one raised part-way, after a yield) mapped alike."""
        if not epoch:
            raise self._unfenced(what)
        try:
            self.store.admit(vid, idx, epoch)
            return await fn(*args)
        except Exception as e:  # noqa: BLE001 - every store failure maps to a kind
            raise self._fail(vid, idx, e) from None

    async def read(self, vid, idx, off, length, epoch, view=0):
        return self._run(vid, idx, epoch, self.store.read, vid, idx, off, length, view)

    async def write(self, vid, idx, off, data, epoch, seq, fua=False, sole=False):
        """``sole``: this is the extent's only in-sync replica (the coordinator's ``_sole``),
        so the store records an intent before the write (``ReplicaStore.write``). Likewise
        for ``unmap``, ``revert`` and ``write_now``, and ``RemoteReplica``'s, over the wire."""
        if not epoch:
            raise self._unfenced("WRITE")
        later = self._run(vid, idx, epoch, self._write_at, vid, idx, off, data, seq, epoch, sole)
        if later is not None:
            await self.finish(vid, idx, later)
        if fua:
            await self.flush(vid, idx, epoch)

    start_write = write        # the coordinator's one call for every replica; runs on await

    def _write_at(self, vid, idx, off, data, seq, epoch, sole):
        return self.store.write(vid, idx, off, data, seq, epoch=epoch, sole=sole)

    def write_now(self, vid, idx, off, data, epoch, seq, sole=False):
        """``write`` without FUA and without a coroutine (the coordinator's fast path):
        admission and write in one store call. Not through ``_run``: its argument packing
        cost a measurable share of the coordinator's hot path; the failure mapping is the
        same ``_fail``. None when written; a write that waits for the disk (a COW) returns
        the store's coroutine finishing it: await it through ``finish``. ``sole`` as in
        ``write``, handed on as it came (no test: this is the 4 KiB hot path)."""
        if not epoch:
            raise self._unfenced("WRITE")
        try:
            return self.store.admit_write(vid, idx, epoch, off, data, seq, sole)
        except Exception as e:  # noqa: BLE001 - every store failure maps to a kind
            raise self._fail(vid, idx, e) from None

    async def finish(self, vid, idx, later) -> None:
        """Await a write (or unmap) the store finishes after a wait, failures mapped."""
        try:
            await later
        except Exception as e:  # noqa: BLE001 - every store failure maps to a kind
            raise self._fail(vid, idx, e) from None

    async def unmap(self, vid, idx, off, length, epoch, seq, zero=False, sole=False):
        """``sole`` as in ``write``, for the zeros it writes (``zero``, partial edges)."""
        if not epoch:
            raise self._unfenced("UNMAP")
        later = self._run(vid, idx, epoch, self._unmap_at, vid, idx, off, length, seq, zero, epoch,
                          sole)
        if later is not None:
            await self.finish(vid, idx, later)

    def _unmap_at(self, vid, idx, off, length, seq, zero, epoch, sole):
        return self.store.unmap(vid, idx, off, length, seq, zero, epoch=epoch, sole=sole)

    async def flush(self, vid, idx, epoch):
        # Admitted first, as the replica server admits FLUSH: a deposed owner is told it is
        # fenced (and takes the volume back, flushing what the other owner wrote), instead of
        # answering SYNCHRONIZE CACHE GOOD over its own writes only. The sync runs in a thread.
        await self._mutate_async(vid, idx, epoch, "FLUSH", self.store.flush_async, vid, idx)

    async def create(self, vid, idx, epoch, generation, discard_broken=False):
        # Admitted before any disk change (a fenced owner creates or discards nothing), and
        # again after, so that the new extent's header carries the epoch.
        self._mutate(vid, idx, epoch, self.store.create, vid, idx, generation, discard_broken)
        self._run(vid, idx, epoch, lambda: None)

    async def fence(self, vid, idx, epoch):
        """Raise this server's fence for the volume to ``epoch`` (extent ``idx`` here or not)."""
        self._run(vid, idx, epoch, lambda: None)

    async def revert(self, vid, idx, epoch, to_seq, seq, sole=False):
        """Done once synced, as the replica server answers REVERT: nothing flushes it later.
        By 1 MiB runs yielding to the loop (``revert_async``), the epoch admitted again after
        each: in one call, a whole extent's revert on a slow disk held up every other volume
        on this server long enough for their peers to time out and drop replicas. ``sole`` as
        in ``write``, for the blocks it writes back."""
        await self._mutate_async(vid, idx, epoch, "REVERT", self.store.revert_async,
                                 vid, idx, to_seq, seq, epoch, sole)
        await self.flush(vid, idx, epoch)

    async def export(self, vid, idx, off, length, epoch=0):
        return self._run(vid, idx, epoch, self.store.export, vid, idx, off, length)

    async def import_(self, vid, idx, blob, epoch):
        ok = self._mutate(vid, idx, epoch, self.store.import_, vid, idx, blob)
        if ok is False:
            raise ReplicaFailed(self.chunk_id, CONFLICT)

    async def setgen(self, vid, idx, epoch, generation):
        await self._mutate_async(vid, idx, epoch, "SETGEN", self.store.set_generation_async,
                                 vid, idx, generation)

    async def digest(self, vid, idx):
        return self._run(vid, idx, 0, self.store.digest, vid, idx)


class RemoteReplica:
    """A peer's store through the pipelined replica client."""

    def __init__(self, chunk_id: str, addr: tuple[str, int], client) -> None:
        self.chunk_id, self.addr, self.client = chunk_id, addr, client

    async def _call(self, coro):
        from . import replica_client as rc
        try:
            return await coro
        except rc.PeerUnavailable as e:
            raise ReplicaFailed(self.chunk_id, UNAVAILABLE, str(e), unsent=e.unsent) from None
        except rc.ReplicaError as e:
            raise ReplicaFailed(self.chunk_id, _status_kind(e), str(e)) from None

    async def read(self, vid, idx, off, length, epoch, view=0):
        return await self._call(self.client.read(self.addr, vid, idx, off, length, epoch=epoch, view=view))

    async def write(self, vid, idx, off, data, epoch, seq, fua=False, sole=False):
        """``sole`` as in ``LocalReplica.write``: WRITE args.sole (``ReplicaClient``); likewise
        for ``start_write``, ``send_write``, ``unmap`` and ``revert``."""
        await self._call(self.client.write(self.addr, vid, idx, off, data, epoch=epoch, seq=seq,
                                           fua=fua, sole=sole))

    def start_write(self, vid, idx, off, data, epoch, seq, fua=False, sole=False):
        """Send the write now (no task) and return a coroutine awaiting its outcome."""
        fut = self.client.start_write(self.addr, vid, idx, off, data, epoch, seq, fua, sole)
        if fut is None:                                   # not connected yet: dial on await
            return self.write(vid, idx, off, data, epoch, seq, fua, sole)
        return self._reply(fut)

    async def _reply(self, fut):
        try:
            await fut
        except Exception:  # noqa: BLE001 - read from the future below
            pass
        failure = self.outcome(fut)
        if failure is not None:
            raise failure

    @property
    def connected(self) -> bool:
        """A request sent now leaves at once (no dial): the fast path's precondition."""
        return self.client.connected(self.addr)

    async def connect(self) -> None:
        """Dial now, sending nothing (a failure shows on the next request, at once)."""
        await self.client.dial(self.addr)

    def send_write(self, vid, idx, off, data, epoch, seq, on_reply, sole=False) -> bool:
        """Send a WRITE (no FUA) on the open connection; ``on_reply`` gets its answer (see
        ``outcome_of``). False if it could not be sent. ``sole`` handed on as it came (no
        test: this is the 4 KiB hot path)."""
        return self.client.send_write(self.addr, vid, idx, off, data, epoch, seq, on_reply, sole)

    def outcome(self, fut) -> ReplicaFailed | None:
        """None if the done reply future ``fut`` says OK, else the failure it means."""
        if fut.cancelled():
            return ReplicaFailed(self.chunk_id, UNAVAILABLE, "request cancelled")
        e = fut.exception()
        return self.outcome_of(e if e is not None else fut.result())

    def outcome_of(self, reply) -> ReplicaFailed | None:
        """None if a reply says OK, else the failure it means; ``reply`` is None (a plain OK),
        a reply Frame, or the exception the request failed with."""
        if isinstance(reply, BaseException):
            e = reply
            if isinstance(e, (ConnectionError, OSError)):
                return ReplicaFailed(self.chunk_id, UNAVAILABLE, f"{self.addr[0]}:{self.addr[1]}: {e}")
            return ReplicaFailed(self.chunk_id, IO, f"{type(e).__name__}: {e}")
        if reply is None or reply.status is _OK:        # None: start_write's plain OK
            return None
        from . import replica_client as rc
        try:
            rc.check(reply)
        except rc.ReplicaError as e:
            return ReplicaFailed(self.chunk_id, _status_kind(e), str(e))
        return None

    async def unmap(self, vid, idx, off, length, epoch, seq, zero=False, sole=False):
        await self._call(self.client.unmap(self.addr, vid, idx, off, length, epoch=epoch, seq=seq,
                                           zero=zero, sole=sole))

    async def flush(self, vid, idx, epoch):
        await self._call(self.client.flush(self.addr, vid, idx, epoch=epoch))

    async def create(self, vid, idx, epoch, generation, discard_broken=False):
        await self._call(self.client.create(self.addr, vid, idx, epoch=epoch, generation=generation,
                                            discard_broken=discard_broken))

    async def fence(self, vid, idx, epoch):
        """Raise the peer's fence for the volume to ``epoch``: a STAT carrying it, which the
        peer admits before anything else, so NO_EXTENT (nothing of ``idx`` there) still
        means fenced (in the peer's memory then, for a volume it holds nothing of)."""
        try:
            await self._call(self.client.stat(self.addr, vid, idx, epoch=epoch))
        except ReplicaFailed as e:
            if e.kind != NO_EXTENT:
                raise

    async def revert(self, vid, idx, epoch, to_seq, seq, sole=False):
        await self._call(self.client.revert(self.addr, vid, idx, epoch=epoch, to_seq=to_seq,
                                            seq=seq, sole=sole))

    async def export(self, vid, idx, off, length, epoch=0):
        return await self._call(self.client.export(self.addr, vid, idx, off, length, epoch=epoch))

    async def import_(self, vid, idx, blob, epoch):
        ok = await self._call(self.client.import_(self.addr, vid, idx, blob, epoch=epoch))
        if ok is False:
            raise ReplicaFailed(self.chunk_id, CONFLICT)

    async def setgen(self, vid, idx, epoch, generation):
        await self._call(self.client.setgen(self.addr, vid, idx, epoch=epoch, generation=generation))

    async def digest(self, vid, idx):
        return await self._call(self.client.digest(self.addr, vid, idx))


def _status_kind(e) -> str:
    from .wire import Status
    return {Status.STALE_EPOCH: STALE_EPOCH, Status.CHECKSUM: CHECKSUM, Status.NO_EXTENT: NO_EXTENT,
            Status.IO_ERROR: IO, Status.NO_SPACE: NO_SPACE, Status.INVALID: INVALID,
            Status.CONFLICT: CONFLICT,
            Status.STALE_GENERATION: STALE_GENERATION, Status.DENIED: DENIED}.get(getattr(e, "status", None), IO)
