"""The replica server over real loopback sockets with a real ReplicaStore in tmp_path.

Requests are sent as raw frames (peer_auth's client side + wire.Pipeline), so
these tests pin the server's protocol independently of replica_client.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
from pathlib import Path

import msgpack
import pytest

from chunk.storage import peer_auth, wire
from chunk.storage.extent_file import BLOCK_SIZE
from chunk.storage.replica_server import ReplicaServer
from chunk.storage.replica_store import ReplicaStore
from chunk.storage.wire import Frame, FrameReader, Op, Pipeline, Status
from tests.chunk.storage.worker_syncs import closes_of, hold_syncs, replica_fds
from tests.chunk.storage import raw_peer
from tests.chunk.storage.raw_peer import CLUSTER, EXTENT, SECRET, authed_raw, replica_server
from tests.cluster import async_wait_for

pytestmark = pytest.mark.timeout(60)

VID = "vol-1"


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
async def served(tmp_path: Path):
    """(server, store, disk dir, checksum hook calls)."""
    bad: list[tuple[str, int, int]] = []
    async with replica_server(tmp_path, auth_timeout=1.0,
                              on_checksum_error=lambda v, i, b: bad.append((v, i, b))) as (server, store):
        yield server, store, tmp_path / "disk", bad


async def _authed(server: ReplicaServer) -> Pipeline:
    reader, writer = await raw_peer.raw(server)
    await asyncio.wait_for(
        peer_auth.client_handshake(reader, writer, SECRET, CLUSTER, "chunk-test"), 5)
    return Pipeline(reader, writer)


async def _call(pipe: Pipeline, frame: Frame) -> Frame:
    return await asyncio.wait_for(pipe.call(frame), 10)


async def _closed(reader: FrameReader) -> bool:
    """True when the server closed the connection (after any replies already sent)."""
    try:
        while (await asyncio.wait_for(reader.read(), 5)) is not None:
            pass
    except (ConnectionError, wire.FrameError):
        pass
    return True


def _write(off: int, data: bytes, seq: int = 1, epoch: int = 1, fua: bool = False) -> Frame:
    return Frame(Op.WRITE, 0, VID, 0, epoch, 1, off, len(data), data, seq=seq,
                 args={"fua": True} if fua else None)


def _read(off: int, length: int, epoch: int = 1, view: int = 0) -> Frame:
    return Frame(Op.READ, 0, VID, 0, epoch, 0, off, length, seq=view)


async def test_handshake_then_requests(served):
    server, store, disk, _ = served
    pipe = await _authed(server)
    try:
        assert (await _call(pipe, Frame(Op.PING, 0))).status is Status.OK
        rep = await _call(pipe, Frame(Op.CREATE, 0, VID, 0, 1, 1))
        assert rep.status is Status.OK and store.has(VID, 0)
        rep = await _call(pipe, _write(8192, b"x" * 5000, seq=1))
        assert rep.status is Status.OK and rep.seq == 1
        rep = await _call(pipe, _read(4096, 3 * BLOCK_SIZE))
        assert rep.status is Status.OK
        assert rep.data == bytes(4096) + b"x" * 5000 + bytes(3 * 4096 - 4096 - 5000)
        assert rep.args["present"] == bytes([0b110])            # LSB first: blocks 2,3 of 1..3
        stat = (await _call(pipe, Frame(Op.STAT, 0, VID, 0, 1))).args
        assert stat["generation"] == 1 and stat["epoch"] == 1 and stat["mutations"] >= 1
        assert (await _call(pipe, Frame(Op.SETGEN, 0, VID, 0, 1, 5))).status is Status.OK
        assert store.stat(VID, 0)["generation"] == 5
        digest = await _call(pipe, Frame(Op.DIGEST, 0, VID, 0, 0))
        assert digest.status is Status.OK and digest.data == store.digest(VID, 0)
        assert (await _call(pipe, Frame(Op.HELLO, 0))).status is Status.INVALID
        assert server.requests["WRITE"] == 1 and server.connections == 1
        assert server.counters()["errors.HELLO.INVALID"] == 1
    finally:
        await pipe.close()


async def test_wrong_secret_is_denied_and_touches_nothing(served):
    server, store, disk, _ = served
    before = _files(disk)
    reader, writer = await raw_peer.raw(server)
    await writer.send(Frame(Op.HELLO, 1, args={"cluster": CLUSTER, "chunk_id": "evil",
                                               "nonce": peer_auth.new_nonce()}))
    first = await asyncio.wait_for(reader.read(), 5)
    assert first.status is Status.OK
    # A forged proof, followed at once by a CREATE hoping to slip through.
    await writer.send(Frame(Op.HELLO, 2, args={"proof": peer_auth.client_proof(
        b"wrong" * 7, first.args["nonce"], b"\0" * 32)}))
    await writer.send(Frame(Op.CREATE, 3, VID, 0, 1, 1))
    denied = await asyncio.wait_for(reader.read(), 5)
    assert denied.status is Status.DENIED and denied.id == 2
    assert await _closed(reader)
    await writer.close()
    assert not store.has(VID, 0) and _files(disk) == before
    assert server.auth_failures == 1

    # a client holding a different secret gives up on the server's proof itself
    reader, writer = await raw_peer.raw(server)
    with pytest.raises(peer_auth.AuthError):
        await asyncio.wait_for(peer_auth.client_handshake(reader, writer, b"x" * 32, CLUSTER, "c"), 5)
    await writer.close()
    assert _files(disk) == before


@pytest.mark.parametrize("first", [
    Frame(Op.CREATE, 1, VID, 0, 1, 1),
    Frame(Op.WRITE, 1, VID, 0, 1, 1, 0, 4, b"abcd", seq=1),
    Frame(Op.PING, 1),
])
async def test_first_frame_must_be_hello(served, first: Frame):
    server, store, disk, _ = served
    before = _files(disk)
    reader, writer = await raw_peer.raw(server)
    await writer.send(first)
    assert await asyncio.wait_for(reader.read(), 5) is None        # closed without an answer
    await writer.close()
    assert _files(disk) == before and not store.has(VID, 0)


@pytest.mark.parametrize("junk", [
    b"GET / HTTP/1.1\r\n\r\n",                         # length prefix of ~1.2 GB: refused unread
    struct.pack(">I", 3) + b"\xc1\xc1\xc1",             # not msgpack
    struct.pack(">I", 4) + msgpack.packb([1, 2, 3]),   # not a frame
])
async def test_garbage_closes_the_connection(served, junk: bytes):
    server, store, disk, _ = served
    before = _files(disk)
    # before authentication
    reader, writer = await raw_peer.raw(server)
    writer._writer.write(junk)
    assert await _closed(reader)
    await writer.close()
    # after authentication: the server hangs up; the pipeline fails
    pipe = await _authed(server)
    pipe._writer._writer.write(junk)
    with pytest.raises(ConnectionError):
        await _call(pipe, Frame(Op.PING, 0))
    await pipe.close()
    assert _files(disk) == before and server.dropped == 1


async def test_a_reply_frame_from_the_client_closes_the_connection(served):
    server, *_ = served
    pipe = await _authed(server)
    pipe._writer.write(Frame(Op.PING, 1).reply())
    with pytest.raises(ConnectionError):
        await _call(pipe, Frame(Op.PING, 0))
    await pipe.close()


async def test_an_older_peer_is_told_the_wire_version_in_its_own_format(served):
    """A version-1 (msgpack) HELLO gets a version-1 DENIED naming both versions, then EOF."""
    server, store, disk, _ = served
    before = _files(disk)
    r, w = await asyncio.open_connection("127.0.0.1", server.port)
    hello = msgpack.packb([int(Op.HELLO), 1, "", 0, 0, 0, 0, 0, None, None, 0,
                           {"cluster": CLUSTER, "chunk_id": "old", "nonce": b"n" * 32}])
    w.write(struct.pack(">I", len(hello)) + hello)
    (n,) = struct.unpack(">I", await asyncio.wait_for(r.readexactly(4), 5))
    answer = msgpack.unpackb(await r.readexactly(n))
    assert answer[:2] == [int(Op.HELLO), 1] and answer[9] == Status.DENIED
    assert "version 1" in answer[11]["error"] and f"version {wire.VERSION}" in answer[11]["error"]
    assert await asyncio.wait_for(r.read(), 5) == b""                 # then closed
    w.close()
    assert server.auth_failures == 1 and _files(disk) == before


async def test_silent_client_is_cut_off_by_the_auth_timeout(served):
    server, *_ = served
    reader, writer = await raw_peer.raw(server)
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await asyncio.wait_for(reader.read(), 5) is None
    assert 0.9 <= loop.time() - start < 4
    await writer.close()


async def test_many_pipelined_writes_and_reads_on_one_connection(served):
    server, store, _, _ = served
    store.create(VID, 0, 1)
    pipe = await _authed(server)
    try:
        n = 300
        blocks = {i: os.urandom(BLOCK_SIZE) for i in range(n)}
        writes = [asyncio.ensure_future(_call(pipe, _write(i * BLOCK_SIZE, blocks[i], seq=1,
                                                              fua=(i % 17 == 0))))
                  for i in range(n)]
        assert all(r.status is Status.OK for r in await asyncio.gather(*writes))
        reads = [asyncio.ensure_future(_call(pipe, _read(i * BLOCK_SIZE, BLOCK_SIZE)))
                 for i in range(n)]
        got = await asyncio.gather(*reads)
        assert [r.data for r in got] == [blocks[i] for i in range(n)]
        assert all(r.args["present"] == b"\x01" for r in got)
        assert server.connections == 1 and server.requests["READ"] == n
        assert pipe.outstanding == 0
    finally:
        await pipe.close()


async def test_large_pipelined_reads_apply_back_pressure(served):
    """48 MiB of replies in flight on one connection: the reply queue drains, nothing is lost."""
    server, store, _, _ = served
    store.create(VID, 0, 1)
    payload = os.urandom(wire.MAX_DATA)
    store.write(VID, 0, 0, payload, 1)
    pipe = await _authed(server)
    try:
        got = await asyncio.gather(*(_call(pipe, _read(0, wire.MAX_DATA, epoch=0))
                                     for _ in range(48)))
        assert all(r.status is Status.OK and r.data == payload for r in got)
    finally:
        await pipe.close()


async def test_replies_overtake_a_slow_flush(served):
    """FLUSH syncs in a thread; a PING sent after it in the same segment is answered first."""
    server, store, _, _ = served
    store.create(VID, 0, 1)
    reader, writer = await raw_peer.raw(server)
    await peer_auth.client_handshake(reader, writer, SECRET, CLUSTER, "c")
    burst = (wire.encode(Frame(Op.FLUSH, 10, VID, 0, 1))
             + wire.encode(Frame(Op.PING, 11))
             + wire.encode(Frame(Op.WRITE, 12, VID, 0, 1, 1, 0, 4096, b"a" * 4096, seq=1)))
    writer._writer.write(burst)
    replies = [await asyncio.wait_for(reader.read(), 5) for _ in range(3)]
    assert [r.id for r in replies][-1] == 10          # the flush reply comes last
    assert all(r.status is Status.OK for r in replies)
    await writer.close()


async def test_epochs_fence_and_epoch_zero_is_read_only(served):
    server, store, disk, _ = served
    store.create(VID, 0, 1)
    pipe = await _authed(server)
    try:
        assert (await _call(pipe, _write(0, b"new" * 100, epoch=5))).status is Status.OK
        stale = await _call(pipe, _write(0, b"old" * 100, epoch=3))
        assert stale.status is Status.STALE_EPOCH and stale.args == {"highest": 5}
        assert store.read(VID, 0, 0, 3)[0] == b"new"
        denied = await _call(pipe, _write(0, b"ro", epoch=0))
        assert denied.status is Status.DENIED
        for op in (Op.FLUSH, Op.SETGEN, Op.CREATE):
            assert (await _call(pipe, Frame(op, 0, VID, 0, 0, 2))).status is Status.DENIED
        unmap = Frame(Op.UNMAP, 0, VID, 0, 0, 0, 0, 4096, seq=2)
        assert (await _call(pipe, unmap)).status is Status.DENIED
        ro = await _call(pipe, _read(0, 3, epoch=0))
        assert ro.status is Status.OK and ro.data == b"new"
        assert (await _call(pipe, Frame(Op.STAT, 0, VID, 0, 0))).args["epoch"] == 5
        assert store.read(VID, 0, 0, 3)[0] == b"new"
        assert server.errors[("WRITE", "DENIED")] == 1
        assert server.errors[("WRITE", "STALE_EPOCH")] == 1
    finally:
        await pipe.close()


async def test_invalid_requests_get_invalid_with_a_message(served):
    server, store, _, _ = served
    store.create(VID, 0, 1)
    pipe = await _authed(server)
    try:
        cases = [
            _write(EXTENT - 2, b"abcd"),                               # past the extent end
            _read(EXTENT, 4096),
            _read(0, wire.MAX_DATA + 4096),                            # reply would not fit
            Frame(Op.WRITE, 0, VID, 0, 1, 1, 0, 4, b"abcd", seq=0),    # seq 0
            Frame(Op.WRITE, 0, VID, 0, 1, 1, 0, 0, None, seq=1),       # no data
            Frame(Op.WRITE, 0, VID, 0, 1, 1, 0, 4, b"abcd", seq=1, args={"fua": "yes"}),
            Frame(Op.REVERT, 0, VID, 0, 1, 1, seq=2),                  # no args.to
            Frame(Op.EXPORT, 0, VID, 0, 0, 0, 100, 4096),              # unaligned
            Frame(Op.IMPORT, 0, VID, 0, 1, 1, 0, 3, b"bad", args={}),  # not a blob
            Frame(Op.READ, 0, "", 0, 1, 0, 0, 4096),                   # no volume
            Frame(Op.SETGEN, 0, VID, 0, 1, 0),                         # generation 0
        ]
        for frame in cases:
            rep = await _call(pipe, frame)
            assert rep.status is Status.INVALID, frame
            assert isinstance(rep.args["error"], str) and rep.args["error"], frame
        # the connection is still fine
        assert (await _call(pipe, Frame(Op.PING, 0))).status is Status.OK
        missing = await _call(pipe, Frame(Op.READ, 0, "other", 0, 1, 0, 0, 4096))
        assert missing.status is Status.NO_EXTENT
    finally:
        await pipe.close()


async def test_checksum_error_is_reported_and_hooked(served):
    server, store, disk, bad = served
    store.create(VID, 0, 1)
    store.write(VID, 0, 0, b"z" * (3 * BLOCK_SIZE), 1)
    store.flush(VID, 0)
    data_file = next(disk.glob(f"{VID}.0.data"))
    with open(data_file, "r+b") as f:                       # rot one bit of block 1
        f.seek(BLOCK_SIZE + 7)
        f.write(b"Y")
    store.close()                                           # drop the page cache's clean copy
    server.store = store = ReplicaStore([(disk, None)], extent_size=EXTENT, cow_sync=False)
    pipe = await _authed(server)
    try:
        rep = await _call(pipe, _read(0, 3 * BLOCK_SIZE, epoch=0))
        assert rep.status is Status.CHECKSUM and rep.args == {"block": 1}
        assert bad == [(VID, 0, 1)]
        ok = await _call(pipe, _read(2 * BLOCK_SIZE, BLOCK_SIZE, epoch=0))
        assert ok.status is Status.OK and ok.data == b"z" * BLOCK_SIZE
    finally:
        await pipe.close()
        store.close()


async def test_export_import_revert_unmap(served, tmp_path: Path):
    server, store, _, _ = served
    store.create(VID, 0, 1)
    pipe = await _authed(server)
    try:
        await _call(pipe, _write(0, b"1" * 8192, seq=1))
        await _call(pipe, _write(0, b"2" * 4096, seq=2))             # COW keeps seq-1 block 0
        rev = await _call(pipe, Frame(Op.REVERT, 0, VID, 0, 1, 1, seq=3, args={"to": 1}))
        assert rev.status is Status.OK
        assert store.read(VID, 0, 0, 8192)[0] == b"1" * 8192
        um = await _call(pipe, Frame(Op.UNMAP, 0, VID, 0, 1, 1, 4096, 4096, seq=3))
        assert um.status is Status.OK and store.read(VID, 0, 4096, 4096)[1] == b"\x00"
        ex = await _call(pipe, Frame(Op.EXPORT, 0, VID, 0, 0, 0, 0, 1 << 20))
        assert ex.status is Status.OK and ex.args == {"next": None}
        store.create("vol-2", 0, 1)
        imp = await _call(pipe, Frame(Op.IMPORT, 0, "vol-2", 0, 1, 1, 0, len(ex.data), ex.data,
                                      args={"if_unchanged": None}))
        assert imp.status is Status.OK
        assert store.read("vol-2", 0, 0, 8192) == store.read(VID, 0, 0, 8192)
        conflict = await _call(pipe, Frame(Op.IMPORT, 0, "vol-2", 0, 1, 1, 0, len(ex.data),
                                           ex.data, args={"if_unchanged": 12345}))
        assert conflict.status is Status.CONFLICT
    finally:
        await pipe.close()


# -- the WRITE fast path (plain writes: data, a volume, no args) ------------------------------

async def test_fast_and_general_write_replies_are_byte_identical(served):
    """A plain WRITE (fast path) and a FUA one (general path, synced in a thread) are answered
    with exactly the bytes ``encode(frame.reply())`` gives, in one segment."""
    server, store, _, _ = served
    store.create("vol-ü", 2, 1)
    reader, writer = await authed_raw(server)
    plain = Frame(Op.WRITE, 2**40, "vol-ü", 2, 3, 9, 4096, BLOCK_SIZE, b"p" * BLOCK_SIZE, seq=7)
    zero_length = Frame(Op.WRITE, 41, "vol-ü", 2, 3, 0, 8192, 0, b"q" * 100, seq=7)
    fua = Frame(Op.WRITE, 42, "vol-ü", 2, 3, 9, 0, BLOCK_SIZE, b"f" * BLOCK_SIZE, seq=7,
                args={"fua": True})
    writer.write_bytes(wire.encode(plain) + wire.encode(zero_length) + wire.encode(fua))
    expected = [wire.encode(f.reply()) for f in (plain, zero_length, fua)]
    got = await asyncio.wait_for(reader._reader.readexactly(sum(map(len, expected))), 5)
    assert got == b"".join(expected)
    assert store.read("vol-ü", 2, 0, 2 * BLOCK_SIZE)[0] == b"f" * BLOCK_SIZE + b"p" * BLOCK_SIZE
    assert store.read("vol-ü", 2, 8192, 100)[0] == b"q" * 100
    assert server.requests["WRITE"] == 3 and not server.errors
    await writer.close()


async def test_fast_path_writes_keep_every_error_reply_and_counter(served):
    server, store, _, _ = served
    store.create(VID, 0, 1)
    pipe = await _authed(server)
    try:
        block = b"b" * BLOCK_SIZE
        assert (await _call(pipe, _write(0, block, epoch=5))).status is Status.OK
        cases = [
            (_write(0, b"o" * BLOCK_SIZE, epoch=4), Status.STALE_EPOCH, {"highest": 5}),
            (_write(0, b"r" * BLOCK_SIZE, epoch=0), Status.DENIED, None),
            (Frame(Op.WRITE, 0, "nope", 0, 5, 1, 0, 4, b"abcd", seq=1), Status.NO_EXTENT, None),
            (_write(EXTENT, block, epoch=5), Status.INVALID, None),
            (_write(4096, block, seq=2**32, epoch=5), Status.INVALID, None),
            (Frame(Op.WRITE, 0, VID, 0, 5, 1, 0, 5, b"abcd", seq=1), Status.INVALID, None),
        ]
        for frame, status, args in cases:
            rep = await _call(pipe, frame)
            assert rep.status is status, frame
            assert (rep.volume, rep.offset, rep.seq) == (frame.volume, frame.offset, frame.seq)
            if args is not None:
                assert rep.args == args
            else:
                assert isinstance(rep.args["error"], str) and rep.args["error"]
        assert store.read(VID, 0, 0, BLOCK_SIZE)[0] == block
        assert store.stat(VID, 0)["mutations"] == 1
        assert server.requests["WRITE"] == 1 + len(cases)
        assert dict(server.errors) == {("WRITE", "STALE_EPOCH"): 1, ("WRITE", "DENIED"): 1,
                                       ("WRITE", "NO_EXTENT"): 1, ("WRITE", "INVALID"): 3}
    finally:
        await pipe.close()


async def test_a_plain_write_with_a_volume_that_is_not_utf8_closes_the_connection(served):
    server, store, disk, _ = served
    store.create(VID, 0, 1)
    before = _files(disk)
    reader, writer = await authed_raw(server)
    ok = wire.encode(_write(0, b"k" * BLOCK_SIZE))
    head = struct.pack(">BBBBQQQQQQQHI", wire.VERSION, Op.WRITE, 0xFF, 1, 9, 0, 1, 1, 0, 4, 1,
                       2, 0)
    bad = head + b"\xff\xfe" + b"abcd"
    writer.write_bytes(ok + struct.pack(">I", len(bad)) + bad + ok)
    first = await asyncio.wait_for(reader.read(), 5)
    assert first.status is Status.OK                                # the frame before it is served
    assert await _closed(reader)
    await writer.close()
    assert server.dropped == 1 and server.requests["WRITE"] == 1
    assert _files(disk) == before


async def test_requests_pipelined_behind_the_hello_are_served(served):
    """Frames that arrive with the HELLO proof were read ahead by the handshake."""
    server, store, _, _ = served
    store.create(VID, 0, 1)
    reader, writer = await raw_peer.raw(server)
    nonce_c = peer_auth.new_nonce()
    await writer.send(Frame(Op.HELLO, 1, args={"cluster": CLUSTER, "chunk_id": "c",
                                               "nonce": nonce_c}))
    first = await asyncio.wait_for(reader.read(), 5)
    proof = peer_auth.client_proof(SECRET, first.args["nonce"], nonce_c)
    writer.write_bytes(wire.encode(Frame(Op.HELLO, 2, args={"proof": proof}))
                       + wire.encode(Frame(Op.WRITE, 3, VID, 0, 1, 1, 0, 4, b"abcd", seq=1))
                       + wire.encode(Frame(Op.PING, 4)))
    replies = [await asyncio.wait_for(reader.read(), 5) for _ in range(3)]
    assert [(r.id, r.status) for r in replies] == [(2, Status.OK), (3, Status.OK), (4, Status.OK)]
    assert store.read(VID, 0, 0, 4)[0] == b"abcd"
    await writer.close()


# -- the connection after the handshake: frames straight from the socket ----------------------

@pytest.fixture
async def narrow(tmp_path: Path):
    """A server with room for only two syncs in flight per connection."""
    store = ReplicaStore([(tmp_path / "disk", None)], extent_size=EXTENT, cow_sync=False)
    store.create(VID, 0, 1)
    server = ReplicaServer(store, SECRET, CLUSTER, "127.0.0.1", 0, max_inflight=2)
    await server.start()
    yield server, store
    await server.stop()
    store.close()


async def test_max_inflight_syncs_pause_the_connection_then_it_goes_on(narrow):
    """FUA writes between plain ones, in one segment, with room for two syncs: the reader
    waits for syncs and resumes where it stopped; every write lands in order."""
    server, store = narrow
    reader, writer = await authed_raw(server)
    frames, last = [], {}
    for i in range(60):
        block = i % 7
        data = bytes([i]) * BLOCK_SIZE
        frames.append(Frame(Op.WRITE, i + 1, VID, 0, 1, 1, block * BLOCK_SIZE, BLOCK_SIZE, data,
                            seq=1, args={"fua": True} if i % 3 == 0 else None))
        last[block] = data
    writer.write_bytes(b"".join(wire.encode(f) for f in frames))
    replies = [await asyncio.wait_for(reader.read(), 10) for _ in frames]
    assert sorted(r.id for r in replies) == list(range(1, 61))
    assert all(r.status is Status.OK for r in replies)
    for block, data in last.items():
        assert store.read(VID, 0, block * BLOCK_SIZE, BLOCK_SIZE)[0] == data
    assert server.requests["WRITE"] == 60
    await writer.close()


async def test_frames_cut_anywhere_by_the_socket_are_served(served):
    """Requests trickle in at odd sizes (byte by byte at first), and a 1 MiB write spans many
    segments: every frame is put together and answered once."""
    server, store, _, _ = served
    store.create(VID, 0, 1)
    reader, writer = await authed_raw(server)
    big = os.urandom(wire.MAX_DATA)
    frames = [Frame(Op.WRITE, 1, VID, 0, 1, 1, 0, BLOCK_SIZE, b"a" * BLOCK_SIZE, seq=1),
              Frame(Op.PING, 2),
              Frame(Op.WRITE, 3, VID, 0, 1, 1, BLOCK_SIZE, len(big), big, seq=1),
              Frame(Op.WRITE, 4, VID, 0, 1, 1, 100, 3, b"xyz", seq=1)]
    stream = b"".join(wire.encode(f) for f in frames)
    sock = writer._writer
    for i in range(200):
        sock.write(stream[i:i + 1])
        await sock.drain()
        await asyncio.sleep(0)
    for i in range(200, len(stream), 7001):
        sock.write(stream[i:i + 7001])
        await sock.drain()
    replies = [await asyncio.wait_for(reader.read(), 10) for _ in frames]
    assert [r.id for r in replies] == [1, 2, 3, 4] and all(r.status is Status.OK for r in replies)
    assert store.read(VID, 0, BLOCK_SIZE, len(big))[0] == big
    assert store.read(VID, 0, 0, 200)[0] == b"a" * 100 + b"xyz" + b"a" * 97
    await writer.close()


async def test_a_clean_end_of_stream_answers_pending_syncs_first(served):
    server, store, _, _ = served
    store.create(VID, 0, 1)
    reader, writer = await authed_raw(server)
    writer.write_bytes(wire.encode(Frame(Op.WRITE, 1, VID, 0, 1, 1, 0, 4, b"abcd", seq=1))
                       + wire.encode(Frame(Op.FLUSH, 2, VID, 0, 1)))
    writer._writer.write_eof()
    replies = [await asyncio.wait_for(reader.read(), 5) for _ in range(2)]
    assert {(r.id, r.status) for r in replies} == {(1, Status.OK), (2, Status.OK)}
    assert await asyncio.wait_for(reader.read(), 5) is None        # then closed
    await writer.close()
    assert server.dropped == 0


async def test_a_stream_ending_inside_a_frame_is_dropped_after_the_complete_ones(served):
    server, store, _, _ = served
    store.create(VID, 0, 1)
    reader, writer = await authed_raw(server)
    cut = wire.encode(Frame(Op.WRITE, 2, VID, 0, 1, 1, 0, 4, b"efgh", seq=1))[:-2]
    writer.write_bytes(wire.encode(Frame(Op.WRITE, 1, VID, 0, 1, 1, 0, 4, b"abcd", seq=1)) + cut)
    writer._writer.write_eof()
    assert (await asyncio.wait_for(reader.read(), 5)).id == 1
    assert await _closed(reader)
    await writer.close()
    assert server.dropped == 1 and store.read(VID, 0, 0, 4)[0] == b"abcd"


async def test_a_peer_that_vanishes_mid_stream_is_cleaned_up(served):
    server, store, _, _ = served
    store.create(VID, 0, 1)
    reader, writer = await authed_raw(server)
    # half a frame, then a reset
    writer.write_bytes(wire.encode(Frame(Op.WRITE, 1, VID, 0, 1, 1, 0, BLOCK_SIZE,
                                         b"r" * BLOCK_SIZE, seq=1))[:1000])
    await writer.drain()
    sock = writer._writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))   # RST
    writer.abort()
    for _ in range(100):
        if server.connections == 0:
            break
        await asyncio.sleep(0.02)
    assert server.connections == 0 and server.dropped == 0
    pipe = await _authed(server)                                   # the server serves on
    try:
        assert (await _call(pipe, Frame(Op.PING, 0))).status is Status.OK
    finally:
        await pipe.close()


async def test_a_fenced_create_changes_nothing_on_disk(served):
    """CREATE made the extent and only then checked the epoch: a fenced owner left an orphan
    extent (or, with discard_broken, deleted a copy that failed to open) before STALE_EPOCH."""
    from chunk.storage.replicas import STALE_EPOCH, LocalReplica, ReplicaFailed
    server, store, disk, _ = served
    store.create(VID, 0, 1)
    pipe = await _authed(server)
    try:
        assert (await _call(pipe, _write(0, b"new", epoch=5))).status is Status.OK
        for discard in (False, True):
            rep = await _call(pipe, Frame(Op.CREATE, 0, VID, 1, 4, 1, args={"discard_broken": discard}))
            assert rep.status is Status.STALE_EPOCH and not store.has(VID, 1)
        with pytest.raises(ReplicaFailed) as e:
            await LocalReplica("c0", store).create(VID, 2, 4, 1)
        assert e.value.kind == STALE_EPOCH
        assert not store.has(VID, 2)
        assert (await _call(pipe, Frame(Op.CREATE, 0, VID, 1, 5, 1))).status is Status.OK
        assert store.has(VID, 1) and store.stat(VID, 1)["epoch"] == 5
    finally:
        await pipe.close()


def test_args_decoding_is_bounded():
    """msgpack's default limits scale with the input: a 1 MiB args blob of empty maps became
    ~76 MB of objects. Args are a few small fields; anything else is a malformed frame."""
    bomb = b"\xdd" + struct.pack(">I", 1 << 20) + b"\x80" * (1 << 20)      # array32 of maps
    for raw in (msgpack.packb({"x": 1})[:1] + b"\xa1x" + bomb,             # {"x": [{}, ...]}
                msgpack.packb({"x": [0] * 300}), msgpack.packb({"x": "y" * (70 << 10)})):
        with pytest.raises(wire.MalformedFrame):
            wire._args(raw)
    assert wire._args(msgpack.packb({"present": b"\x01" * 32, "error": "e" * 500})) == {
        "present": b"\x01" * 32, "error": "e" * 500}


async def test_a_big_frame_before_authentication_closes_the_connection(served):
    """Before the secret is proved a frame is at most a few KiB: a stranger's 1 MiB HELLO is
    refused unread, not decoded."""
    server, store, disk, _ = served
    reader, writer = await raw_peer.raw(server)
    await writer.send(Frame(Op.HELLO, 1, args={"cluster": CLUSTER, "chunk_id": "x",
                                               "nonce": b"n" * 32, "pad": b"p" * (60 << 10)}))
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await asyncio.wait_for(reader.read(), 5) is None              # no answer: closed
    assert loop.time() - start < 0.5                                     # not the auth timeout
    await writer.close()
    assert server.auth_failures == 1
    pipe = await _authed(server)                        # a peer is unaffected
    assert (await _call(pipe, Frame(Op.PING, 0))).status is Status.OK
    await pipe.close()


async def test_handshakes_running_at_once_are_bounded(served, monkeypatch):
    """Connections that never authenticate each hold a handshake (and its buffer) until the
    auth timeout; past the limit the oldest is aborted at once to make room for the new one
    (refusing the new one let idle sockets lock every peer out)."""
    from chunk.storage import replica_server
    monkeypatch.setattr(replica_server, "MAX_UNAUTHENTICATED", 3)
    server, *_ = served
    idle = [await raw_peer.raw(server) for _ in range(3)]
    await async_wait_for(lambda: server._authenticating == 3, 5, "3 handshakes running")
    reader, writer = await raw_peer.raw(server)
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await _closed(idle[0][0]) and loop.time() - start < 0.5   # not the 1 s auth timeout
    assert server._authenticating == 3                                 # the newcomer took its place
    await writer.close()
    for _, w in idle:
        await w.close()


# -- syncs in worker threads: FLUSH's failure, SETGEN ------------------------------------------

async def test_a_failed_flush_closes_the_replica_on_the_loop_not_in_its_worker(served, monkeypatch):
    """FLUSH syncs in a worker thread and the sync fails (EIO): the replica is retired for good,
    which closes its fds. Closed in the worker, under a write the loop is doing, a number can
    be reused by another open() at once and the write land in another file. The worker only
    reports: the fds are closed on the loop; a write while the sync runs lands on open fds,
    and one after the failure gets a clean IO_ERROR."""
    server, store, _, _ = served
    store.create(VID, 0, 1)
    fds = replica_fds(store, VID, 0)
    loop_thread = threading.get_ident()
    closed = closes_of(monkeypatch, fds)
    reached, proceed, _ = hold_syncs(monkeypatch, fds, fail=True)
    pipe = await _authed(server)
    try:
        flush = asyncio.ensure_future(_call(pipe, Frame(Op.FLUSH, 0, VID, 0, 1)))
        assert await asyncio.to_thread(reached.wait, 10)
        block = b"a" * BLOCK_SIZE
        assert (await _call(pipe, _write(0, block))).status is Status.OK
        assert store.read(VID, 0, 0, BLOCK_SIZE)[0] == block
        proceed.set()
        assert (await flush).status is Status.IO_ERROR
        assert set(closed) == fds, "the failed replica's fds were not closed"
        assert set(closed.values()) == {loop_thread}, "a fd was closed in the flush's worker"
        after = await _call(pipe, _write(BLOCK_SIZE, b"b" * BLOCK_SIZE))
        assert after.status is Status.IO_ERROR and "a flush failed" in after.args["error"]
        assert not store.has(VID, 0) and (VID, 0) in store.broken
    finally:
        proceed.set()
        await pipe.close()


async def test_setgen_below_the_generation_is_refused_and_callers_see_why(served, monkeypatch):
    """A replica whose generation went backwards would look in sync with an older replica
    set: SETGEN refuses to lower it (STALE_GENERATION, with its generation), flushing
    nothing; equal (a retry) and higher pass. The callers' replicas map it to their own kind."""
    from chunk.storage import replicas as rk
    from chunk.storage.replica_client import ReplicaClient
    server, store, _, _ = served
    store.create(VID, 0, 1)
    pipe = await _authed(server)
    client = ReplicaClient(SECRET, CLUSTER, "c-test")
    try:
        assert (await _call(pipe, Frame(Op.SETGEN, 0, VID, 0, 1, 5))).status is Status.OK
        _, _, syncs = hold_syncs(monkeypatch, replica_fds(store, VID, 0), times=0)
        low = await _call(pipe, Frame(Op.SETGEN, 0, VID, 0, 1, 3))
        assert low.status is Status.STALE_GENERATION and low.args["generation"] == 5
        assert "generation 3 is below its generation 5" in low.args["error"]
        assert syncs == [] and store.stat(VID, 0)["generation"] == 5
        assert server.errors[("SETGEN", "STALE_GENERATION")] == 1
        for replica in (rk.LocalReplica("c0", store),
                        rk.RemoteReplica("c0", ("127.0.0.1", server.port), client)):
            with pytest.raises(rk.ReplicaFailed) as e:
                await replica.setgen(VID, 0, 1, 4)
            assert e.value.kind == rk.STALE_GENERATION and "below" in str(e.value)
        assert store.stat(VID, 0)["generation"] == 5
        assert (await _call(pipe, Frame(Op.SETGEN, 0, VID, 0, 1, 5))).status is Status.OK
        await rk.LocalReplica("c0", store).setgen(VID, 0, 1, 6)
        assert store.stat(VID, 0)["generation"] == 6
    finally:
        await client.close()
        await pipe.close()


