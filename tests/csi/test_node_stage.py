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


@pytest.mark.parametrize("fs, skip", [("ext4", "noload"), ("xfs", "norecovery")])
async def test_a_readonly_stage_does_not_replay_the_journal(tmp_path: Path, monkeypatch, fs, skip):
    """A reader-only mode is exported write-protected: a dirty journal (a volume restored from
    a crash-consistent snapshot, a writer that crashed) cannot be replayed, and a plain ro
    mount fails ("write access unavailable", "recovery required on read-only device")."""
    st = tmp_path / "st"
    node, host, dev = _staged_node(tmp_path, monkeypatch, {})
    host.answers[("blkid", "-p", "-o", "export", dev)] = (0, f"DEVNAME=x\nTYPE={fs}\n")
    await node.NodeStageVolume(stage_req(st, fs, mode=Mode.MULTI_NODE_READER_ONLY), AbortCtx())
    opts = mount_calls(host)[0][4].split(",")
    assert mount_calls(host)[0][:4] == ["mount", "-t", fs, "-o"] and "ro" in opts and skip in opts


async def test_a_readonly_stage_of_a_blank_volume_is_failed_precondition_not_mkfs(tmp_path: Path, monkeypatch):
    """mkfs on a write-protected disk fails every time (INTERNAL forever): no filesystem to
    mount read-only is the caller's problem, said once, and nothing is written."""
    st = tmp_path / "st"
    node, host, dev = _staged_node(tmp_path, monkeypatch, {})
    host.answers[("blkid", "-p", "-o", "export", dev)] = (2, "")          # blank; the head reads
    with pytest.raises(RuntimeError) as e:
        await node.NodeStageVolume(stage_req(st, "ext4", mode=Mode.SINGLE_NODE_READER_ONLY), AbortCtx())
    assert e.value.args[0] == grpc.StatusCode.FAILED_PRECONDITION and "no filesystem" in e.value.args[1]
    assert not any(c[0].startswith("mkfs") for c in host.calls) and not mount_calls(host)
    assert ["iscsiadm", "-m", "session", "-r", "1", "--logout"] in host.calls    # undone, as any failed stage
