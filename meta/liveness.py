"""Leader-only: follow chunk servers' lease keys and record when they go down.

Status itself needs no bookkeeping (it is the live key's existence); this
records ``down_since`` in the admin record, which recovery scheduling uses
for its grace period and ``zstore chunk list`` shows.

``down_since`` is the start of the current outage: each listing (a new term, or
a relisting after the watch failed) records an outage that began before the
server's latest registration afresh, as the leader did not see the server up in
between (meta/chunks.py ``mark_liveness``). While watching, a registration that
does not come up (its info key written, no live key) is seen and leaves the
outage as it is, so such a server cannot put its grace off.
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
        elif kp and kp[1] == "info" and event.kind == "PUT":
            # Watched since the listing: if the server is still down it has not been up since
            # its outage was recorded (its live key's put would have come in between).
            await chunks.mark_liveness(ctx, kp[0], False, registering=True)

    await zetcd.watch_prefix(ctx.etcd, base, on_snapshot, on_event, stop)
