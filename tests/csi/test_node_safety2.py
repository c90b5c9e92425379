"""Node safety, continued: the by-id link is only trusted when the disk it names has the
volume's wwid (a stale link can name another volume's disk once its sdX name is reused).
Fake host commands, a fake sysfs and mount table in tmp_path; no kernel, no iSCSI."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import grpc
import pytest

import csi.node as node_mod
from csi import csi_pb2 as pb
from tests.csi.test_node_stage import OLD_WWN, _lun_dev, _p3, _wwid, mount_calls, stage_req
from tests.csi.test_node_staging_safety import _blk_line, _fs_line, _node, _publish, _save, _table, _unstage
from tests.csi.test_node_unit import CTX, AbortCtx

OTHER_WWN = "6001405" + "b" * 25           # volume B's disk


def _sysfs_disk(tmp_path: Path, name: str, wwn: str) -> Path:
    """/sys/block/<name> with its wwid, delete and rescan files; returns the device dir."""
    _wwid(tmp_path, name, wwn)
    d = tmp_path / "sys" / "block" / name / "device"
    (d / "delete").write_text("")
    (d / "rescan").write_text("")
    return d


# ---- 4: a stale wwn link naming another volume's disk ----
async def test_unstage_through_a_stale_link_does_not_delete_the_other_volumes_disk(tmp_path: Path, monkeypatch):
    """v1's disk is gone; sdq now is volume B's disk, and udev has not removed wwn-0x<v1>,
    which still names sdq. NodeUnstage of v1 flushed and deleted sdq: B's disk, under B's
    pod. The link is checked against sdq's wwid: v1's disk counts as gone; B's disk and the
    session (B still uses it) stay, v1's state goes."""
    node, host, dev = _node(tmp_path, monkeypatch, wwid=False)
    d = _sysfs_disk(tmp_path, "sdq", OTHER_WWN)
    host.answers[("iscsiadm", "-m", "session", "-P", "3")] = _p3("sdq")
    _save(node, "ext4")
    await node.NodeUnstageVolume(_unstage(tmp_path / "st"), AbortCtx())
    assert (d / "delete").read_text() == "" and ["blockdev", "--flushbufs", dev] not in host.calls
    assert not any("--logout" in c for c in host.calls)
    assert node._load("v1") is None


async def test_unstage_does_not_delete_another_volumes_disk_mounted_at_the_staging_path(tmp_path: Path,
                                                                                          monkeypatch):
    """The staging path has a disk mounted whose wwid is not v1's: it is unmounted (the CO
    asked for that path) but not flushed and deleted."""
    st = tmp_path / "st"
    node, host, _ = _node(tmp_path, monkeypatch, _fs_line(st, "/dev/sdzz"), wwid=False)
    d = _sysfs_disk(tmp_path, "sdzz", OTHER_WWN)
    host.answers[("iscsiadm", "-m", "session", "-P", "3")] = _p3("sdzz")
    _save(node, "ext4")
    await node.NodeUnstageVolume(_unstage(st), AbortCtx())
    assert ["umount", str(st)] in host.calls
    assert (d / "delete").read_text() == "" and ["blockdev", "--flushbufs", "/dev/sdzz"] not in host.calls
    assert not any("--logout" in c for c in host.calls)


async def test_a_raw_block_publish_through_a_stale_link_is_refused(tmp_path: Path, monkeypatch):
    """NodePublish of v1 raw block bound the device the link names: B's disk, into v1's pod."""
    st, target = tmp_path / "st", tmp_path / "pods" / "p0" / "dev"
    node, host, dev = _node(tmp_path, monkeypatch, wwid=False)
    _sysfs_disk(tmp_path, "sdq", OTHER_WWN)
    _save(node, "block")
    with pytest.raises(RuntimeError) as e:
        await node.NodePublishVolume(_publish(st, target, "block"), AbortCtx())
    assert e.value.args[0] == grpc.StatusCode.FAILED_PRECONDITION and "stale link" in e.value.args[1]
    assert not any(c[:2] == ["mount", "--bind"] for c in host.calls)


