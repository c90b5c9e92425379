"""The coordinator marks a write ``sole`` exactly when the extent has one in-sync replica, and the
flag reaches that replica's ExtentFile (its intent ring ``.int`` appears), whether the replica
is local or behind a real ReplicaServer on loopback, on the fast path, the general path and a
FUA write; with two in-sync replicas no ring is made anywhere.

A real Coordinator (harness of ``test_revert_safety``), real stores, server and client."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgpack
import pytest

from chunk.storage import replicas as rk
from chunk.storage import wire
from chunk.storage.peer_auth import load_or_create_secret
from chunk.storage.replica_client import ReplicaClient
from chunk.storage.replica_server import ReplicaServer
from chunk.storage.extent_file import EXTENT_SIZE
from chunk.storage.wire import MAX_DATA, Frame, Op
from zstore.records import ExtentRecord

from .test_revert_safety import CLUSTER, NOW, SNAP_SEQ, _revert, _volume, keys, stores  # noqa: F401

pytestmark = pytest.mark.timeout(60)


def _rings(store) -> list[bool]:
    """Whether extents 0, 1, 2 of ``store`` have an intent ring."""
    return [(Path(store.stat("v", k)["disk"]) / f"v.{k}.int").exists() for k in range(EXTENTS)]


EXTENTS = 3


def _create(*stores_) -> None:
    for st in stores_:
        for k in range(EXTENTS):
            st.create("v", k, 1)


async def _writes(coord, remote=None) -> None:
    """One write per extent, each acknowledged: extent 1 a FUA write (the general path; it
    also takes ownership), extent 0 a fast-path 4 KiB write, extent 2 a fast-path write of
    two frames."""
    await asyncio.wait_for(coord.write(EXTENT_SIZE + 4096, b"\x03" * 4096, fua=True), 10)
    if remote is not None:
        await remote.connect()
    fut = coord.write_nowait(0, b"\x01" * 4096)
    assert fut is not None                                  # the fast path took it
    await asyncio.wait_for(fut, 10)
    fut = coord.write_nowait(2 * EXTENT_SIZE + 8192, b"\x02" * (MAX_DATA + 4096))
    assert fut is not None
    await asyncio.wait_for(fut, 10)


@pytest.fixture
async def peer(stores, etcd_client, keys):  # noqa: F811
    """Store B behind a real ReplicaServer, and a client to it."""
    b = stores("B")
    secret = await load_or_create_secret(etcd_client, keys)
    server = ReplicaServer(b, secret, CLUSTER, "127.0.0.1", 0)
    await server.start()
    client = ReplicaClient(secret, CLUSTER, "me", timeout=5.0)
    try:
        yield b, rk.RemoteReplica("B", ("127.0.0.1", server.port), client)
    finally:
        await client.close()
        await server.stop()


async def test_one_remote_replica_gets_intent_records(peer, etcd_client, keys):  # noqa: F811
    b, remote = peer
    _create(b)
    coord = await _volume(etcd_client, keys, {"B": remote}, extents=EXTENTS)
    await _writes(coord, remote)
    assert _rings(b) == [True] * EXTENTS
    assert b.read("v", 0, 0, 4096)[0] == b"\x01" * 4096


async def test_one_local_replica_gets_intent_records(stores, etcd_client, keys):  # noqa: F811
    a = stores("A")
    _create(a)
    coord = await _volume(etcd_client, keys, {"A": rk.LocalReplica("A", a)}, extents=EXTENTS)
    await _writes(coord)
    assert _rings(a) == [True] * EXTENTS


async def test_two_replicas_make_no_ring(peer, stores, etcd_client, keys):  # noqa: F811
    b, remote = peer
    a = stores("A")
    _create(a, b)
    coord = await _volume(etcd_client, keys, {"A": rk.LocalReplica("A", a), "B": remote},
                          extents=EXTENTS)
    await _writes(coord, remote)
    assert _rings(a) == _rings(b) == [False] * EXTENTS


async def test_degraded_to_one_in_sync_replica(peer, stores, etcd_client, keys):  # noqa: F811
    """A 2-replica volume whose extent is down to B in sync: B records intents, A (stale, not
    written) has none."""
    b, remote = peer
    a = stores("A")
    _create(a, b)
    coord = await _volume(etcd_client, keys, {"A": rk.LocalReplica("A", a), "B": remote},
                          extents=EXTENTS)
    for k in range(EXTENTS):
        coord.extents[k] = ExtentRecord("v", k, ["B"], 2, {"A": 2})
    await _writes(coord, remote)
    assert _rings(b) == [True] * EXTENTS and _rings(a) == [False] * EXTENTS


@pytest.mark.parametrize("where", ["local", "remote"])
async def test_one_replica_unmap_edges_get_intent_records(peer, stores, etcd_client, keys,  # noqa: F811
                                                          where):
    """An UNMAP with partial edges on a 1-replica volume: the zeros it writes into the edge
    blocks carry ``sole`` too (local store, or args.sole over the wire)."""
    b, remote = peer
    st = stores("A") if where == "local" else b
    rep = rk.LocalReplica("A", st) if where == "local" else remote
    _create(st)
    coord = await _volume(etcd_client, keys, {rep.chunk_id: rep}, extents=EXTENTS)
    await asyncio.wait_for(coord.write(EXTENT_SIZE, b"\x03" * 4096), 10)   # ownership: extent 1
    assert _rings(st) == [False, True, False]
    await asyncio.wait_for(coord.unmap(100, 3 * 4096), 10)                  # edges in blocks 0, 3
    assert _rings(st) == [True, True, False]
    assert st.read("v", 0, 0, 4 * 4096)[0] == bytes(4 * 4096)


# -- the replica server's fast path takes a sole write (wire) --------------------------------

def _frame(args, data: bytes = b"d" * 4096, vol: str = "vol-ü") -> Frame:
    return Frame(Op.WRITE, 5, vol, 3, 7, 2, 8192, len(data), data, seq=11, args=args)


@pytest.mark.parametrize("data", [b"d" * 4096, b"x"])
def test_plain_write_takes_a_sole_write_and_answers_as_the_general_path(data: bytes):
    frame = _frame({"sole": True}, data)
    raw = wire.encode(frame)
    h = wire.plain_write(raw, 4, len(raw) - 4)
    assert h is not None and h[12] == len(msgpack.packb({"sole": True}))
    vlen = len(frame.volume.encode())
    assert wire.encode_sole_write_ok(raw, 4, vlen) == wire.encode(wire.decode(raw[4:]).reply())
    assert raw[4 + wire.HEADER_SIZE + vlen + h[12]:] == data      # where the server reads it


@pytest.mark.parametrize("args", [{"sole": True, "fua": True}, {"sole": False}, {"fua": True},
                                  {"sole": 1}])
def test_plain_write_leaves_other_args_to_the_general_path(args):
    raw = wire.encode(_frame(args))
    assert wire.plain_write(raw, 4, len(raw) - 4) is None


async def test_sole_write_through_the_server_fast_path(peer):
    """A sole WRITE (send_write's frame) over a real connection: answered with a plain OK, its
    data in, a ring made; and a FUA+sole one (the general path) alike."""
    b, remote = peer
    b.create("v", 0, 1)
    b.admit("v", 0, 5)
    client, addr = remote.client, remote.addr
    await client.dial(addr)
    loop = asyncio.get_running_loop()
    got = loop.create_future()
    assert client.send_write(addr, "v", 0, 4096, b"\x07" * 4096, 5, 1, got.set_result, sole=True)
    assert await asyncio.wait_for(got, 10) is None                  # a plain OK reply
    assert (Path(b.stat("v", 0)["disk"]) / "v.0.int").exists()
    assert b.read("v", 0, 4096, 4096)[0] == b"\x07" * 4096
    await asyncio.wait_for(client.write(addr, "v", 0, 8192, b"\x08" * 4096, epoch=5, seq=1,
                                        fua=True, sole=True), 10)
    assert b.read("v", 0, 8192, 4096)[0] == b"\x08" * 4096


def test_encode_sole_write_is_the_general_encoding():
    """The client's sole frame (packed args cached) is byte for byte the general encoder's."""
    for data in (b"d" * 4096, memoryview(b"e" * 8192)):
        assert wire.encode_sole_write(9, "vol-ü", 3, 7, 8192, data, 11) == wire.encode_fields(
            Op.WRITE, 9, "vol-ü", 3, 7, 0, 8192, len(data), data, None, 11, {"sole": True})


async def test_one_replica_compare_and_write_gets_intent_records(peer, etcd_client, keys):  # noqa: F811
    """COMPARE AND WRITE's write (``_caw_send_part``) on a 1-replica volume carries ``sole``."""
    b, remote = peer
    _create(b)
    coord = await _volume(etcd_client, keys, {"B": remote}, extents=EXTENTS)
    await asyncio.wait_for(coord.write(EXTENT_SIZE, b"\x03" * 4096), 10)   # ownership: extent 1
    assert _rings(b) == [False, True, False]
    await asyncio.wait_for(coord.compare_and_write(2 * EXTENT_SIZE, bytes(4096), b"\x05" * 4096), 10)
    assert _rings(b) == [False, True, True]
    assert b.read("v", 2, 0, 4096)[0] == b"\x05" * 4096


@pytest.mark.parametrize("where", ["local", "remote", "two"])
async def test_revert_carries_sole_on_one_replica(peer, stores, etcd_client, keys,  # noqa: F811
                                                  where):
    """A volume revert (volop) writes the snapshot's blocks back with ``sole`` on a 1-replica
    volume (local store, or REVERT args.sole over the wire), not on a 2-replica one."""
    b, remote = peer
    a = stores("A")
    reps = {"local": {"A": rk.LocalReplica("A", a)}, "remote": {"B": remote},
            "two": {"A": rk.LocalReplica("A", a), "B": remote}}[where]
    used = [{"A": a, "B": b}[c] for c in reps]
    for st in used:
        st.create("v", 0, 1)
        st.write("v", 0, 0, b"\x01" * 4096, SNAP_SEQ)              # in the snapshot
        st.write("v", 0, 0, b"\x02" * 4096, NOW)                   # after it
    coord = await _volume(etcd_client, keys, reps, extents=1)
    got = await _revert(coord, etcd_client, keys)
    assert (got.state, got.error) == ("done", None)
    for st in used:
        assert st.read("v", 0, 0, 4096)[0] == b"\x01" * 4096
        assert (Path(st.stat("v", 0)["disk"]) / "v.0.int").exists() == (where != "two")


# -- the replica handles take ``sole`` themselves ---------------------------------------------

def _handle_calls(rep, idx: int) -> list[tuple[str, object]]:
    """Each way a handle writes, unmaps or reverts (the coordinator's calls), with ``sole``,
    on extent ``idx`` + k of ``rep``'s store."""
    big = b"\x04" * 4096
    calls = [("start_write", lambda k, **kw: rep.start_write("v", k, 0, big, 5, NOW, **kw)),
             ("write fua", lambda k, **kw: rep.write("v", k, 0, big, 5, NOW, True, **kw)),
             ("unmap", lambda k, **kw: rep.unmap("v", k, 100, 3 * 4096, 5, NOW, **kw)),
             ("revert", lambda k, **kw: rep.revert("v", k, 5, SNAP_SEQ, NOW, **kw))]
    return [(name, lambda call=call, k=idx + i, **kw: call(k, **kw))
            for i, (name, call) in enumerate(calls)]


@pytest.mark.parametrize("sole", [True, False])
@pytest.mark.parametrize("where", ["local", "remote"])
async def test_the_replica_handles_carry_sole_to_the_store(peer, stores, where, sole):  # noqa: F811
    """``LocalReplica``/``RemoteReplica`` ``start_write``, ``write``, ``unmap``, ``revert``,
    ``write_now`` and ``send_write`` take ``sole`` and hand it to their store or client: the
    replica makes a ring for each with ``sole=True``, none without."""
    b, remote = peer
    st = stores("A") if where == "local" else b
    rep = rk.LocalReplica("A", st) if where == "local" else remote
    calls = _handle_calls(rep, 0)
    n = len(calls) + 1
    for k in range(n):
        st.create("v", k, 1)
        st.admit("v", k, 5)
        st.write("v", k, 0, b"\x01" * 4 * 4096, SNAP_SEQ)       # for the revert to write back
        st.write("v", k, 0, b"\x02" * 4 * 4096, NOW)
    kw = {"sole": True} if sole else {}
    for name, call in calls:
        await asyncio.wait_for(call(**kw), 10)
    k = n - 1                                               # the fast path's call
    if where == "local":
        assert rep.write_now("v", k, 0, b"\x06" * 4096, 5, NOW, **kw) is None
    else:
        await remote.connect()
        got = asyncio.get_running_loop().create_future()
        assert remote.send_write("v", k, 0, b"\x06" * 4096, 5, NOW, got.set_result, **kw)
        assert await asyncio.wait_for(got, 10) is None
    assert [(Path(st.stat("v", k)["disk"]) / f"v.{k}.int").exists() for k in range(n)] == [sole] * n
    assert st.read("v", n - 1, 0, 4096)[0] == b"\x06" * 4096


class _Recording(rk.LocalReplica):
    """A local replica recording the ``sole`` each of the coordinator's calls carried (None:
    not passed), then running the real one."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.soles: list[tuple[str, object]] = []

    def start_write(self, *args, **kw):
        self.soles.append(("start_write", kw.get("sole")))
        return super().start_write(*args, **kw)

    def write_now(self, *args, **kw):
        self.soles.append(("write_now", kw.get("sole")))
        return super().write_now(*args, **kw)

    def unmap(self, *args, **kw):
        self.soles.append(("unmap", kw.get("sole")))
        return super().unmap(*args, **kw)

    def revert(self, *args, **kw):
        self.soles.append(("revert", kw.get("sole")))
        return super().revert(*args, **kw)


@pytest.mark.parametrize("where", ["one", "two"])
async def test_the_coordinator_calls_the_handles_with_sole(peer, stores, etcd_client, keys,  # noqa: F811
                                                           where):
    """The coordinator passes ``sole=True`` through the handle's own method (a subclass sees
    it) on the general and fast paths, unmap and revert, for an extent with one in-sync
    replica; with two it passes none (the unflagged calls are as they were)."""
    b, remote = peer
    a = stores("A")
    local = _Recording("A", a)
    reps = {"A": local} if where == "one" else {"A": local, "B": remote}
    _create(*[{"A": a, "B": b}[c] for c in reps])
    coord = await _volume(etcd_client, keys, reps, extents=EXTENTS)
    await asyncio.wait_for(coord.write(EXTENT_SIZE, b"\x03" * 4096, fua=True), 10)
    if where == "two":
        await remote.connect()
    fut = coord.write_nowait(0, b"\x01" * 4096)
    assert fut is not None
    await asyncio.wait_for(fut, 10)
    await asyncio.wait_for(coord.unmap(2 * EXTENT_SIZE + 100, 3 * 4096), 10)
    got = await _revert(coord, etcd_client, keys)
    assert (got.state, got.error) == ("done", None)
    want = True if where == "one" else None
    assert {name for name, _ in local.soles} == {"start_write", "write_now", "unmap", "revert"}
    assert {sole for _, sole in local.soles} == {want}
    assert _rings(a) == [where == "one"] * EXTENTS
