"""A stopped mend whose version file cannot be unlinked (review of 43e02ed, session 19).

The mend created ``1.ver``, an import stopped it, and unlinking the empty file fails (EIO,
injected at ``Path.unlink`` only). The file used to be closed first and left as key 1's with
fd -1: every later COW into key 1 and every import bringing key 1 failed EBADF until a
restart. Now it stays open and usable.
"""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from chunk.storage.extent_file import BLOCK_SIZE
from chunk.storage.replica_store import ReplicaStore

from .test_audit18_store_mend_races import BLK, V, HeldSync, _pair, _rot, blk

pytestmark = pytest.mark.timeout(60)


async def test_an_unlink_that_fails_leaves_the_version_file_usable(tmp_path: Path, monkeypatch):
    L, P = _pair(tmp_path)
    P.write(V, 0, BLK * BLOCK_SIZE, blk("n"), 2)
    fetched = P.export(V, 0, BLK * BLOCK_SIZE, BLOCK_SIZE)[0]
    P.write(V, 0, BLK * BLOCK_SIZE, blk("N"), 3)
    P.trim(V, 0, set())
    current = P.export(V, 0, BLK * BLOCK_SIZE, BLOCK_SIZE)[0]
    _rot(tmp_path / "L" / f"{V}.0.data", BLK * BLOCK_SIZE)
    verdict = await L.verify_verdict_async(V, 0, BLK, 1)
    held = HeldSync(monkeypatch, ".ver")             # the mend's first sync of its new file
    mend = asyncio.create_task(L.mend_async(V, 0, fetched, verified=verdict))
    assert await asyncio.to_thread(held.reached.wait, 10)
    assert L.import_(V, 0, current)                  # changes the block: the mend stops
    real = Path.unlink

    def failing(self, missing_ok=False):
        if self.name.endswith(".ver"):
            raise OSError(errno.EIO, "injected")
        return real(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", failing)
    held.proceed.set()
    assert not await asyncio.wait_for(mend, 10)
    monkeypatch.undo()
    assert 1 in L._replicas[(V, 0)].versions              # noqa: SLF001 - the file left as key 1's
    # block 7 (seq 1) written at seq 2: its COW goes into key 1's file
    L.write(V, 0, 7 * BLOCK_SIZE, blk("8"), 2)
    assert L.read(V, 0, 7 * BLOCK_SIZE, BLOCK_SIZE, view=1)[0] == blk("7")
    P.write(V, 0, 7 * BLOCK_SIZE, blk("8"), 2)
    assert L.import_(V, 0, P.export(V, 0, 0, 32 * BLOCK_SIZE)[0])
    L.flush(V, 0)
    assert L.digest(V, 0) == P.digest(V, 0)
    L.close()
    L2 = ReplicaStore([(tmp_path / "L", None)], extent_size=32 * BLOCK_SIZE, cow_sync=True)
    assert L2.verify(V, 0) == []
    L2.close()
    P.close()
