"""NodeUnpublishVolume on a target path that exists but is not a mount point, over the node's
unix socket (nothing is mounted in tmp_path: the real /proc/self/mountinfo says so).

CSI spec, NodeUnpublishVolume: idempotent, and "The SP MUST delete the file or directory it
created at this path": what NodePublish made (an empty directory, an empty file for raw block)
goes; anything holding data is never deleted, and the answer names the path (never UNKNOWN).
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from csi import csi_pb2 as pb
from tests.csi.test_node_unit import stub  # noqa: F401

FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


def unpublish(node, target: Path):
    return node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id="v1", target_path=str(target)))


async def refused(node, target: Path) -> str:
    """The details of an unpublish that must fail FAILED_PRECONDITION."""
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await unpublish(node, target)
    assert ei.value.code() == FAILED_PRECONDITION, ei.value.details()
    return ei.value.details()


async def test_a_directory_holding_files_is_left_as_it_is_until_emptied(stub):
    """The directory's rmdir raised OSError(ENOTEMPTY) out of the handler: UNKNOWN."""
    node, _, tmp = stub
    target = tmp / "pods" / "p0" / "mount"
    (target / "sub").mkdir(parents=True)
    (target / "data").write_bytes(b"a pod's data")
    for _ in range(2):                                  # a retry finds it all the same
        details = await refused(node, target)
        assert str(target) in details and "'data'" in details
    assert (target / "data").read_bytes() == b"a pod's data" and (target / "sub").is_dir()
    (target / "data").unlink()
    (target / "sub").rmdir()                            # cleared by hand: the retry succeeds
    await unpublish(node, target)
    assert not target.exists()


async def test_a_raw_block_target_file_holding_data_is_kept(stub):
    """A file that is not bound onto the disk and is not the empty one NodePublish made was
    unlinked, with its data."""
    node, _, tmp = stub
    target = tmp / "publish" / "pvc-1" / "pod-1"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"\x01" * 4096)
    assert str(target) in await refused(node, target)
    assert target.read_bytes() == b"\x01" * 4096


async def test_a_symlink_at_the_target_is_kept_with_what_it_points_to(stub):
    """A symlink to a directory made rmdir fail with ENOTDIR: UNKNOWN."""
    node, _, tmp = stub
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "data").write_bytes(b"x")
    target = tmp / "pods" / "p0" / "mount"
    target.parent.mkdir(parents=True)
    target.symlink_to(elsewhere)
    assert "symlink" in await refused(node, target)
    assert target.is_symlink() and (elsewhere / "data").read_bytes() == b"x"


@pytest.mark.parametrize("kind", ["dir", "file"])
async def test_what_publish_made_is_removed_and_a_repeat_is_ok(stub, kind):
    node, _, tmp = stub
    target = tmp / "pods" / "p0" / "mount"
    target.parent.mkdir(parents=True)
    target.mkdir() if kind == "dir" else target.touch()
    await unpublish(node, target)
    assert not target.exists() and target.parent.is_dir()
    await unpublish(node, target)                       # already unpublished: OK


async def test_a_target_under_a_file_cannot_exist_and_is_ok(stub):
    """A component of the path is a regular file: lstat raised NotADirectoryError, out of the
    handler as UNKNOWN. No such target can exist, so it is unpublished already."""
    node, _, tmp = stub
    (tmp / "pods").mkdir()
    (tmp / "pods" / "p0").write_bytes(b"a file, not a directory")
    await unpublish(node, tmp / "pods" / "p0" / "mount")
    assert (tmp / "pods" / "p0").read_bytes() == b"a file, not a directory"
