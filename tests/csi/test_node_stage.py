"""NodeStageVolume without a kernel: the mount options it picks, what it refuses, and what it
leaves alone (fake host commands, a fake sysfs and mount table in tmp_path)."""

from __future__ import annotations

import asyncio
import shutil
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


def _state(node) -> None:
    node._save("v1", {"target": CTX["targetIQN"], "lun": CTX["lun"], "wwn": CTX["wwn"],
                      "portal": CTX["portal"], "kind": "ext4"})


def _wwid(tmp_path: Path, name: str, wwn: str) -> None:
    d = tmp_path / "sys" / "block" / name / "device"
    d.mkdir(parents=True, exist_ok=True)
    (d / "wwid").write_text(f"naa.{wwn}\n")


async def test_a_repeated_stage_of_a_mounted_volume_runs_nothing_and_keeps_its_state(tmp_path: Path, monkeypatch):
    """kubelet re-sends NodeStage for a staged, mounted volume; the wwn link is briefly gone
    (udev). The stage waited for the link, timed out and "undid" itself: the state file of a
    volume in use was deleted (NodePublish of raw block, NodeExpand, NodeUnstage lose it). A
    staged volume is success at once, without attaching anything."""
    st = tmp_path / "st"
    node, host, dev = _staged_node(tmp_path, monkeypatch, {},
                                   mountinfo=f"40 22 8:16 / {st} rw,relatime - ext4 {tmp_path / 'sdq'} rw\n")
    _state(node)
    _wwid(tmp_path, "sdq", CTX["wwn"])
    (tmp_path / "by-id" / f"wwn-0x{CTX['wwn']}").unlink()       # udev is re-creating it
    await node.NodeStageVolume(stage_req(st), AbortCtx())
    assert host.calls == []
    assert node._load("v1") is not None


async def test_a_repeated_stage_of_another_disk_at_the_staging_path_is_already_exists(tmp_path: Path, monkeypatch):
    st = tmp_path / "st"
    node, host, dev = _staged_node(tmp_path, monkeypatch, {},
                                   mountinfo=f"40 22 8:16 / {st} rw,relatime - ext4 {tmp_path / 'sdq'} rw\n")
    _wwid(tmp_path, "sdq", "6001405" + "1" * 25)
    with pytest.raises(RuntimeError) as e:
        await node.NodeStageVolume(stage_req(st), AbortCtx())
    assert e.value.args[0] == grpc.StatusCode.ALREADY_EXISTS
    assert host.calls == []


async def test_a_repeated_raw_block_stage_with_a_failing_scan_keeps_the_session_and_state(tmp_path: Path, monkeypatch):
    """Raw block: staged is the state file plus the disk. A repeat whose LUN scan fails (an
    OSError from sysfs) undid the stage: logged out the session under a disk in use and
    deleted the state."""
    st = tmp_path / "st"
    node, host, dev = _staged_node(tmp_path, monkeypatch, {})
    node._save("v1", {"target": CTX["targetIQN"], "lun": CTX["lun"], "wwn": CTX["wwn"],
                      "portal": CTX["portal"], "kind": "block"})
    _wwid(tmp_path, "sdq", CTX["wwn"])
    scan = tmp_path / "sys" / "class" / "scsi_host" / "host0" / "scan"
    scan.unlink()
    scan.mkdir()                                                # writing it fails: IsADirectoryError
    await node.NodeStageVolume(stage_req(st, "block"), AbortCtx())
    assert not any("--logout" in c for c in host.calls)
    assert node._load("v1") is not None


async def test_a_failed_retry_of_a_stage_cut_short_keeps_the_earlier_state(tmp_path: Path, monkeypatch):
    """The state file was written by an earlier call (cut short before the mount): a retry that
    fails must not remove it, the CO may still unstage that one."""
    st = tmp_path / "st"
    node, host, dev = _staged_node(tmp_path, monkeypatch, {})
    _state(node)
    (tmp_path / "by-id" / f"wwn-0x{CTX['wwn']}").unlink()       # the disk never shows up
    with pytest.raises(RuntimeError) as e:
        await node.NodeStageVolume(stage_req(st), AbortCtx())
    assert e.value.args[0] == grpc.StatusCode.NOT_FOUND
    assert node._load("v1") is not None


# ---- the disk at our H:C:T:L must be ours: a deleted volume's LUN is handed out again ----
OLD_WWN = "6001405" + "a" * 25


def _lun_dev(tmp_path: Path, name: str, wwn: str, lun: str = CTX["lun"]) -> Path:
    """The SCSI device at 0:0:0:<lun> under the fake session1 of host0, with disk ``name``."""
    d = tmp_path / "sys" / "devices" / "platform" / "host0" / "session1" / "target0:0:0" / f"0:0:0:{lun}"
    (d / "block" / name / "holders").mkdir(parents=True)
    (d / "wwid").write_text(f"naa.{wwn}\n")
    (d / "delete").write_text("")
    return d


def _p3(*disks: str) -> tuple[int, str]:
    return 0, (f"Target: {CTX['targetIQN']} (non-flash)\n\tSID: 1\n"
               + "".join(f"\t\tAttached scsi disk {d}\t\tState: running\n" for d in disks))


