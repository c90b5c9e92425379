"""COMPARE AND WRITE across chunk servers: ``Coordinator.compare_and_write`` under the
volume's ownership epoch. The replicas here are in memory and keep a replica server's
per-volume fence (a request below the highest epoch seen is refused with STALE_EPOCH);
"another chunk server" is a hook that raises their fence and writes to them, at the moment
our write arrives (between our compare and our write). tests/chunk/storage/test_coordinator.py
has the other coordinator pieces over the same kind of stand-ins."""

from __future__ import annotations

import asyncio

import pytest

from chunk.blockdev import MiscompareError
from chunk.scsi import LogicalUnit
from chunk.storage import coordinator as coordinator_module
from chunk.storage import replicas as rk
from chunk.storage.coordinator import EXTENT_SIZE, Coordinator
from chunk.storage.engine import VolumeDevice
from zstore.records import ExtentRecord, Volume

from ..scsi.helpers import H1, IDENT, caw, check, good, run
from .test_coordinator import _MemEngine, _Meta

BS = 512
X, N, Y = b"x" * BS, b"n" * BS, b"y" * BS       # old data, ours, the other server's


class _EpochReplica:
    """A replica server's view of one volume: 512-byte blocks in memory and its fence.

    ``hook(replica, idx)`` runs when a write of ours arrives, before it is admitted: what
    another chunk server did in the meantime. ``lag`` delays the arrival of writes to the
    extents it names (so another extent's writes arrive first)."""

    def __init__(self, chunk_id: str) -> None:
        self.chunk_id, self.connected = chunk_id, True
        self.highest = 0
        self.blocks: dict[tuple[int, int], bytes] = {}
        self.writes: list[tuple[int, int, int, int]] = []     # (idx, offset, epoch, seq) taken
        self.hook = None
        self.lag: dict[int, float] = {}

    def admit(self, epoch: int) -> None:
        if epoch and epoch < self.highest:
            raise rk.ReplicaFailed(self.chunk_id, rk.STALE_EPOCH, f"epoch {epoch} < {self.highest}")
        self.highest = max(self.highest, epoch)

    def put(self, idx: int, off: int, data: bytes) -> None:
        for k in range(0, len(data), BS):
            self.blocks[(idx, off + k)] = bytes(data[k:k + BS])

    def get(self, idx: int, off: int, n: int) -> bytes:
        return b"".join(self.blocks.get((idx, off + k), bytes(BS)) for k in range(0, n, BS))

    async def read(self, vid, idx, off, length, epoch, view=0):
        self.admit(epoch)
        await asyncio.sleep(0)
        present = bytearray((length // 4096 + 8) // 8)          # a bit per 4 KiB block
        for b in range(-(-length // 4096)):
            if any((idx, off + b * 4096 + k) in self.blocks for k in range(0, 4096, BS)):
                present[b >> 3] |= 1 << (b & 7)
        return self.get(idx, off, length), bytes(present)

    def start_write(self, vid, idx, off, data, epoch, seq, fua=False, sole=False):
        data = bytes(data)

        async def arrive():
            if self.lag.get(idx):
                await asyncio.sleep(self.lag[idx])
            if self.hook is not None:
                self.hook(self, idx)
            self.admit(epoch)
            self.put(idx, off, data)
            self.writes.append((idx, off, epoch, seq))
            await asyncio.sleep(0)
        return arrive()

    async def unmap(self, vid, idx, off, n, epoch, seq, zero=False, sole=False):
        self.admit(epoch)
        self.put(idx, off, bytes(n))

    async def create(self, vid, idx, epoch, generation, discard_broken=False):
        self.admit(epoch)

    async def flush(self, vid, idx, epoch):
        self.admit(epoch)

    async def fence(self, vid, idx, epoch):
        self.admit(epoch)


class _Engine(_MemEngine):
    def local_store_for(self, rec):
        return None                     # no local replica: every read goes to the replicas

    def cached_replica(self, chunk_id):
        return self.reps.get(chunk_id)


def _other_server(reps, epoch: int, on: str, data: bytes | None = None, offset: int = 0, idx: int = 0):
    """Another chunk server took the volume at ``epoch``: its compare read (or its write)
    reached the replicas in ``on`` (admitted there: they refuse anything older now); with
    ``data``, its write landed there too."""
    for k in on:
        reps[k].admit(epoch)
        if data is not None:
            reps[k].put(idx, offset, data)


def _coordinator(monkeypatch, reps, *, extents=(0,), snap_seq: int = 4) -> Coordinator:
    """Our coordinator at epoch 7, seq 4, over replicas A, B, C of every extent in
    ``extents``. Taking ownership back gives the next epoch from 9 on (the other server
    holds 8) and reads the volume at ``snap_seq``."""
    epochs = iter(range(9, 100))

    async def acquire(etcd, keys, vid, chunk_id):
        return next(epochs), 100, Volume(volume_id=vid, name=vid, size=4 * EXTENT_SIZE,
                                         replicas=3, snap_seq=snap_seq)
    monkeypatch.setattr(coordinator_module.ownership, "acquire", acquire)
    monkeypatch.setattr(coordinator_module.random, "uniform", lambda a, b: 0)   # no pause
    coord = Coordinator(_Engine(reps), Volume(volume_id="v", name="v", size=4 * EXTENT_SIZE, replicas=3))
    coord._is_ready, coord.epoch, coord.seq = True, 7, 4                       # noqa: SLF001
    coord._taken_epoch = 7                                                      # noqa: SLF001
    for idx in extents:
        coord.extents[idx] = ExtentRecord("v", idx, ["A", "B", "C"], 3, {})
    coord.engine.meta = _Meta(coord)

    async def no_refresh():
        pass
    coord._refresh_extents = no_refresh                                         # noqa: SLF001
    for r in reps.values():
        r.admit(7)
    return coord


def _replicas(data: bytes = X, offset: int = 0, idx: int = 0) -> dict[str, _EpochReplica]:
    reps = {k: _EpochReplica(k) for k in "ABC"}
    for r in reps.values():
        r.put(idx, offset, data)
    return reps


def test_plain_success_and_miscompare(monkeypatch):
    async def main():
        reps = _replicas(X + X)
        coord = _coordinator(monkeypatch, reps)
        await coord.compare_and_write(0, X + X, N + N)
        assert all(r.get(0, 0, 2 * BS) == N + N for r in reps.values())
        assert coord.epoch == 7                       # nobody else: no retake
        want = bytearray(N + N)
        want[700] ^= 0xFF
        with pytest.raises(MiscompareError) as e:
            await coord.compare_and_write(0, bytes(want), Y + Y)
        assert e.value.offset == 700
        assert all(r.get(0, 0, 2 * BS) == N + N for r in reps.values())   # nothing written
    asyncio.run(main())


def test_another_servers_write_between_our_compare_and_our_write_is_a_miscompare(monkeypatch):
    """Our compare reads X; before our write arrives, another server takes the volume (epoch
    8) and writes Y everywhere. Our write is fenced on every replica. A plain write would
    retake ownership and repeat; a CAW must not (it would overwrite Y, no longer
    conditional): it sees Y everywhere, compares again, and answers MISCOMPARE."""
    async def main():
        reps = _replicas()
        coord = _coordinator(monkeypatch, reps)

        def other(replica, idx):
            if replica.chunk_id == "A" and replica.highest < 8:
                _other_server(reps, 8, "ABC", Y)
        reps["A"].hook = other
        with pytest.raises(MiscompareError) as e:
            await coord.compare_and_write(0, X, N)
        assert e.value.offset == 0
        assert all(r.get(0, 0, BS) == Y for r in reps.values())
        assert coord.epoch == 9 and coord.extents[0].replicas == ["A", "B", "C"]
    asyncio.run(main())


def test_through_the_scsi_unit_another_servers_write_makes_compare_and_write_miscompare(monkeypatch):
    """The same race through LogicalUnit over the volume's device: the unit must run the
    device's own compare_and_write (its read + write under a lock of its own repeated the
    fenced write and answered GOOD, overwriting the other host's data)."""
    async def main():
        reps = _replicas()
        coord = _coordinator(monkeypatch, reps)
        lu = LogicalUnit(VolumeDevice(coord.engine, coord, readonly=False),
                         IDENT, power_on_ua=False)

        def other(replica, idx):
            if replica.chunk_id == "A" and replica.highest < 8:
                _other_server(reps, 8, "ABC", Y)
        reps["A"].hook = other
        s = check(await run(lu, caw(0, 1), X + N, nexus=H1), 0xE, 0x1D)
        assert s.info == 0
        assert all(r.get(0, 0, BS) == Y for r in reps.values())
        reps["A"].hook = None
        good(await run(lu, caw(0, 1), Y + N, nexus=H1))
        assert all(r.get(0, 0, BS) == N for r in reps.values())
    asyncio.run(main())


@pytest.mark.parametrize("theirs", [None, Y], ids=["fenced-only", "their-write-on-B-C"])
def test_a_partial_landing_is_completed_and_answered_good(monkeypatch, theirs):
    """Our write lands on A; B and C were fenced by another server just before it (its
    compare read, or its write, which has not reached A yet: our retake fences A before it
    does). After the retake the replicas disagree and A holds ours: ours is completed on
    B and C, every replica holds the same data, and the answer is GOOD."""
    async def main():
        reps = _replicas()
        coord = _coordinator(monkeypatch, reps)

        def other(replica, idx):
            if replica.chunk_id == "B" and replica.highest < 8:
                _other_server(reps, 8, "BC", theirs)
        reps["B"].hook = other
        await coord.compare_and_write(0, X, N)
        assert [r.get(0, 0, BS) for r in reps.values()] == [N, N, N]
        assert coord.epoch == 9 and coord.extents[0].replicas == ["A", "B", "C"]
        assert [w[2] for w in reps["B"].writes] == [9]          # the completion, not a repeat
    asyncio.run(main())


def test_a_snapshot_between_a_partial_landing_and_the_retake_splits_then_redoes(monkeypatch):
    """Our write lands on A at seq 4, B and C are fenced, and the other server commits a
    snapshot before we take the volume back (seq 5). The snapshot holds ours on A only:
    A (the smaller side) is dropped, as for a plain write. B and C agree on the old data,
    so the CAW is redone from the compare, at seq 5."""
    async def main():
        reps = _replicas()
        coord = _coordinator(monkeypatch, reps, snap_seq=5)

        def other(replica, idx):
            if replica.chunk_id == "B" and replica.highest < 8:
                _other_server(reps, 8, "BC")
        reps["B"].hook = other
        await coord.compare_and_write(0, X, N)
        assert coord.seq == 5 and coord.extents[0].replicas == ["B", "C"]
        assert reps["B"].get(0, 0, BS) == reps["C"].get(0, 0, BS) == N
        assert reps["B"].writes[-1][2:] == (9, 5)
    asyncio.run(main())


def test_a_fenced_caw_across_an_extent_boundary_that_landed_in_one_extent_is_completed(monkeypatch):
    """The range spans extents 0 and 1. Ours lands on every replica of extent 1; then the
    other server fences every replica before ours reaches extent 0 (and writes nothing).
    Extent 0 still holds what we compared: ours is completed there, GOOD. Compared again
    instead, the half already written would answer MISCOMPARE."""
    async def main():
        reps = {k: _EpochReplica(k) for k in "ABC"}
        for r in reps.values():
            r.put(0, EXTENT_SIZE - BS, X)
            r.put(1, 0, X)
            r.lag[0] = 0.01                 # extent 1's writes arrive first
        coord = _coordinator(monkeypatch, reps, extents=(0, 1))

        def other(replica, idx):
            if idx == 0 and replica.highest < 8:
                _other_server(reps, 8, "ABC")
        for r in reps.values():
            r.hook = other
        await coord.compare_and_write(EXTENT_SIZE - BS, X + X, N + N, fua=True)
        for r in reps.values():
            assert r.get(0, EXTENT_SIZE - BS, BS) == N and r.get(1, 0, BS) == N
    asyncio.run(main())


def test_a_dead_replica_during_the_write_is_dropped_as_for_a_write(monkeypatch):
    async def main():
        reps = _replicas()
        coord = _coordinator(monkeypatch, reps)

        def dead(replica, idx):
            raise rk.ReplicaFailed(replica.chunk_id, rk.UNAVAILABLE, "no answer")
        reps["C"].hook = dead
        await coord.compare_and_write(0, X, N)
        assert coord.extents[0].replicas == ["A", "B"]
        assert reps["A"].get(0, 0, BS) == reps["B"].get(0, 0, BS) == N
        assert coord.epoch == 7
    asyncio.run(main())


def test_a_read_only_volume_device_refuses(monkeypatch):
    async def main():
        from chunk.blockdev import ReadOnlyError
        reps = _replicas()
        coord = _coordinator(monkeypatch, reps)
        with pytest.raises(ReadOnlyError):
            await VolumeDevice(coord.engine, coord, readonly=True).compare_and_write(0, X, N)
    asyncio.run(main())


def test_a_clone_compares_against_its_parent_and_writes_whole_blocks(monkeypatch):
    """A clone's absent block reads as its parent's: the compare sees the parent's data, and
    a 512-byte CAW is written as the whole 4 KiB block (the rest of it the parent's), so the
    replica never holds the block with zeros around our bytes."""
    async def main():
        reps = {k: _EpochReplica(k) for k in "ABC"}
        coord = _coordinator(monkeypatch, reps)
        coord.volume.source_snapshot = "snap"
        P = b"p" * BS

        class Parent:
            async def read(self, offset, n):
                return b"p" * n
        coord.parent = Parent()
        await coord.compare_and_write(1024, P, N)
        for r in reps.values():
            assert r.get(0, 0, 4096) == P * 2 + N + P * 5
        with pytest.raises(MiscompareError) as e:
            await coord.compare_and_write(1024, P, Y)
        assert e.value.offset == 0
    asyncio.run(main())
