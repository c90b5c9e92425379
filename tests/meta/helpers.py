"""Test helpers for meta operations against a real etcd."""

from __future__ import annotations

import asyncio
import os
import time

from meta.context import Ctx
from zstore.keys import Keys
from zstore.records import ChunkAdmin, ChunkInfo, ChunkLive, Snapshot, Volume, VolumeOp, VolumeOwner, now

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


async def chunk_down(ctx: Ctx, cid: str, ago: float = 0.0) -> None:
    """The chunk server's lease is gone and the leader recorded it ``ago`` seconds back."""
    await ctx.etcd.delete(ctx.keys.chunk_live(cid))
    admin, _ = await ctx.get(ctx.keys.chunk_admin(cid), ChunkAdmin)
    admin = admin or ChunkAdmin(chunk_id=cid)
    admin.down_since = time.time() - ago
    await ctx.etcd.put(ctx.keys.chunk_admin(cid), admin.encode())


def make_ctx(etcd_client, etcd_config, **kw) -> Ctx:
    return Ctx(etcd=etcd_client, keys=Keys(etcd_config.prefix), **kw)


async def register_zones(ctx: Ctx, zones: dict[str, str]) -> Ctx:
    """Register a chunk server per entry of ``zones`` (chunk id -> its "zone" label)."""
    for cid, zone in zones.items():
        await register_chunk(ctx, cid, labels={"zone": zone})
    return ctx


async def own(ctx, vid, chunk_id, epoch=1, released=False):
    await ctx.etcd.put(ctx.keys.owner(vid), VolumeOwner(volume_id=vid, chunk_id=chunk_id, epoch=epoch,
                                                        released=released).encode())


class Executor:
    """Plays a coordinator running the volume ops assigned to ``chunk_id`` (docs/storage.md):
    one txn comparing its owner record, the volume, the snapshot and the op unchanged."""

    def __init__(self, ctx, chunk_id, fail: str | None = None, delay: float = 0.0):
        self.ctx, self.chunk_id, self.fail, self.delay = ctx, chunk_id, fail, delay
        self.ran: list[VolumeOp] = []
        self.stop = asyncio.Event()
        self.task: asyncio.Task | None = None

    async def __aenter__(self):
        self.task = asyncio.ensure_future(self.loop())
        return self

    async def __aexit__(self, *exc):
        self.stop.set()
        await self.task

    async def loop(self):
        ctx = self.ctx
        while not self.stop.is_set():
            for kv in await ctx.etcd.get_prefix(ctx.keys.all_volops()):
                op = VolumeOp.decode(kv.value)
                if op.executor == self.chunk_id and op.state == "pending":
                    await asyncio.sleep(self.delay)
                    await self.execute(op, kv.key, kv.mod_revision)
            await asyncio.sleep(0.02)

    async def execute(self, op, key, op_rev):
        ctx, t = self.ctx, self.ctx.etcd.transactions
        okey, vkey = ctx.keys.owner(op.volume_id), ctx.keys.volume(op.volume_id)
        skey = ctx.keys.snapshot(op.snapshot_id)
        _, orev = await ctx.get(okey, VolumeOwner)
        vol, vrev = await ctx.get(vkey, Volume)
        snap, srev = await ctx.get(skey, Snapshot)
        compare = [t.mod(okey) == orev, t.mod(vkey) == vrev, t.mod(key) == op_rev, t.mod(skey) == srev]
        if self.fail:
            op.state, op.error = "failed", self.fail
            ops = [t.put(key, op.encode())]
        elif op.kind == "snapshot":
            snap.seq, snap.state, snap.size = vol.snap_seq, "ready", vol.size   # size at the barrier
            vol.snap_seq += 1
            op.state = "done"
            ops = [t.put(vkey, vol.encode()), t.put(skey, snap.encode()), t.put(key, op.encode())]
        else:
            op.state = "done"                         # revert: the replicas would rewrite blocks here
            ops = [t.put(key, op.encode())]
        ok, _ = await ctx.etcd.transaction(compare=compare, success=ops, failure=[])
        if ok:
            self.ran.append(op)
