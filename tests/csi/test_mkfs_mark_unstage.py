"""The mark of a mkfs cut short survives NodeUnstageVolume.

9631de3 refuses to format a disk whose first MiB is not all zeros when blkid finds no signature,
and marks our own mkfs before it runs so that a retry of a stage whose mkfs was cut short (its
partial writes: non-zero bytes, no signature yet) formats again. The mark was a key of the state
file, which NodeUnstageVolume deletes: kubelet unstages an uncertain stage (mkfs of a large
volume killed at its deadline) once the pod goes away, and the next NodeStage found the half-made
filesystem and refused it forever (FAILED_PRECONDITION "first MiB is not all zeros"). The mark is
now a file of its own, ``<volume id>.mkfs`` holding the disk's WWN, which unstage leaves.

Fake host and fake mount table of test_node_staging_safety; the disk is a file behind a by-id link.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import grpc
import pytest

from csi.host import HostError
from tests.csi.node_setup import look_at_mkfs
from tests.csi.test_node_stage import mount_calls, stage_req
from tests.csi.test_node_staging_safety import _fs_line, _node, _save, _unstage
from tests.csi.test_node_unit import CTX, AbortCtx

MKFS = ["mkfs.ext4", "-F", "-q"]


def _cut_short_mkfs(host, dev: str, error: BaseException) -> None:
    """mkfs writes its first blocks (non-zero, no signature blkid knows yet), then dies with
    ``error``; every other command runs as before."""
    run = host.run

    async def spy(argv, ok=(0,), input=None, secret=()):
        if argv[0].startswith("mkfs"):
            host.calls.append(list(argv))
            with open(dev, "r+b") as f:
                f.seek(8192)
                f.write(os.urandom(4096))
            raise error
        return await run(argv, ok, input, secret)
    host.run = spy
    host.real_run = run


def _mark(tmp_path: Path) -> Path:
    return tmp_path / "state" / "v1.mkfs"


async def test_a_stage_whose_mkfs_failed_formats_again_after_an_unstage(tmp_path: Path, monkeypatch):
    """mkfs fails (mark kept), its partial writes are on the disk; NodeUnstage; the next
    NodeStage formats again. Before the fix: FAILED_PRECONDITION "first MiB is not all zeros"
    (unstage had deleted the state file and the mark in it), on every retry."""
    st = tmp_path / "st"
    node, host, dev = _node(tmp_path, monkeypatch)
    host.answers[("blkid", "-p", "-o", "export", dev)] = (2, "")
    _cut_short_mkfs(host, dev, HostError(f"{MKFS + [dev]}: exit 1", 1))
    with pytest.raises(RuntimeError):
        await node.NodeStageVolume(stage_req(st), AbortCtx())
    assert any(Path(dev).read_bytes()[:1 << 20])              # mkfs's partial writes
    await node.NodeUnstageVolume(_unstage(st), AbortCtx())
    assert node._load("v1") is None
    host.run = host.real_run
    host.calls.clear()
    await node.NodeStageVolume(stage_req(st), AbortCtx())
    assert MKFS + [dev] in host.calls and mount_calls(host)
    assert not _mark(tmp_path).exists()


async def test_a_stage_whose_mkfs_hit_its_deadline_formats_again_after_an_unstage(tmp_path: Path, monkeypatch):
    """The kubelet case: mkfs of a large volume cancelled at the call's deadline (an uncertain
    stage, not undone), the pod goes away, kubelet unstages; the retry formats."""
    st = tmp_path / "st"
    node, host, dev = _node(tmp_path, monkeypatch)
    host.answers[("blkid", "-p", "-o", "export", dev)] = (2, "")
    _cut_short_mkfs(host, dev, asyncio.CancelledError())
    with pytest.raises(asyncio.CancelledError):
        await node.NodeStageVolume(stage_req(st), AbortCtx())
    await node.NodeUnstageVolume(_unstage(st), AbortCtx())
    assert node._load("v1") is None
    host.run = host.real_run
    host.calls.clear()
    await node.NodeStageVolume(stage_req(st), AbortCtx())
    assert MKFS + [dev] in host.calls and mount_calls(host)
    assert not _mark(tmp_path).exists() and "mkfs" not in node._load("v1")


async def test_unstage_leaves_the_mark(tmp_path: Path, monkeypatch):
    st = tmp_path / "st"
    node, host, dev = _node(tmp_path, monkeypatch)
    node._save("v1", {"target": CTX["targetIQN"], "lun": CTX["lun"], "wwn": CTX["wwn"],
                      "portal": CTX["portal"], "kind": "ext4", "ro": False})
    _mark(tmp_path).write_text(CTX["wwn"] + "\n")
    await node.NodeUnstageVolume(_unstage(st), AbortCtx())
    assert node._load("v1") is None and _mark(tmp_path).read_text().strip() == CTX["wwn"]


async def test_a_mark_of_another_wwn_never_formats_the_disk(tmp_path: Path, monkeypatch):
    """A stale mark (a deleted volume's, whose id came back with another disk) formats nothing:
    the disk with unnamed data is refused as without a mark, and the mark stays."""
    st = tmp_path / "st"
    node, host, dev = _node(tmp_path, monkeypatch)
    Path(dev).write_bytes(os.urandom(4096) + bytes((1 << 20) - 4096))
    host.answers[("blkid", "-p", "-o", "export", dev)] = (2, "")
    _mark(tmp_path).parent.mkdir(parents=True, exist_ok=True)
    _mark(tmp_path).write_text("6" + "0" * 31 + "\n")
    with pytest.raises(RuntimeError) as e:
        await node.NodeStageVolume(stage_req(st), AbortCtx())
    assert e.value.args[0] == grpc.StatusCode.FAILED_PRECONDITION
    assert not any(c[0].startswith("mkfs") for c in host.calls) and not mount_calls(host)


async def test_the_mark_is_on_disk_while_mkfs_runs_and_goes_with_a_finished_mkfs(tmp_path: Path, monkeypatch):
    st = tmp_path / "st"
    node, host, dev = _node(tmp_path, monkeypatch)
    host.answers[("blkid", "-p", "-o", "export", dev)] = (2, "")
    seen = look_at_mkfs(host, lambda: _mark(tmp_path).read_text().strip())
    await node.NodeStageVolume(stage_req(st), AbortCtx())
    assert seen == [CTX["wwn"]]
    assert not _mark(tmp_path).exists() and "mkfs" not in node._load("v1")
    assert not list((tmp_path / "state").glob("*.tmp"))


async def test_a_mark_whose_mkfs_had_finished_goes_once_the_filesystem_is_found(tmp_path: Path, monkeypatch):
    """The plugin died after mkfs returned, before the mark went: the filesystem is found and
    mounted, and the mark is removed (the signature speaks for the disk)."""
    st = tmp_path / "st"
    node, host, dev = _node(tmp_path, monkeypatch)
    host.answers[("blkid", "-p", "-o", "export", dev)] = (0, "DEVNAME=x\nTYPE=ext4\n")
    _mark(tmp_path).parent.mkdir(parents=True, exist_ok=True)
    _mark(tmp_path).write_text(CTX["wwn"] + "\n")
    await node.NodeStageVolume(stage_req(st), AbortCtx())
    assert not any(c[0].startswith("mkfs") for c in host.calls) and mount_calls(host)
    assert not _mark(tmp_path).exists()


# -- the mark goes on every successful stage (review of c8abb20) --------------------------

def _mark_of(tmp_path):
    return tmp_path / "state" / "v1.mkfs"


async def test_a_stage_answered_by_the_already_staged_path_removes_the_mark(tmp_path, monkeypatch):
    """Before: kubelet's repeat stage succeeded with the mark left, the pod wrote data, and a
    later stage of that disk with a damaged superblock (blkid names nothing) ran mkfs -F."""
    st = tmp_path / "st"
    node, host, dev = _node(tmp_path, monkeypatch)
    (tmp_path / "mountinfo").write_text(_fs_line(st, dev))
    os.makedirs(st, exist_ok=True)
    _save(node, "ext4", ro=False)
    _mark_of(tmp_path).write_text(CTX["wwn"] + "\n")
    await node.NodeStageVolume(stage_req(st), AbortCtx())          # the repeat: success
    assert not _mark_of(tmp_path).exists()
    (tmp_path / "mountinfo").write_text("")
    await node.NodeUnstageVolume(_unstage(st), AbortCtx())
    Path(dev).write_bytes(os.urandom(1 << 20))                      # the pod's data, no signature
    host.answers[("blkid", "-p", "-o", "export", dev)] = (2, "")
    host.calls.clear()
    with pytest.raises(Exception):
        await node.NodeStageVolume(stage_req(st), AbortCtx())
    assert ["mkfs.ext4", "-F", "-q", dev] not in host.calls


async def test_a_legacy_mark_moved_by_an_already_staged_stage_is_removed(tmp_path, monkeypatch):
    st = tmp_path / "st"
    node, host, dev = _node(tmp_path, monkeypatch)
    (tmp_path / "mountinfo").write_text(_fs_line(st, dev))
    os.makedirs(st, exist_ok=True)
    _save(node, "ext4", ro=False, mkfs=True)                        # 9631de3's in-file mark
    await node.NodeStageVolume(stage_req(st), AbortCtx())
    assert "mkfs" not in node._load("v1") and not _mark_of(tmp_path).exists()


async def test_a_raw_block_stage_removes_the_mark(tmp_path, monkeypatch):
    """Before: a failed mkfs, then the same volume staged raw block (mark kept), the
    application's raw data, unstage, a filesystem stage: mkfs -F over the raw data."""
    st = tmp_path / "st"
    node, host, dev = _node(tmp_path, monkeypatch)
    host.answers[("blkid", "-p", "-o", "export", dev)] = (2, "")
    host.answers[("mkfs.ext4", "-F", "-q", dev)] = (1, "")          # mkfs fails: mark stays
    with pytest.raises(Exception):
        await node.NodeStageVolume(stage_req(st), AbortCtx())
    assert _mark_of(tmp_path).exists()
    del host.answers[("mkfs.ext4", "-F", "-q", dev)]
    await node.NodeStageVolume(stage_req(tmp_path / "stb", "block"), AbortCtx())
    assert not _mark_of(tmp_path).exists()
    Path(dev).write_bytes(os.urandom(4096) + bytes((1 << 20) - 4096))   # the application's data
    await node.NodeUnstageVolume(_unstage(tmp_path / "stb"), AbortCtx())
    host.calls.clear()
    with pytest.raises(Exception):
        await node.NodeStageVolume(stage_req(st), AbortCtx())
    assert ["mkfs.ext4", "-F", "-q", dev] not in host.calls
