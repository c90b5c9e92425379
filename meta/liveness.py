"""Leader-only: follow chunk servers' lease keys and record when they go down.

Status itself needs no bookkeeping (it is the live key's existence); this
records ``down_since`` in the admin record, which recovery scheduling uses
for its grace period and ``zstore chunk list`` shows.

A listing (a new leader's first, or one after the watch broke) sees only the
present: a server down now whose ``down_since`` an earlier leader recorded may
have come back and gone down again meanwhile, unseen. Its info key written
(registration, each time it comes up) after that admin record says so; its
down time is then unknown and counted from now, not from the old record, or
recovery would drop its replicas a whole grace early.
"""

from __future__ import annotations

import asyncio
import logging

from zstore import etcd as zetcd
from zstore.records import ChunkAdmin, now

from . import chunks
from .context import Ctx

log = logging.getLogger(__name__)


async def follow(ctx: Ctx, stop: asyncio.Event) -> None:
    base = ctx.keys.chunks()

    async def on_snapshot(kvs: list[tuple[bytes, bytes]]) -> None:
        seen: dict[str, set[str]] = {}
        for key, _ in kvs:
            kp = ctx.keys.chunk_key_parts(key, base)
            if kp:
                seen.setdefault(kp[0], set()).add(kp[1])
        for cid, kinds in seen.items():
            if "info" in kinds:
                if "live" not in kinds:
                    await restart_grace_if_back_since(ctx, cid)
                await chunks.mark_liveness(ctx, cid, "live" in kinds)

    async def on_event(event) -> None:
        kp = ctx.keys.chunk_key_parts(event.kv.key, base)
        if kp and kp[1] == "live":
            await chunks.mark_liveness(ctx, kp[0], event.kind == "PUT")

    await zetcd.watch_prefix(ctx.etcd, base, on_snapshot, on_event, stop)


async def restart_grace_if_back_since(ctx: Ctx, chunk_id: str) -> None:
    """A down server registered again after its ``down_since`` was recorded: it was up since,
    unseen by a leader; it went down again at some unknown moment, counted from now."""
    info = await ctx.etcd.get(ctx.keys.chunk_info(chunk_id))
    akey = ctx.keys.chunk_admin(chunk_id)
    got = await ctx.etcd.get(akey)
    if info is None or got is None:
        return
    admin = ChunkAdmin.decode(got.value)
    if admin.down_since is None or info.mod_revision < got.mod_revision:
        return
    was, admin.down_since = admin.down_since, now()
    compare = [ctx.unchanged(akey, got.mod_revision), ctx.unchanged(ctx.keys.chunk_info(chunk_id), info.mod_revision),
               ctx.absent(ctx.keys.chunk_live(chunk_id))]
    if await ctx.txn(compare, [ctx.put(akey, admin)]):
        log.warning("chunk server %s registered again after it was recorded down (%.0fs ago) and is "
                    "down again: its down time now counts from now", chunk_id, admin.down_since - was)