async def test_a_raw_block_republish_through_a_stale_link_is_not_answered_ok(tmp_path: Path, monkeypatch):
    """The target already has a bind of sdq (B's disk): a repeat compared it with the stale
    link's disk and answered OK."""
    st, target = tmp_path / "st", tmp_path / "pods" / "p0" / "dev"
    node, host, dev = _node(tmp_path, monkeypatch, _blk_line(target), wwid=False)
    _sysfs_disk(tmp_path, "sdq", OTHER_WWN)
    _save(node, "block")
    with pytest.raises(RuntimeError) as e:
        await node.NodePublishVolume(_publish(st, target, "block"), AbortCtx())
    assert e.value.args[0] == grpc.StatusCode.FAILED_PRECONDITION


async def test_expand_through_a_stale_link_is_refused(tmp_path: Path, monkeypatch):
    """NodeExpand of v1 rescanned and reported the size of B's disk."""
    blk = tmp_path / "pods" / "p0" / "dev"
    node, host, dev = _node(tmp_path, monkeypatch, _blk_line(blk), wwid=False)
    d = _sysfs_disk(tmp_path, "sdq", OTHER_WWN)
    _save(node, "block")
    host.answers[("blockdev", "--getsize64", dev)] = (0, f"{64 << 20}\n")
    with pytest.raises(RuntimeError) as e:
        await node.NodeExpandVolume(pb.NodeExpandVolumeRequest(
            volume_id="v1", volume_path=str(blk), capacity_range=pb.CapacityRange(required_bytes=64 << 20)),
            AbortCtx())
    assert e.value.args[0] == grpc.StatusCode.FAILED_PRECONDITION and "stale link" in e.value.args[1]
    assert (d / "rescan").read_text() == "" and not any(c[0] == "blockdev" for c in host.calls)


async def test_the_own_disk_behind_the_link_is_still_unstaged(tmp_path: Path, monkeypatch):
    """The check does not stop the normal case: the link's disk has v1's wwid."""
    node, host, dev = _node(tmp_path, monkeypatch, wwid=False)
    d = _sysfs_disk(tmp_path, "sdq", CTX["wwn"])
    _save(node, "ext4")
    kernel = asyncio.create_task(_delete_when_asked(d.parent))
    await asyncio.wait_for(node.NodeUnstageVolume(_unstage(tmp_path / "st"), AbortCtx()), 5)
    await asyncio.wait_for(kernel, 1)
    assert ["blockdev", "--flushbufs", dev] in host.calls and not d.exists()


# ---- 3: a corrupt state file (power loss before the data reached the disk) ----


async def _delete_when_asked(sysdisk: Path) -> None:
    """The kernel's side of /sys/block/<name>/device/delete: the disk's entry goes. Bounded
    (30 s), so a test that failed before asking leaves no task polling behind it."""
    for _ in range(3000):
        if (sysdisk / "device" / "delete").read_text() == "1":
            shutil.rmtree(sysdisk)
            return
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("content", [b"", b'{"target": "iqn.2026-01.io.zstore:1d2', b"\x00" * 64, b"[]"])
async def test_unstage_with_a_corrupt_state_file_unmounts_deletes_the_disk_and_logs_out(
        tmp_path: Path, monkeypatch, content):
    """_save did no fsync: a power loss left v1.json empty or truncated, and every call on v1
    raised JSONDecodeError (UNKNOWN) forever, unstage included. The disk mounted at the staging
    path names its session: unmounted, deleted, logged out, and the broken file removed."""
    st = tmp_path / "st"
    node, host, _ = _node(tmp_path, monkeypatch, _fs_line(st, "/dev/sdzz"), wwid=False)
    _sysfs_disk(tmp_path, "sdzz", CTX["wwn"])
    host.answers[("iscsiadm", "-m", "session", "-P", "3")] = _p3("sdzz")
    node.state_dir.mkdir(parents=True, exist_ok=True)
    node._state_path("v1").write_bytes(content)
    kernel = asyncio.create_task(_delete_when_asked(tmp_path / "sys" / "block" / "sdzz"))
    await asyncio.wait_for(node.NodeUnstageVolume(_unstage(st), AbortCtx()), 5)
    await asyncio.wait_for(kernel, 1)
    assert ["umount", str(st)] in host.calls and ["blockdev", "--flushbufs", "/dev/sdzz"] in host.calls
    assert ["iscsiadm", "-m", "session", "-r", "1", "--logout"] in host.calls
    assert not node._state_path("v1").exists()


