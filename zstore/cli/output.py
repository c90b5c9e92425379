"""Rendering of API records for people: aligned tables and key/value blocks.

Machine consumers use ``--json``; everything here is for eyes, so values are
shortened (sizes as ``1Gi``, times as local ``YYYY-MM-DD HH:MM:SS``) and empty
values shown as ``-`` so columns never collapse.
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterable, Mapping, Sequence

from zstore.units import format_size


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False)


def cell(value: Any) -> str:
    if value is None or value == "" or value == [] or value == {}:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in sorted(value.items()))
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def size(value: Any) -> str:
    return format_size(int(value)) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def when(ts: Any) -> str:
    if not isinstance(ts, (int, float)) or isinstance(ts, bool) or ts <= 0:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Columns padded to their widest cell, two spaces apart; no trailing blanks."""
    body = [[cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in body:
        for i, v in enumerate(row):
            widths[i] = max(widths[i], len(v))
    lines = []
    for row in [list(headers), *body]:
        lines.append("  ".join(v.ljust(widths[i]) for i, v in enumerate(row)).rstrip())
    return "\n".join(lines)


def fields(pairs: Sequence[tuple[str, Any]]) -> str:
    """``key  value`` lines with the values aligned."""
    width = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{k.ljust(width)}  {cell(v)}".rstrip() for k, v in pairs)


# -- one renderer per record kind ------------------------------------------------

def cluster_status(c: Mapping[str, Any]) -> str:
    leader = c.get("leader") or {}
    metas = c.get("metas") or []
    etcd = c.get("etcd") or {}
    chunks = c.get("chunks") or {}
    cap = c.get("capacity") or {}
    lead = (f"{leader.get('meta_id')} at {leader.get('url')} (epoch {leader.get('epoch')}, "
            f"since {when(leader.get('since'))})") if leader else "none elected"
    vip = c.get("vip") or {}
    portal = (f"{vip.get('portal')} held by {vip.get('holder')} (epoch {vip.get('epoch')}, "
              f"since {when(vip.get('since'))})") if vip else "not held (no redirector serves it)"
    pairs: list[tuple[str, Any]] = [
        ("cluster", f"{c.get('name', '-')} ({c.get('cluster_id', '-')})"),
        ("leader", lead),
        ("iSCSI VIP", portal),
        ("meta servers", ", ".join(f"{m.get('meta_id')}{' (leader)' if m.get('leader') else ''}"
                                   for m in metas) or "-"),
        ("etcd", f"{'ok' if etcd.get('ok') else 'UNREACHABLE'} ({cell(etcd.get('endpoints'))})"),
        ("chunk servers", f"{chunks.get('total', 0)} total, {chunks.get('up', 0)} up, "
                          f"{chunks.get('down', 0)} down, {chunks.get('draining', 0)} draining"),
        ("capacity", f"{size(cap.get('total', 0))} total, {size(cap.get('used', 0))} used"
                     + (f", {size(cap['free'])} free" if "free" in cap else "")
                     + (f", {size(cap['provisioned'])} provisioned" if "provisioned" in cap else "")),
        ("recovery", recovery_summary(c.get("recovery"))),
        ("volumes", c.get("volumes", 0)),
        ("snapshots", c.get("snapshots", 0)),
        ("targets", c.get("targets", 0)),
        ("auth failures", c.get("auth_failures", 0)),
        ("answered by", c.get("answered_by")),
    ]
    text = fields(pairs)
    tasks = (c.get("recovery") or {}).get("tasks") or []
    if tasks:
        text += "\n\nrecovery tasks:\n" + task_table(tasks)
    return text


def percent(done: Any, total: Any) -> str:
    if not isinstance(done, int) or not isinstance(total, int) or total <= 0:
        return "-"
    return f"{min(100.0, 100.0 * done / total):.0f}%"


def recovery_summary(r: Mapping[str, Any] | None) -> str:
    if not r:
        return "-"
    degraded, tasks = r.get("degraded_extents", 0), r.get("tasks") or []
    # A server down within the grace is still listed: its extents count here, not above.
    on_down = max(0, r.get("degraded_live_extents", degraded) - degraded)
    unavailable = r.get("unavailable_extents", 0)
    if not degraded and not tasks and not on_down and not unavailable:
        return "all extents fully replicated"
    text = (f"{degraded} degraded extent(s), {len(tasks)} recovery task(s), "
            f"{size(r.get('bytes_done', 0))} of {size(r.get('bytes_total', 0))} copied "
            f"({percent(r.get('bytes_done'), r.get('bytes_total'))})")
    if on_down:
        text += f"; {on_down} more with a replica on a down server"
    if unavailable:
        text += f"; {unavailable} UNAVAILABLE (no in-sync replica up)"
    return text


def task_table(tasks: Sequence[Mapping[str, Any]]) -> str:
    return table(["VOLUME", "EXTENT", "KIND", "TARGET", "EXECUTOR", "STATE", "PROGRESS", "ERROR"],
                 [[t.get("volume") or t.get("volume_id"), t.get("index"), t.get("kind"), t.get("target"),
                   t.get("executor"), t.get("state"),
                   f"{percent(t.get('done_bytes'), t.get('total_bytes'))} of {size(t.get('total_bytes'))}",
                   t.get("error")] for t in tasks])


def chunk_detail(c: Mapping[str, Any]) -> str:
    head = fields([
        ("id", c.get("chunk_id")),
        ("hostname", c.get("hostname")),
        ("address", f"{c.get('address')}:{c.get('data_port')}" if c.get("data_port") else c.get("address")),
        ("portal", c.get("portal")),
        ("status", c.get("status")),
        ("state", c.get("state")),
        ("down since", when(c.get("down_since"))),
        ("labels", c.get("labels")),
        ("capacity", f"{size(c.get('capacity'))} total, {size(c.get('used'))} used"
                     + (f", {size(c['free'])} free" if "free" in c else "")),
        ("sessions", _session_count(c)),
    ])
    disks = c.get("disks") or []
    rows = [[d.get("path"), d.get("state", "ok"), size(d.get("capacity")), size(d.get("used")),
             _disk_free(d), size(d.get("zstore_used"))] for d in disks]
    return f"{head}\n\ndisks:\n" + (table(["PATH", "STATE", "CAPACITY", "USED", "FREE", "ZSTORE"], rows)
                                      if rows else "(none reported)")


def _disk_free(d: Mapping[str, Any]) -> str:
    """The disk's own ``free`` (at most what its filesystem has available; disks sharing a
    filesystem each show all of it), or capacity - used from a server without the field."""
    if isinstance(d.get("free"), int):
        return size(max(d["free"], 0))
    if isinstance(d.get("capacity"), int):
        return size(max(int(d["capacity"]) - int(d.get("used", 0)), 0))
    return "-"


def chunk_table(chunks: Sequence[Mapping[str, Any]]) -> str:
    return table(
        ["ID", "HOSTNAME", "ADDRESS", "PORTAL", "STATUS", "STATE", "SESSIONS", "CAPACITY", "USED",
         "LABELS"],
        [[c.get("chunk_id"), c.get("hostname"),
          f"{c.get('address')}:{c.get('data_port')}" if c.get("data_port") else c.get("address"),
          c.get("portal"), c.get("status"), c.get("state"), _session_count(c), size(c.get("capacity")),
          size(c.get("used")), c.get("labels")] for c in chunks])


def _session_count(chunk: Mapping[str, Any]) -> str:
    """Normal (I/O) sessions; a down server's last list is stale, so it shows none."""
    if chunk.get("status") != "up":
        return "-"
    return str(sum(s.get("type") != "discovery" for s in chunk.get("sessions") or []))


def volume_table(volumes: Sequence[Mapping[str, Any]]) -> str:
    return table(
        ["NAME", "SIZE", "REPLICAS", "PROVISIONING", "STATE", "TARGET", "LUN", "ACL", "ID"],
        [[v.get("name"), size(v.get("size")), v.get("replicas"),
          "thin" if v.get("thin", True) else "thick", v.get("state"),
          f"t{v['target_index']}" if isinstance(v.get("target_index"), int) else None,
          v.get("lun"), len(v.get("acl") or []), v.get("volume_id")] for v in volumes])


def volume_detail(v: Mapping[str, Any]) -> str:
    acl = v.get("acl") or []
    head = fields([
        ("name", v.get("name")),
        ("id", v.get("volume_id")),
        ("size", f"{size(v.get('size'))} ({v.get('size')} bytes)"),
        ("replicas", v.get("replicas")),
        ("provisioning", "thin" if v.get("thin", True) else "thick"),
        ("block size", v.get("block_size")),
        ("state", v.get("state")),
        ("created", when(v.get("created"))),
        ("source snapshot", v.get("source_snapshot")),
        ("target", v.get("target_iqn")),
        ("LUN", v.get("lun")),
        ("WWN", v.get("wwn")),
        ("ACL", ", ".join(str(a) for a in acl) if acl else "none (the LUN is visible to no initiator)"),
        *_extent_pairs(v),
    ])
    placement = v.get("placement") or []
    reps = table(["CHUNK", "HOSTNAME", "ADDRESS", "STATUS", "LABELS"],
                 [[p.get("chunk_id"), p.get("hostname"), p.get("address"), p.get("status"),
                   p.get("labels")] for p in placement]) if placement else "(no replicas placed)"
    text = f"{head}\n\nreplicas:\n{reps}"
    tasks = (v.get("recovery") or {}).get("tasks") or []
    if tasks:
        text += "\n\nrecovery:\n" + task_table(tasks)
    return text


def _extent_pairs(v: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Storage state, shown by `volume show` (the single-volume answer carries it)."""
    ext, rec = v.get("extents"), v.get("recovery") or {}
    if not isinstance(ext, Mapping):
        return []
    pairs: list[tuple[str, Any]] = [
        ("extents", f"{ext.get('allocated', 0)} of {ext.get('total', 0)} allocated, "
                    f"{ext.get('degraded', 0)} degraded")]
    if rec.get("tasks"):
        pairs.append(("recovery", f"{len(rec['tasks'])} task(s), {size(rec.get('bytes_done', 0))} of "
                                  f"{size(rec.get('bytes_total', 0))} copied "
                                  f"({percent(rec.get('bytes_done'), rec.get('bytes_total'))})"))
    return pairs


def _snapshot_export(e: Any) -> str | None:
    """``TARGET LUN n (k initiators)`` for an exported snapshot, else None."""
    if not isinstance(e, Mapping):
        return None
    return f"{e.get('target_iqn')} LUN {e.get('lun')} ({len(e.get('acl') or [])} initiator(s))"


def snapshot_table(snaps: Sequence[Mapping[str, Any]]) -> str:
    return table(["VOLUME", "NAME", "SIZE", "STATE", "CREATED", "ID", "EXPORT"],
                 [[s.get("volume"), s.get("name"), size(s.get("size")), s.get("state"),
                   when(s.get("created")), s.get("snapshot_id"), _snapshot_export(s.get("export"))]
                  for s in snaps])


def _lun_volumes(vols: Any) -> list[str]:
    """Target volumes as ``LUN:NAME``; docs/api.md lists bare names, the server ``{lun, volume}``."""
    out = []
    for v in vols or []:
        if isinstance(v, Mapping):
            out.append(f"{v.get('lun')}:{v.get('volume') or '(deleted)'}")
        else:
            out.append(str(v))
    return out


def target_table(targets: Sequence[Mapping[str, Any]]) -> str:
    return table(["INDEX", "IQN", "LUNS", "VOLUMES"],
                 [[t.get("index"), t.get("iqn"), t.get("luns"), _lun_volumes(t.get("volumes"))]
                  for t in targets])


def acl_table(entries: Sequence[Mapping[str, Any]]) -> str:
    return table(["INITIATOR", "ACCESS", "ADDED"],
                 [[e.get("initiator"), "read-only" if e.get("readonly") else "read-write",
                   when(e.get("added"))] for e in entries])


def chap_table(entries: Sequence[Mapping[str, Any]]) -> str:
    """Public fields only: the API never returns secrets and neither do we."""
    return table(["TARGET", "INITIATOR", "USER", "MUTUAL USER", "CHANGED"],
                 [[e.get("target"), e.get("initiator"), e.get("user"),
                   e.get("mutual_user") if e.get("mutual") or e.get("mutual_user") else None,
                   when(e.get("changed"))] for e in entries])
