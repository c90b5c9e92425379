"""How volumes are exported: targets, LUN masking (ACLs) and CHAP credentials.

LUN masking: a LUN is visible to no initiator until one is put on its ACL.
CHAP secrets are stored in etcd for the daemons that verify logins, and this
module only ever hands out their public form (no secrets).
"""

from __future__ import annotations

import logging
from typing import Any

from zstore import logs, naming
from zstore.errors import InvalidArgument, NotFound
from zstore.records import AclEntry, ChapRecord, LunMapping, Target, Volume, now

from .context import Ctx
from .volumes import find_volume

log = logging.getLogger(__name__)


async def list_targets(ctx: Ctx) -> list[dict[str, Any]]:
    targets = [t for _, t in await ctx.list(ctx.keys.targets(), Target)]
    luns = [m for _, m in await ctx.list(ctx.keys.luns(), LunMapping)]
    vols = {v.volume_id: v for _, v in await ctx.list(ctx.keys.volumes(), Volume)}
    out = []
    for t in sorted(targets, key=lambda t: t.index):
        mine = sorted((m for m in luns if m.target_index == t.index), key=lambda m: m.lun)
        out.append({"index": t.index, "iqn": t.iqn, "luns": len(mine),
                    "volumes": [{"lun": m.lun, "volume": vols[m.volume_id].name if m.volume_id in vols else None}
                                for m in mine]})
    return out


async def target_iqn_of(ctx: Ctx, vol: Volume) -> str:
    t, _ = await ctx.get(ctx.keys.target(vol.target_index), Target)
    if t is None:
        cluster = await ctx.cluster()
        return naming.target_iqn(cluster.cluster_id, vol.target_index)
    return t.iqn


async def add_acl(ctx: Ctx, volume: str, initiator: str, readonly: bool = False) -> AclEntry:
    initiator = naming.check_iqn(initiator)
    if not isinstance(readonly, bool):
        raise InvalidArgument(f"invalid readonly value {readonly!r} (true or false)")
    vol, _ = await find_volume(ctx, volume)
    key = ctx.keys.acl(vol.volume_id, initiator)
    existing, _ = await ctx.get(key, AclEntry)
    if existing is not None and existing.readonly == readonly:
        return existing
    entry = AclEntry(volume_id=vol.volume_id, initiator=initiator, readonly=readonly)
    if not await ctx.txn([ctx.t.version(ctx.keys.volume(vol.volume_id)) > 0], [ctx.put(key, entry)]):
        raise NotFound(f"volume {volume!r} not found")
    log.info("initiator %s may now access volume %s%s", initiator, vol.name, " (read-only)" if readonly else "")
    return entry


async def remove_acl(ctx: Ctx, volume: str, initiator: str) -> str:
    vol, _ = await find_volume(ctx, volume)
    key = ctx.keys.acl(vol.volume_id, initiator)
    if not await ctx.txn([ctx.t.version(key) > 0], [ctx.delete(key)]):
        raise NotFound(f"initiator {initiator!r} is not on the ACL of volume {vol.name!r}",
                       hint=f"see `zstore acl list {vol.name}`")
    log.info("initiator %s removed from volume %s", initiator, vol.name)
    return initiator


async def list_acl(ctx: Ctx, volume: str) -> tuple[Volume, list[AclEntry]]:
    vol, _ = await find_volume(ctx, volume)
    entries = [e for _, e in await ctx.list(ctx.keys.volume_acl(vol.volume_id), AclEntry)]
    return vol, sorted(entries, key=lambda e: e.initiator)


async def _chap_target(ctx: Ctx, target: str) -> str:
    """'*', a target IQN of this cluster, or a volume name (its target)."""
    if not isinstance(target, str) or not target:
        raise InvalidArgument("a target is required: a target IQN, a volume name, or '*'")
    if target == "*":
        return target
    if target.startswith("iqn."):
        if not any(t.iqn == target for _, t in await ctx.list(ctx.keys.targets(), Target)):
            raise NotFound(f"target {target!r} not found", hint="see `zstore target list`")
        return target
    vol, _ = await find_volume(ctx, target)
    return await target_iqn_of(ctx, vol)


def _check_secret(value: Any, what: str) -> str:
    if not isinstance(value, str) or not 12 <= len(value) <= 255:
        raise InvalidArgument(f"invalid {what}: must be 12 to 255 characters",
                              hint="RFC 7143 requires CHAP secrets of at least 96 bits")
    return value


async def set_chap(ctx: Ctx, body: dict[str, Any]) -> ChapRecord:
    target = await _chap_target(ctx, body.get("target", ""))
    initiator = body.get("initiator", "")
    if initiator != "*":
        initiator = naming.check_iqn(initiator)
    user = body.get("user")
    if not isinstance(user, str) or not user or len(user) > 255:
        raise InvalidArgument("a CHAP user name (1-255 characters) is required")
    secret = _check_secret(body.get("secret"), "CHAP secret")
    logs.redact(secret)
    mutual_user, mutual_secret = body.get("mutual_user"), body.get("mutual_secret")
    if (mutual_user is None) != (mutual_secret is None):
        raise InvalidArgument("mutual CHAP needs both mutual_user and mutual_secret")
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
    key = ctx.keys.chap(target, initiator)
    if not await ctx.txn([ctx.t.version(key) > 0], [ctx.delete(key)]):
        raise NotFound(f"no CHAP credentials for initiator {initiator!r} on target {target!r}",
                       hint="see `zstore chap list`")
    log.info("CHAP credentials cleared for initiator %s on target %s", initiator, target)


async def list_chap(ctx: Ctx) -> list[dict[str, Any]]:
    return [rec.public() for _, rec in await ctx.list(ctx.keys.chaps(), ChapRecord)]
