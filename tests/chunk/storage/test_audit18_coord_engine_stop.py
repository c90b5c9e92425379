"""A chunk server stopping with writes in flight drops no healthy replica.

``StorageEngine.stop`` closed the coordinators without waiting for their writes, then the
replica client: a fast write still waiting for a peer's reply failed "client closed"
(UNAVAILABLE), and its handling dropped that healthy peer through the meta. Now a
coordinator's close drains its writes first (the engine waits for every close, those an
unmapped LU started included). A write the drain gave up on (CLOSE_DRAIN_WAIT) may still be
failed by the client's close: a request the client had sent may have landed, so it is
handled as any other failure (another in-sync replica took the write: the failed one is
dropped; none did: they are not all kept, whatever each may hold); only one that reached no
replica drops nobody (NOT READY, ``ServerStopping``).

A real StorageEngine (started: its replica client, server and store) serving volume v from
two real peers on loopback (``replica_nodes``), no replica of its own; the test etcd holds
the cluster, volume and extent records and ownership. The meta leader is a stand-in that
drops as the meta does (in etcd) and records the calls. B is reached through a relay on
loopback that can hold B's replies (real sockets both ways)."""

from __future__ import annotations

import asyncio
import time

import pytest

from chunk.blockdev import MediumError
from chunk.storage import coordinator as cm
from chunk.storage.coordinator import EXTENT_SIZE
from chunk.storage.engine import StorageEngine
from chunk.storage.extent_file import BLOCK_SIZE
from chunk.storage.metaclient import MetaError
from chunk.storage.wire import Frame, Op
from zstore.keys import Keys
from zstore.records import ClusterInfo, ExtentRecord, Volume, VolumeOwner

from .replica_nodes import CLUSTER, Nodes, block

pytestmark = pytest.mark.timeout(60)


class Relay:
    """A TCP relay on loopback to ``port``; ``hold`` parks the answers (server to client;
    ``requests``: the requests, client to server, which then never reach the server) until
    ``release``; ``parked`` is set once one arrived while held."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.parked = asyncio.Event()
        self.requests = False
        self._tasks: set[asyncio.Task] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _conn(self, cr, cw) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", self.target)
        self._writers += [cw, sw]
        for coro in (self._pump(cr, sw, False), self._pump(sr, cw, True)):
            t = asyncio.ensure_future(coro)
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _pump(self, reader, writer, answers: bool) -> None:
        try:
            while data := await reader.read(1 << 16):
                if answers is not self.requests and not self.flowing.is_set():
                    self.parked.set()
                    await self.flowing.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def hold(self, requests: bool = False) -> None:
        self.requests = requests
        self.parked.clear()
        self.flowing.clear()

    def release(self) -> None:
        self.flowing.set()

    async def close(self) -> None:
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for w in self._writers:
            w.close()
        await self._server.wait_closed()


class DropMeta:
    """The meta leader's extent drop as it makes it (the record in etcd: generation + 1, the
    replica stale; 409 for a moved generation or the last in-sync replica); calls recorded."""

    def __init__(self, etcd, keys: Keys) -> None:
        self.etcd, self.keys, self.calls = etcd, keys, []

    async def call(self, method, path, body=None):
        self.calls.append((method, path, body))
        parts = path.strip("/").split("/")
        if parts[-1] != "drop":
            raise MetaError(400, f"not served here: {method} {path}")
        key = self.keys.extent(parts[1], int(parts[2]))
        rec = ExtentRecord.decode((await self.etcd.get(key)).value)
        if body["generation"] != rec.generation:
            raise MetaError(409, "generation moved")
        if rec.replicas == [body["chunk_id"]]:
            raise MetaError(409, "refusing to drop the last in-sync replica")
        new = ExtentRecord(rec.volume_id, rec.index, [c for c in rec.replicas if c != body["chunk_id"]],
                           rec.generation + 1, dict(rec.stale))
        new.stale[body["chunk_id"]] = new.generation
        await self.etcd.put(key, new.encode())
        return {"extent": new.to_dict()}

    def dropped(self) -> list[str]:
        return [b["chunk_id"] for _, p, b in self.calls if p.endswith("/drop")]

    async def close(self) -> None:
        pass


class Lease:
    """The server's Registration as the engine reads it; ``stop`` as its stop leaves it."""

    def __init__(self) -> None:
        self.lease_gen, self.lease_deadline, self.stopping = 1, time.monotonic() + 600, False

    def stop(self) -> None:
        self.lease_deadline, self.stopping = 0.0, True