async def test_unstage_with_a_corrupt_state_file_and_nothing_mounted_is_ok(tmp_path: Path, monkeypatch):
    node, host, _ = _node(tmp_path, monkeypatch)
    node.state_dir.mkdir(parents=True, exist_ok=True)
    node._state_path("v1").write_bytes(b"")
    await node.NodeUnstageVolume(_unstage(tmp_path / "st"), AbortCtx())
    assert not node._state_path("v1").exists()


async def test_a_corrupt_state_file_of_the_volume_does_not_block_its_stage(tmp_path: Path, monkeypatch):
    st = tmp_path / "st"
    node, host, dev = _node(tmp_path, monkeypatch)
    host.answers[("blkid", "-p", "-o", "export", dev)] = (0, "DEVNAME=x\nTYPE=ext4\n")
    node.state_dir.mkdir(parents=True, exist_ok=True)
    node._state_path("v1").write_bytes(b"")
    await node.NodeStageVolume(stage_req(st), AbortCtx())
    assert ["mount", "-t", "ext4", dev, str(st)] in host.calls
    assert node._load("v1")["wwn"] == CTX["wwn"]


async def test_another_volumes_corrupt_state_file_does_not_fail_a_stage(tmp_path: Path, monkeypatch):
    """_replace_stale_disk reads every state file: one empty file (another volume's) made
    every stage that met a stale disk at its LUN fail with UNKNOWN."""
    st = tmp_path / "st"
    node, host, dev = _node(tmp_path, monkeypatch, wwid=False)
    link = tmp_path / "by-id" / f"wwn-0x{CTX['wwn']}"
    link.unlink()
    host.answers[("blkid", "-p", "-o", "export", dev)] = (0, "DEVNAME=x\nTYPE=ext4\n")
    node.state_dir.mkdir(parents=True, exist_ok=True)
    node._state_path("v2").write_bytes(b"")
    stale = _lun_dev(tmp_path, "sdst", OLD_WWN)

    async def kernel():
        while (stale / "delete").read_text() != "1":
            await asyncio.sleep(0.01)
        shutil.rmtree(stale)
        scan = tmp_path / "sys" / "class" / "scsi_host" / "host0" / "scan"
        scan.write_text("")
        while scan.read_text() != f"- - {CTX['lun']}":
            await asyncio.sleep(0.01)
        link.symlink_to(tmp_path / "sdq")

    task = asyncio.create_task(kernel())
    try:
        await asyncio.wait_for(node.NodeStageVolume(stage_req(st), AbortCtx()), 5)
    finally:
        task.cancel()
    assert ["mount", "-t", "ext4", dev, str(st)] in host.calls


async def test_the_state_file_is_fsynced_before_and_after_it_replaces_the_old_one(tmp_path: Path, monkeypatch):
    node, host, _ = _node(tmp_path, monkeypatch)
    synced: list[str] = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    _save(node, "ext4")
    assert str(node.state_dir / "v1.tmp") in synced and str(node.state_dir) in synced
    assert synced.index(str(node.state_dir / "v1.tmp")) < synced.index(str(node.state_dir))
    assert node._load("v1")["kind"] == "ext4"


# ---- 2: publish_context's readonly (a PV with readOnly: true and a writer access mode) ----


def _ro_ctx(req: pb.NodeStageVolumeRequest) -> pb.NodeStageVolumeRequest:
    req.publish_context["readonly"] = "true"
    return req


