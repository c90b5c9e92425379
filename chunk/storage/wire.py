"""The chunk-to-chunk replication frame codec.

A frame on the wire is a 4-byte big-endian body length followed by the body:
a fixed 66-byte big-endian header (``_HDR``: version, op, status, flags, id,
extent, epoch, generation, offset, length, seq, volume length, args length),
the volume name (UTF-8), ``args`` as a msgpack map when present, and the data
payload as the rest of the body, raw.  Fixed fields and a raw payload, not one
msgpack array: encoding and decoding a 4 KiB write is one ``struct`` call and
a slice each way, which was most of the per-frame CPU of the replica hop.
``seq`` is the write sequence (or the snapshot view of a read) and ``args`` a
small map of op-specific extras (docs/storage.md, "Replica protocol").

The first header byte is the wire version (``VERSION``); both ends of a
cluster run the same version.  A frame of another version, including the
msgpack arrays of version 1 (which start with a byte 0x9a-0x9f), fails with
``VersionMismatch`` naming both versions, not as generic garbage.

``id`` is chosen by the sender of a request and echoed in its reply; replies
may come back in any order, so one connection carries many outstanding
requests (pipelining) and a slow disk on one extent does not hold up others.
A request has ``status`` None (0xff on the wire); a reply carries a ``Status``.

The length prefix is checked against ``max_frame`` *before* any payload is
read, so a peer (or garbage) cannot make the reader buffer gigabytes.  Every
way a byte stream can be wrong maps to a ``FrameError`` subclass; after one,
the connection is out of sync and must be closed.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import struct
import itertools
from dataclasses import dataclass
from typing import Any, Callable

import msgpack

__all__ = [
    "Op", "Status", "Frame", "FrameError", "FrameTooLarge", "TruncatedFrame", "MalformedFrame",
    "VersionMismatch", "VERSION", "MAX_DATA", "MAX_FRAME", "HEADER_SIZE", "encode", "decode",
    "decode_at", "split", "split_one", "spans", "plain_write", "encode_write_ok",
    "encode_sole_write_ok", "FrameReader",
    "FrameWriter", "Pipeline", "PartialFrame",
]

log = logging.getLogger(__name__)

VERSION = 2                          # 1 was the msgpack array format
MAX_DATA = 1 << 20                   # largest data payload of one frame
MAX_FRAME = MAX_DATA + 4096          # plus room for the header fields
READ_SIZE = 1 << 18                  # bytes asked of the socket per read (QD32 of 4 KiB is ~130 KiB)
# A busy connection sends every FLUSH_EVERY frames queued in one loop turn (and the rest at
# the turn's end), both ways: requests and replies. All of a turn in one send made the two
# ends take turns: the peer sat idle while the coordinator worked through a QD32 batch,
# then the coordinator while the peer did. In pieces of 8 they overlap (2 replicas, QD32
# 4 KiB writes: 14-16.5k -> 18-20k IOPS, no more CPU per write; bench/README.md).
FLUSH_EVERY = 8
_LEN = struct.Struct(">I")
#: version, op, status (0xff: request), flags, id, extent, epoch, generation, offset, length,
#: seq, volume bytes, args bytes
_HDR = struct.Struct(">BBBBQQQQQQQHI")
_HEAD = struct.Struct(">IBBBBQQQQQQQHI")        # the length prefix + _HDR, for encoding
HEADER_SIZE = _HDR.size
_REQUEST = 0xFF
_REPLY_HEAD = struct.Struct(">BBBBQ")          # version, op, status, flags, id: a reply's kind
_HAS_DATA, _HAS_ARGS = 1, 2


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


# Wire numbers to members by table lookup: Op(n) / Status(n) cost an Enum.__new__ per frame.
_OPS: dict[int, Op] = {int(o): o for o in Op}
_STATUSES: dict[int, Status | None] = {int(s): s for s in Status}
_STATUSES[_REQUEST] = None


class FrameError(Exception):
    """The byte stream is not a valid frame sequence; close the connection."""


class FrameTooLarge(FrameError):
    """The length prefix exceeds the agreed maximum frame size."""


class TruncatedFrame(FrameError):
    """The stream ended inside a frame."""


class MalformedFrame(FrameError):
    """The body is not a frame (short header, bad field, unknown op/status, bad args)."""


class VersionMismatch(MalformedFrame):
    """The peer speaks another wire version (``legacy``: the msgpack arrays of version 1)."""

    def __init__(self, got: int) -> None:
        self.got = got
        self.legacy = 0x9A <= got <= 0x9F or got == 0xDC
        peer = "1 (msgpack arrays: an older zstore)" if self.legacy else str(got)
        super().__init__(f"peer speaks replication wire version {peer}; this chunk server "
                         f"speaks version {VERSION}: upgrade every chunk server of the cluster")


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
    """Length prefix + body (with ``ident`` as the id if given); ``ValueError`` if it would
    exceed ``MAX_FRAME`` or a field does not fit its header slot."""
    return encode_fields(frame.op, frame.id if ident is None else ident, frame.volume,
                         frame.extent, frame.epoch, frame.generation, frame.offset, frame.length,
                         frame.data, frame.status, frame.seq, frame.args)


def encode_fields(op: int, ident: int, volume: str, extent: int, epoch: int, generation: int,
                  offset: int, length: int, data: bytes | memoryview | None,
                  status: int | None, seq: int, args: dict[str, Any] | None) -> bytes:
    """``encode`` without a Frame (the write hot path)."""
    vol = volume.encode() if volume else b""
    flags = 0
    extra = b""
    if args is not None:
        flags = _HAS_ARGS
        extra = msgpack.packb(args)
    size = _HDR.size + len(vol) + len(extra)
    if data is not None:
        flags |= _HAS_DATA
        size += len(data) if type(data) is bytes else memoryview(data).nbytes
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes exceeds {MAX_FRAME}")
    try:
        head = _HEAD.pack(size, VERSION, op, _REQUEST if status is None else status, flags, ident,
                          extent, epoch, generation, offset, length, seq, len(vol), len(extra))
    except struct.error as e:
        raise ValueError(f"frame field out of range: {e}") from None
    if data is None:
        return head + vol + extra if vol or extra else head
    return b"".join((head, vol, extra, data))


def encode_write(ident: int, volume: str, extent: int, epoch: int, offset: int,
                 data: bytes | memoryview, seq: int) -> bytes:
    """``encode_fields`` of a WRITE request with data and no args (every replicated write):
    the same bytes without its general branches, the volume's UTF-8 cached."""
    vol = _VOLUME_BYTES.get(volume)
    if vol is None:
        if len(_VOLUME_BYTES) >= 4096:
            _VOLUME_BYTES.clear()
        vol = _VOLUME_BYTES[volume] = volume.encode()
    n = len(data) if type(data) is bytes else memoryview(data).nbytes
    size = _HDR.size + len(vol) + n
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes exceeds {MAX_FRAME}")
    try:
        head = _HEAD.pack(size, VERSION, _OP_WRITE, _REQUEST, _HAS_DATA, ident, extent, epoch, 0,
                          offset, n, seq, len(vol), 0)
    except struct.error as e:
        raise ValueError(f"frame field out of range: {e}") from None
    return b"".join((head, vol, data))


