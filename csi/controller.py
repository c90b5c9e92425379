"""CSI Controller service: a thin translation of CSI calls into meta API calls.

The CSI volume id is the meta ``volume_id`` (the API accepts it wherever it
accepts a name), the CSI node id is the node's iSCSI initiator IQN, and
publishing a volume to a node means putting that IQN on the volume's ACL.
Idempotency comes from the meta API (create by name, ACL put/delete); this
module adds the CSI rules on top: capacity ranges, access modes and the spec's
error codes.
"""

from __future__ import annotations

import asyncio
import re
from collections import defaultdict
from typing import Any

import grpc

from csi import csi_pb2 as pb
from csi import csi_pb2_grpc as pbg
from csi.meta import Meta, seg
from csi.status import Abort, guard, invalid
from zstore import errors, naming

MiB = 1 << 20
DEFAULT_SIZE = 1 << 30           # when the CO gives no capacity range at all
MAX_VOLUME_SIZE = 1 << 50        # matches what we advertise in GetCapacity
_TOKEN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")   # a volume name, as the meta API's

Mode = pb.VolumeCapability.AccessMode
SINGLE_NODE = {Mode.SINGLE_NODE_WRITER, Mode.SINGLE_NODE_READER_ONLY,
               Mode.SINGLE_NODE_SINGLE_WRITER, Mode.SINGLE_NODE_MULTI_WRITER}
READ_ONLY = {Mode.SINGLE_NODE_READER_ONLY, Mode.MULTI_NODE_READER_ONLY}

RPC = pb.ControllerServiceCapability.RPC
CAPABILITIES = [RPC.CREATE_DELETE_VOLUME, RPC.PUBLISH_UNPUBLISH_VOLUME, RPC.LIST_VOLUMES,
                RPC.GET_CAPACITY, RPC.CREATE_DELETE_SNAPSHOT, RPC.LIST_SNAPSHOTS, RPC.PUBLISH_READONLY,
                RPC.EXPAND_VOLUME, RPC.LIST_VOLUMES_PUBLISHED_NODES, RPC.VOLUME_CONDITION,
                RPC.GET_VOLUME, RPC.SINGLE_NODE_MULTI_WRITER]


