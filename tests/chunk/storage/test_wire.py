"""Replication frames: codec round trip, typed errors, pipelining over real loopback sockets."""

from __future__ import annotations

import asyncio
import random
import struct

import msgpack
import pytest

from chunk.storage import wire
from chunk.storage.wire import (
    Frame, FrameReader, FrameTooLarge, FrameWriter, MalformedFrame, Op, Pipeline, Status,
    TruncatedFrame,
)


def test_round_trip_request_and_reply():
    req = Frame(Op.WRITE, 7, "vol-a", 3, epoch=5, generation=2, offset=8192, length=4,
                data=b"abcd")
    raw = wire.encode(req)
    assert struct.unpack(">I", raw[:4])[0] == len(raw) - 4
    assert wire.decode(raw[4:]) == req
    rep = req.reply(Status.STALE_EPOCH)
    assert rep.data is None and rep.status is Status.STALE_EPOCH and rep.id == 7
    assert wire.decode(wire.encode(rep)[4:]) == rep
    assert len(wire.encode(Frame(Op.READ, 1, "v", 0, 1, 0, 0, 4096))) < 40   # compact


def test_memoryview_data_and_trailing_fields_from_newer_peers():
    frame = Frame(Op.WRITE, 1, "v", data=memoryview(b"xyz"))
    assert wire.decode(wire.encode(frame)[4:]).data == b"xyz"
    newer = msgpack.packb([2, 1, "v", 0, 0, 0, 0, 0, None, None, 9, {"fua": True}, "future", 1])
    got = wire.decode(newer)
    assert got.op is Op.WRITE and got.seq == 9 and got.args == {"fua": True}


def test_seq_and_args_round_trip_and_replies_keep_seq():
    req = Frame(Op.READ, 3, "v", 1, epoch=2, offset=0, length=8192, seq=17)
    assert wire.decode(wire.encode(req)[4:]) == req
    rep = req.reply(Status.OK, b"d" * 8192, {"present": b"\x03"})
    assert rep.seq == 17 and rep.args == {"present": b"\x03"}
    back = wire.decode(wire.encode(rep)[4:])
    assert back == rep and isinstance(back.args["present"], bytes)
    assert Frame(Op.PING, 1).reply().args is None


def test_old_ten_field_frames_still_decode():
    old = msgpack.packb([2, 4, "v", 1, 3, 2, 4096, 3, b"abc", None])
    assert wire.decode(old) == Frame(Op.WRITE, 4, "v", 1, 3, 2, 4096, 3, b"abc", None, 0, None)


def test_new_ops_and_statuses_keep_the_old_numbers():
    assert [Op.READ, Op.WRITE, Op.FLUSH, Op.UNMAP, Op.PING] == [1, 2, 3, 4, 5]
    assert [Status.OK, Status.STALE_EPOCH, Status.CHECKSUM, Status.NO_EXTENT, Status.IO_ERROR,
            Status.INVALID] == [0, 1, 2, 3, 4, 5]
    assert len({int(o) for o in Op}) == len(Op) and len({int(s) for s in Status}) == len(Status)
    for name in ("HELLO", "CREATE", "REVERT", "EXPORT", "IMPORT", "DIGEST", "SETGEN", "STAT"):
        assert wire.decode(wire.encode(Frame(Op[name], 1))[4:]).op is Op[name]
    for name in ("NO_SPACE", "STALE_GENERATION", "CONFLICT", "DENIED"):
        rep = Frame(Op.PING, 1).reply(Status[name])
        assert wire.decode(wire.encode(rep)[4:]).status is Status[name]


