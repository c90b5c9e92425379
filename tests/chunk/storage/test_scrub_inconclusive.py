"""Digest comparisons spoiled by writes in flight are inconclusive, never a disagreement."""

from __future__ import annotations

import pytest

from chunk.storage.extent_file import BLOCK_SIZE
from chunk.storage.peers import Peers
from chunk.storage.repair import LocalRepair
from chunk.storage.scrubber import Scrubber

from .replica_nodes import block
from .test_scrubber import meta_drop, record

pytestmark = pytest.mark.timeout(60)

VID = "vol-hot"


class SteadyWrites:
    """The real client, with a replicated write stream around each DIGEST: every write lands
    on A (this chunk) first and on B one step later, the way pipelined writes reach replicas a
    network hop apart. A DIGEST call is such a step: a new write lands on A while B is asked
    (after A's digest was taken), and B gets the previous one once it has answered. So B's
    answer never holds A's latest write: the two digests always differ, and both replicas are
    in sync all along (every write reaches both)."""

    def __init__(self, inner, a, b, *, during=lambda n: True) -> None:
        self.inner, self.a, self.b, self.during = inner, a, b, during
        self.calls, self.n, self.pending = 0, 0, None

    def write_a(self):
        self.n += 1
        w = ((self.n % 64) * BLOCK_SIZE, block(f"w{self.n}"))
        self.a.store.write(VID, 0, w[0], w[1], 1)
        return w

    def land(self):
        if self.pending is not None:
            self.b.store.write(VID, 0, self.pending[0], self.pending[1], 1)
            self.pending = None

    async def digest(self, addr, vid, idx, *args, **kw):
        self.calls += 1
        new = self.write_a() if self.during(self.calls) else None   # lands on A during the ask
        got = await self.inner.digest(addr, vid, idx, *args, **kw)
        self.land()                                                 # B gets the one before
        self.pending = new
        return got

    def __getattr__(self, name):
        return getattr(self.inner, name)


async def _scrubber_on_a(nodes, etcd_client, client, drop):
    a = nodes.nodes["A"]
    repair = LocalRepair(a.store, client, Peers(etcd_client, nodes.keys), nodes.keys, etcd_client, "A")
    # confirm_passes=1: a difference seen on the recheck is confirmed (and resolved) at once.
    return Scrubber(a.store, repair, rate_bytes_per_s=64 << 20, interval=3600, recheck_delay=0.05,
                    confirm_passes=1, drop=drop)


async def test_a_hot_extent_never_gets_its_in_sync_replica_dropped(nodes, etcd_client):
    a, b = await nodes.add("A"), await nodes.add("B")
    await nodes.extent(VID, 0, ["A", "B"], {1: block("one")})
    drop, calls = meta_drop(etcd_client, nodes.keys)
    client = SteadyWrites(a.client, a, b)
    client.pending = client.write_a()              # a write in flight: on A, not yet on B
    scrub = await _scrubber_on_a(nodes, etcd_client, client, drop)
    for _ in range(3):
        counts = await scrub.run_pass()
        assert counts["mismatches"] == 0
    client.land()                                  # the writes stop: the last one reaches B
    assert client.calls == 3                       # each pass: one check, inconclusive
    st = scrub.status()
    assert calls == [] and st["resyncs_requested"] == 0
    assert st["mismatched"] == [] and st["suspected"] == [] and st["inconclusive"] == 3
    assert (await record(nodes, VID, 0)).replicas == ["A", "B"]
    assert a.store.digest(VID, 0) == b.store.digest(VID, 0)       # B was in sync all along


async def test_a_write_during_the_recheck_only_is_inconclusive_too(nodes, etcd_client):
    """The first check is clean (B lacks a write, A is not written while B answers); a write
    lands on A during the recheck: nothing is confirmed from that."""
    a, b = await nodes.add("A"), await nodes.add("B")
    await nodes.extent(VID, 0, ["A", "B"], {1: block("one")})
    drop, calls = meta_drop(etcd_client, nodes.keys)
    client = SteadyWrites(a.client, a, b, during=lambda n: n == 2)
    client.pending = client.write_a()
    # B gets that write only after the recheck: hold it back during the first check.
    held, client.pending = client.pending, None
    orig_land = client.land

    def land():
        orig_land()
        if client.calls == 2:
            client.pending = held
            orig_land()
    client.land = land
    scrub = await _scrubber_on_a(nodes, etcd_client, client, drop)
    assert (await scrub.run_pass())["mismatches"] == 0
    assert client.calls == 2
    client.land()
    assert calls == [] and scrub.status()["suspected"] == [] and scrub.status()["inconclusive"] == 1
    assert a.store.digest(VID, 0) == b.store.digest(VID, 0)


async def test_a_real_difference_without_writes_is_still_confirmed_and_resolved(nodes, etcd_client):
    a, b = await nodes.add("A"), await nodes.add("B")
    await nodes.extent(VID, 0, ["A", "B"], {1: block("one")})
    b.store.write(VID, 0, 7 * BLOCK_SIZE, block("only on B"), 1)    # a write never acknowledged
    drop, calls = meta_drop(etcd_client, nodes.keys)
    client = SteadyWrites(a.client, a, b, during=lambda n: False)  # no writes: a plain client
    scrub = await _scrubber_on_a(nodes, etcd_client, client, drop)
    assert (await scrub.run_pass())["mismatches"] == 1
    assert client.calls == 2 and scrub.status()["inconclusive"] == 0
    assert calls == [(VID, 0, "B", 1)] and scrub.status()["resyncs_requested"] == 1
    assert (await record(nodes, VID, 0)).replicas == ["A"]
