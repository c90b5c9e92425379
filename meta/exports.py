"""How volumes are exported: targets, LUN masking (ACLs) and CHAP credentials.

LUN masking: a LUN is visible to no initiator until one is put on its ACL.
A ``VOLUME@SNAP`` reference names an exported snapshot's LUN (its ACL lives
under the snapshot id; see snapshot_exports.py): always read-only.
CHAP secrets are stored in etcd for the daemons that verify logins, and this
module only ever hands out their public form (no secrets).
"""

from __future__ import annotations

import logging
from typing import Any

from zstore import logs, naming
from zstore.errors import InvalidArgument, NotFound
from zstore.errors import Conflict
from zstore.records import AclEntry, ChapRecord, LunMapping, Snapshot, Target, Volume, now

from . import snapshot_exports, volumes
from .context import Ctx
from .volumes import MAX_RETRIES, find_volume, resolve_snapshot

log = logging.getLogger(__name__)


async def list_targets(ctx: Ctx) -> list[dict[str, Any]]:
    targets = [t for _, t in await ctx.list(ctx.keys.targets(), Target)]
    luns = [m for _, m in await ctx.list(ctx.keys.luns(), LunMapping)]
    vols = {v.volume_id: v for _, v in await ctx.list(ctx.keys.volumes(), Volume)}
    snaps = {s.snapshot_id: s for _, s in await ctx.list(ctx.keys.snapshots(), Snapshot)} \
        if any(m.snapshot_id for m in luns) else {}

    def name(m: LunMapping) -> str | None:
        vol = vols.get(m.volume_id)
        if vol is None or vol.state == "deleted":
            return None
        if m.snapshot_id is None:
            return vol.name
        snap = snaps.get(m.snapshot_id)
        return f"{vol.name}@{snap.name}" if snap else None

    out = []
    for t in sorted(targets, key=lambda t: t.index):
        mine = sorted((m for m in luns if m.target_index == t.index), key=lambda m: m.lun)
        out.append({"index": t.index, "iqn": t.iqn, "luns": len(mine),
                    "volumes": [{"lun": m.lun, "volume": name(m), **({"snapshot_id": m.snapshot_id}
                                                                    if m.snapshot_id else {})}
                                for m in mine]})
    return out


async def target_iqn_of(ctx: Ctx, vol: Volume) -> str:
    t, _ = await ctx.get(ctx.keys.target(vol.target_index), Target)
    if t is None:
        cluster = await ctx.cluster()
        return naming.target_iqn(cluster.cluster_id, vol.target_index)
    return t.iqn


def is_snapshot_ref(ref: str) -> bool:
    return isinstance(ref, str) and "@" in ref


async def _exported_snapshot(ctx: Ctx, ref: str) -> tuple[Snapshot, int]:
    """(snapshot, mod revision of its export pointer); Conflict if it is not exported."""
    snap = await resolve_snapshot(ctx, ref)
    _, rev = await snapshot_exports.export_state(ctx, snap.snapshot_id)
    if not rev:
        raise Conflict(f"snapshot {ref!r} is not exported",
                       hint=f"export it first with `zstore snapshot export {ref}`")
    return snap, rev


