"""A volume closed (LU unmapped, chunk server stopping) with writes in flight: ``close``
drains them through the write gate (each one admitted, fast path or general, finishes its
whole handling: retries, drops, a retake, the split by snapshot) and only then releases
ownership; no write is admitted once closing starts (NOT READY, nothing sent), and a closed
coordinator never takes ownership again.

Released with writes still retrying (before), the meta could take a snapshot by itself (no
live owner) at the seq those writes went out at, and a retake in flight left this server
owning the volume after its close. Failing the retrying writes instead (17256e8 reverted
that) skipped ``_split_by_snapshot`` and answered a COMPARE AND WRITE that may have landed
NOT READY.

A real Coordinator over real ReplicaStores (local ones, or one behind a real ReplicaServer on
loopback) and the test etcd: the harness of ``test_revert_safety``. A write stays in flight
because B lost the extent: the write waits for it (``_await_creation``, 0.63 s) and then
drops it."""

from __future__ import annotations

import asyncio
import time

import pytest

from chunk.storage import coordinator as cm
from chunk.storage import ownership
from chunk.storage import replicas as rk
from chunk.storage.coordinator import EXTENT_SIZE, Coordinator, NotServing
from chunk.storage.peer_auth import load_or_create_secret
from chunk.storage.replica_client import ReplicaClient
from chunk.storage.replica_server import ReplicaServer
from zstore.records import Snapshot, VolumeOp, VolumeOwner

from .test_revert_safety import CLUSTER, _block, _volume, keys, stores  # noqa: F401

pytestmark = pytest.mark.timeout(60)


class _Watched(rk.LocalReplica):
    """A local replica that says when a write attempt reached it (``landed``: it took one)."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.landed = asyncio.Event()
        self.attempted = asyncio.Event()

    async def write(self, *args, **kw):
        try:
            await super().write(*args, **kw)
            self.landed.set()
        finally:
            self.attempted.set()

    start_write = write


async def _owner(etcd, keys) -> tuple[int, bool]:  # noqa: F811
    rec = VolumeOwner.decode((await etcd.get(keys.owner("v"))).value)
    return rec.epoch, rec.released


def _dropped(coord) -> list[str]:
    return [body["chunk_id"] for _, path, body in coord.engine.meta.calls if path.endswith("/drop")]


async def _b_lost_it(stores, etcd_client, keys):  # noqa: F811
    """Volume v, extent 0 on A and B (local), owned and written once; then B loses it."""
    a, b = stores("A"), stores("B")
    for st in (a, b):
        st.create("v", 0, 1)
    ra, rb = _Watched("A", a), rk.LocalReplica("B", b)
    coord = await _volume(etcd_client, keys, {"A": ra, "B": rb}, extents=1)
    await asyncio.wait_for(coord.write(0, _block(1)), 10)      # owner, in service
    b.delete("v", 0)
    ra.landed.clear()
    return coord, a, ra


async def test_close_waits_for_a_general_path_write_in_flight_then_releases(
        stores, etcd_client, keys):  # noqa: F811
    coord, a, ra = await _b_lost_it(stores, etcd_client, keys)
    mine = coord.epoch
    w = asyncio.ensure_future(coord.write(4096, _block(2)))
    await asyncio.wait_for(ra.landed.wait(), 10)            # its first attempt is on A
    assert not w.done()                                     # and it waits for B
    await asyncio.wait_for(coord.close(), 20)
    assert w.done(), "close released ownership with a write still in flight"
    assert w.result() is None                               # acknowledged: on A, B dropped
    assert _dropped(coord) == ["B"]
    assert await _owner(etcd_client, keys) == (mine, True)  # released after it, not before
    assert a.read("v", 0, 4096, 4096)[0] == _block(2)


async def test_no_write_is_admitted_once_close_started(stores, etcd_client, keys):  # noqa: F811
    """A write arriving while ``close`` drains (and after) is NOT READY, with nothing sent."""
    coord, a, ra = await _b_lost_it(stores, etcd_client, keys)
    w = asyncio.ensure_future(coord.write(4096, _block(2)))
    await asyncio.wait_for(ra.landed.wait(), 10)
    closing = asyncio.ensure_future(coord.close())
    await asyncio.sleep(0)                                  # one loop turn: close has begun
    late = asyncio.ensure_future(coord.write(8192, _block(3)))
    with pytest.raises(NotServing):
        await asyncio.wait_for(late, 20)
    await asyncio.wait_for(closing, 20)
    await asyncio.wait_for(w, 1)                            # the admitted one was not refused
    with pytest.raises(NotServing):
        await asyncio.wait_for(coord.write(12288, _block(4)), 10)
    for off in (8192, 12288):
        assert a.read("v", 0, off, 4096)[0] == bytes(4096)  # never sent


async def test_close_waits_for_a_fast_write_handed_off_to_the_general_path(
        stores, etcd_client, keys):  # noqa: F811
    """The fast path's handoff (``_write_recover``) is a task of the coordinator's own that no
    session's end cancels: the write that most often outlives the session."""
    a, b = stores("A"), stores("B")
    for st in (a, b):
        st.create("v", 0, 1)
    secret = await load_or_create_secret(etcd_client, keys)
    server = ReplicaServer(b, secret, CLUSTER, "127.0.0.1", 0)
    await server.start()
    client = ReplicaClient(secret, CLUSTER, "me", timeout=5.0)
    try:
        reps = {"A": rk.LocalReplica("A", a),
                "B": rk.RemoteReplica("B", ("127.0.0.1", server.port), client)}
        coord = await _volume(etcd_client, keys, reps, extents=1)
        await asyncio.wait_for(coord.write(0, _block(1)), 10)
        mine = coord.epoch
        await reps["B"].connect()
        b.delete("v", 0)
        fut = coord.write_nowait(4096, _block(2))
        assert fut is not None                              # the fast path took it
        await asyncio.wait_for(coord.close(), 20)
        assert fut.done(), "close released ownership with a fast write still in flight"
        assert fut.result() is None
        assert coord.counters["fast_write_handoffs"] == 1
        assert _dropped(coord) == ["B"]
        assert await _owner(etcd_client, keys) == (mine, True)
        assert coord.write_nowait(8192, _block(3)) is None  # closed: the fast path declines
    finally:
        await client.close()
        await server.stop()


