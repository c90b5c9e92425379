"""A volume revert (``Coordinator._revert``) must never leave an extent worse off than it
found it: an allocated extent no replica has yet stays readable (as absent), replicas a full
disk stopped part-way do not stay in sync with different contents, and a slow remote revert
is not mistaken for a dead replica.

A real Coordinator runs ``run_volop`` against the test etcd, over real ReplicaStores (local
ones, or behind real ReplicaServers on loopback); the meta is a stand-in that, like the real
one, refuses to drop an extent's last in-sync replica."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from chunk.storage import replicas as rk
from chunk.storage.coordinator import EXTENT_SIZE, Coordinator
from chunk.storage.extent_file import BLOCK_SIZE
from chunk.storage.metaclient import MetaError
from chunk.storage.owner_reads import OwnerReads
from chunk.storage.replica_client import ReplicaClient
from chunk.storage.replica_server import ReplicaServer
from chunk.storage.replica_store import ReplicaStore, StoreFull
from chunk.storage.peer_auth import load_or_create_secret
from zstore.keys import Keys
from zstore.records import ExtentRecord, Snapshot, Volume, VolumeOp, VolumeOwner

CLUSTER = "test-cluster"
SNAP_SEQ, NOW = 1, 3            # snapshot s is at seq 1; the volume writes at seq 3


class _Meta:
    """Drops as the meta makes them: generation + 1, the replica goes stale; the last in-sync
    replica of an extent is never dropped (409)."""

    def __init__(self, coord: Coordinator) -> None:
        self.coord, self.calls = coord, []

    async def call(self, method, path, body):
        self.calls.append((method, path, body))
        parts = path.strip("/").split("/")
        idx = int(parts[2])
        rec = self.coord.extents[idx]
        if parts[-1] != "drop":
            raise MetaError(400, f"not served here: {method} {path}")
        if body["generation"] != rec.generation:
            raise MetaError(409, "generation moved")
        if rec.replicas == [body["chunk_id"]]:
            raise MetaError(409, "refusing to drop the last in-sync replica")
        new = ExtentRecord(rec.volume_id, idx, [c for c in rec.replicas if c != body["chunk_id"]],
                           rec.generation + 1, dict(rec.stale))
        new.stale[body["chunk_id"]] = new.generation
        return {"extent": new.to_dict()}


class _Engine:
    chunk_id, replicas_version, min_write_replicas, lease = "me", 1, 1, None

    def __init__(self, etcd, keys, reps) -> None:
        self.etcd, self.keys, self.reps = etcd, keys, reps
        self.owner_reads = OwnerReads(etcd, keys)      # the real one, over the test's etcd

    async def replica(self, chunk_id):
        return self.reps[chunk_id]

    def cached_replica(self, chunk_id):
        return self.reps.get(chunk_id)

    def cached_replicas(self, chunk_ids):
        return [self.reps[c] for c in chunk_ids]

    def local_store_for(self, rec):
        return None                 # every read goes through the replicas

    def forget_peer(self, chunk_id):
        pass

    async def chunk_ids(self):
        return sorted(self.reps)


def _block(fill: int) -> bytes:
    return bytes([fill]) * BLOCK_SIZE


async def _volume(etcd, keys, reps: dict, extents: int = 2) -> Coordinator:
    """Volume v (``extents`` extents, replicas on every one of ``reps``), snapshot s ready at
    seq 1, the volume at seq 3, owned before at epoch 4 by this server."""
    vol = Volume(volume_id="v", name="v", size=extents * EXTENT_SIZE, replicas=len(reps),
                 snap_seq=NOW)
    await etcd.put(keys.volume("v"), vol.encode())
    await etcd.put(keys.snapshot("s"), Snapshot(snapshot_id="s", name="s", volume_id="v",
                                                size=vol.size, seq=SNAP_SEQ).encode())
    await etcd.put(keys.owner("v"), VolumeOwner(volume_id="v", chunk_id="me", epoch=4).encode())
    coord = Coordinator(_Engine(etcd, keys, reps), vol)
    coord._is_ready = True                                  # noqa: SLF001 - no _open here
    coord.engine.meta = _Meta(coord)

    async def no_refresh():
        pass
    coord._refresh_extents = no_refresh                     # noqa: SLF001 - the map is set here
    for idx in range(extents):
        coord.extents[idx] = ExtentRecord("v", idx, sorted(reps), 1, {})
    return coord


async def _revert(coord: Coordinator, etcd, keys) -> VolumeOp:
    op = VolumeOp(op_id="op1", volume_id="v", kind="revert", snapshot_id="s", executor="me")
    await etcd.put(keys.volop("v", "op1"), op.encode())
    await asyncio.wait_for(coord.run_volop(op), 60)
    return VolumeOp.decode((await etcd.get(keys.volop("v", "op1"))).value)


@pytest.fixture
def keys(etcd_config):
    return Keys(etcd_config.prefix)


@pytest.fixture
def stores(tmp_path):
    made: dict[str, ReplicaStore] = {}

    def make(name: str) -> ReplicaStore:
        made[name] = ReplicaStore([(tmp_path / name, None)], cow_sync=False)
        return made[name]
    yield make
    for s in made.values():
        s.close()


# -- 1. an allocated extent no replica has yet ------------------------------------------


async def test_a_revert_leaves_an_allocated_never_created_extent_readable(stores, etcd_client, keys):
    """Extent 1 is in the map but was never CREATEd anywhere (its allocator died first, or
    every CREATE was refused for space): it reads as absent, and so it did at the snapshot.
    The revert must leave it so: no replica dropped, generation 1, zeros on read, and the op
    done; before, each NO_EXTENT dropped a replica (generation 2) and from then on the
    extent was unreadable (MEDIUM ERROR) and unwritable."""
    a, b = stores("A"), stores("B")
    for st in (a, b):
        st.create("v", 0, 1)
        st.write("v", 0, 0, _block(1), SNAP_SEQ)            # in the snapshot
        st.write("v", 0, 0, _block(2), NOW)                 # after it
    coord = await _volume(etcd_client, keys, {"A": rk.LocalReplica("A", a),
                                              "B": rk.LocalReplica("B", b)})
    got = await _revert(coord, etcd_client, keys)
    assert (got.state, got.error) == ("done", None)
    rec = coord.extents[1]
    assert (sorted(rec.replicas), rec.generation, rec.stale) == (["A", "B"], 1, {})
    assert coord.engine.meta.calls == []                    # nothing dropped
    assert await coord.read(EXTENT_SIZE, BLOCK_SIZE) == bytes(BLOCK_SIZE)
    assert await coord.read(0, BLOCK_SIZE) == _block(1)     # extent 0 was reverted
    await coord.write(EXTENT_SIZE, _block(9))               # and extent 1 is still writable
    assert await coord.read(EXTENT_SIZE, BLOCK_SIZE) == _block(9)


async def test_a_revert_keeps_replicas_when_only_some_say_the_extent_is_missing(stores, etcd_client, keys):
    """A never-changed extent, B lacks it and A does not answer at all: whether it was ever
    created cannot be told, so the revert fails without dropping B for NO_EXTENT (a drop
    would bump the generation and make an absent extent unreadable for good)."""
    a, b = stores("A"), stores("B")
    for st in (a, b):
        st.create("v", 0, 1)
    ra, rb = rk.LocalReplica("A", a), rk.LocalReplica("B", b)

    async def a_down(vid, idx, epoch, to_seq, seq):
        if idx == 1:
            raise rk.ReplicaFailed("A", rk.UNAVAILABLE, "injected")
    ra.revert = a_down
    coord = await _volume(etcd_client, keys, {"A": ra, "B": rb})
    got = await _revert(coord, etcd_client, keys)
    assert got.state == "failed" and "extent 1" in got.error
    assert coord.engine.meta.calls == []                    # neither dropped
    rec = coord.extents[1]
    assert (sorted(rec.replicas), rec.generation) == (["A", "B"], 1)


# -- 2. a disk filling up part-way through a revert ----------------------------------------


def _full_on(store: ReplicaStore, call: int) -> list[int]:
    """Make ``store``'s ``call``-th revert run (1-based) fail as a full disk would."""
    calls = [0]
    run = store._revert_run                                  # noqa: SLF001

    def patched(*args, **kw):
        calls[0] += 1
        if calls[0] == call:
            raise StoreFull("injected: no space left on device")
        return run(*args, **kw)
    store._revert_run = patched                             # noqa: SLF001
    return calls


