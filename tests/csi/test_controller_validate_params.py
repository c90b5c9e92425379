"""ValidateVolumeCapabilities confirms only parameters it checked: values CreateVolume takes
and that match the volume (it confirmed replicas=7, which CreateVolume refuses, and
replicas=1 for a 3-replica volume)."""

from __future__ import annotations

import pytest

from csi import csi_pb2 as pb
from meta import volumes
from tests.csi.test_controller_publish_node import CAP
from tests.csi.test_controller_snapshots import controller
from tests.meta.helpers import make_ctx, register_chunk
from tests.meta.test_snapshot_listing import meta_in_process

pytestmark = pytest.mark.filterwarnings("ignore:It is recommended to use web.AppKey")


async def test_validate_confirms_only_checked_matching_parameters(etcd_client, etcd_config, tmp_path):
    ctx = make_ctx(etcd_client, etcd_config)
    for c in ("c0", "c1", "c2"):
        await register_chunk(ctx, c)
    v, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    async with meta_in_process(etcd_config) as meta:
        async with controller(meta.url.removesuffix("/api/v1"), "t", tmp_path) as ctl:
            async def validate(**params):
                return await ctl.ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
                    volume_id=v.volume_id, volume_capabilities=[CAP], parameters=params))

            ok = await validate(replicas="3", thin="true", **{"csi.storage.k8s.io/pvc/name": "x"})
            assert ok.HasField("confirmed") and ok.confirmed.parameters["replicas"] == "3"
            for bad, says in (({"replicas": "7"}, "must be 1, 2 or 3"),
                              ({"replicas": "1"}, "replicas=3, not 1"),
                              ({"thin": "false"}, "thin=True, not False"),
                              ({"colour": "red"}, "unknown parameter")):
                r = await validate(**bad)
                assert not r.HasField("confirmed") and says in r.message, (bad, r.message)
