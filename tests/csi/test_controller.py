"""The CSI plugin in-process over a unix socket, against a real cluster (etcd, meta, 3 chunk servers)."""

from __future__ import annotations

import asyncio

import uuid
from pathlib import Path

import grpc
import pytest

from csi import csi_pb2 as pb
from csi import csi_pb2_grpc as pbg
from csi.meta import Meta
from csi.server import build_server, listen
from tests.cluster import cluster
from zstore import config as zconfig

pytestmark = pytest.mark.slow

MiB, GiB = 1 << 20, 1 << 30
PORTAL = "127.0.0.2:3260"
NODE_A = "iqn.2026-01.io.example:node-a"
NODE_B = "iqn.2026-01.io.example:node-b"
Mode = pb.VolumeCapability.AccessMode


def cap(mode: int = Mode.SINGLE_NODE_WRITER, mount: bool = True) -> pb.VolumeCapability:
    c = pb.VolumeCapability(access_mode=Mode(mode=mode))
    if mount:
        c.mount.fs_type = "ext4"
    else:
        c.block.SetInParent()
    return c


def name(prefix: str = "pvc") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def zcluster(tmp_path_factory, etcd_server):
    with cluster(tmp_path_factory.mktemp("csi"), etcd_server, metas=1, chunks=3) as c:
        c.wait_chunks_up(3)
        yield c


@pytest.fixture
async def stubs(zcluster, tmp_path: Path):
    meta = Meta.from_config(zconfig.load(zcluster.client_config))
    server = build_server(meta, PORTAL, "controller")
    sock = tmp_path / "csi.sock"
    listen(server, f"unix://{sock}")
    await server.start()
    async with grpc.aio.insecure_channel(f"unix:{sock}") as ch:
        yield pbg.IdentityStub(ch), pbg.ControllerStub(ch)
    await server.stop(None)


async def expect(code: grpc.StatusCode, call) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await call
    assert ei.value.code() == code, ei.value.details()


async def create(ctl, n: str | None = None, size: int = 64 * MiB, **kw) -> pb.Volume:
    req = pb.CreateVolumeRequest(name=n or name(), volume_capabilities=[cap()],
                                 capacity_range=pb.CapacityRange(required_bytes=size), **kw)
    return (await ctl.CreateVolume(req)).volume


async def test_identity(stubs):
    ident, _ = stubs
    info = await ident.GetPluginInfo(pb.GetPluginInfoRequest())
    assert info.name == "csi.zstore.io" and info.vendor_version
    caps = (await ident.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest())).capabilities
    assert any(c.service.type == pb.PluginCapability.Service.CONTROLLER_SERVICE for c in caps)
    assert any(c.volume_expansion.type == pb.PluginCapability.VolumeExpansion.ONLINE for c in caps)
    assert (await ident.Probe(pb.ProbeRequest())).ready.value is True


async def test_create_is_idempotent_and_conflicts(stubs, zcluster):
    _, ctl = stubs
    n = name()
    v1 = await create(ctl, n, 100 * MiB + 1, parameters={"replicas": "2", "thin": "true"})
    assert v1.capacity_bytes == 101 * MiB
    ctx = v1.volume_context
    assert ctx["portal"] == PORTAL and ctx["targetIQN"].startswith("iqn.") and ctx["lun"] and ctx["wwn"]
    v2 = await create(ctl, n, 100 * MiB + 1, parameters={"replicas": "2", "thin": "true"})
    assert v2.volume_id == v1.volume_id
    status, rec = zcluster.api("GET", f"/volumes/{v1.volume_id}")
    assert status == 200 and rec["name"] == n and rec["replicas"] == 2
    await expect(grpc.StatusCode.ALREADY_EXISTS, create(ctl, n, 200 * MiB))


