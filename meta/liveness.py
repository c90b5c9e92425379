"""Leader-only: follow chunk servers' lease keys and record when they go down.

Status itself needs no bookkeeping (it is the live key's existence); this
records ``down_since`` in the admin record, which recovery scheduling uses
for its grace period and ``zstore chunk list`` shows.
"""

from __future__ import annotations

import asyncio
import logging

from zstore import etcd as zetcd

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
                await chunks.mark_liveness(ctx, cid, "live" in kinds)

    async def on_event(event) -> None:
        kp = ctx.keys.chunk_key_parts(event.kv.key, base)
        if kp and kp[1] == "live":
            await chunks.mark_liveness(ctx, kp[0], event.kind == "PUT")

    await zetcd.watch_prefix(ctx.etcd, base, on_snapshot, on_event, stop)