async def test_setgen_flushes_in_a_worker_and_shows_the_generation_only_after(served, monkeypatch):
    """SETGEN's flush (fdatasync of the whole extent) runs in a worker thread like FLUSH's:
    the loop serves the connection meanwhile. The generation is recorded after the flush
    (STAT shows the old one until then), and checked again then: a higher SETGEN that
    finished meanwhile is not undone."""
    server, store, _, _ = served
    store.create(VID, 0, 1)
    store.write(VID, 0, 0, b"d" * BLOCK_SIZE, 1)
    reached, proceed, threads = hold_syncs(monkeypatch, replica_fds(store, VID, 0))
    loop_thread = threading.get_ident()
    pipe = await _authed(server)
    try:
        setgen = asyncio.ensure_future(_call(pipe, Frame(Op.SETGEN, 0, VID, 0, 1, 7)))
        assert await asyncio.to_thread(reached.wait, 10)
        assert loop_thread not in threads, "SETGEN's flush ran on the event loop"
        assert (await _call(pipe, Frame(Op.PING, 0))).status is Status.OK
        read = await _call(pipe, _read(0, BLOCK_SIZE))
        assert read.status is Status.OK and read.data == b"d" * BLOCK_SIZE
        stat = await _call(pipe, Frame(Op.STAT, 0, VID, 0, 1))
        assert stat.args["generation"] == 1 and not setgen.done()
        # A second SETGEN (its flush not held) finishes first...
        assert (await _call(pipe, Frame(Op.SETGEN, 0, VID, 0, 1, 9))).status is Status.OK
        assert store.stat(VID, 0)["generation"] == 9
        proceed.set()
        # ...and the first, its flush done, does not take the generation back.
        assert (await setgen).status is Status.STALE_GENERATION
        assert store.stat(VID, 0)["generation"] == 9
        assert loop_thread not in threads
    finally:
        proceed.set()
        await pipe.close()


