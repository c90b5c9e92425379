"""ControllerPublishVolume to a node id that is no initiator name is NOT_FOUND (CSI spec:
"Node does not exist"), not INVALID_ARGUMENT (a node plugin started with a host name as its
node id; the meta refuses such an ACL entry as a bad name)."""

from __future__ import annotations

import grpc
import pytest

from csi import csi_pb2 as pb
from meta import volumes
from tests.csi.test_controller_snapshots import controller, expect
from tests.meta.helpers import make_ctx, register_chunk
from tests.meta.test_snapshot_listing import meta_in_process

pytestmark = pytest.mark.filterwarnings("ignore:It is recommended to use web.AppKey")

CAP = pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(fs_type="ext4"),
                          access_mode=pb.VolumeCapability.AccessMode(
                              mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))


async def test_publish_to_a_node_id_that_is_no_initiator_name_is_not_found(etcd_client, etcd_config, tmp_path):
    ctx = make_ctx(etcd_client, etcd_config)
    await register_chunk(ctx, "c0")
    v, _ = await volumes.create_volume(ctx, "v", "1Gi", 1)
    async with meta_in_process(etcd_config) as meta:
        async with controller(meta.url.removesuffix("/api/v1"), "t", tmp_path) as ctl:
            details = await expect(grpc.StatusCode.NOT_FOUND, ctl.ControllerPublishVolume(
                pb.ControllerPublishVolumeRequest(volume_id=v.volume_id, node_id="worker-1",
                                                  volume_capability=CAP)))
            assert "worker-1" in details
            ok = await ctl.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
                volume_id=v.volume_id, node_id="iqn.2024-01.test:worker-1", volume_capability=CAP))
            assert ok.publish_context["readonly"] == "false"