def encode_sole_write(ident: int, volume: str, extent: int, epoch: int, offset: int,
                      data: bytes | memoryview, seq: int) -> bytes:
    """``encode_write`` with args ``{"sole": True}`` (``_SOLE_ARGS``, packed once): a sole
    replica's write, which the server's ``plain_write`` fast path takes too."""
    vol = volume.encode()
    n = len(data) if type(data) is bytes else memoryview(data).nbytes
    size = _HDR.size + len(vol) + len(_SOLE_ARGS) + n
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes exceeds {MAX_FRAME}")
    try:
        head = _HEAD.pack(size, VERSION, _OP_WRITE, _REQUEST, _HAS_DATA | _HAS_ARGS, ident,
                          extent, epoch, 0, offset, n, seq, len(vol), len(_SOLE_ARGS))
    except struct.error as e:
        raise ValueError(f"frame field out of range: {e}") from None
    return b"".join((head, vol, _SOLE_ARGS, data))


_VOLUME_BYTES: dict[str, bytes] = {}      # volume id -> its UTF-8, for encode_write


def decode(payload: bytes | memoryview) -> Frame:
    """One body (without its length prefix) to a Frame, or ``MalformedFrame``."""
    if type(payload) is not bytes:
        payload = bytes(payload)
    return _decode(payload, 0, len(payload))