async def test_a_bad_import_into_a_missing_extent_leaves_no_extent(served):
    """IMPORT creates a missing extent; a blob that does not apply (here its range is past the
    extent's end) must not leave it behind, empty, to pass for a real copy."""
    server, store, disk, _ = served
    before = _files(disk)
    blob = msgpack.packb({"format": 1, "offset": 0, "end": 2 * EXTENT, "live": [], "versions": []})
    pipe = await _authed(server)
    try:
        rep = await _call(pipe, Frame(Op.IMPORT, 0, "vol-new", 0, 1, 1, 0, len(blob), blob,
                                      args={"if_unchanged": None}))
        assert rep.status is Status.INVALID and "outside the extent" in rep.args["error"]
        assert not store.has("vol-new", 0) and _files(disk) == before
        assert (await _call(pipe, Frame(Op.READ, 0, "vol-new", 0, 0, 0, 0, BLOCK_SIZE))).status \
            is Status.NO_EXTENT
    finally:
        await pipe.close()


async def test_revert_is_answered_only_once_synced_remote_and_local(served, monkeypatch):
    """REVERT rewrites blocks like a write, and the coordinator counts no reverted extent as
    unflushed, so no later SYNCHRONIZE CACHE syncs it: answered at once, a host crash in the
    writeback window lost the revert while writes flushed after it survived. The replica
    server answers REVERT, and the local replica returns from ``revert``, only after the
    extent's sync (in a worker thread, like FLUSH's)."""
    from chunk.storage import replicas as rk
    server, store, _, _ = served
    store.create(VID, 0, 1)
    store.write(VID, 0, 0, b"1" * BLOCK_SIZE, seq=1)
    loop_thread = threading.get_ident()
    pipe = await _authed(server)
    try:
        for seq, revert in (       # a write at seq, then a revert to 1 at seq + 1
                (2, lambda: _call(pipe, Frame(Op.REVERT, 0, VID, 0, 1, 1, seq=3, args={"to": 1}))),
                (4, lambda: rk.LocalReplica("c0", store).revert(VID, 0, 1, 1, 5))):
            store.write(VID, 0, 0, b"2" * BLOCK_SIZE, seq=seq)     # COW keeps the seq-1 block
            reached, proceed, threads = hold_syncs(monkeypatch, replica_fds(store, VID, 0))
            done = asyncio.ensure_future(revert())
            try:
                assert await asyncio.to_thread(reached.wait, 5), "REVERT was answered with no sync"
                await asyncio.sleep(0.05)
                assert not done.done(), "REVERT was answered before its sync finished"
                assert store.read(VID, 0, 0, BLOCK_SIZE)[0] == b"1" * BLOCK_SIZE   # applied already
            finally:
                proceed.set()
            result = await asyncio.wait_for(done, 10)
            assert result is None or result.status is Status.OK
            assert threads and loop_thread not in threads, "REVERT's sync ran on the event loop"
            monkeypatch.undo()
    finally:
        await pipe.close()


async def test_write_replies_leave_every_flush_every_frames(served, monkeypatch):
    """Twenty plain WRITEs in one segment: their OKs go out FLUSH_EVERY at a time as they
    are written, not all once the segment is done (the coordinator completes the first
    ones while this server writes the rest)."""
    from chunk.storage import replica_server as rs
    server, store, _, _ = served
    store.create(VID, 0, 1)
    sizes: list[int] = []
    real = rs._Conn.flush

    def counting(conn):
        if conn.queue:
            sizes.append(len(conn.queue))
        real(conn)
    monkeypatch.setattr(rs._Conn, "flush", counting)
    reader, writer = await authed_raw(server)
    sizes.clear()                                   # the handshake's own reply
    writer.write_bytes(b"".join(wire.encode(Frame(Op.WRITE, k + 1, VID, 0, 1, 1, k * BLOCK_SIZE,
                                                  BLOCK_SIZE, bytes([k]) * BLOCK_SIZE, seq=1))
                                for k in range(20)))
    for _ in range(20):
        reply = await asyncio.wait_for(reader.read(), 5)
        assert reply.status == Status.OK
    assert sum(sizes) == 20 and max(sizes) <= wire.FLUSH_EVERY, sizes
    await writer.close()
