"""A copy retired here (a failed flush: ``broken``, no longer served) leaves the scrubber's
live report, and is listed as retired instead of vanishing.

1ca8fc4 made a completed pass forget the ``mismatched`` and ``unresolved_extents`` entries of
extents the store no longer has: right for a deleted extent, but a retired copy is not "has"
either, and its entries went the same way, with no log: an unresolved tie in metadata no
checksum covers (either copy may be the rotten one) then left no trace once this copy was
retired, while the extent was resynced from the other one, possibly the rotten one.

Chosen: a retired copy's entries no longer count as a live disagreement (``mismatched``,
``unresolved_extents``: the copy serves nothing, and is replaced or reclaimed), but move to
``status()["retired"]`` (what was reported, against which peers, why the copy was retired,
when), logged at error level, and kept there (the last ``RETIRED_KEPT``) after the broken
copy's files are gone: they were the only evidence. They move when the store retires the copy
(``ReplicaStore.retire_listeners``), so a copy reclaimed or replaced by a resync before the pass
ends keeps them too (test_audit18_scrub_retired_gone.py). A report cleared by a comparison in
agreement is now logged (a cleared unresolved tie as a warning).
"""

from __future__ import annotations

import errno
import struct

import pytest

from chunk.storage.extent_file import BLOCK_SIZE
from chunk.storage import scrubber
from chunk.storage.scrubber import Scrubber
from zstore.records import ExtentRecord

from .replica_nodes import block
from .test_scrub_metadata_tie import VID as TIE_VID, _replica_on_disk
from .test_scrubber import VID, _voter, meta_drop, setup

pytestmark = pytest.mark.timeout(60)


def retire(store, vid: str, idx: int) -> None:
    """What a failed fdatasync of the copy does (``ReplicaStore._retire``, from ``_durable``)."""
    store._retire(store._replicas[(vid, idx)], OSError(errno.ENOSPC, "No space left on device"))  # noqa: SLF001
    assert (vid, idx) in store.broken and not store.has(vid, idx)


async def test_a_retired_copys_mismatch_is_listed_as_retired_not_as_live(nodes):
    a, b = await setup(nodes)
    b.store.write(VID, 0, 7 * BLOCK_SIZE, block("only on B"), 1)     # a write never acknowledged
    scrub = _voter(b, None)                                           # reports, never drops
    assert (await scrub.run_pass())["mismatches"] == 1
    assert scrub.status()["mismatched"] == [{"volume": VID, "extent": 0, "peers": ["A"]}]

    retire(b.store, VID, 0)
    await scrub.run_pass()
    st = scrub.status()
    assert st["mismatched"] == [] and st["mismatches"] == 1           # no longer live; count stays
    [entry] = st.get("retired", [])
    assert entry["volume"] == VID and entry["extent"] == 0 and entry["was"] == "mismatched"
    assert entry["peers"] == ["A"] and "flush failed" in entry["why"]

    b.store.delete(VID, 0)                                            # reclaimed (or replaced)
    await scrub.run_pass()
    assert scrub.status()["retired"] == [entry]                       # the evidence is kept


async def test_a_retired_copys_unresolved_tie_is_listed_as_retired(nodes, etcd_client):
    for cid in ("A", "B"):
        _replica_on_disk(nodes.tmp / cid)
    with open(nodes.tmp / "A" / f"{TIE_VID}.0.seq", "r+b") as f:       # rot: block 1's seq 2 -> 1
        f.seek(4)
        f.write(struct.pack("<I", 1))
    a, _b = await nodes.add("A"), await nodes.add("B")
    rec = ExtentRecord(volume_id=TIE_VID, index=0, replicas=["A", "B"], generation=1)
    await etcd_client.put(nodes.keys.extent(TIE_VID, 0), rec.encode())
    drop, calls = meta_drop(etcd_client, nodes.keys)
    scrub = _voter(a, drop)
    assert (await scrub.run_pass())["mismatches"] == 1
    assert [e["volume"] for e in scrub.status()["unresolved_extents"]] == [TIE_VID] and calls == []

    retire(a.store, TIE_VID, 0)
    await scrub.run_pass()
    st = scrub.status()
    assert st["unresolved_extents"] == [] and st["mismatched"] == [] and st["unresolved"] == 1
    assert [(e["volume"], e["extent"], e["was"], e["peers"]) for e in st.get("retired", [])] == \
        [(TIE_VID, 0, "unresolved", ["B"])]


async def test_a_deleted_extent_is_still_forgotten_and_the_retired_list_is_bounded(nodes):
    """A deleted (not retired) copy's entries go as 1ca8fc4 made them; the retired list keeps
    the last RETIRED_KEPT only."""
    kept = scrubber.RETIRED_KEPT
    a, b = await setup(nodes)
    scrub = Scrubber(b.store, b.repair, rate_bytes_per_s=64 << 20, interval=3600)
    for i in range(kept + 1):
        scrub.mismatched[("gone", i)] = ["A"]
    for i in range(kept + 2):
        scrub._report_retired(("old", i), "mismatched", ["A"], "a flush failed")  # noqa: SLF001
    await scrub.run_pass()
    st = scrub.status()
    assert st["mismatched"] == []
    assert [e["extent"] for e in st["retired"]] == list(range(2, kept + 2))


async def test_a_report_cleared_by_agreement_is_logged(nodes, caplog):
    """A report cleared by a comparison that finds the replicas agreeing (writes, or the
    peer's copy resynced) is logged, not silent."""
    a, b = await setup(nodes)
    b.store.write(VID, 0, 7 * BLOCK_SIZE, block("only on B"), 1)
    scrub = _voter(b, None)
    assert (await scrub.run_pass())["mismatches"] == 1
    a.store.write(VID, 0, 7 * BLOCK_SIZE, block("only on B"), 1)     # now on both: agreement
    caplog.clear()
    with caplog.at_level("INFO", logger="chunk.storage.scrubber"):
        assert (await scrub.run_pass())["mismatches"] == 0
    assert scrub.status()["mismatched"] == []
    assert any("agree again" in r.getMessage() and f"{VID}/0" in r.getMessage()
               for r in caplog.records)


async def test_a_second_retirement_of_an_extent_keeps_the_first_ones_evidence(nodes):
    """Review of e5d86e6: the list was one entry per extent, so a later copy of the same
    extent retired again (its own mismatch against another peer) overwrote the first
    retirement's peers, reason and time, and took its 'unresolved' verdict. One entry per
    retirement now."""
    a, b = await setup(nodes)
    scrub = Scrubber(b.store, b.repair, rate_bytes_per_s=64 << 20, interval=3600)
    key = (VID, 0)
    scrub.mismatched[key] = ["A"]
    scrub.unresolved_extents[key] = ["A"]
    scrub._copy_retired(VID, 0, "a flush failed: 1")                  # noqa: SLF001
    scrub.mismatched[key] = ["C"]                                     # the copy resynced in its place
    scrub._copy_retired(VID, 0, "a flush failed: 2")                  # noqa: SLF001
    st = scrub.status()
    assert [(e["was"], e["peers"], e["why"]) for e in st["retired"]] == [
        ("unresolved", ["A"], "a flush failed: 1"), ("mismatched", ["C"], "a flush failed: 2")]
    assert st["retired_reports"] == 2
