"""ReplicaClient against real ReplicaServers (loopback sockets, ReplicaStore in tmp_path)."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

import pytest

from chunk.storage import peer_auth, wire
from chunk.storage.extent_file import BLOCK_SIZE
from chunk.storage.replica_client import (
    ChecksumFailed, Conflict, Denied, InvalidRequest, NoExtentError, PeerUnavailable,
    ReplicaClient, ReplicaError, StaleEpoch,
)
from chunk.storage.replica_server import ReplicaServer
from chunk.storage.replica_store import ReplicaStore
from chunk.storage.wire import Frame, FrameReader, FrameWriter, Op, Status

pytestmark = pytest.mark.timeout(60)

SECRET = b"k" * 32
CLUSTER = "cluster-1"
EXTENT = 4 << 20
VID = "vol-1"


class Node:
    """One chunk server's replica side: a store and its server."""

    def __init__(self, path: Path, port: int = 0) -> None:
        self.path, self.port = path, port
        self.store: ReplicaStore | None = None
        self.server: ReplicaServer | None = None

    async def start(self) -> Node:
        self.store = ReplicaStore([(self.path, None)], extent_size=EXTENT, cow_sync=False)
        self.server = ReplicaServer(self.store, SECRET, CLUSTER, "127.0.0.1", self.port)
        await self.server.start()
        self.port = self.server.port
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None
        if self.store is not None:
            self.store.close()
            self.store = None

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


@pytest.fixture
async def nodes(tmp_path: Path):
    started = [await Node(tmp_path / f"n{i}").start() for i in range(2)]
    yield started
    for n in started:
        await n.stop()


@pytest.fixture
async def client():
    c = ReplicaClient(SECRET, CLUSTER, "chunk-test", timeout=2.0, redial_interval=0.1)
    yield c
    await c.close()


async def test_every_op_round_trips(nodes, client):
    a, b = nodes
    await client.create(a.addr, VID, 0, generation=1, epoch=1)
    await client.create(a.addr, VID, 0, generation=1, epoch=1)       # idempotent
    await client.write(a.addr, VID, 0, 0, b"A" * 8192, epoch=1, seq=1)
    await client.write(a.addr, VID, 0, 0, b"B" * 4096, epoch=1, seq=2, fua=True)
    data, present = await client.read(a.addr, VID, 0, 0, 3 * BLOCK_SIZE, epoch=1)
    assert data == b"B" * 4096 + b"A" * 4096 + bytes(4096) and present == bytes([0b011])
    old, _ = await client.read(a.addr, VID, 0, 0, 4096, epoch=0, view=1)     # snapshot view
    assert old == b"A" * 4096
    await client.unmap(a.addr, VID, 0, 4096, 4096, epoch=1, seq=2)
    assert (await client.read(a.addr, VID, 0, 4096, 4096, epoch=1))[1] == b"\x00"
    await client.flush(a.addr, VID, 0, epoch=1)
    await client.revert(a.addr, VID, 0, epoch=1, to_seq=1, seq=3)
    assert (await client.read(a.addr, VID, 0, 0, 8192, epoch=1))[0] == b"A" * 8192
    await client.setgen(a.addr, VID, 0, generation=4, epoch=1)
    st = await client.stat(a.addr, VID, 0)
    assert st["generation"] == 4 and st["epoch"] == 1

    # resync a to b: EXPORT -> IMPORT, then the digests agree
    await client.create(b.addr, VID, 0, generation=4, epoch=1)
    off = 0
    while off is not None:
        blob, off_next = await client.export(a.addr, VID, 0, off, EXTENT - off)
        assert await client.import_(b.addr, VID, 0, blob, epoch=1)
        off = off_next
    assert await client.digest(a.addr, VID, 0) == await client.digest(b.addr, VID, 0)
    token = (await client.stat(b.addr, VID, 0))["mutations"]
    assert not await client.import_(b.addr, VID, 0, blob, epoch=1, if_unchanged=token + 1)
    assert await client.import_(b.addr, VID, 0, blob, epoch=1, if_unchanged=token)
    assert await client.ping(a.addr) < 2.0


