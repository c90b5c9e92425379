"""Setup shared by the catalog's freshness tests: a Catalog started over real etcd, an ACL
entry mirrored into it, ACL churn, and a section's watch stalled before the mirror."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator

from chunk.catalog import Catalog
from meta import exports, volumes
from tests.cluster import async_wait_for
from tests.meta.helpers import make_ctx, register_chunk
from zstore import etcd as zetcd

H1 = "iqn.2004-10.com.example:h1"


@asynccontextmanager
async def running_catalog(client, config, stale_after: float | None = 1.0,
                          stop: asyncio.Event | None = None) -> AsyncIterator[tuple]:
    """(ctx, catalog, went_stale: every on_stale call), with chunk "c0" registered; the
    catalog is stopped and closed on the way out."""
    ctx = make_ctx(client, config)
    await register_chunk(ctx, "c0")
    stop = stop or asyncio.Event()
    cat = Catalog(client, ctx.keys, stale_after=stale_after)
    went_stale: list[bool] = []
    cat.on_stale(went_stale.append)
    await cat.start(stop)
    try:
        yield ctx, cat, went_stale
    finally:
        stop.set()
        await cat.close()


async def acl_mirrored(ctx, cat: Catalog, initiator: str = H1):
    """Volume "v" created with ``initiator`` on its ACL, once the catalog serves it: (vol, iqn)."""
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 1)
    iqn = (await exports.list_targets(ctx))[0]["iqn"]
    await exports.add_acl(ctx, "v", initiator)
    await async_wait_for(lambda: cat.lun_access(iqn, initiator, vol.lun), 5, "ACL mirrored")
    return vol, iqn


async def churn_acls(ctx, seconds: float) -> None:
    """ACL entries of volume "v" added and removed all along for ``seconds``."""
    loop = asyncio.get_running_loop()
    deadline, i = loop.time() + seconds, 0
    while loop.time() < deadline:
        ini = f"iqn.2004-10.com.example:churn{i % 5}"
        await exports.add_acl(ctx, "v", ini)
        await exports.remove_acl(ctx, "v", ini)
        i += 1


def stall(cat: Catalog, section: str, progress: bool = False) -> None:
    """From now on ``section``'s watch delivers nothing to the mirror; with ``progress`` its
    progress markers still arrive (a stream that flows while etcd holds its events back)."""
    real = cat._event                                               # noqa: SLF001

    def event(kind, ev):
        if kind != section or (progress and isinstance(ev, zetcd.Progress)):
            real(kind, ev)
    cat._event = event                                              # noqa: SLF001
