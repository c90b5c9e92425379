"""ReplicaStore: COW snapshot views by seq, revert, trim, export/import, restart, checksums.

Real files in tmp_path, no mocks.  Most tests use a small extent size so a
whole-extent model comparison stays cheap; the default size is covered too.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import threading
from pathlib import Path

import msgpack
import pytest

from chunk.storage.extent_file import BLOCK_SIZE, EXTENT_SIZE, ChecksumError, block_crc
from chunk.storage.fencing import StaleEpochError
from chunk.storage.replica_store import (
    NoExtent, ReplicaStore, StaleGeneration, StoreError, StoreFull, StoreIOError, unreadable_blocks,
)
from tests.chunk.storage.worker_syncs import closes_of, hold_syncs, replica_fds
from tests.cluster import async_wait_for

pytestmark = pytest.mark.timeout(120)

BLOCKS = 32
SIZE = BLOCKS * BLOCK_SIZE
V = "vol-a"


def _pat(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed * 13 + (i >> 12)) % 251 for i in range(n))


def _bits(bitmap: bytes, n: int) -> list[bool]:
    return [bool(bitmap[k >> 3] >> (k & 7) & 1) for k in range(n)]


@pytest.fixture
def store(tmp_path: Path):
    s = ReplicaStore([(tmp_path / "d0", None)], extent_size=SIZE)
    yield s
    s.close()


def test_snapshot_view_keeps_old_data(store: ReplicaStore):
    store.create(V, 0, 1)
    a, b = _pat(2 * BLOCK_SIZE, 1), _pat(BLOCK_SIZE, 2)
    store.write(V, 0, 0, a, seq=1)
    store.write(V, 0, BLOCK_SIZE, b, seq=2)          # after a snapshot with seq 1
    live, present = store.read(V, 0, 0, 3 * BLOCK_SIZE)
    assert live == a[:BLOCK_SIZE] + b + bytes(BLOCK_SIZE)
    assert _bits(present, 3) == [True, True, False]
    old, present = store.read(V, 0, 0, 2 * BLOCK_SIZE, view=1)
    assert old == a and _bits(present, 2) == [True, True]
    assert store.read(V, 0, 0, 2 * BLOCK_SIZE, view=2)[0] == a[:BLOCK_SIZE] + b
    # a second write in the same seq does not make another version
    store.write(V, 0, BLOCK_SIZE, _pat(BLOCK_SIZE, 3), seq=2)
    assert store.read(V, 0, BLOCK_SIZE, BLOCK_SIZE, view=1)[0] == a[BLOCK_SIZE:]
    # view 0 is live; blocks written after the view are absent in it
    store.write(V, 0, 5 * BLOCK_SIZE, b, seq=2)
    data, present = store.read(V, 0, 5 * BLOCK_SIZE, BLOCK_SIZE, view=1)
    assert data == bytes(BLOCK_SIZE) and _bits(present, 1) == [False]


def test_partial_block_writes_and_unaligned_reads(store: ReplicaStore):
    store.create(V, 0, 1)
    store.write(V, 0, 100, b"x" * 50, seq=1)
    data, present = store.read(V, 0, 0, BLOCK_SIZE + 10)
    assert data == bytes(100) + b"x" * 50 + bytes(BLOCK_SIZE + 10 - 150)
    assert _bits(present, 2) == [True, False]
    store.write(V, 0, BLOCK_SIZE - 5, b"y" * 10, seq=2)     # straddles blocks 0 and 1
    data, _ = store.read(V, 0, 90, BLOCK_SIZE)
    expect = bytearray(SIZE)
    expect[100:150] = b"x" * 50
    expect[BLOCK_SIZE - 5:BLOCK_SIZE + 5] = b"y" * 10
    assert data == expect[90:90 + BLOCK_SIZE]
    old, present = store.read(V, 0, 0, 2 * BLOCK_SIZE, view=1)
    assert old[:BLOCK_SIZE] == bytes(100) + b"x" * 50 + bytes(BLOCK_SIZE - 150)
    assert _bits(present, 2) == [True, False]


def test_unmap_absent_versus_zero(store: ReplicaStore):
    store.create(V, 0, 1)
    store.write(V, 0, 0, _pat(8 * BLOCK_SIZE, 1), seq=1)
    store.unmap(V, 0, 0, 2 * BLOCK_SIZE, seq=2)
    store.unmap(V, 0, 4 * BLOCK_SIZE, 2 * BLOCK_SIZE, seq=2, zero=True)
    data, present = store.read(V, 0, 0, 8 * BLOCK_SIZE)
    assert _bits(present, 8) == [False, False, True, True, True, True, True, True]
    expect = bytearray(_pat(8 * BLOCK_SIZE, 1))
    expect[:2 * BLOCK_SIZE] = bytes(2 * BLOCK_SIZE)
    expect[4 * BLOCK_SIZE:6 * BLOCK_SIZE] = bytes(2 * BLOCK_SIZE)
    assert data == expect
    assert store.read(V, 0, 0, 8 * BLOCK_SIZE, view=1)[0] == _pat(8 * BLOCK_SIZE, 1)
    # unmapping an absent block needs no version; whole-extent unmap works
    store.unmap(V, 0, 0, SIZE, seq=3)
    data, present = store.read(V, 0, 0, SIZE)
    assert data == bytes(SIZE) and not any(present)
    assert store.read(V, 0, 0, 8 * BLOCK_SIZE, view=2)[0] == expect


def test_revert_restores_view_and_keeps_newer_snapshots(store: ReplicaStore):
    store.create(V, 0, 1)
    a = _pat(4 * BLOCK_SIZE, 1)
    store.write(V, 0, 0, a, seq=1)                         # snapshot 1 = a
    store.write(V, 0, BLOCK_SIZE, _pat(BLOCK_SIZE, 2), seq=2)
    store.write(V, 0, 6 * BLOCK_SIZE, _pat(BLOCK_SIZE, 3), seq=2)   # absent at 1
    store.unmap(V, 0, 2 * BLOCK_SIZE, BLOCK_SIZE, seq=2)   # snapshot 2 = this state
    snap2 = store.read(V, 0, 0, SIZE)
    store.write(V, 0, 3 * BLOCK_SIZE, _pat(BLOCK_SIZE, 4), seq=3)
    store.revert(V, 0, to_seq=1, seq=3)
    data, present = store.read(V, 0, 0, SIZE)
    assert data == a + bytes(SIZE - len(a))
    assert _bits(present, BLOCKS) == [True] * 4 + [False] * (BLOCKS - 4)
    assert store.read(V, 0, 0, SIZE, view=2) == snap2       # newer snapshot unharmed
    assert store.read(V, 0, 0, 4 * BLOCK_SIZE, view=1)[0] == a
    store.revert(V, 0, to_seq=2, seq=4)
    assert store.read(V, 0, 0, SIZE) == snap2
    assert store.read(V, 0, 0, SIZE, view=3)[0] == a + bytes(SIZE - len(a))


def test_trim_frees_space_and_keeps_needed_versions(store: ReplicaStore, tmp_path: Path):
    store.create(V, 0, 1)
    store.write(V, 0, 0, _pat(SIZE, 1), seq=1)               # snapshot 1
    store.write(V, 0, 0, _pat(SIZE, 2), seq=2)               # snapshot 2
    store.write(V, 0, 0, _pat(SIZE // 2, 3), seq=3)
    store.flush(V, 0)
    before = store.stat(V, 0)["allocated"]
    assert before >= 3 * SIZE // 2 + SIZE
    assert store.trim(V, 0, {1, 2}) == 0
    assert store.trim(V, 0, {2}) == BLOCKS                   # versions (1, 1) go
    after = store.stat(V, 0)["allocated"]
    assert after <= before - SIZE
    assert not (tmp_path / "d0" / f"{V}.0.v" / "1.ver").exists()
    assert store.read(V, 0, 0, SIZE, view=2)[0] == _pat(SIZE, 2)
    data, present = store.read(V, 0, 0, SIZE, view=1)       # gone: only live at seq<=1 is left
    assert not any(present) and data == bytes(SIZE)
    # a version spanning several snapshots stays while any of them exists
    store.write(V, 0, 0, _pat(BLOCK_SIZE, 4), seq=5)        # version (3, 4) of block 0
    assert store.trim(V, 0, {4}) == BLOCKS // 2              # (2, 2) of blocks 16.. gone
    assert store.read(V, 0, 0, BLOCK_SIZE, view=4)[0] == _pat(BLOCK_SIZE, 3)
    assert store.trim(V, 0, set()) >= 1
    assert store.stat(V, 0)["allocated"] < after


def _populate(store: ReplicaStore, vid: str, rng: random.Random, blocks: int) -> None:
    """Several snapshots' worth of writes, unmaps and partial writes."""
    store.create(vid, 0, 1)
    for seq in range(1, 6):
        for _ in range(12):
            off = rng.randrange(blocks * BLOCK_SIZE - 1)
            n = rng.randrange(1, min(3 * BLOCK_SIZE, blocks * BLOCK_SIZE - off) + 1)
            kind = rng.random()
            if kind < 0.7:
                store.write(vid, 0, off, rng.randbytes(n), seq=seq)
            else:
                store.unmap(vid, 0, off, n, seq=seq, zero=kind < 0.8)


