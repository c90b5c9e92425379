"""Audit 16: NodeGetVolumeStats answers for the volume it is asked about. The spec's NOT_FOUND row:
"Indicates that a volume corresponding to the specified volume_id does not exist on specified
volume_path". A path with another volume's disk mounted (a filesystem, or a raw block bind of its
device node) is NOT_FOUND, not that volume's usage reported under this id."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from csi import csi_pb2 as pb
from tests.csi.test_node_stage import _wwid
from tests.csi.test_node_staging_safety import _blk_line, _fs_line, _node, _save
from tests.csi.test_node_unit import CTX, AbortCtx

OTHER_WWN = "6001405" + "c" * 25


def _stats(path: Path) -> pb.NodeGetVolumeStatsRequest:
    return pb.NodeGetVolumeStatsRequest(volume_id="v1", volume_path=str(path))


@pytest.mark.parametrize("raw", [False, True])
async def test_audit16_stats_of_a_path_holding_another_volumes_disk_is_not_found(tmp_path: Path, monkeypatch, raw):
    """Before: OK, with sdz's size (raw) or the statvfs of sdz's filesystem."""
    pub = tmp_path / "pods" / "p0" / "vol"
    line = _blk_line(pub, "sdz") if raw else _fs_line(pub, str(tmp_path / "sdz"), n=61)
    node, host, dev = _node(tmp_path, monkeypatch, line)
    _wwid(tmp_path, "sdz", OTHER_WWN)
    _save(node, "block" if raw else "ext4")
    (tmp_path / "sdz").write_bytes(bytes(4096))
    if raw:
        pub.parent.mkdir(parents=True)
        pub.touch()
    else:
        pub.mkdir(parents=True)
    host.answers[("blockdev", "--getsize64", str(pub))] = (0, f"{64 << 20}\n")
    with pytest.raises(RuntimeError) as e:
        await node.NodeGetVolumeStats(_stats(pub), AbortCtx())
    assert e.value.args[0] == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("raw", [False, True])
async def test_audit16_stats_of_the_volumes_own_publish(tmp_path: Path, monkeypatch, raw):
    """The control: the volume's own disk there (raw: bytes from the device size)."""
    pub = tmp_path / "pods" / "p0" / "vol"
    line = _blk_line(pub, "sdq") if raw else _fs_line(pub, str(tmp_path / "sdq"), n=61)
    node, host, dev = _node(tmp_path, monkeypatch, line)
    _save(node, "block" if raw else "ext4")
    if raw:
        pub.parent.mkdir(parents=True)
        pub.touch()
    else:
        pub.mkdir(parents=True)
    host.answers[("blockdev", "--getsize64", str(pub))] = (0, f"{64 << 20}\n")
    r = await node.NodeGetVolumeStats(_stats(pub), AbortCtx())
    if raw:
        assert [(u.total, u.unit) for u in r.usage] == [(64 << 20, pb.VolumeUsage.BYTES)]
    else:
        assert {u.unit for u in r.usage} == {pb.VolumeUsage.BYTES, pb.VolumeUsage.INODES}
