"""Calls to peers' replica servers: one authenticated, pipelined connection per peer.

Connections are dialled on first use (connect + HELLO bounded by
``connect_timeout``) and shared by every caller, so a coordinator's parallel
writes to one peer travel as a pipeline over one socket.  Every failure to
get an answer (refused, reset, authentication failed, no reply within
``timeout``) raises ``PeerUnavailable``: to the coordinator that replica has
failed.  A timed-out call also drops the connection, because a peer that
stopped answering one request is not trusted with the next; the next call
re-dials.  After a failed dial, calls fail fast for ``redial_interval``
seconds instead of each waiting out its own connect timeout against a dead
host.

A reply with a non-OK status raises ``ReplicaError`` (a subclass per status
the callers act on); ``call`` itself returns the raw reply frame.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, NamedTuple

from .link import connect
from .peer_auth import AuthError, client_handshake
from .wire import Frame, FrameError, FrameReader, FrameWriter, Op, Pipeline, Status

__all__ = [
    "Address", "ReplicaClient", "PeerUnavailable", "ReplicaError", "StaleEpoch",
    "ChecksumFailed", "NoSpace", "NoExtentError", "Conflict", "Denied", "InvalidRequest",
    "ReplicaIOError", "CheckedProbe",
]

log = logging.getLogger(__name__)

Address = tuple[str, int]


class PeerUnavailable(Exception):
    """No answer from the peer (connect, authentication, timeout or lost connection).
    ``unsent``: the request never left this client (no connection could be had: the dial
    failed or is remembered failed, or the client is closed), so the peer cannot have acted
    on it; False when it may have been sent (a reply overdue, a connection lost with the
    request on it), and the peer may have applied it."""

    def __init__(self, addr: Address, reason: str, *, unsent: bool = False) -> None:
        super().__init__(f"peer {addr[0]}:{addr[1]} unavailable: {reason}")
        self.addr = addr
        self.reason = reason
        self.unsent = unsent


class ReplicaError(Exception):
    """The peer answered with a non-OK status; ``args_`` holds the reply's args."""

    def __init__(self, status: Status, args: dict[str, Any] | None = None) -> None:
        detail = (args or {}).get("error")
        super().__init__(f"{status.name}{': ' + str(detail) if detail else ''}")
        self.status = status
        self.reply_args = args or {}


class StaleEpoch(ReplicaError):
    """Fenced: a newer owner exists (``highest`` is its epoch)."""

    @property
    def highest(self) -> int:
        return int(self.reply_args.get("highest", 0))


class ChecksumFailed(ReplicaError):
    """The peer's copy failed its checksum (it repairs itself); read another replica."""

    @property
    def block(self) -> int | None:
        return self.reply_args.get("block")


class NoSpace(ReplicaError):
    pass


class NoExtentError(ReplicaError):
    pass


class Conflict(ReplicaError):
    pass


class Denied(ReplicaError):
    pass


class InvalidRequest(ReplicaError):
    pass


class ReplicaIOError(ReplicaError):
    pass


_ERRORS: dict[Status, type[ReplicaError]] = {
    Status.STALE_EPOCH: StaleEpoch, Status.CHECKSUM: ChecksumFailed, Status.NO_SPACE: NoSpace,
    Status.NO_EXTENT: NoExtentError, Status.CONFLICT: Conflict, Status.DENIED: Denied,
    Status.INVALID: InvalidRequest, Status.IO_ERROR: ReplicaIOError,
}


def check(reply: Frame) -> Frame:
    """The reply if OK, else the matching ``ReplicaError``."""
    if reply.status is Status.OK:
        return reply
    assert reply.status is not None
    raise _ERRORS.get(reply.status, ReplicaError)(reply.status, reply.args)


class CheckedProbe(NamedTuple):
    """A peer's answer to DIGEST with ``args.checked`` (``ReplicaClient.checked_probe``)."""
    digest: bytes
    mutations: int | None      # the replica's ``stat()["mutations"]`` then; None: not sent
    pending: int | None        # its deferred writes/unmaps in progress then; None: not sent


