"""The executor's half of volume ops (docs/storage.md, "Volume ops"): a real Coordinator's
``run_volop`` against a real etcd, over in-memory replicas that record what they are sent."""

from __future__ import annotations

import time

import pytest

from chunk.storage.coordinator import EXTENT_SIZE, Coordinator
from zstore.keys import Keys
from zstore.records import ExtentRecord, Snapshot, Volume, VolumeOp, VolumeOwner

from .test_coordinator import _MemEngine


class _Replica:
    def __init__(self, chunk_id: str) -> None:
        self.chunk_id, self.connected = chunk_id, True
        self.reverts: list[tuple] = []
        self.on_revert = None

    async def revert(self, vid, idx, epoch, to_seq, seq, sole=False):
        self.reverts.append((idx, epoch, to_seq, seq))
        if self.on_revert:
            self.on_revert(idx)

    async def fence(self, vid, idx, epoch):
        pass


class _Engine(_MemEngine):
    """test_coordinator's in-memory engine, over a real etcd."""

    def __init__(self, etcd, keys, reps) -> None:
        super().__init__(reps)
        self.etcd, self.keys = etcd, keys


class _Lease:
    def __init__(self) -> None:
        self.lease_deadline, self.lease_gen = time.monotonic() + 60, 1


@pytest.fixture
def keys(etcd_config):
    return Keys(etcd_config.prefix)


@pytest.fixture
async def setup(etcd_client, keys):
    """Volume v (two extents, snap_seq 3) with a ready snapshot s at seq 1, owned at epoch 4
    by this server before (a previous run of it)."""
    vol = Volume(volume_id="v", name="v", size=2 * EXTENT_SIZE, replicas=1, snap_seq=3)
    await etcd_client.put(keys.volume("v"), vol.encode())
    await etcd_client.put(keys.snapshot("s"), Snapshot(snapshot_id="s", name="s", volume_id="v",
                                                      size=vol.size, seq=1).encode())
    await etcd_client.put(keys.owner("v"), VolumeOwner(volume_id="v", chunk_id="me", epoch=4).encode())
    rep = _Replica("A")
    engine = _Engine(etcd_client, keys, {"A": rep})
    coord = Coordinator(engine, vol)
    coord._is_ready = True                                  # noqa: SLF001 - no _open here

    async def no_refresh():
        pass
    coord._refresh_extents = no_refresh                     # noqa: SLF001 - the map is set here
    for idx in (0, 1):
        coord.extents[idx] = ExtentRecord("v", idx, ["A"], 1, {})
    return coord, rep


async def _op(etcd, keys, **kw) -> VolumeOp:
    op = VolumeOp(**{"op_id": "op1", "volume_id": "v", "kind": "revert", "snapshot_id": "s",
                     "executor": "me", **kw})
    await etcd.put(keys.volop("v", "op1"), op.encode())
    return op


async def _stored(etcd, keys) -> VolumeOp:
    return VolumeOp.decode((await etcd.get(keys.volop("v", "op1"))).value)


async def test_a_revert_claimed_under_an_earlier_ownership_is_failed_not_resumed(setup, etcd_client, keys):
    """This server claimed the revert (epoch 4), then restarted: meanwhile the volume may
    have been served and written elsewhere, or by this server since. Resumed, the revert
    would roll those acknowledged writes back; it is failed as interrupted instead."""
    coord, rep = setup
    op = await _op(etcd_client, keys, state="running", claim_epoch=4)
    await coord.run_volop(op)
    got = await _stored(etcd_client, keys)
    assert got.state == "failed" and "interrupted" in got.error and "epoch 4, now 5" in got.error
    assert rep.reverts == []


async def test_a_claim_records_the_epoch_and_a_revert_resumes_under_the_same_one(setup, etcd_client, keys):
    coord, rep = setup
    op = await _op(etcd_client, keys)
    await coord.run_volop(op)
    got = await _stored(etcd_client, keys)
    assert (got.state, got.claim_epoch) == ("done", 5)
    assert rep.reverts == [(0, 5, 1, 3), (1, 5, 1, 3)]
    rep.reverts.clear()
    op = await _op(etcd_client, keys, state="running", claim_epoch=5)    # same ownership
    await coord.run_volop(op)
    assert (await _stored(etcd_client, keys)).state == "done" and len(rep.reverts) == 2


@pytest.mark.parametrize("lapse", ["new lease", "deadline passed"])
async def test_a_revert_stops_once_the_servers_lease_may_have_lapsed(setup, etcd_client, keys, lapse):
    """The revert writes at the seq read when ownership was taken. Once the lease may have
    lapsed, the meta may take a snapshot itself (raising the seq) and the remaining REVERTs
    would land inside it: the revert stops before the next extent and reports failed."""
    coord, rep = setup
    lease = coord.engine.lease = _Lease()

    def lapse_now(idx):
        if lapse == "new lease":
            lease.lease_gen += 1
        else:
            lease.lease_deadline = time.monotonic() - 1
    rep.on_revert = lapse_now
    op = await _op(etcd_client, keys)
    await coord.run_volop(op)
    got = await _stored(etcd_client, keys)
    assert got.state == "failed" and "lease" in got.error
    assert [r[0] for r in rep.reverts] == [0]                 # extent 1 never reverted


async def test_a_snapshot_commit_that_gives_up_reports_failed(setup, etcd_client, keys):
    """Every commit compare fails (a busy volume record): after its retries the op is
    reported failed with a reason, not done with the snapshot still "creating"."""
    coord, rep = setup
    await etcd_client.put(keys.snapshot("s"), Snapshot(snapshot_id="s", name="s", volume_id="v",
                                                      size=2 * EXTENT_SIZE, state="creating").encode())

    class BusyEtcd:
        def __getattr__(self, name):
            return getattr(etcd_client, name)

        async def transaction(self, compare, success, failure):
            if len(success) == 3:                             # the commit: volume, snapshot, op
                return False, []
            return await etcd_client.transaction(compare=compare, success=success, failure=failure)
    coord.engine.etcd = BusyEtcd()
    op = await _op(etcd_client, keys, kind="snapshot")
    await coord.run_volop(op)
    got = await _stored(etcd_client, keys)
    assert got.state == "failed" and "gave up" in got.error
    snap = Snapshot.decode((await etcd_client.get(keys.snapshot("s"))).value)
    assert snap.state == "creating"


async def test_a_snapshot_commit_records_the_volumes_size_at_the_barrier(setup, etcd_client, keys):
    """The volume was expanded while the snapshot waited for its barrier: the snapshot
    takes the size of the volume it commits against (compared unchanged in the same txn),
    not the size it was created with, so a clone or restore of it is not cut short."""
    coord, rep = setup
    await etcd_client.put(keys.snapshot("s"), Snapshot(snapshot_id="s", name="s", volume_id="v",
                                                      size=EXTENT_SIZE, state="creating").encode())
    op = await _op(etcd_client, keys, kind="snapshot")
    await coord.run_volop(op)
    assert (await _stored(etcd_client, keys)).state == "done"
    snap = Snapshot.decode((await etcd_client.get(keys.snapshot("s"))).value)
    vol = Volume.decode((await etcd_client.get(keys.volume("v"))).value)
    assert (snap.state, snap.seq, vol.snap_seq) == ("ready", 3, 4)
    assert snap.size == vol.size == 2 * EXTENT_SIZE
