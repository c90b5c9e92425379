"""Epoch fencing on a replica: stale owners bounce, the highest epoch survives a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from chunk.storage.extent_file import BLOCK_SIZE, ExtentFile
from chunk.storage.fencing import EpochFence, StaleEpochError

SIZE = 16 * BLOCK_SIZE


def _extent(tmp_path: Path, volume: str, index: int, epoch: int = 0) -> ExtentFile:
    return ExtentFile.create(tmp_path, volume, index, epoch=epoch, extent_size=SIZE)


def test_older_epoch_is_rejected_equal_and_newer_admitted(tmp_path: Path):
    fence = EpochFence()
    with _extent(tmp_path, "v", 0, epoch=3) as e:
        fence.admit(e, 3)
        with pytest.raises(StaleEpochError) as info:
            fence.admit(e, 2)
        assert (info.value.epoch, info.value.highest) == (2, 3)
        fence.admit(e, 5)
        assert e.epoch == 5 and fence.highest("v") == 5
        with pytest.raises(StaleEpochError):
            fence.admit(e, 4)


def test_epoch_is_per_volume_across_its_extents(tmp_path: Path):
    fence = EpochFence()
    with _extent(tmp_path, "v", 0) as a, _extent(tmp_path, "v", 1) as b, \
            _extent(tmp_path, "w", 0) as other:
        fence.admit(a, 7)                   # the new owner touched extent 0 only
        with pytest.raises(StaleEpochError):
            fence.admit(b, 6)               # the old owner is fenced on extent 1 too
        fence.admit(other, 1)               # other volumes are independent
        assert b.epoch == 0                 # rejected requests persist nothing


def test_highest_epoch_survives_restart(tmp_path: Path):
    fence = EpochFence()
    with _extent(tmp_path, "v", 0) as a, _extent(tmp_path, "v", 1):
        fence.admit(a, 9)
    (tmp_path / "junk.hdr").write_bytes(b"not a header")
    restarted = EpochFence()
    assert restarted.scan(tmp_path) == [tmp_path / "junk.hdr"]
    assert restarted.highest("v") == 9
    with ExtentFile.open(tmp_path, "v", 1) as b:
        with pytest.raises(StaleEpochError):
            restarted.admit(b, 8)
        restarted.admit(b, 9)
