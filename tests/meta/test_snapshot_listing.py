"""GET /snapshots pages, looks snapshots up by name, and costs reads per page, not per snapshot.

The listing was one answer of every snapshot, with an etcd read of the volume record per
snapshot; the CSI driver fetched it whole on every CreateSnapshot (to find one name) and
ListSnapshots. Now a page costs one Range for its records, one read per distinct volume and
one of the export pointers; ``volume`` + ``name`` and ``unique_name`` are lookups of a few
reads; a bad ``limit`` or ``start_after`` is 400; the CLI follows the pages.

The read counts come from the meta's own handlers served in-process over a real socket
against real etcd, with the etcd client's KV stub counting Range calls (every read is one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from meta import api, volops, volumes
from meta import server as meta_server
from meta.context import Ctx
from tests.cluster import async_wait_for, cluster
from tests.meta.helpers import make_ctx, register_chunk
from zstore import etcd as zetcd
from zstore.keys import Keys

# The meta server keys its app by strings too.
pytestmark = pytest.mark.filterwarnings("ignore:It is recommended to use web.AppKey")


class CountingKV:
    """The etcd client's KV stub, counting Range calls (get, range, paged listings)."""

    def __init__(self, stub):
        self._stub, self.ranges = stub, 0

    def Range(self, *a, **kw):                  # noqa: N802 - the gRPC method's name
        self.ranges += 1
        return self._stub.Range(*a, **kw)

    def __getattr__(self, name):
        return getattr(self._stub, name)


@dataclass
class InProcessMeta:
    ctx: Ctx
    kv: CountingKV
    url: str                                    # the API's base, .../api/v1
    session: aiohttp.ClientSession

    async def get(self, path: str, **query) -> tuple[int, dict, int]:
        """(status, body, etcd Range calls the request made)."""
        before = self.kv.ranges
        async with self.session.get(self.url + path, params={k: str(v) for k, v in query.items()}) as r:
            return r.status, await r.json(), self.kv.ranges - before


@contextlib.asynccontextmanager
async def meta_in_process(etcd_config):
    """The meta API's handlers and error middleware on a real socket, on a counting client."""
    client = zetcd.client(etcd_config)
    await client.connect()
    kv = client.kvstub = CountingKV(client.kvstub)
    ctx = Ctx(etcd=client, keys=Keys(etcd_config.prefix))
    app = web.Application(middlewares=[meta_server.errors_mw])
    app.add_routes(api.routes)
    app["ctx"], app["config"] = ctx, None
    srv = TestServer(app, host="127.0.0.1")
    await srv.start_server()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            yield InProcessMeta(ctx, kv, f"http://127.0.0.1:{srv.port}{api.PREFIX}", session)
    finally:
        await srv.close()
        await client.close()


@pytest.fixture
async def ctx(etcd_client, etcd_config):
    c = make_ctx(etcd_client, etcd_config)
    await register_chunk(c, "c0")
    return c


@pytest.fixture
async def meta(ctx, etcd_config):
    async with meta_in_process(etcd_config) as m:
        yield m


async def snapshots_of(ctx, vol: str, n: int, prefix: str = "s") -> list[str]:
    """``n`` ready snapshots of ``vol`` (their ids)."""
    return [(await volops.create_snapshot(ctx, vol, f"{prefix}{i:03d}", unique=True))[0].snapshot_id
            for i in range(n)]


async def all_pages(meta: InProcessMeta, **query) -> tuple[list[dict], list[int]]:
    """Every snapshot over the pages, and the Range calls each page cost."""
    out, costs, token = [], [], None
    while True:
        status, page, cost = await meta.get("/snapshots", **query, **({"start_after": token} if token else {}))
        assert status == 200, page
        out += page["snapshots"]
        costs.append(cost)
        token = page["next"]
        if token is None:
            return out, costs


async def test_pages_return_every_snapshot_once_at_reads_per_page(ctx, meta):
    made = []
    for v in ("a", "b", "c"):
        await volumes.create_volume(ctx, v, "1Gi", 1)
        made += await snapshots_of(ctx, v, 12, prefix=f"{v}-")
    # A tombstone (deleted, kept for its clone) is no snapshot: not listed, and not counted
    # against the page it falls in.
    await volops.create_snapshot(ctx, "a", "dead")
    await volumes.create_volume(ctx, "clone", None, 1, source_snapshot="a@dead")
    await volumes.delete_snapshot(ctx, "a", "dead")
    assert len(await ctx.list_raw(ctx.keys.snapshots(), keys_only=True)) == 37      # the tombstone is kept

    listed, costs = await all_pages(meta, limit=10)
    ids = [s["snapshot_id"] for s in listed]
    assert sorted(ids) == sorted(made) and len(ids) == len(set(ids)) == 36
    assert ids == sorted(ids)                                    # key order: stable across pages
    assert len(costs) == 4                                       # 36 in pages of 10
    assert {s["volume"] for s in listed} == {"a", "b", "c"}
    # A page: its Range (two when a tombstone is skipped), the export pointers, one read per
    # distinct volume (3). Unpaged, every snapshot cost a read of its volume.
    assert max(costs) <= 1 + 1 + 1 + 3, costs

    one_volume, costs = await all_pages(meta, volume="b", limit=5)
    assert [s["name"] for s in one_volume] == [f"b-{i:03d}" for i in range(12)]
    assert {s["volume"] for s in one_volume} == {"b"} and len(costs) == 3
    # By id it reaches the snapshots of a deleted volume, as CSI lists them.
    await volumes.delete_volume(ctx, "c")
    c_id = next(s["volume_id"] for s in listed if s["volume"] == "c")
    of_c, _ = await all_pages(meta, volume=c_id, limit=7)
    assert len(of_c) == 12 and {s["volume"] for s in of_c} == {None}