@pytest.mark.parametrize("fs, skip", [("ext4", "noload"), ("xfs", "norecovery")])
async def test_a_stage_with_readonly_in_publish_context_mounts_ro_without_journal_replay(
        tmp_path: Path, monkeypatch, fs, skip):
    """ReadWriteOnce PV with readOnly: ControllerPublish put the node on the ACL read-only (the
    LUN is write-protected) and said so in publish_context, but the stage took readonly from
    the access mode alone: a rw mount, which fails for a dirty journal on every retry."""
    st = tmp_path / "st"
    node, host, dev = _node(tmp_path, monkeypatch)
    host.answers[("blkid", "-p", "-o", "export", dev)] = (0, f"DEVNAME=x\nTYPE={fs}\n")
    await node.NodeStageVolume(_ro_ctx(stage_req(st, fs)), AbortCtx())
    call = mount_calls(host)[0]
    assert call[:4] == ["mount", "-t", fs, "-o"] and {"ro", skip} <= set(call[4].split(","))
    assert node._load("v1")["ro"] is True


async def test_a_blank_volume_with_readonly_in_publish_context_is_never_formatted(tmp_path: Path, monkeypatch):
    st = tmp_path / "st"
    node, host, dev = _node(tmp_path, monkeypatch, wwid=False)
    host.answers[("blkid", "-p", "-o", "export", dev)] = (2, "")          # blank; the head reads
    with pytest.raises(RuntimeError) as e:
        await node.NodeStageVolume(_ro_ctx(stage_req(st)), AbortCtx())
    assert e.value.args[0] == grpc.StatusCode.FAILED_PRECONDITION and "publish_context" in e.value.args[1]
    assert not any(c[0].startswith("mkfs") for c in host.calls) and not mount_calls(host)


async def test_readonly_false_in_publish_context_is_a_read_write_stage(tmp_path: Path, monkeypatch):
    st = tmp_path / "st"
    node, host, dev = _node(tmp_path, monkeypatch)
    host.answers[("blkid", "-p", "-o", "export", dev)] = (0, "DEVNAME=x\nTYPE=ext4\n")
    req = stage_req(st)
    req.publish_context["readonly"] = "false"
    await node.NodeStageVolume(req, AbortCtx())
    assert mount_calls(host) == [["mount", "-t", "ext4", dev, str(st)]] and node._load("v1")["ro"] is False


async def test_a_publish_with_readonly_in_publish_context_is_remounted_ro(tmp_path: Path, monkeypatch):
    st, target = tmp_path / "st", tmp_path / "pods" / "p0" / "vol"
    dev = str(tmp_path / "sdq")
    node, host, _ = _node(tmp_path, monkeypatch, _fs_line(st, dev, "ro,relatime"))
    _save(node, "ext4", ro=True)
    req = _publish(st, target)
    req.publish_context["readonly"] = "true"
    await node.NodePublishVolume(req, AbortCtx())
    assert ["mount", "-o", "remount,bind,ro", str(target)] in host.calls


async def test_a_restage_of_a_volume_recorded_rw_but_mounted_ro_is_ok_and_the_record_fixed(
        tmp_path: Path, monkeypatch):
    """Staged by a plugin that ignored publish_context's readonly: recorded rw, while mount fell
    back to ro on the write-protected disk. kubelet's repeat NodeStage (now read-only) must not
    be ALREADY_EXISTS for a volume in use; the record is corrected."""
    st = tmp_path / "st"
    node, host, dev = _node(tmp_path, monkeypatch, _fs_line(st, str(tmp_path / "sdq"), "ro,relatime"))
    _save(node, "ext4", ro=False)
    await node.NodeStageVolume(_ro_ctx(stage_req(st)), AbortCtx())
    assert host.calls == [] and node._load("v1")["ro"] is True


