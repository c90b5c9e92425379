"""NodeUnstage of a raw block volume whose state file is corrupt (a power loss truncated it):
nothing is mounted at a raw block staging path, so the fallback that finds the session through
the staging mount's disk found nothing, and the session and the disk stayed on the node for
good. The volume's WWN is derived from its id (``naming.volume_wwn``), and the disk its link
names (when the disk has that wwid) leads to the session. Fake host commands, a fake sysfs and
mount table in tmp_path; no kernel, no iSCSI."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import grpc
import pytest

from tests.csi.test_node_safety2 import OTHER_WWN, _sysfs_disk
from tests.csi.test_node_stage import _lun_dev, _p3, stage_req
from tests.csi.test_node_staging_safety import _blk_line, _node, _unstage
from tests.csi.test_node_unit import CTX, AbortCtx
from zstore import naming

WWN = naming.volume_wwn("v1")          # the fixtures' volume id
P3 = ("iscsiadm", "-m", "session", "-P", "3")
LOGOUT = ["iscsiadm", "-m", "session", "-r", "1", "--logout"]
CORRUPT = [b"", b'{"target": "iqn.2026-01.io.zstore:1d2', b"\x00" * 64, b"[]"]


def _raw_staged(tmp_path: Path, monkeypatch, content: bytes, disk_wwn: str = WWN, mountinfo: str = ""):
    """v1 staged raw block: its by-id link names sdv, whose wwid is ``disk_wwn``, on session 1;
    the state file holds ``content``."""
    node, host, _ = _node(tmp_path, monkeypatch, mountinfo, wwid=False)
    (tmp_path / "sdv").write_bytes(bytes(4096))
    (tmp_path / "by-id" / f"wwn-0x{WWN}").symlink_to(tmp_path / "sdv")
    d = _sysfs_disk(tmp_path, "sdv", disk_wwn)
    node.state_dir.mkdir(parents=True, exist_ok=True)
    node._state_path("v1").write_bytes(content)
    return node, host, d


async def _kernel_deletes(host, sysdisk: Path, left: tuple[str, ...]) -> None:
    """/sys/block/<name>/device/delete: the disk's entry goes, and the session lists only
    ``left``. Bounded (5 s), so a test that failed before asking leaves nothing polling."""
    for _ in range(500):
        if (sysdisk / "device" / "delete").read_text() == "1":
            shutil.rmtree(sysdisk)
            host.answers[P3] = _p3(*left)
            return
        await asyncio.sleep(0.01)


async def _unstage_with_kernel(node, host, tmp_path: Path, left: tuple[str, ...] = ()) -> None:
    kernel = asyncio.create_task(_kernel_deletes(host, tmp_path / "sys" / "block" / "sdv", left))
    try:
        await asyncio.wait_for(node.NodeUnstageVolume(_unstage(tmp_path / "st"), AbortCtx()), 5)
    finally:
        await asyncio.wait_for(kernel, 6)


@pytest.mark.parametrize("content", CORRUPT)
async def test_unstage_of_a_raw_block_volume_with_a_corrupt_state_file_logs_out(tmp_path: Path, monkeypatch,
                                                                                 content):
    node, host, d = _raw_staged(tmp_path, monkeypatch, content)
    host.answers[P3] = _p3("sdv")
    await _unstage_with_kernel(node, host, tmp_path)
    assert LOGOUT in host.calls
    assert ["blockdev", "--flushbufs", str(tmp_path / "sdv")] in host.calls and not d.exists()
    assert not node._state_path("v1").exists()


async def test_a_raw_block_volumes_disk_sharing_the_session_with_another_volume_keeps_it_logged_in(
        tmp_path: Path, monkeypatch):
    """v1's disk is deleted; the session stays for volume B's disk (sdq), a LUN of the same target."""
    node, host, d = _raw_staged(tmp_path, monkeypatch, b"")
    host.answers[P3] = _p3("sdq", "sdv")
    await _unstage_with_kernel(node, host, tmp_path, left=("sdq",))
    assert not d.exists() and not any("--logout" in c for c in host.calls)
    assert not node._state_path("v1").exists()


async def test_a_stale_link_does_not_lead_to_another_volumes_session(tmp_path: Path, monkeypatch):
    """v1's disk is gone and its sdX name was reused: the link wwn-0x<v1> names volume B's disk,
    alone on its session. Neither B's disk nor its session is touched; the broken file goes."""
    node, host, d = _raw_staged(tmp_path, monkeypatch, b"", disk_wwn=OTHER_WWN)
    host.answers[P3] = _p3("sdv")
    await asyncio.wait_for(node.NodeUnstageVolume(_unstage(tmp_path / "st"), AbortCtx()), 5)
    assert (d / "delete").read_text() == "" and not any(c[0] == "blockdev" for c in host.calls)
    assert not any("--logout" in c for c in host.calls)
    assert not node._state_path("v1").exists()


async def test_a_raw_block_disk_still_published_is_refused_and_the_file_kept(tmp_path: Path, monkeypatch):
    """The fallback finds the disk, so the publish check applies to it: FAILED_PRECONDITION,
    nothing deleted, the broken file kept for the retry after the unpublish."""
    pub = tmp_path / "pods" / "p0" / "dev"
    node, host, d = _raw_staged(tmp_path, monkeypatch, b"", mountinfo=_blk_line(pub, "sdv"))
    host.answers[P3] = _p3("sdv")
    with pytest.raises(RuntimeError) as e:
        await node.NodeUnstageVolume(_unstage(tmp_path / "st"), AbortCtx())
    assert "unpublish it first" in e.value.args[1] and str(pub) in e.value.args[1]
    assert (d / "delete").read_text() == "" and not any("--logout" in c for c in host.calls)
    assert node._state_path("v1").exists()


# ---- the holders check, now made once by unstage and once by the undo of a failed stage ----
async def test_the_undo_of_a_failed_stage_leaves_a_held_disk_and_its_session(tmp_path: Path, monkeypatch):
    """The scan attached our disk, udev never linked it, and a dm map holds it (multipathd
    claimed it): the undo deletes neither the disk nor logs the session out from under the map."""
    node, host, _ = _node(tmp_path, monkeypatch, wwid=False)
    (tmp_path / "by-id" / f"wwn-0x{CTX['wwn']}").unlink()
    _lun_dev(tmp_path, "sdtt", CTX["wwn"])
    d = _sysfs_disk(tmp_path, "sdtt", CTX["wwn"])
    (d.parent / "holders" / "dm-5").mkdir(parents=True)
    with pytest.raises(RuntimeError) as e:
        await asyncio.wait_for(node.NodeStageVolume(stage_req(tmp_path / "st"), AbortCtx()), 10)
    assert e.value.args[0] == grpc.StatusCode.NOT_FOUND
    assert (d / "delete").read_text() == "" and ["blockdev", "--flushbufs", "/dev/sdtt"] not in host.calls
    assert not any("--logout" in c for c in host.calls)
