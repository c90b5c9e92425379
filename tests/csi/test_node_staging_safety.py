"""The Node service must not break a volume in use: no mkfs on a disk a pod uses, no unmount
of a staging path under a publish, no answer "done" for a publish or a growth it did not make.
Fake host commands and a fake mount table (``Node.mountinfo``) that ``umount``/``mount``
update, as the kernel would; no kernel, no iSCSI."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from csi import csi_pb2 as pb
from tests.csi.test_node_stage import _wwid, stage_req
from tests.csi.test_node_unit import CTX, AbortCtx, FakeHost, _staged_node

Mode = pb.VolumeCapability.AccessMode
ROOT = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"


class KernelHost(FakeHost):
    """``umount PATH`` takes PATH's last mount out of the mount table; ``mount --bind SRC
    DST`` of a mounted SRC adds DST with SRC's source and root."""

    def __init__(self, answers: dict, mountinfo: Path):
        super().__init__(answers)
        self.mountinfo = mountinfo

    async def run(self, argv, ok=(0,), input=None, secret=()):
        lines = self.mountinfo.read_text().splitlines()
        if argv[0] == "umount":
            hits = [i for i, x in enumerate(lines) if x.split()[4] == argv[1]]
            if hits:
                del lines[hits[-1]]
                self.mountinfo.write_text("".join(f"{x}\n" for x in lines))
        elif argv[:2] == ["mount", "--bind"]:
            src = [x for x in lines if x.split()[4] == argv[2]]
            if src:
                f = src[-1].split()
                lines.append(" ".join(["99", "22", f[2], f[3], argv[3], *f[5:]]))
                self.mountinfo.write_text("".join(f"{x}\n" for x in lines))
        return await super().run(argv, ok, input, secret)


def _node(tmp_path: Path, monkeypatch, mountinfo: str = "", wwid: bool = True):
    """_staged_node with a KernelHost; ``wwid``: the disk's sysfs entry (without it, deleting
    the disk at unstage does not wait for it to go)."""
    node, host, dev = _staged_node(tmp_path, monkeypatch, {}, mountinfo)
    kh = KernelHost(host.answers, tmp_path / "mountinfo")
    node.host = kh
    node.iscsi.host = kh
    if wwid:
        _wwid(tmp_path, "sdq", CTX["wwn"])
    return node, kh, dev


def _save(node, kind: str, **more) -> None:
    node._save("v1", {"target": CTX["targetIQN"], "lun": CTX["lun"], "wwn": CTX["wwn"],
                      "portal": CTX["portal"], "kind": kind, **more})


def _table(tmp_path: Path) -> list[str]:
    return [x.split()[4] for x in (tmp_path / "mountinfo").read_text().splitlines()]


def _fs_line(path: Path, dev: str, opts: str = "rw,relatime", n: int = 40) -> str:
    return f"{n} 22 8:16 / {path} {opts} - ext4 {dev} rw\n"


def _blk_line(path: Path, name: str = "sdq", opts: str = "rw,nosuid", n: int = 61) -> str:
    return f"{n} 22 0:5 /{name} {path} {opts} - devtmpfs udev rw\n"


def _unstage(st: Path) -> pb.NodeUnstageVolumeRequest:
    return pb.NodeUnstageVolumeRequest(volume_id="v1", staging_target_path=str(st))


def _publish(st: Path, target: Path, kind: str = "ext4", readonly: bool = False) -> pb.NodePublishVolumeRequest:
    return pb.NodePublishVolumeRequest(volume_id="v1", staging_target_path=str(st), target_path=str(target),
                                       volume_capability=stage_req(st, kind).volume_capability,
                                       readonly=readonly)