async def test_a_stale_unused_disk_at_our_lun_is_deleted_and_the_lun_scanned_again(tmp_path: Path, monkeypatch):
    """The node still has volume A's disk at the LUN meta now gives to B: the scan does not
    INQUIRE again, so wwn-0x<B> never appeared (NOT_FOUND forever) while wwn-0x<A> pointed
    at B's data. Nothing uses A's disk: delete it, scan again, and B's disk shows up."""
    st = tmp_path / "st"
    node, host, dev = _staged_node(tmp_path, monkeypatch, {})
    link = tmp_path / "by-id" / f"wwn-0x{CTX['wwn']}"
    link.unlink()
    host.answers[("blkid", "-p", "-o", "export", dev)] = (0, "DEVNAME=x\nTYPE=ext4\n")
    stale = _lun_dev(tmp_path, "sdst", OLD_WWN)

    async def kernel():
        """The delete removes the device; the next scan INQUIREs: B's disk, and udev's link."""
        while (stale / "delete").read_text() != "1":
            await asyncio.sleep(0.01)
        shutil.rmtree(stale)
        scan = tmp_path / "sys" / "class" / "scsi_host" / "host0" / "scan"
        scan.write_text("")
        while scan.read_text() != f"- - {CTX['lun']}":
            await asyncio.sleep(0.01)
        _lun_dev(tmp_path, "sdq", CTX["wwn"])
        link.symlink_to(tmp_path / "sdq")

    task = asyncio.create_task(kernel())
    await node.NodeStageVolume(stage_req(st), AbortCtx())
    await task
    assert ["blockdev", "--flushbufs", "/dev/sdst"] in host.calls
    assert ["mount", "-t", "ext4", dev, str(st)] in host.calls


async def test_a_stale_disk_in_use_at_our_lun_is_failed_precondition(tmp_path: Path, monkeypatch):
    st = tmp_path / "st"
    node, host, dev = _staged_node(tmp_path, monkeypatch, {("iscsiadm", "-m", "session", "-P", "3"): _p3("sdst")},
                                   mountinfo="40 22 8:32 / /mnt/old rw,relatime - ext4 /dev/sdst rw\n")
    (tmp_path / "by-id" / f"wwn-0x{CTX['wwn']}").unlink()
    stale = _lun_dev(tmp_path, "sdst", OLD_WWN)
    with pytest.raises(RuntimeError) as e:
        await node.NodeStageVolume(stage_req(st), AbortCtx())
    assert e.value.args[0] == grpc.StatusCode.FAILED_PRECONDITION
    assert "another volume" in e.value.args[1] and "/mnt/old" in e.value.args[1]
    assert (stale / "delete").read_text() == ""
    assert not any("--logout" in c for c in host.calls)       # the old disk still uses the session


async def test_a_device_wait_timeout_deletes_the_disk_the_scan_found(tmp_path: Path, monkeypatch):
    """The scan attached our disk but udev never linked it: the undo deleted nothing (dev None),
    and the session's logout check saw that disk: it stayed, with the session."""
    st = tmp_path / "st"
    node, host, dev = _staged_node(tmp_path, monkeypatch, {})
    (tmp_path / "by-id" / f"wwn-0x{CTX['wwn']}").unlink()
    _lun_dev(tmp_path, "sdtt", CTX["wwn"])
    delete = tmp_path / "sys" / "block" / "sdtt" / "device" / "delete"
    delete.parent.mkdir(parents=True)
    delete.write_text("")
    deleted = []

    async def kernel():
        while delete.read_text() != "1":
            await asyncio.sleep(0.01)
        deleted.append(True)
        shutil.rmtree(delete.parent.parent)

    task = asyncio.create_task(kernel())
    with pytest.raises(RuntimeError) as e:
        await node.NodeStageVolume(stage_req(st), AbortCtx())
    task.cancel()
    assert e.value.args[0] == grpc.StatusCode.NOT_FOUND
    assert ["blockdev", "--flushbufs", "/dev/sdtt"] in host.calls and deleted
    assert ["iscsiadm", "-m", "session", "-r", "1", "--logout"] in host.calls


async def test_a_stage_waiting_for_its_disk_holds_up_no_other_volume_of_the_target(tmp_path: Path, monkeypatch):
    """The device wait (up to device_timeout) ran under the target lock: one volume whose disk
    is slow stalled every stage and unstage of the target's volumes. Now only the login/scan
    and the logout decision are locked, and an unstage meanwhile does not log out the session
    the waiting stage is about to use."""
    st = tmp_path / "st"
    node, host, dev = _staged_node(tmp_path, monkeypatch, {})
    node.device_timeout = 5.0
    link = tmp_path / "by-id" / f"wwn-0x{CTX['wwn']}"
    link.unlink()
    host.answers[("blkid", "-p", "-o", "export", dev)] = (0, "DEVNAME=x\nTYPE=ext4\n")
    stage = asyncio.create_task(node.NodeStageVolume(stage_req(st), AbortCtx()))
    while ["iscsiadm", "-m", "session"] not in host.calls:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)                                    # scanned, waiting for the link
    node._save("v2", {"target": CTX["targetIQN"], "lun": "2", "wwn": OLD_WWN, "portal": CTX["portal"],
                      "kind": "ext4"})
    await asyncio.wait_for(node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(
        volume_id="v2", staging_target_path=str(tmp_path / "st2")), AbortCtx()), 2)
    assert node._load("v2") is None
    assert not any("--logout" in c for c in host.calls)          # v1 is about to use the session
    link.symlink_to(tmp_path / "sdq")
    await asyncio.wait_for(stage, 5)
    assert ["mount", "-t", "ext4", dev, str(st)] in host.calls
    assert not node._pending[CTX["targetIQN"]]