def decode_at(buf: bytes, start: int, n: int) -> Frame:
    """The frame whose body is ``buf[start:start + n]`` (a span of ``spans``)."""
    return _decode(buf, start, n)


_OP_WRITE = int(Op.WRITE)
_PLAIN_WRITE = (VERSION, _OP_WRITE, _REQUEST, _HAS_DATA)     # a request with data only
_PLAIN_WRITE_OK = (VERSION, int(Op.WRITE), int(Status.OK), 0)     # its OK reply: no data, no args
# A sole replica's WRITE (``replica_client._WRITE_ARGS``): data and these args exactly, which
# ``plain_write`` takes too (its answer has no args, as a plain write's).
_SOLE_DICT = {"sole": True}
_SOLE_ARGS = msgpack.packb(_SOLE_DICT)
_SOLE_WRITE = (VERSION, _OP_WRITE, _REQUEST, _HAS_DATA | _HAS_ARGS)


def plain_write(buf: bytes, start: int, n: int) -> tuple | None:
    """The header fields (as ``_HDR`` unpacks them) of the body ``buf[start:start + n]`` if it is
    a well-formed WRITE request with a volume and data and no args, else None. A request
    whose args are exactly ``{"sole": True}`` (a sole replica's write) is taken too: its
    ``h[12]`` (args length) is then non-zero, and its data starts after them.

    The replica server's write fast path: such a frame needs no Frame object, and
    every body this accepts ``decode_at`` decodes without error (except a volume
    that is not UTF-8, which the caller decodes itself).  None means "take the
    general path", which also reports whatever is wrong with the frame.
    """
    if n < _HDR.size:
        return None
    h = _HDR.unpack_from(buf, start)
    if h[:4] != _PLAIN_WRITE or h[12] or not 0 < h[11] <= n - _HDR.size:
        if (h[:4] == _SOLE_WRITE and h[12] == len(_SOLE_ARGS)
                and 0 < h[11] <= n - _HDR.size - len(_SOLE_ARGS)
                and buf.startswith(_SOLE_ARGS, start + _HDR.size + h[11])):
            return h
        return None
    return h


def encode_write_ok(buf: bytes, start: int, vlen: int) -> bytes:
    """``encode(frame.reply())`` of the ``plain_write`` WRITE whose body starts at ``start``
    with a ``vlen``-byte volume.  The reply's header after (version, op, status, flags) and
    its volume are the request's bytes verbatim (same id, addressing, seq; no args), so it is
    a cached prefix plus one slice: no Frame, no ``struct`` call."""
    prefix = _OK_PREFIX.get(vlen)
    if prefix is None:
        prefix = _OK_PREFIX[vlen] = _LEN.pack(_HDR.size + vlen) + bytes(
            (VERSION, int(Op.WRITE), int(Status.OK), 0))
    return prefix + buf[start + 4:start + _HDR.size + vlen]


_OK_PREFIX: dict[int, bytes] = {}        # volume length -> length prefix + first 4 header bytes


def encode_sole_write_ok(buf: bytes, start: int, vlen: int) -> bytes:
    """``encode_write_ok`` of a ``plain_write`` WRITE with args (``_SOLE_ARGS``): the same bytes
    but the args length, which the reply (no args) has 0."""
    return (encode_write_ok(buf, start, vlen)[:4 + _HDR.size - 4] + bytes(4)
            + buf[start + _HDR.size:start + _HDR.size + vlen])


