"""Replication frames: codec round trip, typed errors, batched reads, pipelining over real loopback sockets."""

from __future__ import annotations

import asyncio
import os
import random
import struct

import msgpack
import pytest

from chunk.storage import wire
from chunk.storage.wire import (
    Frame, FrameReader, FrameTooLarge, FrameWriter, MalformedFrame, Op, Pipeline, Status,
    TruncatedFrame, VersionMismatch,
)


def test_round_trip_request_and_reply():
    req = Frame(Op.WRITE, 7, "vol-a", 3, epoch=5, generation=2, offset=8192, length=4,
                data=b"abcd")
    raw = wire.encode(req)
    assert struct.unpack(">I", raw[:4])[0] == len(raw) - 4
    assert raw[4] == wire.VERSION and raw.endswith(b"abcd")        # the payload travels raw
    assert wire.decode(raw[4:]) == req
    rep = req.reply(Status.STALE_EPOCH)
    assert rep.data is None and rep.status is Status.STALE_EPOCH and rep.id == 7
    assert wire.decode(wire.encode(rep)[4:]) == rep
    assert len(wire.encode(Frame(Op.READ, 1, "v", 0, 1, 0, 0, 4096))) == 4 + HDR + 1


def test_memoryview_data_empty_data_and_empty_args_are_kept_apart_from_none():
    frame = Frame(Op.WRITE, 1, "v", data=memoryview(b"xyz"))
    assert wire.decode(wire.encode(frame)[4:]).data == b"xyz"
    assert wire.decode(wire.encode(Frame(Op.WRITE, 1, data=b""))[4:]).data == b""
    assert wire.decode(wire.encode(Frame(Op.PING, 1))[4:]).data is None
    assert wire.decode(wire.encode(Frame(Op.PING, 1, args={}))[4:]).args == {}
    big = Frame(Op.READ, 2**64 - 1, "ünïcode-vol", 2**64 - 1, 2**64 - 1, 2**64 - 1, 2**64 - 1,
                2**64 - 1, b"d", Status.DENIED, 2**64 - 1, {"error": "x"})
    assert wire.decode(wire.encode(big)[4:]) == big
    back = wire.decode(memoryview(wire.encode(big))[4:])             # decode takes a view too
    assert back == big and type(back.data) is bytes and type(back.op) is Op


def test_seq_and_args_round_trip_and_replies_keep_seq():
    req = Frame(Op.READ, 3, "v", 1, epoch=2, offset=0, length=8192, seq=17)
    assert wire.decode(wire.encode(req)[4:]) == req
    rep = req.reply(Status.OK, b"d" * 8192, {"present": b"\x03"})
    assert rep.seq == 17 and rep.args == {"present": b"\x03"}
    back = wire.decode(wire.encode(rep)[4:])
    assert back == rep and isinstance(back.args["present"], bytes)
    assert Frame(Op.PING, 1).reply().args is None


def test_other_wire_versions_are_refused_by_name():
    old = msgpack.packb([2, 4, "v", 1, 3, 2, 4096, 3, b"abc", None, 1, None])   # version 1
    with pytest.raises(VersionMismatch) as e:
        wire.decode(old)
    assert e.value.legacy and "version 1" in str(e.value) and f"version {wire.VERSION}" in str(e.value)
    newer = bytearray(wire.encode(Frame(Op.PING, 1))[4:])
    newer[0] = wire.VERSION + 1
    with pytest.raises(VersionMismatch) as e:
        wire.decode(bytes(newer))
    assert not e.value.legacy and f"version {wire.VERSION + 1}" in str(e.value)
    with pytest.raises(VersionMismatch):                             # even when short
        wire.decode(b"\x9c\x01")


def test_legacy_refusal_is_a_version_1_denied_hello():
    body = wire.legacy_refusal("upgrade")[4:]
    fields = msgpack.unpackb(body)
    assert fields[0] == Op.HELLO and fields[1] == 1 and fields[9] == Status.DENIED
    assert fields[11] == {"error": "upgrade"}


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


HDR = 66


def _body(op=1, status=0xFF, flags=0, vol=b"v", args=b"", data=b"", vlen=None, alen=None,
          version=None) -> bytes:
    """A frame body built field by field, so each field can be wrong on its own."""
    head = struct.pack(">BBBBQQQQQQQHI", wire.VERSION if version is None else version, op, status,
                       flags, 1, 0, 0, 0, 0, 0, 0, len(vol) if vlen is None else vlen,
                       len(args) if alen is None else alen)
    return head + vol + args + data


