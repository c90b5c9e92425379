"""A volume closed (LU unmapped, chunk server stopping) with a write still retrying on the
general path: once ``close`` has released ownership in etcd, the meta may take a snapshot by
itself (no live owner) at the seq the write goes out at, and a later attempt would land
inside it. No attempt is sent after the release; the write fails NOT READY (the host retries
elsewhere), never acknowledged.

A real Coordinator over real (local) ReplicaStores and the test etcd (the harness of
``test_revert_safety``); B lost the extent (deleted), so the write waits for it and repeats
its attempt (``_await_creation``) while the volume closes."""

from __future__ import annotations

import asyncio
import time

import pytest

from chunk.storage import coordinator as cm
from chunk.storage import replicas as rk
from chunk.storage.coordinator import NotServing
from zstore.records import VolumeOwner

from .test_revert_safety import _block, _volume, keys, stores  # noqa: F401

pytestmark = pytest.mark.timeout(60)


async def _until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.001)


async def _retrying_volume(stores, etcd_client, keys):  # noqa: F811
    a, b = stores("A"), stores("B")
    for st in (a, b):
        st.create("v", 0, 1)
    reps = {"A": rk.LocalReplica("A", a), "B": rk.LocalReplica("B", b)}
    coord = await _volume(etcd_client, keys, reps, extents=1)
    await asyncio.wait_for(coord.write(0, _block(1)), 10)      # owner, in service
    b.delete("v", 0)                                            # B lost the extent
    return coord, a, reps


async def _close_while_retrying(coord, a, etcd_client, keys, write: asyncio.Future):  # noqa: F811
    """Close once the write's first attempt landed on A; A's mutation count then."""
    before = a.stat("v", 0)["mutations"]
    await _until(lambda: a.stat("v", 0)["mutations"] > before)     # attempt 1 landed on A
    assert not write.done()                                         # and it waits for B
    await asyncio.wait_for(coord.close(), 10)
    assert VolumeOwner.decode((await etcd_client.get(keys.owner("v"))).value).released
    return a.stat("v", 0)["mutations"]


async def test_a_general_path_write_sends_nothing_after_close_released_ownership(
        stores, etcd_client, keys):  # noqa: F811
    coord, a, _ = await _retrying_volume(stores, etcd_client, keys)
    w = asyncio.ensure_future(coord.write(4096, _block(2)))
    released = await _close_while_retrying(coord, a, etcd_client, keys, w)
    with pytest.raises(NotServing):
        await asyncio.wait_for(w, 10)
    assert a.stat("v", 0)["mutations"] == released         # no attempt after the release
    assert coord.engine.meta.calls == []                   # and B not dropped for it


async def test_a_fast_write_handed_off_sends_nothing_after_close_released_ownership(
        stores, etcd_client, keys):  # noqa: F811
    """The fast path's handoff (``_write_recover``) is a task of the coordinator's own: no
    session's end cancels it, so it is the write that outlives a stop."""
    coord, a, reps = await _retrying_volume(stores, etcd_client, keys)
    assert coord._gate.try_enter()                              # noqa: SLF001 - as write_nowait
    token = coord._locks.try_begin(0, 4096, 8192)               # noqa: SLF001
    done = asyncio.get_running_loop().create_future()
    data = memoryview(_block(2))
    targets = [reps["A"], reps["B"]]
    p = cm._PendingWrite(coord, done, 0, 4096, 4096, data, coord.extents[0], targets,  # noqa: SLF001
                         coord.epoch, coord.seq, token)
    for k, r in enumerate(targets):                             # the fast attempt, as sent
        try:
            await r.write("v", 0, 4096, data, coord.epoch, coord.seq)
        except rk.ReplicaFailed as e:
            p.outcomes[k] = e
    assert p.outcomes[1].kind == rk.NO_EXTENT
    coord._write_settled(p)                                     # noqa: SLF001 - handed off
    released = await _close_while_retrying(coord, a, etcd_client, keys, done)
    with pytest.raises(NotServing):
        await asyncio.wait_for(done, 10)
    assert a.stat("v", 0)["mutations"] == released
    assert coord.engine.meta.calls == []


async def test_a_write_fenced_while_its_volume_closes_does_not_take_ownership_back(
        stores, etcd_client, keys):  # noqa: F811
    """The write was fenced by another server and waits for the owner lock to take the volume
    back (``_retake``) while the volume closes: taking it back after ``close`` released it
    raised the owner record's epoch again (fencing the server that took it over, for
    nothing) and marked it unreleased under this closed coordinator. The write fails NOT
    READY and the record stays as ``close`` left it."""
    a, b = stores("A"), stores("B")
    for st in (a, b):
        st.create("v", 0, 1)
    coord = await _volume(etcd_client, keys, {"A": rk.LocalReplica("A", a),
                                              "B": rk.LocalReplica("B", b)}, extents=1)
    await asyncio.wait_for(coord.write(0, _block(1)), 10)      # owner, in service
    mine = coord.epoch
    for st in (a, b):
        st.admit("v", 0, mine + 1)                             # another server fenced us
    await coord._owner_lock.acquire()                           # noqa: SLF001 - hold the retake
    try:
        w = asyncio.ensure_future(coord.write(0, _block(2)))
        await _until(lambda: coord.counters["fenced"] == 1)     # fenced, waiting to retake
        await asyncio.wait_for(coord.close(), 10)
    finally:
        coord._owner_lock.release()                             # noqa: SLF001
    with pytest.raises(NotServing):
        await asyncio.wait_for(w, 10)
    owner = VolumeOwner.decode((await etcd_client.get(keys.owner("v"))).value)
    assert (owner.epoch, owner.released) == (mine, True)