async def test_create_again_with_a_compatible_capacity_range_is_ok(stubs):
    """An existing volume whose size is in the request's capacity range is the same request."""
    _, ctl = stubs
    n = name()
    v = await create(ctl, n, 128 * MiB)
    assert (await create(ctl, n, 64 * MiB)).volume_id == v.volume_id
    again = (await ctl.CreateVolume(pb.CreateVolumeRequest(name=n, volume_capabilities=[cap()], capacity_range=
                                                           pb.CapacityRange(limit_bytes=GiB)))).volume
    assert again.volume_id == v.volume_id and again.capacity_bytes == 128 * MiB
    assert (await ctl.CreateVolume(pb.CreateVolumeRequest(name=n, volume_capabilities=[cap()]))).volume.volume_id \
        == v.volume_id                                           # no range: any size
    await expect(grpc.StatusCode.ALREADY_EXISTS, create(ctl, n, 256 * MiB))
    await expect(grpc.StatusCode.ALREADY_EXISTS, ctl.CreateVolume(pb.CreateVolumeRequest(
        name=n, volume_capabilities=[cap()], capacity_range=pb.CapacityRange(limit_bytes=100 * MiB))))
    await expect(grpc.StatusCode.ALREADY_EXISTS, create(ctl, n, 64 * MiB, parameters={"replicas": "1"}))


async def test_capacity_range(stubs):
    _, ctl = stubs
    req = pb.CreateVolumeRequest(name=name(), volume_capabilities=[cap()],
                                 capacity_range=pb.CapacityRange(required_bytes=MiB + 1, limit_bytes=MiB + 2))
    await expect(grpc.StatusCode.OUT_OF_RANGE, ctl.CreateVolume(req))
    req = pb.CreateVolumeRequest(name=name(), volume_capabilities=[cap()],
                                 capacity_range=pb.CapacityRange(limit_bytes=8 * MiB + 5))
    assert (await ctl.CreateVolume(req)).volume.capacity_bytes == 8 * MiB


async def test_bad_requests(stubs):
    _, ctl = stubs
    INVALID = grpc.StatusCode.INVALID_ARGUMENT
    await expect(INVALID, ctl.CreateVolume(pb.CreateVolumeRequest(volume_capabilities=[cap()])))
    await expect(INVALID, ctl.CreateVolume(pb.CreateVolumeRequest(name=name())))
    await expect(INVALID, ctl.CreateVolume(pb.CreateVolumeRequest(
        name=name(), volume_capabilities=[cap(Mode.MULTI_NODE_MULTI_WRITER, mount=True)])))
    await expect(INVALID, ctl.CreateVolume(pb.CreateVolumeRequest(
        name=name(), volume_capabilities=[cap()], parameters={"replicas": "7"})))
    await expect(INVALID, ctl.DeleteVolume(pb.DeleteVolumeRequest()))
    await expect(INVALID, ctl.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(volume_id="x")))
    await expect(INVALID, ctl.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(volume_id="x")))
    await expect(INVALID, ctl.CreateSnapshot(pb.CreateSnapshotRequest(name="s")))
    await expect(grpc.StatusCode.NOT_FOUND, ctl.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
        volume_id=uuid.uuid4().hex, node_id=NODE_A, volume_capability=cap())))
    await expect(grpc.StatusCode.NOT_FOUND, ctl.ControllerGetVolume(
        pb.ControllerGetVolumeRequest(volume_id=uuid.uuid4().hex)))
    await expect(grpc.StatusCode.NOT_FOUND, ctl.ValidateVolumeCapabilities(
        pb.ValidateVolumeCapabilitiesRequest(volume_id=uuid.uuid4().hex, volume_capabilities=[cap()])))


async def test_delete_unknown_is_ok(stubs):
    _, ctl = stubs
    await ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=uuid.uuid4().hex))
    await ctl.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=uuid.uuid4().hex))