def test_hand_built_body_decodes():
    f = wire.decode(_body(op=2, flags=3, vol=b"vv", args=msgpack.packb({"fua": True}), data=b"xy"))
    assert (f.op, f.volume, f.args, f.data, f.status) == (Op.WRITE, "vv", {"fua": True}, b"xy", None)


@pytest.mark.parametrize("payload", [
    b"",                                               # nothing at all
    _body()[:HDR - 1],                                 # header cut short
    _body(op=99),                                      # unknown op
    _body(op=0),
    _body(status=77),                                  # unknown status
    _body(flags=4),                                    # unknown flag
    _body(vlen=200),                                   # volume runs past the frame
    _body(flags=2, args=msgpack.packb({}), alen=50),   # args run past the frame
    _body(vol=b"\xff\xfe"),                            # volume not UTF-8
    _body(flags=2, args=b"\xc1"),                      # args not msgpack
    _body(flags=2, args=b"\x93\x01"),                  # args cut short
    _body(flags=2, args=msgpack.packb([1])),           # args not a map
    _body(flags=2, args=msgpack.packb({b"k": 1})),     # bin key
    _body(flags=2, args=msgpack.packb({1: 1}, strict_types=False)),   # int key
    _body(flags=2, args=msgpack.packb({}) + b"\x00"),  # trailing bytes inside args
    _body(args=msgpack.packb({})),                     # args bytes without the args flag
    _body(data=b"x"),                                  # trailing bytes without the data flag
])
def test_garbage_bodies_are_malformed(payload: bytes):
    with pytest.raises(MalformedFrame):
        wire.decode(payload)


def test_encode_refuses_oversized_frames_and_fields_that_do_not_fit():
    with pytest.raises(ValueError):
        wire.encode(Frame(Op.WRITE, 1, "v", data=bytes(wire.MAX_FRAME)))
    with pytest.raises(ValueError):
        wire.encode(Frame(Op.WRITE, 1, "v", offset=-1))
    with pytest.raises(ValueError):
        wire.encode(Frame(Op.WRITE, 2**64, "v"))
    with pytest.raises(ValueError):
        wire.encode(Frame(Op.WRITE, 1, "v" * 70000))                # volume length is 16 bits


def _reader(data: bytes, eof: bool = True, max_frame: int = 1024) -> FrameReader:
    r = asyncio.StreamReader()
    r.feed_data(data)
    if eof:
        r.feed_eof()
    return FrameReader(r, max_frame=max_frame)


async def test_stream_errors_are_typed():
    good = wire.encode(Frame(Op.PING, 1))
    r = _reader(good + good)
    assert [f.id async for f in r] == [1, 1]                  # clean EOF between frames
    with pytest.raises(TruncatedFrame):
        await _reader(good[:2]).read()                         # inside the prefix
    with pytest.raises(TruncatedFrame):
        await _reader(good[:-1]).read()                        # inside the payload
    huge = _reader(struct.pack(">I", 1 << 30), eof=False)      # rejected before reading on
    with pytest.raises(FrameTooLarge):
        await asyncio.wait_for(huge.read(), 5)
    with pytest.raises(MalformedFrame):
        await _reader(struct.pack(">I", 3) + b"\xc1\xc1\xc1").read()
    with pytest.raises(TruncatedFrame):                        # a big frame cut short
        await _reader(wire.encode(Frame(Op.WRITE, 1, data=bytes(200_000)))[:150_000],
                      max_frame=wire.MAX_FRAME).read()


async def test_one_read_yields_every_complete_frame_and_keeps_the_rest():
    frames = [wire.encode(Frame(Op.WRITE, i, "v", data=bytes([i]) * 4096)) for i in range(1, 33)]
    stream = b"".join(frames)
    r = _reader(stream + frames[0][:10], eof=False, max_frame=wire.MAX_FRAME)
    per_read = wire.READ_SIZE // len(frames[0])                # whole frames in one socket read
    got = await asyncio.wait_for(r.read_many(), 5)
    assert [f.id for f in got] == list(range(1, 1 + min(32, per_read)))
    while len(got) < 32:
        more = await asyncio.wait_for(r.read_many(), 5)
        assert 0 < len(more) <= per_read + 1
        got += more
    assert [f.id for f in got] == list(range(1, 33))
    assert all(f.data == bytes([f.id]) * 4096 for f in got)
    reading = asyncio.ensure_future(r.read_many())             # 10 bytes of the next: it waits
    await asyncio.sleep(0.05)
    assert not reading.done()
    r._reader.feed_data(frames[0][10:])
    r._reader.feed_eof()
    assert [f.id for f in await asyncio.wait_for(reading, 5)] == [1]
    assert await r.read_many() == [] and await r.read() is None


