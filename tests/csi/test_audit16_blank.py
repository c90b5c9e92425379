"""Audit 16: mkfs only on a truly blank disk. ``blkid -p`` exits 2 ("nothing found") for data it
has no signature for (a plain dm-crypt volume, a database's raw file, a raw block volume's
application data): a disk whose head reads but is not zero holds data, and is never formatted.
The one exception is our own mkfs cut short (the plugin killed mid-mkfs): marked (``<vid>.mkfs``
in the state directory, see test_mkfs_mark_unstage) before mkfs runs, so the retry formats again
rather than failing forever."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from csi.host import Host
from csi.node import probe_device
from csi.status import Abort
from tests.csi.node_setup import look_at_mkfs
from tests.csi.test_node_stage import mount_calls, stage_req
from tests.csi.test_node_staging_safety import _node
from tests.csi.test_node_unit import CTX, AbortCtx


async def test_audit16_data_without_a_signature_is_not_blank(tmp_path: Path):
    """Real blkid on a file of random bytes: exit 2, as for zeros; before the fix probe_device
    returned "" (blank) for it, and NodeStage ran mkfs.ext4 -F over the data."""
    img = tmp_path / "data.img"
    img.write_bytes(os.urandom(8 << 20))
    with pytest.raises(Abort) as e:
        await probe_device(Host(""), str(img))
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    (tmp_path / "zero.img").write_bytes(bytes(8 << 20))
    assert await probe_device(Host(""), str(tmp_path / "zero.img")) == ""


async def test_audit16_a_stage_never_formats_a_disk_holding_unnamed_data(tmp_path: Path, monkeypatch):
    st = tmp_path / "st"
    node, host, dev = _node(tmp_path, monkeypatch)
    Path(dev).write_bytes(bytes(4096) + os.urandom(4096) + bytes((1 << 20) - 8192))
    host.answers[("blkid", "-p", "-o", "export", dev)] = (2, "")
    with pytest.raises(RuntimeError) as e:
        await node.NodeStageVolume(stage_req(st), AbortCtx())
    assert e.value.args[0] == grpc.StatusCode.FAILED_PRECONDITION
    assert not any(c[0].startswith("mkfs") for c in host.calls) and not mount_calls(host)


async def test_audit16_mkfs_is_recorded_before_it_runs_and_cleared_once_mounted(tmp_path: Path, monkeypatch):
    st = tmp_path / "st"
    node, host, dev = _node(tmp_path, monkeypatch)
    host.answers[("blkid", "-p", "-o", "export", dev)] = (2, "")
    seen = look_at_mkfs(host, lambda: node._mkfs_marked("v1", CTX["wwn"]))
    await node.NodeStageVolume(stage_req(st), AbortCtx())
    assert seen == [True]
    assert "mkfs" not in node._load("v1") and not node._mkfs_marked("v1", CTX["wwn"])


async def test_audit16_the_retry_of_a_mkfs_cut_short_formats_again(tmp_path: Path, monkeypatch):
    """The plugin was killed mid-mkfs: the head has mkfs's partial writes and no signature yet.
    The state file says our mkfs ran on this WWN, so the retry formats it."""
    st = tmp_path / "st"
    node, host, dev = _node(tmp_path, monkeypatch)
    Path(dev).write_bytes(os.urandom(4096) + bytes((1 << 20) - 4096))
    host.answers[("blkid", "-p", "-o", "export", dev)] = (2, "")
    node._save("v1", {"target": CTX["targetIQN"], "lun": CTX["lun"], "wwn": CTX["wwn"],
                      "portal": CTX["portal"], "kind": "ext4", "ro": False, "mkfs": True})
    await node.NodeStageVolume(stage_req(st), AbortCtx())
    assert ["mkfs.ext4", "-F", "-q", dev] in host.calls
    assert "mkfs" not in node._load("v1")


async def test_audit16_a_mkfs_that_finished_leaves_no_record_when_the_mount_fails(tmp_path: Path, monkeypatch):
    """mkfs done, mount refused: a final error, so the state file goes as before (a leftover
    record would outlive the volume); the filesystem's signature now speaks for the disk."""
    st = tmp_path / "st"
    node, host, dev = _node(tmp_path, monkeypatch)
    host.answers[("blkid", "-p", "-o", "export", dev)] = (2, "")
    host.answers[("mount", "-t", "ext4", "-o", "bogus", dev, str(st))] = (32, "")
    with pytest.raises(RuntimeError) as e:
        await node.NodeStageVolume(stage_req(st, flags=("bogus",)), AbortCtx())
    assert e.value.args[0] == grpc.StatusCode.INTERNAL
    assert ["mkfs.ext4", "-F", "-q", dev] in host.calls and node._load("v1") is None


async def test_audit16_a_failed_mkfs_keeps_its_record_for_the_retry(tmp_path: Path, monkeypatch):
    st = tmp_path / "st"
    node, host, dev = _node(tmp_path, monkeypatch)
    host.answers[("blkid", "-p", "-o", "export", dev)] = (2, "")
    host.answers[("mkfs.ext4", "-F", "-q", dev)] = (1, "")
    with pytest.raises(RuntimeError):
        await node.NodeStageVolume(stage_req(st), AbortCtx())
    assert node._mkfs_marked("v1", CTX["wwn"])      # its own file since the unstage fix, not the state file
