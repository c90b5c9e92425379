"""Publish and staging paths under a symlinked kubelet root (``/var/lib/kubelet`` ->
``/data/kubelet``): the kernel lists mount points canonical (symlinks resolved, relative to
the process root), while kubelet hands over paths through the symlink. Compared literally,
a mounted target looked unmounted: NodeUnpublish refused to remove "not a mount point but a
character device" (a raw block publish) or could not rmdir a busy directory, a repeated
NodePublish answered "not staged", NodeUnstage refused "still mounted at" its own staging
path. Now the asked path is resolved above its last component; a last component that is
itself a symlink names no mount (following it unmounted whatever it pointed at).

Real symlinks throughout; a mountinfo-format file for the unit tests, and the real
/proc/self/mountinfo with tmpfs and bind mounts (root only; every mount is undone)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from csi import csi_pb2 as pb
from csi.host import Host
from csi.mounts import MOUNTINFO, mount_at, mounts, parse_mountinfo
from csi.node import Node
from tests.csi.test_node_staging_safety import _fs_line, _node, _save, _table, _unstage
from tests.csi.test_node_unit import AbortCtx, FakeHost, cap

ROOT = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"


def _esc(path: Path | str) -> str:
    """A path as /proc/self/mountinfo shows it (show_mountinfo escapes " \\t\\n\\\\")."""
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in str(path))


def _kubelet(base: Path) -> tuple[Path, Path]:
    """(data, link): the real kubelet directory, and the symlink kubelet is configured with."""
    data = base / "data" / "kubelet"
    data.mkdir(parents=True)
    (base / "var" / "lib").mkdir(parents=True)
    link = base / "var" / "lib" / "kubelet"
    link.symlink_to(data)
    return data, link


POD = Path("pods") / "p 0" / "volumes" / "kubernetes.io~csi" / "pv 1" / "mount"
GLOBAL = Path("plugins") / "kubernetes.io" / "csi" / "zstore.io" / "a b" / "globalmount"
BLOCK = Path("plugins") / "kubernetes.io" / "csi" / "volumeDevices" / "publish" / "pv 1" / "pod-uid"


# ---- mount_at, on a mountinfo-format file ---------------------------------------------------

def test_mount_at_resolves_symlinks_in_the_asked_path(tmp_path: Path):
    data, link = _kubelet(tmp_path)
    (data / POD).mkdir(parents=True)
    (data / BLOCK).parent.mkdir(parents=True)
    (data / BLOCK).touch()
    (tmp_path / "mountinfo").write_text(
        ROOT
        + f"40 22 8:16 / {_esc(data / POD)} rw,relatime - ext4 /dev/sdq rw\n"
        + f"41 22 0:5 /sdq {_esc(data / BLOCK)} rw,nosuid - devtmpfs udev rw\n")
    table = mounts(tmp_path / "mountinfo")
    assert mount_at(str(data / POD), table).source == "/dev/sdq"          # as before
    m = mount_at(str(link / POD), table)                                 # through the symlink
    assert m is not None and m.target == str(data / POD) and m.fstype == "ext4"
    m = mount_at(str(link / BLOCK), table)
    assert m is not None and m.root == "/sdq" and m.fstype == "devtmpfs"
    assert mount_at(f"{link / POD}/", table) is not None                 # a trailing slash
    # a final component that is a symlink names no mount point (one never is a symlink):
    # following it would have NodeUnpublish/NodeUnstage unmount what it points at
    (data / "pods" / "p 0" / "alias").symlink_to(data / POD)
    assert mount_at(str(link / "pods" / "p 0" / "alias"), table) is None


def test_mount_at_of_a_path_that_is_gone_resolves_what_exists(tmp_path: Path):
    """A target deleted (NodeUnpublish retried after its removal): no error, and the part of
    the path that exists is still resolved. The kernel detaches a mount whose mount point is
    deleted (Linux 3.18+), so the table then has nothing there."""
    data, link = _kubelet(tmp_path)
    (tmp_path / "mountinfo").write_text(ROOT + f"40 22 8:16 / {_esc(data / POD)} rw - ext4 /dev/sdq rw\n")
    table = mounts(tmp_path / "mountinfo")
    assert not (data / POD).exists()
    assert mount_at(str(link / POD), table).target == str(data / POD)
    (tmp_path / "mountinfo").write_text(ROOT)
    assert mount_at(str(link / POD), mounts(tmp_path / "mountinfo")) is None


def test_a_bind_of_a_directory_is_not_a_symlink(tmp_path: Path):
    """/var/lib/kubelet as a bind mount of /data/kubelet (not a symlink): a private mount
    made at /data/kubelet/... is not seen through /var/lib/kubelet/..., and the kernel lists
    it once, at /data/kubelet/...; resolving symlinks must not equate the two paths."""
    data = tmp_path / "data" / "kubelet"
    bound = tmp_path / "var" / "lib" / "kubelet"
    (data / POD).mkdir(parents=True)
    (bound / POD).mkdir(parents=True)
    table = parse_mountinfo(ROOT + f"30 22 8:2 /data/kubelet {_esc(bound)} rw - ext4 /dev/vdb rw\n"
                            f"40 22 8:16 / {_esc(data / POD)} rw - ext4 /dev/sdq rw\n")
    assert mount_at(str(bound / POD), table) is None
    assert mount_at(str(data / POD), table).source == "/dev/sdq"


# ---- NodeUnstage: its own staging mount is not "another user" ------------------------------

class ResolvingKernelHost(FakeHost):
    """``umount PATH`` resolves PATH as umount(8) does and takes the last mount listed there
    (its escaped mountinfo form) out of the mount table."""

    def __init__(self, answers: dict, mountinfo: Path):
        super().__init__(answers)
        self.mountinfo = mountinfo

    async def run(self, argv, ok=(0,), input=None, secret=()):
        if argv[0] == "umount":
            lines = self.mountinfo.read_text().splitlines()
            hits = [i for i, x in enumerate(lines) if x.split()[4] == _esc(os.path.realpath(argv[1]))]
            if hits:
                del lines[hits[-1]]
                self.mountinfo.write_text("".join(f"{x}\n" for x in lines))
        return await super().run(argv, ok, input, secret)


async def test_unstage_through_a_symlinked_root(tmp_path: Path, monkeypatch):
    data, link = _kubelet(tmp_path)
    (data / GLOBAL).mkdir(parents=True)
    dev = str(tmp_path / "sdq")
    node, _, _ = _node(tmp_path, monkeypatch, _fs_line(_esc(data / GLOBAL), dev), wwid=False)
    host = ResolvingKernelHost(node.host.answers, tmp_path / "mountinfo")
    node.host = node.iscsi.host = host
    _save(node, "ext4")
    await node.NodeUnstageVolume(_unstage(link / GLOBAL), AbortCtx())
    assert ["umount", str(data / GLOBAL)] in host.calls     # the mount as the kernel lists it
    assert ["iscsiadm", "-m", "session", "-r", "1", "--logout"] in host.calls
    assert _table(tmp_path) == ["/"] and node._load("v1") is None


async def test_unstage_through_a_symlinked_root_still_refuses_under_a_publish(tmp_path: Path, monkeypatch):
    data, link = _kubelet(tmp_path)
    (data / GLOBAL).mkdir(parents=True)
    dev = str(tmp_path / "sdq")
    node, host, _ = _node(tmp_path, monkeypatch, _fs_line(_esc(data / GLOBAL), dev)
                          + _fs_line(_esc(data / POD), dev, n=61), wwid=False)
    _save(node, "ext4")
    with pytest.raises(RuntimeError) as e:
        await node.NodeUnstageVolume(_unstage(link / GLOBAL), AbortCtx())
    assert e.value.args == (grpc.StatusCode.FAILED_PRECONDITION,
                            f"{dev} is still mounted at {data / POD}: unpublish it first")
    assert host.calls == []


# ---- the real kernel: tmpfs and bind mounts in /proc/self/mountinfo ------------------------

def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


def _under(base: Path) -> list[str]:
    prefix = os.path.realpath(base) + "/"
    return [m.target for m in mounts(MOUNTINFO) if m.target.startswith(prefix)]


@pytest.fixture
def real_kubelet(tmp_path: Path):
    """A symlinked kubelet root where this test may mount; every mount under it undone."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8)")
    data, link = _kubelet(tmp_path)
    probe = tmp_path / "probe"
    probe.mkdir()
    try:
        _mount("-t", "tmpfs", "zstore-audit18", str(probe))
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot mount here: {e.stderr.decode().strip()}")
    try:
        yield data, link
    finally:
        for _ in range(64):                             # bounded: each pass undoes one mount
            left = _under(tmp_path)
            if not left:
                break
            subprocess.run(["umount", "-l", left[-1]], capture_output=True)
        assert not _under(tmp_path), "mounts left behind"


