"""A mend that stops after creating a version file does not leave it behind empty (audit 19,
item 2).

``mend_async`` creates ``K.ver`` for a version the peer has and this replica lacks, writes its
data, and waits for the new directory entry's fsync and the barrier before the slot. An IMPORT
(or trim, revert) changing the block meanwhile makes it stop there (False): the file, holding
no slot, stayed in the replica's versions and on disk (4 KiB of data, plus the slot page)
until a restart's load dropped it. Now the mend unlinks the files it created and left empty;
a file that got a slot meanwhile (the import's own versions) is kept. In a version file that
was there already, the data it wrote without a slot is punched (it stayed allocated until the
whole file went).

Real stores on tmp_path; one sync of the mend is held in its worker thread (``HeldSync``).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from chunk.storage.extent_file import BLOCK_SIZE
from chunk.storage.replica_store import ReplicaStore

from .test_audit18_store_mend_races import BLK, V, HeldSync, _mend_held, _pair, _rot, blk

pytestmark = pytest.mark.timeout(60)


def _ver(tmp_path: Path, key: int) -> Path:
    return tmp_path / "L" / f"{V}.0.v" / f"{key}.ver"


async def _stopped_mend(tmp_path, monkeypatch, suffix, nth, trimmed_peer: bool):
    """L's BLK rots; its repair fetched P's block at seq 2 (with the version key 1 L lacks:
    the mend creates ``1.ver``); P takes seq 3 (and, ``trimmed_peer``, trims every version),
    and that state is IMPORTed into L while the mend waits for a sync: it stops, False."""
    L, P = _pair(tmp_path)
    P.write(V, 0, BLK * BLOCK_SIZE, blk("n"), 2)
    fetched = P.export(V, 0, BLK * BLOCK_SIZE, BLOCK_SIZE)[0]
    P.write(V, 0, BLK * BLOCK_SIZE, blk("N"), 3)
    if trimmed_peer:
        P.trim(V, 0, set())
    current = P.export(V, 0, BLK * BLOCK_SIZE, BLOCK_SIZE)[0]
    _rot(tmp_path / "L" / f"{V}.0.data", BLK * BLOCK_SIZE)
    verdict = await L.verify_verdict_async(V, 0, BLK, 1)
    held = HeldSync(monkeypatch, suffix, nth)
    mend = await _mend_held(L, fetched, verdict, held)
    assert _ver(tmp_path, 1).exists(), "the mend created the version file"
    try:
        assert L.import_(V, 0, current)
    finally:
        held.proceed.set()
    assert await asyncio.wait_for(mend, 10) is False
    monkeypatch.undo()
    return L, P


@pytest.mark.parametrize("suffix,nth", [(".v", 1), (".ver", 1)])
async def test_a_stopped_mend_unlinks_the_empty_version_file_it_created(tmp_path, monkeypatch,
                                                                       suffix, nth):
    L, P = await _stopped_mend(tmp_path, monkeypatch, suffix, nth, trimmed_peer=True)
    rep = L._replicas[(V, 0)]
    assert 1 not in rep.versions and 1 not in rep.keys
    assert not _ver(tmp_path, 1).exists(), "an empty version file left until a restart"
    L.flush(V, 0)
    assert L.verify(V, 0) == []
    assert L.digest(V, 0) == P.digest(V, 0)
    assert L.read(V, 0, BLK * BLOCK_SIZE, BLOCK_SIZE)[0] == blk("N")
    # A write after a new snapshot creates key 3's file again as usual.
    L.write(V, 0, BLK * BLOCK_SIZE, blk("x"), 4)
    assert L.read(V, 0, BLK * BLOCK_SIZE, BLOCK_SIZE, view=3)[0] == blk("N")


async def test_a_file_the_import_filled_meanwhile_is_kept(tmp_path, monkeypatch):
    """The import brings version key 1 itself, into the file the mend created: kept."""
    L, P = await _stopped_mend(tmp_path, monkeypatch, ".ver", 1, trimmed_peer=False)
    rep = L._replicas[(V, 0)]
    assert 1 in rep.versions and rep.versions[1].entries and _ver(tmp_path, 1).exists()
    L.flush(V, 0)
    assert L.verify(V, 0) == []
    assert L.digest(V, 0) == P.digest(V, 0)
    assert L.read(V, 0, BLK * BLOCK_SIZE, BLOCK_SIZE, view=1)[0] == blk("a")


async def test_a_reopened_store_matches(tmp_path, monkeypatch):
    """After the unlink (not synced: the next flush syncs ``.v``), a reopen sees the same."""
    L, P = await _stopped_mend(tmp_path, monkeypatch, ".v", 1, trimmed_peer=True)
    assert L._replicas[(V, 0)].vdir_dirty
    L.flush(V, 0)
    digest = L.digest(V, 0)
    L.close()
    L2 = ReplicaStore([(tmp_path / "L", None)], extent_size=32 * BLOCK_SIZE, cow_sync=True)
    assert L2.digest(V, 0) == digest == P.digest(V, 0)
    assert L2.verify(V, 0) == []


async def test_a_mend_cancelled_in_its_barrier_unlinks_the_file_too(tmp_path, monkeypatch):
    """The repair's task cancelled (a server stopping) while the mend waits for the barrier
    after the new version's data: the file holds no slot; it goes as well."""
    L, P = _pair(tmp_path)
    P.write(V, 0, BLK * BLOCK_SIZE, blk("n"), 2)
    fetched = P.export(V, 0, BLK * BLOCK_SIZE, BLOCK_SIZE)[0]
    _rot(tmp_path / "L" / f"{V}.0.data", BLK * BLOCK_SIZE)
    verdict = await L.verify_verdict_async(V, 0, BLK, 1)
    held = HeldSync(monkeypatch, ".ver", 1)
    mend = await _mend_held(L, fetched, verdict, held)
    mend.cancel()
    await asyncio.sleep(0)
    held.proceed.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(mend, 10)
    monkeypatch.undo()
    rep = L._replicas[(V, 0)]
    assert 1 not in rep.versions and not _ver(tmp_path, 1).exists()
    while rep.busy:                      # the hold lasts until the barrier's sync is over
        await asyncio.sleep(0.01)
    assert L.verify(V, 0) == [BLK]       # not mended: the repair's next attempt does it
    assert await L.mend_async(V, 0, fetched,
                              verified=await L.verify_verdict_async(V, 0, BLK, 1)) is True
    L.flush(V, 0)
    assert L.verify(V, 0) == [] and L.digest(V, 0) == P.digest(V, 0)