def test_export_import_round_trip_equal_digest(tmp_path: Path):
    with ReplicaStore([(tmp_path / "a", None)], extent_size=SIZE) as src, \
            ReplicaStore([(tmp_path / "b", None)], extent_size=SIZE) as dst:
        _populate(src, V, random.Random(5), BLOCKS)
        blob, nxt = src.export(V, 0, 0, SIZE, max_bytes=64 << 20)
        assert nxt is None
        assert dst.import_(V, 0, blob)
        assert dst.stat(V, 0)["generation"] == 0
        assert dst.digest(V, 0) == src.digest(V, 0)
        for view in range(0, 6):
            assert dst.read(V, 0, 0, SIZE, view) == src.read(V, 0, 0, SIZE, view)
        # in small pieces, over an existing different state
        with ReplicaStore([(tmp_path / "c", None)], extent_size=SIZE) as third:
            _populate(third, V, random.Random(99), BLOCKS)
            assert third.digest(V, 0) != src.digest(V, 0)
            offset, calls = 0, 0
            while True:
                blob, nxt = src.export(V, 0, offset, SIZE - offset, max_bytes=3 * BLOCK_SIZE)
                assert len(blob) <= 3 * BLOCK_SIZE or nxt is None or nxt == offset + BLOCK_SIZE
                assert third.import_(V, 0, blob)
                calls += 1
                if nxt is None:
                    break
                assert nxt > offset
                offset = nxt
            assert calls > 5
            assert third.digest(V, 0) == src.digest(V, 0)
            for view in range(0, 6):
                assert third.read(V, 0, 0, SIZE, view) == src.read(V, 0, 0, SIZE, view)


def test_unreadable_blocks_are_copied_failing_and_the_rest_of_the_extent_exactly(tmp_path: Path):
    """A rotten live block and a rotten version on the only source: the copy completes, every
    other block and version equals the source's, and the rotten ones fail their checksum on
    the copy too (never zeros, never wrong data); scrub and digest see what they see there."""
    with ReplicaStore([(tmp_path / "a", None)], extent_size=SIZE) as src, \
            ReplicaStore([(tmp_path / "b", None)], extent_size=SIZE) as dst:
        src.create(V, 0, 1)
        src.write(V, 0, 0, _pat(8 * BLOCK_SIZE, 1), seq=1)
        src.write(V, 0, 0, _pat(2 * BLOCK_SIZE, 2), seq=2)          # versions of blocks 0, 1
        _flip(tmp_path / "a" / f"{V}.0.data", 5 * BLOCK_SIZE + 9)
        _flip(tmp_path / "a" / f"{V}.0.v" / "1.ver", BLOCK_SIZE + BLOCK_SIZE + 3)   # version of 1
        offset = 0
        while offset is not None:                                   # in pieces, as a rebuild
            blob, offset = src.export(V, 0, offset or 0, SIZE - (offset or 0),
                                      max_bytes=3 * BLOCK_SIZE)
            assert dst.import_(V, 0, blob)
        assert dst.digest(V, 0) == src.digest(V, 0)
        assert dst.verify(V, 0) == src.verify(V, 0) == [1, 5]
        with pytest.raises(ChecksumError):
            dst.read(V, 0, 5 * BLOCK_SIZE, BLOCK_SIZE)
        with pytest.raises(ChecksumError):
            dst.read(V, 0, BLOCK_SIZE, BLOCK_SIZE, view=1)
        for b in [b for b in range(BLOCKS) if b != 5]:
            assert dst.read(V, 0, b * BLOCK_SIZE, BLOCK_SIZE) == src.read(V, 0, b * BLOCK_SIZE, BLOCK_SIZE)
        assert dst.read(V, 0, 0, BLOCK_SIZE, view=1) == src.read(V, 0, 0, BLOCK_SIZE, view=1)
        # A peer's unreadable block is not taken as absent by a block repair either.
        dst.mend(V, 0, src.export(V, 0, 5 * BLOCK_SIZE, BLOCK_SIZE)[0])
        with pytest.raises(ChecksumError):
            dst.read(V, 0, 5 * BLOCK_SIZE, BLOCK_SIZE)
        assert dst.verify(V, 0) == [1, 5]


def test_import_if_unchanged_conflict(tmp_path: Path):
    with ReplicaStore([(tmp_path / "a", None)], extent_size=SIZE) as src, \
            ReplicaStore([(tmp_path / "b", None)], extent_size=SIZE) as dst:
        src.create(V, 0, 1)
        src.write(V, 0, 0, _pat(BLOCK_SIZE, 1), seq=1)
        blob, _ = src.export(V, 0, 0, SIZE)
        dst.create(V, 0, 1)
        token = dst.stat(V, 0)["mutations"]
        dst.write(V, 0, BLOCK_SIZE, _pat(BLOCK_SIZE, 2), seq=1)      # races the repair
        assert dst.stat(V, 0)["mutations"] != token
        assert dst.import_(V, 0, blob, if_unchanged=token) is False
        assert dst.read(V, 0, BLOCK_SIZE, BLOCK_SIZE)[0] == _pat(BLOCK_SIZE, 2)   # nothing applied
        assert dst.read(V, 0, 0, BLOCK_SIZE)[0] == bytes(BLOCK_SIZE)
        token = dst.stat(V, 0)["mutations"]
        assert dst.import_(V, 0, blob, if_unchanged=token) is True
        assert dst.digest(V, 0) == src.digest(V, 0)
        assert dst.stat(V, 0)["mutations"] == token + 1
        with pytest.raises(StoreError):
            dst.import_(V, 0, b"\x01garbage")


