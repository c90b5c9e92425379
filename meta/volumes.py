"""Volumes and snapshots: create (idempotent by name), resize, delete, clone.

Creation follows the journal pattern ceph-csi uses for CSI idempotency, in
one etcd transaction: the volume record, its name -> id mapping and its LUN
slot are written together only if the name and the slot are still free. Of
any number of concurrent creates of one name exactly one transaction wins;
the others re-read, find the winner and either return it (same parameters) or
fail with a conflict (different ones).

A volume with snapshots, or a snapshot with clones, is not erased when
deleted: its name is freed and it is kept as a tombstone (state ``deleted``)
until nothing references it, because clones share its data (copy-on-write).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
import uuid
from typing import Any, NamedTuple

from zstore import naming
from zstore.etcd import get_prefix_paged, prefix_end
from zstore.errors import Conflict, InsufficientResources, InvalidArgument, NotFound, Unavailable
from zstore.records import (AclEntry, ChunkAdmin, LunMapping, NewerSchemaError, RecordError, Snapshot, Target,
                            Volume, VolumeOp)
from zstore.units import SizeError, format_size, parse_size

from . import chunks as chunkmod
from . import snapshot_exports
from .context import Ctx
from .placement import place

log = logging.getLogger(__name__)

MiB = 2**20
MAX_VOLUME_SIZE = 2**50          # 1 PiB
MAX_RETRIES = 64


def snapshot_op_id(sid: str) -> str:
    """The id of a snapshot's barrier op: one per snapshot, so a retried create finds it."""
    return f"snapshot-{sid}"