class Served:
    """Engine "me" serving volume v (one extent) from peers; see the module docstring."""

    def __init__(self, tmp_path, etcd, keys: Keys) -> None:
        self.tmp, self.etcd, self.keys = tmp_path, etcd, keys
        self.nodes = Nodes(tmp_path, etcd, keys)
        self.relays: dict[str, Relay] = {}
        self.engine: StorageEngine | None = None
        self.stopped = False

    async def start(self, replicas: list[str], *, relayed=(), dead=(), unregistered=(),
                    replica_timeout: float = 10.0):
        await self.etcd.put(self.keys.cluster(), ClusterInfo(cluster_id=CLUSTER).encode())
        for cid in replicas:
            if cid in dead:
                await self.nodes.add_dead(cid)
            elif cid not in unregistered:
                node = await self.nodes.add(cid)
                if cid in relayed:
                    relay = self.relays[cid] = Relay(node.server.port)
                    await relay.start()
                    await self.nodes.register(cid, relay.port)
        vol = Volume(volume_id="v", name="v", size=EXTENT_SIZE, replicas=len(replicas))
        await self.etcd.put(self.keys.volume("v"), vol.encode())
        await self.nodes.extent("v", 0, replicas, {})
        eng = self.engine = StorageEngine(self.etcd, self.keys, "me", [(self.tmp / "me", None)],
                                          listen=("127.0.0.1", 0), token=None,
                                          replica_timeout=replica_timeout)
        eng.lease = self.lease = Lease()
        await eng.start(asyncio.Event())
        eng.meta = self.meta = DropMeta(self.etcd, self.keys)
        self.dev = eng.open(vol, readonly=False)
        return self.dev

    @property
    def coord(self):
        return self.engine._coords[("v", 0)]                # noqa: SLF001

    async def stop(self) -> None:
        """As the chunk server stops: its lease first (Registration), then the engine."""
        self.lease.stop()
        self.stopped = True
        await self.engine.stop()

    async def record(self) -> ExtentRecord:
        return ExtentRecord.decode((await self.etcd.get(self.keys.extent("v", 0))).value)

    async def owner(self) -> tuple[int, bool]:
        rec = VolumeOwner.decode((await self.etcd.get(self.keys.owner("v"))).value)
        return rec.epoch, rec.released

    def read(self, cid: str, off: int) -> bytes:
        return self.nodes.nodes[cid].store.read("v", 0, off, BLOCK_SIZE)[0]

    async def close(self) -> None:
        if self.engine is not None and not self.stopped:
            await self.engine.stop()
        for relay in self.relays.values():
            relay.release()
            await relay.close()
        await self.nodes.close()


@pytest.fixture
async def served(tmp_path, etcd_client, etcd_config):
    s = Served(tmp_path, etcd_client, Keys(etcd_config.prefix))
    try:
        yield s
    finally:
        await s.close()


async def _fast_write_held_at_b(served: Served):
    """v served from B (relayed) and C, written once; then a fast write whose reply from B
    is held at the relay (B took it)."""
    dev = await served.start(["B", "C"], relayed=("B",))
    await asyncio.wait_for(dev.write(0, block(1)), 10)        # owner; connections up
    served.relays["B"].hold()
    fut = dev.write_nowait(BLOCK_SIZE, block(2))
    assert fut is not None                                    # the fast path took it
    await asyncio.wait_for(served.relays["B"].parked.wait(), 10)
    return fut


async def test_a_stop_waits_for_a_fast_write_in_flight_and_drops_nobody(served):
    """B answers once the stop has begun (the relay lets its reply through when the volume is
    closing): the write completes, acknowledged, before the replica client closes."""
    fut = await _fast_write_held_at_b(served)
    coord = served.coord
    stopping = asyncio.ensure_future(served.stop())
    deadline = time.monotonic() + 10                          # the stop's first steps
    while not (stopping.done() or getattr(coord, "_closing", None) is not None):
        assert time.monotonic() < deadline, "the stop never reached the volume"
        await asyncio.sleep(0.001)
    served.relays["B"].release()
    await asyncio.wait_for(stopping, 30)
    assert fut.done(), "the engine stopped with a write in flight"
    assert fut.result() is None
    assert served.meta.dropped() == []
    assert (await served.record()).replicas == ["B", "C"]
    assert [served.read(c, BLOCK_SIZE) for c in "BC"] == [block(2)] * 2
    assert (await served.owner())[1] is True                  # released, after the write


async def test_a_stop_right_after_an_unmap_waits_for_that_volumes_close(served):
    """The LU was unmapped (its device closed: the engine releases the coordinator in a task
    of its own) just before the stop. The stop cancelled that task and went on to close the
    replica client under the write. Now it waits for the close, which drains the write (B
    never answers here: the replica timeout ends it, and B is dropped as unresponsive, the
    write acknowledged on C) before the client closes."""
    served_dev = await served.start(["B", "C"], relayed=("B",), replica_timeout=1.0)
    await asyncio.wait_for(served_dev.write(0, block(1)), 10)
    coord = served.coord
    served.relays["B"].hold()
    fut = served_dev.write_nowait(BLOCK_SIZE, block(2))
    assert fut is not None
    await asyncio.wait_for(served.relays["B"].parked.wait(), 10)
    served_dev.close()                                        # the LU unmapped
    await asyncio.wait_for(served.stop(), 30)
    assert fut.done(), "the engine stopped with a write in flight"
    assert fut.result() is None
    assert served.meta.dropped() == ["B"]                     # timed out, not "client closed"
    assert coord._closed                                      # noqa: SLF001 - close ran to its end
    assert served.read("C", BLOCK_SIZE) == block(2)


