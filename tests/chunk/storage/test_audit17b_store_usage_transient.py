"""ReplicaStore.usage: a transient statvfs error is not a disk failure (audit 17b, item 3).

``usage`` failed a disk until restart on any statvfs error, while ``_dir_gone`` (a CREATE's,
a DELETE's check of the same directory) ignores transient ones: one ENOMEM during a disk
probe kept a healthy disk out of placement for good. Real files in tmp_path; the error is
injected behind ``os.statvfs`` for one probe, as test_store_enospc_clears does; a removed
directory is removed for real.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from chunk.storage.extent_file import BLOCK_SIZE
from chunk.storage.replica_store import ReplicaStore

from .test_store_disk_vanished import _state

pytestmark = pytest.mark.timeout(60)

SIZE = 32 * BLOCK_SIZE
V = "v"


def _statvfs_failing(monkeypatch, path: Path, err: int) -> None:
    real = os.statvfs

    def statvfs(p):
        if Path(p) == path:
            raise OSError(err, os.strerror(err))
        return real(p)
    monkeypatch.setattr(os, "statvfs", statvfs)


@pytest.mark.parametrize("err", [errno.EINTR, errno.EAGAIN, errno.ENOMEM, errno.ESTALE],
                         ids=errno.errorcode.get)
def test_a_transient_statvfs_error_is_reported_for_one_probe_only(tmp_path, monkeypatch, err):
    with ReplicaStore([(tmp_path / "d0", None)], extent_size=SIZE) as s:
        _statvfs_failing(monkeypatch, tmp_path / "d0", err)
        st = _state(s, "d0")
        assert st["state"] == "failed" and os.strerror(err) in st["error"]
        monkeypatch.undo()
        assert _state(s, "d0")["state"] == "ok", "failed until a restart"
        s.create(V, 0, 1)                                  # placed there again
        s.write(V, 0, 0, b"x" * BLOCK_SIZE, 1)
        assert s.read(V, 0, 0, BLOCK_SIZE)[0] == b"x" * BLOCK_SIZE


def test_an_eio_from_statvfs_still_fails_the_disk_for_good(tmp_path, monkeypatch):
    with ReplicaStore([(tmp_path / "d0", None)], extent_size=SIZE) as s:
        _statvfs_failing(monkeypatch, tmp_path / "d0", errno.EIO)
        assert _state(s, "d0")["state"] == "failed"
        monkeypatch.undo()
        assert _state(s, "d0")["state"] == "failed"


def test_a_removed_directory_still_fails_the_disk_for_good(tmp_path):
    with ReplicaStore([(tmp_path / "d0", None), (tmp_path / "d1", None)], extent_size=SIZE) as s:
        shutil.rmtree(tmp_path / "d0")
        st = _state(s, "d0")
        assert st["state"] == "failed" and "statvfs" in st["error"]
        (tmp_path / "d0").mkdir()                          # an empty directory in its place
        assert _state(s, "d0")["state"] == "failed"
        assert _state(s, "d1")["state"] == "ok"