# ---- 2: NodeUnstage refuses before it changes anything; the fake mount table is honoured ----
async def test_unstage_under_a_publish_is_refused_and_leaves_the_staging_mount(tmp_path: Path, monkeypatch):
    """NodeUnstage while a pod still has the volume (kubelet's cleanup after its restart):
    the staging path was unmounted before the refusal, so kubelet could neither publish the
    volume for another pod ("not staged") nor stage it again. Now nothing is run, and the
    staging mount stays, until the publish is gone."""
    st, pub = tmp_path / "st", tmp_path / "pods" / "p0" / "vol"
    dev = str(tmp_path / "sdq")
    node, host, _ = _node(tmp_path, monkeypatch, _fs_line(st, dev) + _fs_line(pub, dev, n=61), wwid=False)
    _save(node, "ext4")
    with pytest.raises(RuntimeError) as e:
        await node.NodeUnstageVolume(_unstage(st), AbortCtx())
    assert e.value.args == (grpc.StatusCode.FAILED_PRECONDITION, f"{dev} is still mounted at {pub}: unpublish it first")
    assert host.calls == [] and str(st) in _table(tmp_path) and node._load("v1") is not None
    # a second pod can still be published from the staging path
    pub2 = tmp_path / "pods" / "p1" / "vol"
    await node.NodePublishVolume(_publish(st, pub2), AbortCtx())
    assert ["mount", "--bind", str(st), str(pub2)] in host.calls
    for p in (pub, pub2):
        await node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id="v1", target_path=str(p)), AbortCtx())
    await node.NodeUnstageVolume(_unstage(st), AbortCtx())
    assert ["umount", str(st)] in host.calls and ["iscsiadm", "-m", "session", "-r", "1", "--logout"] in host.calls
    assert _table(tmp_path) == ["/"] and node._load("v1") is None


async def test_unstage_and_unpublish_read_the_nodes_mount_table(tmp_path: Path, monkeypatch):
    """NodeUnstage, NodeUnpublish, NodeGetVolumeStats read Node.mountinfo, not the host's
    /proc/self/mountinfo (the unit tests' fake table was never seen by them)."""
    st, pub = tmp_path / "st", tmp_path / "pods" / "p0" / "vol"
    pub.mkdir(parents=True)
    dev = str(tmp_path / "sdq")
    node, host, _ = _node(tmp_path, monkeypatch, _fs_line(st, dev) + _fs_line(pub, dev, n=61), wwid=False)
    _save(node, "ext4")
    r = await node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id="v1", volume_path=str(pub)), AbortCtx())
    assert r.usage[0].total > 0
    await node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id="v1", target_path=str(pub)), AbortCtx())
    assert host.calls == [["umount", str(pub)]] and not pub.exists()
    await node.NodeUnstageVolume(_unstage(st), AbortCtx())
    assert host.calls[1] == ["umount", str(st)]
    assert ["iscsiadm", "-m", "session", "-r", "1", "--logout"] in host.calls and node._load("v1") is None


# ---- 1: NodeStage never formats a disk in use, never turns a stage into another kind ----
def _no_probe(host) -> bool:
    return not any(c[0] in ("blkid", "mount") or c[0].startswith("mkfs") for c in host.calls)


async def test_a_filesystem_stage_of_a_volume_staged_raw_is_already_exists(tmp_path: Path, monkeypatch):
    """v1 is staged raw block and a pod has the disk (a bind of its device node); a NodeStage of
    v1 as a filesystem at another path (a second PV with the same handle): blkid calls raw
    data "blank" and mkfs.ext4 ran over the pod's data. Now ALREADY_EXISTS (the spec's
    "volume published but is incompatible"), nothing run, the raw stage's state kept."""
    pub = tmp_path / "pods" / "p0" / "dev"
    node, host, dev = _node(tmp_path, monkeypatch, _blk_line(pub))
    _save(node, "block")
    host.answers[("blkid", "-p", "-o", "export", dev)] = (2, "")          # raw data: no signature
    with pytest.raises(RuntimeError) as e:
        await node.NodeStageVolume(stage_req(tmp_path / "st2"), AbortCtx())
    assert e.value.args[0] == grpc.StatusCode.ALREADY_EXISTS and "raw block" in e.value.args[1]
    assert host.calls == [] and node._load("v1")["kind"] == "block"


async def test_a_filesystem_stage_of_a_disk_in_use_is_refused_before_blkid(tmp_path: Path, monkeypatch):
    """The same without the raw stage's state (lost, or another volume id on the same disk):
    the disk's users are checked before blkid/mkfs; FAILED_PRECONDITION, and no state left."""
    pub = tmp_path / "pods" / "p0" / "dev"
    node, host, dev = _node(tmp_path, monkeypatch, _blk_line(pub))
    host.answers[("blkid", "-p", "-o", "export", dev)] = (2, "")
    with pytest.raises(RuntimeError) as e:
        await node.NodeStageVolume(stage_req(tmp_path / "st2"), AbortCtx())
    assert e.value.args[0] == grpc.StatusCode.FAILED_PRECONDITION and str(pub) in e.value.args[1]
    assert _no_probe(host) and not any("--logout" in c for c in host.calls)
    assert node._load("v1") is None


