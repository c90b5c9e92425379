"""An extent deleted here leaves the scrubber's report with it.

``mismatched`` and ``unresolved_extents`` were cleared only by a comparison that found the
replicas agreeing again; an extent deleted meanwhile (its volume deleted, or reclaimed once
moved elsewhere: an operator's way out of a disagreement) is never compared again, so the
chunk server listed it as disagreeing, or as "needs an operator", until it restarted.
"""

from __future__ import annotations

import struct

import pytest

from zstore.records import ExtentRecord

from .replica_nodes import block
from .test_scrub_metadata_tie import VID as TIE_VID, _replica_on_disk
from .test_scrubber import VID, _voter, meta_drop, setup
from chunk.storage.extent_file import BLOCK_SIZE

pytestmark = pytest.mark.timeout(60)


async def test_a_deleted_extent_is_no_longer_reported_as_mismatched(nodes):
    a, b = await setup(nodes)
    b.store.write(VID, 0, 7 * BLOCK_SIZE, block("only on B"), 1)     # a write never acknowledged
    scrub = _voter(b, None)                                           # reports, never drops
    assert (await scrub.run_pass())["mismatches"] == 1
    assert scrub.status()["mismatched"] == [{"volume": VID, "extent": 0, "peers": ["A"]}]

    b.store.delete(VID, 0)                                            # its volume deleted
    await scrub.run_pass()
    st = scrub.status()
    assert st["mismatched"] == [] and st["mismatches"] == 1          # the count stays


async def test_a_deleted_extent_is_no_longer_reported_as_unresolved(nodes, etcd_client):
    for cid in ("A", "B"):
        _replica_on_disk(nodes.tmp / cid)
    with open(nodes.tmp / "A" / f"{TIE_VID}.0.seq", "r+b") as f:       # rot: block 1's seq 2 -> 1
        f.seek(4)
        f.write(struct.pack("<I", 1))
    a, b = await nodes.add("A"), await nodes.add("B")
    rec = ExtentRecord(volume_id=TIE_VID, index=0, replicas=["A", "B"], generation=1)
    await etcd_client.put(nodes.keys.extent(TIE_VID, 0), rec.encode())
    drop, calls = meta_drop(etcd_client, nodes.keys)
    scrub = _voter(a, drop)
    assert (await scrub.run_pass())["mismatches"] == 1
    assert [e["volume"] for e in scrub.status()["unresolved_extents"]] == [TIE_VID] and calls == []

    a.store.delete(TIE_VID, 0)                                        # the operator's way out
    await scrub.run_pass()
    st = scrub.status()
    assert st["unresolved_extents"] == [] and st["mismatched"] == [] and st["unresolved"] == 1
