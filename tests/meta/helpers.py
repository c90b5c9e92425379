"""Test helpers for meta operations against a real etcd."""

from __future__ import annotations

import os

from meta.context import Ctx
from zstore.keys import Keys
from zstore.records import ChunkInfo, ChunkLive, now

GiB = 2**30


async def register_chunk(ctx: Ctx, cid: str, labels: dict | None = None, capacity: int = 100 * GiB,
                         used: int = 0, live: bool = True, lease=None) -> None:
    """Write a chunk server's records the way chunk/registration does (for store tests)."""
    disks = [{"path": f"/d/{cid}", "capacity": capacity, "used": used, "state": "ok"}]
    await ctx.etcd.put(ctx.keys.chunk_info(cid), ChunkInfo(
        chunk_id=cid, hostname=f"host-{cid}", address="127.0.0.1", data_port=1, portal="127.0.0.1:3260",
        labels=labels or {}, disks=disks).encode())
    if live:
        lease = lease or await ctx.etcd.lease(30)
        await ctx.etcd.put(ctx.keys.chunk_live(cid), ChunkLive(
            chunk_id=cid, pid=os.getpid(), started=now(), lease_ttl=30, disks=disks).encode(), lease=lease)


def make_ctx(etcd_client, etcd_config, **kw) -> Ctx:
    return Ctx(etcd=etcd_client, keys=Keys(etcd_config.prefix), **kw)
