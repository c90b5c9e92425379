"""Serves this chunk server's ``ReplicaStore`` to its peers on the data port.

One connection per peer carries many outstanding requests (wire.Pipeline on
the other end).  After the HELLO handshake (peer_auth, bounded by
``auth_timeout``; nothing touches the disk before it succeeds) each request
runs as soon as it is read:

* Store calls are synchronous file I/O and run inline on the event loop, in
  arrival order, so two pipelined writes to one block land in the order the
  coordinator sent them.  Only fdatasync (FLUSH, FUA writes, the flush of REVERT
  and of SETGEN) goes to a thread (the store's ``*_async`` calls, which clean up a
  failed one on the loop); those replies go out when the sync completes,
  overtaking nothing else.  REVERT (a whole extent) runs as a task, one 1 MiB run
  at a time on the loop (``revert_async``), so requests that arrive meanwhile are
  served between its runs; its epoch is admitted again before each run.
* Requests are cut straight out of each segment the socket delivers, in the
  protocol's callback (``_Stream``: no StreamReader copies, no task wakeup per
  segment), and handled in order; their replies are queued and written
  together at the end of the segment (a QD32 burst is answered with one
  send).  When the socket's send buffer is backed up, reading pauses (TCP
  back-pressure) until the connection's task has drained it, and at most
  ``max_inflight`` syncs are outstanding per connection.
* A plain WRITE (data, no args: every replicated 4 KiB write but FUA and a sole
  replica's, whose ``args.sole`` asks for an intent record first) takes a
  fast path (``_write``): header fields straight from the buffer, one store
  call, the OK reply packed in one go; no Frame objects.  Anything unusual or
  failing is answered exactly as on the general path.

Ownership fencing: every op naming a volume first passes ``store.admit``
with the request's epoch.  Epoch 0 is the read-only user (snapshot export,
read-only LUN): allowed for READ, EXPORT, DIGEST and STAT without admission,
DENIED for everything else.

DIGEST with ``args.checked`` answers ``checked_digest`` (the state checksums cover, for
the scrubber's tie check) and says so in its reply's args: a server without it ignores
the arg and answers the full digest, which the caller must not take for the other. The
reply's args also carry the replica's ``mutations`` and ``pending`` (deferred writes in
progress) from ``ReplicaStore.stat`` at that moment: the scrubber trusts the digest only
from a replica at rest (``Scrubber._peer_same``).

Generations: SETGEN never lowers an extent's (STALE_GENERATION). No other request's
generation is checked (the replicated write sends 0): an extent's header holds the
generation its replica joined at, which a SETGEN whose join the meta then refused
leaves ahead of the extent record, so a current owner's generation can be below it;
a deposed owner is refused by its epoch.

Errors map to statuses (``_failure``); a frame that cannot be decoded, or a
reply sent to us, closes the connection: the stream is out of sync.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import struct
from collections import Counter
from typing import Any, Awaitable, Callable

from .extent_file import ChecksumError
from .link import Link
from .fencing import StaleEpochError
from .peer_auth import server_handshake
from .replica_store import NoExtent, StaleGeneration, StoreError, StoreFull, StoreIOError
from .wire import (
    FLUSH_EVERY, HEADER_SIZE, MAX_DATA, MAX_FRAME, READ_SIZE, Frame, FrameError, FrameReader,
    FrameWriter, Op, PartialFrame, Status, TruncatedFrame, VersionMismatch, decode_at, encode,
    encode_sole_write_ok, encode_write_ok, legacy_refusal, plain_write, spans,
)

__all__ = ["ReplicaServer", "checked_digest"]

log = logging.getLogger(__name__)

# Ops a read-only user (epoch 0) may send; they skip admission then.
READ_ONLY = frozenset({Op.READ, Op.EXPORT, Op.DIGEST, Op.STAT})
HIGH_WATER = 4 << 20           # bytes of unsent replies before the reader waits for the socket
HANDSHAKE_BUFFER = 4 * READ_SIZE   # unread bytes of a connection not authenticated yet: pause
HANDSHAKE_FRAME = 4096             # largest frame before the peer has proved the secret
MAX_UNAUTHENTICATED = 128          # connections still in their handshake; past it the oldest goes
MAX_UNAUTHENTICATED_PER_IP = 8     # handshakes from one source address at once; more are refused
HELLO_TIMEOUT = 2.0                # for the first HELLO frame (the whole handshake: auth_timeout)
WRITE_TIMEOUT = 30.0               # a peer reading none of our replies this long is cut off
DEFERRED = 2                       # ``ReplicaServer._write``: handled, answered from a task
_LEN = struct.Struct(">I")
_NAMES = {op: op.name for op in Op}    # Enum.name is a property lookup per call
_STATUS_NAMES = {st: st.name for st in Status}

ChecksumHook = Callable[[str, int, int], "Awaitable[None] | None"]


class _Conn:
    """One authenticated peer connection: its reply queue and outstanding syncs."""

    def __init__(self, writer: asyncio.StreamWriter, peer: str) -> None:
        self.writer = writer
        self.peer = peer
        self.queue: list[bytes] = []
        self.queued = 0
        self.flush_scheduled = False
        self.tasks: set[asyncio.Task] = set()
        self.closed = False

    def send(self, frame: Frame) -> None:
        try:
            raw = encode(frame)
        except ValueError as e:           # a store answer too big for a frame: a bug, not the peer's
            log.error("reply to %s %s does not fit a frame: %s", self.peer, frame.op.name, e)
            raw = encode(frame.reply(Status.IO_ERROR, args={"error": "reply too large"}))
        if self.closed:
            return
        self.queue.append(raw)
        self.queued += len(raw)
        if len(self.queue) >= FLUSH_EVERY:
            self.flush()                    # see wire.FLUSH_EVERY
            return
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        if self.queue and not self.closed and not self.writer.is_closing():
            if len(self.queue) == 1:
                self.writer.write(self.queue[0])
            else:
                self.writer.writelines(self.queue)
        self.queue.clear()
        self.queued = 0

    def backed_up(self) -> bool:
        return self.queued + self.writer.transport.get_write_buffer_size() > HIGH_WATER


_BLOCKED, _EOF, _CLOSE = "blocked", "eof", "close"


class _Stream:
    """The requests of an authenticated connection, served as they arrive (in ``feed``, on
    the protocol's callback): complete frames are cut straight out of each received segment,
    an incomplete one is kept in pieces until it is whole.

    What cannot be done in a callback is left to the connection's task through
    ``next()``: waiting for the socket (replies backed up) or for syncs (``max_inflight``),
    with reading paused meanwhile (``_BLOCKED``, then ``resume``); the end of the stream
    (``_EOF``); a frame error, a reply frame (``_CLOSE``) or a lost connection (the error).
    """

    def __init__(self, server: ReplicaServer, conn: _Conn, link: Link) -> None:
        self.server, self.conn, self.link = server, conn, link
        self._partial = PartialFrame()     # an incomplete frame (and what followed it)
        self._rest: tuple[bytes, int] | None = None   # (buffer, position) to go on at, blocked
        self._late: list[bytes] = []       # received while blocked (reading is paused then)
        self._eof = False
        self._state: Any = None            # the next event for the task
        self._waiter: asyncio.Future | None = None

    # -- the protocol side -------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        if self._rest is not None:
            self._late.append(data)         # blocked: kept for resume
            return
        if self._state is not None or self.conn.closed:
            return                          # the connection is ending
        data = self._partial.add(data)
        if data is not None:
            self._run(data, 0)

    def feed_eof(self) -> None:
        self._eof = True
        if self._state is None and self._rest is None:
            self._end()

    def lost(self, exc: BaseException | None) -> None:
        if exc is None:
            self.feed_eof()
        else:
            self._signal(exc, force=True)

    def _run(self, buf: bytes, pos: int) -> None:
        """Serve every complete frame of ``buf`` from ``pos``; keep an incomplete rest."""
        server, conn = self.server, self.conn
        write, tasks, limit = server._write, conn.tasks, server.max_inflight
        cut, used, error = spans(buf, MAX_FRAME, pos)
        view = memoryview(buf)
        for start, n in cut:
            h = plain_write(buf, start, n)
            if h is not None:
                done = write(conn, buf, view, start, n, h)
                if done:
                    if done is not True and len(tasks) >= limit:    # it waits for the disk
                        self._block(buf, start + n)
                        return
                    if len(conn.queue) >= FLUSH_EVERY:
                        conn.flush()        # the coordinator completes these while we go on
                    continue
            try:
                frame = decode_at(buf, start, n)
            except FrameError as e:
                self._signal(e)
                return
            if not server._request(conn, frame):
                self._signal(_CLOSE)
                return
            if conn.backed_up() or len(tasks) >= limit:
                self._block(buf, start + n)
                return
        if error is not None:
            self._signal(error)
            return
        self._partial.keep(buf, used)
        conn.flush()                        # the segment's replies, in one send
        if conn.backed_up():
            self._block(b"", 0)
        elif self._eof:
            self._end()

    def _block(self, buf: bytes, pos: int) -> None:
        self._rest = (buf, pos)
        self.conn.flush()                   # what is answered goes out while we wait
        self.link.pause()
        self._signal(_BLOCKED)

    def _end(self) -> None:
        if not self._partial.pieces:
            self._signal(_EOF)
            return
        raw = b"".join(self._partial.pieces)
        if len(raw) < 4:
            self._signal(TruncatedFrame(f"stream ended inside a length prefix ({len(raw)} bytes)"))
        else:
            self._signal(TruncatedFrame(f"stream ended after {len(raw) - 4} of "
                                        f"{_LEN.unpack_from(raw)[0]} bytes"))

    def _signal(self, state: Any, force: bool = False) -> None:
        if self._state is None or force:
            self._state = state
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the task side -------------------------------------------------------------------

    async def next(self) -> Any:
        """The next event (above); ``_BLOCKED`` is consumed by calling ``resume``."""
        if self._state is None:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._state

    def resume(self) -> None:
        """Go on after ``_BLOCKED`` once the task has waited for the socket or the syncs."""
        if self._state is not _BLOCKED:
            return
        self._state = None
        (buf, pos), self._rest = self._rest or (b"", 0), None
        late, self._late = self._late, []
        self.link.resume()
        if buf:                             # nothing is kept in _partial then
            if late:
                buf, pos = buf[pos:] + b"".join(late), 0
            self._run(buf, pos)
        else:
            for data in late:
                self.feed(data)
        if self._state is None and self._rest is None and self._eof:
            self._end()

    def feed_raw(self, raw: bytes) -> None:
        """Bytes read ahead during the handshake, before anything newer."""
        if raw:
            self._run(raw, 0)


class ReplicaServer:
    """The replication port: authenticated peers reading and writing extent replicas."""

    def __init__(self, store, secret: bytes, cluster_id: str, host: str = "127.0.0.1",
                 port: int = 0, *, auth_timeout: float = 10.0,
                 hello_timeout: float = HELLO_TIMEOUT, write_timeout: float = WRITE_TIMEOUT,
                 max_inflight: int = 64, on_checksum_error: ChecksumHook | None = None) -> None:
        self.store = store
        self.secret = secret
        self.cluster_id = cluster_id
        self.host = host
        self._port = port
        self.auth_timeout = auth_timeout
        self.hello_timeout = hello_timeout
        self.write_timeout = write_timeout
        self.max_inflight = max_inflight
        self.on_checksum_error = on_checksum_error
        self.requests: Counter[str] = Counter()          # op name -> requests served
        self.errors: Counter[tuple[str, str]] = Counter()  # (op, status) -> non-OK replies
        self.auth_failures = 0
        self.dropped = 0                                 # connections closed for bad frames
        self._server: asyncio.AbstractServer | None = None
        self._handlers: set[asyncio.Task] = set()
        # Handshakes in progress, oldest first: task -> (source address, writer).
        self._pending: dict[asyncio.Task, tuple[str, asyncio.StreamWriter]] = {}
        self._pending_from: Counter[str] = Counter()    # source address -> handshakes
        self._hooks: set[asyncio.Task] = set()
        self._volumes: dict[bytes, str] = {}          # volume bytes -> name, for the fast path

    @property
    def port(self) -> int:
        """The bound port (the real one when constructed with port 0)."""
        if self._server is not None and self._server.sockets:
            return self._server.sockets[0].getsockname()[1]
        return self._port

    @property
    def _authenticating(self) -> int:
        """Connections still in their handshake."""
        return len(self._pending)

    @property
    def connections(self) -> int:
        return len(self._handlers)

    def counters(self) -> dict[str, int]:
        """Flat counters for the metrics endpoint."""
        out = {f"requests.{op}": n for op, n in self.requests.items()}
        out.update({f"errors.{op}.{st}": n for (op, st), n in self.errors.items()})
        out["auth_failures"] = self.auth_failures
        out["dropped_connections"] = self.dropped
        out["connections"] = self.connections
        return out

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Link(self._serve, handshake_buffer=HANDSHAKE_BUFFER), self.host, self._port)
        log.info("replica server listening on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        """Stop listening and drop every connection (outstanding syncs finish on their own).

        The connections go before ``wait_closed``: since Python 3.12.1 it waits for every
        accepted connection to end, so with a peer connected (every other chunk server keeps
        one open) awaiting it first never returned. Bounded all the same."""
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, *self._hooks, return_exceptions=True)
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            except asyncio.TimeoutError:
                log.warning("replica server: connections still open 2s after stop; not waiting")

    # -- connections -----------------------------------------------------------

    async def _serve(self, link: Link, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        where = writer.get_extra_info("peername")
        # Nothing big before the secret is proved: a stranger's frames are bounded by the
        # handshake's small frame limit, and only so many handshakes run at once: a few per
        # source address, the first HELLO due within hello_timeout, and past the global limit
        # the oldest handshake is aborted (so idle sockets cannot lock peers out for long).
        # The handshake cuts one frame at a time: what follows the proof is left as raw bytes
        # for _Stream (the full frame limit, back-pressure), not decoded here.
        frames = FrameReader(link.inbox, max_frame=HANDSHAKE_FRAME,  # type: ignore[arg-type]
                             one_frame=True)
        out = FrameWriter(writer)
        conn: _Conn | None = None
        clean = False                   # ended at the peer's EOF with every reply drained
        try:
            source = where[0] if isinstance(where, tuple) and where else str(where)
            if self._pending_from[source] >= MAX_UNAUTHENTICATED_PER_IP:
                self.auth_failures += 1
                log.warning("replica connection from %s refused: %d handshakes from %s already "
                            "running", where, self._pending_from[source], source)
                return
            if len(self._pending) >= MAX_UNAUTHENTICATED:
                self._evict_oldest()
            self._pending[task] = (source, writer)
            self._pending_from[source] += 1
            try:
                peer = await asyncio.wait_for(
                    server_handshake(frames, out, self.secret, self.cluster_id,
                                     hello_timeout=self.hello_timeout), self.auth_timeout)
            except Exception as e:       # whatever a stranger's bytes cause: refused, counted
                self.auth_failures += 1
                if isinstance(e, VersionMismatch) and e.legacy:
                    writer.write(legacy_refusal(str(e)))     # an older peer logs why
                log.warning("replica connection from %s refused: %s: %.200s", where,
                            type(e).__name__, e)          # once per connection, no traceback
                return
            finally:
                self._unpend(task)
            conn = _Conn(writer, f"{peer}@{where}")
            clean = await self._requests(frames, conn, link)
        except (ConnectionError, OSError) as e:
            log.info("replica connection %s lost: %s", conn.peer if conn else where, e)
        except asyncio.CancelledError:
            # stop(): end quietly (asyncio's stream callback would log a cancelled task)
            pass
        finally:
            self._handlers.discard(task)
            if conn is not None:
                conn.flush()
                conn.closed = True
                for t in conn.tasks:
                    t.cancel()
            # After an error (or stop()) with data still unsent, abort: close() would wait
            # for a peer that may never read it. Any close is bounded by write_timeout too.
            transport = writer.transport
            if not clean and transport.get_write_buffer_size():
                transport.abort()
            else:
                writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), self.write_timeout)
            except asyncio.TimeoutError:
                transport.abort()
            except (ConnectionError, OSError):
                pass

    def _unpend(self, task: asyncio.Task) -> None:
        """``task``'s handshake is over (done, failed or evicted); idempotent."""
        entry = self._pending.pop(task, None)
        if entry is not None:
            source = entry[0]
            self._pending_from[source] -= 1
            if self._pending_from[source] <= 0:
                del self._pending_from[source]

    def _evict_oldest(self) -> None:
        """Make room for a new handshake: abort the one running longest (its task then fails
        its handshake and counts it)."""
        task, (source, writer) = next(iter(self._pending.items()))
        self._unpend(task)
        log.warning("replica handshake from %s aborted: %d handshakes running, a newer "
                    "connection needs the room", source, MAX_UNAUTHENTICATED)
        writer.transport.abort()

    async def _requests(self, frames: FrameReader, conn: _Conn, link: Link) -> bool:
        """Serve requests in arrival order until the peer closes (or breaks the stream); True
        at a clean end of stream, every reply drained.

        Frames are served by ``_Stream`` as they arrive; this task only waits when it must
        (socket backed up, ``max_inflight`` syncs) and ends the connection.
        """
        tasks, limit = conn.tasks, self.max_inflight
        ready, raw, error = frames.detach()     # one_frame: nothing decoded ahead, no error
        assert not ready and error is None
        stream = _Stream(self, conn, link)
        link.attach(stream)
        stream.feed_raw(raw)                    # pipelined behind the proof: served like the rest
        link.inbox.hand_over(stream)
        while True:
            event = await stream.next()
            if event is _BLOCKED:
                if conn.backed_up():
                    conn.flush()
                    await self._drain(conn)
                while len(tasks) >= limit:
                    await asyncio.wait(set(tasks), return_when=asyncio.FIRST_COMPLETED)
                stream.resume()
            elif event is _EOF:
                break
            elif event is _CLOSE:
                return False
            elif isinstance(event, FrameError):
                self._drop(conn, event)
                return False
            else:
                raise event                            # the connection was lost
        # Clean end of stream: answer what is still syncing, then close.
        if conn.tasks:
            await asyncio.wait(set(conn.tasks))
        conn.flush()
        await self._drain(conn)
        return True

    async def _drain(self, conn: _Conn) -> None:
        """Wait for the socket to take our replies, at most ``write_timeout``: a peer that
        stops reading is cut off (aborted), not waited for forever."""
        try:
            await asyncio.wait_for(conn.writer.drain(), self.write_timeout)
        except asyncio.TimeoutError:
            conn.writer.transport.abort()
            log.warning("replica connection %s: peer read none of our replies for %gs; aborted",
                        conn.peer, self.write_timeout)
            raise ConnectionError(f"peer read none of our replies for {self.write_timeout:g}s; "
                                  f"aborted") from None

    def _drop(self, conn: _Conn, e: FrameError) -> None:
        self.dropped += 1
        log.warning("closing replica connection %s: %s", conn.peer, e)

    def _request(self, conn: _Conn, frame: Frame) -> bool:
        """Handle one decoded frame; False when it is a reply, which closes the connection."""
        if frame.status is not None:
            self.dropped += 1
            log.warning("closing replica connection %s: it sent a reply (%s id %d)",
                        conn.peer, frame.op.name, frame.id)
            return False
        self._handle(conn, frame)
        return True

    def _write(self, conn: _Conn, buf: bytes, view: memoryview, start: int, n: int,
               h: tuple) -> bool | int:
        """The fast path of a ``plain_write`` WRITE (no args, so no FUA; or args ``sole`` alone, a
        sole replica's: its data after them, ``sole`` to the store): the checks, store calls
        and counters of ``_handle``/``_execute`` without a Frame, the reply cut from the
        request's own header.  False (nothing done) when the general path must take it: epoch 0, a
        length that does not match the data, a volume that is not UTF-8.  Every error goes
        through ``_failure`` exactly as on the general path.  The OK reply is queued for the
        flush at the end of the segment (``_Stream._run``). A write the store must finish
        after a wait for the disk (``ReplicaStore.write``'s coroutine: a COW) is answered from
        a task (``DEFERRED``, counted against ``max_inflight``)."""
        epoch, vlen, alen = h[6], h[11], h[12]
        pos = start + HEADER_SIZE
        length = h[9]
        if not epoch or (length and length != n - HEADER_SIZE - vlen - alen):
            return False
        raw = buf[pos:pos + vlen]
        vid = self._volumes.get(raw)
        if vid is None:
            try:
                vid = raw.decode()
            except UnicodeDecodeError:
                return False
            if len(self._volumes) >= 4096:
                self._volumes.clear()
            self._volumes[raw] = vid
        self.requests["WRITE"] += 1
        try:
            if alen:                            # args.sole (plain_write takes no other args)
                st = self.store                 # as ``_execute`` calls it
                st.admit(vid, h[5], epoch)
                later = st.write(vid, h[5], h[8], view[pos + vlen + alen:start + n], h[10],
                                 epoch=epoch, sole=True)
            else:
                later = self.store.admit_write(vid, h[5], epoch, h[8], view[pos + vlen:start + n],
                                               h[10])
        except Exception as e:
            self._reply(conn, self._failure(decode_at(buf, start, n), e))
            return True
        if later is not None:
            self._later(conn, decode_at(buf, start, n), lambda: later)
            return DEFERRED
        reply = encode_sole_write_ok(buf, start, vlen) if alen else encode_write_ok(buf, start, vlen)
        conn.queue.append(reply)
        conn.queued += len(reply)
        return True

    # -- requests ----------------------------------------------------------------

    def _handle(self, conn: _Conn, frame: Frame) -> None:
        """Run one request; reply now, or from a task when it must wait for a sync."""
        self.requests[_NAMES[frame.op]] += 1
        try:
            result = self._execute(frame)
        except Exception as e:
            self._reply(conn, self._failure(frame, e))
            return
        if isinstance(result, Frame):
            self._reply(conn, result)
            return
        self._later(conn, frame, result)

    def _later(self, conn: _Conn, frame: Frame, wait: Callable[[], Awaitable[None]]) -> None:
        """Answer ``frame`` once ``wait()`` is done, from a task of the connection's."""
        task = asyncio.get_running_loop().create_task(self._finish(conn, frame, wait))
        conn.tasks.add(task)
        task.add_done_callback(conn.tasks.discard)

    async def _finish(self, conn: _Conn, frame: Frame,
                      sync: Callable[[], Awaitable[None]]) -> None:
        try:
            await sync()
            reply = frame.reply(Status.OK)
        except Exception as e:
            reply = self._failure(frame, e)
        self._reply(conn, reply)

    def _reply(self, conn: _Conn, reply: Frame) -> None:
        if reply.status is not Status.OK:
            assert reply.status is not None
            self.errors[(_NAMES[reply.op], _STATUS_NAMES[reply.status])] += 1
        conn.send(reply)

    def _execute(self, f: Frame) -> Frame | Callable[[], Awaitable[None]]:
        """The reply, or the store's coroutine (a sync in a thread) to await before replying OK."""
        st, vid, idx = self.store, f.volume, f.extent
        if f.op is Op.PING:
            return f.reply()
        if f.op is Op.HELLO:
            raise ValueError("already authenticated")
        if not vid:
            raise ValueError(f"{f.op.name} needs a volume")
        if f.epoch == 0:
            if f.op not in READ_ONLY:
                return f.reply(Status.DENIED, args={"error": f"{f.op.name} needs an ownership epoch"})
        elif f.op is Op.CREATE:
            st.admit(vid, idx, f.epoch)         # before any disk change: a fenced owner changes nothing
            st.create(vid, idx, _positive(f.generation, "generation"),
                      _arg(f, "discard_broken", bool, False))
            st.admit(vid, idx, f.epoch)         # the new extent's header takes the epoch
            return f.reply()
        else:
            st.admit(vid, idx, f.epoch)

        if f.op is Op.READ:
            if f.length > MAX_DATA:
                raise ValueError(f"read of {f.length} bytes exceeds {MAX_DATA}")
            data, present = st.read(vid, idx, f.offset, f.length, view=f.seq)
            return f.reply(Status.OK, data, {"present": bytes(present)})
        if f.op is Op.WRITE:
            if f.data is None:
                raise ValueError("WRITE without data")
            if f.length not in (0, len(f.data)):
                raise ValueError(f"WRITE length {f.length} but {len(f.data)} data bytes")
            fua = _arg(f, "fua", bool, False)
            # ``sole``: this replica is the extent's only one in sync (the coordinator says):
            # an intent record first (``ExtentFile``). A peer older than the arg ignores it.
            later = st.write(vid, idx, f.offset, f.data, f.seq, fua=False, epoch=f.epoch,
                             sole=_arg(f, "sole", bool, False))
            if later is None:
                return (lambda: st.flush_async(vid, idx)) if fua else f.reply()

            async def finish() -> None:
                await later
                if fua:
                    await st.flush_async(vid, idx)
            return finish
        if f.op is Op.UNMAP:
            later = st.unmap(vid, idx, f.offset, f.length, f.seq, zero=_arg(f, "zero", bool, False),
                             epoch=f.epoch, sole=_arg(f, "sole", bool, False))
            return f.reply() if later is None else (lambda: later)
        if f.op is Op.FLUSH:
            return lambda: st.flush_async(vid, idx)
        if f.op is Op.REVERT:
            to = _arg(f, "to", int, None)
            if to is None or to < 0:
                raise ValueError("REVERT needs args.to, a snapshot seq >= 0")
            epoch, seq, sole = f.epoch, f.seq, _arg(f, "sole", bool, False)
            # A whole extent's revert can take long on a slow disk: run by runs, yielding to the
            # loop between them (``revert_async``), not in one call that stops every other
            # request (other volumes' writes time out and their replicas are dropped). Answered
            # once on disk: the coordinator counts no reverted extent as unflushed, so no later
            # FLUSH would sync it, and a host crash could lose the revert under writes flushed
            # after it.

            # Admitted again as the task starts, with no await before its first run: the
            # admission above was a loop turn ago, and a newer owner's request served in
            # between (the next frame of the segment) fenced this one; ``revert_async`` admits
            # only between runs, so its first run reverted the new owner's blocks.

            async def revert() -> None:
                st.admit(vid, idx, epoch)
                await st.revert_async(vid, idx, to, seq, epoch, sole=sole)
                await st.flush_async(vid, idx)
            return revert
        if f.op is Op.EXPORT:
            blob, nxt, unreadable = st.export_detail(vid, idx, f.offset, f.length)
            for block in unreadable:      # marked in the blob, not raised: still repair them here
                self._checksum_hook(vid, idx, block)
            return f.reply(Status.OK, blob, {"next": nxt})
        if f.op is Op.IMPORT:
            if f.data is None:
                raise ValueError("IMPORT without data")
            token = (f.args or {}).get("if_unchanged")
            if st.import_(vid, idx, f.data, if_unchanged=token):
                return f.reply()
            return f.reply(Status.CONFLICT)
        if f.op is Op.DIGEST:
            if _arg(f, "checked", bool, False):    # the scrubber's tie check; "checked" says served
                digest = checked_digest(st.checked_state(vid, idx))
                now = st.stat(vid, idx)            # the same moment: no await in between
                return f.reply(Status.OK, digest, {"checked": True, "mutations": now["mutations"],
                                                   "pending": now.get("pending", 0)})
            return f.reply(Status.OK, st.digest(vid, idx))
        if f.op is Op.SETGEN:
            gen = _positive(f.generation, "generation")
            epoch = f.epoch
            current = st.stat(vid, idx)["generation"]
            if gen < current:                   # refused before a long flush, for nothing
                raise StaleGeneration(vid, idx, gen, current)

            # Flushed, then the epoch admitted again right before the generation is recorded:
            # a newer owner admitted during the flush fenced this one (see the store's
            # ``set_generation_at_epoch_async``).
            return lambda: st.set_generation_at_epoch_async(vid, idx, gen, epoch)
        if f.op is Op.STAT:
            return f.reply(Status.OK, args=dict(st.stat(vid, idx)))
        raise ValueError(f"op {f.op.name} is not served here")

    def _failure(self, f: Frame, e: BaseException) -> Frame:
        if isinstance(e, StaleEpochError):
            return f.reply(Status.STALE_EPOCH, args={"highest": e.highest})
        if isinstance(e, StaleGeneration):
            return f.reply(Status.STALE_GENERATION, args={"error": str(e), "generation": e.current})
        if isinstance(e, ChecksumError):
            self._checksum_hook(f.volume, f.extent, e.block)
            return f.reply(Status.CHECKSUM, args={"block": e.block})
        if isinstance(e, NoExtent):
            return f.reply(Status.NO_EXTENT, args={"error": str(e)})
        if isinstance(e, StoreFull):
            return f.reply(Status.NO_SPACE, args={"error": str(e)})
        if isinstance(e, (StoreIOError, OSError)):
            log.error("%s %s.%d: I/O error: %s", f.op.name, f.volume, f.extent, e)
            return f.reply(Status.IO_ERROR, args={"error": str(e)})
        if isinstance(e, (ValueError, StoreError)):   # bad range/alignment/seq, bad IMPORT blob
            return f.reply(Status.INVALID, args={"error": str(e)})
        log.exception("%s %s.%d failed unexpectedly", f.op.name, f.volume, f.extent, exc_info=e)
        return f.reply(Status.IO_ERROR, args={"error": f"{type(e).__name__}: {e}"})

    def _checksum_hook(self, vid: str, idx: int, block: int) -> None:
        if self.on_checksum_error is None:
            return
        try:
            result = self.on_checksum_error(vid, idx, block)
        except Exception:
            log.exception("checksum hook for %s.%d block %d failed", vid, idx, block)
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._hooks.add(task)
            task.add_done_callback(self._hooks.discard)


_LIVE, _VERSION = struct.Struct("<II").pack, struct.Struct("<III").pack


def checked_digest(state: set[tuple]) -> bytes:
    """sha256 of a ``ReplicaStore.checked_state``: what DIGEST with ``args.checked`` answers,
    and what the scrubber hashes its own state with to compare. 32 bytes instead of an EXPORT
    of the peer's whole extent (seconds at the scrub rate, during which a write spoils it)."""
    live = sorted(t[1:] for t in state if t[0] == "live")
    versions = sorted(t[1:] for t in state if t[0] == "version")
    if len(live) + len(versions) != len(state):
        raise ValueError("checked state with entries neither live nor version")
    h = hashlib.sha256(b"live")
    h.update(b"".join(_LIVE(b, crc) for b, crc in live))
    h.update(b"versions")
    h.update(b"".join(_VERSION(b, key, crc) for b, key, crc in versions))
    return h.digest()


def _arg(f: Frame, name: str, kind: type, default: Any) -> Any:
    value = (f.args or {}).get(name, default)
    if value is not default and (type(value) is not kind):
        raise ValueError(f"args.{name} is {type(value).__name__}, not {kind.__name__}")
    return value


def _positive(value: int, name: str) -> int:
    if value <= 0:
        raise ValueError(f"{name} must be > 0")
    return value
