"""The meta API's error answers, in-process against a real etcd (no meta processes)."""

from __future__ import annotations

from types import SimpleNamespace

import grpc
import pytest
from aetcd import exceptions as aetcd_exc
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from meta import server


async def _call(etcd_config, handler):
    app = web.Application(middlewares=[server.errors_mw])
    app["config"] = SimpleNamespace(etcd=etcd_config)
    app.router.add_post("/x", handler)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        r = await client.post("/x", timeout=10)
        return r.status, await r.json()


async def test_an_etcd_timeout_after_a_write_says_it_may_have_been_applied(etcd_client, etcd_config):
    key = etcd_config.prefix.encode() + b"/written"

    async def handler(request):
        await etcd_client.put(key, b"1")                   # committed...
        raise aetcd_exc.ConnectionTimeoutError("deadline exceeded")   # ...then etcd stalls
    status, body = await _call(etcd_config, handler)
    assert (await etcd_client.get(key)).value == b"1"
    assert status == 503, body
    err = body["error"]
    assert err["code"] == "unavailable"
    assert "nothing was changed" not in (err.get("hint") or "")
    assert err["details"]["maybe_applied"] is True


def _not_sent_error():
    rpc = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                               details="failed to connect to all addresses")
    try:
        raise aetcd_exc.ConnectionFailedError("unavailable") from rpc
    except aetcd_exc.ConnectionFailedError as e:
        return e


async def test_a_connect_failure_before_any_write_says_nothing_was_changed(etcd_config):
    async def handler(request):
        raise _not_sent_error()
    status, body = await _call(etcd_config, handler)
    assert status == 503, body
    assert "nothing was changed" in body["error"]["hint"]
    assert body["error"]["details"]["maybe_applied"] is False


async def test_a_connect_failure_after_a_transaction_may_have_been_applied(etcd_client, etcd_config):
    from tests.meta.helpers import make_ctx
    ctx = make_ctx(etcd_client, etcd_config)
    ctx = getattr(server, "TrackingCtx", type(ctx))(etcd=ctx.etcd, keys=ctx.keys)
    key = etcd_config.prefix.encode() + b"/txn"

    async def handler(request):
        assert await ctx.txn([], [ctx.put(key, b"1")])       # committed (the revert's write)
        raise _not_sent_error()                             # a later poll cannot connect
    status, body = await _call(etcd_config, handler)
    assert status == 503, body
    assert "nothing was changed" not in (body["error"].get("hint") or "")
    assert body["error"]["details"]["maybe_applied"] is True


async def test_a_size_rounded_above_max_size_is_400_not_created(etcd_client, etcd_config):
    from meta import volumes
    from tests.meta.helpers import make_ctx, register_chunk
    from zstore.errors import InvalidArgument
    ctx = make_ctx(etcd_client, etcd_config)
    for cid in ("c1", "c2", "c3"):
        await register_chunk(ctx, cid)
    # 1,000,000 bytes rounds up to 1 MiB (1,048,576), above max_size: no MiB multiple fits.
    with pytest.raises(InvalidArgument, match="outside the range"):
        await volumes.create_volume(ctx, "a", 1000000, replicas=1, max_size=1000000)
    with pytest.raises(InvalidArgument):
        await volumes.create_volume(ctx, "a", 1000000, replicas=1, max_size=1000000)
    assert await ctx.get_raw(ctx.keys.volume_name("a")) is None
    with pytest.raises(InvalidArgument):        # below min_size: 2 MiB asked at least 3 MiB
        await volumes.create_volume(ctx, "b", 2 * 2**20, replicas=1, min_size=3 * 2**20)
    vol, created = await volumes.create_volume(ctx, "c", 1000000, replicas=1, min_size=1000000,
                                               max_size=2 * 2**20)
    assert created and vol.size == 2**20


async def _post_volumes(ctx, etcd_config, data: bytes, content_type: str = "application/json"):
    from meta import api
    app = web.Application(middlewares=[server.errors_mw])
    app["config"] = SimpleNamespace(etcd=etcd_config)
    app["ctx"] = ctx
    app.router.add_post(api.PREFIX + "/volumes", api.volume_create)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        r = await client.post(api.PREFIX + "/volumes", data=data, headers={"Content-Type": content_type},
                              timeout=30)
        return r.status, await r.json()


@pytest.mark.parametrize("data,ctype", [
    (b'{"name": "a", "size": ' + b"9" * 5000 + b"}", "application/json"),   # int > 4300 digits
    (b"[" * 100000 + b"]" * 100000, "application/json"),                   # nested too deep
    (b'{"name": "a", "size": "1Gi"}', "application/json; charset=bogus"),  # unknown charset
], ids=["huge-int", "deep-nesting", "bogus-charset"])
async def test_bodies_python_cannot_parse_are_400_not_500(etcd_client, etcd_config, data, ctype):
    from tests.meta.helpers import make_ctx
    ctx = make_ctx(etcd_client, etcd_config)
    status, body = await _post_volumes(ctx, etcd_config, data, ctype)
    assert status == 400 and body["error"]["code"] == "invalid_argument", body


async def test_a_non_string_source_snapshot_on_a_clone_name_is_400_not_500(etcd_client, etcd_config):
    import json
    from tests.meta.helpers import make_ctx
    from zstore.records import Volume
    ctx = make_ctx(etcd_client, etcd_config)
    await etcd_client.put(ctx.keys.volume("vid1"), Volume(volume_id="vid1", name="a", size=2**30, replicas=1,
                                                          source_snapshot="sid1").encode())
    await etcd_client.put(ctx.keys.volume_name("a"), b"vid1")
    status, body = await _post_volumes(ctx, etcd_config, json.dumps(
        {"name": "a", "size": "1Gi", "replicas": 1, "source_snapshot": 5}).encode())
    assert status == 400 and body["error"]["code"] == "invalid_argument", body


async def test_removing_a_chunk_that_registers_again_meanwhile_keeps_its_records(etcd_client, etcd_config):
    from meta import chunks
    from meta.context import Ctx
    from tests.meta.helpers import chunk_down, make_ctx, register_chunk
    from zstore.errors import Conflict
    from zstore.records import ChunkLive, now

    base = make_ctx(etcd_client, etcd_config)
    await register_chunk(base, "c1")
    await chunk_down(base, "c1")

    class ReRegistering(Ctx):
        """The chunk server's live key comes back just before the delete's transaction."""
        async def txn(self, compare, success):
            await self.etcd.put(self.keys.chunk_live("c1"), ChunkLive(
                chunk_id="c1", pid=1, started=now(), lease_ttl=30).encode())
            return await super().txn(compare, success)

    ctx = ReRegistering(etcd=base.etcd, keys=base.keys)
    with pytest.raises(Conflict):
        await chunks.remove_chunk(ctx, "c1", False)
    assert await base.get_raw(base.keys.chunk_info("c1")) is not None
    assert await base.get_raw(base.keys.chunk_live("c1")) is not None
    # Untouched meanwhile, a down chunk server holding nothing is removed.
    await chunk_down(base, "c1")
    assert await chunks.remove_chunk(base, "c1", False) == "c1"
    assert await base.get_raw(base.keys.chunk_info("c1")) is None
