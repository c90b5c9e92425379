"""The chunk-to-chunk replication frame codec.

A frame on the wire is a 4-byte big-endian payload length followed by a
msgpack array ``[op, id, volume, extent, epoch, generation, offset, length,
data, status, seq, args]``.  An array, not a map: field names would cost more
than the header itself on every 4 KiB write.  ``seq`` is the write sequence
(or the snapshot view of a read) and ``args`` a small map of op-specific
extras (docs/storage.md, "Replica protocol").  Decoders accept the older
10-field arrays (seq 0, no args) and ignore trailing fields they do not know,
so later versions can append fields.

``id`` is chosen by the sender of a request and echoed in its reply; replies
may come back in any order, so one connection carries many outstanding
requests (pipelining) and a slow disk on one extent does not hold up others.
A request has ``status`` None; a reply carries a ``Status``.

The length prefix is checked against ``max_frame`` *before* any payload is
read, so a peer (or garbage) cannot make the reader buffer gigabytes.  Every
way a byte stream can be wrong maps to a ``FrameError`` subclass; after one,
the connection is out of sync and must be closed.
"""

from __future__ import annotations

import asyncio
import enum
import struct
import itertools
from dataclasses import dataclass, replace
from typing import Any

import msgpack

__all__ = [
    "Op", "Status", "Frame", "FrameError", "FrameTooLarge", "TruncatedFrame", "MalformedFrame",
    "MAX_DATA", "MAX_FRAME", "encode", "decode", "FrameReader", "FrameWriter", "Pipeline",
]

MAX_DATA = 1 << 20                   # largest data payload of one frame
MAX_FRAME = MAX_DATA + 4096          # plus room for the header fields
_LEN = struct.Struct(">I")


class Op(enum.IntEnum):
    READ = 1
    WRITE = 2
    FLUSH = 3
    UNMAP = 4
    PING = 5
    HELLO = 6                # peer authentication, must be the first frame (peer_auth)
    CREATE = 7
    REVERT = 8
    EXPORT = 9
    IMPORT = 10
    DIGEST = 11
    SETGEN = 12
    STAT = 13


class Status(enum.IntEnum):
    OK = 0
    STALE_EPOCH = 1          # the request's epoch is older than the replica's: fenced
    CHECKSUM = 2             # the replica's copy failed its checksum; ask another replica
    NO_EXTENT = 3
    IO_ERROR = 4
    INVALID = 5              # out of range, unknown op
    NO_SPACE = 6             # no disk of this server can hold a new extent
    STALE_GENERATION = 7     # the request's replica-set generation is older than the replica's
    CONFLICT = 8             # IMPORT: the replica changed since the token was taken
    DENIED = 9               # not authenticated, or a mutation without an ownership epoch


class FrameError(Exception):
    """The byte stream is not a valid frame sequence; close the connection."""


class FrameTooLarge(FrameError):
    """The length prefix exceeds the agreed maximum frame size."""


class TruncatedFrame(FrameError):
    """The stream ended inside a frame."""


class MalformedFrame(FrameError):
    """The payload is not msgpack, or not a frame (wrong shape or field types)."""


@dataclass(slots=True)
class Frame:
    op: Op
    id: int
    volume: str = ""
    extent: int = 0
    epoch: int = 0
    generation: int = 0
    offset: int = 0
    length: int = 0
    data: bytes | memoryview | None = None
    status: Status | None = None
    seq: int = 0
    args: dict[str, Any] | None = None

    def reply(self, status: Status = Status.OK, data: bytes | memoryview | None = None,
              args: dict[str, Any] | None = None) -> Frame:
        """The answer to this request: same op, id, addressing and seq, without its data/args."""
        return Frame(self.op, self.id, self.volume, self.extent, self.epoch, self.generation,
                     self.offset, self.length, data, status, self.seq, args)