async def add_snapshot_acl(ctx: Ctx, ref: str, initiator: str) -> AclEntry:
    """Let an initiator see an exported snapshot's LUN (read-only, whatever was asked)."""
    initiator = naming.check_iqn(initiator)
    for _ in range(MAX_RETRIES):
        snap, rev = await _exported_snapshot(ctx, ref)
        key = ctx.keys.acl(snap.snapshot_id, initiator)
        existing, _ = await ctx.get(key, AclEntry)
        if existing is not None:
            return existing
        # The volume's delete guard is compared and put back unchanged, moving its
        # revision: a volume delete without force that read this export's ACL before the entry
        # fails its compare, looks again and refuses; once the volume is deleted (the key is
        # gone) its exports, dropped after, take no initiator.
        vol, _ = await ctx.get(ctx.keys.volume(snap.volume_id), Volume)
        guard = None if vol is None or vol.state == "deleted" else await volumes.delete_guard(ctx, vol)
        if guard is None:
            raise Conflict(f"snapshot {ref!r} belongs to a deleted volume: its export is going",
                           hint="clone it into a new volume (`zstore volume clone`) and export that")
        entry = AclEntry(volume_id=snap.volume_id, initiator=initiator, readonly=True, snapshot_id=snap.snapshot_id)
        # The export pointer is put back too (a snapshot delete or unexport compares it).
        pkey = ctx.keys.snapshot_lun(snap.snapshot_id)
        pointer = await ctx.get_raw(pkey)
        if pointer is None:
            continue                    # unexported meanwhile: the next read says so
        if await ctx.txn([ctx.unchanged(pkey, rev), ctx.unchanged(*guard)],
                         [ctx.put(key, entry), ctx.put(pkey, pointer), ctx.put(guard[0], vol.volume_id)]):
            log.info("initiator %s may now read snapshot %s (%s)", initiator, ref, snap.snapshot_id)
            return entry
    raise Conflict(f"could not add {initiator!r} to snapshot {ref!r}: too much concurrent change",
                   hint="retry", retry=True)


async def add_acl(ctx: Ctx, volume: str, initiator: str, readonly: bool = False) -> AclEntry:
    if not isinstance(readonly, bool):
        raise InvalidArgument(f"invalid readonly value {readonly!r} (true or false)")
    if is_snapshot_ref(volume):
        return await add_snapshot_acl(ctx, volume, initiator)
    initiator = naming.check_iqn(initiator)
    # Compared with the revision of the volume's delete guard (its name key), not the volume
    # record's existence: a delete that keeps the record as a tombstone (its snapshots live
    # on) has already dropped the volume's ACL and its name key, and an entry put after it
    # would outlive the volume. A retry sees the volume gone.
    for _ in range(MAX_RETRIES):
        vol, _ = await find_volume(ctx, volume)
        guard = await volumes.delete_guard(ctx, vol)
        if guard is None:
            continue                    # deleted meanwhile: find_volume says so
        key = ctx.keys.acl(vol.volume_id, initiator)
        existing, _ = await ctx.get(key, AclEntry)
        if existing is not None and existing.readonly == readonly:
            return existing
        entry = AclEntry(volume_id=vol.volume_id, initiator=initiator, readonly=readonly)
        # The guard is put back unchanged: its revision moves, so a delete without force that
        # read the ACL before this entry fails its compare, reads again and refuses. Not the
        # volume record (it was put back before): the coordinator's snapshot commit compares
        # that one, a few attempts, and ACL churn could use them up.
        gkey, grev = guard
        if await ctx.txn([ctx.unchanged(gkey, grev)], [ctx.put(key, entry), ctx.put(gkey, vol.volume_id)]):
            log.info("initiator %s may now access volume %s%s", initiator, vol.name,
                     " (read-only)" if readonly else "")
            return entry
    raise Conflict(f"could not add {initiator!r} to volume {volume!r}: too much concurrent change",
                   hint="retry", retry=True)


def _stored_names(initiator: Any, wildcard: bool = False) -> tuple[list[str], InvalidArgument | None]:
    """The names an entry for ``initiator`` may be stored under, to remove it: its normalized
    (lower-case) form, then the name as given, for entries stored before names were
    normalized and checked this strictly; and the error if the name is not valid now."""
    if not isinstance(initiator, str) or not initiator:
        raise InvalidArgument("an initiator is required: its IQN" + (", or '*'" if wildcard else ""))
    if wildcard and initiator == "*":
        return ["*"], None
    try:
        name = naming.check_iqn(initiator)
    except InvalidArgument as e:
        return [initiator], e
    return ([name] if name == initiator else [name, initiator]), None


