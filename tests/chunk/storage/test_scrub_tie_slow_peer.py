"""The scrubber's 1:1 tie check never drops the good copy behind a peer's slow disk.

5072ce6's check counted a probe of the peer's checked digest when no LOCAL write landed
within 20 ms of it. But a copy-on-write waits for fdatasyncs in worker threads between its
steps (ReplicaStore._write_later): a peer whose disk syncs slowly sits half-way through a
write, in a state neither replica keeps, for as long as its syncs take, while this replica
is long done and quiet. Three such probes said "different", and in a tie in unchecked
metadata (the first replica's .seq rotten) the first replica dropped the good copy.

Real stores (cow_sync on both), replica servers and etcd; B's .ver/.seq fdatasyncs take
SLOW seconds; writes, each a copy-on-write, go through both replica servers during the
passes, and the passes go on after the first verdict.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time

import pytest

from chunk.storage.extent_file import BLOCK_SIZE
from chunk.storage.peer_auth import load_or_create_secret
from chunk.storage.replica_client import ReplicaClient
from chunk.storage.replica_server import ReplicaServer, checked_digest
from chunk.storage.scrubber import Scrubber
from chunk.storage.wire import Op
from zstore.records import ExtentRecord

from .replica_nodes import CLUSTER, PeriodicWrites, block
from .test_scrub_busy_tie import VID, _seq_rotted_on_disk
from .test_scrubber import meta_drop, record

pytestmark = pytest.mark.timeout(180)

SLOW = 0.08                 # each of B's .ver/.seq fdatasyncs (a lagging disk)
PERIOD = 0.1                # a write every 100 ms (after both replicas answered the last)
PASSES = 8                  # scrub passes, on after the first verdict
RATE = 8 << 20              # a pass verifies the 2 MiB extent in a quarter of a second
FIRST, SPAN = 16, 64        # blocks written in turn; a new seq on each round: every write COWs


def _slow_syncs(monkeypatch, directory) -> list[str]:
    """os.fdatasync of a .ver or .seq file under ``directory`` sleeps SLOW first, in a worker
    thread (a sync on the event loop is not slowed: it would stall A too). Returns the names
    of the files slowed, one per sync."""
    loop_thread = threading.get_ident()
    prefix = str(directory) + os.sep
    slowed: list[str] = []
    real = os.fdatasync

    def fdatasync(fd):
        if threading.get_ident() != loop_thread:
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                path = ""
            if path.startswith(prefix) and path.endswith((".ver", ".seq")):
                slowed.append(os.path.basename(path))
                time.sleep(SLOW)
        return real(fd)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    return slowed


def _cow_step(n: int) -> tuple[int, int, bytes]:
    """Blocks FIRST.. in turn, the seq one higher on each round: every write is a copy-on-write."""
    return (FIRST + n % SPAN) * BLOCK_SIZE, 3 + n // SPAN, block(f"cow {n}")


async def test_a_metadata_tie_never_drops_the_good_copy_behind_a_slow_peer_disk(
        nodes, etcd_client, monkeypatch):
    """A (the first replica) has a rotten ``.seq`` entry, B the good copy; their checked
    states are the same at rest. B's syncs take 80 ms, so each COW keeps B half-way through
    it (a version slot without the new crc, or neither) for ~160 ms while A is done. Over
    PASSES passes nothing is dropped, and the tie is found unresolved. On the code before
    (local writes only), B was dropped on the first pass."""
    for cid in ("A", "B"):
        _seq_rotted_on_disk(nodes.tmp / cid, rot=cid == "A")
    a, b = await nodes.add("A", cow_sync=True), await nodes.add("B", cow_sync=True)
    rec = ExtentRecord(volume_id=VID, index=0, replicas=["A", "B"], generation=1)
    await etcd_client.put(nodes.keys.extent(VID, 0), rec.encode())
    assert a.store.digest(VID, 0) != b.store.digest(VID, 0)
    assert a.store.checked_state(VID, 0) == b.store.checked_state(VID, 0)
    slowed = _slow_syncs(monkeypatch, nodes.tmp / "B")
    drop, calls = meta_drop(etcd_client, nodes.keys)
    scrub = Scrubber(a.store, a.repair, rate_bytes_per_s=RATE, interval=3600,
                     recheck_delay=0.1, confirm_passes=1, drop=drop)
    secret = await load_or_create_secret(nodes.etcd, nodes.keys)
    writes = PeriodicWrites(ReplicaClient(secret, CLUSTER, "W", timeout=3.0),
                            [("127.0.0.1", n.server.port) for n in (a, b)], VID, PERIOD, _cow_step)
    verdicts = []                       # after each pass: (unresolved so far, drops so far)
    cows_before = b.store.stat(VID, 0)["cows"]
    writes.start()
    try:
        t0 = time.monotonic()
        for _ in range(PASSES):
            await scrub.run_pass()
            verdicts.append((scrub.status()["unresolved"], len(calls)))
            if calls:
                break
        took, written = time.monotonic() - t0, writes.n
    finally:
        await writes.stop()
    assert calls == [], f"the good copy B was dropped (pass {len(verdicts)}, after {verdicts})"
    assert (await record(nodes, VID, 0)).replicas == ["A", "B"]
    st = scrub.status()
    assert st["unresolved"] >= 1, f"never decided in {PASSES} passes ({took:.1f}s): {verdicts}"
    assert [e["peers"] for e in st["unresolved_extents"]] == [["B"]]
    # Every pass ran, while B copy-on-wrote behind its slow syncs throughout.
    assert st["passes"] == PASSES
    assert written >= took / (PERIOD + 3 * SLOW) / 2, "the extent was written throughout"
    assert b.store.stat(VID, 0)["cows"] - cows_before >= written - 1
    assert any(n.endswith(".ver") for n in slowed)


async def test_a_checked_probe_carries_the_replicas_mutations_and_pending(nodes, monkeypatch):
    """DIGEST with ``args.checked`` says, with the digest, the replica's mutation count and
    its deferred writes in progress: 1 while a COW waits for B's slow syncs, 0 after."""
    a, b = await nodes.add("A", cow_sync=True), await nodes.add("B", cow_sync=True)
    await nodes.extent(VID, 0, ["A", "B"], {0: block("x"), 1: block("y")})
    addr_b = ("127.0.0.1", b.server.port)
    got = await a.client.checked_probe(addr_b, VID, 0)
    assert got.digest == checked_digest(b.store.checked_state(VID, 0))
    assert (got.mutations, got.pending) == (b.store.stat(VID, 0)["mutations"], 0)
    _slow_syncs(monkeypatch, nodes.tmp / "B")
    write = asyncio.ensure_future(a.client.write(addr_b, VID, 0, 0, block("z"), epoch=1, seq=2))
    await asyncio.sleep(SLOW / 2)
    during = await a.client.checked_probe(addr_b, VID, 0)
    assert not write.done() and during.pending == 1 and during.mutations > got.mutations
    await write
    done = await a.client.checked_probe(addr_b, VID, 0)
    assert done.pending == 0 and done.mutations >= during.mutations
    assert done.digest == checked_digest(b.store.checked_state(VID, 0)) != got.digest