def encode(frame: Frame, ident: int | None = None) -> bytes:
    """Length prefix + payload (with ``ident`` as the id if given); ``ValueError`` if it
    would exceed ``MAX_FRAME``."""
    body = msgpack.packb([int(frame.op), frame.id if ident is None else ident, frame.volume,
                          frame.extent, frame.epoch, frame.generation, frame.offset, frame.length,
                          frame.data, None if frame.status is None else int(frame.status), frame.seq,
                          frame.args])
    if len(body) > MAX_FRAME:
        raise ValueError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _LEN.pack(len(body)) + body


_INT_FIELDS = ("id", "extent", "epoch", "generation", "offset", "length", "seq")


def decode(payload: bytes | memoryview) -> Frame:
    """One payload (without its length prefix) to a Frame, or ``MalformedFrame``."""
    try:
        fields: Any = msgpack.unpackb(payload, raw=False, use_list=True)
    except Exception as e:            # ExtraData, FormatError, UnicodeDecodeError, ValueError...
        raise MalformedFrame(f"not msgpack: {type(e).__name__}: {e}") from None
    if not isinstance(fields, list) or len(fields) < 10:
        raise MalformedFrame(f"not a frame array: {fields!r:.60}")
    op, ident, volume, extent, epoch, generation, offset, length, data, status = fields[:10]
    seq = fields[10] if len(fields) > 10 else 0
    args = fields[11] if len(fields) > 11 else None
    for name, value in zip(_INT_FIELDS, (ident, extent, epoch, generation, offset, length, seq)):
        if type(value) is not int or value < 0:
            raise MalformedFrame(f"field {name} is {value!r:.40}, not a non-negative int")
    if not isinstance(volume, str):
        raise MalformedFrame(f"volume is {type(volume).__name__}, not str")
    if data is not None and not isinstance(data, bytes):
        raise MalformedFrame(f"data is {type(data).__name__}, not bin")
    if args is not None and (not isinstance(args, dict)
                             or not all(isinstance(k, str) for k in args)):
        raise MalformedFrame(f"args is not a map with str keys: {args!r:.60}")
    if type(op) is not int or (status is not None and type(status) is not int):
        raise MalformedFrame(f"op {op!r:.20} / status {status!r:.20} are not ints")
    try:
        op = Op(op)
        status = None if status is None else Status(status)
    except ValueError as e:
        raise MalformedFrame(str(e)) from None
    return Frame(op, ident, volume, extent, epoch, generation, offset, length, data, status,
                 seq, args)


class FrameReader:
    """Frames from an ``asyncio.StreamReader``; ``None`` at a clean end of stream."""

    def __init__(self, reader: asyncio.StreamReader, max_frame: int = MAX_FRAME) -> None:
        self._reader = reader
        self.max_frame = max_frame

    async def read(self) -> Frame | None:
        try:
            prefix = await self._reader.readexactly(_LEN.size)
        except asyncio.IncompleteReadError as e:
            if not e.partial:
                return None
            raise TruncatedFrame(f"stream ended inside a length prefix ({len(e.partial)} bytes)") from None
        (n,) = _LEN.unpack(prefix)
        if n > self.max_frame:
            raise FrameTooLarge(f"frame of {n} bytes exceeds {self.max_frame}")
        try:
            payload = await self._reader.readexactly(n)
        except asyncio.IncompleteReadError as e:
            raise TruncatedFrame(f"stream ended after {len(e.partial)} of {n} bytes") from None
        return decode(payload)

    def __aiter__(self) -> FrameReader:
        return self

    async def __anext__(self) -> Frame:
        frame = await self.read()
        if frame is None:
            raise StopAsyncIteration
        return frame


class FrameWriter:
    """Frames to an ``asyncio.StreamWriter``.

    ``write`` only buffers, so a burst of requests or replies leaves in one
    send; ``drain`` applies the transport's flow control.
    """

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    def write(self, frame: Frame) -> None:
        self._writer.write(encode(frame))

    def write_bytes(self, data: bytes) -> None:
        """Already encoded frames (see ``Pipeline.start``)."""
        self._writer.write(data)

    def buffered(self) -> int:
        transport = self._writer.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    async def drain(self) -> None:
        await self._writer.drain()

    async def send(self, frame: Frame) -> None:
        self.write(frame)
        await self._writer.drain()

    async def close(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, OSError):
            pass

    def abort(self) -> None:
        """Drop the connection now (a peer that stopped answering)."""
        transport = self._writer.transport
        if transport is not None:
            transport.abort()