async def test_publish_unpublish_acl(stubs, zcluster):
    _, ctl = stubs
    v = await create(ctl)

    def acl() -> dict[str, bool]:
        status, body = zcluster.api("GET", f"/volumes/{v.volume_id}/acl")
        assert status == 200, body
        return {e["initiator"]: e["readonly"] for e in body["initiators"]}

    req = pb.ControllerPublishVolumeRequest(volume_id=v.volume_id, node_id=NODE_A, volume_capability=cap())
    pc = (await ctl.ControllerPublishVolume(req)).publish_context
    assert pc["targetIQN"] == v.volume_context["targetIQN"] and pc["lun"] == v.volume_context["lun"]
    assert pc["wwn"] == v.volume_context["wwn"] and pc["portal"] == PORTAL
    assert acl() == {NODE_A: False}
    await ctl.ControllerPublishVolume(req)                       # idempotent
    assert acl() == {NODE_A: False}
    # Same node, other readonly flag: incompatible -> ALREADY_EXISTS.
    ro = pb.ControllerPublishVolumeRequest(volume_id=v.volume_id, node_id=NODE_A, volume_capability=cap(),
                                           readonly=True)
    await expect(grpc.StatusCode.ALREADY_EXISTS, ctl.ControllerPublishVolume(ro))
    # Single-node volume to a second node -> FAILED_PRECONDITION.
    other = pb.ControllerPublishVolumeRequest(volume_id=v.volume_id, node_id=NODE_B, volume_capability=cap())
    await expect(grpc.StatusCode.FAILED_PRECONDITION, ctl.ControllerPublishVolume(other))
    # Deleting a published volume -> FAILED_PRECONDITION.
    await expect(grpc.StatusCode.FAILED_PRECONDITION, ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v.volume_id)))
    got = await ctl.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=v.volume_id))
    assert list(got.status.published_node_ids) == [NODE_A]

    unpub = pb.ControllerUnpublishVolumeRequest(volume_id=v.volume_id, node_id=NODE_A)
    await ctl.ControllerUnpublishVolume(unpub)
    assert acl() == {}
    await ctl.ControllerUnpublishVolume(unpub)                   # idempotent
    await ctl.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
        volume_id=uuid.uuid4().hex, node_id=NODE_A))              # unknown volume: OK

    # Two publishes of the single-node volume to two nodes at once: exactly one gets it (each
    # reads the ACL before either writes it, without the controller's per-volume lock).
    got = await asyncio.gather(*(ctl.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
        volume_id=v.volume_id, node_id=n, volume_capability=cap())) for n in (NODE_A, NODE_B)),
        return_exceptions=True)
    assert sum(isinstance(g, pb.ControllerPublishVolumeResponse) for g in got) == 1
    assert [g.code() for g in got if not isinstance(g, pb.ControllerPublishVolumeResponse)] == \
        [grpc.StatusCode.FAILED_PRECONDITION]
    assert len(acl()) == 1
    await ctl.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=v.volume_id))
    assert acl() == {}

    # Multi-node readers may share it, readonly.
    for node in (NODE_A, NODE_B):
        await ctl.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
            volume_id=v.volume_id, node_id=node, volume_capability=cap(Mode.MULTI_NODE_READER_ONLY)))
    assert acl() == {NODE_A: True, NODE_B: True}
    await ctl.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=v.volume_id))
    assert acl() == {}

    # Raw block, one writer among many: a second writer is refused, a reader is not.
    single_writer = cap(Mode.MULTI_NODE_SINGLE_WRITER, mount=False)
    await ctl.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
        volume_id=v.volume_id, node_id=NODE_A, volume_capability=single_writer))
    await expect(grpc.StatusCode.FAILED_PRECONDITION, ctl.ControllerPublishVolume(
        pb.ControllerPublishVolumeRequest(volume_id=v.volume_id, node_id=NODE_B, volume_capability=single_writer)))
    await ctl.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
        volume_id=v.volume_id, node_id=NODE_B, volume_capability=single_writer, readonly=True))
    assert acl() == {NODE_A: False, NODE_B: True}
    await ctl.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=v.volume_id))
    assert acl() == {}
    await ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v.volume_id))
    assert zcluster.api("GET", f"/volumes/{v.volume_id}")[0] == 404


