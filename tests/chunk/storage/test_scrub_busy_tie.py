"""The scrubber's 1:1 tie check concludes on an extent that keeps being written.

The tie check (is the difference in checked data, or only in seqs/origins no checksum
covers?) used to EXPORT the peer's whole extent at the scrub rate and give up if a local
write landed meanwhile: on an extent written every few hundred milliseconds it never
concluded, so a real tie was never resolved. Real stores, replica servers and etcd; the
writes go through the replica servers, to both replicas at once, like a coordinator's.
"""

from __future__ import annotations

import dataclasses
import struct
import time

import pytest

from chunk.storage.extent_file import BLOCK_SIZE
from chunk.storage.peer_auth import load_or_create_secret
from chunk.storage.replica_client import ReplicaClient
from chunk.storage.replica_server import ReplicaServer
from chunk.storage.replica_store import ReplicaStore
from chunk.storage.scrubber import Scrubber
from chunk.storage.wire import Op
from zstore.records import ExtentRecord

from .replica_nodes import CLUSTER, EXTENT, PeriodicWrites, block
from .test_scrubber import meta_drop, record

pytestmark = pytest.mark.timeout(120)

VID = "vol-busy"
FILLED = EXTENT // BLOCK_SIZE           # every block written: a whole-extent EXPORT is large
RATE = 1 << 20                          # a scrub rate at which that EXPORT takes seconds
PERIOD = 0.1                            # the busy extent: a write every 100 ms
DEADLINE = 40.0                         # passes until the tie is decided (each a few seconds)


def _fill(store: ReplicaStore, seq: int = 1) -> None:
    for b in range(FILLED):
        store.write(VID, 0, b * BLOCK_SIZE, block(b % 251), seq)


async def _writes(nodes, seq: int) -> PeriodicWrites:
    """A write every PERIOD seconds at ``seq`` to replicas A and B at once, blocks 16..79 in turn."""
    secret = await load_or_create_secret(nodes.etcd, nodes.keys)
    addrs = [("127.0.0.1", nodes.nodes[c].server.port) for c in ("A", "B")]
    return PeriodicWrites(ReplicaClient(secret, CLUSTER, "W", timeout=3.0), addrs, VID, PERIOD,
                          lambda n: ((16 + n % 64) * BLOCK_SIZE, seq, block(f"busy {n}")))


def _scrubber(node, drop) -> Scrubber:
    return Scrubber(node.store, node.repair, rate_bytes_per_s=RATE, interval=3600,
                    recheck_delay=0.1, confirm_passes=1, drop=drop)


async def _passes_until(scrub: Scrubber, decided) -> int:
    """Scrub passes until ``decided()``, at most DEADLINE seconds; the passes run."""
    t0, n = time.monotonic(), 0
    while not decided() and time.monotonic() - t0 < DEADLINE:
        await scrub.run_pass()
        n += 1
    return n


async def test_a_checked_data_tie_on_a_busy_extent_is_resolved(nodes, etcd_client):
    """B holds a block A does not (a write never acknowledged): the first replica A keeps its
    copy, B is dropped for a resync, while both take a write every 100 ms. Before, the check
    exported B's 2 MiB at 1 MiB/s, every attempt had writes land meanwhile: never decided."""
    a, b = await nodes.add("A"), await nodes.add("B")
    await nodes.extent(VID, 0, ["A", "B"], {})
    for n in (a, b):
        _fill(n.store)
    b.store.write(VID, 0, 5 * BLOCK_SIZE, block("only on B"), 1)
    drop, calls = meta_drop(etcd_client, nodes.keys)
    scrub = _scrubber(a, drop)
    writes = await _writes(nodes, seq=1)
    writes.start()
    try:
        t0, before = time.monotonic(), writes.n
        passes = await _passes_until(scrub, lambda: bool(calls))
        took, written = time.monotonic() - t0, writes.n - before
    finally:
        await writes.stop()
    assert calls == [(VID, 0, "B", 1)], f"undecided after {passes} passes in {took:.1f}s"
    assert written >= took / PERIOD / 3, "the extent was written throughout"
    rec = await record(nodes, VID, 0)
    assert rec.replicas == ["A"] and rec.stale == {"B": 1}
    st = scrub.status()
    assert st["resyncs_requested"] == 1 and st["unresolved"] == 0
    assert a.store.read(VID, 0, 5 * BLOCK_SIZE, BLOCK_SIZE)[0] == block(5)    # A's copy kept


def _seq_rotted_on_disk(path, rot: bool) -> None:
    """Every block at seq 1, then block 1 again at seq 2 (after snapshot 1); ``rot`` flips
    block 1's seq back to 1 in the ``.seq`` file, which no checksum covers."""
    with ReplicaStore([(path, None)], extent_size=EXTENT, cow_sync=False) as s:
        s.create(VID, 0, 1)
        _fill(s)
        s.write(VID, 0, BLOCK_SIZE, block("N"), seq=2)
        s.flush(VID, 0)
    if rot:
        with open(path / f"{VID}.0.seq", "r+b") as f:
            f.seek(4)
            f.write(struct.pack("<I", 1))


