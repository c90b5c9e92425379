"""A block unmapped while absent and then written after a snapshot stays out of that snapshot
across a power loss.

An absent block made present at seq W > 1 has no version: only its seq keeps the new data out
of the snapshots before W, so its ``.seq`` entry is synced before its checksum (step 2 of the
write). An UNMAP at W of a block that is already absent (a host's fstrim or mkfs discarding
never-written space after a snapshot) set its seq to W in the page cache, unsynced; the write
at W that followed then saw seq W already, synced nothing, and a power loss could keep its
checksum and lose the seq: the snapshot taken before the write read the new data in place of
the absent block (zeros), changed for good. Now an unmap keeps an absent block's seq, and one
that zeroes part of an absent block (making it present) syncs its seq first, as a write does.

The power loss is simulated on real files: ``.seq`` is put back to its content at its last
completed fdatasync; ``.data`` and ``.crc`` keep what was written. Then a real restart.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from chunk.storage.extent_file import BLOCK_SIZE
from chunk.storage.replica_store import ReplicaStore

pytestmark = pytest.mark.timeout(60)

SIZE = 16 * BLOCK_SIZE
V = "vol-unmap-seq"
DATA = b"w" * BLOCK_SIZE


class SeqDurable:
    """``os.fdatasync`` that remembers the ``.seq`` file's content at each completed sync."""

    def __init__(self, seq_file: Path) -> None:
        self.seq_file, self.real = seq_file, os.fdatasync
        self.durable = seq_file.read_bytes()

    def __call__(self, fd: int) -> None:
        self.real(fd)
        if os.readlink(f"/proc/self/fd/{fd}") == str(self.seq_file):
            self.durable = self.seq_file.read_bytes()


def _run(s: ReplicaStore, call, deferred: bool) -> None:
    """A store call made inline, or as the replica server makes it (with the owner's epoch)."""
    later = call(epoch=1 if deferred else 0)
    if later is not None:
        asyncio.run(later)


@pytest.mark.parametrize("deferred", [False, True], ids=["inline", "deferred"])
@pytest.mark.parametrize("discard", [(0, 4 * BLOCK_SIZE), (2 * BLOCK_SIZE + 512, 1024)],
                         ids=["whole-blocks", "inside-the-block"])
def test_a_discarded_absent_block_written_after_a_snapshot_stays_out_of_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, deferred: bool, discard: tuple[int, int]):
    """Whole blocks: the unmap keeps an absent block's seq, so the write crosses (syncs it).
    A part of a block: the unmap writes its zeros, making it present at W like a write, and
    syncs its seq first as a write would."""
    d = tmp_path / "d0"
    s = ReplicaStore([(d, None)], extent_size=SIZE)          # cow_sync on, as served
    try:
        s.create(V, 0, 1)
        s.admit(V, 0, 1)
        s.write(V, 0, 0, b"a" * BLOCK_SIZE, seq=1)            # the volume holds something
        s.flush(V, 0)
        disk = SeqDurable(d / f"{V}.0.seq")
        monkeypatch.setattr(os, "fdatasync", disk)
        # Snapshot 1 is taken (seq 2). Block 2 was never written: discarded, then written.
        _run(s, lambda epoch: s.unmap(V, 0, *discard, seq=2, epoch=epoch), deferred)
        _run(s, lambda epoch: s.write(V, 0, 2 * BLOCK_SIZE, DATA, seq=2, epoch=epoch), deferred)
        assert s.read(V, 0, 2 * BLOCK_SIZE, BLOCK_SIZE, view=1)[0] == bytes(BLOCK_SIZE)
    finally:
        s.close()
    (d / f"{V}.0.seq").write_bytes(disk.durable)             # the power loss, before a flush
    monkeypatch.undo()
    s = ReplicaStore([(d, None)], extent_size=SIZE)
    try:
        assert s.read(V, 0, 2 * BLOCK_SIZE, BLOCK_SIZE)[0] == DATA     # unflushed, but kept
        assert s.read(V, 0, 2 * BLOCK_SIZE, BLOCK_SIZE, view=1)[0] == bytes(BLOCK_SIZE), \
            "snapshot 1 shows a block written after it"
        assert s.read(V, 0, 0, BLOCK_SIZE, view=1)[0] == b"a" * BLOCK_SIZE
    finally:
        s.close()


def test_an_unmap_zeroing_part_of_an_absent_block_syncs_off_the_loop(tmp_path: Path):
    """With an epoch (the replica server's call) the edge's ``.seq`` sync is due: the unmap
    comes back as a coroutine (its sync in a worker thread), never a sync on the loop."""
    with ReplicaStore([(tmp_path / "d0", None)], extent_size=SIZE) as s:
        s.create(V, 0, 1)
        s.admit(V, 0, 1)
        s.write(V, 0, 0, b"a" * BLOCK_SIZE, seq=1)
        later = s.unmap(V, 0, 2 * BLOCK_SIZE + 512, 1024, seq=2, epoch=1)
        assert later is not None, "synced .seq inline, on the event loop"
        asyncio.run(later)
        assert s.read(V, 0, 2 * BLOCK_SIZE, BLOCK_SIZE, view=1)[0] == bytes(BLOCK_SIZE)


def test_only_the_ranges_own_edges_are_partial_blocks(tmp_path: Path):
    """A long unmap at an unaligned offset is cut in 1 MiB pieces that end on block
    boundaries: the blocks at the pieces' joins are punched (absent), not zeroed (present)."""
    size = 4 << 20
    with ReplicaStore([(tmp_path / "d0", None)], extent_size=size) as s:
        s.create(V, 0, 1)
        s.write(V, 0, 0, b"a" * size, seq=1)
        s.unmap(V, 0, 512, 3 << 20, seq=1)
        crcs = s._get(V, 0).ext.crcs                              # noqa: SLF001
        edges = {0, (512 + (3 << 20)) // BLOCK_SIZE}
        assert [b for b in range(1, (3 << 20) // BLOCK_SIZE) if crcs[b]] == [], "joins zeroed"
        assert all(crcs[b] for b in edges)                           # the range's own edges
