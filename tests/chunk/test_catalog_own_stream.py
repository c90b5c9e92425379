"""The catalog's watches on a watch stream of their own (chunk/catalog.py, zstore/etcd.py).

etcd >= 3.5.8 answers a progress request only once every watch of the stream it came on is
synced. The catalog's watches shared the client's stream with the chunk server's other
watches, so one of those catching up held the answer back: the catalog, current all along,
went stale and logins were refused. etcd here is 3.4.23, which answers at once; the hold is
simulated at the client's shared stream (its answers to progress requests are dropped, as
they never come while a watch there catches up), with writes elsewhere in etcd so that the
catalog needs the answer to be confirmed.
"""

from __future__ import annotations

import asyncio

from chunk import catalog as catalog_mod
from chunk.catalog import Catalog
from meta import exports
from tests.chunk.catalog_setup import H1, acl_mirrored, running_catalog
from tests.cluster import async_wait_for
from tests.meta.helpers import make_ctx, register_chunk
from zstore import etcd as zetcd
from zstore.config import EtcdConfig

BOUND = 1.0


def _hold_shared_progress(client: zetcd.Client) -> None:
    """The client's shared stream never answers a progress request from now on."""
    shared = client._watcher                                        # noqa: SLF001
    real = shared._progress                                         # noqa: SLF001

    async def held(watch_id: int, revision: int) -> None:
        if watch_id != -1:
            await real(watch_id, revision)
    shared._progress = held                                         # noqa: SLF001


async def test_a_progress_answer_held_on_the_shared_stream_keeps_logins_allowed(etcd_client, etcd_config):
    ctx = make_ctx(etcd_client, etcd_config)
    await register_chunk(ctx, "c0")
    other: list = []

    async def on_other(*_):
        other.append(1)
    stop = asyncio.Event()
    # Another watch of the client, on the shared stream (as a volume's extents are followed).
    elsewhere = asyncio.ensure_future(zetcd.watch_prefix(
        etcd_client, etcd_config.prefix.encode() + b"/elsewhere/", on_other, on_other, stop))
    cat = Catalog(etcd_client, ctx.keys, stale_after=BOUND)
    went_stale: list[bool] = []
    cat.on_stale(went_stale.append)
    await cat.start(stop)
    try:
        _hold_shared_progress(etcd_client)
        confirmed = cat._confirmed                                  # noqa: SLF001
        loop = asyncio.get_running_loop()
        deadline, i = loop.time() + 3 * BOUND, 0
        while loop.time() < deadline:                 # etcd's revision moves on, not the catalog
            await etcd_client.put(etcd_config.prefix.encode() + b"/elsewhere/k", str(i).encode())
            i += 1
            await asyncio.sleep(0.02)
        assert went_stale == [] and cat.synced, "a current catalog went stale: logins refused"
        assert cat._confirmed > confirmed + BOUND, "not confirmed while etcd moved on"  # noqa: SLF001
        assert len(other) > 1                          # the other watch did follow its keys
    finally:
        stop.set()
        await cat.close()
        await asyncio.wait_for(elsewhere, 10)


async def test_the_catalog_follows_etcd_across_a_failover_on_its_own_stream(etcd_server, etcd_config):
    """A failover retires the catalog's stream with the shared one; it lists and watches
    again on the next endpoint's channel, and is confirmed there."""
    cfg = EtcdConfig(endpoints=[etcd_server.endpoint, f"localhost:{etcd_server.client_port}"],
                     prefix=etcd_config.prefix, timeout=3.0)
    client = zetcd.client(cfg)
    await client.connect()
    try:
        async with running_catalog(client, cfg, 5.0) as (ctx, cat, went_stale):   # a relist waits 1 s to retry
            vol, iqn = await acl_mirrored(ctx, cat)
            old = client._streams[catalog_mod.WATCH_STREAM]         # noqa: SLF001
            client._failover("test")                                # noqa: SLF001
            await exports.remove_acl(ctx, "v", H1)
            await async_wait_for(lambda: cat.lun_access(iqn, H1, vol.lun) is None, 5,
                                 "the ACL removal mirrored after the failover")
            new = client._streams.get(catalog_mod.WATCH_STREAM)     # noqa: SLF001
            assert new is not None and new is not old
            confirmed = cat._confirmed                              # noqa: SLF001
            await exports.add_acl(ctx, "v", H1)                     # the revision moves on
            await async_wait_for(lambda: cat._confirmed > confirmed, 5, "confirmed after the failover")  # noqa: SLF001
            assert went_stale == [] and cat.synced
    finally:
        await client.delete_prefix(cfg.prefix.encode() + b"/")
        await client.close()
