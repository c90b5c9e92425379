"""The committed gRPC stubs must be what ``csi/gen.py`` makes from ``csi/proto/csi.proto``."""

from __future__ import annotations

from pathlib import Path

import pytest

from csi import gen


def test_committed_stubs_are_current(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    gen.generate(tmp_path)
    for name in ("csi_pb2.py", "csi_pb2_grpc.py"):
        assert (tmp_path / name).read_text() == (gen.HERE / name).read_text(), (
            f"csi/{name} is stale: run `python -m csi.gen` and commit the result")


def test_wire_names() -> None:
    """Spot checks against the spec: package, field numbers, enum values."""
    from csi import csi_pb2 as pb
    assert pb.DESCRIPTOR.package == "csi.v1"
    f = pb.CreateVolumeRequest.DESCRIPTOR.fields_by_name
    assert (f["name"].number, f["volume_content_source"].number) == (1, 6)
    assert pb.ControllerExpandVolumeResponse.DESCRIPTOR.fields_by_name["node_expansion_required"].number == 2
    assert pb.ControllerServiceCapability.RPC.GET_VOLUME == 12
    assert pb.PluginCapability.DESCRIPTOR.fields_by_name["volume_expansion"].number == 2
