"""etcd unreachable on the general write path: the write fails with an error the SCSI side
answers (``chunk.scsi.unit._ANSWERED``), never with a raw etcd exception, which the
transport answers as INTERNAL TARGET FAILURE (a target bug to the host).

A real Coordinator over real (local) ReplicaStores and the test etcd (the harness of
``test_revert_safety``); "unreachable" is a real etcd client whose endpoint nobody listens
on, and the drop goes through the real MetaClient over it."""

from __future__ import annotations

import asyncio

import pytest

from chunk.blockdev import MediumError
from chunk.scsi.sense import NOT_READY
from chunk.scsi.unit import _ANSWERED
from chunk.storage import replicas as rk
from chunk.storage.coordinator import NotServing
from chunk.storage.metaclient import MetaClient
from tests.cluster import free_port
from zstore import etcd as zetcd
from zstore.config import EtcdConfig
from zstore.records import VolumeOwner

from .test_revert_safety import _block, _volume, keys, stores  # noqa: F401

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def dead_etcd():
    """An etcd client whose endpoint nobody listens on (etcd down or partitioned away)."""
    c = zetcd.client(EtcdConfig(endpoints=[f"http://127.0.0.1:{free_port()}"], prefix="/x",
                                timeout=1.0))
    yield c
    await c.close()


async def _two_replica_volume(stores, etcd_client, keys):  # noqa: F811
    a, b = stores("A"), stores("B")
    for st in (a, b):
        st.create("v", 0, 1)
    coord = await _volume(etcd_client, keys, {"A": rk.LocalReplica("A", a),
                                              "B": rk.LocalReplica("B", b)}, extents=1)
    await asyncio.wait_for(coord.write(0, _block(1)), 10)      # owner (real etcd), in service
    return coord, a, b


async def test_a_write_fenced_while_etcd_is_unreachable_is_not_ready(stores, etcd_client, keys,  # noqa: F811
                                                                   dead_etcd):
    """Another server took the volume over (epoch + 1, admitted on both replicas), and etcd
    is then out of reach. The write is fenced; taking the volume back reads etcd, which
    raised ConnectionFailedError straight out of the write: INTERNAL TARGET FAILURE. Nothing
    failed on the replicas: NOT READY (04/01), which the host retries, as a SYNCHRONIZE
    CACHE that cannot read the owner record answers; nothing written, nobody dropped."""
    coord, a, b = await _two_replica_volume(stores, etcd_client, keys)
    mine = coord.epoch
    await etcd_client.put(keys.owner("v"), VolumeOwner(volume_id="v", chunk_id="other",
                                                       epoch=mine + 1).encode())
    for st in (a, b):
        st.admit("v", 0, mine + 1)                  # the new owner's first request landed
    coord.engine.etcd = dead_etcd
    with pytest.raises(_ANSWERED) as got:
        await asyncio.wait_for(coord.write(0, _block(2)), 30)
    assert isinstance(got.value, NotServing)
    assert (got.value.key, got.value.asc, got.value.ascq) == (NOT_READY, 0x04, 0x01)
    assert coord.engine.meta.calls == []            # a fence drops nobody
    assert [st.read("v", 0, 0, 4096)[0] for st in (a, b)] == [_block(1)] * 2
    assert coord.epoch == mine                      # still the old one: the next I/O retakes


async def test_a_first_write_while_etcd_is_unreachable_is_not_ready(stores, etcd_client, keys,  # noqa: F811
                                                                  dead_etcd):
    """A volume's first write takes ownership in etcd; with etcd out of reach that raised
    ConnectionFailedError (INTERNAL TARGET FAILURE) instead of NOT READY."""
    a, b = stores("A"), stores("B")
    coord = await _volume(etcd_client, keys, {"A": rk.LocalReplica("A", a),
                                              "B": rk.LocalReplica("B", b)}, extents=1)
    coord.engine.etcd = dead_etcd
    with pytest.raises(_ANSWERED) as got:
        await asyncio.wait_for(coord.write(0, _block(2)), 30)
    assert isinstance(got.value, NotServing)
    assert coord.epoch == 0