class UncountedServer(ReplicaServer):
    """A replica server from 5072ce6: checked digests, without mutations or pending."""

    def _execute(self, f):
        rep = super()._execute(f)
        if f.op is Op.DIGEST and (rep.args or {}).get("checked"):
            rep = dataclasses.replace(rep, args={"checked": True})
        return rep


async def test_a_tie_with_a_peer_not_saying_its_mutations_is_decided_by_its_export(
        nodes, etcd_client):
    """Its digest cannot be told taken at rest: the check EXPORTs it, as an older peer's."""
    a, b = await nodes.add("A"), await nodes.add("B")
    await nodes.extent(VID, 0, ["A", "B"], {0: block("A")})
    b.store.write(VID, 0, 5 * BLOCK_SIZE, block("only on B"), seq=1)
    await b.server.stop()
    b.server = UncountedServer(b.store, b.server.secret, CLUSTER, "127.0.0.1", 0)
    await b.server.start()
    await nodes.register("B", b.server.port)
    got = await a.client.checked_probe(("127.0.0.1", b.server.port), VID, 0)
    assert got.digest and got.mutations is None and got.pending is None
    drop, calls = meta_drop(etcd_client, nodes.keys)
    scrub = Scrubber(a.store, a.repair, rate_bytes_per_s=64 << 20, interval=3600,
                     recheck_delay=0.1, confirm_passes=1, drop=drop)
    assert (await scrub.run_pass())["mismatches"] == 1
    assert calls == [(VID, 0, "B", 1)]
    assert b.server.requests["EXPORT"] >= 1
