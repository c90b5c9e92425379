"""The join of a recovered replica whose reply is lost: the meta committed it (the target is
in sync at generation + 1 in etcd), and MetaClient's retry of the call is answered 409
"already in sync" (or the meta stays unreachable until the call gives up).

Before, the coordinator took that as a refusal: it released its hold of the extent and
dropped the target from ``_sync`` with its old extent record still cached; until its extent
watch delivered the new one, writes (the fast path too) went to the old replicas only while
etcd listed the target in sync: acknowledged writes missing on an in-sync replica.

Harness of test_recovery_unreadable (real ReplicaStores, peers through ReplicaServers on
loopback), with the session's real etcd for the extent records. The coordinator has no
extent watch here (it is made ready by hand): the watch lagging behind for the whole test."""

from __future__ import annotations

import pytest

from chunk.storage.coordinator import MediumError
from chunk.storage.extent_file import BLOCK_SIZE
from chunk.storage.metaclient import MetaError
from zstore.keys import Keys
from zstore.records import ExtentRecord, RecoveryTask

from .test_recovery_unreadable import VID, _coordinator, _populate, cluster  # noqa: F401 - fixture

pytestmark = pytest.mark.timeout(120)


class _LostReplyMeta:
    """The meta leader's join, committed to etcd; the caller then sees ``error`` instead of
    the reply (``commit=False``: a real refusal, nothing committed)."""

    def __init__(self, etcd, keys: Keys, error: MetaError, commit: bool = True) -> None:
        self.etcd, self.keys, self.error, self.commit = etcd, keys, error, commit
        self.joins = 0

    async def call(self, method, path, body):
        assert method == "POST" and path.endswith("/join")
        self.joins += 1
        idx = int(path.split("/")[3])
        key = self.keys.extent(VID, idx)
        rec = ExtentRecord.decode((await self.etcd.get(key)).value)
        assert body["generation"] == rec.generation
        if self.commit:
            new = ExtentRecord(VID, idx, [*rec.replicas, body["chunk_id"]], rec.generation + 1, {})
            await self.etcd.put(key, new.encode())
        raise self.error


def _cached_replicas(engine):
    def cached_replicas(chunk_ids):
        return [engine.reps[c] for c in chunk_ids]
    return cached_replicas


async def _setup(cluster, etcd_client, etcd_config, error, commit=True):  # noqa: F811
    stores, engine = cluster
    keys = Keys(etcd_config.prefix)
    engine.etcd, engine.keys = etcd_client, keys
    engine.cached_replicas = _cached_replicas(engine)
    _populate(stores, "AB")
    await etcd_client.put(keys.extent(VID, 0), ExtentRecord(VID, 0, ["A", "B"], 3, {}).encode())
    coord = _coordinator(engine, ["A", "B"])
    meta = engine.meta = _LostReplyMeta(etcd_client, keys, error, commit)
    return stores, coord, meta


LOST = {
    "409 on the retry": MetaError(409, "chunk C is already in sync for extent 0"),
    "meta unreachable": MetaError(503, "meta unreachable for 15s: ServerDisconnectedError"),
}


@pytest.mark.parametrize("how", list(LOST))
async def test_a_join_committed_with_its_reply_lost_is_adopted_before_any_write(
        how, cluster, etcd_client, etcd_config):  # noqa: F811
    stores, coord, meta = await _setup(cluster, etcd_client, etcd_config, LOST[how])
    failed = None
    try:
        await coord.run_recovery(RecoveryTask(VID, 0, "C", "rebuild", "A", 3), 1, 0)
    except MediumError as e:
        failed = e
    assert meta.joins == 1
    rec = coord.extents[0]
    assert (rec.replicas, rec.generation) == (["A", "B", "C"], 4), \
        f"the coordinator kept the record from before the committed join ({failed})"
    assert failed is None, "a join etcd shows committed was reported as failed"
    assert 0 not in coord._sync                                      # noqa: SLF001

    # The next writes, general path and fast path, reach the joined target too.
    first, second = b"\x5a" * BLOCK_SIZE, b"\xa5" * BLOCK_SIZE
    await coord.write(0, first)
    fut = coord.write_nowait(2 * BLOCK_SIZE, second)
    assert fut is not None, "the fast path should take this write"
    await fut
    for cid in "ABC":
        assert stores[cid].read(VID, 0, 0, BLOCK_SIZE)[0] == first, cid
        assert stores[cid].read(VID, 0, 2 * BLOCK_SIZE, BLOCK_SIZE)[0] == second, cid


async def test_a_join_really_refused_still_fails_and_writes_skip_the_target(
        cluster, etcd_client, etcd_config):  # noqa: F811
    """Nothing committed (the meta refused the join): the recovery fails as before, the
    coordinator's record stays without the target, and writes do not wait on it."""
    stores, coord, meta = await _setup(
        cluster, etcd_client, etcd_config,
        MetaError(409, "generation 3 is not current"), commit=False)
    with pytest.raises(MediumError, match="refused"):
        await coord.run_recovery(RecoveryTask(VID, 0, "C", "rebuild", "A", 3), 1, 0)
    assert coord.extents[0].replicas == ["A", "B"] and coord.extents[0].generation == 3
    assert 0 not in coord._sync                                      # noqa: SLF001
    data = b"\x3c" * BLOCK_SIZE
    await coord.write(0, data)
    for cid in "AB":
        assert stores[cid].read(VID, 0, 0, BLOCK_SIZE)[0] == data, cid