async def _left_by_the_drain(served, monkeypatch, **kw):  # noqa: F811
    """v served from B (relayed) and C (``relayed`` in ``kw`` for more), written once; the
    replica timeout long, the drain short: a request held at a relay outlives the close's
    drain, and the stop then closes the replica client under it."""
    monkeypatch.setattr(cm, "CLOSE_DRAIN_WAIT", 0.5)
    kw.setdefault("relayed", ("B",))
    dev = await served.start(["B", "C"], replica_timeout=30.0, **kw)
    await asyncio.wait_for(dev.write(0, block(1)), 10)
    return dev


async def test_a_write_c_took_before_the_replica_client_closed_drops_b(served, monkeypatch):
    """The drain gave up (CLOSE_DRAIN_WAIT) on a write whose reply from B is held (B took
    it); C took it too. The stop closes the replica client, which fails B's request
    ("pipeline closed"): it was sent, so B may or may not hold the write, while C, in sync,
    does. B is dropped (resynced later) and the write acknowledged on C. Before, any
    UNAVAILABLE once the client closed dropped nobody: NOT READY with B kept in sync
    whatever it held."""
    dev = await _left_by_the_drain(served, monkeypatch)
    served.relays["B"].hold()
    fut = dev.write_nowait(BLOCK_SIZE, block(2))
    assert fut is not None
    await asyncio.wait_for(served.relays["B"].parked.wait(), 10)
    await asyncio.wait_for(served.stop(), 30)
    assert await asyncio.wait_for(fut, 10) is None
    assert served.meta.dropped() == ["B"]
    assert (await served.record()).replicas == ["C"]
    assert served.read("C", BLOCK_SIZE) == block(2)


async def test_a_write_b_never_got_before_the_replica_client_closed_leaves_no_disagreement(
        served, monkeypatch):
    """As above, but B's request is held on its way (B never gets the write) while C takes
    it: before, NOT READY with B (old data) and C (new) both in sync (the reviewer's
    reproducer); now B is dropped and the write acknowledged on C."""
    dev = await _left_by_the_drain(served, monkeypatch)
    served.relays["B"].hold(requests=True)
    fut = dev.write_nowait(BLOCK_SIZE, block(2))
    assert fut is not None
    await asyncio.wait_for(served.relays["B"].parked.wait(), 10)
    c = served.engine.cached_replica("C")
    await asyncio.wait_for(c.client.call(c.addr, Frame(Op.PING, 0)), 10)   # C answered before
    await asyncio.wait_for(served.stop(), 30)
    assert await asyncio.wait_for(fut, 10) is None
    assert served.meta.dropped() == ["B"]
    assert (await served.record()).replicas == ["C"]
    assert served.read("C", BLOCK_SIZE) == block(2)
    assert served.read("B", BLOCK_SIZE) != block(2)          # stale, as the record says


async def test_a_caw_that_landed_before_the_replica_client_closed_is_not_answered_not_ready(
        served, monkeypatch):
    """A COMPARE AND WRITE reached C (and B, whose reply is held) when the stop closed the
    replica client. Before, it was answered NOT READY, which the host retries, and the retry
    compares against the CAW's own data (MISCOMPARE for a CAW that succeeded). Now C took it,
    B is dropped, and the CAW is acknowledged."""
    dev = await _left_by_the_drain(served, monkeypatch)
    coord = served.coord
    orig = coord._caw_send                                   # noqa: SLF001

    async def held_send(*args, **kw):
        served.relays["B"].hold()                            # the compare read B; hold the write's reply
        return await orig(*args, **kw)
    coord._caw_send = held_send                              # noqa: SLF001
    caw = asyncio.ensure_future(dev.compare_and_write(0, block(1), block(3)))
    await asyncio.wait_for(served.relays["B"].parked.wait(), 10)
    await asyncio.wait_for(served.stop(), 30)
    assert await asyncio.wait_for(caw, 10) is None
    assert served.meta.dropped() == ["B"]
    assert (await served.record()).replicas == ["C"]
    assert served.read("C", 0) == block(3)


async def test_a_write_no_replica_answered_before_the_replica_client_closed_keeps_one(
        served, monkeypatch):
    """Neither B nor C answered (both replies held) when the stop closed the replica client:
    either may hold the write (here both do), and nothing says they agree. They are not both
    kept in sync (before: NOT READY, nobody dropped): B is dropped, the meta refuses to drop
    C, the last, and the write fails MEDIUM ERROR, never acknowledged."""
    dev = await _left_by_the_drain(served, monkeypatch, relayed=("B", "C"))
    for cid in "BC":
        served.relays[cid].hold()
    fut = dev.write_nowait(BLOCK_SIZE, block(2))
    assert fut is not None
    for cid in "BC":
        await asyncio.wait_for(served.relays[cid].parked.wait(), 10)
    await asyncio.wait_for(served.stop(), 30)
    with pytest.raises(MediumError):
        await asyncio.wait_for(fut, 10)
    assert served.meta.dropped() == ["B", "C"]               # C refused: the last
    assert (await served.record()).replicas == ["C"]
