"""A block whose checksum reached the disk before its ``.seq`` entry (a power loss) keeps its
snapshots and its resync.

A volume's first writes are at seq 1, and a write at seq 1 syncs nothing (no snapshot can
have seen the block absent): data, checksum and ``.seq`` wait in the page cache for a FLUSH or
for writeback, which writes the files back in any order. A power loss after the ``.crc`` page
went out and before the ``.seq`` page did leaves a present block with seq 0 on disk, which no
write ever makes. The store counted it out of its COW floor (the lowest seq of a present block,
below which a write skips copy-on-write), so after a snapshot the block's first overwrite made
no copy and the snapshot read it as absent (zeros); and every export of it carried seq 0,
which an import refuses, so a resync from this copy (the only one left after a whole-cluster
power loss) failed for good.

The power loss is simulated on real files: ``.seq`` is put back to what the disk held at the
last flush, ``.data`` and ``.crc`` keep what the write put there; then a real restart.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from chunk.storage.extent_file import BLOCK_SIZE
from chunk.storage.replica_store import ReplicaStore

pytestmark = pytest.mark.timeout(60)

SIZE = 16 * BLOCK_SIZE
V = "vol-seq"
DATA = b"d" * BLOCK_SIZE


def _seq_lost_after_a_seq_1_write(d: Path) -> None:
    """Block 2 written at seq 1, unflushed; the power loss keeps its data and crc, not its seq."""
    s = ReplicaStore([(d, None)], extent_size=SIZE)          # cow_sync on, as served
    try:
        s.create(V, 0, 1)
        s.flush(V, 0)
        seq_file = d / f"{V}.0.seq"
        durable = seq_file.read_bytes()
        s.write(V, 0, 2 * BLOCK_SIZE, DATA, seq=1)
    finally:
        s.close()
    seq_file.write_bytes(durable)


def test_a_snapshot_keeps_a_block_whose_seq_was_lost(tmp_path: Path):
    d = tmp_path / "d0"
    _seq_lost_after_a_seq_1_write(d)
    s = ReplicaStore([(d, None)], extent_size=SIZE)           # the restart
    try:
        assert s.read(V, 0, 2 * BLOCK_SIZE, BLOCK_SIZE)[0] == DATA     # the volume shows it
        # Snapshot 1 is taken (the volume goes to seq 2); the block is overwritten.
        s.write(V, 0, 2 * BLOCK_SIZE, b"n" * BLOCK_SIZE, seq=2)
        assert s.read(V, 0, 2 * BLOCK_SIZE, BLOCK_SIZE, view=1)[0] == DATA, \
            "snapshot 1 lost the block it showed when taken"
        assert s.verify(V, 0) == []
    finally:
        s.close()


def test_a_block_whose_seq_was_lost_is_resynced(tmp_path: Path):
    d = tmp_path / "d0"
    _seq_lost_after_a_seq_1_write(d)
    src = ReplicaStore([(d, None)], extent_size=SIZE)
    dst = ReplicaStore([(tmp_path / "d1", None)], extent_size=SIZE)
    try:
        blob, nxt = src.export(V, 0, 0, SIZE)
        assert nxt is None
        dst.import_(V, 0, blob)                              # refused (seq 0) before the fix
        assert dst.read(V, 0, 2 * BLOCK_SIZE, BLOCK_SIZE)[0] == DATA
        assert dst.read(V, 0, 2 * BLOCK_SIZE, BLOCK_SIZE, view=1)[0] == DATA
        assert dst.digest(V, 0) == src.digest(V, 0)
    finally:
        src.close()
        dst.close()