async def test_a_stage_of_a_disk_with_a_holder_is_refused_before_blkid(tmp_path: Path, monkeypatch):
    """A holder (a dm map, LVM, md over the disk) uses it as much as a mount does."""
    node, host, dev = _node(tmp_path, monkeypatch)
    (tmp_path / "sys" / "block" / "sdq" / "holders" / "dm-4").mkdir(parents=True)
    host.answers[("blkid", "-p", "-o", "export", dev)] = (2, "")
    with pytest.raises(RuntimeError) as e:
        await node.NodeStageVolume(stage_req(tmp_path / "st"), AbortCtx())
    assert e.value.args[0] == grpc.StatusCode.FAILED_PRECONDITION and "holder dm-4" in e.value.args[1]
    assert _no_probe(host)


@pytest.mark.parametrize("was, ro_was, asked, mode", [
    ("ext4", False, "block", Mode.SINGLE_NODE_WRITER),         # filesystem staged, raw block asked
    ("ext4", False, "xfs", Mode.SINGLE_NODE_WRITER),           # another fs_type
    ("ext4", False, "ext4", Mode.SINGLE_NODE_READER_ONLY),     # staged read-write, read-only asked
    ("xfs", True, "xfs", Mode.SINGLE_NODE_WRITER),             # staged read-only, read-write asked
])
async def test_a_restage_incompatible_with_the_stage_there_is_already_exists(tmp_path: Path, monkeypatch,
                                                                              was, ro_was, asked, mode):
    """A repeated NodeStage at the staging path answered success and rewrote the state's kind
    (a block restage of a filesystem made it "block": expand then skipped the filesystem,
    and a later filesystem stage was free to mkfs). ALREADY_EXISTS, the state unchanged."""
    st = tmp_path / "st"
    opts = "ro,relatime" if ro_was else "rw,relatime"
    node, host, dev = _node(tmp_path, monkeypatch, _fs_line(st, str(tmp_path / "sdq"), opts))
    _save(node, was, ro=ro_was)
    with pytest.raises(RuntimeError) as e:
        await node.NodeStageVolume(stage_req(st, asked, mode=mode), AbortCtx())
    assert e.value.args[0] == grpc.StatusCode.ALREADY_EXISTS, e.value.args
    assert host.calls == [] and node._load("v1")["kind"] == was and node._load("v1")["ro"] == ro_was


async def test_a_stage_records_its_mode_and_a_compatible_repeat_is_ok(tmp_path: Path, monkeypatch):
    st = tmp_path / "st"
    node, host, dev = _node(tmp_path, monkeypatch)
    host.answers[("blkid", "-p", "-o", "export", dev)] = (0, "DEVNAME=x\nTYPE=ext4\n")
    await node.NodeStageVolume(stage_req(st, mode=Mode.SINGLE_NODE_READER_ONLY), AbortCtx())
    assert node._load("v1")["kind"] == "ext4" and node._load("v1")["ro"] is True
    (tmp_path / "mountinfo").write_text(ROOT + _fs_line(st, dev, "ro,relatime"))
    host.calls.clear()
    await node.NodeStageVolume(stage_req(st, mode=Mode.MULTI_NODE_READER_ONLY), AbortCtx())
    assert host.calls == []


@pytest.mark.parametrize("kind_was, cap", [("block", None), ("ext4", "block"), ("block", "block")])
async def test_expand_grows_the_filesystem_at_the_volume_path_whatever_the_kind_says(
        tmp_path: Path, monkeypatch, kind_was, cap):
    """NodeExpandVolume skipped the filesystem when the state (rewritten by a block restage)
    or the request's capability said raw block, and reported the new size for a filesystem
    left at its old one. The mount at volume_path decides."""
    pub = tmp_path / "pods" / "p0" / "vol"
    node, host, dev = _node(tmp_path, monkeypatch, _fs_line(pub, str(tmp_path / "sdq"), n=61))
    _save(node, kind_was)
    host.answers[("blockdev", "--getsize64", dev)] = (0, f"{64 << 20}\n")
    req = pb.NodeExpandVolumeRequest(volume_id="v1", volume_path=str(pub),
                                     capacity_range=pb.CapacityRange(required_bytes=64 << 20))
    if cap:
        req.volume_capability.CopyFrom(stage_req(pub, cap).volume_capability)
    r = await node.NodeExpandVolume(req, AbortCtx())
    assert r.capacity_bytes == 64 << 20 and ["resize2fs", dev] in host.calls