def _decode(buf: bytes, start: int, n: int) -> Frame:
    """The frame whose body is ``buf[start:start + n]``."""
    if n < _HDR.size:
        if n and buf[start] != VERSION:
            raise VersionMismatch(buf[start])
        raise MalformedFrame(f"frame of {n} bytes is shorter than the {_HDR.size}-byte header")
    (version, op, status, flags, ident, extent, epoch, generation, offset, length, seq, vlen,
     alen) = _HDR.unpack_from(buf, start)
    if version != VERSION:
        raise VersionMismatch(version)
    try:
        op = _OPS[op]
        status = _STATUSES[status]
    except KeyError:
        raise MalformedFrame(f"unknown op {op} or status {status}") from None
    if flags & ~(_HAS_DATA | _HAS_ARGS):
        raise MalformedFrame(f"unknown flags {flags:#x}")
    pos = start + _HDR.size
    end = start + n
    if pos + vlen + alen > end:
        raise MalformedFrame(f"volume ({vlen}) and args ({alen} bytes) run past the frame's "
                             f"{n - _HDR.size} bytes")
    volume = ""
    if vlen:
        try:
            volume = buf[pos:pos + vlen].decode()
        except UnicodeDecodeError as e:
            raise MalformedFrame(f"volume is not UTF-8: {e}") from None
        pos += vlen
    args = None
    if flags & _HAS_ARGS:
        args = _args(buf[pos:pos + alen])
        pos += alen
    elif alen:
        raise MalformedFrame(f"{alen} args bytes without the args flag")
    data = None
    if flags & _HAS_DATA:
        data = buf[pos:end]
    elif pos != end:
        raise MalformedFrame(f"{end - pos} trailing bytes in a frame without data")
    return Frame(op, ident, volume, extent, epoch, generation, offset, length, data, status,
                 seq, args)


MAX_ARGS = 64 << 10          # args are a few small fields; bounded before any decoding
MAX_ARGS_DEPTH = 8           # containers nested in args (the map itself is 1): every op's are flat


def _args(raw: bytes) -> dict[str, Any]:
    """The args map, with msgpack's containers bounded: its defaults scale with the input,
    so 1 MiB of empty maps from a stranger became ~76 MB of objects."""
    if len(raw) > MAX_ARGS:
        raise MalformedFrame(f"args of {len(raw)} bytes exceed {MAX_ARGS}")
    try:
        args: Any = msgpack.unpackb(raw, raw=False, max_str_len=MAX_ARGS, max_bin_len=MAX_ARGS,
                                    max_array_len=256, max_map_len=64, max_ext_len=0)
    except Exception as e:            # ExtraData, FormatError, UnicodeDecodeError, ValueError...
        raise MalformedFrame(f"args are not msgpack: {type(e).__name__}: {e}") from None
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise MalformedFrame(f"args is not a map with str keys: {type(args).__name__}")
    if _too_deep(args, 1):
        # Deeper nesting serves no op, and a repr of 1,000 levels (an error message) raised
        # RecursionError before authentication.
        raise MalformedFrame(f"args nest deeper than {MAX_ARGS_DEPTH} levels")
    return args


def _too_deep(value: dict | list, depth: int) -> bool:
    """Whether a container in ``value`` (itself at ``depth``) is nested past MAX_ARGS_DEPTH;
    a flat map (every op's args) is one pass over its values."""
    for v in (value.values() if type(value) is dict else value):
        if type(v) is dict or type(v) is list:
            if depth >= MAX_ARGS_DEPTH or _too_deep(v, depth + 1):
                return True
    return False