async def test_publish_is_idempotent_for_a_node_id_with_capitals(stubs, zcluster, tmp_path: Path):
    """iSCSI names are case-insensitive and the meta stores them lower-cased: a republish with
    the same mixed-case node id is OK, and published_node_ids is what NodeGetInfo answers."""
    _, ctl = stubs
    v = await create(ctl)
    node_id = "iqn.2026-01.io.example:Worker-A"
    from csi.node import Node
    info = await Node(node_id, state_dir=str(tmp_path / "state")).NodeGetInfo(pb.NodeGetInfoRequest(), None)
    assert info.node_id == node_id.lower()
    req = pb.ControllerPublishVolumeRequest(volume_id=v.volume_id, node_id=node_id, volume_capability=cap())
    await ctl.ControllerPublishVolume(req)
    await ctl.ControllerPublishVolume(req)                       # the same request again: OK
    await ctl.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
        volume_id=v.volume_id, node_id=info.node_id, volume_capability=cap()))
    # incompatible (readonly) is still ALREADY_EXISTS, another node still FAILED_PRECONDITION
    await expect(grpc.StatusCode.ALREADY_EXISTS, ctl.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
        volume_id=v.volume_id, node_id=node_id, volume_capability=cap(), readonly=True)))
    await expect(grpc.StatusCode.FAILED_PRECONDITION, ctl.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
        volume_id=v.volume_id, node_id=NODE_B, volume_capability=cap())))
    got = await ctl.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=v.volume_id))
    assert list(got.status.published_node_ids) == [info.node_id]
    listed = {e.volume.volume_id: list(e.status.published_node_ids)
              for e in (await ctl.ListVolumes(pb.ListVolumesRequest())).entries}
    assert listed[v.volume_id] == [info.node_id]
    await ctl.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=v.volume_id, node_id=node_id))
    got = await ctl.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=v.volume_id))
    assert list(got.status.published_node_ids) == []
    assert zcluster.api("GET", f"/volumes/{v.volume_id}/acl")[1]["initiators"] == []
    await ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v.volume_id))


async def test_snapshot_and_clone(stubs, zcluster):
    _, ctl = stubs
    v = await create(ctl, size=32 * MiB)
    sname = name("snapshot")
    s = (await ctl.CreateSnapshot(pb.CreateSnapshotRequest(source_volume_id=v.volume_id, name=sname))).snapshot
    assert s.ready_to_use and s.source_volume_id == v.volume_id and s.size_bytes == 32 * MiB
    again = (await ctl.CreateSnapshot(pb.CreateSnapshotRequest(source_volume_id=v.volume_id, name=sname))).snapshot
    assert again.snapshot_id == s.snapshot_id
    w = await create(ctl, size=16 * MiB)
    await expect(grpc.StatusCode.ALREADY_EXISTS,
                 ctl.CreateSnapshot(pb.CreateSnapshotRequest(source_volume_id=w.volume_id, name=sname)))

    listed = await ctl.ListSnapshots(pb.ListSnapshotsRequest(source_volume_id=v.volume_id))
    assert [e.snapshot.snapshot_id for e in listed.entries] == [s.snapshot_id]
    one = await ctl.ListSnapshots(pb.ListSnapshotsRequest(snapshot_id=s.snapshot_id))
    assert [e.snapshot.snapshot_id for e in one.entries] == [s.snapshot_id]
    await expect(grpc.StatusCode.ABORTED, ctl.ListSnapshots(pb.ListSnapshotsRequest(starting_token="x")))

    src = pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=s.snapshot_id))
    clone = (await ctl.CreateVolume(pb.CreateVolumeRequest(
        name=name(), volume_capabilities=[cap()], volume_content_source=src))).volume
    assert clone.capacity_bytes == 32 * MiB
    assert clone.content_source.snapshot.snapshot_id == s.snapshot_id
    assert zcluster.api("GET", f"/volumes/{clone.volume_id}")[1]["source_snapshot"] == s.snapshot_id
    missing = pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=uuid.uuid4().hex))
    await expect(grpc.StatusCode.NOT_FOUND, ctl.CreateVolume(pb.CreateVolumeRequest(
        name=name(), volume_capabilities=[cap()], volume_content_source=missing)))

    # Exported as a LUN: in use, FAILED_PRECONDITION (the spec's code), not ALREADY_EXISTS.
    assert zcluster.api("POST", f"/snapshots/{s.snapshot_id}/export")[0] == 201
    await expect(grpc.StatusCode.FAILED_PRECONDITION, ctl.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=s.snapshot_id)))
    assert zcluster.api("DELETE", f"/snapshots/{s.snapshot_id}/export")[0] == 200
    await ctl.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=s.snapshot_id))
    await ctl.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=s.snapshot_id))
    assert zcluster.api("GET", f"/snapshots/{s.snapshot_id}")[0] == 404