@pytest.mark.parametrize("payload", [
    b"\xc1",                                           # never-used msgpack byte
    b"\x93\x01",                                       # array cut short
    msgpack.packb({"op": 1}),                          # a map, not an array
    msgpack.packb([1, 2, 3]),                          # too few fields
    msgpack.packb([99, 1, "v", 0, 0, 0, 0, 0, None, None]),        # unknown op
    msgpack.packb([1, -1, "v", 0, 0, 0, 0, 0, None, None]),        # negative id
    msgpack.packb([1, 1, 5, 0, 0, 0, 0, 0, None, None]),           # volume not str
    msgpack.packb([1, 1, "v", 0, 0, 0, 0, 0, "text", None]),       # data not bin
    msgpack.packb([1, 1, "v", 0, 0, 0, 0, True, None, None]),      # bool is not a length
    msgpack.packb([1, 1, "v", 0, 0, 0, 0, 0, None, 77]),           # unknown status
    msgpack.packb([True, 1, "v", 0, 0, 0, 0, 0, None, None]),      # bool is not an op
    msgpack.packb([1, 1, "v", 0, 0, 0, 0, 0, None, None, -1]),     # negative seq
    msgpack.packb([1, 1, "v", 0, 0, 0, 0, 0, None, None, "s"]),    # seq not int
    msgpack.packb([1, 1, "v", 0, 0, 0, 0, 0, None, None, 0, [1]]), # args not a map
    msgpack.packb([1, 1, "v", 0, 0, 0, 0, 0, None, None, 0, {b"k": 1}]),   # bin key
    msgpack.packb([1, 1, "v", 0, 0, 0, 0, 0, None, None, 0, {1: 1}], strict_types=False),  # int key
    msgpack.packb([1, 1, "v", 0, 0, 0, 0, 0, None, None]) + b"\x00",   # trailing bytes
])
def test_garbage_payloads_are_malformed(payload: bytes):
    with pytest.raises(MalformedFrame):
        wire.decode(payload)


def test_encode_refuses_oversized_frames():
    with pytest.raises(ValueError):
        wire.encode(Frame(Op.WRITE, 1, "v", data=bytes(wire.MAX_FRAME)))


def _reader(data: bytes) -> FrameReader:
    r = asyncio.StreamReader()
    r.feed_data(data)
    r.feed_eof()
    return FrameReader(r, max_frame=1024)


async def test_stream_errors_are_typed():
    good = wire.encode(Frame(Op.PING, 1))
    r = _reader(good + good)
    assert [f.id async for f in r] == [1, 1]                  # clean EOF between frames
    with pytest.raises(TruncatedFrame):
        await _reader(good[:2]).read()                         # inside the prefix
    with pytest.raises(TruncatedFrame):
        await _reader(good[:-1]).read()                        # inside the payload
    huge = _reader(struct.pack(">I", 1 << 30))                 # rejected before reading on
    with pytest.raises(FrameTooLarge):
        await huge.read()
    with pytest.raises(MalformedFrame):
        await _reader(struct.pack(">I", 3) + b"\xc1\xc1\xc1").read()


async def _serve_out_of_order(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                              batch: int) -> None:
    """Answer requests in batches, each batch shuffled: replies overtake each other."""
    frames, out = FrameReader(reader), FrameWriter(writer)
    pending: list[Frame] = []
    async for req in frames:
        pending.append(req)
        if len(pending) == batch:
            random.shuffle(pending)
            for p in pending:
                data = p.data if p.op is Op.WRITE else f"{p.volume}:{p.offset}".encode()
                out.write(p.reply(Status.OK, data))
            pending.clear()
            await out.drain()
    await out.close()


async def test_pipelined_requests_answered_out_of_order_over_loopback():
    n, batch = 64, 16
    server = await asyncio.start_server(lambda r, w: _serve_out_of_order(r, w, batch),
                                        "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    r, w = await asyncio.open_connection("127.0.0.1", port)
    pipe = Pipeline(FrameReader(r), FrameWriter(w))
    try:
        calls = [asyncio.ensure_future(pipe.call(Frame(Op.READ, 0, f"v{i}", 0, 1, 0, i * 4096, 4096)))
                 for i in range(n)]
        await asyncio.sleep(0)
        replies = await asyncio.wait_for(asyncio.gather(*calls), 10)
        assert [rep.data for rep in replies] == [f"v{i}:{i * 4096}".encode() for i in range(n)]
        assert len({rep.id for rep in replies}) == n and pipe.outstanding == 0
    finally:
        await pipe.close()
        server.close()
        await server.wait_closed()


async def test_lost_connection_fails_every_outstanding_call():
    async def swallow_then_close(reader, writer):
        await reader.readexactly(10)
        writer.close()

    server = await asyncio.start_server(swallow_then_close, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    r, w = await asyncio.open_connection("127.0.0.1", port)
    pipe = Pipeline(FrameReader(r), FrameWriter(w))
    try:
        calls = [asyncio.ensure_future(pipe.call(Frame(Op.FLUSH, 0, "v"))) for _ in range(5)]
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
        assert all(isinstance(x, ConnectionError) for x in results)
        with pytest.raises(ConnectionError):
            await pipe.call(Frame(Op.PING, 0))
    finally:
        await pipe.close()
        server.close()
        await server.wait_closed()