async def test_expand_of_a_raw_publish_grows_no_filesystem_and_another_disk_is_refused(tmp_path: Path, monkeypatch):
    blk, other = tmp_path / "pods" / "p0" / "dev", tmp_path / "pods" / "p1" / "vol"
    node, host, dev = _node(tmp_path, monkeypatch, _blk_line(blk) + _fs_line(other, "/dev/sdz", n=62))
    _save(node, "ext4")
    host.answers[("blockdev", "--getsize64", dev)] = (0, f"{64 << 20}\n")
    r = await node.NodeExpandVolume(pb.NodeExpandVolumeRequest(volume_id="v1", volume_path=str(blk)), AbortCtx())
    assert r.capacity_bytes == 64 << 20 and not any(c[0] in ("resize2fs", "xfs_growfs") for c in host.calls)
    with pytest.raises(RuntimeError) as e:
        await node.NodeExpandVolume(pb.NodeExpandVolumeRequest(volume_id="v1", volume_path=str(other)), AbortCtx())
    assert e.value.args[0] == grpc.StatusCode.FAILED_PRECONDITION
    assert not any(c[0] in ("resize2fs", "xfs_growfs") for c in host.calls)


# ---- 3: a disk multipathd claimed (the wwn link points at dm-N) is refused ----
@pytest.mark.parametrize("kind", ["block", "ext4"])
async def test_a_disk_claimed_by_multipathd_is_failed_precondition(tmp_path: Path, monkeypatch, kind):
    """/sys/block/dm-N has no device/wwid, so the by-id link alone vouched for /dev/dm-N: a raw
    block stage answered OK (publish then bound the dm map, whose ro flag, rescan and delete
    are not the disk's), a filesystem stage ran blkid and mkfs on it."""
    node, host, dev = _node(tmp_path, monkeypatch)
    dm = tmp_path / "dm-3"
    dm.write_bytes(bytes(1 << 20))
    link = tmp_path / "by-id" / f"wwn-0x{CTX['wwn']}"
    link.unlink()
    link.symlink_to(dm)
    host.answers[("blkid", "-p", "-o", "export", str(dm))] = (2, "")
    with pytest.raises(RuntimeError) as e:
        await node.NodeStageVolume(stage_req(tmp_path / "st", kind), AbortCtx())
    assert e.value.args[0] == grpc.StatusCode.FAILED_PRECONDITION
    assert "multipath.conf" in e.value.args[1] and "dm-3" in e.value.args[1]
    assert _no_probe(host) and node._load("v1") is None


# ---- 4: a target path holding another volume is not "already published" ----
@pytest.mark.parametrize("kind", ["ext4", "block"])
async def test_a_publish_over_another_volumes_mount_is_already_exists(tmp_path: Path, monkeypatch, kind):
    """The target path has another volume mounted (a stale mount left by a pod's earlier
    volume, a CO bug): NodePublish answered OK and the pod got the wrong data. Now the mount
    is compared with this volume's staging mount (filesystem) or disk (raw block)."""
    st, target = tmp_path / "st", tmp_path / "pods" / "p0" / "vol"
    dev = str(tmp_path / "sdq")
    other = _blk_line(target, "sdz") if kind == "block" else _fs_line(target, "/dev/sdz", n=61)
    node, host, _ = _node(tmp_path, monkeypatch, _fs_line(st, dev) * (kind != "block") + other)
    _save(node, kind)
    with pytest.raises(RuntimeError) as e:
        await node.NodePublishVolume(_publish(st, target, kind), AbortCtx())
    assert e.value.args[0] == grpc.StatusCode.ALREADY_EXISTS and "sdz" in e.value.args[1]
    assert host.calls == []
    # this volume's own publish there: OK, nothing run
    ours = _blk_line(target) if kind == "block" else _fs_line(target, dev, n=61)
    (tmp_path / "mountinfo").write_text(ROOT + _fs_line(st, dev) * (kind != "block") + ours)
    await node.NodePublishVolume(_publish(st, target, kind), AbortCtx())
    assert host.calls == []
