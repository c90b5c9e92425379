"""Failures around allocation, SYNCHRONIZE CACHE and COMPARE AND WRITE that must not break
an extent or acknowledge less than promised.

A real Coordinator over real (local) ReplicaStores, the meta a stand-in that refuses to
drop an extent's last in-sync replica (the harness of ``test_revert_safety``)."""

from __future__ import annotations

import asyncio
import time

import pytest

from chunk.storage import coordinator as coordinator_mod
from chunk.storage import replicas as rk
from chunk.storage.coordinator import EXTENT_SIZE, Coordinator, NotServing
from chunk.blockdev import MediumError
from zstore.records import ExtentRecord

from .test_revert_safety import _block, _Engine, _Meta, _volume, keys, stores  # noqa: F401


class _AllocMeta(_Meta):
    """``_Meta`` that also allocates: ``POST /extents/v/<idx>`` answers a generation-1
    record on every replica."""

    def __init__(self, coord: Coordinator, chunk_ids) -> None:
        super().__init__(coord)
        self.chunk_ids = sorted(chunk_ids)

    async def call(self, method, path, body):
        parts = path.strip("/").split("/")
        if len(parts) == 3 and parts[0] == "extents":
            self.calls.append((method, path, body))
            return {"extent": ExtentRecord("v", int(parts[2]), list(self.chunk_ids), 1, {}).to_dict()}
        return await super().call(method, path, body)


def _two(stores):
    a, b = stores("A"), stores("B")
    a.create("v", 0, 1)
    b.create("v", 0, 1)
    return a, b, {"A": rk.LocalReplica("A", a), "B": rk.LocalReplica("B", b)}


# -- 1. SYNCHRONIZE CACHE over an extent allocated, never created -------------------------


async def test_flush_leaves_an_allocated_never_created_extent_usable(stores, etcd_client, keys):
    """Extent 1 is mapped (generation 1) but no replica has it. A fresh owner (foreign
    acquire) has every extent to flush: NO_EXTENT there means nothing to flush, not a
    replica to drop (a drop raises the generation and the extent is unusable for good)."""
    _a, _b, reps = _two(stores)
    coord = await _volume(etcd_client, keys, reps)
    await coord.ensure_owner()
    assert 1 in coord._unflushed                            # noqa: SLF001
    await coord.flush()
    assert coord.engine.meta.calls == []
    rec = coord.extents[1]
    assert (sorted(rec.replicas), rec.generation, rec.stale) == (["A", "B"], 1, {})
    await coord.write(EXTENT_SIZE, _block(7))
    assert await coord.read(EXTENT_SIZE, 4096) == _block(7)
    await coord.flush()                                     # and SYNC CACHE works again


# -- 2. an allocation whose CREATE failed everywhere ---------------------------------------


async def test_an_allocation_no_replica_created_is_retried_not_broken(stores, etcd_client, keys):
    """Every CREATE of a new extent fails (peers unreachable): nothing has the extent, so
    nobody is dropped for it; the write fails, and once the replicas are back the next
    write creates it (before, all but one replica were dropped, generation 2, and the
    extent answered MEDIUM ERROR "no in-sync replica has it" for good)."""
    _a, _b, reps = _two(stores)
    coord = await _volume(etcd_client, keys, reps, extents=2)
    del coord.extents[1]
    coord.engine.meta = _AllocMeta(coord, reps)
    down = {"A": 1, "B": 1}
    for cid, r in reps.items():
        real = r.create

        async def create(vid, idx, epoch, generation, discard_broken=False, cid=cid, real=real):
            if down[cid]:
                down[cid] -= 1
                raise rk.ReplicaFailed(cid, rk.UNAVAILABLE, "injected")
            return await real(vid, idx, epoch, generation, discard_broken)
        r.create = create
    with pytest.raises(NotServing):                         # NOT READY: the host retries
        await coord.write(EXTENT_SIZE, _block(5))
    assert not [c for c in coord.engine.meta.calls if c[1].endswith("/drop")]
    await coord.write(EXTENT_SIZE, _block(6))
    assert await coord.read(EXTENT_SIZE, 4096) == _block(6)
    rec = coord.extents[1]
    assert (sorted(rec.replicas), rec.generation, rec.stale) == (["A", "B"], 1, {})


# -- 3. SYNCHRONIZE CACHE on a deposed owner ------------------------------------------------


async def _new_owner_writes_extent_1(s1: Coordinator, etcd_client, keys, reps) -> list:
    """S2 takes S1's volume over and writes extent 1 (acknowledged, not flushed); then every
    replica's FLUSH is recorded, as (chunk id, extent), in the list returned."""
    s2 = Coordinator(_Engine(etcd_client, keys, reps), s1.volume)
    s2._is_ready = True                                     # noqa: SLF001
    s2.engine.meta = _Meta(s2)

    async def no_refresh():
        pass
    s2._refresh_extents = no_refresh                        # noqa: SLF001
    for idx in range(2):
        s2.extents[idx] = ExtentRecord("v", idx, ["A", "B"], 1, {})
    await s2.write(EXTENT_SIZE, _block(2))
    flushed = []
    for cid, r in reps.items():
        real = r.flush

        async def flush(vid, idx, epoch, cid=cid, real=real):
            await real(vid, idx, epoch)
            flushed.append((cid, idx))
        r.flush = flush
    return flushed