class Pipeline:
    """The requesting side of one connection: many outstanding calls, replies in any order.

    ``call`` numbers the request, sends it and waits for the reply with that
    id; one reader task routes replies.  If the connection fails, every
    outstanding call fails with the same error (the caller then picks
    another replica or reconnects).
    """

    def __init__(self, reader: FrameReader, writer: FrameWriter) -> None:
        self._writer = writer
        self._reader = reader
        self._ids = itertools.count(1)
        self._issued = 0
        self._waiting: dict[int, asyncio.Future[Frame]] = {}
        self._deadline: dict[int, tuple[float, float, str]] = {}   # id -> (due, limit, op name)
        self._error: BaseException | None = None
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._watch: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._route())

    @property
    def outstanding(self) -> int:
        return len(self._waiting)

    @property
    def failed(self) -> BaseException | None:
        """Why the connection is unusable (lost, closed, a reply overdue), or None."""
        return self._error

    def start(self, request: Frame, timeout: float | None = None) -> asyncio.Future[Frame]:
        """Send ``request`` and return the future of its reply, without a task or an await.

        Frames queued in one event-loop turn leave in one ``send`` (QD32 of 4 KiB writes
        is 32 frames per turn): per-frame syscalls were a third of the coordinator's CPU.
        A reply overdue by ``timeout`` fails the whole connection (a replica that stops
        answering one request is not trusted with the next); one watchdog timer per
        connection checks that, not a timer per request.
        """
        if self._error is not None:
            raise ConnectionError(f"connection failed: {self._error}")
        ident = self._issued = next(self._ids)
        loop = self._loop
        fut: asyncio.Future[Frame] = loop.create_future()
        self._waiting[ident] = fut
        self._out.append(encode(request, ident))
        if timeout is not None:
            self._deadline[ident] = (loop.time() + timeout, timeout, request.op.name)
            if self._watch is None:
                self._watch = loop.call_later(min(timeout, 0.25), self._check)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return fut

    def _check(self) -> None:
        self._watch = None
        if self._error is not None or not self._deadline:
            return
        now = self._loop.time()
        for ident, (due, limit, op) in self._deadline.items():
            if due <= now:
                self._fail(ConnectionError(f"{op} timed out after {limit:g}s"))
                self._writer.abort()
                return
        self._watch = self._loop.call_later(0.1, self._check)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self._error is None:
            out, self._out = self._out, []
            self._writer.write_bytes(b"".join(out) if len(out) > 1 else out[0])

    @property
    def backed_up(self) -> bool:
        """More unsent bytes than the transport likes: callers should ``drain``."""
        return self._writer.buffered() > (4 << 20)

    async def drain(self) -> None:
        self._flush()
        await self._writer.drain()

    async def call(self, request: Frame, timeout: float | None = None) -> Frame:
        fut = self.start(request, timeout)
        if self.backed_up:
            await self.drain()
        return await fut

    async def _route(self) -> None:
        waiting, deadline = self._waiting, self._deadline
        try:
            async for frame in self._reader:
                if frame.status is None or not 0 < frame.id <= self._issued:
                    raise MalformedFrame(f"unexpected frame id {frame.id} op {frame.op.name}")
                deadline.pop(frame.id, None)
                fut = waiting.pop(frame.id, None)
                if fut is not None and not fut.done():   # done: the caller gave up (cancelled)
                    fut.set_result(frame)
            error: BaseException = ConnectionError("connection closed by peer")
        except (FrameError, ConnectionError, OSError) as e:
            error = e
        self._fail(error)

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        waiting, self._waiting = self._waiting, {}
        self._deadline.clear()
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(ConnectionError(f"connection failed: {error}"))

    async def close(self) -> None:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._fail(ConnectionError("pipeline closed"))
        await self._writer.close()