def _allocated(path: Path, offset: int) -> bool:
    """Whether the 4 KiB of ``path`` at ``offset`` hold data (not a hole)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) < offset + BLOCK_SIZE
    except OSError:                      # ENXIO: no data from there on
        return False
    finally:
        os.close(fd)


async def test_a_stopped_mend_punches_its_data_in_a_file_that_was_there(tmp_path, monkeypatch):
    """Version key 1 exists on both (block 7's); P also has block 3's there, which L lacks.
    L's live block 3 rots and its mend writes P's version data into L's ``1.ver`` at block
    3, then stops (an IMPORT of P's later, trimmed state during the barrier). The file stays
    (block 7's slot), but block 3's data, which no slot names, is punched, not left there."""
    stores = []
    for name in ("L", "P"):
        s = ReplicaStore([(tmp_path / name, None)], extent_size=32 * BLOCK_SIZE, cow_sync=True)
        s.create(V, 0, 1)
        s.write(V, 0, BLK * BLOCK_SIZE, blk("a"), 1)
        s.write(V, 0, 7 * BLOCK_SIZE, blk("7"), 1)
        s.write(V, 0, 7 * BLOCK_SIZE, blk("8"), 2)          # version key 1 of block 7
        s.flush(V, 0)
        stores.append(s)
    L, P = stores
    P.write(V, 0, BLK * BLOCK_SIZE, blk("n"), 2)            # key 1 of block 3: P only
    fetched = P.export(V, 0, BLK * BLOCK_SIZE, BLOCK_SIZE)[0]
    P.write(V, 0, BLK * BLOCK_SIZE, blk("N"), 3)
    P.trim(V, 0, set())
    current = P.export(V, 0, BLK * BLOCK_SIZE, BLOCK_SIZE)[0]
    _rot(tmp_path / "L" / f"{V}.0.data", BLK * BLOCK_SIZE)
    verdict = await L.verify_verdict_async(V, 0, BLK, 1)
    data_at = BLOCK_SIZE                                     # 32 slots fit the first page
    assert not _allocated(_ver(tmp_path, 1), data_at + BLK * BLOCK_SIZE)
    held = HeldSync(monkeypatch, ".ver", 1)
    mend = await _mend_held(L, fetched, verdict, held)
    assert _allocated(_ver(tmp_path, 1), data_at + BLK * BLOCK_SIZE), "the mend wrote it"
    try:
        assert L.import_(V, 0, current)
    finally:
        held.proceed.set()
    assert await asyncio.wait_for(mend, 10) is False
    monkeypatch.undo()
    rep = L._replicas[(V, 0)]
    assert sorted(rep.versions[1].entries) == [7]
    assert not _allocated(_ver(tmp_path, 1), data_at + BLK * BLOCK_SIZE), "left allocated"
    assert _allocated(_ver(tmp_path, 1), data_at + 7 * BLOCK_SIZE)
    L.flush(V, 0)
    assert L.verify(V, 0) == []
    assert L.read(V, 0, 7 * BLOCK_SIZE, BLOCK_SIZE, view=1)[0] == blk("7")
    assert L.read(V, 0, BLK * BLOCK_SIZE, BLOCK_SIZE)[0] == blk("N")