async def test_a_write_retaking_ownership_during_close_is_drained_and_the_volume_left_held(
        stores, etcd_client, keys):  # noqa: F811
    """The write was fenced (another server's request reached both replicas) and waits for the
    owner lock to take the volume back while the volume closes. The retake is part of the
    write's handling: the write finishes (on both replicas, under the epoch it took), but
    that epoch is NOT released: whoever fenced us still believes it owns the volume at its
    older epoch and may write on where ours never fenced it; released, the meta could commit
    a snapshot by itself under those writes. Before, ``close`` released the retaken epoch."""
    a, b = stores("A"), stores("B")
    for st in (a, b):
        st.create("v", 0, 1)
    ra, rb = _Watched("A", a), _Watched("B", b)
    coord = await _volume(etcd_client, keys, {"A": ra, "B": rb}, extents=1)
    await asyncio.wait_for(coord.write(0, _block(1)), 10)
    mine = coord.epoch
    for st in (a, b):
        st.admit("v", 0, mine + 1)                          # another server fenced us
    rb.attempted.clear()
    await coord._owner_lock.acquire()                       # noqa: SLF001 - hold the retake
    try:
        w = asyncio.ensure_future(coord.write(0, _block(2)))
        await asyncio.wait_for(rb.attempted.wait(), 10)    # fenced on both: at the owner lock
        closing = asyncio.ensure_future(coord.close())
        await asyncio.sleep(0)                              # one loop turn: close has begun
        assert coord._closing is not None                   # noqa: SLF001
    finally:
        coord._owner_lock.release()                         # noqa: SLF001
    await asyncio.wait_for(closing, 20)
    assert w.done() and w.result() is None
    assert coord.counters["fenced"] == 1
    assert await _owner(etcd_client, keys) == (mine + 1, False)   # taken back, left held
    assert [st.read("v", 0, 0, 4096)[0] for st in (a, b)] == [_block(2)] * 2