async def test_a_replica_failing_while_etcd_is_unreachable_fails_the_write_as_a_medium_error(
        stores, etcd_client, keys, dead_etcd):  # noqa: F811
    """B lost the extent (NO_EXTENT) and must be dropped through the meta; the MetaClient
    finds the meta leader in etcd, out of reach: ConnectionFailedError came straight out of
    the write (INTERNAL TARGET FAILURE). The drop could not be made, so the write fails as
    one whose failed replica cannot be dropped does (MEDIUM ERROR), B still in sync and
    the write not acknowledged."""
    coord, a, b = await _two_replica_volume(stores, etcd_client, keys)
    meta = coord.engine.meta = MetaClient(dead_etcd, keys, None, retry_for=1.0)
    try:
        b.delete("v", 0)
        with pytest.raises(_ANSWERED) as got:
            await asyncio.wait_for(coord.write(0, _block(2)), 30)
        assert type(got.value) is MediumError
        assert "cannot drop failed replica B" in str(got.value)
        assert sorted(coord.extents[0].replicas) == ["A", "B"]
        assert coord.counters["drops"] == 0
    finally:
        await meta.close()


async def test_a_write_that_must_look_a_peer_up_while_etcd_is_unreachable_is_not_ready(
        stores, etcd_client, keys, dead_etcd):  # noqa: F811
    """A peer that failed is forgotten (``forget_peer``), and the next write looks its
    address up in etcd again (``Peers.address``, as the engine does): with etcd out of
    reach that raised ConnectionFailedError straight out of the write (INTERNAL TARGET
    FAILURE), for every write to the extent. Nothing was sent: NOT READY, retried."""
    from chunk.storage.peers import Peers

    a = stores("A")
    a.create("v", 0, 1)
    local = rk.LocalReplica("A", a)
    coord = await _volume(etcd_client, keys, {"A": local}, extents=1)
    coord.extents[0].replicas = ["A", "B"]
    peers = Peers(dead_etcd, keys)

    async def replica(chunk_id):                    # the engine's, B forgotten (not cached)
        if chunk_id == "A":
            return local
        return rk.RemoteReplica(chunk_id, await peers.address(chunk_id), None)
    coord.engine.replica = replica
    coord.engine.cached_replicas = lambda chunk_ids: None
    await coord.ensure_owner()                      # owned before etcd went away
    before = a.stat("v", 0)["mutations"]
    with pytest.raises(_ANSWERED) as got:
        await asyncio.wait_for(coord.write(0, _block(2)), 30)
    assert isinstance(got.value, NotServing)
    assert a.stat("v", 0)["mutations"] == before    # nothing sent
    assert coord.engine.meta.calls == []


async def test_a_volumes_first_io_while_etcd_is_unreachable_is_not_ready_in_bounded_time(
        stores, etcd_client, keys, dead_etcd, monkeypatch):  # noqa: F811
    """A volume's first I/O lists its extent map in etcd (``_open``), which the watch retries
    for ever while etcd is out of reach: the I/O waited with it, for ever (no answer to the
    host, not even to a read). It now fails NOT READY after ``OPEN_WAIT``, the open going on
    (a later I/O finds it done once etcd is back), and so does the next I/O."""
    from chunk.storage import coordinator as cm

    monkeypatch.setattr(cm, "OPEN_WAIT", 0.5, raising=False)
    a = stores("A")
    a.create("v", 0, 1)
    coord = await _volume(etcd_client, keys, {"A": rk.LocalReplica("A", a)}, extents=1)
    coord._is_ready = False                                     # noqa: SLF001 - as opened
    coord.extents.clear()
    coord.engine.started = asyncio.Event()
    coord.engine.started.set()
    coord.engine.etcd = dead_etcd
    loop = asyncio.get_running_loop()
    try:
        for io in (lambda: coord.read(0, 4096), lambda: coord.write(0, _block(2))):
            t0 = loop.time()
            with pytest.raises(_ANSWERED) as got:
                await asyncio.wait_for(io(), 10)
            assert isinstance(got.value, NotServing)
            assert loop.time() - t0 < 5
            assert not coord._ready_task.done()                 # noqa: SLF001 - still opening
        assert a.stat("v", 0)["mutations"] == 0                 # nothing written
    finally:
        await asyncio.wait_for(coord.close(), 10)
    assert coord._ready_task.cancelled()                        # noqa: SLF001 - not left behind