async def _four_runs(stores, etcd, keys):
    """Extent 0 on A and B: four blocks 1 MiB apart (four revert runs) written at the
    snapshot's seq, then overwritten after it."""
    a, b = stores("A"), stores("B")
    for st in (a, b):
        st.create("v", 0, 1)
        for k in range(4):
            st.write("v", 0, k << 20, _block(1 + k), SNAP_SEQ)
            st.write("v", 0, k << 20, _block(0x40 + k), NOW)
    coord = await _volume(etcd, keys, {"A": rk.LocalReplica("A", a), "B": rk.LocalReplica("B", b)},
                          extents=1)
    return coord, a, b


async def test_replicas_a_full_disk_stopped_at_different_points_do_not_stay_in_sync(stores, etcd_client, keys):
    """A's disk fills up at its third 1 MiB run (two reverted), B's at its first (none):
    both answer NO_SPACE, which for a write means "nothing done" and keeps every replica.
    Here they now hold different data; kept in sync, reads would depend on the replica
    asked and a resync would copy either. Every replica left in the record must agree."""
    coord, a, b = await _four_runs(stores, etcd_client, keys)
    _full_on(a, 3)
    _full_on(b, 1)
    got = await _revert(coord, etcd_client, keys)
    assert got.state == "failed"
    rec = coord.extents[0]
    assert rec.replicas, "an extent is never left without an in-sync replica"
    st = {"A": a, "B": b}
    assert len({st[c].digest("v", 0) for c in rec.replicas}) == 1, rec
    assert set(rec.stale) | set(rec.replicas) == {"A", "B"}


