"""MetaClient closed while a call retries, or called after close (engine.stop closes it right
after the replica client; a drop for a write the close drain gave up on can still be calling).

The retry loop used ``self._session`` afresh each round: closed meanwhile, it was None and the
call raised AttributeError (an INTERNAL TARGET FAILURE upstream, not the meta error the
coordinator maps); a call after close opened a new session nobody would close. Real etcd
holding the leader record, a real HTTP server answering 503 (a leader election)."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from chunk.storage.metaclient import MetaClient, MetaError
from zstore.keys import Keys
from zstore.records import LeaderRecord


@pytest.fixture
async def electing(etcd_client, etcd_config):
    """A meta leader record pointing at a server that answers 503 (electing) to everything."""
    calls = asyncio.Event()

    async def busy(request):
        calls.set()
        return web.json_response({"error": {"message": "electing"}}, status=503)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", busy)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    keys = Keys(etcd_config.prefix)
    await etcd_client.put(keys.leader(), LeaderRecord(meta_id="m", url=f"http://127.0.0.1:{port}",
                                                      epoch=1).encode())
    try:
        yield keys, calls
    finally:
        await runner.cleanup()


async def test_a_call_retrying_when_the_client_closes_fails_as_a_meta_error(etcd_client, electing):
    keys, calls = electing
    meta = MetaClient(etcd_client, keys, None, retry_for=30.0)
    call = asyncio.ensure_future(meta.call("POST", "/extents/v/0/drop", {}))
    await asyncio.wait_for(calls.wait(), 10)            # it is retrying a 503
    await meta.close()
    with pytest.raises(MetaError, match="closed"):
        await asyncio.wait_for(call, 5)                 # promptly, not after retry_for


async def test_a_call_after_close_opens_nothing(etcd_client, electing):
    keys, _ = electing
    meta = MetaClient(etcd_client, keys, None, retry_for=1.0)
    await meta.close()
    with pytest.raises(MetaError, match="closed"):
        await meta.call("GET", "/cluster")
    assert meta._session is None                        # noqa: SLF001 - nothing left to close
