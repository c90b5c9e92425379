"""Probe never depends on the meta API; ControllerExpandVolume always asks for the node step.

No cluster: the meta API is a port nobody listens on (or a fake), as during a meta/etcd outage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from csi import csi_pb2 as pb
from csi import csi_pb2_grpc as pbg
from csi import server as csi_server
from csi.controller import Controller
from csi.meta import Meta
from csi.node import Node
from csi.server import build_server, listen
from tests.cluster import free_port
from zstore.cli.client import MetaClient

PORTAL = "127.0.0.2:3260"
MiB = 1 << 20


def unreachable_meta() -> Meta:
    client = MetaClient([f"http://127.0.0.1:{free_port()}"], token="x", retry_for=0.0, timeout=1.0)
    return Meta(client)


def node(tmp_path: Path) -> Node:
    return Node("iqn.2026-01.io.example:node-a", None, state_dir=str(tmp_path / "state"),  # type: ignore[arg-type]
                device_timeout=0.5)


async def serving(server: grpc.aio.Server, tmp_path: Path) -> str:
    sock = tmp_path / "csi.sock"
    listen(server, f"unix://{sock}")
    await server.start()
    return f"unix:{sock}"


@pytest.mark.parametrize("mode", ["node", "both", "controller"])
async def test_probe_ready_while_meta_is_unreachable(mode: str, tmp_path: Path):
    """A not-ready Probe makes the livenessprobe sidecar restart the container: for node
    plugins that would be every node at once on a meta outage, for nothing."""
    server = build_server(unreachable_meta(), PORTAL, mode, node(tmp_path) if mode != "controller" else None)
    target = await serving(server, tmp_path)
    try:
        async with grpc.aio.insecure_channel(target) as ch:
            assert (await pbg.IdentityStub(ch).Probe(pb.ProbeRequest(), timeout=10)).ready.value is True
            if mode != "node":
                # the meta trouble shows on the controller's RPCs instead, as UNAVAILABLE
                ctl = pbg.ControllerStub(ch)
                for call in (ctl.ListVolumes(pb.ListVolumesRequest(), timeout=10),
                             ctl.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id="v1"), timeout=10),
                             ctl.CreateVolume(pb.CreateVolumeRequest(
                                 name="pvc-1", volume_capabilities=[expand_cap("mount")["volume_capability"]]),
                                 timeout=10)):
                    with pytest.raises(grpc.aio.AioRpcError) as ei:
                        await call
                    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE, ei.value.details()
    finally:
        await server.stop(None)


def test_node_mode_with_config_builds_no_meta(tmp_path: Path, monkeypatch):
    """deploy/kubernetes/csi-node.yaml passes --config to the node plugin: it must still not
    get a meta client (only the portal comes from the config)."""
    cfg = tmp_path / "zstore.toml"
    cfg.write_text('[client]\nendpoints = ["http://127.0.0.1:1"]\n[redirector]\nvip = "10.9.8.7"\nport = 3261\n')
    seen: dict[str, Any] = {}

    async def fake_serve(endpoint, meta, portal, mode, node=None, *rest):
        seen.update(meta=meta, portal=portal, mode=mode, node=node)

    monkeypatch.setattr(csi_server, "serve", fake_serve)
    monkeypatch.setattr(csi_server, "Node", lambda *a, **k: "node")
    csi_server.main(["--mode", "node", "--config", str(cfg), "--node-id", "iqn.x:n"])
    assert seen == {"meta": None, "portal": "10.9.8.7:3261", "mode": "node", "node": "node"}
    csi_server.main(["--mode", "both", "--config", str(cfg), "--node-id", "iqn.x:n"])
    assert isinstance(seen["meta"], Meta) and seen["mode"] == "both"


class FakeMeta:
    def __init__(self, size: int):
        self.size = size

    async def get(self, path: str, **query: Any) -> Any:
        return {"volume_id": "v1", "size": self.size}

    async def post(self, path: str, body: Any = None) -> Any:
        assert path == "/volumes/v1/resize"
        self.size = body["size"]
        return {"volume_id": "v1", "size": self.size}


def expand_cap(kind: str | None) -> dict[str, Any]:
    if kind is None:
        return {}
    c = pb.VolumeCapability(access_mode=pb.VolumeCapability.AccessMode(mode=1))
    if kind == "block":
        c.block.SetInParent()
    else:
        c.mount.fs_type = "ext4"
    return {"volume_capability": c}


@pytest.mark.parametrize("kind", ["block", "mount", None])
async def test_expand_always_needs_the_node(kind: str | None):
    """Raw block too: only NodeExpandVolume's device rescan makes the kernel see the new size;
    without a capability the controller cannot tell, and the node step handles both."""
    ctl = Controller(FakeMeta(16 * MiB), PORTAL)  # type: ignore[arg-type]
    for want in (48 * MiB, 32 * MiB):              # a grow, then a repeat that is already big enough
        r = await ctl.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
            volume_id="v1", capacity_range=pb.CapacityRange(required_bytes=want), **expand_cap(kind)), None)
        assert r.capacity_bytes == 48 * MiB and r.node_expansion_required is True
