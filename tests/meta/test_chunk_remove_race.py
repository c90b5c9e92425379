"""Removing a chunk server (DELETE /chunks/{id}) races with placement and recovery joins.

The removal checks that no extent record lists the server in sync, then deletes its records.
Before, the delete's transaction compared only the server's own keys: a recovery join (or a new
extent's placement) that put a replica on it between the check and the delete went unseen, and
the extent then listed a server that no longer existed. Now the removal first marks the server
as being removed (one transaction), then reads the extent map once, then deletes if none of the
server's keys changed since its mark; placement and join require the server's info key and no
mark, so no replica lands on it once marked or removed. Writes to other extents meanwhile do
not fail the removal (an earlier fix compared the whole extent map: they did).

Real etcd; each step is driven in order by a Ctx whose ``txn`` runs the competing change just
before the transaction under test.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from meta import api, chunks, extents, server
from meta.context import Ctx
from tests.meta.helpers import chunk_down, make_ctx, register_chunk
from zstore.errors import Conflict, NotFound
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


async def test_writes_elsewhere_in_the_extent_map_do_not_fail_the_removal(base, etcd_config):
    # Another volume's extents allocated (never on c1) before each of the removal's
    # transactions. Before, the delete required that no extent record at all was put since
    # the map was read: this answered 409 after 5 attempts (each re-reading the whole map).
    # Now the guard is at the server (a removing marker placement and join respect).
    await volume(base, "v2", 1, ["c2"])
    await chunk_down(base, "c1")
    index = iter(range(100))

    async def allocate_elsewhere() -> None:       # another volume's extents, never on c1
        await extents.allocate(base, "v2", next(index))

    status, body = await delete_chunk(before(base, allocate_elsewhere, times=100), etcd_config, "c1")
    assert (status, body) == (200, {"removed": "c1"})
    assert await base.get_raw(base.keys.chunk_info("c1")) is None
    assert await base.etcd.get(chunks.removing_key(base, "c1")) is None


async def test_the_servers_own_records_changing_on_every_attempt_answers_409(base, etcd_config):
    await chunk_down(base, "c3")

    async def register_again() -> None:           # its info put again, still down
        await register_chunk(base, "c3", labels=HOSTS["c3"], live=False)

    status, body = await delete_chunk(before(base, register_again, times=100), etcd_config, "c3")
    assert status == 409, body
    assert "kept changing" in body["error"]["message"] and body["error"]["details"]["retry"] is True
    assert await base.get_raw(base.keys.chunk_info("c3")) is not None
    assert await base.etcd.get(chunks.removing_key(base, "c3")) is None     # no marker left


def on_second_txn(step: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
    """``step`` run once, just before the second transaction (the removal's delete, after its
    mark and its read of the extent map)."""
    calls = iter(range(100))

    async def run() -> None:
        if next(calls) == 1:
            await step()
    return run


async def test_a_join_between_the_mark_and_the_delete_is_refused(base, etcd_config):
    await volume(base, "v5", 2, ["c1", "c2"])
    await base.etcd.put(base.keys.extent("v5", 0), ExtentRecord(
        volume_id="v5", index=0, replicas=["c2"], generation=3, stale={"c1": 2}).encode())
    await chunk_down(base, "c1")
    refused = []

    async def join() -> None:
        with pytest.raises(Conflict, match="being removed") as e:
            await extents.join(base, "v5", 0, "c1", 3)
        refused.append(e.value)

    status, body = await delete_chunk(before(base, on_second_txn(join), times=2), etcd_config, "c1")
    assert (status, body) == (200, {"removed": "c1"})
    assert len(refused) == 1
    rec, _ = await extents.get_extent(base, "v5", 0)
    assert rec.replicas == ["c2"]


async def test_a_placement_between_the_mark_and_the_delete_avoids_the_server(base, etcd_config):
    # c1 is up (so the removal is forced); the allocation lists it while it is being removed.
    await volume(base, "v6", 2, ["c1", "c2"])
    placed = []

    async def allocate() -> None:
        rec, created = await extents.allocate(base, "v6", 0)
        placed.append((created, sorted(rec.replicas)))

    status, body = await delete_chunk(before(base, on_second_txn(allocate), times=2), etcd_config,
                                      "c1", force=True)
    assert (status, body) == (200, {"removed": "c1"})
    assert placed == [(True, ["c2", "c3"])]


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


async def test_placement_and_join_that_listed_the_server_before_its_mark_are_refused(base):
    # The mark lands between their listing and their transaction: the compare catches it.
    await volume(base, "v7", 2, ["c1", "c2"])
    await base.etcd.put(base.keys.extent("v7", 1), ExtentRecord(
        volume_id="v7", index=1, replicas=["c2"], generation=3, stale={"c1": 2}).encode())

    async def mark_c1() -> None:
        await base.etcd.put(chunks.removing_key(base, "c1"), b"a removal")

    rec, created = await extents.allocate(before(base, mark_c1), "v7", 0)
    assert created and sorted(rec.replicas) == ["c2", "c3"]      # placed again, without c1
    with pytest.raises(Conflict, match="being removed"):
        await extents.join(before(base, mark_c1), "v7", 1, "c1", 3)
    rec, _ = await extents.get_extent(base, "v7", 1)
    assert rec.replicas == ["c2"]