def _node_on_host(tmp_path: Path) -> Node:
    return Node("n", Host(), state_dir=str(tmp_path / "state"), sysfs=tmp_path / "sys")


async def test_filesystem_publish_through_a_symlinked_root_on_the_kernel(tmp_path: Path, real_kubelet):
    data, link = real_kubelet
    (data / GLOBAL).mkdir(parents=True)
    (data / POD).mkdir(parents=True)
    _mount("-t", "tmpfs", "zstore-audit18", str(data / GLOBAL))
    (data / GLOBAL / "f").write_text("data")
    _mount("--bind", str(data / GLOBAL), str(data / POD))
    node = _node_on_host(tmp_path)
    staging, target = str(link / GLOBAL), str(link / POD)
    req = pb.NodePublishVolumeRequest(volume_id="v1", staging_target_path=staging, target_path=target,
                                      volume_capability=cap())
    await node.NodePublishVolume(req, AbortCtx())          # published already: nothing to do
    assert _under(tmp_path).count(str(data / POD)) == 1
    stats = await node.NodeGetVolumeStats(
        pb.NodeGetVolumeStatsRequest(volume_id="v1", volume_path=target), AbortCtx())
    assert stats.usage[0].total > 0
    await node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id="v1", target_path=target),
                                   AbortCtx())
    assert str(data / POD) not in _under(tmp_path) and not (data / POD).exists()
    assert str(data / GLOBAL) in _under(tmp_path)          # the staging mount is not touched
    await node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id="v1", target_path=target),
                                   AbortCtx())             # again: done already