def split(buf: bytes, max_frame: int = MAX_FRAME) -> tuple[list[Frame], int, FrameError | None]:
    """Every complete frame at the start of ``buf``: (frames, bytes used, error).

    ``error`` is the ``FrameError`` that stopped the parse (the frames before it
    are still returned, so requests that arrived intact are answered before
    the connection is closed); None when the rest is just incomplete.
    """
    frames: list[Frame] = []
    pos, end = 0, len(buf)
    unpack = _LEN.unpack_from
    try:
        while end - pos >= 4:
            (n,) = unpack(buf, pos)
            if n > max_frame:
                raise FrameTooLarge(f"frame of {n} bytes exceeds {max_frame}")
            if end - pos - 4 < n:
                break
            frames.append(_decode(buf, pos + 4, n))
            pos += 4 + n
    except FrameError as e:
        return frames, pos, e
    return frames, pos, None


def split_one(buf: bytes, max_frame: int = MAX_FRAME) -> tuple[list[Frame], int, None]:
    """``split`` of the first frame only: ([frame], bytes used, None), or ([], 0, None) while it
    is incomplete; a ``FrameError`` in it is raised.  What follows it is left unparsed, for
    the handshake (``FrameReader(one_frame=True)``): the frames a peer sends behind its last
    HELLO belong to the connection's own parser, with its frame limit and back-pressure."""
    if len(buf) < 4:
        return [], 0, None
    (n,) = _LEN.unpack_from(buf)
    if n > max_frame:
        raise FrameTooLarge(f"frame of {n} bytes exceeds {max_frame}")
    if len(buf) - 4 < n:
        return [], 0, None
    return [_decode(buf, 4, n)], 4 + n, None


def spans(buf: bytes, max_frame: int = MAX_FRAME, start: int = 0) -> tuple[
        list[tuple[int, int]], int, FrameError | None]:
    """``split`` without decoding, from ``start``: the (body start, body length) of every
    complete frame, the position after the last, and the error that stopped the cut."""
    out: list[tuple[int, int]] = []
    pos, end = start, len(buf)
    unpack = _LEN.unpack_from
    while end - pos >= 4:
        (n,) = unpack(buf, pos)
        if n > max_frame:
            return out, pos, FrameTooLarge(f"frame of {n} bytes exceeds {max_frame}")
        if end - pos - 4 < n:
            break
        out.append((pos + 4, n))
        pos += 4 + n
    return out, pos, None


