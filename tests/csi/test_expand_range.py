"""ControllerExpandVolume's and CreateVolume's capacity_range rules, against a real cluster.

CSI spec, ControllerExpandVolume Errors: "Unsupported capacity_range | 11 OUT_OF_RANGE"; and a
volume "already larger than or equal to the target capacity of the expansion request" is OK.
CapacityRange: the volume MUST be at least required_bytes and MUST not be bigger than limit_bytes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from csi import csi_pb2 as pb
from csi.controller import MAX_VOLUME_SIZE, Controller
from csi.meta import Meta
from tests.csi.test_controller import PORTAL, cap, create, expect, name, stubs, zcluster  # noqa: F401
from tests.csi.test_node_unit import AbortCtx
from zstore import config as zconfig

pytestmark = pytest.mark.slow

MiB = 1 << 20
OUT_OF_RANGE = grpc.StatusCode.OUT_OF_RANGE


def expand_req(vid: str, **cr: int) -> pb.ControllerExpandVolumeRequest:
    return pb.ControllerExpandVolumeRequest(volume_id=vid, capacity_range=pb.CapacityRange(**cr),
                                            volume_capability=cap())


async def test_expand_answers_out_of_range_for_every_range_the_volume_cannot_meet(stubs, zcluster):
    _, ctl = stubs
    v = await create(ctl, size=64 * MiB)

    def size() -> int:
        return zcluster.api("GET", f"/volumes/{v.volume_id}")[1]["size"]

    await expect(OUT_OF_RANGE, ctl.ControllerExpandVolume(expand_req(v.volume_id, limit_bytes=32 * MiB)))
    await expect(OUT_OF_RANGE, ctl.ControllerExpandVolume(              # required met, limit below the size
        expand_req(v.volume_id, required_bytes=16 * MiB, limit_bytes=32 * MiB)))
    await expect(OUT_OF_RANGE, ctl.ControllerExpandVolume(              # limit below required
        expand_req(v.volume_id, required_bytes=128 * MiB, limit_bytes=96 * MiB)))
    await expect(OUT_OF_RANGE, ctl.ControllerExpandVolume(              # over the largest volume
        expand_req(v.volume_id, required_bytes=MAX_VOLUME_SIZE + 1)))
    await expect(OUT_OF_RANGE, ctl.ControllerExpandVolume(              # rounded up past the limit
        expand_req(v.volume_id, required_bytes=96 * MiB + 1, limit_bytes=96 * MiB + 2)))
    assert size() == 64 * MiB
    for cr in ({"required_bytes": 64 * MiB}, {"required_bytes": 64 * MiB, "limit_bytes": 64 * MiB}):
        r = await ctl.ControllerExpandVolume(expand_req(v.volume_id, **cr))     # already that size: OK
        assert r.capacity_bytes == 64 * MiB and r.node_expansion_required
    r = await ctl.ControllerExpandVolume(expand_req(v.volume_id, required_bytes=80 * MiB + 1,
                                                    limit_bytes=81 * MiB))      # rounded up to the limit
    assert r.capacity_bytes == 81 * MiB and size() == 81 * MiB


async def test_create_refuses_the_same_ranges_as_expand_and_says_which_bound(stubs):
    """Create and expand round to whole MiB alike; a limit below required_bytes is named as
    such, not as a rounding problem."""
    _, ctl = stubs

    def create_req(**cr: int) -> pb.CreateVolumeRequest:
        return pb.CreateVolumeRequest(name=name(), volume_capabilities=[cap()],
                                      capacity_range=pb.CapacityRange(**cr))

    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await ctl.CreateVolume(create_req(required_bytes=96 * MiB, limit_bytes=64 * MiB))
    assert ei.value.code() == OUT_OF_RANGE
    assert "required_bytes 100663296 is over limit_bytes 67108864" in ei.value.details()
    await expect(OUT_OF_RANGE, ctl.CreateVolume(create_req(required_bytes=MAX_VOLUME_SIZE + 1)))
    await expect(OUT_OF_RANGE, ctl.CreateVolume(create_req(required_bytes=8 * MiB + 1, limit_bytes=8 * MiB + 2)))
    await expect(OUT_OF_RANGE, ctl.CreateVolume(create_req(limit_bytes=MiB - 1)))
    v = (await ctl.CreateVolume(create_req(required_bytes=8 * MiB + 1, limit_bytes=9 * MiB))).volume
    assert v.capacity_bytes == 9 * MiB


class GrownMeanwhile(Meta):
    """The real meta, except that right before the controller's resize another client (the
    CLI, a second expand) grows the volume to ``to`` through the meta API."""

    def __init__(self, zcluster: Any, to: int):
        super().__init__(Meta.from_config(zconfig.load(zcluster.client_config)).client)
        self.zcluster, self.to = zcluster, to

    async def post(self, path: str, body: Any = None) -> Any:
        if path.endswith("/resize"):
            status, _ = await asyncio.to_thread(self.zcluster.api, "POST", path, {"size": self.to})
            assert status == 200
        return await super().post(path, body)


@pytest.mark.parametrize("grown_to, limit, want", [
    (128 * MiB, 0, 128 * MiB),                  # at least the size asked: OK, as it is
    (128 * MiB, 128 * MiB, 128 * MiB),
    (256 * MiB, 200 * MiB, OUT_OF_RANGE),       # over limit_bytes now, and volumes never shrink
])
async def test_expand_racing_a_concurrent_grow_answers_by_the_size_reached(stubs, zcluster, grown_to, limit, want):
    """The meta refuses a resize below the current size (a shrink): the expand answered that
    INVALID_ARGUMENT when the volume had grown past the size asked since the controller read it."""
    _, ctl = stubs
    v = await create(ctl, size=64 * MiB)
    racing = Controller(GrownMeanwhile(zcluster, grown_to), PORTAL)
    call = racing.ControllerExpandVolume(expand_req(v.volume_id, required_bytes=96 * MiB, limit_bytes=limit),
                                         AbortCtx())
    if want == OUT_OF_RANGE:
        with pytest.raises(RuntimeError) as ei:
            await call
        assert ei.value.args[0] == OUT_OF_RANGE, ei.value.args
    else:
        r = await call
        assert r.capacity_bytes == want and r.node_expansion_required
    assert zcluster.api("GET", f"/volumes/{v.volume_id}")[1]["size"] == grown_to
