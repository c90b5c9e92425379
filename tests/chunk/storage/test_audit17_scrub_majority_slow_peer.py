"""A majority never drops a healthy replica that is only behind a slow disk.

Three replicas, all the same. C's disk syncs slowly, so each copy-on-write keeps C half-way
through it (a state no replica keeps) for a few hundred milliseconds while A and B are long
done. The digest comparison looked at A's own writes only (inconclusive if A was written
meanwhile): C's half-done state differed twice, A and B agreed, and the majority dropped C
for a full resync, again and again on a busy volume. The tie check already waits for both
replicas at rest (``_peer_same``); the majority's drop now does too.

Real stores (cow_sync), replica servers and etcd; the slow syncs and the copy-on-write
workload are test_scrub_tie_slow_peer's.
"""

from __future__ import annotations

import time

import pytest

from chunk.storage.peer_auth import load_or_create_secret
from chunk.storage.replica_client import ReplicaClient
from chunk.storage.scrubber import Scrubber
from zstore.records import ExtentRecord

from .replica_nodes import CLUSTER, PeriodicWrites, block
from .test_scrub_busy_tie import VID, _fill, _seq_rotted_on_disk
from .test_scrub_tie_slow_peer import PERIOD, RATE, SLOW, _cow_step, _slow_syncs
from .test_scrubber import meta_drop, record

pytestmark = pytest.mark.timeout(180)

PASSES = 8


async def test_a_replica_behind_a_slow_disk_is_not_dropped_by_the_majority(nodes, etcd_client,
                                                                          monkeypatch):
    a, b, c = [await nodes.add(cid, cow_sync=True) for cid in ("A", "B", "C")]
    await nodes.extent(VID, 0, ["A", "B", "C"], {})
    for n in (a, b, c):
        _fill(n.store)
    assert a.store.digest(VID, 0) == b.store.digest(VID, 0) == c.store.digest(VID, 0)
    slowed = _slow_syncs(monkeypatch, nodes.tmp / "C")
    drop, calls = meta_drop(etcd_client, nodes.keys)
    scrub = Scrubber(a.store, a.repair, rate_bytes_per_s=RATE, interval=3600,
                     recheck_delay=0.1, confirm_passes=1, drop=drop)
    secret = await load_or_create_secret(nodes.etcd, nodes.keys)
    writes = PeriodicWrites(ReplicaClient(secret, CLUSTER, "W", timeout=3.0),
                            [("127.0.0.1", n.server.port) for n in (a, b, c)], VID, PERIOD, _cow_step)
    writes.start()
    try:
        t0 = time.monotonic()
        for _ in range(PASSES):
            await scrub.run_pass()
            if calls:
                break
        took, written = time.monotonic() - t0, writes.n
    finally:
        await writes.stop()
    assert calls == [], f"the healthy replica C was dropped after {scrub.status()['passes']} passes"
    assert (await record(nodes, VID, 0)).replicas == ["A", "B", "C"]
    assert scrub.status()["passes"] == PASSES
    assert written >= took / (PERIOD + 3 * SLOW) / 2, "the extent was written throughout"
    assert any(n.endswith(".ver") for n in slowed)


async def test_a_replica_that_really_differs_is_still_dropped_by_the_majority(nodes, etcd_client):
    """The at-rest check does not keep a real minority copy: C holds a block A and B do not
    (a write never acknowledged) and is dropped, A's copy kept."""
    a, b, c = [await nodes.add(cid) for cid in ("A", "B", "C")]
    await nodes.extent(VID, 0, ["A", "B", "C"], {0: block("A")})
    c.store.write(VID, 0, 5 * 4096, block("only on C"), 1)
    drop, calls = meta_drop(etcd_client, nodes.keys)
    scrub = Scrubber(a.store, a.repair, rate_bytes_per_s=RATE, interval=3600,
                     recheck_delay=0.1, confirm_passes=1, drop=drop)
    assert (await scrub.run_pass())["mismatches"] == 1
    assert calls == [(VID, 0, "C", 1)]
    rec = await record(nodes, VID, 0)
    assert rec.replicas == ["A", "B"] and rec.stale == {"C": 1}


async def test_a_minority_rotten_only_in_seqs_is_still_dropped_by_the_majority(nodes, etcd_client):
    """C's ``.seq`` rotted (no checksum covers it: the checked digests agree at rest): the
    at-rest check goes on to the full digest, which differs, and the majority drops C."""
    for cid in ("A", "B", "C"):
        _seq_rotted_on_disk(nodes.tmp / cid, rot=cid == "C")
    a, b, c = [await nodes.add(cid) for cid in ("A", "B", "C")]
    rec = ExtentRecord(volume_id=VID, index=0, replicas=["A", "B", "C"], generation=1)
    await etcd_client.put(nodes.keys.extent(VID, 0), rec.encode())
    assert a.store.checked_state(VID, 0) == c.store.checked_state(VID, 0)
    assert a.store.digest(VID, 0) == b.store.digest(VID, 0) != c.store.digest(VID, 0)
    drop, calls = meta_drop(etcd_client, nodes.keys)
    scrub = Scrubber(a.store, a.repair, rate_bytes_per_s=RATE, interval=3600,
                     recheck_delay=0.1, confirm_passes=1, drop=drop)
    assert (await scrub.run_pass())["mismatches"] == 1
    assert calls == [(VID, 0, "C", 1)]
    assert (await record(nodes, VID, 0)).replicas == ["A", "B"]
