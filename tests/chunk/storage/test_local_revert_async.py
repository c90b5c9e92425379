"""The coordinator's own replica reverts an extent by runs, yielding to the event loop.

In one synchronous call (``ReplicaStore.revert``) a whole extent's revert on a slow disk
held the chunk server's loop: every other volume's I/O there waited, and their peers timed
out and dropped replicas. Real ReplicaStore on real files, a multi-run extent.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from chunk.storage import replicas as rk
from chunk.storage.replica_store import ReplicaStore

pytestmark = pytest.mark.timeout(60)

RUN = 1 << 20                     # revert_async's run
SIZE = 8 * RUN
V = "vol-r"
DATA = b"\x5a" * 4096
LAST = SIZE - 4096
EPOCH = 3


@pytest.fixture
def store(tmp_path: Path):
    s = ReplicaStore([(tmp_path / "d0", None)], extent_size=SIZE)
    s.create(V, 0, 1)
    s.admit(V, 0, EPOCH)
    for off in range(0, SIZE, RUN):          # seq 2 everywhere: all changed since seq 1
        s.write(V, 0, off, DATA * (RUN // 4096), 2)
    yield s
    s.close()


def _reverted(store: ReplicaStore, off: int) -> bool:
    data, _present = store.read(V, 0, off, 4096)
    return data != DATA


async def _revert_watched(store: ReplicaStore, on_midway=None) -> list[int]:
    """Run the local revert to seq 1 while a ticker on the same loop watches the extent;
    return the ticks that saw it part-way (first block reverted, last not yet)."""
    midway: list[int] = []
    revert = asyncio.ensure_future(rk.LocalReplica("c0", store).revert(V, 0, EPOCH, 1, 3))

    async def tick() -> None:
        n = 0
        while not revert.done():
            n += 1
            if _reverted(store, 0) and not _reverted(store, LAST):
                midway.append(n)
                if on_midway:
                    on_midway()
            await asyncio.sleep(0)

    ticker = asyncio.ensure_future(tick())
    try:
        await asyncio.wait_for(asyncio.shield(revert), 30)
    finally:
        await asyncio.gather(revert, ticker, return_exceptions=True)
    return midway


async def test_other_coroutines_run_while_a_local_revert_is_part_way(store):
    midway = await _revert_watched(store)
    assert midway, "the revert held the loop from its first block to its last"
    assert _reverted(store, 0) and _reverted(store, LAST)
    assert store.stat(V, 0)["epoch"] == EPOCH


async def test_a_local_revert_fenced_part_way_stops_stale_epoch(store):
    """A new owner fences the volume while the revert runs: the old owner's revert stops
    before its next run (STALE_EPOCH, so it takes the volume back rather than drop us)."""
    with pytest.raises(rk.ReplicaFailed) as e:
        await _revert_watched(store, on_midway=lambda: store.admit(V, 0, EPOCH + 1))
    assert e.value.kind == rk.STALE_EPOCH
    assert not _reverted(store, LAST)


async def test_a_local_revert_at_a_stale_or_no_epoch_changes_nothing(store):
    replica = rk.LocalReplica("c0", store)
    for epoch, kind in ((EPOCH - 1, rk.STALE_EPOCH), (0, rk.DENIED)):
        with pytest.raises(rk.ReplicaFailed) as e:
            await replica.revert(V, 0, epoch, 1, 3)
        assert e.value.kind == kind
    assert not _reverted(store, 0) and not _reverted(store, LAST)