def test_restart_keeps_everything(tmp_path: Path):
    disks = [(tmp_path / "a", None), (tmp_path / "b", None)]
    with ReplicaStore(disks, extent_size=SIZE) as s:
        _populate(s, V, random.Random(7), BLOCKS)
        _populate(s, "vol-b", random.Random(8), BLOCKS)
        s.set_generation(V, 0, 7)
        s.admit(V, 0, 4)
        views = {v: s.read(V, 0, 0, SIZE, v) for v in range(6)}
        digests = {k: s.digest(*k) for k in s.extents()}
        stat = s.stat(V, 0)
    with ReplicaStore(disks, extent_size=SIZE) as s:       # not flushed: page cache suffices
        assert s.bad == []
        assert {k: s.digest(*k) for k in s.extents()} == digests
        assert {v: s.read(V, 0, 0, SIZE, v) for v in range(6)} == views
        st = s.stat(V, 0)
        assert (st["generation"], st["epoch"], st["disk"]) == (7, 4, stat["disk"])
        with pytest.raises(StaleEpochError):
            s.admit(V, 0, 3)
        s.write(V, 0, 0, b"z" * BLOCK_SIZE, seq=6)          # COW works after reopen
        assert s.read(V, 0, 0, SIZE, 5) == views[0]


def _flip(path: Path, offset: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        b = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([b[0] ^ 0x40]), offset)
    finally:
        os.close(fd)


def test_flipped_byte_raises_checksum_error_and_verify_reports(store: ReplicaStore, tmp_path: Path):
    store.create(V, 0, 1)
    store.write(V, 0, 0, _pat(8 * BLOCK_SIZE, 1), seq=1)
    store.write(V, 0, 0, _pat(2 * BLOCK_SIZE, 2), seq=2)     # versions of blocks 0, 1
    store.flush(V, 0)
    assert store.verify(V, 0) == []
    _flip(tmp_path / "d0" / f"{V}.0.data", 5 * BLOCK_SIZE + 9)
    _flip(tmp_path / "d0" / f"{V}.0.v" / "1.ver", BLOCK_SIZE + BLOCK_SIZE + 3)   # slots, then block 1
    with pytest.raises(ChecksumError) as info:
        store.read(V, 0, 0, 8 * BLOCK_SIZE)
    assert info.value.block == 5
    with pytest.raises(ChecksumError) as info:
        store.read(V, 0, 0, 2 * BLOCK_SIZE, view=1)
    assert info.value.block == 1
    assert store.read(V, 0, 0, BLOCK_SIZE, view=1)[0] == _pat(BLOCK_SIZE, 1)
    assert store.verify(V, 0) == [1, 5]
    assert store.verify(V, 0, 2, 3) == []
    assert store.verify(V, 0, 0, 2) == [1]
    blob, _ = store.export(V, 0, 0, SIZE)     # never ships bad data to a peer: marks it
    state = msgpack.unpackb(blob)
    assert unreadable_blocks(blob) == [1, 5]
    assert [e[0] for e in state["bad_live"]] == [5] and 5 not in [e[0] for e in state["live"]]
    assert [(e[0], e[2]) for e in state["bad_versions"]] == [(1, 1)]
    assert (1, 1) not in [(e[0], e[2]) for e in state["versions"]]


def test_fence_stale_epoch(store: ReplicaStore):
    store.create(V, 0, 1)
    store.create(V, 1, 1)
    store.admit(V, 0, 5)
    store.admit(V, 0, 5)
    with pytest.raises(StaleEpochError):
        store.admit(V, 1, 4)                   # the fence is per volume
    store.admit(V, 1, 0)                       # read-only users always pass
    store.admit(V, 1, 6)
    assert store.stat(V, 1)["epoch"] == 6
    # an extent not here yet: the volume's epoch still fences, and a new extent keeps it
    with pytest.raises(StaleEpochError):
        store.admit(V, 2, 5)
    store.admit(V, 2, 7)
    store.create(V, 2, 1)
    assert store.stat(V, 2)["epoch"] == 7
    with pytest.raises(NoExtent):
        store.read(V, 3, 0, 1)