class _Held(rk.LocalReplica):
    """A local replica whose next write or flush, once ``hold`` said so, waits: ``hold``
    returns (reached: set when that call arrived, go: set it to let the call on)."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self._holds: dict[str, tuple[asyncio.Event, asyncio.Event]] = {}

    def hold(self, op: str) -> tuple[asyncio.Event, asyncio.Event]:
        self._holds[op] = (asyncio.Event(), asyncio.Event())
        return self._holds[op]

    async def _held(self, op: str) -> None:
        held = self._holds.pop(op, None)
        if held is not None:
            held[0].set()
            await held[1].wait()

    async def write(self, *args, **kw):
        await self._held("write")
        return await super().write(*args, **kw)

    start_write = write

    async def flush(self, *args, **kw):
        await self._held("flush")
        return await super().flush(*args, **kw)


async def _remapped(stores, etcd_client, keys):  # noqa: F811
    """The LU is unmapped (``engine.release`` forgets the coordinator, then awaits its close)
    with a write in flight, and mapped again at once: a new coordinator of the volume on this
    same server takes ownership (epoch E+1) and writes extent 0, which fences the old one's
    write there; the old one takes the volume back (E+2) to finish it, and its close ends.
    (old, new, stores A and B, E+1)."""
    a, b = stores("A"), stores("B")
    for st in (a, b):
        for i in (0, 1):
            st.create("v", i, 1)
    ra, rb = rk.LocalReplica("A", a), _Held("B", b)
    old = await _volume(etcd_client, keys, {"A": ra, "B": rb}, extents=2)
    await asyncio.wait_for(old.write(0, _block(1)), 10)
    reached, go = rb.hold("write")
    w = asyncio.ensure_future(old.write(4096, _block(2)))   # on A; B's waits
    await asyncio.wait_for(reached.wait(), 10)
    closing = asyncio.ensure_future(old.close())            # the LU unmapped
    await asyncio.sleep(0)                                  # one loop turn: close has begun
    assert old._closing is not None                         # noqa: SLF001
    new = Coordinator(old.engine, old.volume)               # mapped again (engine.open)
    new._is_ready = True                                    # noqa: SLF001 - no _open here

    async def no_refresh():
        pass
    new._refresh_extents = no_refresh                       # noqa: SLF001
    new.extents = dict(old.extents)
    await asyncio.wait_for(new.write(8192, _block(3)), 10)  # E+1: fences extent 0
    go.set()                                                # old's write: fenced on B, retakes
    await asyncio.wait_for(closing, 20)
    await asyncio.wait_for(w, 10)
    assert old.counters["fenced"] == 1
    assert [st.read("v", 0, 4096, 4096)[0] for st in (a, b)] == [_block(2)] * 2
    return old, new, a, b, new.epoch


async def test_a_remapped_lu_keeps_writing_after_the_old_coordinators_close_retook_it(
        stores, etcd_client, keys):  # noqa: F811
    """After ``_remapped``, the new coordinator still believes it owns at E+1 and writes on,
    at E+1 wherever E+2 did not reach (a server the old one's write never went to). The old
    coordinator's close must leave E+2 held: released (before), the meta would take a
    snapshot by itself (no live owner) under the new coordinator's writes at the old seq."""
    old, new, a, b, e_new = await _remapped(stores, etcd_client, keys)
    assert await _owner(etcd_client, keys) == (e_new + 1, False)   # left held
    await asyncio.wait_for(new.write(EXTENT_SIZE, _block(4)), 10)  # it writes on


async def test_a_snapshot_of_a_remapped_lu_runs_on_its_new_coordinator(
        stores, etcd_client, keys):  # noqa: F811
    """The owner record left held by the old coordinator (E+2) names this server, so the
    meta sends a snapshot to it as an op, which the new coordinator (E+1) runs: it takes the
    volume back first (E+3), or its fencing of every server at E+1 is refused where E+2
    reached and the snapshot fails, each time it is asked for, until a write of the new
    coordinator's happens to be fenced."""
    old, new, a, b, e_new = await _remapped(stores, etcd_client, keys)
    await etcd_client.put(keys.snapshot("s2"), Snapshot(snapshot_id="s2", name="s2", volume_id="v",
                                                        size=new.volume.size, state="creating").encode())
    op = VolumeOp(op_id="op2", volume_id="v", kind="snapshot", snapshot_id="s2", executor="me")
    await etcd_client.put(keys.volop("v", "op2"), op.encode())
    await asyncio.wait_for(new.run_volop(op), 20)
    got = VolumeOp.decode((await etcd_client.get(keys.volop("v", "op2"))).value)
    assert (got.state, got.error) == ("done", None)
    snap = Snapshot.decode((await etcd_client.get(keys.snapshot("s2"))).value)
    assert snap.state == "ready"
    assert new.epoch == e_new + 2
    assert await _owner(etcd_client, keys) == (e_new + 2, False)
    await asyncio.wait_for(new.write(4096, _block(5)), 10)        # the new one writes on


async def test_a_flush_taking_the_volume_back_during_close_leaves_it_held(
        stores, etcd_client, keys):  # noqa: F811
    """A flush in flight when the close begins finds the owner record moved (another server
    took the volume without writing to our replicas) and takes it back (``_take_back``)
    while the close drains a write: that epoch is left held, not released."""
    a, b = stores("A"), stores("B")
    for st in (a, b):
        st.create("v", 0, 1)
    rb = _Held("B", b)
    coord = await _volume(etcd_client, keys, {"A": rk.LocalReplica("A", a), "B": rb}, extents=1)
    await asyncio.wait_for(coord.write(0, _block(1)), 10)   # extent 0 unflushed
    mine = coord.epoch
    other, _, _ = await ownership.acquire(etcd_client, keys, "v", "other")  # fences nobody yet
    assert other == mine + 1
    flush_at_b, flush_go = rb.hold("flush")
    f = asyncio.ensure_future(coord.flush())
    await asyncio.wait_for(flush_at_b.wait(), 10)           # its first round waits at B
    write_at_b, write_go = rb.hold("write")
    w = asyncio.ensure_future(coord.write(4096, _block(2)))
    await asyncio.wait_for(write_at_b.wait(), 10)           # on A; B's waits: the drain waits
    closing = asyncio.ensure_future(coord.close())
    await asyncio.sleep(0)                                  # one loop turn: close has begun
    assert coord._closing is not None and not coord._closed  # noqa: SLF001
    flush_go.set()                                          # the round ends, the check: taken back
    await asyncio.wait_for(f, 10)
    assert coord.epoch == mine + 2
    write_go.set()                                          # fenced on B (mine + 2): repeated
    await asyncio.wait_for(closing, 20)
    assert w.done() and w.result() is None
    assert await _owner(etcd_client, keys) == (mine + 2, False)   # left held
    assert [st.read("v", 0, 4096, 4096)[0] for st in (a, b)] == [_block(2)] * 2


class _Lease:
    """The server's Registration as the coordinator reads it."""

    def __init__(self) -> None:
        self.lease_gen, self.lease_deadline, self.stopping = 0, time.monotonic() + 600, False


async def test_the_drain_is_bounded_and_a_write_left_behind_never_retakes(
        stores, etcd_client, keys, monkeypatch):  # noqa: F811
    """A write admitted before the close waits for this server's lease, which lapsed (etcd
    out of reach, not stopping): it can wait for ever, so ``close`` waits for it only
    ``CLOSE_DRAIN_WAIT``, then returns with ownership NOT released (the write may still go
    out at our seq: the meta must not take a snapshot by itself meanwhile; a new coordinator
    takes the volume over with a new epoch, which fences it). When the lease comes back the
    write does not take ownership again: NOT READY, nothing sent, nobody dropped."""
    monkeypatch.setattr(cm, "CLOSE_DRAIN_WAIT", 0.5, raising=False)
    coord, a, ra = await _b_lost_it(stores, etcd_client, keys)
    lease = coord.engine.lease = _Lease()
    mine = coord.epoch
    w = asyncio.ensure_future(coord.write(4096, _block(2)))
    await asyncio.wait_for(ra.landed.wait(), 10)
    lease.lease_deadline = 0.0                              # lapsed while it waits for B
    t0 = time.monotonic()
    await asyncio.wait_for(coord.close(), 20)
    assert time.monotonic() - t0 < 5
    assert not w.done()
    assert await _owner(etcd_client, keys) == (mine, False)
    sent = a.stat("v", 0)["mutations"]
    lease.lease_gen, lease.lease_deadline = 1, time.monotonic() + 600
    with pytest.raises(NotServing):
        await asyncio.wait_for(w, 10)
    assert await _owner(etcd_client, keys) == (mine, False)  # not taken again
    assert a.stat("v", 0)["mutations"] == sent
    assert _dropped(coord) == []