def _count(value: Any) -> int | None:
    """A non-negative int from a reply's args, else None (not sent, or not a count)."""
    return value if type(value) is int and value >= 0 else None


_FUA = {"fua": True}
# A WRITE's args (None: a plain write, the fast path both ends) by (fua, sole). ``sole``: the
# replica is the extent's only one in sync, it records an intent first (``ExtentFile``).
_WRITE_ARGS = {(False, False): None, (True, False): _FUA, (False, True): {"sole": True},
               (True, True): {"fua": True, "sole": True}}


class _Peer:
    def __init__(self) -> None:
        self.pipe: Pipeline | None = None
        self.lock = asyncio.Lock()
        self.failed_at = 0.0
        self.failure = ""


# A REVERT is answered once its whole extent is reverted and synced (minutes on a slow disk, at
# worst); ``ReplicaClient.revert_timeout`` (``chunk.revert_timeout``) bounds it, not ``timeout``.
REVERT_TIMEOUT = 600.0


class ReplicaClient:
    def __init__(self, secret: bytes, cluster_id: str, chunk_id: str, timeout: float = 5.0, *,
                 connect_timeout: float | None = None, redial_interval: float = 0.5,
                 revert_timeout: float = REVERT_TIMEOUT) -> None:
        self.secret = secret
        self.cluster_id = cluster_id
        self.chunk_id = chunk_id
        self.timeout = timeout
        self.revert_timeout = revert_timeout
        self.connect_timeout = timeout if connect_timeout is None else connect_timeout
        self.redial_interval = redial_interval
        self._peers: dict[Address, _Peer] = {}
        self._closed = False

    # -- connections -------------------------------------------------------------

    async def _pipeline(self, addr: Address) -> Pipeline:
        peer = self._peers.setdefault(addr, _Peer())
        pipe = peer.pipe
        if pipe is not None and pipe.failed is None:
            return pipe
        async with peer.lock:
            if self._closed:
                raise PeerUnavailable(addr, "client closed", unsent=True)
            if peer.pipe is not None and peer.pipe.failed is None:
                return peer.pipe
            if peer.pipe is not None:
                await peer.pipe.close()
                peer.pipe = None
            if time.monotonic() - peer.failed_at < self.redial_interval:
                raise PeerUnavailable(addr, f"recently failed: {peer.failure}", unsent=True)
            try:
                peer.pipe = await asyncio.wait_for(self._dial(addr), self.connect_timeout)
            except asyncio.TimeoutError:
                self._dial_failed(addr, peer, f"connect timed out after {self.connect_timeout:g}s")
            except (OSError, AuthError, FrameError) as e:
                self._dial_failed(addr, peer, f"{type(e).__name__}: {e}")
            if self._closed:                   # closed while we were dialling
                await peer.pipe.close()
                peer.pipe = None
                raise PeerUnavailable(addr, "client closed", unsent=True)
            return peer.pipe

    def _dial_failed(self, addr: Address, peer: _Peer, reason: str) -> None:
        peer.failed_at, peer.failure = time.monotonic(), reason
        log.warning("replica peer %s:%d: %s", addr[0], addr[1], reason)
        raise PeerUnavailable(addr, reason, unsent=True)

    async def _dial(self, addr: Address) -> Pipeline:
        link, writer = await connect(*addr)
        frames, out = FrameReader(link.inbox), FrameWriter(writer)    # type: ignore[arg-type]
        try:
            await client_handshake(frames, out, self.secret, self.cluster_id, self.chunk_id)
        except BaseException:
            writer.close()
            raise
        return Pipeline(frames, out, link)

    def _drop_soon(self, addr: Address, pipe: Pipeline) -> None:
        """Detach now (the next call dials afresh), close in the background."""
        peer = self._peers.get(addr)
        if peer is not None and peer.pipe is pipe:
            peer.pipe = None
        asyncio.get_running_loop().create_task(pipe.close())

    async def _drop(self, addr: Address, pipe: Pipeline) -> None:
        peer = self._peers.get(addr)
        if peer is not None and peer.pipe is pipe:
            peer.pipe = None
        await pipe.close()

    async def close(self) -> None:
        """Close every connection; outstanding calls fail with PeerUnavailable."""
        self._closed = True
        pipes = [p.pipe for p in self._peers.values() if p.pipe is not None]
        for p in self._peers.values():
            p.pipe = None
        for pipe in pipes:
            await pipe.close()

    # -- calls -------------------------------------------------------------------

    def start(self, addr: Address, frame: Frame, timeout: float | None = None) -> asyncio.Future | None:
        """The hot path: send on an established connection and return the reply's future
        (no task, no await, no timer of its own: the connection's watchdog fails it when
        overdue). None when there is no usable connection yet: use ``call``, which dials.
        The future fails with ConnectionError: ``unavailable`` maps it to PeerUnavailable."""
        return self._start(addr, lambda pipe: pipe.start(frame, self.timeout if timeout is None else timeout))

    def start_write(self, addr: Address, vid: str, idx: int, off: int, data: bytes | memoryview,
                    epoch: int, seq: int, fua: bool = False,
                    sole: bool = False) -> asyncio.Future | None:
        """``start`` of a WRITE without building a request Frame (the replicated-write hot path).
        Its future resolves to None for a plain OK reply (no Frame decoded), else to the reply.
        ``sole``: see ``_WRITE_ARGS``."""
        if fua or sole:
            args = _WRITE_ARGS[(bool(fua), bool(sole))]
            return self._start(addr, lambda pipe: pipe.start_fields(
                Op.WRITE, vid, idx, epoch, 0, off, len(data), data, seq, args, self.timeout))
        fut = asyncio.get_running_loop().create_future()

        def answered(result) -> None:
            if fut.done():
                return
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)
        return fut if self.send_write(addr, vid, idx, off, data, epoch, seq, answered) else None

    def send_write(self, addr: Address, vid: str, idx: int, off: int, data: bytes | memoryview,
                   epoch: int, seq: int, on_reply, sole: bool = False) -> bool:
        """A WRITE (no FUA) on the open connection, answered through ``on_reply`` (None for a
        plain OK, else the reply Frame or the connection's exception; see
        ``Pipeline.start_write``). False, with nothing sent, when no healthy connection is
        open: the coordinator's fast path then declines or counts that replica failed.
        ``sole``: see ``_WRITE_ARGS``."""
        pipe = self._usable(addr)
        if pipe is None:
            return False
        try:
            pipe.start_write(vid, idx, epoch, off, data, seq, self.timeout, on_reply,
                             _WRITE_ARGS[(False, True)] if sole else None)
        except (ConnectionError, OSError, ValueError):
            return False
        # Not ``_start``: no closure per write, and no backlog check, whose drain task only
        # flushes early; the pipeline flushes at the end of this loop turn anyway, and the
        # session's command window bounds what can pile up.
        return True

    async def dial(self, addr: Address) -> bool:
        """Open the connection to ``addr`` if none is (no request sent): True if one is up.

        The coordinator dials before it sends an attempt, then checks its ownership again:
        a request that dialled on await could leave after the lease deadline passed during
        the connect (see ``Coordinator._replicate``). A failed dial is remembered for
        ``redial_interval``, so the send that follows fails at once instead of dialling again."""
        try:
            await self._pipeline((addr[0], int(addr[1])))
        except PeerUnavailable:
            return False
        return True

    def connected(self, addr: Address) -> bool:
        """An established, healthy connection to ``addr`` exists (``start`` would send now)."""
        return self._usable(addr) is not None

    def _usable(self, addr: Address) -> Pipeline | None:
        peer = self._peers.get(addr)
        pipe = peer.pipe if peer is not None else None
        return None if pipe is None or pipe.failed is not None or self._closed else pipe

    def _start(self, addr: Address, send):
        """``send(pipe)`` on the usable connection to ``addr``: its result, or None if there is
        none or sending failed at once."""
        pipe = self._usable(addr)
        if pipe is None:
            return None
        try:
            result = send(pipe)
        except (ConnectionError, OSError, ValueError):
            return None
        if pipe.backed_up:
            asyncio.get_running_loop().create_task(pipe.drain())
        return result

    @staticmethod
    def unavailable(addr: Address, frame: Frame, e: BaseException) -> PeerUnavailable:
        return PeerUnavailable(addr, f"{frame.op.name}: {e}")

    async def call(self, addr: Address, frame: Frame, timeout: float | None = None) -> Frame:
        """Send one request, return its reply (any status); ``PeerUnavailable`` if none;
        ``InvalidRequest`` if it cannot be encoded (the connection stays up)."""
        addr = (addr[0], int(addr[1]))
        if self._closed:
            raise PeerUnavailable(addr, "client closed", unsent=True)
        pipe = await self._pipeline(addr)
        timeout = self.timeout if timeout is None else timeout
        try:
            fut = pipe.start(frame, timeout)
        except ValueError as e:
            # Nothing was sent (a request too large for a frame, a field out of range): the
            # request is bad, not the connection, whose other calls (writes) must go on.
            log.warning("%s to %s:%d not sent: %s", frame.op.name, addr[0], addr[1], e)
            raise InvalidRequest(Status.INVALID, {"error": f"request not encodable: {e}"}) from None
        except (ConnectionError, OSError) as e:
            self._drop_soon(addr, pipe)
            raise PeerUnavailable(addr, f"{frame.op.name}: {e}") from None
        try:
            if pipe.backed_up:
                await pipe.drain()
            return await fut
        except (ConnectionError, OSError, FrameError, ValueError) as e:
            self._drop_soon(addr, pipe)
            raise PeerUnavailable(addr, f"{frame.op.name}: {e}") from None

    async def _ok(self, addr: Address, frame: Frame, timeout: float | None = None) -> Frame:
        return check(await self.call(addr, frame, timeout))

    async def read(self, addr: Address, vid: str, idx: int, off: int, length: int,
                   epoch: int = 0, view: int = 0) -> tuple[bytes, bytes]:
        """(data, present bitmap: 1 bit per 4 KiB block of the range, LSB first)."""
        rep = await self._ok(addr, Frame(Op.READ, 0, vid, idx, epoch, 0, off, length, seq=view))
        present = (rep.args or {}).get("present", b"")
        return bytes(rep.data or b""), bytes(present)

    async def write(self, addr: Address, vid: str, idx: int, off: int, data: bytes,
                    epoch: int, seq: int, generation: int = 0, fua: bool = False,
                    sole: bool = False) -> None:
        await self._ok(addr, Frame(Op.WRITE, 0, vid, idx, epoch, generation, off, len(data), data,
                                   seq=seq, args=_WRITE_ARGS[(bool(fua), bool(sole))]))

    async def unmap(self, addr: Address, vid: str, idx: int, off: int, length: int,
                    epoch: int, seq: int, generation: int = 0, zero: bool = False,
                    sole: bool = False) -> None:
        args = {"zero": True} if zero else None
        if sole:                                    # see _WRITE_ARGS
            args = {**(args or {}), "sole": True}
        await self._ok(addr, Frame(Op.UNMAP, 0, vid, idx, epoch, generation, off, length,
                                   seq=seq, args=args))

    async def flush(self, addr: Address, vid: str, idx: int, epoch: int,
                    timeout: float | None = None) -> None:
        await self._ok(addr, Frame(Op.FLUSH, 0, vid, idx, epoch), timeout)

    async def revert(self, addr: Address, vid: str, idx: int, epoch: int, to_seq: int, seq: int,
                     generation: int = 0, timeout: float | None = None,
                     sole: bool = False) -> None:
        """One extent's revert, answered once synced: on a slow disk it takes far longer than
        a write, so it waits ``revert_timeout`` (not ``timeout``): overdue, the peer would be
        taken for dead, its connection failed, and the coordinator drop the replica. ``sole``:
        see ``_WRITE_ARGS`` (for the blocks the revert writes back)."""
        await self._ok(addr, Frame(Op.REVERT, 0, vid, idx, epoch, generation, seq=seq,
                                   args={"to": to_seq, "sole": True} if sole else {"to": to_seq}),
                       self.revert_timeout if timeout is None else timeout)

    async def create(self, addr: Address, vid: str, idx: int, generation: int, epoch: int,
                     discard_broken: bool = False) -> None:
        await self._ok(addr, Frame(Op.CREATE, 0, vid, idx, epoch, generation,
                                   args={"discard_broken": True} if discard_broken else None))

    async def export(self, addr: Address, vid: str, idx: int, off: int, length: int,
                     epoch: int = 0) -> tuple[bytes, int | None]:
        """(blob of block states, offset to continue at or None when done)."""
        rep = await self._ok(addr, Frame(Op.EXPORT, 0, vid, idx, epoch, 0, off, length))
        return bytes(rep.data or b""), (rep.args or {}).get("next")

    async def import_(self, addr: Address, vid: str, idx: int, blob: bytes, epoch: int,
                      generation: int = 0, if_unchanged: Any = None) -> bool:
        """True when installed; False when ``if_unchanged`` no longer matched (CONFLICT)."""
        rep = await self.call(addr, Frame(Op.IMPORT, 0, vid, idx, epoch, generation, 0, len(blob),
                                          blob, args={"if_unchanged": if_unchanged}))
        if rep.status is Status.CONFLICT:
            return False
        check(rep)
        return True

    async def digest(self, addr: Address, vid: str, idx: int, epoch: int = 0) -> bytes:
        return bytes((await self._ok(addr, Frame(Op.DIGEST, 0, vid, idx, epoch))).data or b"")

    async def checked_digest(self, addr: Address, vid: str, idx: int, epoch: int = 0) -> bytes | None:
        """The peer's ``replica_server.checked_digest`` of the extent (the state checksums
        cover); None from a peer that predates it: it ignored the arg and sent its full digest."""
        got = await self.checked_probe(addr, vid, idx, epoch)
        return None if got is None else got.digest

    async def checked_probe(self, addr: Address, vid: str, idx: int,
                            epoch: int = 0) -> CheckedProbe | None:
        """``checked_digest`` with the replica's ``mutations`` and ``pending`` (deferred writes
        in progress) at that moment, from its ``ReplicaStore.stat``: the scrubber's tie check
        trusts a digest only from a replica at rest. None from a peer without checked digests;
        ``mutations``/``pending`` None from one that answers the digest without them."""
        rep = await self._ok(addr, Frame(Op.DIGEST, 0, vid, idx, epoch, args={"checked": True}))
        args = rep.args or {}
        if args.get("checked") is not True:
            return None
        return CheckedProbe(bytes(rep.data or b""), _count(args.get("mutations")),
                            _count(args.get("pending")))

    async def setgen(self, addr: Address, vid: str, idx: int, generation: int, epoch: int) -> None:
        await self._ok(addr, Frame(Op.SETGEN, 0, vid, idx, epoch, generation))

    async def stat(self, addr: Address, vid: str, idx: int, epoch: int = 0) -> dict[str, Any]:
        return dict((await self._ok(addr, Frame(Op.STAT, 0, vid, idx, epoch))).args or {})

    async def ping(self, addr: Address, timeout: float | None = None) -> float:
        """Round-trip time in seconds."""
        start = time.monotonic()
        await self._ok(addr, Frame(Op.PING, 0), timeout)
        return time.monotonic() - start
