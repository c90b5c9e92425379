"""Snapshots exported read-only as LUNs.

A snapshot's export is a LUN slot like a volume's: ``luns/{t}/{lun}`` holds a
``LunMapping`` naming the snapshot's volume, ``snapshot_id`` and
``readonly=True``, and ``snapshots/lun/{snapshot id}`` points at that slot, in
the same transaction. The pointer is what makes exporting idempotent under
concurrency (its absence is compared) and lets unexport, snapshot delete and
volume delete find the slot with one read. Chunk servers serve the LUN as the
volume's view at the snapshot's ``seq`` (docs/storage.md) with the snapshot's
own WWN (``naming.snapshot_wwn``).

Masking works as for volumes: nobody sees the LUN until an initiator is put on
its ACL, ``acl/{snapshot id}/{initiator}`` (ids are unique uuids, so the ACL
space is shared with volumes without collisions). Unexporting removes the slot,
the pointer, the ACL and the LU's persistent-reservation state together (the LU is
gone: a later export starts without the old holder's reservation).

Lifetime: a snapshot with an export is not deleted unless forced (which
unexports it in the same transaction); deleting its volume unexports its
snapshots (refused without force while initiators are on their ACLs); the
garbage collector drops any export whose snapshot or volume is gone.
"""

from __future__ import annotations

import logging
from typing import Any

from zstore import naming
from zstore.errors import Conflict
from zstore.records import AclEntry, LunMapping, Snapshot, Target, Volume

from . import volumes
from .context import Ctx

log = logging.getLogger(__name__)


def _slot_text(t: int, lun: int) -> str:
    return f"{t:04d}/{lun:03d}"


def _parse_slot(raw: bytes) -> tuple[int, int] | None:
    try:
        t, lun = raw.decode().split("/")
        return int(t), int(lun)
    except (ValueError, UnicodeDecodeError):
        return None


async def export_state(ctx: Ctx, sid: str) -> tuple[LunMapping | None, int]:
    """(the snapshot's LUN mapping or None, mod revision of its pointer; 0 if absent)."""
    got = await ctx.etcd.get(ctx.keys.snapshot_lun(sid))
    if got is None:
        return None, 0
    slot = _parse_slot(got.value)
    m = None
    if slot is not None:
        m, _ = await ctx.get(ctx.keys.lun(*slot), LunMapping)
        if m is not None and m.snapshot_id != sid:
            m = None
    return m, got.mod_revision


def reservation_ops(ctx: Ctx, snap: Snapshot | None) -> list:
    """Operations deleting the persistent-reservation state of snapshot ``snap``'s LU: its
    record and the chunk servers' acks of it. Chunk servers key a snapshot LUN's reservations
    by (volume id, the snapshot's seq); left behind, the next export (to another host, say)
    loaded the old holder's reservation and answered RESERVATION CONFLICT. Nothing for a
    snapshot without a seq yet: view 0 is the volume's own, which stays."""
    if snap is None or snap.seq <= 0:
        return []
    return [ctx.delete(ctx.keys.reservation(snap.volume_id, snap.seq)),
            ctx.delete(ctx.keys.reservation_acks(snap.volume_id, snap.seq), prefix=True)]


def drop_ops(ctx: Ctx, sid: str, mapping: LunMapping | None, snap: Snapshot | None = None) -> list:
    """Operations that unexport snapshot ``sid``: its slot (if it is ours), pointer and ACL,
    and (``snap`` given) its LU's reservation state."""
    ops = [ctx.delete(ctx.keys.snapshot_lun(sid)), ctx.delete(ctx.keys.volume_acl(sid), prefix=True)]
    if mapping is not None:
        ops.append(ctx.delete(ctx.keys.lun(mapping.target_index, mapping.lun)))
    return ops + reservation_ops(ctx, snap)


def pointer_unchanged(ctx: Ctx, sid: str, rev: int):
    """Compare: the snapshot's export pointer is as read (absent when ``rev`` is 0)."""
    key = ctx.keys.snapshot_lun(sid)
    return ctx.absent(key) if not rev else ctx.unchanged(key, rev)


async def export_acl(ctx: Ctx, sid: str) -> list[AclEntry]:
    entries = [e for _, e in await ctx.list(ctx.keys.volume_acl(sid), AclEntry)]
    return sorted(entries, key=lambda e: e.initiator)


async def target_iqn_at(ctx: Ctx, index: int) -> str:
    t, _ = await ctx.get(ctx.keys.target(index), Target)
    if t is None:
        return naming.target_iqn((await ctx.cluster()).cluster_id, index)
    return t.iqn


async def export_view(ctx: Ctx, snap: Snapshot, m: LunMapping, vol_name: str | None = None) -> dict[str, Any]:
    if vol_name is None:
        vol, _ = await ctx.get(ctx.keys.volume(snap.volume_id), Volume)
        vol_name = vol.name if vol and vol.state != "deleted" else None
    return {"snapshot_id": snap.snapshot_id, "snapshot": snap.name, "volume_id": snap.volume_id,
            "volume": vol_name, "target_index": m.target_index,
            "target_iqn": await target_iqn_at(ctx, m.target_index), "lun": m.lun,
            "wwn": naming.snapshot_wwn(snap.snapshot_id), "readonly": True,
            "acl": [e.initiator for e in await export_acl(ctx, snap.snapshot_id)]}


