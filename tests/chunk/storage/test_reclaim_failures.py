"""A store failure on one extent costs that extent only, never the rest of the reclaim run."""

from __future__ import annotations

import errno
import os

import pytest

from chunk.storage.reclaim import Reclaimer
from chunk.storage.replica_store import ReplicaStore

from .replica_nodes import EXTENT, block
from .test_reclaim import ME, extent, put, snapshot, volume
from zstore.keys import Keys
from zstore.records import ClusterInfo

pytestmark = pytest.mark.timeout(60)


def _versions(store, vid, idx):
    rep = store._replicas[(vid, idx)]                          # noqa: SLF001
    return sorted((b, origin, key) for key in rep.keys
                  for b, (origin, _) in rep.versions[key].entries.items())


class FailingFiles:
    """``os.pwrite`` / ``os.unlink`` raising ``err`` on the files of one extent (its part of the
    disk answers I/O errors); every other file works."""

    def __init__(self, monkeypatch, name: str, err: int) -> None:
        self.name, self.err, self.on, self.hits = name, err, True, 0
        self.real_pwrite, self.real_unlink = os.pwrite, os.unlink
        monkeypatch.setattr(os, "pwrite", self.pwrite)
        monkeypatch.setattr(os, "unlink", self.unlink)

    def _fail(self, what) -> None:
        if self.on and self.name in str(what):
            self.hits += 1
            raise OSError(self.err, os.strerror(self.err))

    def pwrite(self, fd, data, offset):
        self._fail(os.readlink(f"/proc/self/fd/{fd}"))
        return self.real_pwrite(fd, data, offset)

    def unlink(self, path, *a, **kw):
        self._fail(path)
        return self.real_unlink(path, *a, **kw)


async def _setup(etcd_client, etcd_config, tmp_path):
    keys = Keys(etcd_config.prefix)
    await put(etcd_client, keys.cluster(), ClusterInfo(cluster_id="c1"))
    store = ReplicaStore([(tmp_path / "disk", None)], extent_size=EXTENT, cow_sync=False)
    for vid in ("a1", "m5"):                       # sorted: a1's extent is reclaimed first
        await volume(etcd_client, keys, vid, snap_seq=3)
        await extent(etcd_client, keys, store, vid, 0)       # block 0 at seq 1
        store.write(vid, 0, 4096, block("b1"), 2)
        store.write(vid, 0, 0, block("x") + block("y"), 3)   # versions (0, 1) and (1, 2)
        await snapshot(etcd_client, keys, f"s-{vid}", vid, 1)  # seq 1 kept, seq 2's deleted
    await volume(etcd_client, keys, "z9")
    await extent(etcd_client, keys, store, "z9", 0)
    await etcd_client.delete(keys.volume("z9"))               # z9 deleted: its extent goes
    return store, keys


@pytest.mark.parametrize("err", [errno.EIO, errno.EROFS])
async def test_one_extent_whose_trim_fails_does_not_stop_the_rest(etcd_client, etcd_config, tmp_path,
                                                                  monkeypatch, err):
    store, keys = await _setup(etcd_client, etcd_config, tmp_path)
    try:
        fault = FailingFiles(monkeypatch, "a1.0", err)
        r = Reclaimer(store, etcd_client, keys, ME, interval=3600)
        summary = await r.run_once()                  # raised StoreIOError before the fix
        assert fault.hits
        assert summary["deleted"] == [("z9", 0)] and ("z9", 0) not in store.extents()
        assert _versions(store, "m5", 0) == [(0, 1, 2)]            # m5 trimmed after a1 failed
        assert len(_versions(store, "a1", 0)) == 2                 # a1 kept what it had
        st = r.status()
        assert st["failed"] == 1 and "a1/0" in st["last_failure"] and st["last_error"] is None
        assert st["runs"] == 1

        await r.run_once()                            # still failing: tried again, counted again
        assert r.status()["failed"] == 2 and r.status()["runs"] == 2

        fault.on = False                              # the disk answers again: a1 is trimmed
        await r.run_once()
        assert _versions(store, "a1", 0) == [(0, 1, 2)] and r.status()["failed"] == 2
    finally:
        store.close()


async def test_one_extent_whose_delete_fails_does_not_stop_the_rest(etcd_client, etcd_config,
                                                                    tmp_path, monkeypatch):
    store, keys = await _setup(etcd_client, etcd_config, tmp_path)
    try:
        await etcd_client.delete(keys.volume("a1"))   # a1 deleted too; its files do not go
        fault = FailingFiles(monkeypatch, "a1.0", errno.EIO)
        r = Reclaimer(store, etcd_client, keys, ME, interval=3600)
        summary = await r.run_once()
        assert fault.hits
        assert summary["deleted"] == [("z9", 0)] and ("z9", 0) not in store.extents()
        assert _versions(store, "m5", 0) == [(0, 1, 2)]
        assert r.status()["failed"] == 1 and r.status()["deleted"] == 1
    finally:
        store.close()