def check_size(value: Any, what: str = "size") -> int:
    try:
        size = parse_size(value)
    except SizeError as e:
        raise InvalidArgument(str(e)) from None
    if size <= 0:
        raise InvalidArgument(f"invalid {what} {value!r}: must be greater than zero")
    size = -(-size // MiB) * MiB
    if size > MAX_VOLUME_SIZE:
        raise InvalidArgument(f"invalid {what} {value!r}: larger than the maximum {format_size(MAX_VOLUME_SIZE)}")
    return size


def check_replicas(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 3:
        raise InvalidArgument(f"invalid replica count {value!r}: must be 1, 2 or 3")
    return value


def _is_id(ref: str) -> bool:
    return len(ref) == 32 and all(c in "0123456789abcdef" for c in ref)


async def find_volume(ctx: Ctx, ref: str) -> tuple[Volume, int]:
    """A live volume by name or id, with its mod revision."""
    if not isinstance(ref, str) or not ref:
        raise InvalidArgument("a volume name is required")
    vid = await ctx.get_raw(ctx.keys.volume_name(ref))
    is_id = _is_id(ref)
    if vid is None and is_id:
        vid = ref.encode()
    elif vid is not None and is_id and vid.decode() != ref:
        # A name given before ids were refused as names: it must not stand for two volumes.
        other, _ = await ctx.get(ctx.keys.volume(ref), Volume)
        if other is not None and other.state != "deleted":
            raise Conflict(f"{ref!r} is ambiguous: it is the name of volume {vid.decode()} and the id "
                           f"of volume {other.name!r}",
                           hint=f"use the id {vid.decode()} for the first, the name {other.name!r} for the other")
    if vid is not None:
        vol, rev = await ctx.get(ctx.keys.volume(vid.decode()), Volume)
        if vol is not None and vol.state != "deleted":
            return vol, rev
    raise NotFound(f"volume {ref!r} not found", hint="see `zstore volume list`")


async def delete_guard(ctx: Ctx, vol: Volume) -> tuple[bytes, int] | None:
    """(key, mod revision) of the key that guards what a delete of ``vol`` reads before it
    commits: its name key. What a volume delete lists and decides on, but its compare on the
    volume record would not see, is made in a txn that compares this key and puts it back
    unchanged (its revision moves): an initiator put on the volume's ACL (``exports.add_acl``),
    a snapshot created (``volops.create_snapshot``), a snapshot exported (``export_snapshot``),
    an initiator put on such an export (``add_snapshot_acl``). The delete reads it before its listings and compares it
    (``delete_volume_record``), so it sees any of those made since; one of them that read it
    before a delete committed fails its compare (the key is gone, or names a volume made since
    under the same name). None when the key no longer names the volume (deleted meanwhile).

    Not the volume record, which those once put back unchanged: the coordinator's snapshot
    commit compares that one (8 attempts, then the snapshot fails), and export, ACL or
    snapshot-create churn on the volume used them up. The name key holds the volume id only; it is written by the
    volume's create and delete and by these puts, read by name lookups, and watched by no
    chunk server. Every volume has had one from the first release on (at the same key), so
    nothing is migrated."""
    key = ctx.keys.volume_name(vol.name)
    got = await ctx.etcd.get(key)
    if got is None or got.value.decode() != vol.volume_id:
        return None
    return key, got.mod_revision


class FreeSlot(NamedTuple):
    target_index: int
    lun: int
    target_exists: bool
    cursor_rev: int             # mod revision of the LUN cursor as read (0: absent)


def _parse_slot(raw: bytes | None) -> tuple[int, int] | None:
    try:
        t, lun = raw.decode().split("/")
        return int(t), int(lun)
    except (AttributeError, ValueError, UnicodeDecodeError):
        return None


def slot_text(t: int, lun: int) -> str:
    return f"{t:04d}/{lun:03d}"


def next_free_slot(used: set[tuple[int, int]], cursor: tuple[int, int] | None, max_targets: int,
                   luns_per_target: int) -> tuple[int, int] | None:
    """The first slot not in ``used`` at or after ``cursor`` (a (target, lun) slot; None: the
    start), in the order target 0 LUN 1..N, target 1 LUN 1..N, ..., wrapping around after the
    last target; None when every slot is taken.

    Round-robin, not the lowest free slot: a slot freed by a delete is handed out again only
    after the cursor has gone once round the whole space (4096 targets x 255 LUNs), not to the
    next create. A host that still holds the deleted LUN (a forced delete, a force-detach) does
    not find another volume behind the same target and LUN, and write into it."""
    per, total = luns_per_target, max_targets * luns_per_target
    if sum(1 for t, lun in used if 0 <= t < max_targets and 1 <= lun <= per) >= total:
        return None
    start = 0
    if cursor is not None and cursor[0] >= 0 and cursor[1] >= 1:
        start = (cursor[0] * per + cursor[1] - 1) % total
    for step in range(total):           # at most len(used) + 1 steps: the count above
        i = (start + step) % total
        slot = (i // per, i % per + 1)
        if slot not in used:
            return slot
    return None


def slot_after(t: int, lun: int, max_targets: int, luns_per_target: int) -> tuple[int, int]:
    i = (t * luns_per_target + lun) % (max_targets * luns_per_target)
    return i // luns_per_target, i % luns_per_target + 1


async def slot_contention_pause(attempt: int) -> None:
    """A short random pause after a txn taking a LUN slot lost: every such txn compares the
    one cursor, so of the creates and exports racing only one wins each round; spread apart,
    a burst of them (a CSI provisioner creating a hundred volumes) does not use up its retries."""
    await asyncio.sleep(random.uniform(0, min(0.2, 0.002 * 2 ** attempt)))


async def _free_lun_slot(ctx: Ctx) -> FreeSlot:
    """The free slot a new LUN takes: the first at or after the LUN cursor (``next_free_slot``)."""
    got = await ctx.etcd.get(ctx.keys.lun_cursor())
    cursor_rev, cursor = (0, None) if got is None else (got.mod_revision, _parse_slot(got.value))
    used = {ctx.keys.lun_key_parts(key) for key, _ in await ctx.list_raw(ctx.keys.luns(), keys_only=True)}
    existing = {int(k.decode().rsplit("/", 1)[-1]) for k, _ in
                await ctx.list_raw(ctx.keys.targets(), keys_only=True)}
    slot = next_free_slot(used, cursor, ctx.max_targets, ctx.luns_per_target)
    if slot is None:
        raise InsufficientResources(
            f"no free LUN slot: all {ctx.max_targets} targets have {ctx.luns_per_target} LUNs",
            hint="delete unused volumes")
    return FreeSlot(slot[0], slot[1], slot[0] in existing, cursor_rev)


async def slot_txn(ctx: Ctx, m: LunMapping, slot: FreeSlot) -> tuple[list, list]:
    """(compare, ops) taking the free slot ``m`` names, creating its target if it is new, and
    moving the LUN cursor past it. The cursor is compared as read: a create that read it
    before another took (and a delete freed) a slot cannot take that slot again."""
    lun_key, cursor_key = ctx.keys.lun(m.target_index, m.lun), ctx.keys.lun_cursor()
    nxt = slot_after(m.target_index, m.lun, ctx.max_targets, ctx.luns_per_target)
    compare = [ctx.absent(lun_key),
               ctx.absent(cursor_key) if not slot.cursor_rev else ctx.unchanged(cursor_key, slot.cursor_rev)]
    ops = [ctx.put(lun_key, m), ctx.put(cursor_key, slot_text(*nxt))]
    if not slot.target_exists:
        target_key = ctx.keys.target(m.target_index)
        cluster = await ctx.cluster()
        compare.append(ctx.absent(target_key))
        ops.append(ctx.put(target_key, Target(index=m.target_index,
                                              iqn=naming.target_iqn(cluster.cluster_id, m.target_index))))
    return compare, ops


def check_size_bound(value: Any, what: str) -> int | None:
    """A bound of the sizes an existing volume may have (bytes; None or 0: no bound)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"invalid {what} {value!r:.40}: a number of bytes, not negative")
    return value or None


def _same_request(vol: Volume, size: int | tuple[int | None, int | None], replicas: int, thin: bool,
                  source: str | None) -> str | None:
    """Why an existing volume does not match a create request, or None if it does. ``size``
    is the exact size asked, or a (min, max) range (either None: unbounded)."""
    if isinstance(size, tuple):
        low, high = size
        if (low is not None and vol.size < low) or (high is not None and vol.size > high):
            asked = (f"at least {low} bytes" if high is None else f"at most {high} bytes" if low is None
                     else f"{low} to {high} bytes")
            return f"size {format_size(vol.size)} (asked {asked})"
    elif vol.size != size:
        return f"size {format_size(vol.size)} (asked {format_size(size)})"
    if vol.replicas != replicas:
        return f"{vol.replicas} replicas (asked {replicas})"
    if vol.thin != thin:
        return "thin provisioning" if vol.thin else "thick provisioning"
    if vol.source_snapshot != source:
        return "another content source"
    return None


async def unique_name_release(ctx: Ctx, snap: Snapshot) -> tuple[list, list]:
    """(compare, ops) freeing the unique name (CSI's, global across volumes) ``snap`` holds,
    if it holds one, in the txn that frees its per-volume name: nothing if the key names
    another snapshot (or none)."""
    key = ctx.keys.snapshot_unique_name(snap.name)
    got = await ctx.etcd.get(key)
    if got is None or got.value.decode() != snap.snapshot_id:
        return [], []
    return [ctx.unchanged(key, got.mod_revision)], [ctx.delete(key)]


async def creating_snapshot_removal(ctx: Ctx, snap: Snapshot, srev: int) -> tuple[list, list]:
    """(compare, ops) removing ``creating`` snapshot ``snap`` read at ``srev`` with its names, so
    they can be used again: compared unchanged, so a commit of it (made ``ready`` meanwhile)
    and this removal exclude each other. For a snapshot whose op failed, or that has none."""
    skey = ctx.keys.snapshot(snap.snapshot_id)
    compare, ops = [ctx.unchanged(skey, srev)], [ctx.delete(skey)]
    name_key = ctx.keys.snapshot_name(snap.volume_id, snap.name)
    got = await ctx.etcd.get(name_key)
    if got is not None and got.value.decode() == snap.snapshot_id:
        compare.append(ctx.unchanged(name_key, got.mod_revision))
        ops.append(ctx.delete(name_key))
    ucompare, uops = await unique_name_release(ctx, snap)
    return compare + ucompare, ops + uops


async def resolve_snapshot(ctx: Ctx, ref: str) -> Snapshot:
    """``VOLUME@SNAP`` or a snapshot id."""
    if not isinstance(ref, str) or not ref:
        raise InvalidArgument(f"invalid snapshot {ref!r:.60}: VOLUME@SNAP or a snapshot id")
    if "@" in ref:
        vname, sname = ref.split("@", 1)
        vol, _ = await find_volume(ctx, vname)
        sid = await ctx.get_raw(ctx.keys.snapshot_name(vol.volume_id, sname))
        if sid is None:
            raise NotFound(f"snapshot {sname!r} of volume {vname!r} not found",
                           hint=f"see `zstore snapshot list {vname}`")
        ref = sid.decode()
    snap, _ = await ctx.get(ctx.keys.snapshot(ref), Snapshot)
    if snap is None or snap.state == "deleted":
        raise NotFound(f"snapshot {ref!r} not found", hint="see `zstore snapshot list`")
    return snap


async def _source_of_existing(ctx: Ctx, vol: Volume, ref: str) -> Snapshot | None:
    """The snapshot an existing volume was cloned from, if the create request's source
    ``ref`` names it: by id even when the snapshot was deleted since (a tombstone, kept
    for this clone), so a retried create still finds its volume; None if it names another."""
    if not vol.source_snapshot:
        return None
    if "@" in ref:
        ref = (await resolve_snapshot(ctx, ref)).snapshot_id
    if ref != vol.source_snapshot:
        return None
    snap, _ = await ctx.get(ctx.keys.snapshot(vol.source_snapshot), Snapshot)
    return snap


def _check_in_range(size: int, low: int | None, high: int | None) -> None:
    """The size of a volume about to be created (a whole number of MiB) must lie in the
    asked range (the CSI capacity range): else the request cannot be met, 400. (An
    existing volume is matched by the range alone.)"""
    if (low is not None and size < low) or (high is not None and size > high):
        asked = (f"at least {low} bytes" if high is None else f"at most {high} bytes" if low is None
                 else f"{low} to {high} bytes")
        raise InvalidArgument(f"invalid size {size} bytes (sizes are whole MiB): outside the range asked, {asked}",
                              hint="give a size, rounded up to a whole MiB, between min_size and max_size")


async def create_volume(ctx: Ctx, name: str, size: Any, replicas: Any = 3, thin: bool = True,
                        source_snapshot: str | None = None, min_size: Any = None,
                        max_size: Any = None) -> tuple[Volume, bool]:
    """(volume, created). Idempotent by name: an existing volume of that name is compared
    with the request before the source snapshot is resolved, so a retried clone create
    whose snapshot was deleted meanwhile still answers its volume. ``size`` is the size to
    create; an existing volume must have exactly that size, unless ``min_size`` or
    ``max_size`` (bytes; the CSI capacity range) is given: then any size in that range is
    the same request. Replicas, thin and the source are always compared exactly."""
    low, high = check_size_bound(min_size, "min_size"), check_size_bound(max_size, "max_size")
    ranged = min_size is not None or max_size is not None
    naming.check_name("volume", name)
    if not isinstance(thin, bool):
        raise InvalidArgument(f"invalid value for thin: {thin!r} (true or false)")
    if size is None and not source_snapshot:
        raise InvalidArgument("a size is required, e.g. 10Gi")
    if size is not None:
        size = check_size(size)
    replicas = check_replicas(replicas)
    name_key = ctx.keys.volume_name(name)

    for attempt in range(MAX_RETRIES):
        existing = await ctx.get_raw(name_key)
        if existing is not None:
            vol, _ = await ctx.get(ctx.keys.volume(existing.decode()), Volume)
            if vol is None:
                continue        # racing a delete; look again
            sid, want = vol.source_snapshot, size
            if source_snapshot:
                snap = await _source_of_existing(ctx, vol, source_snapshot)
                if snap is None:
                    sid = source_snapshot   # not the existing volume's: _same_request says so
                elif want is None:
                    want = snap.size        # no size: the snapshot's, as when it was created
            elif vol.source_snapshot:
                sid = None
            why = _same_request(vol, (low, high) if ranged else vol.size if want is None else want,
                                replicas, thin, sid)
            if why:
                raise Conflict(f"volume {name!r} already exists with {why}",
                               hint="pick another name, or delete the existing volume first")
            return vol, False
        source: Snapshot | None = None
        if source_snapshot:
            source = await resolve_snapshot(ctx, source_snapshot)
            if source.state != "ready":
                raise Conflict(f"snapshot {source.name!r} is still being created",
                               hint="retry once `zstore snapshot list` shows it ready", retry=True)
        new_size = size if size is not None else source.size
        _check_in_range(new_size, low, high)
        if source and new_size < source.size:
            raise InvalidArgument(f"a clone must be at least as large as its snapshot ({format_size(source.size)})")
        sid = source.snapshot_id if source else None
        views = await chunkmod.list_chunks(ctx)
        cands, unusable = chunkmod.candidates(views)
        placement = place(cands, replicas, need=0 if thin else new_size, unusable=unusable)
        slot = await _free_lun_slot(ctx)
        t, lun = slot.target_index, slot.lun
        vid = uuid.uuid4().hex
        vol = Volume(volume_id=vid, name=name, size=new_size, replicas=replicas, thin=thin,
                     placement=placement, target_index=t, lun=lun, wwn=naming.volume_wwn(vid),
                     source_snapshot=sid)
        compare, ops = await slot_txn(ctx, LunMapping(target_index=t, lun=lun, volume_id=vid), slot)
        compare.append(ctx.absent(name_key))
        ops += [ctx.put(ctx.keys.volume(vid), vol), ctx.put(name_key, vid)]
        if sid:
            # The snapshot is put back unchanged so its revision moves: a delete (or garbage
            # collection) that listed the volumes before this clone existed fails its compare
            # on that revision and looks again, instead of deleting the clone's parent.
            skey = ctx.keys.snapshot(sid)
            snap, srev = await ctx.get(skey, Snapshot)
            if snap is None or snap.state != "ready":
                raise NotFound(f"snapshot {source.name!r} was deleted")
            compare.append(ctx.unchanged(skey, srev))
            ops.append(ctx.put(skey, snap))
        if await ctx.txn(compare, ops):
            log.info("volume %s (%s) created: %s, %d replicas on %s, target %d lun %d",
                     name, vid, format_size(new_size), replicas, ",".join(placement), t, lun)
            return vol, True
        await slot_contention_pause(attempt)
    raise Conflict(f"could not create volume {name!r}: too much concurrent change", hint="retry", retry=True)


async def resize_volume(ctx: Ctx, ref: str, size: Any) -> Volume:
    new = check_size(size)
    for _ in range(MAX_RETRIES):
        vol, rev = await find_volume(ctx, ref)
        if new < vol.size:
            raise InvalidArgument(
                f"cannot shrink volume {vol.name!r} from {format_size(vol.size)} to {format_size(new)}",
                hint="volumes only grow; shrinking would cut off data")
        if new == vol.size:
            return vol
        old = vol.size
        vol.size = new
        if await ctx.txn([ctx.unchanged(ctx.keys.volume(vol.volume_id), rev)],
                         [ctx.put(ctx.keys.volume(vol.volume_id), vol)]):
            log.info("volume %s grown from %s to %s", vol.name, format_size(old), format_size(new))
            return vol
    raise Conflict(f"could not resize volume {ref!r}: too much concurrent change", hint="retry", retry=True)


def erase_ops(ctx: Ctx, vid: str) -> list:
    """Deleting a volume record for good also deletes its storage-engine records (same txn):
    extent map, owner, pending ops, recovery tasks, and any ACL entry left. Chunk servers
    then reclaim the data."""
    return [ctx.delete(ctx.keys.volume(vid)), ctx.delete(ctx.keys.extents(vid), prefix=True),
            ctx.delete(ctx.keys.owner(vid)), ctx.delete(ctx.keys.volops(vid), prefix=True),
            ctx.delete(ctx.keys.recovery(vid), prefix=True),
            ctx.delete(ctx.keys.volume_acl(vid), prefix=True),
            ctx.delete(ctx.keys.reservations(vid), prefix=True),
            ctx.delete(ctx.keys.reservation_acks(vid), prefix=True)]


async def acl_entries(ctx: Ctx, vid: str) -> list[AclEntry]:
    return [rec for _, rec in await ctx.list(ctx.keys.volume_acl(vid), AclEntry)]


async def delete_volume(ctx: Ctx, ref: str, force: bool = False) -> str:
    """Delete a volume by name or id; its id."""
    return (await delete_volume_record(ctx, ref, force)).volume_id


async def delete_volume_record(ctx: Ctx, ref: str, force: bool = False) -> Volume:
    """Delete a volume by name or id; the record deleted (its name and id, for the answer).

    Everything that can refuse the delete is read first: the volume's ACL, its unfinished
    reverts, its snapshots' exports and their ACLs (without force an initiator on any
    refuses). Then one transaction decides, comparing the volume record (a revert of the
    volume made since moves it) and its guard (``delete_guard``: an initiator put on the
    volume's ACL, a snapshot, an export, or an initiator put on one, made since moves it): if
    anything moved, nothing was written and the delete looks again. So a refused delete has
    changed nothing.

    Only then are the snapshots' exports dropped, each in its own transaction: none can be
    made, nor an initiator put on one, once the volume is deleted (its guard is gone), and
    the collection drops any left by a meta that died in between. No transaction grows with
    the number of snapshots or exports: one that did (~5 operations per export) went past
    etcd's 128 operations per txn (--max-txn-ops) at ~25 exported snapshots, and the volume
    could never be deleted.

    A pending or running revert of the volume refuses the delete, or with force is cancelled
    in the volume's transaction (``unfinished_reverts``)."""
    for _ in range(MAX_RETRIES):
        vol, rev = await find_volume(ctx, ref)
        # Read before the ACL, the snapshots and the exports: an entry, snapshot or export
        # made since moves it (``delete_guard``), and fails the compare below.
        guard = await delete_guard(ctx, vol)
        if guard is None:
            continue                    # deleted meanwhile: find_volume says so
        acl = await acl_entries(ctx, vol.volume_id)
        if acl and not force:
            who = ", ".join(a.initiator for a in acl[:3]) + ("..." if len(acl) > 3 else "")
            raise Conflict(f"volume {vol.name!r} is exported to {len(acl)} initiator(s): {who}",
                           hint=f"remove them with `zstore acl remove {vol.name} IQN`, or delete with --force")
        # A revert made after this read puts the volume back (its revision moves), so the
        # delete's compare fails and it looks again.
        reverts = await unfinished_reverts(ctx, vol.volume_id)
        await _refuse_unfinished_reverts(ctx, vol, reverts, force)
        snaps = await _snapshots_of(ctx, vol.volume_id)
        exported = await _exported_snapshots(ctx, vol, snaps, force)
        vkey = ctx.keys.volume(vol.volume_id)
        ops = [ctx.delete(ctx.keys.volume_name(vol.name)),
               ctx.delete(ctx.keys.lun(vol.target_index, vol.lun)),
               ctx.delete(ctx.keys.volume_acl(vol.volume_id), prefix=True)]
        # A forced delete cancels the unfinished revert (compared: one moved meanwhile looks
        # again); its executor stops before its next extent, and its caller hears "cancelled".
        compare = [ctx.unchanged(vkey, rev), ctx.unchanged(*guard)] + [ctx.unchanged(k, r) for k, r, _ in reverts]
        ops += [ctx.delete(k) for k, _, _ in reverts]
        if snaps:
            vol.state = "deleted"
            ops.append(ctx.put(vkey, vol))
        else:
            ops += erase_ops(ctx, vol.volume_id)
        if not await ctx.txn(compare, ops):
            continue
        log.info("volume %s (%s) deleted%s%s%s", vol.name, vol.volume_id,
                 " (forced)" if acl or reverts else "",
                 f"; revert {', '.join(op.op_id for _, _, op in reverts)} cancelled" if reverts else "",
                 f"; kept as a tombstone for {len(snaps)} snapshot(s)" if snaps else "")
        for s in exported:
            await _drop_export_of_deleted_volume(ctx, vol, s)
        await _collect_garbage_after(ctx, f"deleting volume {vol.name}")
        return vol
    raise Conflict(f"could not delete volume {ref!r}: too much concurrent change", hint="retry", retry=True)


async def _refuse_unfinished_reverts(ctx: Ctx, vol: Volume, reverts: list, force: bool) -> None:
    """Without force, a pending or running revert refuses the delete: it would go on
    rewriting the deleted volume and answer its caller "reverted". An op of a newer schema
    refuses it with force too (nothing here can cancel what it cannot read)."""
    for _, _, op in reverts:
        if isinstance(op, NewerOp):
            raise newer_op_refusal(f"volume {vol.name!r}", op, "delete it")
    if reverts and not force:
        op = reverts[0][2]
        snap, _ = await ctx.get(ctx.keys.snapshot(op.snapshot_id), Snapshot)
        raise Conflict(f"volume {vol.name!r} has a revert still {op.state} (op {op.op_id}, to snapshot "
                       f"{snap.name if snap else op.snapshot_id!r}, on chunk server {op.executor})",
                       hint="wait for the revert to finish (its command returns when done), or delete "
                            "with --force, which cancels it")


@dataclasses.dataclass(frozen=True)
class NewerOp:
    """An op record a newer zstore wrote (its schema is above ours): not garbage. In a rolling
    upgrade an upgraded chunk server may run it, so it counts as a revert that is unfinished
    (nothing here can read it to know better). Known by its key's op id only."""
    op_id: str
    kind: str = "revert"
    state: str = "pending"
    snapshot_id: str = "?"
    executor: str = "?"


def decoded_op(key: bytes, value: bytes) -> VolumeOp | NewerOp | None:
    """The op stored at ``key``; a ``NewerOp`` for one of a newer schema; None (logged) for a
    record that does not decode at all: no chunk server runs one (the engine skips it), and
    it must stop neither a delete nor a create nor the garbage collection."""
    try:
        return VolumeOp.decode(value)
    except NewerSchemaError:
        return NewerOp(op_id=key.rsplit(b"/", 1)[-1].decode(errors="replace"))
    except RecordError as e:
        # Warned once per record and value (the leader's tidying reads every op each 2 s).
        seen = (key, value)
        level = logging.DEBUG if seen in _UNDECODED else logging.WARNING
        if len(_UNDECODED) >= 1024:
            _UNDECODED.clear()
        _UNDECODED.add(seen)
        log.log(level, "volume op record %s does not decode, skipped: %s", key.decode(errors="replace"), e)
        return None


_UNDECODED: set[tuple[bytes, bytes]] = set()


async def unfinished_reverts(ctx: Ctx, vid: str) -> list[tuple[bytes, int, VolumeOp | NewerOp]]:
    """(key, mod revision, op) of each pending or running revert of volume ``vid``, read in
    pages: the one listing of them (snapshot create and delete, revert, volume delete, the
    stranded-snapshot collection), with one rule: an op of a newer schema counts as one
    (``NewerOp``), a record that does not decode is skipped with a log (``decoded_op``)."""
    kvs, _ = await get_prefix_paged(ctx.etcd, ctx.keys.volops(vid))
    return [(kv.key, kv.mod_revision, op) for kv in kvs
            if (op := decoded_op(kv.key, kv.value)) is not None
            and op.kind == "revert" and op.state in ("pending", "running")]


def newer_op_refusal(what: str, op: NewerOp, action: str) -> Unavailable:
    """503 for a request on ``what`` that an op of a newer zstore (``NewerOp``) stands in the way of."""
    return Unavailable(f"{what} has an op written by a newer zstore ({op.op_id}), taken "
                       "as a revert still unfinished",
                       hint=f"{action} from a meta server running the newer version (or finish the "
                            "upgrade first)")


def _exported_to_conflict(vol: Volume, s: Snapshot, users: list[AclEntry]) -> Conflict:
    return Conflict(f"snapshot {vol.name}@{s.name} is exported to {len(users)} initiator(s): "
                    + ", ".join(a.initiator for a in users[:3]) + ("..." if len(users) > 3 else ""),
                    hint=f"unexport it with `zstore snapshot unexport {vol.name}@{s.name}`, "
                         "or delete the volume with --force")


async def _exported_snapshots(ctx: Ctx, vol: Volume, snaps: list[Snapshot], force: bool) -> list[Snapshot]:
    """The snapshots of ``vol`` that are exported; without force, refuses when any has an
    initiator on its ACL."""
    out = []
    for s in snaps:
        if not (await snapshot_exports.export_state(ctx, s.snapshot_id))[1]:
            continue
        users = await snapshot_exports.export_acl(ctx, s.snapshot_id)
        if users and not force:
            raise _exported_to_conflict(vol, s, users)
        out.append(s)
    return out


async def _drop_export_of_deleted_volume(ctx: Ctx, vol: Volume, s: Snapshot) -> None:
    """Unexport ``s``, a snapshot of ``vol`` that its delete has just committed, in one bounded
    txn comparing its pointer as read. Best effort: the delete stands whatever happens here (an
    error would make the client retry a delete that is done and get 404); an export left is
    dropped by the collection (``snapshot_exports.collect_orphans``)."""
    try:
        for _ in range(MAX_RETRIES):
            m, prev = await snapshot_exports.export_state(ctx, s.snapshot_id)
            if not prev:
                return
            if await ctx.txn([snapshot_exports.pointer_unchanged(ctx, s.snapshot_id, prev)],
                             snapshot_exports.drop_ops(ctx, s.snapshot_id, m, s)):
                log.info("volume %s deleted: export of snapshot %s (%s) dropped", vol.name, s.name,
                         s.snapshot_id)
                return
        raise Conflict("its export pointer kept changing")
    except Exception as e:                  # noqa: BLE001 - logged; cancellation still propagates
        log.warning("volume %s deleted, but dropping the export of its snapshot %s (%s) failed; "
                    "the garbage collection drops it: %s: %s", vol.name, s.name, s.snapshot_id,
                    type(e).__name__, e)


async def _snapshots_of(ctx: Ctx, vid: str) -> list[Snapshot]:
    return [s for _, s in await ctx.list(ctx.keys.snapshots(), Snapshot) if s.volume_id == vid]


async def list_snapshots(ctx: Ctx, volume: str | None = None) -> list[Snapshot]:
    snaps = [s for _, s in await ctx.list(ctx.keys.snapshots(), Snapshot) if s.state != "deleted"]
    if volume:
        vol, _ = await find_volume(ctx, volume)
        snaps = [s for s in snaps if s.volume_id == vol.volume_id]
    return sorted(snaps, key=lambda s: (s.volume_id, s.created, s.name))


def check_limit(limit: int) -> int:
    if not 1 <= limit <= 1000:
        raise InvalidArgument(f"invalid limit {limit}: must be 1..1000")
    return limit


def _bad_token(token: str) -> InvalidArgument:
    return InvalidArgument(f"invalid start_after {token!r:.80}: not a `next` this listing answered",
                           hint="start again without start_after")


async def snapshot_page(ctx: Ctx, limit: int = 100, start_after: str | None = None,
                        volume: str | None = None) -> tuple[list[Snapshot], str | None]:
    """A page of live snapshots and the token of the next page (None: this is the last).
    All snapshots go in id order (their records' keys); one volume's in name order (its
    name keys), so that a page costs reads in proportion to its size, not to every snapshot
    in the cluster. ``volume`` may also be the id of a deleted volume whose snapshots live on."""
    check_limit(limit)
    if not volume:
        if start_after is not None and not _is_id(start_after):
            raise _bad_token(start_after)
        return await _page_of_all(ctx, limit, start_after)
    try:
        vid = (await find_volume(ctx, volume))[0].volume_id
    except NotFound:
        if not _is_id(volume):
            raise
        vid = volume
    after = None
    if start_after is not None:
        # "{volume id}:{name}": a token of another listing is refused, not misapplied.
        vid_part, sep, after = start_after.partition(":")
        if vid_part != vid or not sep or not after:
            raise _bad_token(start_after)
    return await _page_of_volume(ctx, vid, limit, after)


async def _page_of_all(ctx: Ctx, limit: int, start_after: str | None) -> tuple[list[Snapshot], str | None]:
    """One Range per ``limit`` records (more only to fill the page past tombstones)."""
    base, out = ctx.keys.snapshots(), []
    start = ctx.keys.snapshot(start_after) + b"\x00" if start_after else base
    while True:
        kvs, more = await ctx.etcd.range(start, prefix_end(base), limit=limit - len(out))
        snaps = [Snapshot.decode(value) for _, value in kvs]
        out += [s for s in snaps if s.state != "deleted"]
        if not more or not kvs:
            return out, None
        if len(out) == limit:
            return out, snaps[-1].snapshot_id
        start = kvs[-1][0] + b"\x00"


async def _page_of_volume(ctx: Ctx, vid: str, limit: int,
                          start_after: str | None) -> tuple[list[Snapshot], str | None]:
    """The volume's name keys (one Range), then each one's record."""
    base = ctx.keys.snapshot_names(vid)
    start = ctx.keys.snapshot_name(vid, start_after) + b"\x00" if start_after else base
    out, kvs, more = await _named_page(ctx, base, start, limit, ctx.keys.snapshot, Snapshot)
    return out, (f"{vid}:{ctx.keys.snapshot_name_in(kvs[-1][0], vid)}" if more and kvs else None)


async def _named_page(ctx: Ctx, base: bytes, start: bytes, limit: int, key_of, kind):
    """A page of a name index under ``base`` from ``start``: (live records, the name kvs read,
    whether more follow). One Range of the name keys, then one read per record they name."""
    kvs, more = await ctx.etcd.range(start, prefix_end(base), limit=limit)
    out = []
    for _, ident in kvs:
        rec, _ = await ctx.get(key_of(ident.decode()), kind)
        if rec is not None and rec.state != "deleted":
            out.append(rec)
    return out, kvs, more


async def snapshot_named(ctx: Ctx, volume: str, name: str) -> Snapshot | None:
    """The live snapshot ``name`` of ``volume`` (its name key: every create writes one)."""
    vol, _ = await find_volume(ctx, volume)
    return await _live_snapshot(ctx, await ctx.get_raw(ctx.keys.snapshot_name(vol.volume_id, name)), name)


async def unique_name_holder(ctx: Ctx, name: str) -> Snapshot | None:
    """The live snapshot holding ``name`` across volumes (``create_snapshot(unique=True)``,
    the CSI driver's): None when none does, or the key is stale (its holder gone or renamed)."""
    return await _live_snapshot(ctx, await ctx.get_raw(ctx.keys.snapshot_unique_name(name)), name)


async def _live_snapshot(ctx: Ctx, sid: bytes | None, name: str) -> Snapshot | None:
    if sid is None:
        return None
    snap, _ = await ctx.get(ctx.keys.snapshot(sid.decode()), Snapshot)
    return snap if snap is not None and snap.state != "deleted" and snap.name == name else None


async def delete_snapshot(ctx: Ctx, volume: str, name: str, force: bool = False) -> str:
    return await delete_snapshot_record(ctx, await resolve_snapshot(ctx, f"{volume}@{name}"), force)


async def delete_snapshot_by_id(ctx: Ctx, sid: str, force: bool = False) -> str:
    """By id: also reaches snapshots whose source volume was deleted (CSI deletes this way)."""
    return await delete_snapshot_record(ctx, await resolve_snapshot(ctx, sid), force)


async def delete_snapshot_record(ctx: Ctx, snap: Snapshot, force: bool = False) -> str:
    """An exported snapshot is deleted only with ``force``, which unexports it in the same txn."""
    skey = ctx.keys.snapshot(snap.snapshot_id)
    for _ in range(MAX_RETRIES):
        cur, srev = await ctx.get(skey, Snapshot)      # read before the clones are listed: see below
        if cur is None or cur.state == "deleted":
            # Deleted meanwhile (a retry after a failed compare): its name may already belong
            # to a new snapshot, whose name key this delete must not take along.
            raise NotFound(f"snapshot {snap.name} ({snap.snapshot_id}) not found")
        snap = cur
        # A revert to it needs its versions until done (reclaim trims them once it is gone);
        # a revert made after this read moves the snapshot's revision: the compare below.
        reverts = [op for _, _, op in await unfinished_reverts(ctx, snap.volume_id)]
        for op in reverts:
            if isinstance(op, NewerOp):        # it may be a revert to this very snapshot
                raise newer_op_refusal(f"the volume of snapshot {snap.name!r}", op, "delete the snapshot")
        if any(op.snapshot_id == snap.snapshot_id for op in reverts):
            raise Conflict(f"snapshot {snap.name!r} is the target of a revert still running",
                           hint="wait for the revert to finish (its command returns when done), then delete")
        m, prev = await snapshot_exports.export_state(ctx, snap.snapshot_id)
        if prev and not force:
            where = f" as LUN {m.lun} of target {await snapshot_exports.target_iqn_at(ctx, m.target_index)}" if m else ""
            raise Conflict(f"snapshot {snap.name!r} is exported{where}",
                           hint=f"unexport it first (`zstore snapshot unexport VOLUME@{snap.name}`), "
                                "or delete it with --force")
        clones = [v for _, v in await ctx.list(ctx.keys.volumes(), Volume)
                  if v.source_snapshot == snap.snapshot_id]
        # A snapshot deleted while still being created takes its pending barrier op along.
        ops = [ctx.delete(ctx.keys.snapshot_name(snap.volume_id, snap.name)),
               ctx.delete(ctx.keys.volop(snap.volume_id, snapshot_op_id(snap.snapshot_id)))]
        ucompare, uops = await unique_name_release(ctx, snap)
        ops += uops
        # Its LU's reservation state goes too, exported now or not (an export before may
        # have left it).
        ops += (snapshot_exports.drop_ops(ctx, snap.snapshot_id, m, snap) if prev
                else snapshot_exports.reservation_ops(ctx, snap))
        if clones:
            snap.state = "deleted"
            ops.append(ctx.put(skey, snap))
        else:
            ops.append(ctx.delete(skey))
        # Unchanged since before the clones were listed: a clone made meanwhile moved it, and
        # this looks again (it is then kept as a tombstone for that clone).
        if await ctx.txn([ctx.unchanged(skey, srev),
                          snapshot_exports.pointer_unchanged(ctx, snap.snapshot_id, prev), *ucompare], ops):
            break
        if (await snapshot_exports.export_state(ctx, snap.snapshot_id))[1] != prev:
            raise Conflict(f"snapshot {snap.name!r} was exported or unexported meanwhile", hint="retry", retry=True)
    else:
        raise Conflict(f"could not delete snapshot {snap.name!r}: too much concurrent change", hint="retry", retry=True)
    log.info("snapshot %s (%s) deleted%s", snap.name, snap.snapshot_id,
             f"; kept for {len(clones)} clone(s)" if clones else "")
    await _collect_garbage_after(ctx, f"deleting snapshot {snap.name} ({snap.snapshot_id})")
    return snap.snapshot_id


async def _collect_garbage_after(ctx: Ctx, what: str) -> None:
    """Garbage collection after a delete has committed: best effort. The delete stands
    whatever happens here, so a failure (leadership lost, etcd unreachable) is logged, not
    answered: an error would make the client retry a delete that is done and get 404.
    Tombstones left behind are collected by the leader's periodic run (``collect_garbage_every``)
    or the next delete's, whichever comes first (each scans them all)."""
    try:
        await collect_garbage(ctx)
    except Exception as e:                  # noqa: BLE001 - logged; cancellation still propagates
        log.warning("garbage collection after %s failed; the delete stands and the next "
                    "delete collects again: %s: %s", what, type(e).__name__, e)


GC_INTERVAL = 60.0


async def collect_garbage_every(ctx: Ctx, stop: asyncio.Event, interval: float = GC_INTERVAL) -> None:
    """The leader's garbage collection: at once on election, then every ``interval``. Without
    it a tombstone whose collection after the delete failed waited for some later delete."""
    while not stop.is_set():
        try:
            await collect_garbage(ctx)
        except Exception as e:              # noqa: BLE001 - logged; the next run tries again
            log.warning("periodic garbage collection failed: %s: %s", type(e).__name__, e)
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except asyncio.TimeoutError:
            pass


# A snapshot left ``creating`` with no op this long after its create is stranded (its meta
# server died between the two transactions of the create, and nobody repeated the create).
# A live create has its snapshot without an op only for the moment between those two
# transactions (then it has an op, or is ready), or while it waits for an unfinished revert of
# the volume (skipped below); one call waits 10 s, the CLI retries for 15 s. Ten minutes is far
# past all of that and past any clock difference between meta servers (``created`` is the
# creating server's clock), and five times the age at which a failed op's snapshot goes.
# So is one this old whose op waits for a chunk server that has not been alive for as long,
# or is not registered any more (``_executor_gone``).
STRANDED_CREATING_AGE = 600.0


async def remove_stranded_snapshot(ctx: Ctx, snap: Snapshot, srev: int, now: float,
                                   age: float = STRANDED_CREATING_AGE) -> bool:
    """Remove ``creating`` snapshot ``snap`` (read at ``srev``) if it is older than ``age`` and
    either has no op and its volume has no unfinished revert, or its op waits for a chunk
    server gone for as long (``_remove_with_op_of_gone_executor``); whether it was removed. Its
    name stays taken and its deleted volume unreclaimed for ever otherwise. The op's absence
    is compared: one made meanwhile (the create repeated) keeps it; so is the snapshot, so a
    commit of it (by the meta that made it, with no coordinator) and this removal exclude
    each other."""
    if snap.state != "creating" or now - snap.created < age:
        return False
    op_key = ctx.keys.volop(snap.volume_id, snapshot_op_id(snap.snapshot_id))
    got = await ctx.etcd.get(op_key)
    if got is not None:
        return await _remove_with_op_of_gone_executor(ctx, snap, srev, got, now, age)
    if await unfinished_reverts(ctx, snap.volume_id):
        return False                # it waits for the revert
    compare, ops = await creating_snapshot_removal(ctx, snap, srev)
    if not await ctx.txn([ctx.absent(op_key), *compare], ops):
        return False
    log.warning("snapshot %s (%s) of volume %s removed: left creating with no op since %.0f s",
                snap.name, snap.snapshot_id, snap.volume_id, now - snap.created)
    return True


async def _executor_gone(ctx: Ctx, chunk_id: str, now: float, age: float) -> tuple[str, list] | None:
    """(how it is gone, the compares that keep it so) when chunk server ``chunk_id`` is not
    registered any more, or has been down at least ``age`` (its current outage, as the leader
    recorded it: ``chunks.current_down_since``); None while it is alive, down for less, or
    down with no outage recorded yet. The compares fail if it comes back live or registers
    again (its info key is rewritten at each registration)."""
    live_key, info_key = ctx.keys.chunk_live(chunk_id), ctx.keys.chunk_info(chunk_id)
    if await ctx.etcd.get(live_key) is not None:
        return None
    info = await ctx.etcd.get(info_key)
    if info is None:
        return "not registered any more", [ctx.absent(live_key), ctx.absent(info_key)]
    got = await ctx.etcd.get(ctx.keys.chunk_admin(chunk_id))
    if got is None:
        return None
    try:
        admin = ChunkAdmin.decode(got.value)
    except RecordError:
        return None
    since = chunkmod.current_down_since(admin, got.mod_revision, info.mod_revision)
    if since is None or now - since < age:
        return None
    return (f"down for {now - since:.0f} s",
            [ctx.absent(live_key), ctx.unchanged(info_key, info.mod_revision)])


async def _remove_with_op_of_gone_executor(ctx: Ctx, snap: Snapshot, srev: int, got, now: float,
                                           age: float) -> bool:
    """Fail the op ``got`` (the kv of ``snap``'s op) and remove ``snap`` with its names, in one
    txn, if the op is pending or running on a chunk server gone for ``age`` (``_executor_gone``):
    nobody else runs an op assigned to it, and a create that would hand it to the volume's live
    coordinator (or commit the snapshot itself) was given up long ago. The op, the snapshot
    and the server's absence are compared: a create repeated meanwhile (it hands the op on), a
    commit of the snapshot, or the server back live makes this fail; a commit after it fails
    its own compare on the op. A failed op of another cause is tidy_ops' (it removes the
    snapshot too); an op this code cannot read is left alone."""
    op = decoded_op(got.key, got.value)
    if not isinstance(op, VolumeOp) or op.state not in ("pending", "running"):
        return False
    gone = await _executor_gone(ctx, op.executor, now, age)
    if gone is None:
        return False
    how, keep = gone
    op.state = "failed"
    op.error = (f"its chunk server {op.executor} is gone ({how}) and nobody waited for the snapshot "
                f"any more: removed by the garbage collection")
    compare, ops = await creating_snapshot_removal(ctx, snap, srev)
    if not await ctx.txn([ctx.unchanged(got.key, got.mod_revision), *keep, *compare],
                         [ctx.put(got.key, op), *ops]):
        return False
    log.warning("snapshot %s (%s) of volume %s removed: left creating for %.0f s, its op %s waiting "
                "for chunk server %s, which is gone (%s); the op is failed", snap.name, snap.snapshot_id,
                snap.volume_id, now - snap.created, op.op_id, op.executor, how)
    return True


async def collect_garbage(ctx: Ctx, now: float | None = None) -> None:
    """Erase tombstones nothing references any more, and snapshots stranded ``creating``
    (``remove_stranded_snapshot``: the same listing; their volume can go in the same run).
    Repeats until stable."""
    for _ in range(8):
        # Snapshots (with their revisions) before volumes: a clone created after this listing
        # moves its snapshot's revision, so the delete below fails its compare instead of
        # erasing a parent the volume listing did not show a clone of yet.
        # Each listing is read in pages (one Range reply is capped at 4 MiB: past ~20k
        # snapshots or ~10k volumes an unpaged read failed every collection, for good), and
        # the records and their revisions come from one read.
        skvs, _ = await get_prefix_paged(ctx.etcd, ctx.keys.snapshots())
        snap_revs = {kv.key: kv.mod_revision for kv in skvs}
        snaps = {s.snapshot_id: s for s in (Snapshot.decode(kv.value) for kv in skvs)}
        vols = {v.volume_id: v for _, v in await ctx.list(ctx.keys.volumes(), Volume)}
        changed = False
        for s in snaps.values():
            skey = ctx.keys.snapshot(s.snapshot_id)
            if skey in snap_revs:
                changed |= await remove_stranded_snapshot(ctx, s, snap_revs[skey],
                                                          time.time() if now is None else now)
            if (s.state == "deleted" and skey in snap_revs
                    and not any(v.source_snapshot == s.snapshot_id for v in vols.values())):
                changed |= await ctx.txn([ctx.unchanged(skey, snap_revs[skey])],
                                         [ctx.delete(skey), *snapshot_exports.reservation_ops(ctx, s)])
        # Snapshots again, after the volumes: a snapshot taken and then its volume deleted
        # between the first listing and the volume listing shows here, and keeps the
        # tombstone (the first listing missed it, and erasing the volume lost its data).
        # A tombstone takes no new snapshot, so this listing cannot miss one of it.
        vkvs, _ = await get_prefix_paged(ctx.etcd, ctx.keys.volumes())
        owners = {s.volume_id for _, s in await ctx.list(ctx.keys.snapshots(), Snapshot)}
        for kv in vkvs:
            v = Volume.decode(kv.value)
            if v.state == "deleted" and v.volume_id not in owners:
                changed |= await ctx.txn([ctx.unchanged(kv.key, kv.mod_revision)], erase_ops(ctx, v.volume_id))
        changed |= await snapshot_exports.collect_orphans(ctx)
        if not changed:
            return


async def list_volumes(ctx: Ctx, limit: int = 100, start_after: str | None = None) -> tuple[list[Volume], str | None]:
    check_limit(limit)
    base = ctx.keys.volume_names()
    start = ctx.keys.volume_name(start_after) + b"\x00" if start_after else base
    vols, kvs, more = await _named_page(ctx, base, start, limit, ctx.keys.volume, Volume)
    return vols, (kvs[-1][0][len(base):].decode() if more and kvs else None)