class FrameReader:
    """Frames from an ``asyncio.StreamReader``; ``None`` (or ``[]``) at a clean end of stream.

    Reads the socket in ``READ_SIZE`` pieces and cuts every complete frame out
    of each (``read_many``): a QD32 burst of writes is one read and one parse
    loop, not two ``readexactly`` awaits per frame.  A frame larger than what
    arrived is completed with one ``readexactly`` of its remainder, so big
    frames are not reassembled piece by piece.
    """

    def __init__(self, reader: asyncio.StreamReader, max_frame: int = MAX_FRAME, *,
                 one_frame: bool = False) -> None:
        self._reader = reader
        self.max_frame = max_frame
        self._split = split_one if one_frame else split   # one_frame: split_one's docstring
        self._buf = b""                        # received, not yet parsed
        self._ready: list[Frame] = []          # parsed, not yet handed out by read()
        self._error: FrameError | None = None  # found after frames that were handed out first

    async def read(self) -> Frame | None:
        """The next frame (the handshake reads one at a time)."""
        if not self._ready:
            self._ready = await self.read_many()
            if not self._ready:
                return None
        return self._ready.pop(0)

    async def read_many(self) -> list[Frame]:
        """Every frame that is complete now, at least one; ``[]`` at a clean end of stream."""
        if self._ready:
            ready, self._ready = self._ready, []
            return ready
        return (await self._cut(self._split))[1]

    async def read_spans(self) -> tuple[bytes, list[tuple[int, int]]]:
        """``read_many`` without decoding (the replica client's reply path): a buffer and the
        (body start, body length) of every frame complete in it, at least one; ``(b"", [])``
        at a clean end of stream. Frames already decoded (``pending``) come from
        ``read_many`` first."""
        return await self._cut(spans)

    async def _cut(self, parse) -> tuple[bytes, list]:
        """(buffer, what ``parse`` (``split`` or ``spans``) cut from it: at least one item),
        reading until a frame is complete; ``(b"", [])`` at a clean end of stream."""
        if self._error is not None:
            raise self._error
        buf = self._buf
        while True:
            if buf:
                items, used, error = parse(buf, self.max_frame)
                if items:
                    self._buf = buf[used:] if used < len(buf) else b""
                    self._error = error
                    return buf, items
                if error is not None:
                    raise error
            buf = await self._more(buf)
            if buf is None:
                return b"", []

    @property
    def source(self):
        """The stream this reads from (a StreamReader or a ``link.Inbox``)."""
        return self._reader

    @property
    def pending(self) -> bool:
        """Frames decoded ahead (by ``read``) wait to be taken with ``read_many``."""
        return bool(self._ready)

    async def _more(self, buf: bytes) -> bytes | None:
        """``buf`` with the next bytes from the socket; None at a clean end of stream."""
        need = _LEN.unpack_from(buf)[0] + 4 - len(buf) if len(buf) >= 4 else 0
        if need > READ_SIZE:
            try:
                more = await self._reader.readexactly(need)
            except asyncio.IncompleteReadError as e:
                raise TruncatedFrame(f"stream ended after {len(buf) - 4 + len(e.partial)} of "
                                     f"{len(buf) - 4 + need} bytes") from None
        else:
            more = await self._reader.read(READ_SIZE)
            if not more:
                self._buf = b""
                if not buf:
                    return None
                if len(buf) < 4:
                    raise TruncatedFrame(f"stream ended inside a length prefix ({len(buf)} bytes)")
                raise TruncatedFrame(f"stream ended after {len(buf) - 4} of "
                                     f"{len(buf) - 4 + need} bytes")
        return buf + more if buf else more

    def detach(self) -> tuple[list[Frame], bytes, FrameError | None]:
        """Hand over what was read ahead (frames decoded, bytes not yet parsed, an error found
        after them) to a parser that takes the connection over (the replica server's, after
        the handshake); the reader is empty afterwards."""
        ready, raw, error = self._ready, self._buf, self._error
        self._ready, self._buf, self._error = [], b"", None
        return ready, raw, error

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


class PartialFrame:
    """The bytes of a frame cut by a segment's end (and what followed it), kept until the
    frame is whole: both ends' parsers (``Pipeline.feed``, the replica server's stream) cut
    every complete frame out of each segment and leave the rest here."""

    __slots__ = ("pieces", "have", "need")

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.have = 0                      # bytes in pieces
        self.need = 0                      # bytes its frame needs (0: length prefix incomplete)

    def add(self, data: bytes) -> bytes | None:
        """``data`` as is when nothing is kept; else, once the kept frame is whole, what is
        kept joined with ``data``; None while it is not."""
        if not self.pieces:
            return data
        self.pieces.append(data)
        self.have += len(data)
        if self.have < self.need:
            return None
        data = b"".join(self.pieces)
        self.pieces.clear()
        self.have = 0
        return data

    def keep(self, buf: bytes, used: int) -> None:
        """Keep ``buf[used:]``, the part after the last complete frame, if any."""
        if used < len(buf):
            rest = buf[used:] if used else buf
            self.pieces.append(rest)
            self.have = len(rest)
            self.need = _LEN.unpack_from(rest)[0] + 4 if len(rest) >= 4 else 0


