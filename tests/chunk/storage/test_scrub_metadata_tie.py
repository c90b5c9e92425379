"""A 1:1 scrub tie in metadata no checksum covers repairs nothing.

``.seq`` entries and version origins carry no checksum: a flipped ``.seq`` entry passes
``verify`` but changes what snapshots read, and the digests differ. With two replicas the
tie went to the record's first replica, so when that one rotted its copy won and the good
replica was dropped for a resync from it. Real stores, replica servers and etcd; the rot
is a byte written into the ``.seq`` file before the stores open it.
"""

from __future__ import annotations

import asyncio
import struct

import pytest

from chunk.storage.extent_file import BLOCK_SIZE
from chunk.storage.replica_store import ReplicaStore
from zstore.records import ExtentRecord

from .replica_nodes import EXTENT, block
from .test_scrubber import _voter, meta_drop, record

pytestmark = pytest.mark.timeout(60)

VID = "vol-t"


def _replica_on_disk(path) -> None:
    """Block 0 written before snapshot 1, block 1 after it (seq 2): absent in snapshot 1."""
    with ReplicaStore([(path, None)], extent_size=EXTENT, cow_sync=False) as s:
        s.create(VID, 0, 1)
        s.write(VID, 0, 0, block("A"), seq=1)
        s.write(VID, 0, BLOCK_SIZE, block("N"), seq=2)
        s.flush(VID, 0)


async def test_a_seq_rot_tie_drops_neither_replica(nodes, etcd_client):
    for cid in ("A", "B"):
        _replica_on_disk(nodes.tmp / cid)
    with open(nodes.tmp / "A" / f"{VID}.0.seq", "r+b") as f:     # rot: block 1's seq 2 -> 1
        f.seek(4)
        f.write(struct.pack("<I", 1))
    a, b = await nodes.add("A"), await nodes.add("B")
    rec = ExtentRecord(volume_id=VID, index=0, replicas=["A", "B"], generation=1)  # A first
    await etcd_client.put(nodes.keys.extent(VID, 0), rec.encode())
    assert a.store.verify(VID, 0) == [] and b.store.verify(VID, 0) == []
    assert a.store.digest(VID, 0) != b.store.digest(VID, 0)
    assert a.store.read(VID, 0, BLOCK_SIZE, BLOCK_SIZE, view=1)[1] == b"\x01"    # rot shows
    assert b.store.read(VID, 0, BLOCK_SIZE, BLOCK_SIZE, view=1)[1] == b"\x00"

    drop, calls = meta_drop(etcd_client, nodes.keys)
    on_a, on_b = _voter(a, drop), _voter(b, drop)
    for scrub in (on_a, on_b):                             # A, the first replica, decides first
        assert (await scrub.run_pass())["mismatches"] == 1
        assert calls == []                                 # the good copy B is not dropped
    assert (await record(nodes, VID, 0)).replicas == ["A", "B"]
    for scrub in (on_a, on_b):
        st = scrub.status()
        assert st["unresolved"] == 1 and st["resyncs_requested"] == 0
        assert [e["volume"] for e in st["unresolved_extents"]] == [VID]


async def test_a_tie_in_checked_data_is_still_resolved(nodes, etcd_client):
    """The other tie, a block only one replica holds (a write never acknowledged): the
    first replica's side still wins, so the replicas converge."""
    a, b = await nodes.add("A"), await nodes.add("B")
    await nodes.extent(VID, 0, ["A", "B"], {0: block("A")})
    b.store.write(VID, 0, 5 * BLOCK_SIZE, block("only on B"), seq=1)
    drop, calls = meta_drop(etcd_client, nodes.keys)
    on_a = _voter(a, drop)
    assert (await on_a.run_pass())["mismatches"] == 1
    assert calls == [(VID, 0, "B", 1)] and on_a.status()["unresolved"] == 0


async def test_a_peer_export_that_does_not_move_on_ends_the_tie_check(tmp_path):
    """A peer answering an EXPORT with a next offset that does not advance would keep the
    tie check exporting (throttled) forever: it fails that check instead (decided later)."""
    from types import SimpleNamespace

    from chunk.storage.replica_store import StoreError
    from chunk.storage.scrubber import Scrubber
    calls = []
    real = ReplicaStore([(tmp_path, None)], extent_size=1 << 20)
    real.create("v", 0, 1)
    blob, _ = real.export("v", 0, 0, 64 * BLOCK_SIZE)   # a well-formed part
    real.close()

    async def export(addr, vid, idx, off, length):
        calls.append(off)
        await asyncio.sleep(0)                           # a real answer takes a loop turn
        return blob, off                                 # "continue at" where it started

    async def take(n):
        pass
    scrub = Scrubber.__new__(Scrubber)
    scrub.store = SimpleNamespace(extent_size=1 << 20)
    scrub.repair = SimpleNamespace(client=SimpleNamespace(export=export))
    scrub.bucket = SimpleNamespace(take=take)
    with pytest.raises(StoreError, match="next offset 0 after 0"):
        await asyncio.wait_for(scrub._peer_checked_state(("127.0.0.1", 1), "v", 0), 5)   # noqa: SLF001
    assert calls == [0]