async def test_frames_cut_at_every_byte_and_a_frame_bigger_than_one_read():
    big = wire.encode(Frame(Op.WRITE, 9, "v", data=os.urandom(wire.MAX_DATA)))
    small = wire.encode(Frame(Op.PING, 3))
    stream = small + big + small
    sr = asyncio.StreamReader()
    reader = FrameReader(sr)

    async def feed() -> None:
        for i in range(0, 300):                                # byte by byte at first
            sr.feed_data(stream[i:i + 1])
            await asyncio.sleep(0)
        for i in range(300, len(stream), 7001):                # then odd-sized pieces
            sr.feed_data(stream[i:i + 7001])
            await asyncio.sleep(0)
        sr.feed_eof()

    feeder = asyncio.ensure_future(feed())
    got = [f async for f in reader]
    await feeder
    assert [f.id for f in got] == [3, 9, 3]
    assert got[1].data == big[4 + HDR + 1:]


async def test_frames_before_a_bad_one_are_delivered_then_the_error():
    good = wire.encode(Frame(Op.PING, 1))
    r = _reader(good + good + struct.pack(">I", 3) + b"\xc1\xc1\xc1" + good)
    assert [f.id for f in await r.read_many()] == [1, 1]
    with pytest.raises(MalformedFrame):
        await r.read_many()
    with pytest.raises(MalformedFrame):                        # and it stays failed
        await r.read()


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



async def test_start_write_answers_each_callback_once_ok_error_or_failure():
    """start_write's on_reply: None for a plain OK, the Frame for any other reply, and the
    connection's error for writes left unanswered when a reply is overdue; each callback is
    called exactly once (a late reply after the failure finds nothing), and one that raises
    does not stop the routing of the others."""
    async def answer(reader, writer):
        frames, out = FrameReader(reader), FrameWriter(writer)
        async for req in frames:
            if req.offset == 4096 * 7:
                continue                              # never answered: the watchdog fails it
            out.write(req.reply(Status.STALE_EPOCH if req.offset == 0 else Status.OK))
            await out.drain()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    r, w = await asyncio.open_connection("127.0.0.1", port)
    pipe = Pipeline(FrameReader(r), FrameWriter(w))
    got: dict[int, list] = {i: [] for i in range(8)}

    def on_reply(i):
        def cb(result):
            got[i].append(result)
            if i == 3:
                raise RuntimeError("a buggy callback")
        return cb
    try:
        for i in range(7):
            pipe.start_write("v", 0, 1, i * 4096, b"d" * 4096, 1, None, on_reply(i))
        assert pipe.outstanding == 7
        for _ in range(200):
            if all(got[i] for i in range(7)):
                break
            await asyncio.sleep(0.01)
        assert got[0][0].status is Status.STALE_EPOCH            # decoded: not a plain OK
        assert [got[i] for i in range(1, 7)] == [[None]] * 6
        assert pipe.outstanding == 0
        pipe.start_write("v", 0, 1, 7 * 4096, b"d" * 4096, 1, 0.2, on_reply(7))
        for _ in range(300):
            if got[7]:
                break
            await asyncio.sleep(0.01)
        assert len(got[7]) == 1 and isinstance(got[7][0], ConnectionError)
        assert "timed out" in str(got[7][0])
        assert pipe.failed is not None and pipe.outstanding == 0
        with pytest.raises(ConnectionError):
            pipe.start_write("v", 0, 1, 0, b"d" * 4096, 1, None, on_reply(0))
        await asyncio.sleep(0.05)
        assert len(got[7]) == 1 and len(got[0]) == 1            # nothing answered twice
    finally:
        await pipe.close()
        server.close()
        await server.wait_closed()


class _CountingWriter(FrameWriter):
    """A FrameWriter that records when bytes are handed to the transport."""

    def __init__(self, writer):
        super().__init__(writer)
        self.sends: list[int] = []

    def write_bytes(self, data: bytes) -> None:
        self.sends.append(len(data))
        super().write_bytes(data)


