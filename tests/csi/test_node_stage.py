"""NodeStageVolume without a kernel: the mount options it picks, what it refuses, and what it
leaves alone (fake host commands, a fake sysfs and mount table in tmp_path)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from csi import csi_pb2 as pb
from tests.csi.test_node_unit import CTX, AbortCtx, _staged_node

Mode = pb.VolumeCapability.AccessMode


def stage_req(st: Path, fs: str = "ext4", mode: int = Mode.SINGLE_NODE_WRITER,
              flags: tuple[str, ...] = ()) -> pb.NodeStageVolumeRequest:
    c = pb.VolumeCapability(access_mode=Mode(mode=mode))
    if fs == "block":
        c.block.SetInParent()
    else:
        c.mount.fs_type = fs
        c.mount.mount_flags.extend(flags)
    return pb.NodeStageVolumeRequest(volume_id="v1", staging_target_path=str(st), volume_capability=c,
                                     publish_context=CTX)


def mount_calls(host) -> list[list[str]]:
    return [c for c in host.calls if c[0] == "mount"]


async def test_an_xfs_stage_mounts_with_nouuid(tmp_path: Path, monkeypatch):
    """A clone or restored snapshot of an xfs volume has its source's UUID: without nouuid it
    cannot be mounted on a node where the source is mounted ("Filesystem has duplicate UUID")."""
    st = tmp_path / "st"
    node, host, dev = _staged_node(tmp_path, monkeypatch, {})
    host.answers[("blkid", "-p", "-o", "export", dev)] = (0, "DEVNAME=x\nTYPE=xfs\n")
    await node.NodeStageVolume(stage_req(st, "xfs", flags=("noatime",)), AbortCtx())
    assert mount_calls(host) == [["mount", "-t", "xfs", "-o", "noatime,nouuid", dev, str(st)]]


async def test_an_ext4_stage_has_no_xfs_options(tmp_path: Path, monkeypatch):
    st = tmp_path / "st"
    node, host, dev = _staged_node(tmp_path, monkeypatch, {})
    host.answers[("blkid", "-p", "-o", "export", dev)] = (0, "DEVNAME=x\nTYPE=ext4\n")
    await node.NodeStageVolume(stage_req(st, "ext4"), AbortCtx())
    assert mount_calls(host) == [["mount", "-t", "ext4", dev, str(st)]]
