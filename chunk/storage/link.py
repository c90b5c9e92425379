"""One replication connection's protocol, shared by both ends: bytes go to the handshake's
``Inbox`` first, then (``attach``) straight to the connection's parser.

A StreamReader would copy every segment twice and cost a task wakeup per segment
before the parser saw it; on the replicated-write path that was a loop turn per
batch of replies. The ``Link`` hands each segment to the parser in the protocol's
own callback instead. It still is a StreamReaderProtocol, for its ``StreamWriter``
(flow control, ``wait_closed``); its StreamReader gets only EOF and errors.

A sink (``Inbox``, the server's request parser, the client's ``Pipeline``) has
``feed(data)``, ``feed_eof()`` and ``lost(exc)``.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Protocol

__all__ = ["Inbox", "Link", "Sink", "connect"]

HANDSHAKE_BUFFER = 1 << 20     # unread handshake bytes before the socket is paused


class Sink(Protocol):
    def feed(self, data: bytes) -> None: ...
    def feed_eof(self) -> None: ...
    def lost(self, exc: BaseException | None) -> None: ...


class Inbox:
    """The handshake's byte source: what ``FrameReader`` uses of a StreamReader (``read``,
    ``readexactly``), fed by the ``Link`` until ``attach``.  Above ``HANDSHAKE_BUFFER``
    unread bytes the socket is paused, so a peer that has not authenticated cannot make
    us buffer without limit."""

    def __init__(self, link: Link, limit: int = HANDSHAKE_BUFFER) -> None:
        self._link = link
        self._limit = limit
        self.buf = bytearray()
        self.eof = False
        self.error: BaseException | None = None
        self.paused = False
        self._waiter: asyncio.Future | None = None

    def feed(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > self._limit and not self.paused:
            self.paused = True
            self._link.pause()
        self._wake()

    def feed_eof(self) -> None:
        self.eof = True
        self._wake()

    def lost(self, exc: BaseException | None) -> None:
        if exc is None:
            self.eof = True
        else:
            self.error = exc
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        if self.paused:
            self.paused = False
            self._link.resume()
        self._waiter = asyncio.get_running_loop().create_future()
        await self._waiter

    def _take(self, n: int) -> bytes:
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def read(self, n: int) -> bytes:
        while True:
            if self.error is not None:
                raise self.error
            if self.buf:
                return self._take(n)
            if self.eof:
                return b""
            await self._wait()

    async def readexactly(self, n: int) -> bytes:
        while True:
            if self.error is not None:
                raise self.error
            if len(self.buf) >= n:
                return self._take(n)
            if self.eof:
                raise asyncio.IncompleteReadError(self._take(len(self.buf)), n)
            await self._wait()

    def hand_over(self, sink: Sink) -> None:
        """Give what is still unread here (bytes, then EOF or the error) to ``sink``."""
        if self.buf:
            data = bytes(self.buf)
            self.buf.clear()
            sink.feed(data)
        if self.error is not None:
            sink.lost(self.error)
        elif self.eof:
            sink.feed_eof()


class Link(asyncio.StreamReaderProtocol):
    """One peer connection's protocol (module docstring). ``on_connected(link, writer)`` is
    the listening side's connection handler; the dialling side uses ``connect``."""

    def __init__(self, on_connected: Callable[[Link, asyncio.StreamWriter], Any] | None = None,
                 *, handshake_buffer: int = HANDSHAKE_BUFFER) -> None:
        loop = asyncio.get_running_loop()
        self.unused = asyncio.StreamReader(loop=loop)      # the writer's; gets only EOF/errors
        callback = None if on_connected is None else (lambda _r, w: on_connected(self, w))
        super().__init__(self.unused, callback, loop=loop)
        self.inbox = Inbox(self, handshake_buffer)
        self._sink: Sink = self.inbox
        self._transport_ref: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport_ref = transport                    # type: ignore[assignment]
        super().connection_made(transport)

    def attach(self, sink: Sink) -> None:
        """From now on every segment goes to ``sink``; the caller hands it what the inbox
        still holds (``Inbox.hand_over``) after anything it read ahead itself."""
        self._sink = sink
        if self.inbox.paused:
            self.inbox.paused = False
            self.resume()

    def pause(self) -> None:
        if self._transport_ref is not None and not self._transport_ref.is_closing():
            self._transport_ref.pause_reading()

    def resume(self) -> None:
        if self._transport_ref is not None and not self._transport_ref.is_closing():
            self._transport_ref.resume_reading()

    def data_received(self, data: bytes) -> None:
        self._sink.feed(data)

    def eof_received(self) -> bool:
        self._sink.feed_eof()
        return True                                        # keep writing: replies still due

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._sink.lost(exc)


async def connect(host: str, port: int) -> tuple[Link, asyncio.StreamWriter]:
    """Dial ``host:port``: the ``Link`` (its ``inbox`` reads the handshake) and a writer."""
    loop = asyncio.get_running_loop()
    transport, link = await loop.create_connection(Link, host, port)
    return link, asyncio.StreamWriter(transport, link, link.unused, loop)