async def _delete_first(ctx: Ctx, keys: list[bytes]) -> bool:
    for key in keys:
        if await ctx.txn([ctx.t.version(key) > 0], [ctx.delete(key)]):
            return True
    return False


async def remove_snapshot_acl(ctx: Ctx, ref: str, initiator: str) -> str:
    names, invalid = _stored_names(initiator)
    snap = await resolve_snapshot(ctx, ref)
    if not await _delete_first(ctx, [ctx.keys.acl(snap.snapshot_id, n) for n in names]):
        if invalid:
            raise invalid
        raise NotFound(f"initiator {initiator!r} is not on the ACL of snapshot {ref!r}",
                       hint=f"see `zstore acl list {ref}`")
    log.info("initiator %s removed from snapshot %s (%s)", names[0], ref, snap.snapshot_id)
    return names[0]


async def remove_acl(ctx: Ctx, volume: str, initiator: str) -> str:
    if is_snapshot_ref(volume):
        return await remove_snapshot_acl(ctx, volume, initiator)
    names, invalid = _stored_names(initiator)
    vol, _ = await find_volume(ctx, volume)
    if not await _delete_first(ctx, [ctx.keys.acl(vol.volume_id, n) for n in names]):
        if invalid:
            raise invalid
        raise NotFound(f"initiator {initiator!r} is not on the ACL of volume {vol.name!r}",
                       hint=f"see `zstore acl list {vol.name}`")
    log.info("initiator %s removed from volume %s", names[0], vol.name)
    return names[0]


async def list_snapshot_acl(ctx: Ctx, ref: str) -> tuple[Snapshot, list[AclEntry]]:
    snap = await resolve_snapshot(ctx, ref)
    return snap, await snapshot_exports.export_acl(ctx, snap.snapshot_id)


async def list_acl(ctx: Ctx, volume: str) -> tuple[str, list[AclEntry]]:
    """(the name the ACL is listed under: the volume's, or VOLUME@SNAP as given; entries)."""
    if is_snapshot_ref(volume):
        _, entries = await list_snapshot_acl(ctx, volume)
        return volume, entries
    vol, _ = await find_volume(ctx, volume)
    entries = [e for _, e in await ctx.list(ctx.keys.volume_acl(vol.volume_id), AclEntry)]
    return vol.name, sorted(entries, key=lambda e: e.initiator)


async def _chap_target(ctx: Ctx, target: str) -> str:
    """'*', a target IQN of this cluster, or a volume name (its target)."""
    if not isinstance(target, str) or not target:
        raise InvalidArgument("a target is required: a target IQN, a volume name, or '*'")
    if target == "*":
        return target
    if target[:4].lower() == "iqn.":
        wanted = naming.normalize_iqn(target.strip())
        for _, t in await ctx.list(ctx.keys.targets(), Target):
            if naming.normalize_iqn(t.iqn) == wanted:
                return t.iqn
        raise NotFound(f"target {target!r} not found", hint="see `zstore target list`")
    if is_snapshot_ref(target):
        m, _ = await snapshot_exports.export_state(ctx, (await _exported_snapshot(ctx, target))[0].snapshot_id)
        if m is None:
            raise NotFound(f"the LUN of snapshot {target!r} is gone", hint="export it again")
        return await snapshot_exports.target_iqn_at(ctx, m.target_index)
    vol, _ = await find_volume(ctx, target)
    return await target_iqn_of(ctx, vol)


CHAP_SECRET_MIN, CHAP_SECRET_MAX = 12, 255      # bytes of UTF-8, as the secret is used
CHAP_NAME_MAX = 255                             # bytes of UTF-8: an iSCSI text value


def _utf8_len(value: str) -> int | None:
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError:                  # a lone surrogate from JSON "\ud800"
        return None


# LIO (configfs, through rtslib) stores CHAP values as text: a value starting with "NULL"
# (the kernel compares 4 bytes, case-sensitively) means "no value", and rtslib strips
# surrounding whitespace, so a login with the value as given could never succeed.
LIO_NULL = "NULL"