async def test_a_metadata_tie_on_a_busy_extent_is_found_unresolved(nodes, etcd_client):
    """A (the first replica) has a rotten ``.seq`` entry: the tie is in metadata only, so
    nothing is dropped, and it is reported unresolved although both take a write every
    100 ms (a write in flight to one replica does not pass for a checked difference).
    Before, no check concluded: nothing was reported."""
    for cid in ("A", "B"):
        _seq_rotted_on_disk(nodes.tmp / cid, rot=cid == "A")
    a, b = await nodes.add("A"), await nodes.add("B")
    rec = ExtentRecord(volume_id=VID, index=0, replicas=["A", "B"], generation=1)
    await etcd_client.put(nodes.keys.extent(VID, 0), rec.encode())
    assert a.store.digest(VID, 0) != b.store.digest(VID, 0)
    assert a.store.checked_state(VID, 0) == b.store.checked_state(VID, 0)
    drop, calls = meta_drop(etcd_client, nodes.keys)
    scrub = _scrubber(a, drop)
    writes = await _writes(nodes, seq=2)           # copy-on-write: versions change too
    writes.start()
    try:
        t0, before = time.monotonic(), writes.n
        passes = await _passes_until(scrub, lambda: scrub.status()["unresolved"] > 0 or bool(calls))
        took, written = time.monotonic() - t0, writes.n - before
    finally:
        await writes.stop()
    assert calls == [], "the good copy B was dropped"
    st = scrub.status()
    assert st["unresolved"] >= 1, f"undecided after {passes} passes in {took:.1f}s"
    assert [e["peers"] for e in st["unresolved_extents"]] == [["B"]]
    assert written >= took / PERIOD / 3, "the extent was written throughout"
    assert (await record(nodes, VID, 0)).replicas == ["A", "B"]


class PreCheckedServer(ReplicaServer):
    """A replica server from before DIGEST's ``args.checked``: it ignores args there."""

    def _execute(self, f):
        if f.op is Op.DIGEST:
            f = dataclasses.replace(f, args=None)
        return super()._execute(f)


async def _pre_checked(nodes, node) -> None:
    """Serve ``node``'s store by a PreCheckedServer instead (registered at its new port)."""
    await node.server.stop()
    node.server = PreCheckedServer(node.store, node.server.secret, CLUSTER, "127.0.0.1", 0)
    await node.server.start()
    await nodes.register(node.chunk_id, node.server.port)


async def test_checked_digest_covers_crcs_not_seqs_and_an_older_peer_says_none(nodes):
    from chunk.storage.replica_server import checked_digest
    a, b = await nodes.add("A"), await nodes.add("B")
    await nodes.extent(VID, 0, ["A", "B"], {0: block("x")})
    a.store.write(VID, 0, BLOCK_SIZE, block("y"), seq=1)
    b.store.write(VID, 0, BLOCK_SIZE, block("y"), seq=2)          # only a seq differs
    addr_b = ("127.0.0.1", b.server.port)
    theirs = await a.client.checked_digest(addr_b, VID, 0)
    assert len(theirs) == 32
    assert theirs == checked_digest(a.store.checked_state(VID, 0))
    assert theirs != await a.client.digest(addr_b, VID, 0)
    b.store.write(VID, 0, 2 * BLOCK_SIZE, block("z"), seq=2)
    assert await a.client.checked_digest(addr_b, VID, 0) != checked_digest(a.store.checked_state(VID, 0))
    await _pre_checked(nodes, b)
    addr_b = ("127.0.0.1", b.server.port)
    assert await a.client.checked_digest(addr_b, VID, 0) is None   # not its full digest


async def test_a_tie_with_an_older_peer_is_decided_by_its_export(nodes, etcd_client):
    """B answers DIGEST without ``args.checked``: the check falls back to its EXPORT."""
    a, b = await nodes.add("A"), await nodes.add("B")
    await nodes.extent(VID, 0, ["A", "B"], {0: block("A")})
    b.store.write(VID, 0, 5 * BLOCK_SIZE, block("only on B"), seq=1)
    await _pre_checked(nodes, b)
    drop, calls = meta_drop(etcd_client, nodes.keys)
    scrub = Scrubber(a.store, a.repair, rate_bytes_per_s=64 << 20, interval=3600,
                     recheck_delay=0.1, confirm_passes=1, drop=drop)
    assert (await scrub.run_pass())["mismatches"] == 1
    assert calls == [(VID, 0, "B", 1)]
    assert b.server.requests["EXPORT"] >= 1