async def test_replicas_a_full_disk_stopped_before_any_change_are_all_kept(stores, etcd_client, keys):
    """Both refuse at their first run, nothing changed anywhere: they still agree, so both
    stay (dropping one would cost the extent its redundancy for a full cluster)."""
    coord, a, b = await _four_runs(stores, etcd_client, keys)
    before = a.digest("v", 0)
    _full_on(a, 1)
    _full_on(b, 1)
    got = await _revert(coord, etcd_client, keys)
    assert got.state == "failed" and "space" in got.error
    assert sorted(coord.extents[0].replicas) == ["A", "B"] and coord.engine.meta.calls == []
    assert a.digest("v", 0) == b.digest("v", 0) == before


# -- 3. a slow remote revert ---------------------------------------------------------------


class _ServerThread:
    """A ReplicaServer on its own event loop in a thread: a store call that blocks (a slow
    disk, here time.sleep) blocks that server, not the coordinator and its client."""

    def __init__(self, store: ReplicaStore, secret: bytes) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start() -> ReplicaServer:
            server = ReplicaServer(store, secret, CLUSTER, "127.0.0.1", 0)
            await server.start()
            return server
        try:
            self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        except BaseException:
            self._end_loop()                # a failed start leaks no thread or loop either
            raise

    def stop(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(30)
        finally:
            self._end_loop()

    def _end_loop(self) -> None:
        """Cancel what still runs on the loop, stop it, join its thread (bounded) and close
        it: nothing of this server is left running into later tests."""
        async def cancel_the_rest() -> None:
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)
            await asyncio.get_running_loop().shutdown_asyncgens()
        try:
            if self.thread.is_alive():
                asyncio.run_coroutine_threadsafe(cancel_the_rest(), self.loop).result(10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            assert not self.thread.is_alive(), "the replica server's loop thread did not end"
            self.loop.close()


async def test_a_slow_remote_revert_is_waited_for_and_does_not_stop_its_server(stores, etcd_client, keys):
    """B's disk takes 6 s for the extent's revert (1.5 s per 1 MiB run), longer than the
    5 s replica timeout: B must not be taken for dead and dropped, and its server must go
    on answering other requests between the runs."""
    a, b = stores("A"), stores("B")
    for st in (a, b):
        st.create("v", 0, 1)
        for k in range(4):
            st.write("v", 0, k << 20, _block(1 + k), SNAP_SEQ)
            st.write("v", 0, k << 20, _block(0x40 + k), NOW)
    started, runs = threading.Event(), []
    run = b._revert_run                                      # noqa: SLF001

    def slow(*args, **kw):
        started.set()
        time.sleep(1.5)
        runs.append(time.monotonic())
        return run(*args, **kw)
    b._revert_run = slow                                     # noqa: SLF001
    secret = await load_or_create_secret(etcd_client, keys)
    srv = _ServerThread(b, secret)
    client = ReplicaClient(secret, CLUSTER, "me", timeout=5.0)
    try:
        addr = ("127.0.0.1", srv.server.port)
        coord = await _volume(etcd_client, keys, {"A": rk.LocalReplica("A", a),
                                                  "B": rk.RemoteReplica("B", addr, client)},
                              extents=1)
        task = asyncio.create_task(_revert(coord, etcd_client, keys))
        deadline = time.monotonic() + 10
        while not started.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert started.is_set(), "B's revert never started"
        await client.ping(addr, timeout=10)
        assert not task.done() and len(runs) < 4, "B's server answered nothing during its revert"
        got = await asyncio.wait_for(task, 60)
        assert (got.state, got.error) == ("done", None)
        assert coord.engine.meta.calls == [] and sorted(coord.extents[0].replicas) == ["A", "B"]
        assert len(runs) == 4 and a.digest("v", 0) == b.digest("v", 0)
        assert b.read("v", 0, 0, BLOCK_SIZE)[0] == _block(1)
    finally:
        try:
            await client.close()
        finally:
            srv.stop()