# ---- 6: a holder (dm map, LVM, md) over the disk ----
@pytest.mark.parametrize("mounted", [True, False])
async def test_unstage_of_a_disk_with_a_holder_is_refused_and_changes_nothing(tmp_path: Path, monkeypatch,
                                                                              mounted):
    """Stage refuses a disk with a holder; unstage ignored them: it flushed and deleted the disk
    under a dm map (dm-0 then fails every I/O) and logged the session out."""
    st = tmp_path / "st"
    node, host, dev = _node(tmp_path, monkeypatch, _fs_line(st, str(tmp_path / "sdq")) if mounted else "",
                            wwid=False)
    d = _sysfs_disk(tmp_path, "sdq", CTX["wwn"])
    (tmp_path / "sys" / "block" / "sdq" / "holders" / "dm-0").mkdir(parents=True)
    _save(node, "ext4")
    with pytest.raises(RuntimeError) as e:
        await node.NodeUnstageVolume(_unstage(st), AbortCtx())
    assert e.value.args[0] == grpc.StatusCode.FAILED_PRECONDITION and "holder dm-0" in e.value.args[1]
    assert (d / "delete").read_text() == "" and ["blockdev", "--flushbufs", dev] not in host.calls
    assert not any("--logout" in c for c in host.calls) and node._load("v1") is not None
    assert (str(st) in _table(tmp_path)) == mounted and ["umount", str(st)] not in host.calls
    # the holder gone: unstaged
    (tmp_path / "sys" / "block" / "sdq" / "holders" / "dm-0").rmdir()
    kernel = asyncio.create_task(_delete_when_asked(tmp_path / "sys" / "block" / "sdq"))
    await asyncio.wait_for(node.NodeUnstageVolume(_unstage(st), AbortCtx()), 5)
    await asyncio.wait_for(kernel, 1)
    assert ["iscsiadm", "-m", "session", "-r", "1", "--logout"] in host.calls and node._load("v1") is None


# ---- 5: the blank check must have read the head of the disk, all of it ----


async def test_a_short_read_of_the_head_is_unavailable_not_blank(tmp_path: Path, monkeypatch):
    """blkid found no signature and the head "read": os.pread's length was discarded, so a
    read cut short by an I/O error (the kernel returns the bytes before the failing sector)
    counted as blank, and mkfs.ext4 ran over a LUN failing its reads."""
    st = tmp_path / "st"
    node, host, dev = _node(tmp_path, monkeypatch, wwid=False)
    host.answers[("blkid", "-p", "-o", "export", dev)] = (2, "")
    real = os.pread
    monkeypatch.setattr(node_mod.os, "pread", lambda fd, n, off: real(fd, n, off)[: n // 2])
    with pytest.raises(RuntimeError) as e:
        await node.NodeStageVolume(stage_req(st), AbortCtx())
    assert e.value.args[0] == grpc.StatusCode.UNAVAILABLE and "short read" in e.value.args[1]
    assert not any(c[0].startswith("mkfs") for c in host.calls) and not mount_calls(host)


async def test_a_disk_of_no_capacity_is_unavailable_not_blank(tmp_path: Path, monkeypatch):
    st = tmp_path / "st"
    node, host, dev = _node(tmp_path, monkeypatch, wwid=False)
    Path(dev).write_bytes(b"")
    host.answers[("blkid", "-p", "-o", "export", dev)] = (2, "")
    with pytest.raises(RuntimeError) as e:
        await node.NodeStageVolume(stage_req(st), AbortCtx())
    assert e.value.args[0] == grpc.StatusCode.UNAVAILABLE
    assert not any(c[0].startswith("mkfs") for c in host.calls) and not mount_calls(host)


@pytest.mark.parametrize("size", [1 << 20, 4096 * 3])
async def test_a_blank_disk_that_reads_whole_is_formatted(tmp_path: Path, monkeypatch, size):
    """The control: a blank disk whose head reads in full (smaller than 1 MiB too) is formatted."""
    st = tmp_path / "st"
    node, host, dev = _node(tmp_path, monkeypatch)
    Path(dev).write_bytes(bytes(size))
    host.answers[("blkid", "-p", "-o", "export", dev)] = (2, "")
    await node.NodeStageVolume(stage_req(st), AbortCtx())
    assert ["mkfs.ext4", "-F", "-q", dev] in host.calls