async def _counted_pipeline_to_an_ok_server():
    """(server answering every request OK, the counting writer, a Pipeline over it)."""
    async def ok(reader, writer):
        frames, out = FrameReader(reader), FrameWriter(writer)
        async for req in frames:
            out.write(req.reply(Status.OK))
            await out.drain()

    server = await asyncio.start_server(ok, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    r, w = await asyncio.open_connection("127.0.0.1", port)
    cw = _CountingWriter(w)
    return server, cw, Pipeline(FrameReader(r), cw)


async def test_an_idle_connection_sends_at_once_a_busy_one_at_the_turns_end():
    """The only request in flight leaves inside start_write (QD1: nothing to batch it with);
    requests behind it are batched into one send at the end of the loop turn."""
    server, cw, pipe = await _counted_pipeline_to_an_ok_server()
    got: list = []
    try:
        pipe.start_write("v", 0, 1, 0, b"d" * 4096, 1, 5.0, got.append)
        assert len(cw.sends) == 1                     # sent before any loop turn
        for k in range(1, 4):
            pipe.start_write("v", 0, 1, k * 4096, b"d" * 4096, 1, 5.0, got.append)
        assert len(cw.sends) == 1                     # queued behind the first
        await asyncio.sleep(0)
        assert len(cw.sends) == 2 and cw.sends[1] > 3 * 4096     # the three in one send
        for _ in range(200):
            if len(got) == 4:
                break
            await asyncio.sleep(0.01)
        assert got == [None] * 4 and pipe.outstanding == 0
    finally:
        await pipe.close()
        server.close()
        await server.wait_closed()

async def test_a_busy_connection_sends_every_flush_every_frames_not_all_at_the_turns_end():
    """Twenty requests queued in one loop turn behind a first one: they leave FLUSH_EVERY at
    a time as they are queued (the peer starts on them while the coordinator goes on) and
    the rest at the end of the turn. All at the turn's end, the two ends took turns."""
    from chunk.storage.wire import FLUSH_EVERY

    server, cw, pipe = await _counted_pipeline_to_an_ok_server()
    got: list = []
    try:
        pipe.start_write("v", 0, 1, 0, b"d" * 4096, 1, 5.0, got.append)      # alone: sent at once
        for k in range(1, 21):
            pipe.start_write("v", 0, 1, k * 4096, b"d" * 4096, 1, 5.0, got.append)
        assert len(cw.sends) == 1 + 20 // FLUSH_EVERY               # pieces left while queueing
        assert all(n > FLUSH_EVERY * 4096 for n in cw.sends[1:])
        await asyncio.sleep(0)
        assert len(cw.sends) == 2 + 20 // FLUSH_EVERY               # the rest at the turn's end
        for _ in range(200):
            if len(got) == 21:
                break
            await asyncio.sleep(0.01)
        assert got == [None] * 21 and pipe.outstanding == 0
    finally:
        await pipe.close()
        server.close()
        await server.wait_closed()


# -- the replica server's write fast path: plain_write / encode_write_ok / spans / detach --

def _plain(ident: int = 5, vol: str = "vol-ü", data: bytes = b"d" * 4096, **kw) -> Frame:
    return Frame(Op.WRITE, ident, vol, kw.pop("extent", 3), kw.pop("epoch", 7),
                 kw.pop("generation", 2), kw.pop("offset", 8192), len(data), data,
                 seq=kw.pop("seq", 11), **kw)


@pytest.mark.parametrize("frame", [
    _plain(),
    _plain(2**64 - 1, "v", b"x", extent=2**64 - 1, epoch=2**64 - 1, generation=2**64 - 1,
           offset=2**64 - 1, seq=2**64 - 1),
    Frame(Op.WRITE, 9, "v", 1, 1, 0, 0, 0, b"abc", seq=1),          # length 0: the data says
])
def test_plain_write_reply_is_byte_identical_to_the_general_encoding(frame: Frame):
    raw = wire.encode(frame)
    h = wire.plain_write(raw, 4, len(raw) - 4)
    assert h is not None
    vlen = len(frame.volume.encode())
    assert h[11] == vlen
    assert wire.encode_write_ok(raw, 4, vlen) == wire.encode(wire.decode(raw[4:]).reply())
    assert wire.decode_at(raw, 4, len(raw) - 4) == frame


@pytest.mark.parametrize("body", [
    wire.encode(_plain(args={"fua": True}))[4:],                   # args: FUA and friends
    wire.encode(Frame(Op.WRITE, 1, "v", 0, 1, seq=1))[4:],         # no data
    wire.encode(_plain(vol=""))[4:],                               # no volume
    wire.encode(_plain().reply())[4:],                             # a reply
    wire.encode(Frame(Op.READ, 1, "v", 0, 1, 0, 0, 4096))[4:],     # another op
    _body(op=2, flags=1, data=b"abcd", version=1),                 # another version
    _body(op=2, flags=1 | 4, data=b"abcd"),                        # unknown flags
    _body(op=2, flags=1, vol=b"v", vlen=200, data=b"abcd"),        # volume past the end
    _body(op=2, flags=1, alen=3, data=b"abcd"),                    # args bytes without the flag
    _body(op=2, flags=1)[:HDR - 1],                                # short header
])
def test_plain_write_leaves_everything_else_to_the_general_path(body: bytes):
    assert wire.plain_write(body, 0, len(body)) is None


def test_plain_write_reads_inside_a_larger_buffer():
    a, b = wire.encode(_plain(1, "a")), wire.encode(_plain(2, "bb", b"z" * 10))
    buf = a + b
    spans, used, error = wire.spans(buf)
    assert spans == [(4, len(a) - 4), (len(a) + 4, len(b) - 4)] and used == len(buf)
    assert error is None
    h = wire.plain_write(buf, *spans[1])
    assert h[4] == 2 and buf[spans[1][0] + HDR:spans[1][0] + HDR + h[11]] == b"bb"
    expected = wire.encode(_plain(2, "bb", b"z" * 10).reply())
    assert wire.encode_write_ok(buf, spans[1][0], 2) == expected


def test_spans_stop_at_an_incomplete_frame_and_report_an_oversized_one():
    frame = wire.encode(_plain())
    assert wire.spans(frame + frame[:10]) == ([(4, len(frame) - 4)], len(frame), None)
    spans, used, error = wire.spans(frame + struct.pack(">I", 5000), max_frame=4200)
    assert spans == [(4, len(frame) - 4)] and used == len(frame)
    assert isinstance(error, FrameTooLarge)


def test_spans_cut_from_a_start_and_leave_decoding_to_the_caller():
    frames = [wire.encode(_plain(i, data=bytes([i]) * 4096)) for i in range(1, 4)]
    bad = struct.pack(">I", 3) + b"\xc1\xc1\xc1"
    buf = b"".join(frames) + bad + frames[0][:30]
    cut, used, error = wire.spans(buf, start=len(frames[0]))        # from the second frame
    assert [wire.decode_at(buf, s, n).id for s, n in cut[:2]] == [2, 3]
    assert used == len(buf) - 30 and error is None and len(cut) == 3
    with pytest.raises(MalformedFrame):                              # spans do not decode
        wire.decode_at(buf, *cut[2])


async def test_detach_hands_over_what_the_handshake_read_ahead():
    frames = b"".join(wire.encode(Frame(Op.PING, i)) for i in (1, 2, 3))
    tail = wire.encode(_plain(4))
    r = _reader(frames + tail[:100], max_frame=wire.MAX_FRAME)
    assert (await r.read()).id == 1
    ready, raw, error = r.detach()
    assert [f.id for f in ready] == [2, 3] and raw == tail[:100] and error is None
    assert r.detach() == ([], b"", None)
    # an error found after the frames handed over is handed over too
    r = _reader(frames + struct.pack(">I", 2**30), max_frame=wire.MAX_FRAME)
    assert (await r.read()).id == 1
    ready, raw, error = r.detach()
    assert [f.id for f in ready] == [2, 3] and isinstance(error, FrameTooLarge)


@pytest.mark.parametrize("volume, data", [("vol-a", b"x" * 4096), ("ünïcode-vol", memoryview(b"abc")),
                                          ("v", memoryview(bytearray(wire.MAX_DATA))), ("w", b"")])
def test_encode_write_is_byte_identical_to_encode_fields(volume: str, data):
    """The replicated write's encoder: the general encoding of the same WRITE, twice (the
    second time from the cached volume bytes)."""
    for _ in range(2):
        fast = wire.encode_write(9, volume, 3, 5, 8192, data, 7)
        assert fast == wire.encode_fields(Op.WRITE, 9, volume, 3, 5, 0, 8192, len(data), data,
                                          None, 7, None)
        assert wire.decode(fast[4:]) == Frame(Op.WRITE, 9, volume, 3, 5, 0, 8192, len(data),
                                              bytes(data), seq=7)


def test_encode_write_refuses_what_encode_fields_refuses():
    with pytest.raises(ValueError, match="exceeds"):
        wire.encode_write(1, "v", 0, 1, 0, bytes(wire.MAX_FRAME), 1)
    with pytest.raises(ValueError, match="out of range"):
        wire.encode_write(1, "v", 0, 2**64, 0, b"x", 1)


# -- the Pipeline as a link's sink: replies fed segment by segment ---------------------------

class _NullWriter(FrameWriter):
    """Takes requests and drops them; records an abort (the connection dropped)."""

    def __init__(self):
        self.sent: list[bytes] = []
        self.aborted = False

    def write_bytes(self, data: bytes) -> None:
        self.sent.append(bytes(data))

    def buffered(self) -> int:
        return 0

    def abort(self) -> None:
        self.aborted = True

    async def close(self) -> None:
        pass


class _SilentSource:
    """A stream that never delivers: the pipeline is fed through ``feed`` only."""

    async def read(self, n: int) -> bytes:
        await asyncio.Event().wait()
        return b""


def _sink_pipeline() -> tuple[Pipeline, _NullWriter]:
    w = _NullWriter()
    return Pipeline(FrameReader(_SilentSource()), w), w


async def test_replies_split_across_segments_anywhere_are_routed_once_each():
    """``feed`` gets what the link's data_received gets: segments cut anywhere, a reply
    across several, several replies in one. Each write and call is answered once."""
    pipe, _ = _sink_pipeline()
    got: dict[int, list] = {i: [] for i in range(5)}
    try:
        for i in range(5):
            pipe.start_write("v", 0, 1, i * 4096, b"d" * 4096, 1, 5.0, got[i].append)
        call = pipe.start(Frame(Op.READ, 0, "v", 0, 1, 0, 0, 4096), 5.0)
        stream = b"".join(
            [wire.encode(Frame(Op.WRITE, i + 1, "v", 0, 1, 0, i * 4096, 4096, status=Status.OK))
             for i in range(4)]
            + [wire.encode(Frame(Op.WRITE, 5, "v", status=Status.NO_EXTENT, args={"error": "x"})),
               wire.encode(Frame(Op.READ, 6, "v", status=Status.OK, data=b"r" * 4096))])
        cuts = sorted(random.Random(7).sample(range(1, len(stream)), 40)) + [len(stream)]
        pos = 0
        for c in cuts:
            pipe.feed(stream[pos:c])
            pos = c
        assert [got[i] for i in range(4)] == [[None]] * 4           # plain OKs: not decoded
        assert len(got[4]) == 1 and got[4][0].status is Status.NO_EXTENT
        reply = await asyncio.wait_for(call, 1)
        assert reply.data == b"r" * 4096 and pipe.outstanding == 0 and pipe.failed is None
    finally:
        await pipe.close()


async def test_a_reply_nobody_asked_for_fails_the_connection_and_every_waiter():
    pipe, w = _sink_pipeline()
    got: list = []
    try:
        pipe.start_write("v", 0, 1, 0, b"d" * 4096, 1, 5.0, got.append)
        pipe.feed(wire.encode(Frame(Op.WRITE, 99, "v", status=Status.OK, args={"x": 1})))
        assert isinstance(pipe.failed, MalformedFrame) and w.aborted
        assert len(got) == 1 and isinstance(got[0], ConnectionError)
        pipe.feed(wire.encode(Frame(Op.WRITE, 1, "v", status=Status.OK)))    # late: ignored
        assert len(got) == 1
    finally:
        await pipe.close()


async def test_the_link_end_of_stream_or_loss_fails_what_is_outstanding():
    for end in ("eof", "lost"):
        pipe, _ = _sink_pipeline()
        got: list = []
        try:
            pipe.start_write("v", 0, 1, 0, b"d" * 4096, 1, 5.0, got.append)
            pipe.feed(wire.encode(Frame(Op.WRITE, 1, "v", status=Status.OK))[:30])  # half a reply
            if end == "eof":
                pipe.feed_eof()
            else:
                pipe.lost(OSError("reset"))
            assert len(got) == 1 and isinstance(got[0], (ConnectionError, OSError))
            assert pipe.failed is not None
        finally:
            await pipe.close()
