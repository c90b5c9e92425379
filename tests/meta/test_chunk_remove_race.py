"""Removing a chunk server (DELETE /chunks/{id}) races with placement and recovery joins.

The removal checks that no extent record lists the server in sync, then deletes its records.
Before, the delete's transaction compared only the server's own keys: a recovery join (or a new
extent's placement) that put a replica on it between the check and the delete went unseen, and
the extent then listed a server that no longer existed. Now the delete also requires that no
extent record was put since the check read the map; and placement and join require the
server's info key, so a server removed first gets no replica after.

Real etcd; each step is driven in order by a Ctx whose ``txn`` runs the competing change just
before the transaction under test.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from meta import api, extents, server
from meta.context import Ctx
from tests.meta.helpers import chunk_down, make_ctx, register_chunk
from zstore.errors import NotFound
from zstore.records import ExtentRecord, Volume

HOSTS = {c: {"host": f"h-{c}"} for c in ("c1", "c2", "c3")}


class Before(Ctx):
    """Runs ``step`` (on another Ctx) before each of its first ``times`` transactions."""
    step: Callable[[], Awaitable[Any]]
    times: int = 1

    async def txn(self, compare: list, success: list) -> bool:
        if self.times > 0:
            self.times -= 1
            await self.step()
        return await super().txn(compare, success)


def before(base: Ctx, step: Callable[[], Awaitable[Any]], times: int = 1) -> Before:
    ctx = Before(etcd=base.etcd, keys=base.keys)
    ctx.step, ctx.times = step, times
    return ctx


async def delete_chunk(ctx: Ctx, etcd_config: Any, cid: str, force: bool = False) -> tuple[int, dict]:
    """DELETE /api/v1/chunks/{cid} on the meta's real handler, served by ``ctx``."""
    app = web.Application(middlewares=[server.errors_mw])
    app["config"] = SimpleNamespace(etcd=etcd_config)
    app["ctx"] = ctx
    app.router.add_delete(api.PREFIX + "/chunks/{id}", api.chunk_remove)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        r = await client.delete(api.PREFIX + f"/chunks/{cid}", params={"force": "1"} if force else {},
                                timeout=30)
        return r.status, await r.json()


async def volume(ctx: Ctx, vid: str, replicas: int, placement: list[str]) -> None:
    await ctx.etcd.put(ctx.keys.volume(vid), Volume(volume_id=vid, name=f"vol-{vid}", size=2**30,
                                                    replicas=replicas, placement=placement).encode())


@pytest.fixture
async def base(etcd_client, etcd_config) -> Ctx:
    ctx = make_ctx(etcd_client, etcd_config)
    for cid, labels in HOSTS.items():
        await register_chunk(ctx, cid, labels=labels)
    return ctx


async def test_a_join_onto_the_server_between_check_and_delete_fails_the_delete(base, etcd_config):
    # v1's extent 0 is down to one replica (c2); c1 is down and holds nothing: removable, until
    # recovery's copy to c1 joins while the removal is between its check and its delete.
    await volume(base, "v1", 2, ["c1", "c2"])
    await base.etcd.put(base.keys.extent("v1", 0), ExtentRecord(
        volume_id="v1", index=0, replicas=["c2"], generation=3, stale={"c1": 2}).encode())
    await chunk_down(base, "c1")

    async def join() -> None:
        await extents.join(base, "v1", 0, "c1", 3)

    status, body = await delete_chunk(before(base, join), etcd_config, "c1")
    assert status == 409, body
    assert body["error"]["code"] == "conflict"
    assert "holds replicas of 1 volume(s): vol-v1" in body["error"]["message"]
    assert await base.get_raw(base.keys.chunk_info("c1")) is not None     # still registered
    rec, _ = await extents.get_extent(base, "v1", 0)
    assert rec.replicas == ["c2", "c1"]


async def test_a_write_elsewhere_in_the_extent_map_only_costs_a_fresh_read(base, etcd_config):
    await volume(base, "v2", 1, ["c2"])
    await chunk_down(base, "c1")
    index = iter(range(100))

    async def allocate_elsewhere() -> None:       # another volume's extents, never on c1
        await extents.allocate(base, "v2", next(index))

    status, body = await delete_chunk(before(base, allocate_elsewhere), etcd_config, "c1")
    assert (status, body) == (200, {"removed": "c1"})
    assert await base.get_raw(base.keys.chunk_info("c1")) is None
    # The extent map changing before every attempt: 409, retry, and the server stays.
    await chunk_down(base, "c3")
    status, body = await delete_chunk(before(base, allocate_elsewhere, times=100), etcd_config, "c3")
    assert status == 409, body
    assert "kept changing" in body["error"]["message"] and body["error"]["details"]["retry"] is True
    assert await base.get_raw(base.keys.chunk_info("c3")) is not None


async def test_a_placement_committing_after_the_removal_avoids_the_removed_server(base, etcd_config):
    # The allocation lists c1 as up and plans [c1, c2]; c1 is removed (forced: it is still up)
    # before the allocation's transaction. It must place again, not on c1.
    await volume(base, "v3", 2, ["c1", "c2"])

    async def remove_c1() -> None:
        status, body = await delete_chunk(base, etcd_config, "c1", force=True)
        assert status == 200, body

    rec, created = await extents.allocate(before(base, remove_c1), "v3", 0)
    assert created and "c1" not in rec.replicas and sorted(rec.replicas) == ["c2", "c3"]


async def test_a_join_committing_after_the_removal_is_refused(base, etcd_config):
    await volume(base, "v4", 2, ["c1", "c2"])
    await base.etcd.put(base.keys.extent("v4", 0), ExtentRecord(
        volume_id="v4", index=0, replicas=["c2"], generation=2, stale={"c1": 1}).encode())

    async def remove_c1() -> None:
        status, body = await delete_chunk(base, etcd_config, "c1", force=True)
        assert status == 200, body

    with pytest.raises(NotFound, match="chunk server 'c1' not found"):
        await extents.join(before(base, remove_c1), "v4", 0, "c1", 2)
    rec, _ = await extents.get_extent(base, "v4", 0)
    assert rec.replicas == ["c2"]