async def test_a_retried_clone_create_is_ok_after_its_snapshot_was_deleted(stubs):
    """CreateVolume is idempotent: the same clone request again answers the volume it made,
    even once the snapshot is deleted (a tombstone kept for the clone); a new name is NOT_FOUND."""
    _, ctl = stubs
    v = await create(ctl, size=32 * MiB)
    s = (await ctl.CreateSnapshot(pb.CreateSnapshotRequest(source_volume_id=v.volume_id, name=name("snap")))).snapshot
    src = pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=s.snapshot_id))
    sized = pb.CreateVolumeRequest(name=name(), volume_capabilities=[cap()], volume_content_source=src,
                                   capacity_range=pb.CapacityRange(required_bytes=64 * MiB))
    unsized = pb.CreateVolumeRequest(name=name(), volume_capabilities=[cap()], volume_content_source=src)
    first = (await ctl.CreateVolume(sized)).volume
    first_unsized = (await ctl.CreateVolume(unsized)).volume
    assert first_unsized.capacity_bytes == 32 * MiB
    await ctl.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=s.snapshot_id))
    again = (await ctl.CreateVolume(sized)).volume
    assert again.volume_id == first.volume_id and again.capacity_bytes == 64 * MiB
    assert again.content_source.snapshot.snapshot_id == s.snapshot_id
    assert (await ctl.CreateVolume(unsized)).volume.volume_id == first_unsized.volume_id
    # another size or no source for that name is still ALREADY_EXISTS, a new name NOT_FOUND
    other = pb.CreateVolumeRequest(); other.CopyFrom(sized)
    other.capacity_range.required_bytes = 128 * MiB
    await expect(grpc.StatusCode.ALREADY_EXISTS, ctl.CreateVolume(other))
    await expect(grpc.StatusCode.ALREADY_EXISTS, create(ctl, sized.name, 64 * MiB))
    fresh = pb.CreateVolumeRequest(); fresh.CopyFrom(sized)
    fresh.name = name()
    await expect(grpc.StatusCode.NOT_FOUND, ctl.CreateVolume(fresh))


async def test_concurrent_snapshots_of_one_name_on_two_volumes(stubs):
    """CSI snapshot names are global: of two concurrent creates of one name on two volumes,
    one succeeds and the other is ALREADY_EXISTS; the winner's retry is OK."""
    _, ctl = stubs
    a, b = await create(ctl), await create(ctl)
    sn = name("snap")
    reqs = [pb.CreateSnapshotRequest(source_volume_id=v.volume_id, name=sn) for v in (a, b)]
    res = await asyncio.gather(*(ctl.CreateSnapshot(r) for r in reqs), return_exceptions=True)
    won = [i for i, r in enumerate(res) if isinstance(r, pb.CreateSnapshotResponse)]
    assert len(won) == 1, res
    assert res[1 - won[0]].code() == grpc.StatusCode.ALREADY_EXISTS
    again = await ctl.CreateSnapshot(reqs[won[0]])
    assert again.snapshot.snapshot_id == res[won[0]].snapshot.snapshot_id
    await ctl.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=again.snapshot.snapshot_id))
    taken = await ctl.CreateSnapshot(reqs[1 - won[0]])             # the name is free again
    await ctl.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=taken.snapshot.snapshot_id))


def test_a_conflict_worth_repeating_is_aborted_others_keep_their_code():
    from csi.status import code_of
    from zstore import errors
    assert code_of(errors.Conflict("too much concurrent change", retry=True)) == grpc.StatusCode.ABORTED
    assert code_of(errors.from_dict({"code": "conflict", "message": "x", "details": {"retry": True}}, 409)) \
        == grpc.StatusCode.ABORTED                                  # as it arrives from the meta
    assert code_of(errors.Conflict("name taken with other parameters")) == grpc.StatusCode.ALREADY_EXISTS


async def test_expand(stubs, zcluster):
    _, ctl = stubs
    v = await create(ctl, size=16 * MiB)
    r = await ctl.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id=v.volume_id, capacity_range=pb.CapacityRange(required_bytes=48 * MiB), volume_capability=cap()))
    assert r.capacity_bytes == 48 * MiB and r.node_expansion_required
    assert zcluster.api("GET", f"/volumes/{v.volume_id}")[1]["size"] == 48 * MiB
    r = await ctl.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id=v.volume_id, capacity_range=pb.CapacityRange(required_bytes=32 * MiB),
        volume_capability=cap(mount=False)))
    assert r.capacity_bytes == 48 * MiB and r.node_expansion_required   # raw block: the node rescans
    await expect(grpc.StatusCode.NOT_FOUND, ctl.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id=uuid.uuid4().hex, capacity_range=pb.CapacityRange(required_bytes=GiB))))


