"""Leader-only: follow chunk servers' lease keys and record when they go down.

Status itself needs no bookkeeping (it is the live key's existence); this
records ``down_since`` in the admin record, which recovery scheduling uses
for its grace period and ``zstore chunk list`` shows.

``down_since`` is the start of the current outage: each listing (a new term, or
a relisting after the watch failed) records an outage that began before the
server's latest registration afresh, as the leader did not see the server up in
between (meta/chunks.py ``mark_liveness``). While watching, a registration that
does not come up (its info key written, no live key) leaves the outage as it is,
so such a server cannot put its grace off.

That last one is decided from this follower's own stream of events, in order,
never by waiting: the follower may handle the info write's event late, after the
server came up and went down again. So it sets the outage's start aside (a
marker: the admin record with the start not known, ``chunks.mark_registration``)
and keeps it in memory; a live event of the server before the marker's own event
drops it (the live events record the truth), the marker's event first writes it
back (``chunks.restore_outage``). A new listing forgets what is pending: the
outage is then recorded from when it is seen, as for any listing.
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
    pending: dict[str, chunks.Pending] = {}     # chunk id -> the outage start set aside

    async def on_snapshot(kvs: list[tuple[bytes, bytes]]) -> None:
        pending.clear()                          # events since the markers are not all seen
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
        if not kp:
            return
        cid, kind = kp
        held = pending.get(cid)
        if kind == "live":
            # Up (a put), or up until now (a delete): an outage set aside is over.
            pending.pop(cid, None)
            await chunks.mark_liveness(ctx, cid, event.kind == "PUT")
        elif kind == "info" and event.kind == "PUT":
            if held is not None and held.marker and event.kv.mod_revision < held.marker:
                return      # written before the marker (in this stream before it): it covers this
            # Watched since the listing: the server was not up between its recorded outage and
            # this write (its live key's event would have come in between); since, maybe.
            pending.pop(cid, None)
            got = await chunks.mark_registration(ctx, cid, held.start if held is not None else None)
            if got is not None:
                pending[cid] = got
        elif kind == "info":
            pending.pop(cid, None)               # removed
        elif kind == "admin" and held is not None and held.marker == event.kv.mod_revision:
            # The marker's own event, no live event of the server before it in this stream.
            del pending[cid]
            if event.kind == "PUT":
                got = await chunks.restore_outage(ctx, cid, held)
                if got is not None:
                    pending[cid] = got

    await zetcd.watch_prefix(ctx.etcd, base, on_snapshot, on_event, stop)