async def export_snapshot(ctx: Ctx, ref: str) -> tuple[dict[str, Any], bool]:
    """(export view, created). Idempotent: an existing export is returned as it is."""
    for attempt in range(volumes.MAX_RETRIES):
        snap = await volumes.resolve_snapshot(ctx, ref)
        sid = snap.snapshot_id
        skey = ctx.keys.snapshot(sid)
        snap, srev = await ctx.get(skey, Snapshot)
        if snap is None or snap.state == "deleted":
            continue                                   # deleted meanwhile: resolve says so
        if snap.state != "ready" or not snap.seq:
            raise Conflict(f"snapshot {snap.name!r} is still being created",
                           hint="retry once `zstore snapshot list` shows it ready", retry=True)
        vol, _ = await ctx.get(ctx.keys.volume(snap.volume_id), Volume)
        if vol is None or vol.state == "deleted":
            raise Conflict(f"snapshot {snap.name!r} belongs to a deleted volume and cannot be exported",
                           hint="clone it into a new volume (`zstore volume clone`) and export that")
        guard = await volumes.delete_guard(ctx, vol)
        if guard is None:
            continue                                   # deleted meanwhile: the next read says so
        m, prev = await export_state(ctx, sid)
        if m is not None:
            return await export_view(ctx, snap, m, vol.name), False
        slot = await volumes._free_lun_slot(ctx)
        t, lun = slot.target_index, slot.lun
        m = LunMapping(target_index=t, lun=lun, volume_id=vol.volume_id, readonly=True, snapshot_id=sid)
        compare, ops = await volumes.slot_txn(ctx, m, slot)
        # The volume's exports guard (its name key) is compared and put back unchanged so its
        # revision moves: a volume delete that read its snapshots' exports before this one
        # compares it (it then looks again and takes this export along, or refuses it an ACL'd
        # one without force), and a delete that committed first (the key is gone) fails this.
        # Not the volume record (8df3435 put that back): the coordinator's snapshot commit
        # compares it, and export churn used up its attempts.
        gkey, grev = guard
        compare += [pointer_unchanged(ctx, sid, prev), ctx.unchanged(skey, srev), ctx.unchanged(gkey, grev)]
        ops.append(ctx.put(ctx.keys.snapshot_lun(sid), _slot_text(t, lun)))   # replaces a dangling one
        ops.append(ctx.put(gkey, vol.volume_id))
        if await ctx.txn(compare, ops):
            log.info("snapshot %s@%s (%s) exported read-only as target %d lun %d",
                     vol.name, snap.name, sid, t, lun)
            return await export_view(ctx, snap, m, vol.name), True
        await volumes.slot_contention_pause(attempt)
    raise Conflict(f"could not export snapshot {ref!r}: too much concurrent change", hint="retry", retry=True)


async def unexport_snapshot(ctx: Ctx, ref: str) -> tuple[Snapshot, bool]:
    """(snapshot, whether an export was removed). Idempotent: not exported is not an error."""
    for _ in range(volumes.MAX_RETRIES):
        snap = await volumes.resolve_snapshot(ctx, ref)
        m, rev = await export_state(ctx, snap.snapshot_id)
        if not rev:
            return snap, False
        if await ctx.txn([pointer_unchanged(ctx, snap.snapshot_id, rev)], drop_ops(ctx, snap.snapshot_id, m, snap)):
            log.info("snapshot %s (%s) unexported%s", snap.name, snap.snapshot_id,
                     f" (was target {m.target_index} lun {m.lun})" if m else "")
            return snap, True
    raise Conflict(f"could not unexport snapshot {ref!r}: too much concurrent change", hint="retry", retry=True)


async def exported_slots(ctx: Ctx) -> dict[str, tuple[int, int]]:
    """snapshot id -> (target index, lun) of every snapshot export (one range read)."""
    out = {}
    base = ctx.keys.snapshot_luns()
    for key, value in await ctx.list_raw(base):
        slot = _parse_slot(value)
        if slot is not None:
            out[key[len(base):].decode()] = slot
    return out


async def collect_orphans(ctx: Ctx) -> bool:
    """Drop exports whose snapshot or volume is gone or deleted (the backstop after crashes
    and races with deletes). True if anything was dropped.

    Each export's snapshot and volume are read after its pointer, and compared unchanged
    in the drop: a listing taken before would not show a snapshot taken and exported since,
    and its fresh export was dropped as an orphan."""
    changed = False
    for sid in await exported_slots(ctx):
        m, rev = await export_state(ctx, sid)
        if not rev:
            continue
        skey = ctx.keys.snapshot(sid)
        snap, srev = await ctx.get(skey, Snapshot)
        compare = [pointer_unchanged(ctx, sid, rev), ctx.absent(skey) if snap is None else ctx.unchanged(skey, srev)]
        vol = None
        if snap is not None:
            vkey = ctx.keys.volume(snap.volume_id)
            vol, vrev = await ctx.get(vkey, Volume)
            compare.append(ctx.absent(vkey) if vol is None else ctx.unchanged(vkey, vrev))
        if snap is not None and snap.state != "deleted" and vol is not None and vol.state != "deleted":
            continue
        if await ctx.txn(compare, drop_ops(ctx, sid, m, snap)):
            log.info("dropped the export of snapshot %s: its %s is gone", sid,
                     "snapshot" if snap is None or snap.state == "deleted" else "volume")
            changed = True
    return changed