async def test_flush_on_a_deposed_owner_flushes_the_new_owners_writes(stores, etcd_client, keys):
    """Multipath over two chunk servers: S2 takes the volume over and writes extent 1
    (acknowledged); a SYNCHRONIZE CACHE through S1 must make it durable too, not answer
    GOOD after flushing only what S1 wrote."""
    _a, _b, reps = _two(stores)
    for st in (_a, _b):
        st.create("v", 1, 1)
    s1 = await _volume(etcd_client, keys, reps)
    await s1.ensure_owner()
    await s1.flush()                                        # S1's own start: nothing pending
    await s1.write(0, _block(1))
    flushed = await _new_owner_writes_extent_1(s1, etcd_client, keys, reps)
    await s1.flush()
    assert ("A", 1) in flushed and ("B", 1) in flushed, flushed


async def test_flush_on_an_idle_deposed_owner_flushes_the_new_owners_writes(stores, etcd_client, keys):
    """As above, but S1 has nothing of its own left to flush: its SYNCHRONIZE CACHE sends
    nothing to any replica, so no replica can fence it and tell it S2 owns the volume now.
    It must still not answer GOOD before S2's acknowledged write is durable."""
    _a, _b, reps = _two(stores)
    for st in (_a, _b):
        st.create("v", 1, 1)
    s1 = await _volume(etcd_client, keys, reps)
    await s1.write(0, _block(1))
    await s1.flush()                                        # S1 idle from here on
    flushed = await _new_owner_writes_extent_1(s1, etcd_client, keys, reps)
    await s1.flush()
    assert ("A", 1) in flushed and ("B", 1) in flushed, flushed


# -- 4. COMPARE AND WRITE and min_write_replicas -------------------------------------------


async def test_compare_and_write_is_not_acknowledged_below_min_write_replicas(stores, etcd_client, keys):
    """A replica dropped (by a concurrent write) between the compare and the write: the CAW
    lands on one replica only, and with min_write_replicas 2 must not answer GOOD."""
    _a, _b, reps = _two(stores)
    coord = await _volume(etcd_client, keys, reps)
    coord.engine.min_write_replicas = 2
    await coord.write(0, _block(3))
    real = coord._caw_read                                  # noqa: SLF001

    async def read_then_drop(parts, epoch):
        got = await real(parts, epoch)
        await coord._drop(0, "B", "unavailable: t")        # noqa: SLF001
        return got
    coord._caw_read = read_then_drop                        # noqa: SLF001
    with pytest.raises(MediumError):
        await coord.compare_and_write(0, _block(3), _block(4))


# -- 5. reads and this server's etcd lease ---------------------------------------------


class _Lease:
    def __init__(self) -> None:
        self.lease_gen, self.lease_deadline, self.stopping = 1, time.monotonic() + 60, False


@pytest.mark.parametrize("local", [False, True], ids=["replicas", "local-fast-path"])
async def test_a_read_after_this_servers_lease_lapsed_is_not_ready(stores, etcd_client, keys, local,
                                                                   monkeypatch):
    """Cut off from etcd (its lease lapsed), this server may have been deposed and its
    replica dropped and overwritten elsewhere: it must not go on serving what it has (old
    data) but answer NOT READY, so the host retries through a server that holds a lease."""
    monkeypatch.setattr(coordinator_mod, "READ_LEASE_WAIT", 0.3)
    a, _b, reps = _two(stores)
    coord = await _volume(etcd_client, keys, reps)
    coord.engine.lease = lease = _Lease()
    if local:
        coord.engine.local_store_for = lambda rec: a
    await coord.write(0, _block(8))
    assert await coord.read(0, 4096) == _block(8)
    lease.lease_deadline = time.monotonic() - 1
    with pytest.raises(NotServing):
        await coord.read(0, 4096)
    lease.lease_deadline = time.monotonic() + 60            # a lease again: reads served
    assert await coord.read(0, 4096) == _block(8)


async def test_a_read_waits_a_little_for_a_late_keepalive(stores, etcd_client, keys, monkeypatch):
    """A lease that lapsed only because a keepalive was late (a busy box, an etcd leader
    change) comes back within moments: a read then waits for it, as a write does, instead of
    failing NOT READY at once (an initiator such as qemu fails the I/O on NOT READY)."""
    monkeypatch.setattr(coordinator_mod, "READ_LEASE_WAIT", 10.0)
    _a, _b, reps = _two(stores)
    coord = await _volume(etcd_client, keys, reps)
    coord.engine.lease = lease = _Lease()
    await coord.write(0, _block(9))
    lease.lease_deadline = time.monotonic() - 1
    read = asyncio.ensure_future(coord.read(0, 4096))
    await asyncio.sleep(0.3)
    assert not read.done()                                   # waiting for the lease
    lease.lease_deadline = time.monotonic() + 60
    assert await asyncio.wait_for(read, 5) == _block(9)


async def test_a_read_on_a_stopping_server_is_not_ready_at_once(stores, etcd_client, keys, monkeypatch):
    monkeypatch.setattr(coordinator_mod, "READ_LEASE_WAIT", 10.0)
    _a, _b, reps = _two(stores)
    coord = await _volume(etcd_client, keys, reps)
    coord.engine.lease = lease = _Lease()
    await coord.write(0, _block(3))
    lease.lease_deadline, lease.stopping = 0.0, True
    t0 = time.monotonic()
    with pytest.raises(NotServing):
        await coord.read(0, 4096)
    assert time.monotonic() - t0 < 2