async def test_raw_block_unpublish_through_a_symlinked_root_on_the_kernel(tmp_path: Path, real_kubelet):
    """The publish is a bind of a device node (devtmpfs) onto an empty file: through the
    symlink it looked unmounted, and the file, a character device while bound, was "not
    ours to delete"."""
    data, link = real_kubelet
    (data / BLOCK).parent.mkdir(parents=True)
    (data / BLOCK).touch()
    _mount("--bind", "/dev/null", str(data / BLOCK))
    node = _node_on_host(tmp_path)
    await node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id="v1", target_path=str(link / BLOCK)),
                                   AbortCtx())
    assert str(data / BLOCK) not in _under(tmp_path) and not (data / BLOCK).exists()


async def test_a_symlink_at_the_target_never_unmounts_what_it_points_at(tmp_path: Path, real_kubelet):
    """A symlink at the publish target pointing at a live mount (another volume's staging
    mount, a host data mount): resolved whole, NodeUnpublish found that mount "at" the target
    and ran ``umount`` on the symlink, which the kernel follows: the other mount was gone,
    and every retry unmounted it again."""
    data, link = real_kubelet
    other = data / "other mount"
    other.mkdir()
    _mount("-t", "tmpfs", "zstore-audit18", str(other))
    (data / POD).parent.mkdir(parents=True)
    (data / POD).symlink_to(other)
    node = _node_on_host(tmp_path)
    with pytest.raises(RuntimeError) as e:
        await node.NodeUnpublishVolume(
            pb.NodeUnpublishVolumeRequest(volume_id="v1", target_path=str(link / POD)), AbortCtx())
    assert e.value.args[0] == grpc.StatusCode.FAILED_PRECONDITION and "symlink" in e.value.args[1]
    assert str(other) in _under(tmp_path)                  # still mounted
    assert (data / POD).is_symlink()


async def test_a_symlink_at_the_staging_path_never_unmounts_what_it_points_at(tmp_path: Path,
                                                                              real_kubelet):
    data, link = real_kubelet
    other = data / "other mount"
    other.mkdir()
    _mount("-t", "tmpfs", "zstore-audit18", str(other))
    (data / GLOBAL).parent.mkdir(parents=True)
    (data / GLOBAL).symlink_to(other)
    node = _node_on_host(tmp_path)
    await node.NodeUnstageVolume(
        pb.NodeUnstageVolumeRequest(volume_id="v1", staging_target_path=str(link / GLOBAL)),
        AbortCtx())                                        # never staged here: nothing to do
    assert str(other) in _under(tmp_path)                  # still mounted


async def test_publish_and_stage_refuse_a_symlink_where_they_would_mount(tmp_path: Path, real_kubelet):
    """Review of cf1d33a: lookups no longer follow a final symlink, but publish and stage still
    mounted through one (mount follows it): over whatever the link names, another mount stacked
    at each retry (never found), and NodeUnpublish then refused. Both refuse it now, nothing
    mounted."""
    data, link = real_kubelet
    other = data / "other mount"
    other.mkdir()
    _mount("-t", "tmpfs", "zstore-audit18", str(other))
    (data / POD).parent.mkdir(parents=True)
    (data / POD).symlink_to(other)
    (data / GLOBAL).parent.mkdir(parents=True)
    (data / GLOBAL).symlink_to(other)
    node = _node_on_host(tmp_path)
    before = _under(tmp_path)
    with pytest.raises(RuntimeError) as e:
        await node.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id="v1", staging_target_path=str(link / GLOBAL), target_path=str(link / POD),
            volume_capability=cap()), AbortCtx())
    assert e.value.args[0] == grpc.StatusCode.FAILED_PRECONDITION and "symlink" in e.value.args[1]
    with pytest.raises(RuntimeError) as e:
        await node.NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id="v1", staging_target_path=str(link / GLOBAL), volume_capability=cap(),
            publish_context={"targetPortal": "127.0.0.2:3260", "iqn": "iqn.2026-11.io.zstore:t1",
                             "lun": "1", "wwn": "6001405" + "0" * 25}), AbortCtx())
    assert e.value.args[0] == grpc.StatusCode.FAILED_PRECONDITION and "symlink" in e.value.args[1]
    assert _under(tmp_path) == before                       # nothing mounted anywhere
