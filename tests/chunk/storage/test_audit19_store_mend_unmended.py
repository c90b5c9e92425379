"""A mend that cannot replace what fails says so (audit 19, item 1).

``mend``/``mend_async`` answered True ("mended") whenever they ran to their end, even when the
peer's blob held no good copy of what fails here: an import's filler for a version no replica
could read (same key and origin on both sides, the data deliberately failing its crc) is
unreadable on the peer too, so the blob lists it in ``bad_versions`` without data and the mend
changed nothing, yet reported the block mended. It now answers ``Unmended`` (falsy, naming
what is left), and the repair driver takes that as "this peer cannot help": it verifies again
and goes on to the next peer (not "the extent changed meanwhile", which retries the same one).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from chunk.storage.extent_file import BLOCK_SIZE
from chunk.storage.replica_store import ReplicaStore, Unmended

from .replica_nodes import block
from .test_repair import VID

pytestmark = pytest.mark.timeout(60)

SIZE = 32 * BLOCK_SIZE
V = "vol-a"
BLK = 3


def blk(s: str) -> bytes:
    return (s.encode() * BLOCK_SIZE)[:BLOCK_SIZE]


def _rot_version(base: Path, key: int, block_no: int, blocks: int) -> None:
    """Rot block ``block_no``'s data in ``base``'s ``key.ver`` (behind the store's back)."""
    data_at = -(-blocks * 8 // BLOCK_SIZE) * BLOCK_SIZE
    fd = os.open(base / f"{key}.ver", os.O_RDWR)
    try:
        os.pwrite(fd, b"rot!" * (BLOCK_SIZE // 4), data_at + block_no * BLOCK_SIZE)
    finally:
        os.close(fd)


def _filler_pair(tmp_path: Path) -> tuple[ReplicaStore, ReplicaStore]:
    """P with BLK at seq 2 and its version (key 1, origin 1) rotten; L imported P's state,
    so it holds that version as a filler under the same key, origin and crc."""
    P = ReplicaStore([(tmp_path / "P", None)], extent_size=SIZE, cow_sync=True)
    P.create(V, 0, 1)
    P.write(V, 0, BLK * BLOCK_SIZE, blk("a"), 1)
    P.write(V, 0, BLK * BLOCK_SIZE, blk("b"), 2)
    P.flush(V, 0)
    _rot_version(tmp_path / "P" / f"{V}.0.v", 1, BLK, SIZE // BLOCK_SIZE)
    L = ReplicaStore([(tmp_path / "L", None)], extent_size=SIZE, cow_sync=True)
    assert L.import_(V, 0, P.export(V, 0, 0, SIZE)[0])
    assert L.verify(V, 0) == [BLK] and P.verify(V, 0) == [BLK]
    assert L.digest(V, 0) == P.digest(V, 0)
    return L, P


@pytest.mark.parametrize("how", ["async", "sync"])
async def test_a_mend_from_a_peer_that_cannot_read_it_either_is_not_mended(tmp_path, how):
    L, P = _filler_pair(tmp_path)
    blob = P.export(V, 0, BLK * BLOCK_SIZE, BLOCK_SIZE)[0]
    if how == "async":
        verdict = await L.verify_verdict_async(V, 0, BLK, 1)
        assert verdict is not None and verdict.bad_versions == {(BLK, 1)}
        got = await L.mend_async(V, 0, blob, verified=verdict)
    else:
        got = L.mend(V, 0, blob)
    assert not got, "the block still fails: not mended"
    assert got == Unmended(frozenset(), frozenset({(BLK, 1)}))
    assert L.verify(V, 0) == [BLK]
    assert L.read(V, 0, BLK * BLOCK_SIZE, BLOCK_SIZE)[0] == blk("b")     # live untouched


async def test_a_mend_that_replaces_all_that_fails_is_still_true(tmp_path):
    """The same filler, mended from a peer that reads the version: True, and it verifies."""
    L, P = _filler_pair(tmp_path)
    good = ReplicaStore([(tmp_path / "G", None)], extent_size=SIZE, cow_sync=True)
    good.create(V, 0, 1)
    good.write(V, 0, BLK * BLOCK_SIZE, blk("a"), 1)
    good.write(V, 0, BLK * BLOCK_SIZE, blk("b"), 2)
    verdict = await L.verify_verdict_async(V, 0, BLK, 1)
    blob = good.export(V, 0, BLK * BLOCK_SIZE, BLOCK_SIZE)[0]
    assert await L.mend_async(V, 0, blob, verified=verdict) is True
    assert L.verify(V, 0) == []
    assert L.read(V, 0, BLK * BLOCK_SIZE, BLOCK_SIZE, view=1)[0] == blk("a")


async def test_a_live_block_unreadable_on_the_peer_too_is_not_mended(tmp_path):
    """The peer's live block fails too (``bad_live``): nothing to take, not mended."""
    stores = []
    for name in ("L", "P"):
        s = ReplicaStore([(tmp_path / name, None)], extent_size=SIZE)
        s.create(V, 0, 1)
        s.write(V, 0, BLK * BLOCK_SIZE, blk("a"), 1)
        s.flush(V, 0)
        fd = os.open(tmp_path / name / f"{V}.0.data", os.O_RDWR)
        os.pwrite(fd, b"rot!", BLK * BLOCK_SIZE)
        os.close(fd)
        stores.append(s)
    L, P = stores
    verdict = await L.verify_verdict_async(V, 0, BLK, 1)
    got = await L.mend_async(V, 0, P.export(V, 0, BLK * BLOCK_SIZE, BLOCK_SIZE)[0],
                             verified=verdict)
    assert got == Unmended(frozenset({BLK}), frozenset())


async def test_the_repair_goes_on_to_the_next_peer_and_says_why(nodes, caplog):
    """B's version of BLK rots and so does A's (B's first peer); C's reads. The repair takes
    A's blob (nothing to take: Unmended), logs that A has no good copy (not that the extent
    changed, not that A's copy "does not verify either"), then mends from C: one repair."""
    a, b, c = await nodes.add("A"), await nodes.add("B"), await nodes.add("C")
    await nodes.extent(VID, 0, ["A", "B", "C"], {BLK: block("old")})
    for n in (a, b, c):
        n.store.write(VID, 0, BLK * BLOCK_SIZE, block("new"), 2)
        n.store.flush(VID, 0)
    for n in (a, b):
        disk = Path(n.store.stat(VID, 0)["disk"])
        _rot_version(disk / f"{VID}.0.v", 1, BLK, n.store.extent_size // BLOCK_SIZE)
    assert b.store.verify(VID, 0) == [BLK]
    b.repair.start()
    with caplog.at_level(logging.INFO, logger="chunk.storage.repair"):
        assert b.repair.schedule(VID, 0, BLK)
        assert await b.repair.wait_idle(10)
    msgs = [r.getMessage() for r in caplog.records if r.name == "chunk.storage.repair"]
    assert any("A has no good copy of it either" in m and f"({BLK}, 1)" in m for m in msgs), msgs
    assert not any("changed meanwhile" in m or "does not verify either" in m for m in msgs), msgs
    assert any("repaired" in m and "from C" in m for m in msgs), msgs
    assert b.repair.status()["repaired"] == 1 and b.repair.status()["repair_failed"] == 0
    assert b.store.verify(VID, 0) == []
    assert b.store.read(VID, 0, BLK * BLOCK_SIZE, BLOCK_SIZE, view=1)[0] == block("old")
    await asyncio.sleep(0)


async def test_a_failing_version_trimmed_after_the_verdict_is_not_left(tmp_path):
    """The verdict names a rotten version; the reclaimer trims it before the mend (a trim
    does not move the token: the verdict holds). Nothing of the run fails any more: True,
    not ``Unmended`` for a version that is gone."""
    stores = []
    for name in ("L", "P"):
        s = ReplicaStore([(tmp_path / name, None)], extent_size=SIZE, cow_sync=True)
        s.create(V, 0, 1)
        s.write(V, 0, BLK * BLOCK_SIZE, blk("a"), 1)
        s.write(V, 0, BLK * BLOCK_SIZE, blk("b"), 2)
        s.flush(V, 0)
        stores.append(s)
    L, P = stores
    _rot_version(tmp_path / "L" / f"{V}.0.v", 1, BLK, SIZE // BLOCK_SIZE)
    verdict = await L.verify_verdict_async(V, 0, BLK, 1)
    assert verdict is not None and verdict.bad_versions == {(BLK, 1)}
    blob = P.export(V, 0, BLK * BLOCK_SIZE, BLOCK_SIZE)[0]
    assert L.trim(V, 0, set()) == 1
    assert await L.mend_async(V, 0, blob, verified=verdict) is True
    assert L.verify(V, 0) == []