async def test_expand_with_an_empty_or_limit_only_range_does_not_grow(stubs, zcluster):
    """Volumes never shrink, so an expansion must not grow to a create's 1 GiB default:
    no field set is INVALID_ARGUMENT, a limit alone asks for no growth."""
    _, ctl = stubs
    v = await create(ctl, size=64 * MiB)

    def expand(**cr):
        return ctl.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
            volume_id=v.volume_id, capacity_range=pb.CapacityRange(**cr), volume_capability=cap()))

    def size() -> int:
        return zcluster.api("GET", f"/volumes/{v.volume_id}")[1]["size"]

    await expect(grpc.StatusCode.INVALID_ARGUMENT, expand())
    await expect(grpc.StatusCode.INVALID_ARGUMENT, expand(required_bytes=-1))
    assert size() == 64 * MiB
    r = await expand(limit_bytes=100 * GiB)
    assert r.capacity_bytes == 64 * MiB and r.node_expansion_required
    assert size() == 64 * MiB
    await expect(grpc.StatusCode.OUT_OF_RANGE, expand(limit_bytes=32 * MiB))       # over it already
    await expect(grpc.StatusCode.OUT_OF_RANGE, expand(required_bytes=256 * MiB, limit_bytes=128 * MiB))
    await expect(grpc.StatusCode.OUT_OF_RANGE, expand(required_bytes=96 * MiB + 1, limit_bytes=96 * MiB + 2))
    assert size() == 64 * MiB
    r = await expand(required_bytes=96 * MiB + 1, limit_bytes=100 * GiB)           # rounded up
    assert r.capacity_bytes == 97 * MiB and size() == 97 * MiB


async def test_list_paging_and_capacity(stubs):
    _, ctl = stubs
    ids = {(await create(ctl, name("list"), 8 * MiB)).volume_id for _ in range(3)}
    seen: list[str] = []
    token = ""
    for _ in range(100):
        page = await ctl.ListVolumes(pb.ListVolumesRequest(max_entries=2, starting_token=token))
        assert len(page.entries) <= 2
        seen += [e.volume.volume_id for e in page.entries]
        token = page.next_token
        if not token:
            break
    assert ids <= set(seen) and len(seen) == len(set(seen))
    await expect(grpc.StatusCode.ABORTED, ctl.ListVolumes(pb.ListVolumesRequest(starting_token="!bad")))
    await expect(grpc.StatusCode.INVALID_ARGUMENT, ctl.ListVolumes(pb.ListVolumesRequest(max_entries=-1)))

    cap3 = await ctl.GetCapacity(pb.GetCapacityRequest())
    cap1 = await ctl.GetCapacity(pb.GetCapacityRequest(parameters={"replicas": "1"}))
    assert cap1.available_capacity > cap3.available_capacity > 0
    caps = await ctl.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest())
    assert pb.ControllerServiceCapability.RPC.EXPAND_VOLUME in {c.rpc.type for c in caps.capabilities}

    vcap = await ctl.ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
        volume_id=next(iter(ids)), volume_capabilities=[cap(Mode.MULTI_NODE_MULTI_WRITER, mount=False)]))
    assert vcap.HasField("confirmed")
    vcap = await ctl.ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
        volume_id=next(iter(ids)), volume_capabilities=[cap(Mode.MULTI_NODE_MULTI_WRITER, mount=True)]))
    assert not vcap.HasField("confirmed") and vcap.message