def _lio_problem(value: str) -> str | None:
    if value.startswith(LIO_NULL):
        return f"must not start with {LIO_NULL!r} (the iSCSI target reads that as no value)"
    if value != value.strip():
        return "must not start or end with whitespace (the iSCSI target strips it)"
    return None


def _check_secret(value: Any, what: str) -> str:
    """12 to 255 bytes: the secret is used as its UTF-8 bytes, so 'é' counts 2 (never echoed)."""
    n = _utf8_len(value) if isinstance(value, str) else None
    if n is None or not CHAP_SECRET_MIN <= n <= CHAP_SECRET_MAX:
        raise InvalidArgument(f"invalid {what}: must be {CHAP_SECRET_MIN} to {CHAP_SECRET_MAX} bytes of UTF-8 text",
                              hint="RFC 7143 requires CHAP secrets of at least 96 bits")
    problem = _lio_problem(value)
    if problem:
        raise InvalidArgument(f"invalid {what}: {problem}")
    return value


def _check_chap_name(value: Any, what: str) -> str:
    """A CHAP_N value: 1-255 bytes of UTF-8 without control characters (NUL ends a text key)."""
    n = _utf8_len(value) if isinstance(value, str) else None
    if n is None or not 1 <= n <= CHAP_NAME_MAX or any(c < " " or c == "\x7f" for c in value):
        raise InvalidArgument(f"invalid {what} {value!r:.80}: must be 1-{CHAP_NAME_MAX} bytes of "
                              "UTF-8 text without control characters")
    problem = _lio_problem(value)
    if problem:
        raise InvalidArgument(f"invalid {what} {value!r:.80}: {problem}")
    return value


async def set_chap(ctx: Ctx, body: dict[str, Any]) -> ChapRecord:
    target = await _chap_target(ctx, body.get("target", ""))
    initiator = body.get("initiator", "")
    if initiator != "*":
        initiator = naming.check_iqn(initiator)
    user = _check_chap_name(body.get("user"), "CHAP user name")
    secret = _check_secret(body.get("secret"), "CHAP secret")
    logs.redact(secret)
    mutual_user, mutual_secret = body.get("mutual_user"), body.get("mutual_secret")
    if (mutual_user is None) != (mutual_secret is None):
        raise InvalidArgument("mutual CHAP needs both mutual_user and mutual_secret")
    if mutual_user is not None:
        mutual_user = _check_chap_name(mutual_user, "mutual CHAP user name")
    if mutual_secret is not None:
        mutual_secret = _check_secret(mutual_secret, "mutual CHAP secret")
        logs.redact(mutual_secret)
        if mutual_secret == secret:
            raise InvalidArgument("the mutual CHAP secret must differ from the initiator's secret",
                                  hint="RFC 7143 12.1.3: the same secret must not be used in both directions")
    rec = ChapRecord(target=target, initiator=initiator, user=user, secret=secret,
                     mutual_user=mutual_user, mutual_secret=mutual_secret, changed=now())
    await ctx.txn([], [ctx.put(ctx.keys.chap(target, initiator), rec)])
    log.info("CHAP credentials set for initiator %s on target %s%s", initiator, target,
             " (mutual)" if mutual_user else "")
    return rec


async def clear_chap(ctx: Ctx, target: str, initiator: str) -> None:
    target = await _chap_target(ctx, target)
    names, invalid = _stored_names(initiator, wildcard=True)
    if not await _delete_first(ctx, [ctx.keys.chap(target, n) for n in names]):
        if invalid:
            raise invalid
        raise NotFound(f"no CHAP credentials for initiator {initiator!r} on target {target!r}",
                       hint="see `zstore chap list`")
    log.info("CHAP credentials cleared for initiator %s on target %s", names[0], target)


async def list_chap(ctx: Ctx) -> list[dict[str, Any]]:
    return [rec.public() for _, rec in await ctx.list(ctx.keys.chaps(), ChapRecord)]
