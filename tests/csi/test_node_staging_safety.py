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