class Pipeline:
    """The requesting side of one connection: many outstanding calls, replies in any order.

    ``call`` numbers the request, sends it and waits for the reply with that
    id.  Replies are routed as they arrive: with a ``link`` (``link.Link``, how
    the replica client dials) in the protocol's own callback, so a batch of
    replies completes its writes in the loop turn that read it; without one
    (tests over plain streams) a pump task feeds the same parser.  If the
    connection fails, every outstanding call fails with the same error (the
    caller then picks another replica or reconnects).
    """

    def __init__(self, reader: FrameReader, writer: FrameWriter, link=None) -> None:
        self._writer = writer
        self._ids = itertools.count(1)
        self._issued = 0
        self._waiting: dict[int, asyncio.Future[Frame]] = {}
        self._deadline: dict[int, tuple[float, float, int]] = {}   # id -> (due, limit, op)
        # start_write id -> on_reply(None for a plain OK | the reply Frame | the exception)
        self._lite: dict[int, Callable[[Any], None]] = {}
        self._error: BaseException | None = None
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._watch: asyncio.TimerHandle | None = None
        self._partial = PartialFrame()     # an incomplete reply (and what followed it)
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task | None = None
        ready, raw, error = reader.detach()
        for frame in ready:                # replies read ahead with the handshake's last frame
            self._deliver_safely(frame)
        if error is not None:
            self._fail(error)
            return
        if raw:
            self.feed(raw)
        if link is not None:
            link.attach(self)
            link.inbox.hand_over(self)
        else:
            self._task = self._loop.create_task(self._pump(reader.source))

    @property
    def outstanding(self) -> int:
        return len(self._waiting) + len(self._lite)

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
        return self.start_fields(request.op, request.volume, request.extent, request.epoch,
                                 request.generation, request.offset, request.length, request.data,
                                 request.seq, request.args, timeout)

    def start_fields(self, op: Op, volume: str, extent: int, epoch: int, generation: int,
                     offset: int, length: int, data: bytes | memoryview | None, seq: int,
                     args: dict[str, Any] | None, timeout: float | None) -> asyncio.Future[Frame]:
        """``start`` without building a request Frame (the replicated-write hot path)."""
        if self._error is not None:
            raise ConnectionError(f"connection failed: {self._error}")
        ident = next(self._ids)
        raw = encode_fields(op, ident, volume, extent, epoch, generation, offset, length, data,
                            None, seq, args)
        return self._queue(ident, raw, op, timeout)

    def start_write(self, volume: str, extent: int, epoch: int, offset: int,
                    data: bytes | memoryview, seq: int, timeout: float | None,
                    on_reply: Callable[[Any], None], args: dict[str, Any] | None = None) -> None:
        """A WRITE (no args) whose answer is handed to ``on_reply``: None for a plain OK, the
        reply Frame for any other, the exception if the connection fails or the reply is
        overdue. Called from the reply's routing, with no future and no loop turn between:
        the replicated-write hot path, where the OK reply, every write's answer, is
        recognised from its first header bytes and never decoded into a Frame. ``args``
        (a sole replica's ``sole``) makes it a general frame, answered the same way."""
        if self._error is not None:
            raise ConnectionError(f"connection failed: {self._error}")
        ident = next(self._ids)
        if args is None:
            raw = encode_write(ident, volume, extent, epoch, offset, data, seq)
        elif args == _SOLE_DICT:
            raw = encode_sole_write(ident, volume, extent, epoch, offset, data, seq)
        else:
            raw = encode_fields(Op.WRITE, ident, volume, extent, epoch, 0, offset,
                                memoryview(data).nbytes, data, None, seq, args)
        self._lite[ident] = on_reply
        self._enqueue(ident, raw, Op.WRITE, timeout)

    def _queue(self, ident: int, raw: bytes, op: int, timeout: float | None) -> asyncio.Future:
        fut: asyncio.Future[Frame] = self._loop.create_future()
        self._waiting[ident] = fut
        self._enqueue(ident, raw, op, timeout)
        return fut

    def _enqueue(self, ident: int, raw: bytes, op: int, timeout: float | None) -> None:
        self._issued = ident
        loop = self._loop
        if timeout is not None:
            self._deadline[ident] = (loop.time() + timeout, timeout, op)
            if self._watch is None:
                self._watch = loop.call_later(min(timeout, 0.25), self._check)
        if self.outstanding == 1 and not self._out:
            # The only request in flight on an idle connection (QD1): there is nothing to
            # batch it with, so it leaves now rather than a loop turn later.
            self._writer.write_bytes(raw)
            return
        self._out.append(raw)
        if len(self._out) >= FLUSH_EVERY:
            self._flush()                   # the peer starts on these while we go on
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)

    def _check(self) -> None:
        self._watch = None
        if self._error is not None or not self._deadline:
            return
        now = self._loop.time()
        for ident, (due, limit, op) in self._deadline.items():
            if due <= now:
                name = _OPS[op].name if op in _OPS else str(op)
                self._fail(ConnectionError(f"{name} timed out after {limit:g}s"))
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

    async def _pump(self, source) -> None:
        """Feed the parser from a stream (a Pipeline built without a link)."""
        try:
            while self._error is None:
                data = await source.read(READ_SIZE)
                if not data:
                    self.feed_eof()
                    return
                self.feed(data)
        except (ConnectionError, OSError) as e:
            self.lost(e)

    # -- the sink side (link.Sink): replies as they arrive ----------------------------------

    def feed(self, data: bytes) -> None:
        if self._error is not None:
            return
        data = self._partial.add(data)
        if data is None:
            return
        try:
            self._route(data)
        except FrameError as e:
            self._fail(e)
            self._writer.abort()

    def feed_eof(self) -> None:
        self._fail(ConnectionError("connection closed by peer"))

    def lost(self, exc: BaseException | None) -> None:
        self._fail(exc if exc is not None else ConnectionError("connection closed by peer"))

    def _route(self, buf: bytes) -> None:
        """Answer every complete reply in ``buf``; keep an incomplete rest in ``_partial``.
        A plain WRITE OK (every write's answer) is recognised from its first header bytes
        and never decoded into a Frame."""
        cut, used, error = spans(buf)
        deadline, lite = self._deadline, self._lite
        head = _REPLY_HEAD.unpack_from
        for start, n in cut:
            if n >= _HDR.size:
                h = head(buf, start)
                if h[:4] == _PLAIN_WRITE_OK:
                    on_reply = lite.pop(h[4], None)
                    if on_reply is not None:
                        if deadline:
                            deadline.pop(h[4], None)
                        _answer(on_reply, None)
                        continue
            self._deliver(_decode(buf, start, n))
            if self._error is not None:
                return
        if error is not None:
            raise error
        self._partial.keep(buf, used)

    def _deliver_safely(self, frame: Frame) -> None:
        try:
            self._deliver(frame)
        except FrameError as e:
            self._fail(e)
            self._writer.abort()

    def _deliver(self, frame: Frame) -> None:
        ident = frame.id
        if frame.status is None or not 0 < ident <= self._issued:
            raise MalformedFrame(f"unexpected frame id {ident} op {frame.op.name}")
        if self._deadline:
            self._deadline.pop(ident, None)
        on_reply = self._lite.pop(ident, None)
        if on_reply is not None:
            _answer(on_reply, frame)
            return
        fut = self._waiting.pop(ident, None)
        if fut is not None and not fut.done():   # done: the caller gave up (cancelled)
            fut.set_result(frame)

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        waiting, self._waiting = self._waiting, {}
        lite = list(self._lite.values())
        self._lite.clear()              # _route holds this dict: a late reply finds nothing
        self._deadline.clear()
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(ConnectionError(f"connection failed: {error}"))
        for on_reply in lite:
            _answer(on_reply, ConnectionError(f"connection failed: {error}"))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._fail(ConnectionError("pipeline closed"))
        await self._writer.close()


def _answer(on_reply: Callable[[Any], None], result: Any) -> None:
    """Call a start_write callback; a bug in one must not take the connection's routing down."""
    try:
        on_reply(result)
    except Exception:  # noqa: BLE001 - logged like a failing future callback
        log.exception("replica write reply callback failed")


def legacy_refusal(message: str) -> bytes:
    """A version-1 (msgpack) DENIED answer to a version-1 HELLO, so an older peer logs why
    it was refused instead of seeing the connection just close."""
    body = msgpack.packb([int(Op.HELLO), 1, "", 0, 0, 0, 0, 0, None, int(Status.DENIED), 0,
                          {"error": message}])
    return _LEN.pack(len(body)) + body
