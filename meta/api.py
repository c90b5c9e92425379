"""HTTP handlers of the meta API v1 (docs/api.md): JSON in, JSON out.

Handlers only translate between HTTP and the operations in chunks/volumes/
exports; authentication, forwarding to the leader and error mapping are
middlewares in server.py.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from zstore.errors import InvalidArgument
from zstore.records import RecordError, Snapshot, VipRecord, Volume

from . import chunks, exports, extents, recovery, snapshot_exports, volops, volumes
from .context import Ctx

routes = web.RouteTableDef()
PREFIX = "/api/v1"


def ctx_of(request: web.Request) -> Ctx:
    return request.app["ctx"]


async def body_of(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        data = await request.json()
    except (ValueError, RecursionError, LookupError):
        # ValueError: not JSON, not UTF-8 or an integer of over 4300 digits; RecursionError:
        # nested too deeply; LookupError: an unknown charset in the Content-Type.
        raise InvalidArgument("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidArgument("request body must be a JSON object")
    return data


def flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").lower() in ("1", "true", "yes")


def ok(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


async def volume_view(ctx: Ctx, vol: Volume, views: list[chunks.ChunkView] | None = None) -> dict[str, Any]:
    views = views if views is not None else await chunks.list_chunks(ctx)
    by_id = {v.chunk_id: v for v in views}
    d = vol.to_dict()
    d.pop("request_name", None)
    d["target_iqn"] = await exports.target_iqn_of(ctx, vol)
    d["placement"] = []
    for cid in vol.placement:
        v = by_id.get(cid)
        d["placement"].append({"chunk_id": cid, "hostname": v.info.hostname if v and v.info else "",
                               "address": v.info.address if v and v.info else "",
                               "portal": v.info.portal if v and v.info else "",
                               "labels": v.info.labels if v and v.info else {},
                               "status": ("up" if v.up else "down") if v else "removed"})
    d["acl"] = [e.initiator for e in await volumes.acl_entries(ctx, vol.volume_id)]
    return d


async def volume_names(ctx: Ctx, vids: Any) -> dict[str, str | None]:
    """volume id -> its name (None: deleted), one read per distinct volume."""
    out: dict[str, str | None] = {}
    for vid in dict.fromkeys(vids):
        vol, _ = await ctx.get(ctx.keys.volume(vid), Volume)
        out[vid] = vol.name if vol and vol.state != "deleted" else None
    return out


async def snapshot_view(ctx: Ctx, snap: Snapshot, slots: dict[str, tuple[int, int]] | None = None,
                        names: dict[str, str | None] | None = None) -> dict[str, Any]:
    """The record, its volume's name and its export (null, or target, LUN, WWN and ACL).
    ``slots`` (snapshot_exports.exported_slots) and ``names`` (volume_names) save reads
    per snapshot in listings."""
    d = snap.to_dict()
    names = names if names is not None else await volume_names(ctx, [snap.volume_id])
    d["volume"] = names[snap.volume_id]
    d["export"] = None
    if slots is None or snap.snapshot_id in slots:
        m, _ = await snapshot_exports.export_state(ctx, snap.snapshot_id)
        if m is not None:
            d["export"] = await snapshot_exports.export_view(ctx, snap, m, d["volume"])
    return d


# --- cluster -------------------------------------------------------------

@routes.get(PREFIX + "/health")
async def health(request: web.Request) -> web.Response:
    el = request.app["election"]
    return ok({"ok": True, "meta_id": el.meta_id, "leader": el.is_leader})


def vip_view(raw: bytes | None) -> dict[str, Any] | None:
    """Where initiators log in and which redirector answers there (null: nobody holds the VIP)."""
    if raw is None:
        return None
    try:
        rec = VipRecord.decode(raw)
    except RecordError:
        return None
    host = f"[{rec.vip}]" if ":" in rec.vip else rec.vip
    return {"portal": f"{host}:{rec.port}", "holder": rec.redirector_id, "epoch": rec.epoch,
            "since": rec.since, "interface": rec.interface}


@routes.get(PREFIX + "/cluster")
@routes.get(PREFIX + "/cluster/status")
async def cluster_status(request: web.Request) -> web.Response:
    ctx, el = ctx_of(request), request.app["election"]
    info = await ctx.cluster()
    leader = await el.current()
    members = await ctx.list_raw(ctx.keys.meta_members())
    from zstore.records import MetaMember
    metas = [MetaMember.decode(v) for _, v in members]
    views = await chunks.list_chunks(ctx)
    vols = [v for _, v in await ctx.list(ctx.keys.volumes(), Volume) if v.state != "deleted"]
    snaps = await volumes.list_snapshots(ctx)
    targets = await ctx.list_raw(ctx.keys.targets(), keys_only=True)
    up = [v for v in views if v.up]
    total, used, free = chunks.space([d for v in up for d in v.disks])   # each filesystem once
    return ok({
        "cluster_id": info.cluster_id, "name": info.name,
        "etcd": {"endpoints": request.app["config"].etcd.endpoints, "ok": True},
        "leader": leader.to_dict() if leader else None,
        "vip": vip_view(await ctx.get_raw(ctx.keys.vip())),
        "metas": [{"meta_id": m.meta_id, "url": m.url, "leader": bool(leader and leader.meta_id == m.meta_id)}
                  for m in sorted(metas, key=lambda m: m.meta_id)],
        "chunks": {"total": len(views), "up": len(up), "down": len(views) - len(up),
                   "draining": sum(v.draining for v in views)},
        "capacity": {"total": total, "used": used, "free": free,
                     "provisioned": sum(v.size * v.replicas for v in vols)},
        "recovery": await recovery.cluster_status(ctx),
        "volumes": len(vols), "snapshots": len(snaps), "targets": len(targets),
        "auth_failures": request.app["auth_failures"][0],
        "answered_by": el.meta_id,
    })


@routes.get(PREFIX + "/metrics")
async def metrics(request: web.Request) -> web.Response:
    el = request.app["election"]
    lines = [
        "# HELP zstore_meta_auth_failures_total API calls refused for a missing or wrong token.",
        "# TYPE zstore_meta_auth_failures_total counter",
        f"zstore_meta_auth_failures_total {request.app['auth_failures'][0]}",
        "# HELP zstore_meta_is_leader 1 if this meta server is the leader.",
        "# TYPE zstore_meta_is_leader gauge",
        f"zstore_meta_is_leader {int(el.is_leader)}",
        "# HELP zstore_meta_forwarded_total Writes forwarded to the leader.",
        "# TYPE zstore_meta_forwarded_total counter",
        f"zstore_meta_forwarded_total {request.app['forwarded'][0]}",
    ]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


@routes.get(PREFIX + "/meta/leader")
async def leader(request: web.Request) -> web.Response:
    rec = await request.app["election"].current()
    if rec is None:
        from zstore.errors import Unavailable
        raise Unavailable("no meta leader is elected", hint="retry in a few seconds", maybe_applied=False)
    return ok(rec.to_dict())


# --- chunk servers ---------------------------------------------------------

@routes.get(PREFIX + "/chunks")
async def chunk_list(request: web.Request) -> web.Response:
    return ok({"chunks": [v.to_dict() for v in await chunks.list_chunks(ctx_of(request))]})


@routes.get(PREFIX + "/chunks/{id}")
async def chunk_get(request: web.Request) -> web.Response:
    return ok((await chunks.get_chunk(ctx_of(request), request.match_info["id"])).to_dict())


@routes.post(PREFIX + "/chunks/{id}/drain")
async def chunk_drain(request: web.Request) -> web.Response:
    return ok((await chunks.set_admin_state(ctx_of(request), request.match_info["id"], "draining")).to_dict())


@routes.post(PREFIX + "/chunks/{id}/undrain")
async def chunk_undrain(request: web.Request) -> web.Response:
    return ok((await chunks.set_admin_state(ctx_of(request), request.match_info["id"], "active")).to_dict())


@routes.delete(PREFIX + "/chunks/{id}")
async def chunk_remove(request: web.Request) -> web.Response:
    removed = await chunks.remove_chunk(ctx_of(request), request.match_info["id"], flag(request, "force"))
    return ok({"removed": removed})


# --- volumes -----------------------------------------------------------------

@routes.post(PREFIX + "/volumes")
async def volume_create(request: web.Request) -> web.Response:
    ctx, b = ctx_of(request), await body_of(request)
    source = b.get("source_snapshot")
    if source is not None and not isinstance(source, str):
        raise InvalidArgument(f"invalid source_snapshot {source!r:.60}: VOLUME@SNAP or a snapshot id")
    vol, created = await volumes.create_volume(
        ctx, b.get("name", ""), b.get("size"), b.get("replicas", 3), b.get("thin", True),
        source, b.get("min_size"), b.get("max_size"))
    return ok(await volume_view(ctx, vol), 201 if created else 200)


def limit_of(query: Any) -> int:
    try:
        return int(query.get("limit", "100"))
    except ValueError:
        raise InvalidArgument(f"invalid limit {query.get('limit')!r:.40}: must be a number") from None


@routes.get(PREFIX + "/volumes")
async def volume_list(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    vols, nxt = await volumes.list_volumes(ctx, limit_of(request.query), request.query.get("start_after") or None)
    views = await chunks.list_chunks(ctx)
    return ok({"volumes": [await volume_view(ctx, v, views) for v in vols], "next": nxt})


@routes.get(PREFIX + "/volumes/{ref}")
async def volume_get(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    vol, _ = await volumes.find_volume(ctx, request.match_info["ref"])
    return ok({**await volume_view(ctx, vol), **await recovery.volume_status(ctx, vol)})


@routes.post(PREFIX + "/volumes/{ref}/resize")
async def volume_resize(request: web.Request) -> web.Response:
    ctx, b = ctx_of(request), await body_of(request)
    if "size" not in b:
        raise InvalidArgument("a new size is required, e.g. {\"size\": \"20Gi\"}")
    vol = await volumes.resize_volume(ctx, request.match_info["ref"], b["size"])
    return ok(await volume_view(ctx, vol))


@routes.delete(PREFIX + "/volumes/{ref}")
async def volume_delete(request: web.Request) -> web.Response:
    vol = await volumes.delete_volume_record(ctx_of(request), request.match_info["ref"], flag(request, "force"))
    return ok({"deleted": vol.volume_id, "name": vol.name})


# --- snapshots ---------------------------------------------------------------

@routes.post(PREFIX + "/volumes/{ref}/snapshots")
async def snapshot_create(request: web.Request) -> web.Response:
    ctx, b = ctx_of(request), await body_of(request)
    snap, created = await volops.create_snapshot(ctx, request.match_info["ref"], b.get("name", ""),
                                                 unique=b.get("unique", False))
    return ok(await snapshot_view(ctx, snap), 201 if created else 200)


@routes.get(PREFIX + "/snapshots")
async def snapshot_list(request: web.Request) -> web.Response:
    """A page (``limit``, ``start_after``: the previous page's ``next``), of one ``volume``'s
    or all; or a lookup, a few reads however many snapshots there are: ``name`` (with
    ``volume``) by the per-volume name, ``unique_name`` by the name taken across volumes."""
    ctx, q = ctx_of(request), request.query
    snaps, nxt = await _snapshots_asked(ctx, q)
    slots = await snapshot_exports.exported_slots(ctx) if len(snaps) > 1 else None
    names = await volume_names(ctx, (s.volume_id for s in snaps))
    return ok({"snapshots": [await snapshot_view(ctx, s, slots, names) for s in snaps], "next": nxt})


async def _snapshots_asked(ctx: Ctx, q: Any) -> tuple[list[Snapshot], str | None]:
    volume = q.get("volume") or None
    if "unique_name" in q:
        found = await volumes.unique_name_holder(ctx, q["unique_name"])
    elif "name" in q:
        if not volume:
            raise InvalidArgument("name needs volume: snapshot names are per volume",
                                  hint="or look up a name taken across volumes with unique_name")
        found = await volumes.snapshot_named(ctx, volume, q["name"])
    else:
        return await volumes.snapshot_page(ctx, limit_of(q), q.get("start_after") or None, volume)
    return ([found] if found else []), None


@routes.get(PREFIX + "/snapshots/{id}")
async def snapshot_get(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    return ok(await snapshot_view(ctx, await volumes.resolve_snapshot(ctx, request.match_info["id"])))


@routes.delete(PREFIX + "/snapshots/{id}")
async def snapshot_delete_by_id(request: web.Request) -> web.Response:
    return ok({"deleted": await volumes.delete_snapshot_by_id(ctx_of(request), request.match_info["id"],
                                                              flag(request, "force"))})


@routes.delete(PREFIX + "/volumes/{ref}/snapshots/{snap}")
async def snapshot_delete(request: web.Request) -> web.Response:
    sid = await volumes.delete_snapshot(ctx_of(request), request.match_info["ref"], request.match_info["snap"],
                                        flag(request, "force"))
    return ok({"deleted": sid})


@routes.post(PREFIX + "/snapshots/{id}/export")
async def snapshot_export(request: web.Request) -> web.Response:
    view, created = await snapshot_exports.export_snapshot(ctx_of(request), request.match_info["id"])
    return ok(view, 201 if created else 200)


@routes.delete(PREFIX + "/snapshots/{id}/export")
async def snapshot_unexport(request: web.Request) -> web.Response:
    snap, removed = await snapshot_exports.unexport_snapshot(ctx_of(request), request.match_info["id"])
    return ok({"unexported": snap.snapshot_id, "removed": removed})


@routes.get(PREFIX + "/snapshots/{id}/acl")
async def snapshot_acl_list(request: web.Request) -> web.Response:
    snap, entries = await exports.list_snapshot_acl(ctx_of(request), request.match_info["id"])
    return ok({"snapshot_id": snap.snapshot_id, "initiators": [
        {"initiator": e.initiator, "readonly": True, "added": e.added} for e in entries]})


@routes.put(PREFIX + "/snapshots/{id}/acl/{iqn}")
async def snapshot_acl_add(request: web.Request) -> web.Response:
    e = await exports.add_snapshot_acl(ctx_of(request), request.match_info["id"], request.match_info["iqn"])
    return ok({"initiator": e.initiator, "readonly": True, "added": e.added})


@routes.delete(PREFIX + "/snapshots/{id}/acl/{iqn}")
async def snapshot_acl_remove(request: web.Request) -> web.Response:
    return ok({"removed": await exports.remove_snapshot_acl(ctx_of(request), request.match_info["id"],
                                                            request.match_info["iqn"])})


@routes.post(PREFIX + "/volumes/{ref}/revert")
async def volume_revert(request: web.Request) -> web.Response:
    ctx, b = ctx_of(request), await body_of(request)
    vol, snap = await volops.revert_volume(ctx, request.match_info["ref"], b.get("snapshot", ""),
                                           request_id=b.get("request_id"))
    return ok({"volume": vol.name, "volume_id": vol.volume_id, "snapshot": snap.name,
               "snapshot_id": snap.snapshot_id, "seq": snap.seq, "reverted": True})


# --- extents (the storage engine's map; used by chunk servers) ---------------------------

def query_int(request: web.Request, name: str, default: int | None) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidArgument(f"invalid {name} {raw!r}: must be a number") from None


@routes.get(PREFIX + "/volumes/{ref}/extents")
async def extent_list(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    vol, _ = await volumes.find_volume(ctx, request.match_info["ref"])
    recs, nxt = await extents.list_extents(ctx, vol.volume_id, query_int(request, "limit", 1000) or 0,
                                           query_int(request, "start_after", None))
    return ok({"volume_id": vol.volume_id, "extent_size": extents.EXTENT_SIZE,
               "extents": [r.to_dict() for r in recs], "next": nxt})


@routes.get(PREFIX + "/extents/{vid}/{index}")
async def extent_get(request: web.Request) -> web.Response:
    m = request.match_info
    rec, _ = await extents.get_extent(ctx_of(request), m["vid"], extents.check_index(m["index"]))
    return ok(rec.to_dict())


@routes.post(PREFIX + "/extents/{vid}/{index}")
async def extent_allocate(request: web.Request) -> web.Response:
    m = request.match_info
    rec, created = await extents.allocate(ctx_of(request), m["vid"], m["index"])
    return ok(rec.to_dict(), 201 if created else 200)


@routes.post(PREFIX + "/extents/{vid}/{index}/drop")
async def extent_drop(request: web.Request) -> web.Response:
    m, b = request.match_info, await body_of(request)
    rec, changed = await extents.drop(ctx_of(request), m["vid"], m["index"], b.get("chunk_id"),
                                      b.get("generation"), b.get("reason", ""))
    return ok({**rec.to_dict(), "changed": changed})


@routes.post(PREFIX + "/extents/{vid}/{index}/join")
async def extent_join(request: web.Request) -> web.Response:
    m, b = request.match_info, await body_of(request)
    rec = await extents.join(ctx_of(request), m["vid"], m["index"], b.get("chunk_id"), b.get("generation"),
                             b.get("epoch"))
    return ok(rec.to_dict())


# --- targets, ACLs, CHAP -----------------------------------------------------------

@routes.get(PREFIX + "/targets")
async def target_list(request: web.Request) -> web.Response:
    return ok({"targets": await exports.list_targets(ctx_of(request))})


@routes.get(PREFIX + "/volumes/{ref}/acl")
async def acl_list(request: web.Request) -> web.Response:
    name, entries = await exports.list_acl(ctx_of(request), request.match_info["ref"])
    return ok({"volume": name, "initiators": [
        {"initiator": e.initiator, "readonly": e.readonly, "added": e.added} for e in entries]})


@routes.put(PREFIX + "/volumes/{ref}/acl/{iqn}")
async def acl_add(request: web.Request) -> web.Response:
    b = await body_of(request)
    e = await exports.add_acl(ctx_of(request), request.match_info["ref"], request.match_info["iqn"],
                              b.get("readonly", False))
    return ok({"initiator": e.initiator, "readonly": e.readonly, "added": e.added})


@routes.delete(PREFIX + "/volumes/{ref}/acl/{iqn}")
async def acl_remove(request: web.Request) -> web.Response:
    return ok({"removed": await exports.remove_acl(ctx_of(request), request.match_info["ref"],
                                                   request.match_info["iqn"])})


@routes.get(PREFIX + "/chap")
async def chap_list(request: web.Request) -> web.Response:
    return ok({"chap": await exports.list_chap(ctx_of(request))})


@routes.put(PREFIX + "/chap")
async def chap_set(request: web.Request) -> web.Response:
    rec = await exports.set_chap(ctx_of(request), await body_of(request))
    return ok(rec.public())


@routes.delete(PREFIX + "/chap")
async def chap_clear(request: web.Request) -> web.Response:
    b = await body_of(request)
    await exports.clear_chap(ctx_of(request), b.get("target", ""), b.get("initiator", ""))
    return ok({"removed": True})
