"""A fast-path write longer than one frame, fenced part-way, with a snapshot committed by the
new owner before it is repeated: the snapshot holds the frames that landed, per replica.

The fast path kept one outcome per replica: a remote replica that took the first frame and
was fenced on the second counted as "missed" for the whole write, and ``_write_recover``
repeated the first frame with that outcome. With every replica fenced on some frame,
``_split_by_snapshot`` saw nobody that took it and dropped nobody: the replica that took
the first frame holds it inside the snapshot, the others do not, and both stay in sync (the
snapshot reads differently depending on the replica). Each frame now carries its own
outcomes, so the split sees who took which frame.

A real Coordinator (harness of ``test_revert_safety``) over a local ReplicaStore (A) and a
real ReplicaServer on loopback (B); the other server's fence is B's store admitting the new
epoch between the two frames (its request arriving between them), and its ownership and
snapshot are the owner and volume records in the test etcd, as it would leave them."""

from __future__ import annotations

import asyncio

import pytest

from chunk.storage import replicas as rk
from chunk.storage.peer_auth import load_or_create_secret
from chunk.storage.replica_client import ReplicaClient
from chunk.storage.replica_server import ReplicaServer
from chunk.storage.wire import MAX_DATA
from zstore.records import Volume, VolumeOwner

from .test_revert_safety import CLUSTER, NOW, _volume, keys, stores  # noqa: F401

pytestmark = pytest.mark.timeout(60)


def _fenced_between_frames(store, vid: str, epoch: int) -> None:
    """``store`` admits ``epoch`` + 1 (another owner's request) right before the write frame
    at offset MAX_DATA sent at ``epoch``: the first frame lands, the second is fenced."""
    real = store.admit_write

    def admit_write(v, idx, e, off, data, seq, sole=False):
        if v == vid and e == epoch and off == MAX_DATA:
            store.admit(v, idx, epoch + 1)
        return real(v, idx, e, off, data, seq, sole)
    store.admit_write = admit_write


async def _other_server_snapshots(etcd, keys, epoch: int) -> None:  # noqa: F811
    """Another server owns the volume at ``epoch`` + 1 and committed a snapshot at NOW."""
    await etcd.put(keys.owner("v"), VolumeOwner(volume_id="v", chunk_id="other",
                                               epoch=epoch + 1).encode())
    vol = Volume.decode((await etcd.get(keys.volume("v"))).value)
    vol.snap_seq = NOW + 1
    await etcd.put(keys.volume("v"), vol.encode())


async def test_a_fast_write_fenced_between_frames_leaves_the_snapshot_alike_on_replicas_in_sync(
        stores, etcd_client, keys):  # noqa: F811
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
        old, new = b"\x01" * (2 * MAX_DATA), b"\x02" * (2 * MAX_DATA)
        await asyncio.wait_for(coord.write(0, old), 10)        # owner, at seq NOW
        mine = coord.epoch
        await reps["B"].connect()
        # The other server fenced A, then B between our two frames, then snapshotted.
        a.admit("v", 0, mine + 1)
        _fenced_between_frames(b, "v", mine)
        await _other_server_snapshots(etcd_client, keys, mine)
        fut = coord.write_nowait(0, new)
        assert fut is not None                                  # the fast path took it
        await asyncio.wait_for(fut, 30)
        stores_of = {"A": a, "B": b}
        insync = coord.extents[0].replicas
        assert coord.seq == NOW + 1
        snapshot = {c: stores_of[c].read("v", 0, 0, 4096, NOW)[0] for c in insync}
        assert len(set(snapshot.values())) == 1, \
            f"the snapshot differs: { {c: d[:1] for c, d in snapshot.items()} }"
        live = {c: stores_of[c].read("v", 0, 0, 2 * MAX_DATA)[0] for c in insync}
        assert set(live.values()) == {new}                      # acknowledged everywhere kept
    finally:
        await client.close()
        await server.stop()