async def test_statuses_become_typed_errors(nodes, client):
    a, _ = nodes
    await client.create(a.addr, VID, 0, generation=1, epoch=7)
    with pytest.raises(StaleEpoch) as e:
        await client.write(a.addr, VID, 0, 0, b"x", epoch=6, seq=1)
    assert e.value.highest == 7 and e.value.status is Status.STALE_EPOCH
    with pytest.raises(Denied):
        await client.write(a.addr, VID, 0, 0, b"x", epoch=0, seq=1)
    with pytest.raises(InvalidRequest, match="outside"):
        await client.write(a.addr, VID, 0, EXTENT, b"x", epoch=7, seq=1)
    with pytest.raises(NoExtentError):
        await client.read(a.addr, "nope", 0, 0, 4096)
    with pytest.raises(ReplicaError):
        await client.revert(a.addr, VID, 0, epoch=7, to_seq=-1, seq=2)
    assert issubclass(Conflict, ReplicaError) and issubclass(ChecksumFailed, ReplicaError)


async def test_a_copy_that_does_not_open_is_refused_by_create_and_replaced_on_request(tmp_path, client):
    """After a restart an extent's header does not decode: a plain CREATE (an allocation)
    leaves its files alone with an I/O error; a recovery's CREATE (discard_broken) replaces
    it with an empty replica, which then takes writes."""
    n = await Node(tmp_path / "n").start()
    try:
        await client.create(n.addr, VID, 0, generation=1, epoch=1)
        await client.write(n.addr, VID, 0, 0, b"\x11" * BLOCK_SIZE, epoch=1, seq=1)
        await n.stop()
        hdr = tmp_path / "n" / f"{VID}.0.hdr"
        hdr.write_bytes(hdr.read_bytes()[:-1] + bytes([hdr.read_bytes()[-1] ^ 1]))
        n.port = n.port                                 # the same port again
        await n.start()
        with pytest.raises(ReplicaError, match="does not open|unusable") as e:
            await client.create(n.addr, VID, 0, generation=1, epoch=2)
        assert e.value.status is Status.IO_ERROR and hdr.exists()
        await client.create(n.addr, VID, 0, generation=1, epoch=2, discard_broken=True)
        data, present = await client.read(n.addr, VID, 0, 0, BLOCK_SIZE)
        assert bytes(data) == bytes(BLOCK_SIZE)
        await client.write(n.addr, VID, 0, 0, b"\x22" * BLOCK_SIZE, epoch=2, seq=1)
        assert bytes((await client.read(n.addr, VID, 0, 0, BLOCK_SIZE))[0]) == b"\x22" * BLOCK_SIZE
    finally:
        await n.stop()


async def test_a_fence_raises_the_volumes_epoch_even_where_the_extent_is_not(nodes, client):
    """RemoteReplica.fence (a STAT carrying the epoch): the peer admits the epoch before it
    looks for the extent, so an absent one still fences the volume there, and a deposed
    owner's CREATE or WRITE with an older epoch is refused afterwards."""
    from chunk.storage import replicas as rk
    a, b = nodes
    await client.create(a.addr, VID, 0, generation=1, epoch=5)
    await rk.RemoteReplica("a", a.addr, client).fence(VID, 0, 9)         # the extent is here
    await rk.RemoteReplica("b", b.addr, client).fence(VID, 3, 9)         # nothing of VID there
    with pytest.raises(StaleEpoch):
        await client.write(a.addr, VID, 0, 0, b"x" * BLOCK_SIZE, epoch=5, seq=1)
    with pytest.raises(StaleEpoch):
        await client.create(b.addr, VID, 1, generation=1, epoch=5)
    with pytest.raises(rk.ReplicaFailed) as e:
        await rk.RemoteReplica("a", a.addr, client).fence(VID, 0, 8)
    assert e.value.kind == rk.STALE_EPOCH


async def test_concurrent_calls_share_one_connection(nodes, client):
    a, _ = nodes
    await client.create(a.addr, VID, 0, generation=1, epoch=1)
    n = 200
    blocks = [os.urandom(BLOCK_SIZE) for _ in range(n)]
    await asyncio.gather(*(client.write(a.addr, VID, 0, i * BLOCK_SIZE, blocks[i], epoch=1,
                                        seq=1, fua=(i % 25 == 0)) for i in range(n)))
    got = await asyncio.gather(*(client.read(a.addr, VID, 0, i * BLOCK_SIZE, BLOCK_SIZE, epoch=1)
                                 for i in range(n)))
    assert [d for d, _ in got] == blocks
    assert a.server.connections == 1 and a.server.auth_failures == 0


