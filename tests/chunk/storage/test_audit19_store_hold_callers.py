"""Who could get past a mend's hold (audit 19, item 3): nobody outside tests.

``_Hold`` (the blocks of a deferred write/unmap or of a mend waiting for a sync) keeps out
writes and unmaps that carry an epoch and no FUA: a FUA store write, and a write or unmap
without an epoch, run inline and do not wait for it. That is safe only because no production
path issues them: the replica server refuses WRITE/UNMAP at epoch 0 and passes ``fua=False``
to the store (a FUA WRITE is a plain write, then ``flush_async``), and ``LocalReplica``
refuses epoch 0 and flushes after the write as well. This pins that: a coordinator's FUA
write, plain write, fast-path write and UNMAP, to a local replica and to one behind a real
ReplicaServer, and a raw FUA WRITE from a client, reach ``ReplicaStore.write``/``unmap``
with an epoch and without FUA (if one ever did not, it would have to respect the hold).
"""

from __future__ import annotations

import asyncio

import pytest

from chunk.storage import replicas as rk
from chunk.storage.extent_file import EXTENT_SIZE
from chunk.storage.replica_store import ReplicaStore

from .test_audit19_sole_replica_plumbing import EXTENTS, _create, peer  # noqa: F401
from .test_revert_safety import _volume, keys, stores  # noqa: F401

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def calls(monkeypatch):
    """(op, fua, epoch) of every ``ReplicaStore.write``/``unmap`` call."""
    seen: list[tuple[str, bool, int]] = []
    write, unmap = ReplicaStore.write, ReplicaStore.unmap

    def spy_write(self, vid, idx, offset, data, seq, fua=False, epoch=0, sole=False):
        seen.append(("write", fua, epoch))
        return write(self, vid, idx, offset, data, seq, fua, epoch, sole)

    def spy_unmap(self, vid, idx, offset, length, seq, zero=False, epoch=0, sole=False):
        seen.append(("unmap", False, epoch))
        return unmap(self, vid, idx, offset, length, seq, zero, epoch, sole)

    def spy_admit_write(self, vid, idx, epoch, offset, data, seq, sole=False):
        seen.append(("admit_write", False, epoch))
        self.admit(vid, idx, epoch)
        return write(self, vid, idx, offset, data, seq, False, epoch, sole)

    monkeypatch.setattr(ReplicaStore, "write", spy_write)
    monkeypatch.setattr(ReplicaStore, "unmap", spy_unmap)
    monkeypatch.setattr(ReplicaStore, "admit_write", spy_admit_write)
    return seen


async def test_no_production_path_writes_the_store_without_epoch_or_with_fua(
        peer, stores, etcd_client, keys, calls):  # noqa: F811
    b, remote = peer
    a = stores("A")
    _create(a, b)
    coord = await _volume(etcd_client, keys, {"A": rk.LocalReplica("A", a), "B": remote},
                          extents=EXTENTS)
    await asyncio.wait_for(coord.write(EXTENT_SIZE + 4096, b"\x03" * 4096, fua=True), 10)
    await asyncio.wait_for(coord.write(8192, b"\x04" * 8192), 10)
    await remote.connect()
    fut = coord.write_nowait(0, b"\x01" * 4096)
    assert fut is not None
    await asyncio.wait_for(fut, 10)
    await asyncio.wait_for(coord.unmap(4096, 4096), 10)
    before = len(calls)
    await remote.client.write(remote.addr, "v", 0, 12288, b"\x05" * 4096,
                              epoch=calls[-1][2], seq=5, fua=True)      # a raw FUA WRITE
    assert len(calls) == before + 1, calls
    assert {c[0] for c in calls} == {"write", "admit_write", "unmap"}, calls
    assert len(calls) >= 2 * 4 + 1, calls     # both replicas, each operation; the raw WRITE
    assert [c for c in calls if c[1] or not c[2]] == [], f"FUA or epoch-less store calls: {calls}"