async def test_lookups_by_name_cost_the_same_however_many_snapshots(ctx, meta):
    await volumes.create_volume(ctx, "v", "1Gi", 1)
    await volumes.create_volume(ctx, "w", "1Gi", 1)
    mine, _ = await volops.create_snapshot(ctx, "v", "mine", unique=True)
    await volops.create_snapshot(ctx, "w", "cli-name")           # per-volume only (the CLI's)

    async def lookups():
        got = [await meta.get("/snapshots", volume="v", name="mine"),
               await meta.get("/snapshots", unique_name="mine"),
               await meta.get("/snapshots", unique_name="cli-name"),
               await meta.get("/snapshots", volume="w", name="cli-name"),
               await meta.get("/snapshots", volume="v", name="nope")]
        assert all(status == 200 and body["next"] is None for status, body, _ in got)
        return [[s["snapshot_id"] for s in body["snapshots"]] for _, body, _ in got], [c for *_, c in got]

    found, few = await lookups()
    assert found[:2] == [[mine.snapshot_id], [mine.snapshot_id]]
    assert found[2] == [] and len(found[3]) == 1 and found[4] == []
    await snapshots_of(ctx, "w", 40)
    found_again, many = await lookups()
    assert found_again == found
    assert many == few and max(many) <= 6, (few, many)


@pytest.mark.parametrize("query, words", [
    ({"limit": "0"}, "invalid limit 0: must be 1..1000"),
    ({"limit": "1001"}, "invalid limit 1001"),
    ({"limit": "ten"}, "invalid limit 'ten': must be a number"),
    ({"start_after": "not-a-token"}, "invalid start_after 'not-a-token'"),
    ({"volume": "v", "start_after": "0" * 32}, "invalid start_after"),     # the all-listing's
    ({"volume": "v", "start_after": "f" * 32 + ":s001"}, "invalid start_after"),   # another volume's
    ({"name": "s"}, "name needs volume"),
])
async def test_bad_paging_input_is_400(ctx, meta, query, words):
    await volumes.create_volume(ctx, "v", "1Gi", 1)
    status, body, _ = await meta.get("/snapshots", **query)
    assert status == 400 and words in body["error"]["message"], body


async def test_a_volume_token_resumes_its_own_listing(ctx, meta):
    await volumes.create_volume(ctx, "v", "1Gi", 1)
    await snapshots_of(ctx, "v", 3)
    status, page, _ = await meta.get("/snapshots", volume="v", limit=2)
    assert status == 200 and [s["name"] for s in page["snapshots"]] == ["s000", "s001"]
    status, rest, _ = await meta.get("/snapshots", volume="v", limit=2, start_after=page["next"])
    assert status == 200 and [s["name"] for s in rest["snapshots"]] == ["s002"] and rest["next"] is None


@pytest.mark.slow
async def test_real_meta_pages_and_the_cli_lists_every_snapshot(tmp_path, etcd_server, etcd_client):
    with cluster(tmp_path, etcd_server, metas=1) as c:
        ctx = Ctx(etcd=etcd_client, keys=Keys(c.prefix))
        await register_chunk(ctx, "c0")
        await async_wait_for(lambda: c.api("GET", "/meta/leader")[0] == 200, 20, "a leader")
        await volumes.create_volume(ctx, "v", "1Gi", 1)
        await volumes.create_volume(ctx, "w", "1Gi", 1)
        made = await snapshots_of(ctx, "v", 130) + await snapshots_of(ctx, "w", 5, prefix="w")
        api = lambda *a: asyncio.to_thread(c.api, *a)           # noqa: E731
        status, first = await api("GET", "/snapshots")
        assert status == 200 and len(first["snapshots"]) == 100 and first["next"]   # the default page
        status, body = await api("GET", "/snapshots?start_after=zz")
        assert status == 400 and "invalid start_after 'zz'" in body["error"]["message"]

        r = await asyncio.to_thread(c.cli, "snapshot", "list", "--json")
        assert r.returncode == 0, r.stderr
        listed = json.loads(r.stdout)
        assert sorted(s["snapshot_id"] for s in listed) == sorted(made) and len(listed) == 135
        assert [s["name"] for s in listed if s["volume"] == "v"] == [f"s{i:03d}" for i in range(130)]
        r = await asyncio.to_thread(c.cli, "snapshot", "list", "v", "--json")
        assert r.returncode == 0 and len(json.loads(r.stdout)) == 130, r.stderr
        r = await asyncio.to_thread(c.cli, "volume", "clone", "v@s129", "copy", "--replicas", "1")
        assert r.returncode == 0 and "copy" in r.stdout, r.stderr          # found on the 2nd page