def round_up(n: int) -> int:
    return -(-n // MiB) * MiB


def size_for(cr: pb.CapacityRange | None, floor: int = 0) -> int:
    """The size to create for a capacity range: at least ``required`` (and ``floor``, a
    clone's source size), rounded up to a MiB as the meta API does; OUT_OF_RANGE when that
    exceeds ``limit``."""
    required = cr.required_bytes if cr else 0
    limit = cr.limit_bytes if cr else 0
    if required < 0 or limit < 0:
        raise invalid("capacity_range: required_bytes and limit_bytes must not be negative")
    if required == 0 and limit == 0 and floor == 0:
        size = DEFAULT_SIZE
    elif required == 0 and floor == 0:
        size = min(DEFAULT_SIZE, limit // MiB * MiB)
        if size == 0:
            raise Abort(grpc.StatusCode.OUT_OF_RANGE,
                        f"limit_bytes {limit} is below the smallest volume (1 MiB)")
    else:
        size = round_up(max(required, floor))
    check_range(size, required, limit, floor)
    return size


def check_range(size: int, required: int, limit: int, floor: int = 0) -> None:
    """OUT_OF_RANGE (the spec's "Unsupported capacity_range") unless ``size``, the whole MiB
    a range asks for, is within limit_bytes and the largest volume we make; the message says
    which bound it broke. Create and expand share it, so they round and refuse alike."""
    if limit and size > limit:
        why = "a clone is at least its snapshot's size" if floor > required else "sizes are whole MiB"
        raise Abort(grpc.StatusCode.OUT_OF_RANGE,
                    f"required_bytes {required} is over limit_bytes {limit}" if required > limit else
                    f"{size} bytes needed ({why}), limit_bytes is {limit}")
    if size > MAX_VOLUME_SIZE:
        raise Abort(grpc.StatusCode.OUT_OF_RANGE, f"{size} bytes is over the maximum {MAX_VOLUME_SIZE}")


def expand_size(cr: pb.CapacityRange) -> int | None:
    """The size an expansion asks for: ``required`` rounded up to a MiB, or None (no growth)
    for a limit-only range. Not ``size_for``: its default for an empty range is a create's
    1 GiB, and volumes never shrink, so growing to it could not be undone."""
    required, limit = cr.required_bytes, cr.limit_bytes
    if required < 0 or limit < 0:
        raise invalid("capacity_range: required_bytes and limit_bytes must not be negative")
    if required == 0 and limit == 0:
        raise invalid("capacity_range: required_bytes or limit_bytes must be set")
    if required == 0:
        return None
    size = round_up(required)
    check_range(size, required, limit)
    return size


def check_capabilities(caps: Any, what: str = "volume_capabilities") -> None:
    """INVALID_ARGUMENT unless every capability names an access type and a mode we serve.
    An iSCSI LUN can be shared as a raw block device, but a filesystem on it can be
    written from one node only."""
    if not caps:
        raise invalid(f"{what} is required")
    for c in caps:
        if not c.HasField("block") and not c.HasField("mount"):
            raise invalid(f"{what}: each capability needs block or mount")
        if c.access_mode.mode == Mode.UNKNOWN:
            raise invalid(f"{what}: access_mode is required")
        if unsupported(c):
            raise invalid(f"{what}: {Mode.Mode.Name(c.access_mode.mode)} is not supported for mount volumes")


def unsupported(c: pb.VolumeCapability) -> bool:
    return c.HasField("mount") and c.access_mode.mode in (Mode.MULTI_NODE_SINGLE_WRITER,
                                                          Mode.MULTI_NODE_MULTI_WRITER)


def node_key(node_id: str) -> str:
    """The form an initiator's ACL entry is stored and compared in. iSCSI names are
    case-insensitive (RFC 3722): the meta stores them normalized (lower case), and the node
    plugin reports its node id in that form too, so the CO's node ids and the ACL agree."""
    return naming.normalize_iqn(node_id.strip())


def published(vol: dict[str, Any]) -> list[str]:
    """published_node_ids: the volume's ACL as node ids (NodeGetInfo's form), each once."""
    return list(dict.fromkeys(node_key(i) for i in vol.get("acl", [])))


def require(value: str, name: str) -> str:
    if not value:
        raise invalid(f"{name} is required")
    return value


def parse_params(params: Any) -> dict[str, Any]:
    """StorageClass parameters we understand: ``replicas`` (1-3) and ``thin`` (true/false)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key.startswith("csi.storage.k8s.io/"):
            continue        # added by the external-provisioner, not ours
        if key == "replicas":
            if value not in ("1", "2", "3"):
                raise invalid(f"parameter replicas={value!r}: must be 1, 2 or 3")
            out["replicas"] = int(value)
        elif key == "thin":
            if value.lower() not in ("true", "false"):
                raise invalid(f"parameter thin={value!r}: must be true or false")
            out["thin"] = value.lower() == "true"
        else:
            raise invalid(f"unknown parameter {key!r} (known: replicas, thin)")
    return out


class Controller(pbg.ControllerServicer):
    def __init__(self, meta: Meta, portal: str):
        self.meta = meta
        self.portal = portal    # the VIP: the only address a node needs to log in
        # Publish reads the ACL, checks the access mode against it, then adds the node: two
        # publishes of one volume at once must not both pass the check (two writers of a
        # single-node volume). One controller runs at a time (the sidecars' leader election).
        self._publish_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._acl_changes: set[asyncio.Task] = set()     # see _acl_change

    async def _acl_change(self, vid: str, change):
        """``change()`` under the volume's publish lock, in a task of its own, shielded.

        A meta call runs in a worker thread with retries of its own: when the CO's deadline
        cancels the RPC, the thread goes on and its ACL write may land later. Held by the
        RPC, the lock was released at the cancellation, and an unpublish meanwhile found
        nothing to remove: the entry then appeared after the detach (the LUN left visible
        to that node, the volume undeletable, a single-node volume unpublishable elsewhere).
        The task keeps the lock until its write is done, so a later publish or unpublish of
        the volume runs after it."""
        async def locked():
            async with self._publish_locks[vid]:
                return await change()
        task = asyncio.ensure_future(locked())
        self._acl_changes.add(task)
        task.add_done_callback(self._acl_change_done)
        return await asyncio.shield(task)

    def _acl_change_done(self, task: asyncio.Task) -> None:
        self._acl_changes.discard(task)
        if not task.cancelled():
            task.exception()            # retrieved: its RPC may have been cancelled meanwhile

    # -- helpers ---------------------------------------------------------------

    def context_of(self, vol: dict[str, Any]) -> dict[str, str]:
        return {"targetIQN": vol["target_iqn"], "lun": str(vol["lun"]), "wwn": vol["wwn"],
                "portal": self.portal}

    def volume_msg(self, vol: dict[str, Any]) -> pb.Volume:
        v = pb.Volume(capacity_bytes=vol["size"], volume_id=vol["volume_id"],
                      volume_context=self.context_of(vol))
        if vol.get("source_snapshot"):
            v.content_source.snapshot.snapshot_id = vol["source_snapshot"]
        return v

    async def volume(self, volume_id: str) -> dict[str, Any]:
        """The volume record, NOT_FOUND (via the API) when it does not exist."""
        return await self.meta.get(f"/volumes/{seg(volume_id)}")

    @staticmethod
    def condition(vol: dict[str, Any]) -> pb.VolumeCondition:
        down = [p["chunk_id"][:8] for p in vol.get("placement", []) if p["status"] != "up"]
        if down:
            return pb.VolumeCondition(abnormal=True, message=f"replicas on chunk servers not up: {down}")
        return pb.VolumeCondition(abnormal=False, message=vol.get("state", ""))

    # -- volumes -----------------------------------------------------------------

    @guard
    async def CreateVolume(self, request: pb.CreateVolumeRequest,
                           context: grpc.aio.ServicerContext) -> pb.CreateVolumeResponse:
        require(request.name, "name")
        check_capabilities(request.volume_capabilities)
        body: dict[str, Any] = {"name": request.name, **parse_params(request.parameters)}
        floor = 0
        src = request.volume_content_source
        if request.HasField("volume_content_source"):
            if src.HasField("volume"):
                raise invalid("cloning from a volume is not supported; snapshot it and clone the snapshot")
            sid = require(src.snapshot.snapshot_id, "volume_content_source.snapshot.snapshot_id")
            body["source_snapshot"] = sid
            try:
                floor = (await self.meta.get(f"/snapshots/{seg(sid)}"))["size"]
            except errors.NotFound:
                # Deleted (or never was): only a retry of a create that succeeded before the
                # snapshot was deleted can still succeed. The meta looks the name up before
                # it resolves the source, and compares the existing clone's source id (and
                # its size to the snapshot's when no size is sent); otherwise NOT_FOUND.
                floor = None
        cr = request.capacity_range if request.HasField("capacity_range") else None
        if floor is None and not (cr and (cr.required_bytes or cr.limit_bytes)):
            pass                    # the source's size, decided by the meta
        else:
            body["size"] = size_for(cr, floor or 0)
        # An existing volume of that name is the same request if its size is in the range
        # (the spec: compatible with capacity_range), not only if it is the size we would
        # create now; no range: any size. ``size`` alone (the CLI) means exactly that size.
        body["min_size"] = cr.required_bytes if cr else 0
        if cr and cr.limit_bytes:
            body["max_size"] = cr.limit_bytes
        vol = await self.meta.post("/volumes", body)
        return pb.CreateVolumeResponse(volume=self.volume_msg(vol))

    @guard
    async def DeleteVolume(self, request: pb.DeleteVolumeRequest,
                           context: grpc.aio.ServicerContext) -> pb.DeleteVolumeResponse:
        vid = require(request.volume_id, "volume_id")
        try:
            await self.meta.delete(f"/volumes/{seg(vid)}")
        except errors.NotFound:
            pass                    # already gone: success, as the spec asks
        except errors.Conflict as e:
            if e.details.get("retry"):
                raise
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION, f"volume {vid} is in use: {e.message}")
        return pb.DeleteVolumeResponse()

    @guard
    async def ControllerPublishVolume(self, request: pb.ControllerPublishVolumeRequest,
                                      context: grpc.aio.ServicerContext) -> pb.ControllerPublishVolumeResponse:
        vid = require(request.volume_id, "volume_id")
        node = require(request.node_id, "node_id")
        if not request.HasField("volume_capability"):
            raise invalid("volume_capability is required")
        check_capabilities([request.volume_capability], "volume_capability")
        try:
            naming.check_iqn(node)
        except errors.InvalidArgument as e:
            # Node ids are the nodes' initiator names (NodeGetInfo): one that is none names
            # no node a volume can be published to, the spec's "node does not exist".
            raise Abort(grpc.StatusCode.NOT_FOUND, f"no such node {node!r}: {e}") from None
        mode = request.volume_capability.access_mode.mode
        readonly = request.readonly or mode in READ_ONLY
        return await self._acl_change(vid, lambda: self._publish(vid, node, mode, readonly))

    async def _publish(self, vid: str, node: str, mode: int, readonly: bool) -> pb.ControllerPublishVolumeResponse:
        vol = await self.volume(vid)
        acl = await self.meta.get(f"/volumes/{seg(vid)}/acl")
        # Compared normalized: the meta stores the IQN lower-cased, the CO may send capitals
        # (an older node id); a republish to the same initiator must find its own entry.
        entries = {node_key(e["initiator"]): e for e in acl["initiators"]}
        me = node_key(node)
        mine = entries.get(me)
        if mine is not None and bool(mine["readonly"]) != readonly:
            raise Abort(grpc.StatusCode.ALREADY_EXISTS,
                        f"volume {vid} is already published to {node} with readonly={mine['readonly']}")
        others = [i for i in entries if i != me]
        if mode in SINGLE_NODE and others:
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                        f"volume {vid} is published to {others[0]} and its access mode is single-node")
        writers = [i for i in others if not entries[i]["readonly"]]
        if mode == Mode.MULTI_NODE_SINGLE_WRITER and not readonly and writers:
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                        f"volume {vid} already has a writer, {writers[0]}; publish readonly")
        if mine is None:
            await self.meta.put(f"/volumes/{seg(vid)}/acl/{seg(node)}", {"readonly": readonly})
        ctx = self.context_of(vol)
        ctx["readonly"] = "true" if readonly else "false"
        return pb.ControllerPublishVolumeResponse(publish_context=ctx)

    @guard
    async def ControllerUnpublishVolume(self, request: pb.ControllerUnpublishVolumeRequest,
                                        context: grpc.aio.ServicerContext) -> pb.ControllerUnpublishVolumeResponse:
        """Idempotent: an unknown volume or node is already unpublished. An empty node_id
        means every node, as the spec says."""
        vid = require(request.volume_id, "volume_id")
        await self._acl_change(vid, lambda: self._unpublish(vid, request.node_id))
        return pb.ControllerUnpublishVolumeResponse()

    async def _unpublish(self, vid: str, node_id: str) -> None:
        try:
            if node_id:
                nodes = [node_id]
            else:
                nodes = [e["initiator"] for e in
                         (await self.meta.get(f"/volumes/{seg(vid)}/acl"))["initiators"]]
            for node in nodes:
                try:
                    await self.meta.delete(f"/volumes/{seg(vid)}/acl/{seg(node)}")
                except (errors.NotFound, errors.InvalidArgument):
                    # A node id that is no initiator name (a node plugin started with a host
                    # name) can be on no ACL: unpublished already. Failing it would keep the
                    # VolumeAttachment's finalizer forever (the spec: unknown node, OK).
                    pass
        except errors.NotFound:
            pass

    @guard
    async def ValidateVolumeCapabilities(self, request: pb.ValidateVolumeCapabilitiesRequest,
                                         context: grpc.aio.ServicerContext) -> pb.ValidateVolumeCapabilitiesResponse:
        vid = require(request.volume_id, "volume_id")
        if not request.volume_capabilities:
            raise invalid("volume_capabilities is required")
        vol = await self.volume(vid)
        for c in request.volume_capabilities:
            if (not c.HasField("block") and not c.HasField("mount")) or c.access_mode.mode == Mode.UNKNOWN \
                    or unsupported(c):
                return pb.ValidateVolumeCapabilitiesResponse(message="unsupported capability: " + str(c).strip())
        # Confirmed parameters are "validated by the plugin": each must be one CreateVolume
        # takes and match what the volume has (a static PV checked against a StorageClass).
        try:
            params = parse_params(request.parameters)
        except Abort as e:
            return pb.ValidateVolumeCapabilitiesResponse(message=e.message)
        differ = sorted(k for k, v in params.items() if vol.get(k) != v)
        if differ:
            return pb.ValidateVolumeCapabilitiesResponse(message="the volume has " + ", ".join(
                f"{k}={vol.get(k)!r}, not {params[k]!r}" for k in differ))
        return pb.ValidateVolumeCapabilitiesResponse(confirmed=pb.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=request.volume_context, volume_capabilities=request.volume_capabilities,
            parameters=request.parameters))

    @guard
    async def ListVolumes(self, request: pb.ListVolumesRequest,
                          context: grpc.aio.ServicerContext) -> pb.ListVolumesResponse:
        """Pages follow the meta API's (sorted by name); the token is the last name served."""
        if request.max_entries < 0:
            raise invalid("max_entries must not be negative")
        token = request.starting_token
        if token and not _TOKEN_RE.fullmatch(token):
            raise Abort(grpc.StatusCode.ABORTED, f"starting_token {token!r} is not one we handed out")
        limit = min(request.max_entries or 1000, 1000)
        page = await self.meta.get("/volumes", limit=limit, start_after=token or None)
        entries = [pb.ListVolumesResponse.Entry(
            volume=self.volume_msg(v),
            status=pb.ListVolumesResponse.VolumeStatus(published_node_ids=published(v),
                                                       volume_condition=self.condition(v)))
            for v in page["volumes"]]
        return pb.ListVolumesResponse(entries=entries, next_token=page.get("next") or "")

    @guard
    async def ControllerGetVolume(self, request: pb.ControllerGetVolumeRequest,
                                  context: grpc.aio.ServicerContext) -> pb.ControllerGetVolumeResponse:
        vol = await self.volume(require(request.volume_id, "volume_id"))
        return pb.ControllerGetVolumeResponse(
            volume=self.volume_msg(vol),
            status=pb.ControllerGetVolumeResponse.VolumeStatus(published_node_ids=published(vol),
                                                               volume_condition=self.condition(vol)))

    @guard
    async def GetCapacity(self, request: pb.GetCapacityRequest,
                          context: grpc.aio.ServicerContext) -> pb.GetCapacityResponse:
        """Free raw space divided by the replica count the parameters ask for (default 3)."""
        for c in request.volume_capabilities:
            if unsupported(c):
                return pb.GetCapacityResponse(available_capacity=0)
        params = parse_params(request.parameters)
        cap = (await self.meta.get("/cluster"))["capacity"]
        free = max(0, cap["total"] - cap["used"])
        resp = pb.GetCapacityResponse(available_capacity=free // params.get("replicas", 3))
        resp.maximum_volume_size.value = MAX_VOLUME_SIZE
        resp.minimum_volume_size.value = MiB
        return resp

    @guard
    async def ControllerGetCapabilities(self, request: pb.ControllerGetCapabilitiesRequest,
                                        context: grpc.aio.ServicerContext) -> pb.ControllerGetCapabilitiesResponse:
        return pb.ControllerGetCapabilitiesResponse(capabilities=[
            pb.ControllerServiceCapability(rpc=RPC(type=t)) for t in CAPABILITIES])

    @guard
    async def ControllerExpandVolume(self, request: pb.ControllerExpandVolumeRequest,
                                     context: grpc.aio.ServicerContext) -> pb.ControllerExpandVolumeResponse:
        vid = require(request.volume_id, "volume_id")
        if not request.HasField("capacity_range"):
            raise invalid("capacity_range is required")
        size = expand_size(request.capacity_range)
        vol = await self.volume(vid)
        if size is not None and vol["size"] < size:
            vol = await self._grow(vid, size)
        limit = request.capacity_range.limit_bytes
        if limit and vol["size"] > limit:
            raise Abort(grpc.StatusCode.OUT_OF_RANGE,
                        f"volume is already {vol['size']} bytes, over limit_bytes {limit}; volumes do not shrink")
        # Always ask for NodeExpandVolume. A filesystem must grow on the node; a raw block
        # device too needs the node's rescan: Linux does not re-read the capacity on the
        # CAPACITY DATA HAS CHANGED unit attention, so without it the pod keeps the old size.
        # The CO may omit volume_capability (CSI spec): NodeExpandVolume tells block from
        # mount itself (from what it staged), so True is right for either, and False would
        # leave one of them at the old size.
        return pb.ControllerExpandVolumeResponse(capacity_bytes=vol["size"], node_expansion_required=True)

    async def _grow(self, vid: str, size: int) -> dict[str, Any]:
        """The volume resized to ``size``, or as it is when something else (another expand,
        the CLI) grew it past ``size`` since we read it: the meta refuses that resize as a
        shrink (INVALID_ARGUMENT), but the spec answers a volume already at least the size
        asked with OK; the caller then checks it against limit_bytes."""
        try:
            return await self.meta.post(f"/volumes/{seg(vid)}/resize", {"size": size})
        except errors.InvalidArgument:
            vol = await self.volume(vid)
            if vol["size"] < size:
                raise
            return vol

    # -- snapshots ---------------------------------------------------------------

    @staticmethod
    def snapshot_msg(s: dict[str, Any]) -> pb.Snapshot:
        snap = pb.Snapshot(size_bytes=s["size"], snapshot_id=s["snapshot_id"],
                           source_volume_id=s["volume_id"],
                           # "creating" until the volume's coordinator has passed the snapshot
                           # barrier; the external-snapshotter polls until it is ready
                           ready_to_use=s.get("state", "ready") == "ready")
        created = float(s.get("created") or 0)
        snap.creation_time.seconds = int(created)
        snap.creation_time.nanos = int((created - int(created)) * 1e9)
        return snap

    @guard
    async def CreateSnapshot(self, request: pb.CreateSnapshotRequest,
                             context: grpc.aio.ServicerContext) -> pb.CreateSnapshotResponse:
        """Snapshot names are per volume in zstore but global in CSI: the same name on
        another volume is ALREADY_EXISTS. CSI creates take the name across volumes in the
        snapshot's own txn (``unique``), so two concurrent creates cannot both succeed; the
        lookup of that key here (a few reads, however many snapshots there are) refuses the
        name also when this volume has a per-volume snapshot of it.

        Every create writes the per-volume name key, so the same name on the same source is
        always found (the create answers it). Only ``unique`` creates write the cross-volume
        key: a snapshot made by the CLI (whose names are per volume) or by a driver older
        than that key holds no CSI name, and a CSI create of its name on another volume
        takes it (the listing this replaced refused that, at a read per snapshot per call)."""
        vid = require(request.source_volume_id, "source_volume_id")
        name = require(request.name, "name")
        held = (await self.meta.get("/snapshots", unique_name=name))["snapshots"]
        for s in held:
            if s["name"] == name and s["volume_id"] != vid:
                raise Abort(grpc.StatusCode.ALREADY_EXISTS,
                            f"snapshot {name!r} exists for another volume ({s['volume_id']})")
            if s["name"] == name:
                # Already cut (a retry after a lost answer): answered as it is, also when its
                # source was deleted since (a create there would be NOT_FOUND; the spec says OK).
                return pb.CreateSnapshotResponse(snapshot=self.snapshot_msg(s))
        snap = await self.meta.post(f"/volumes/{seg(vid)}/snapshots", {"name": name, "unique": True})
        return pb.CreateSnapshotResponse(snapshot=self.snapshot_msg(snap))

    @guard
    async def DeleteSnapshot(self, request: pb.DeleteSnapshotRequest,
                             context: grpc.aio.ServicerContext) -> pb.DeleteSnapshotResponse:
        """By id, so snapshots whose source volume is gone can be deleted too; unknown = done."""
        sid = require(request.snapshot_id, "snapshot_id")
        try:
            await self.meta.delete(f"/snapshots/{seg(sid)}")
        except errors.NotFound:
            pass
        except errors.Conflict as e:       # exported, or a revert to it still running
            if e.details.get("retry"):
                raise
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION, f"snapshot {sid} is in use: {e.message}")
        return pb.DeleteSnapshotResponse()

    @guard
    async def ListSnapshots(self, request: pb.ListSnapshotsRequest,
                            context: grpc.aio.ServicerContext) -> pb.ListSnapshotsResponse:
        """Pages follow the meta API's: the token is its ``next``, max_entries its limit."""
        if request.max_entries < 0:
            raise invalid("max_entries must not be negative")
        token = request.starting_token
        if request.snapshot_id:
            if token:
                raise Abort(grpc.StatusCode.ABORTED, f"starting_token {token!r} is not one we handed out")
            return pb.ListSnapshotsResponse(entries=[pb.ListSnapshotsResponse.Entry(snapshot=self.snapshot_msg(s))
                                                     for s in await self._snapshot_by_id(request)])
        try:
            page = await self.meta.get("/snapshots", limit=min(request.max_entries or 1000, 1000),
                                       start_after=token or None, volume=request.source_volume_id or None)
        except errors.NotFound:
            return pb.ListSnapshotsResponse()       # no such source volume: no snapshots
        except errors.InvalidArgument as e:
            if token:
                raise Abort(grpc.StatusCode.ABORTED,
                            f"starting_token {token!r:.80} is not one we handed out: {e.message}") from None
            raise
        return pb.ListSnapshotsResponse(
            entries=[pb.ListSnapshotsResponse.Entry(snapshot=self.snapshot_msg(s)) for s in page["snapshots"]],
            next_token=page.get("next") or "")

    async def _snapshot_by_id(self, request: pb.ListSnapshotsRequest) -> list[dict[str, Any]]:
        try:
            s = await self.meta.get(f"/snapshots/{seg(request.snapshot_id)}")
        except errors.NotFound:
            return []
        if s["snapshot_id"] != request.snapshot_id:
            return []                   # the meta also resolves "volume@name": not an id we gave
        return [s] if not request.source_volume_id or s["volume_id"] == request.source_volume_id else []