async def test_server_gone_then_back_on_the_same_port(nodes, client):
    a, _ = nodes
    await client.create(a.addr, VID, 0, generation=1, epoch=1)
    port = a.port
    # calls in flight when the server dies fail with PeerUnavailable, none hang
    calls = [asyncio.ensure_future(client.write(a.addr, VID, 0, i * 4096, b"w" * 4096, epoch=1,
                                                seq=1, fua=True)) for i in range(50)]
    await asyncio.sleep(0)
    await a.stop()
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
    assert all(r is None or isinstance(r, PeerUnavailable) for r in results), results
    with pytest.raises(PeerUnavailable) as e:
        await client.ping(a.addr)
    assert e.value.addr == ("127.0.0.1", port)
    # back (restarted on the same disk and port): the client re-dials by itself
    a.port = port
    await a.start()
    await asyncio.sleep(0.15)                       # past redial_interval
    await client.ping(a.addr)
    assert (await client.stat(a.addr, VID, 0))["epoch"] == 1


async def _hang_after_auth(reader, writer, seen: asyncio.Queue) -> None:
    """A peer that authenticates, then reads requests and never answers."""
    frames, out = FrameReader(reader), FrameWriter(writer)
    try:
        await peer_auth.server_handshake(frames, out, SECRET, CLUSTER)
        async for f in frames:
            await seen.put(f)
    except (ConnectionError, peer_auth.AuthError):
        pass
    finally:
        writer.close()


async def test_a_peer_of_another_wire_version_is_unavailable_with_the_reason(client):
    async def newer(reader, writer):
        await reader.read(100)
        body = bytearray(wire.encode(Frame(Op.HELLO, 1).reply(Status.OK))[4:])
        body[0] = wire.VERSION + 1
        writer.write(struct.pack(">I", len(body)) + body)
        await writer.drain()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(newer, "127.0.0.1", 0)
    try:
        with pytest.raises(PeerUnavailable) as e:
            await client.ping(("127.0.0.1", server.sockets[0].getsockname()[1]))
        assert "VersionMismatch" in str(e.value) and f"version {wire.VERSION + 1}" in str(e.value)
    finally:
        server.close()
        await server.wait_closed()


async def test_peer_killed_mid_call_then_a_real_server_takes_over(tmp_path, client):
    seen: asyncio.Queue = asyncio.Queue()
    sockets: list[asyncio.StreamWriter] = []

    async def handle(r, w):
        sockets.append(w)
        await _hang_after_auth(r, w, seen)

    hung = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = hung.sockets[0].getsockname()[1]
    addr = ("127.0.0.1", port)
    call = asyncio.ensure_future(client.ping(addr, timeout=30))
    await asyncio.wait_for(seen.get(), 5)              # the request reached the peer
    assert not call.done()
    hung.close()
    for w in sockets:                                   # the peer dies: its kernel resets the socket
        w.transport.abort()
    with pytest.raises(PeerUnavailable):
        await asyncio.wait_for(call, 5)
    await hung.wait_closed()

    node = await Node(tmp_path / "n", port).start()
    try:
        await asyncio.sleep(0.15)
        assert await client.ping(addr) < 2
    finally:
        await node.stop()


async def test_close_fails_outstanding_calls(client):
    seen: asyncio.Queue = asyncio.Queue()
    hang = await asyncio.start_server(lambda r, w: _hang_after_auth(r, w, seen), "127.0.0.1", 0)
    addr = ("127.0.0.1", hang.sockets[0].getsockname()[1])
    try:
        calls = [asyncio.ensure_future(client.ping(addr, timeout=30)) for _ in range(3)]
        for _ in calls:
            await asyncio.wait_for(seen.get(), 5)
        await client.close()
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
        assert all(isinstance(r, PeerUnavailable) for r in results)
        with pytest.raises(PeerUnavailable, match="closed"):
            await client.ping(addr)
    finally:
        hang.close()
        await hang.wait_closed()