def test_full_disk_and_placement(tmp_path: Path):
    with ReplicaStore([(tmp_path / "small", 10 << 20)]) as s:
        with pytest.raises(StoreFull):
            s.create(V, 0, 1)
        assert s.usage()[0]["capacity"] == 10 << 20
    limit = 3 * EXTENT_SIZE // 2
    with ReplicaStore([(tmp_path / "a", limit), (tmp_path / "b", limit + (1 << 20))]) as s:
        s.create(V, 0, 1)                      # the disk with the most free space
        assert s.stat(V, 0)["disk"] == str(tmp_path / "b")
        s.create(V, 0, 1)                      # idempotent
        s.write(V, 0, 0, _pat(2 << 20, 1), seq=1)          # b now has less free space than a
        s.create(V, 1, 1)
        assert s.stat(V, 1)["disk"] == str(tmp_path / "a")
        s.write(V, 1, 0, b"\x5a" * (EXTENT_SIZE // 2 + BLOCK_SIZE), seq=1)    # thin: counts what is written
        usage = {u["path"]: u for u in s.usage()}
        assert usage[str(tmp_path / "a")]["used"] > EXTENT_SIZE // 2
        assert usage[str(tmp_path / "a")]["state"] == "ok"
        s.create(V, 2, 1)
        assert s.stat(V, 2)["disk"] == str(tmp_path / "b")
        s.write(V, 2, 0, b"\x5b" * (EXTENT_SIZE // 2 + BLOCK_SIZE), seq=1)
        with pytest.raises(StoreFull):          # neither has 64 MiB left
            s.create(V, 3, 1)
        s.delete(V, 1)
        s.create(V, 3, 1)
        assert sorted(s.extents()) == [(V, 0), (V, 2), (V, 3)]
        with pytest.raises(NoExtent):
            s.read(V, 1, 0, 1)


def test_digest_equal_for_equal_state_on_different_disks(tmp_path: Path):
    with ReplicaStore([(tmp_path / "a", None)], extent_size=SIZE) as a, \
            ReplicaStore([(tmp_path / "x", None), (tmp_path / "y", None)], extent_size=SIZE) as b:
        b.create("other", 0, 1)                 # a different layout on b
        _populate(a, V, random.Random(3), BLOCKS)
        _populate(b, V, random.Random(3), BLOCKS)
        assert a.digest(V, 0) == b.digest(V, 0)
        assert len(a.digest(V, 0)) == 32
        b.write(V, 0, 0, b"q", seq=5)
        assert a.digest(V, 0) != b.digest(V, 0)


def test_default_extent_size_no_snapshot_path(tmp_path: Path):
    """The hot path: seq 1 only, no versions are ever made, the seq table is written once."""
    with ReplicaStore([(tmp_path / "d", None)]) as s:
        s.create(V, 9, 1)
        data = _pat(1 << 20, 1)
        for i in range(4):
            s.write(V, 9, EXTENT_SIZE - (1 << 20), data, seq=1, fua=i == 3)
        assert s.read(V, 9, EXTENT_SIZE - (1 << 20), 1 << 20)[0] == data
        assert not (tmp_path / "d" / f"{V}.9.v").exists()
        seqs = (tmp_path / "d" / f"{V}.9.seq").read_bytes()
        assert seqs[-1024:] == b"\x01\x00\x00\x00" * 256 and seqs[:-1024] == bytes(len(seqs) - 1024)
        assert s.digest(V, 9) != s.digest(V, 9)[::-1]


def test_bad_extent_reported_not_fatal(tmp_path: Path):
    with ReplicaStore([(tmp_path / "d", None)], extent_size=SIZE) as s:
        s.create(V, 0, 1)
        s.create(V, 1, 1)
        s.write(V, 1, 0, b"k", seq=1)
    (tmp_path / "d" / f"{V}.0.hdr").write_bytes(b"junk")
    (tmp_path / "d" / f"{V}.1.seq").write_bytes(b"short")
    with ReplicaStore([(tmp_path / "d", None)], extent_size=SIZE) as s:
        assert sorted(p.name for p in s.bad) == [f"{V}.0.hdr", f"{V}.1.hdr"]
        assert s.extents() == []


# -- model-based ---------------------------------------------------------------------


class _Model:
    """Per block: bytes (present) or None (absent); snapshots are frozen copies."""

    def __init__(self) -> None:
        self.live: list[bytes | None] = [None] * BLOCKS
        self.snaps: dict[int, list[bytes | None]] = {}
        self.seq = 1

    def write(self, off: int, data: bytes) -> None:
        end = off + len(data)
        for b in range(off // BLOCK_SIZE, (end - 1) // BLOCK_SIZE + 1):
            blk = bytearray(self.live[b] or bytes(BLOCK_SIZE))
            lo, hi = max(off, b * BLOCK_SIZE), min(end, (b + 1) * BLOCK_SIZE)
            blk[lo - b * BLOCK_SIZE:hi - b * BLOCK_SIZE] = data[lo - off:hi - off]
            self.live[b] = bytes(blk)

    def unmap(self, off: int, n: int, zero: bool) -> None:
        if zero:
            self.write(off, bytes(n))
            return
        end = off + n
        for b in range(off // BLOCK_SIZE, (end - 1) // BLOCK_SIZE + 1):
            if off <= b * BLOCK_SIZE and (b + 1) * BLOCK_SIZE <= end:
                self.live[b] = None
            else:
                lo, hi = max(off, b * BLOCK_SIZE), min(end, (b + 1) * BLOCK_SIZE)
                self.write(lo, bytes(hi - lo))

    def image(self, blocks: list[bytes | None]) -> tuple[bytes, list[bool]]:
        return (b"".join(x or bytes(BLOCK_SIZE) for x in blocks), [x is not None for x in blocks])


def _check(store: ReplicaStore, model: _Model) -> None:
    data, present = store.read(V, 0, 0, SIZE)
    assert (data, _bits(present, BLOCKS)) == model.image(model.live)
    for s, blocks in model.snaps.items():
        data, present = store.read(V, 0, 0, SIZE, view=s)
        assert (data, _bits(present, BLOCKS)) == model.image(blocks), f"view {s}"


@pytest.mark.parametrize("seed", range(6))
def test_random_ops_match_model(tmp_path: Path, seed: int):
    rng = random.Random(seed)
    disks = [(tmp_path / "d", None)]
    store = ReplicaStore(disks, extent_size=SIZE, cow_sync=False)
    model = _Model()
    store.create(V, 0, 1)
    try:
        for step in range(250):
            r = rng.random()
            off = rng.randrange(SIZE - 1)
            n = rng.randrange(1, min(4 * BLOCK_SIZE, SIZE - off) + 1)
            if rng.random() < 0.5:              # aligned ops are the common case
                off -= off % BLOCK_SIZE
                n = max(BLOCK_SIZE, n - n % BLOCK_SIZE)
                n = min(n, SIZE - off)
            if r < 0.5:
                data = rng.randbytes(n)
                store.write(V, 0, off, data, seq=model.seq)
                model.write(off, data)
            elif r < 0.62:
                zero = rng.random() < 0.4
                store.unmap(V, 0, off, n, seq=model.seq, zero=zero)
                model.unmap(off, n, zero)
            elif r < 0.74:                      # take a snapshot
                model.snaps[model.seq] = list(model.live)
                model.seq += 1
            elif r < 0.8 and model.snaps:       # revert (a write at the current seq)
                to = rng.choice(sorted(model.snaps))
                store.revert(V, 0, to_seq=to, seq=model.seq)
                model.live = list(model.snaps[to])
            elif r < 0.86 and model.snaps:      # delete a snapshot, trim
                del model.snaps[rng.choice(sorted(model.snaps))]
                store.trim(V, 0, set(model.snaps))
            elif r < 0.9:                       # restart
                store.close()
                store = ReplicaStore(disks, extent_size=SIZE, cow_sync=False)
                assert store.bad == []
            elif r < 0.95:                      # the replica re-copied through export/import
                with ReplicaStore([(tmp_path / f"copy{step}", None)], extent_size=SIZE) as other:
                    offset = 0
                    while offset is not None:
                        blob, offset_next = store.export(V, 0, offset, SIZE - offset, max_bytes=5 * BLOCK_SIZE)
                        other.import_(V, 0, blob)
                        offset = offset_next
                    assert other.digest(V, 0) == store.digest(V, 0)
            if step % 10 == 0:
                _check(store, model)
        _check(store, model)
        assert store.verify(V, 0) == []
        store.trim(V, 0, set())
        model.snaps.clear()
        _check(store, model)
        assert not list((tmp_path / "d" / f"{V}.0.v").glob("*.ver"))
    finally:
        store.close()


# -- crashes and full file systems ---------------------------------------------------

_CRASH_OPS = """
s.create("v", 0, 3)
s.write("v", 0, 0, b"a" * 8 * BS, seq=1)
s.write("v", 0, BS, b"b" * BS, seq=2)
s.unmap("v", 0, 2 * BS, BS, seq=2)
s.unmap("v", 0, 3 * BS, BS, seq=2, zero=True)
s.write("v", 0, 4 * BS + 5, b"c" * 10, seq=3)
s.revert("v", 0, to_seq=1, seq=4)
s.write("v", 0, 6 * BS, b"d" * BS, seq=4)
s.set_generation("v", 0, 9)
"""


def test_sigkill_keeps_acknowledged_unflushed_writes(tmp_path: Path):
    """A writer killed with SIGKILL after its calls returned, nothing flushed:
    the page cache holds it all, the reopened store has the same state."""
    from tests.cluster import Proc, wait_for
    import sys
    script = ("import time\nfrom pathlib import Path\n"
              "from chunk.storage.replica_store import ReplicaStore\n"
              f"BS = {BLOCK_SIZE}\n"
              f"s = ReplicaStore([({str(tmp_path / 'crash')!r}, None)], extent_size={SIZE})\n"
              + _CRASH_OPS +
              f"Path({str(tmp_path / 'acked')!r}).write_text('1')\ntime.sleep(60)\n")
    proc = Proc("writer", [sys.executable, "-c", script], tmp_path / "writer.log").start()
    try:
        wait_for(lambda: (tmp_path / "acked").exists() or not proc.alive(), 30, "writer acked")
        assert proc.alive(), proc.log()
    finally:
        proc.kill()                           # SIGKILL: no close, no flush
    with ReplicaStore([(tmp_path / "ref", None)], extent_size=SIZE) as ref, \
            ReplicaStore([(tmp_path / "crash", None)], extent_size=SIZE) as s:
        exec(_CRASH_OPS, {"s": ref, "BS": BLOCK_SIZE})
        assert s.bad == []
        assert s.digest("v", 0) == ref.digest("v", 0)
        for view in range(5):
            assert s.read("v", 0, 0, SIZE, view) == ref.read("v", 0, 0, SIZE, view)
        assert s.stat("v", 0)["generation"] == 9


def test_cow_retried_after_a_crash_keeps_the_first_copy(store: ReplicaStore):
    """Killed after step 1 (version written) but before the live write: the live
    block is still old, a retry must not replace the version; and a write that
    landed in live data without its seq (host crash, unflushed) must not be
    preserved over the true old version either."""
    store.create(V, 0, 1)
    store.write(V, 0, 0, _pat(BLOCK_SIZE, 1), seq=1)
    rep = store._replicas[(V, 0)]
    store._cow(rep, 0, 1, 2)                            # step 1 only, then "killed"
    assert store.read(V, 0, 0, BLOCK_SIZE, view=1)[0] == _pat(BLOCK_SIZE, 1)
    rep.ext.write(0, _pat(BLOCK_SIZE, 2))                # new data, seq table still 1
    assert store.read(V, 0, 0, BLOCK_SIZE, view=1)[0] == _pat(BLOCK_SIZE, 1)   # version wins
    store.write(V, 0, 0, _pat(BLOCK_SIZE, 3), seq=2)     # the retry
    assert store.read(V, 0, 0, BLOCK_SIZE, view=1)[0] == _pat(BLOCK_SIZE, 1)
    assert store.read(V, 0, 0, BLOCK_SIZE)[0] == _pat(BLOCK_SIZE, 3)


def _mount_tmpfs(path: Path, size: str) -> bool:
    import ctypes
    import ctypes.util
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    return libc.mount(b"tmpfs", str(path).encode(), b"tmpfs", 0, f"size={size}".encode()) == 0


def _umount(path: Path) -> None:
    import ctypes
    import ctypes.util
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    libc.umount2(str(path).encode(), 2)                  # MNT_DETACH


def test_enospc_is_store_full_and_marks_the_disk(tmp_path: Path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not _mount_tmpfs(mnt, "1m"):
        pytest.skip("cannot mount a small tmpfs here (needs CAP_SYS_ADMIN)")
    try:
        blocks = 64
        with ReplicaStore([(mnt, None)], extent_size=blocks * BLOCK_SIZE) as s:
            for i in range(4):                           # thin: all fit while empty
                s.create(V, i, 1)
            with pytest.raises(StoreFull):
                for i in range(4):
                    s.write(V, i, 0, b"\x77" * (blocks * BLOCK_SIZE), seq=1)
            assert s.usage()[0]["state"] == "full"
            with pytest.raises(StoreFull):
                s.create(V, 9, 1)
            assert s.read(V, 0, 0, BLOCK_SIZE)[0] == b"\x77" * BLOCK_SIZE    # what was written stays
            s.delete(V, 0)
            assert s.usage()[0]["state"] == "ok"
            s.create(V, 9, 1)
    finally:
        _umount(mnt)


# -- the one-block write path (every replicated 4 KiB write) ------------------------------

def _files(disk: Path, vid: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(disk.glob(f"{vid}.0.*")) if p.is_file()}


def test_one_block_writes_match_the_general_path(tmp_path: Path):
    """4 KiB aligned bytes/views take the one-block path; bytearrays take the general one.
    Same seqs, snapshots (COW), rewrites: same files, views and digest."""
    rng = random.Random(7)
    fast = ReplicaStore([(tmp_path / "fast", None)], extent_size=SIZE, cow_sync=False)
    slow = ReplicaStore([(tmp_path / "slow", None)], extent_size=SIZE, cow_sync=False)
    try:
        for s in (fast, slow):
            s.create(V, 0, 1)
        seq = 1
        for step in range(300):
            if step % 40 == 39:
                seq += 1                                       # a snapshot at seq - 1
            off = rng.randrange(BLOCKS) * BLOCK_SIZE
            data = rng.randbytes(BLOCK_SIZE)
            payload = memoryview(b"xx" + data)[2:] if step % 2 else data
            fast.write(V, 0, off, payload, seq)
            slow.write(V, 0, off, bytearray(data), seq)
        assert fast.digest(V, 0) == slow.digest(V, 0)
        for view in range(seq + 1):
            assert fast.read(V, 0, 0, SIZE, view) == slow.read(V, 0, 0, SIZE, view)
        assert _files(tmp_path / "fast", V) == _files(tmp_path / "slow", V)
        assert fast.stat(V, 0)["mutations"] == slow.stat(V, 0)["mutations"] == 300
    finally:
        fast.close()
        slow.close()
    with ReplicaStore([(tmp_path / "fast", None)], extent_size=SIZE) as again:   # persisted
        assert again.bad == [] and again.verify(V, 0) == []


def test_one_block_write_errors_are_those_of_the_general_path(store: ReplicaStore):
    store.create(V, 0, 1)
    block = bytes(BLOCK_SIZE)
    with pytest.raises(ValueError, match="outside the extent"):
        store.write(V, 0, SIZE, block, seq=1)
    with pytest.raises(ValueError, match="outside the extent"):
        store.write(V, 0, -BLOCK_SIZE, block, seq=1)
    for bad_seq in (0, 2**32, -1):
        with pytest.raises(ValueError, match="seq"):
            store.write(V, 0, 0, block, seq=bad_seq)
    with pytest.raises(NoExtent):
        store.write(V, 9, 0, block, seq=1)
    with pytest.raises(TypeError):                         # not contiguous: refused, not garbled
        store.write(V, 0, 0, memoryview(bytes(2 * BLOCK_SIZE))[::2], seq=1)
    assert store.stat(V, 0)["mutations"] == 0 and store.read(V, 0, 0, SIZE)[1] == bytes(BLOCKS // 8)


def test_admit_write_is_admit_then_write(store: ReplicaStore):
    store.create(V, 0, 1)
    store.admit_write(V, 0, 5, 0, _pat(BLOCK_SIZE, 1), 1)        # a new owner: header first
    assert store.stat(V, 0)["epoch"] == 5
    store.admit_write(V, 0, 5, BLOCK_SIZE, _pat(BLOCK_SIZE, 2), 1)   # the known owner
    with pytest.raises(StaleEpochError) as e:
        store.admit_write(V, 0, 4, 0, _pat(BLOCK_SIZE, 3), 1)
    assert e.value.highest == 5
    assert store.read(V, 0, 0, 2 * BLOCK_SIZE)[0] == _pat(BLOCK_SIZE, 1) + _pat(BLOCK_SIZE, 2)
    store.admit_write(V, 0, 6, 100, b"abc", 1)                    # partial: the general path
    assert store.read(V, 0, 100, 3)[0] == b"abc" and store.stat(V, 0)["epoch"] == 6
    # an extent not here: the volume's epoch is fenced (and remembered) before NoExtent
    with pytest.raises(NoExtent):
        store.admit_write(V, 1, 7, 0, _pat(BLOCK_SIZE, 4), 1)
    with pytest.raises(StaleEpochError):
        store.admit(V, 1, 6)
    assert store.stat(V, 0)["mutations"] == 3


def _fail_writes_to(monkeypatch, fd: int, times: int = 1) -> None:
    """The next ``times`` pwrites to ``fd`` fail with ENOSPC (a full disk allocating a page of
    a sparse ``.crc`` or ``.seq``); everything else is written for real."""
    import errno
    real = os.pwrite
    left = [times]

    def pwrite(f, data, off):
        if f == fd and left[0]:
            left[0] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(f, data, off)
    monkeypatch.setattr(os, "pwrite", pwrite)


@pytest.mark.parametrize("block", [BLOCK_SIZE, 3 * BLOCK_SIZE])     # the 4 KiB path and the general one
def test_a_failed_checksum_write_never_reads_back_as_good(tmp_path: Path, monkeypatch, block):
    """Memory must not get ahead of the ``.crc`` file: the failed write's block fails its
    checksum at once (a coordinator serves it from another replica and repairs it), not
    only after a restart, and a retry makes it good in memory and on disk alike."""
    d = tmp_path / "d0"
    s = ReplicaStore([(d, None)], extent_size=SIZE)
    s.create(V, 0, 1)
    old, new = _pat(block, 1), _pat(block, 2)
    s.write(V, 0, 0, old, seq=1)
    s.flush(V, 0)
    _fail_writes_to(monkeypatch, s._replicas[(V, 0)].ext._crc)        # noqa: SLF001
    with pytest.raises(StoreFull):
        s.write(V, 0, 0, new, seq=1)
    with pytest.raises(ChecksumError):
        s.read(V, 0, 0, block)
    s.close()
    s = ReplicaStore([(d, None)], extent_size=SIZE)                     # the same after a restart
    with pytest.raises(ChecksumError):
        s.read(V, 0, 0, block)
    s.write(V, 0, 0, new, seq=1)                                         # the initiator retries
    s.close()
    s = ReplicaStore([(d, None)], extent_size=SIZE)
    assert s.read(V, 0, 0, block)[0] == new
    s.close()


@pytest.mark.parametrize("block", [BLOCK_SIZE, 3 * BLOCK_SIZE])
def test_a_failed_seq_write_is_written_again_and_snapshots_stay_right(tmp_path: Path, monkeypatch, block):
    """A block overwritten after a snapshot (seq 1 -> 2) whose ``.seq`` write failed: the retry
    writes it again, so after a restart the snapshot still shows the old data and a revert
    brings it back."""
    d = tmp_path / "d0"
    s = ReplicaStore([(d, None)], extent_size=SIZE)
    s.create(V, 0, 1)
    old, new = _pat(block, 3), _pat(block, 4)
    s.write(V, 0, 0, old, seq=1)
    _fail_writes_to(monkeypatch, s._replicas[(V, 0)].seq_fd)            # noqa: SLF001
    with pytest.raises(StoreFull):
        s.write(V, 0, 0, new, seq=2)
    s.write(V, 0, 0, new, seq=2)
    s.flush(V, 0)
    s.close()
    s = ReplicaStore([(d, None)], extent_size=SIZE)
    assert s.read(V, 0, 0, block)[0] == new
    assert s.read(V, 0, 0, block, view=1)[0] == old
    s.revert(V, 0, to_seq=1, seq=3)
    assert s.read(V, 0, 0, block)[0] == old
    s.close()


def test_a_failed_first_write_into_an_extent_does_not_leak_into_a_snapshot(tmp_path: Path, monkeypatch):
    """The first write into a fresh extent fails at its checksum: the block stays unwritten
    (zeros), so a snapshot taken then reads zeros even after the block is written later."""
    s = ReplicaStore([(tmp_path / "d0", None)], extent_size=SIZE)
    s.create(V, 0, 1)
    _fail_writes_to(monkeypatch, s._replicas[(V, 0)].ext._crc)        # noqa: SLF001
    with pytest.raises(StoreFull):
        s.write(V, 0, 0, _pat(BLOCK_SIZE, 5), seq=5)
    assert s.read(V, 0, 0, BLOCK_SIZE)[0] == bytes(BLOCK_SIZE)
    s.write(V, 0, 0, _pat(BLOCK_SIZE, 6), seq=6)                          # after a snapshot at 5
    assert s.read(V, 0, 0, BLOCK_SIZE, view=5)[0] == bytes(BLOCK_SIZE)
    assert s.read(V, 0, 0, BLOCK_SIZE)[0] == _pat(BLOCK_SIZE, 6)
    s.close()


def test_an_extent_that_does_not_open_answers_io_errors_not_absent(tmp_path: Path):
    """One bit of a header rots: after a restart the extent must not look absent (NO_EXTENT,
    which a coordinator reads as zeros when every replica says it); it answers I/O errors,
    a CREATE leaves its files alone, and DELETE removes them so it can be made anew."""
    d = tmp_path / "d0"
    s = ReplicaStore([(d, None)], extent_size=SIZE)
    s.create(V, 0, 1)
    s.write(V, 0, 0, _pat(BLOCK_SIZE, 7), seq=1)
    s.flush(V, 0)
    s.close()
    hdr = d / f"{V}.0.hdr"
    raw = bytearray(hdr.read_bytes())
    raw[-1] ^= 1
    hdr.write_bytes(bytes(raw))
    seq_before = (d / f"{V}.0.seq").read_bytes()
    s = ReplicaStore([(d, None)], extent_size=SIZE)
    assert not s.has(V, 0) and (V, 0) in s.broken
    for call in (lambda: s.read(V, 0, 0, BLOCK_SIZE), lambda: s.write(V, 0, 0, _pat(BLOCK_SIZE, 8), seq=1),
                 lambda: s.admit_write(V, 0, 1, 0, _pat(BLOCK_SIZE, 8), 1), lambda: s.create(V, 0, 2)):
        with pytest.raises(StoreIOError, match="unusable: it did not open"):
            call()
    assert (d / f"{V}.0.seq").read_bytes() == seq_before
    with pytest.raises(NoExtent):
        s.read(V, 1, 0, BLOCK_SIZE)                     # a truly absent one is still absent
    s.delete(V, 0)
    assert not list(d.glob(f"{V}.0.*"))
    s.create(V, 0, 2)
    assert s.read(V, 0, 0, BLOCK_SIZE)[0] == bytes(BLOCK_SIZE)
    s.close()


def test_a_failed_flush_breaks_the_replica_for_good(tmp_path: Path, monkeypatch):
    """fdatasync fails once (EIO): the kernel may have dropped the pages it could not write
    and report success next time, so the replica must not be trusted again: every later call
    fails, its disk is marked failed, and only DELETE (then a fresh CREATE) clears it."""
    import errno
    d = tmp_path / "d0"
    s = ReplicaStore([(d, None)], extent_size=SIZE)
    s.create(V, 0, 1)
    s.create(V, 1, 1)
    s.write(V, 0, 0, _pat(BLOCK_SIZE, 9), seq=1)
    real, calls = os.fdatasync, []

    def fdatasync(fd):
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    with pytest.raises(StoreIOError):
        s.flush(V, 0)
    for call in (lambda: s.flush(V, 0), lambda: s.read(V, 0, 0, BLOCK_SIZE),
                 lambda: s.write(V, 0, 0, _pat(BLOCK_SIZE, 9), seq=1, fua=True)):
        with pytest.raises(StoreIOError, match="unusable: a flush failed"):
            call()
    assert s.usage()[0]["state"] == "failed"
    assert s.read(V, 1, 0, BLOCK_SIZE)[0] == bytes(BLOCK_SIZE)        # the disk's other extents still read
    with pytest.raises(StoreIOError):
        s.write(V, 0, 0, _pat(BLOCK_SIZE, 9), seq=1, fua=True)
    s.delete(V, 0)
    assert not list(d.glob(f"{V}.0.*"))
    s.close()


def test_a_trim_closing_a_version_mid_flush_does_not_break_the_replica(store: ReplicaStore,
                                                                     monkeypatch):
    """``flush`` runs in a worker thread; the event loop's trim closes the version file between
    the worker taking its fd and the fdatasync. The flush must succeed (an EBADF would break a
    healthy replica and fail its disk for good)."""
    import threading
    store.create(V, 0, 1)
    store.write(V, 0, 0, _pat(BLOCK_SIZE, 1), seq=1)
    store.write(V, 0, 0, _pat(BLOCK_SIZE, 2), seq=2)          # version (key 1, origin 1)
    reached, proceed, errors = threading.Event(), threading.Event(), []
    real = os.fdatasync

    def fdatasync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("1.ver") and not reached.is_set():
            reached.set()
            proceed.wait(5)              # the loop closes the version file now
        return real(fd)
    monkeypatch.setattr(os, "fdatasync", fdatasync)

    def flush():
        try:
            store.flush(V, 0)
        except Exception as e:  # noqa: BLE001 - reported by the asserts below
            errors.append(e)
    worker = threading.Thread(target=flush)
    worker.start()
    assert reached.wait(5)
    assert store.trim(V, 0, set()) == 1                        # no snapshot: key 1 goes
    proceed.set()
    worker.join(5)
    assert errors == [] and store.has(V, 0) and store.broken == {}
    assert store.usage()[0]["state"] == "ok"
    store.flush(V, 0)
    assert store.read(V, 0, 0, BLOCK_SIZE)[0] == _pat(BLOCK_SIZE, 2)


@pytest.mark.parametrize("err", ["EROFS", "EIO"])
def test_a_disk_failing_a_create_is_failed_and_the_create_goes_to_another(tmp_path: Path, monkeypatch,
                                                                         err: str):
    """Remounted read-only (or EIO): that disk has the most room, so it must be marked failed
    and the CREATE placed on a healthy disk, not every CREATE of the server failing."""
    import errno
    a, b = tmp_path / "a", tmp_path / "b"
    s = ReplicaStore([(a, 4 * SIZE), (b, 8 * SIZE)], extent_size=SIZE)
    s.create(V, 0, 1)
    assert s.stat(V, 0)["disk"] == str(b)
    s.write(V, 0, 0, _pat(BLOCK_SIZE, 4), seq=1)
    real, tries = os.open, []

    def open_(path, flags, *args, **kw):
        if str(path).startswith(f"{b}{os.sep}") and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            tries.append(path)
            raise OSError(getattr(errno, err), os.strerror(getattr(errno, err)), str(path))
        return real(path, flags, *args, **kw)
    monkeypatch.setattr(os, "open", open_)
    s.create(V, 1, 1)
    assert s.stat(V, 1)["disk"] == str(a)
    usage = {u["path"]: u for u in s.usage()}
    assert usage[str(b)]["state"] == "failed" and os.strerror(getattr(errno, err)) in usage[str(b)]["error"]
    assert usage[str(a)]["state"] == "ok"
    assert not list(b.glob(f"{V}.1.*"))
    assert s.read(V, 0, 0, BLOCK_SIZE)[0] == _pat(BLOCK_SIZE, 4)      # what is there still reads
    n = len(tries)
    s.create(V, 2, 1)                     # b is not tried again
    assert s.stat(V, 2)["disk"] == str(a) and len(tries) == n
    s.close()


def test_a_block_with_more_versions_than_one_export_holds_copies_in_parts(tmp_path: Path):
    """260 versions of one block (a hot block written between 260 retained snapshots) are
    over a wire frame: the export ships them in parts that each fit, and importing the parts
    in order, over a different state, gives the source's exact state and views."""
    from chunk.storage.wire import MAX_DATA
    with ReplicaStore([(tmp_path / "a", None)], extent_size=SIZE) as src, \
            ReplicaStore([(tmp_path / "b", None)], extent_size=SIZE) as dst:
        src.create(V, 0, 1)
        src.write(V, 0, BLOCK_SIZE, _pat(BLOCK_SIZE, 0), seq=1)
        for seq in range(1, 262):
            src.write(V, 0, 2 * BLOCK_SIZE, _pat(BLOCK_SIZE, seq), seq=seq)
        src.write(V, 0, 3 * BLOCK_SIZE, _pat(BLOCK_SIZE, 999), seq=261)
        _populate(dst, V, random.Random(7), BLOCKS)                  # stale versions to replace
        offset, parts = 0, 0
        while offset is not None:
            blob, offset = src.export(V, 0, offset, SIZE - offset)
            assert len(blob) <= MAX_DATA
            assert dst.import_(V, 0, blob)
            parts += 1
        assert parts >= 2
        assert dst.digest(V, 0) == src.digest(V, 0)
        for view in (0, 1, 2, 130, 200, 259, 260, 261):
            assert dst.read(V, 0, 0, SIZE, view) == src.read(V, 0, 0, SIZE, view)


def test_an_extent_missing_beside_an_unusable_disk_is_an_io_error_not_absent(tmp_path: Path):
    """A disk that did not mount shows its empty mount point: its extents look absent. NO_EXTENT
    from every replica once made the coordinator create the extent afresh, empty (everything
    written to it read as zeros); now the store says it may be there."""
    s = ReplicaStore([(tmp_path / "d0", None), (tmp_path / "d1", None)], extent_size=SIZE)
    try:
        with pytest.raises(NoExtent):
            s.read("v", 3, 0, 4096)
        s.set_probe_error(tmp_path / "d1", "statvfs sees another filesystem: not mounted?")
        with pytest.raises(StoreIOError, match="may be there"):
            s.read("v", 3, 0, 4096)
        s.set_probe_error(tmp_path / "d1", None)             # mounted again: absent is absent
        with pytest.raises(NoExtent):
            s.read("v", 3, 0, 4096)
    finally:
        s.close()


# -- SETGEN, flushes off the loop, IMPORTs that create ---------------------------------------

def test_set_generation_never_goes_back(tmp_path: Path, monkeypatch):
    """A replica whose generation went backwards would look in sync with an older replica set:
    a lower one is refused before anything is flushed or written; an equal one (a retried
    SETGEN) and a higher one are recorded."""
    d = tmp_path / "d0"
    with ReplicaStore([(d, None)], extent_size=SIZE) as s:
        s.create(V, 0, 1)
        s.set_generation(V, 0, 5)
        syncs = []
        real = os.fdatasync
        monkeypatch.setattr(os, "fdatasync", lambda fd: (syncs.append(fd), real(fd))[1])
        with pytest.raises(StaleGeneration, match="generation 3 is below its generation 5") as e:
            s.set_generation(V, 0, 3)
        assert e.value.current == 5 and syncs == []
        assert s.stat(V, 0)["generation"] == 5
        s.set_generation(V, 0, 5)
        s.set_generation(V, 0, 6)
    with ReplicaStore([(d, None)], extent_size=SIZE) as s:
        assert s.stat(V, 0)["generation"] == 6


async def test_a_failed_async_flush_retires_on_the_loop_even_if_nobody_awaits_it(store, monkeypatch):
    """The sync fails in the worker after the request awaiting it was cancelled (its
    connection closed): the replica is still retired, and on the loop, so a write before
    the failure lands on open fds and one after it gets a clean I/O error."""
    store.create(V, 0, 1)
    fds = replica_fds(store, V, 0)
    closed = closes_of(monkeypatch, fds)
    reached, proceed, _ = hold_syncs(monkeypatch, fds, fail=True)
    flush = asyncio.ensure_future(store.flush_async(V, 0))
    assert await asyncio.to_thread(reached.wait, 10)
    flush.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flush
    store.write(V, 0, 0, _pat(BLOCK_SIZE, 1), seq=1)         # the sync has not failed yet
    assert store.read(V, 0, 0, BLOCK_SIZE)[0] == _pat(BLOCK_SIZE, 1)
    proceed.set()
    await async_wait_for(lambda: (V, 0) in store.broken, 10, "the failed sync to retire the replica")
    assert set(closed) == fds and set(closed.values()) == {threading.get_ident()}
    with pytest.raises(StoreIOError, match="a flush failed"):
        store.write(V, 0, BLOCK_SIZE, _pat(BLOCK_SIZE, 2), seq=1)
    assert store.usage()[0]["state"] == "failed"


async def test_an_async_flush_of_an_extent_deleted_meanwhile_is_no_success(store, monkeypatch):
    """Deleted (or retired by another flush's failure) while its sync ran: the sync proves
    nothing about the replica now, so it is not reported as done."""
    store.create(V, 0, 1)
    store.write(V, 0, 0, _pat(BLOCK_SIZE, 1), seq=1)
    rep = store._replicas[(V, 0)]           # noqa: SLF001
    crc_fd = rep.ext._crc                  # noqa: SLF001 - the flush's last sync
    loop_thread = threading.get_ident()
    reached, proceed = threading.Event(), threading.Event()
    real = os.fdatasync

    def fdatasync(fd):
        real(fd)
        if fd == crc_fd and threading.get_ident() != loop_thread:
            reached.set()                  # synced, not returned yet
            assert proceed.wait(10)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    flush = asyncio.ensure_future(store.flush_async(V, 0))
    assert await asyncio.to_thread(reached.wait, 10)
    store.delete(V, 0)
    proceed.set()
    with pytest.raises(NoExtent):
        await flush


def _blob(offset: int, end: int, live: list) -> bytes:
    return msgpack.packb({"format": 1, "offset": offset, "end": end, "live": live, "versions": []})


def test_a_failed_import_that_created_the_extent_leaves_nothing(tmp_path: Path, monkeypatch):
    """An IMPORT into a missing extent creates it; if the blob then does not apply (its range
    is past the extent's end, or the disk fails the writes) the extent goes again: an empty
    or half-imported one left behind would pass for a real copy."""
    d = tmp_path / "d0"
    s = ReplicaStore([(d, None)], extent_size=SIZE)
    try:
        with pytest.raises(ValueError, match="outside the extent"):
            s.import_(V, 0, _blob(0, 2 * SIZE, []))
        assert not s.has(V, 0) and s.broken == {} and list(d.iterdir()) == []
        block = _pat(BLOCK_SIZE, 3)
        blob = _blob(0, SIZE, [[1, 4, block_crc(1, block), block]])

        def pwrite(fd, data, offset):
            raise OSError(errno.ENOSPC, "No space left on device")
        with monkeypatch.context() as m:
            m.setattr(os, "pwrite", pwrite)
            with pytest.raises(StoreFull):
                s.import_(V, 0, blob)
        assert not s.has(V, 0) and s.broken == {} and list(d.iterdir()) == []
        with pytest.raises(NoExtent):
            s.read(V, 0, 0, BLOCK_SIZE)
        assert s.import_(V, 0, blob)                           # the store is as it was
        assert s.read(V, 0, BLOCK_SIZE, BLOCK_SIZE)[0] == block
    finally:
        s.close()


def test_a_failed_import_whose_extent_does_not_go_is_broken_not_a_copy(tmp_path: Path, monkeypatch):
    """The created extent's files cannot be removed (the disk failing): it answers I/O errors,
    never NO_EXTENT or an empty copy, until a DELETE."""
    import chunk.storage.replica_store as rs
    d = tmp_path / "d0"
    s = ReplicaStore([(d, None)], extent_size=SIZE)
    try:
        def fail(*args):
            raise OSError(errno.EIO, "Input/output error")
        block = _pat(BLOCK_SIZE, 3)
        with monkeypatch.context() as m:
            m.setattr(os, "pwrite", fail)                     # the import's writes fail
            m.setattr(rs, "_remove_extent", fail)             # and so does the clean-up
            with pytest.raises(StoreIOError):
                s.import_(V, 0, _blob(0, SIZE, [[1, 4, block_crc(1, block), block]]))
        assert not s.has(V, 0) and (V, 0) in s.broken
        with pytest.raises(StoreIOError, match="an IMPORT that created it failed"):
            s.read(V, 0, 0, BLOCK_SIZE)
        s.delete(V, 0)
        assert s.broken == {} and list(d.glob(f"{V}.0.*")) == []
    finally:
        s.close()


def test_a_disk_failed_at_startup_is_never_opened_nor_written(tmp_path: Path):
    """``failed=``: a disk configured but failed from the start (prepare). It is kept, so an
    extent missing here may be there (an I/O error, not NO_EXTENT) and it is reported failed,
    but it is not made, scanned, opened or written: its extents are not served, nothing new
    goes there, and it is not the first disk (the scrubber's cursor)."""
    d0, d1, d2 = tmp_path / "d0", tmp_path / "d1", tmp_path / "gone" / "d2"
    with ReplicaStore([(d0, None), (d1, None)], extent_size=SIZE) as s:
        s.create(V, 0, 1)
        s.write(V, 0, 0, _pat(BLOCK_SIZE, 1), seq=1)
        s.flush(V, 0)
        where = Path(s.stat(V, 0)["disk"])
    other = d1 if where == d0 else d0
    s = ReplicaStore([(where, None), (other, None), (d2, None)], extent_size=SIZE,
                     failed={where: "disk-id does not read", str(d2): "disk-id vanished"})
    try:
        assert not (tmp_path / "gone").exists()
        assert not s.has(V, 0) and s.extents() == []
        with pytest.raises(StoreIOError, match="may be there"):
            s.read(V, 0, 0, 4096)
        with pytest.raises(StoreIOError, match="may be there"):
            s.read(V, 7, 0, 4096)
        s.create(V, 1, 1)                                # beside them, not refused
        assert s.stat(V, 1)["disk"] == str(other)
        usage = s.usage()
        assert [u["path"] for u in usage] == [str(other), str(where), str(d2)]
        assert [u["state"] for u in usage] == ["ok", "failed", "failed"]
        assert "disk-id does not read" in usage[1]["error"]
        s.set_probe_error(where, None)                   # a probe does not make it usable
        s.set_probe_error(d2, None)
        with pytest.raises(StoreIOError, match="may be there"):
            s.read(V, 0, 0, 4096)
        s.create(V, 2, 1)
        assert s.stat(V, 2)["disk"] == str(other)
        assert not (tmp_path / "gone").exists()
    finally:
        s.close()