async def test_snapshot_outlives_its_volume(stubs, zcluster):
    """A clone from a snapshot works after the source volume is deleted, and the snapshot
    can still be deleted (the clone keeps the data it shares)."""
    _, ctl = stubs
    v = await create(ctl, size=8 * MiB)
    s = (await ctl.CreateSnapshot(pb.CreateSnapshotRequest(source_volume_id=v.volume_id,
                                                           name=name("snapshot")))).snapshot
    await ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v.volume_id))
    src = pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=s.snapshot_id))
    clone = (await ctl.CreateVolume(pb.CreateVolumeRequest(
        name=name(), volume_capabilities=[cap()], volume_content_source=src))).volume
    assert clone.capacity_bytes == 8 * MiB
    await ctl.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=s.snapshot_id))
    assert zcluster.api("GET", f"/snapshots/{s.snapshot_id}")[0] == 404
    assert zcluster.api("GET", f"/volumes/{clone.volume_id}")[0] == 200


def test_server_process(zcluster, tmp_path: Path):
    """``python -m csi.server`` reads the zstore config and serves on a unix socket."""
    import subprocess
    import sys
    from tests.cluster import ROOT, wait_for
    sock = tmp_path / "s" / "csi.sock"
    p = subprocess.Popen([sys.executable, "-m", "csi.server", "--endpoint", f"unix://{sock}",
                          "--mode", "controller", "--config", str(zcluster.client_config)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: sock.exists() or p.poll() is not None, 20, "the CSI socket")
        assert p.poll() is None, p.stdout.read().decode()
        with grpc.insecure_channel(f"unix:{sock}") as ch:
            info = pbg.IdentityStub(ch).GetPluginInfo(pb.GetPluginInfoRequest(), timeout=10)
            assert info.name == "csi.zstore.io"
            assert pbg.IdentityStub(ch).Probe(pb.ProbeRequest(), timeout=10).ready.value
            vols = pbg.ControllerStub(ch).ListVolumes(pb.ListVolumesRequest(max_entries=1), timeout=10)
            assert len(vols.entries) <= 1
    finally:
        p.terminate()
        assert p.wait(15) == 0


class _SlowAclWrite(Meta):
    """The meta answering an ACL write late (a slow or failing-over leader): the call runs in
    a worker thread, as every meta call does, and lands after ``delay``."""

    delay = 1.5

    def __init__(self, client) -> None:
        super().__init__(client)
        import threading
        self.landed = threading.Event()        # the late ACL write has reached the meta

    async def put(self, path: str, body=None):
        if "/acl/" not in path:
            return await super().put(path, body)

        def late():
            import time
            time.sleep(self.delay)
            try:
                return self.client.put(path, body)
            finally:
                self.landed.set()
        return await asyncio.to_thread(late)


async def test_a_publish_cut_off_by_its_deadline_does_not_land_after_the_unpublish(zcluster, tmp_path):
    """The attacher's deadline cancels a publish whose ACL write is still on its way; the
    detach that follows found nothing to remove, the write landed after it, and the node
    kept the LUN: the volume could then never be deleted (FAILED_PRECONDITION, exported)
    nor published to another node. The unpublish now runs after the write in flight."""
    meta = _SlowAclWrite.from_config(zconfig.load(zcluster.client_config))
    server = build_server(meta, PORTAL, "controller")
    sock = tmp_path / "csi.sock"
    listen(server, f"unix://{sock}")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"unix:{sock}") as ch:
            ctl = pbg.ControllerStub(ch)
            vol = await create(ctl)
            pub = pb.ControllerPublishVolumeRequest(volume_id=vol.volume_id, node_id=NODE_A,
                                                    volume_capability=cap())
            await expect(grpc.StatusCode.DEADLINE_EXCEEDED, ctl.ControllerPublishVolume(pub, timeout=0.3))
            await ctl.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
                volume_id=vol.volume_id, node_id=NODE_A), timeout=10)
            assert await asyncio.to_thread(meta.landed.wait, 30)    # the late write is done
            got = await ctl.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vol.volume_id))
            assert list(got.status.published_node_ids) == []
            await ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id), timeout=30)
    finally:
        await server.stop(None)


async def test_unpublish_of_a_node_id_that_is_no_initiator_name_succeeds(stubs):
    """A node plugin started with a host name as its node id: its publish fails, and the
    detach must not fail forever after (the spec: an unknown node is already unpublished)."""
    _, ctl = stubs
    vol = await create(ctl)
    await ctl.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
        volume_id=vol.volume_id, node_id="node-1"))
    await ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