async def test_timeouts_are_bounded(client):
    loop = asyncio.get_running_loop()
    seen: asyncio.Queue = asyncio.Queue()

    async def silent(reader, writer):                 # accepts, never says HELLO back
        await reader.read()
        writer.close()

    mute = await asyncio.start_server(silent, "127.0.0.1", 0)
    hang = await asyncio.start_server(lambda r, w: _hang_after_auth(r, w, seen), "127.0.0.1", 0)
    c = ReplicaClient(SECRET, CLUSTER, "chunk-test", timeout=0.5, redial_interval=0)
    try:
        start = loop.time()
        with pytest.raises(PeerUnavailable, match="connect timed out"):
            await c.ping(("127.0.0.1", mute.sockets[0].getsockname()[1]))
        assert 0.4 < loop.time() - start < 2

        addr = ("127.0.0.1", hang.sockets[0].getsockname()[1])
        start = loop.time()
        with pytest.raises(PeerUnavailable, match="timed out"):
            await c.ping(addr)
        assert 0.4 < loop.time() - start < 2
        # the next call re-dials (a fresh connection), and is bounded again
        with pytest.raises(PeerUnavailable, match="timed out"):
            await c.stat(addr, VID, 0)
        assert seen.qsize() == 2

        # nothing listening: refused at once, then failing fast until redial_interval passes
        free = ("127.0.0.1", addr[1])
        hang.close()
        await hang.wait_closed()
        start = loop.time()
        with pytest.raises(PeerUnavailable):
            await c.ping(free)
        assert loop.time() - start < 1
    finally:
        await c.close()
        mute.close()
        hang.close()
        await mute.wait_closed()
        await hang.wait_closed()


async def test_wrong_secret_is_peer_unavailable(nodes):
    a, _ = nodes
    c = ReplicaClient(b"w" * 32, CLUSTER, "intruder", timeout=1.0)
    try:
        with pytest.raises(PeerUnavailable, match="AuthError"):
            await c.create(a.addr, VID, 0, generation=1, epoch=1)
        with pytest.raises(PeerUnavailable, match="recently failed"):   # fails fast meanwhile
            await c.ping(a.addr)
    finally:
        await c.close()
    assert not a.store.has(VID, 0)


async def test_start_write_resolves_plain_oks_to_none_and_anything_else_to_the_reply(nodes, client):
    """The hot path's replies: an OK is recognised undecoded (None); errors keep their Frame,
    interleaved on one connection with ordinary calls whose replies are decoded as before."""
    a, _ = nodes
    await client.create(a.addr, VID, 0, generation=1, epoch=3)
    await client.ping(a.addr)                                  # connected: start_write sends now
    blocks = [os.urandom(BLOCK_SIZE) for _ in range(40)]
    futs = [client.start_write(a.addr, VID, 0, i * BLOCK_SIZE, blocks[i], 3, 1) for i in range(40)]
    stale = client.start_write(a.addr, VID, 0, 0, b"s" * BLOCK_SIZE, 2, 1)           # older epoch
    outside = client.start_write(a.addr, VID, 0, EXTENT, b"o" * BLOCK_SIZE, 3, 1)    # past the end
    reads = [client.read(a.addr, VID, 0, i * BLOCK_SIZE, BLOCK_SIZE, epoch=3) for i in range(40)]
    assert all(f is not None for f in futs + [stale, outside])
    assert await asyncio.wait_for(asyncio.gather(*futs), 10) == [None] * 40
    rep = await asyncio.wait_for(stale, 10)
    assert rep.status is Status.STALE_EPOCH and rep.args == {"highest": 3} and rep.op is Op.WRITE
    rep = await asyncio.wait_for(outside, 10)
    assert rep.status is Status.INVALID and "outside" in rep.args["error"]
    assert [d for d, _ in await asyncio.gather(*reads)] == blocks
    fua = client.start_write(a.addr, VID, 0, 0, blocks[0], 3, 1, fua=True)          # a FUA write
    rep = await asyncio.wait_for(fua, 10)
    assert rep is not None and rep.status is Status.OK             # not a start_write: decoded


async def test_an_unencodable_request_fails_alone_and_the_connection_keeps_its_writes(nodes, client):
    """An IMPORT blob over the frame limit is the request's fault: it fails as INVALID and the
    write outstanding on the same connection still completes (it used to drop the pipeline)."""
    a, _ = nodes
    await client.create(a.addr, VID, 0, generation=1, epoch=1)
    data = os.urandom(wire.MAX_DATA)
    write = asyncio.ensure_future(client.write(a.addr, VID, 0, 0, data, epoch=1, seq=1, fua=True))
    await asyncio.sleep(0)                                  # the write is on the wire
    with pytest.raises(InvalidRequest, match="exceeds"):
        await client.import_(a.addr, VID, 0, b"x" * (wire.MAX_FRAME + 1), epoch=1)
    await write
    assert (await client.read(a.addr, VID, 0, 0, BLOCK_SIZE, epoch=1))[0] == data[:BLOCK_SIZE]
    assert a.server.connections == 1
