"""The catalog's "confirmed current" probe and a stalled watch that misses an IN-PLACE change
(chunk/catalog.py).

The probe compared each section's number of keys with etcd's: a put to an existing key
(a CHAP secret changed, an ACL entry rewritten read-only) on a stalled watch left the
count as it was, so the old secret kept working under a mirror counted as current; and
etcd counted every key of every section per probe. Now the probe reads etcd's revision
from one key and asks, on the watch stream, for each watch's progress: a section whose
stream delivers neither events nor the progress marker up to that revision makes the
mirror stale, whatever the change. (Key counts came back as a second condition for etcd
3.4, test_catalog_probe_count.py, but count-only: the probe's requests and replies still
do not grow with the catalog.)

The stall is simulated as in test_catalog_probe_revision.py: the section's stream (its
events and progress markers) is dropped before the mirror.
"""

from __future__ import annotations

import asyncio

from chunk.catalog import Catalog
from meta import exports, volumes
from tests.chunk.catalog_setup import H1, acl_mirrored, running_catalog, stall as _stall
from tests.cluster import async_wait_for

BOUND = 1.0


async def _served_while_synced(cat: Catalog, old_served) -> bool:
    """Whether, ``3 * BOUND`` on, the mirror still counts as current and serves the old."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3 * BOUND
    while loop.time() < deadline and cat.synced and old_served():
        await asyncio.sleep(0.05)
    return cat.synced and old_served()


async def _set_chap(ctx, secret: str, initiator: str = H1) -> None:
    await exports.set_chap(ctx, {"target": "*", "initiator": initiator, "user": "u", "secret": secret})


async def test_an_in_place_chap_change_on_a_stalled_watch_is_caught(etcd_client, etcd_config):
    async with running_catalog(etcd_client, etcd_config, BOUND) as (ctx, cat, _):
        await volumes.create_volume(ctx, "v", "1Gi", 1)
        iqn = (await exports.list_targets(ctx))[0]["iqn"]
        await _set_chap(ctx, "old-secret-123")
        await async_wait_for(lambda: cat.chap_for(iqn, H1), 5, "CHAP mirrored")
        _stall(cat, "chap")
        await _set_chap(ctx, "new-secret-456")                          # same key, new value
        assert not await _served_while_synced(
            cat, lambda: cat.chap_for(iqn, H1).secret == "old-secret-123"), \
            "the replaced CHAP secret is still served by a mirror counted as current"


async def test_an_acl_entry_rewritten_read_only_on_a_stalled_watch_is_caught(etcd_client, etcd_config):
    async with running_catalog(etcd_client, etcd_config, BOUND) as (ctx, cat, _):
        vol, iqn = await acl_mirrored(ctx, cat)
        _stall(cat, "acl")
        await exports.add_acl(ctx, "v", H1, readonly=True)              # same key, read-only now
        assert not await _served_while_synced(
            cat, lambda: not cat.lun_access(iqn, H1, vol.lun).readonly), \
            "the initiator may still write through a mirror counted as current"


async def test_a_chap_record_deleted_on_a_stalled_watch_is_caught(etcd_client, etcd_config):
    async with running_catalog(etcd_client, etcd_config, BOUND) as (ctx, cat, _):
        await volumes.create_volume(ctx, "v", "1Gi", 1)
        iqn = (await exports.list_targets(ctx))[0]["iqn"]
        await _set_chap(ctx, "old-secret-123")
        await async_wait_for(lambda: cat.chap_for(iqn, H1), 5, "CHAP mirrored")
        _stall(cat, "chap")
        await exports.clear_chap(ctx, "*", H1)
        assert not await _served_while_synced(cat, lambda: cat.chap_for(iqn, H1) is not None), \
            "the deleted CHAP record is still served by a mirror counted as current"


def _shape(req) -> bytes:
    """A request without the revisions it reads at (those move on between probes)."""
    req = type(req).FromString(req.SerializeToString())
    ranges = [op.request_range for op in req.success] if hasattr(req, "success") else [req]
    for r in ranges:
        r.revision = 0
    return req.SerializeToString()


class _RecordingKV:
    """etcd's KV stub, recording each call: its method, its request's shape, and how many
    keys the reply carries (what goes over the wire; a count-only range carries none)."""

    def __init__(self, stub, calls: list):
        self._stub, self._calls = stub, calls

    def __getattr__(self, name):
        method = getattr(self._stub, name)

        async def call(req, **kw):
            reply = await method(req, **kw)
            ranges = [r.response_range for r in reply.responses] if name == "Txn" else [reply]
            self._calls.append((name, _shape(req), [len(r.kvs) for r in ranges]))
            return reply
        return call


async def test_the_probe_asks_etcd_the_same_with_50_and_500_keys(etcd_client, etcd_config, monkeypatch):
    async with running_catalog(etcd_client, etcd_config, None) as (ctx, cat, _):   # probed by hand
        calls: list = []
        monkeypatch.setattr(etcd_client, "kvstub", _RecordingKV(etcd_client.kvstub, calls))
        real_progress = etcd_client.request_progress

        async def request_progress(*a, **kw):
            calls.append(("progress",))
            await real_progress(*a, **kw)
        monkeypatch.setattr(etcd_client, "request_progress", request_progress)

        async def probe_with(n: int) -> list:
            for i in range(len(cat.chap), n):
                await _set_chap(ctx, "secret-0123456", f"iqn.2004-10.com.example:h{i}")
            await async_wait_for(lambda: len(cat.chap) == n, 10, f"{n} CHAP records mirrored")
            calls.clear()
            before = cat._confirmed                                     # noqa: SLF001
            await cat._probe(5.0)                                       # noqa: SLF001
            assert cat._confirmed > before, "a healthy mirror was not confirmed current"  # noqa: SLF001
            return list(calls)
        with_50 = await probe_with(50)
        with_500 = await probe_with(500)
        assert with_50 == with_500, "the probe's etcd requests grow with the catalog"
        assert ("progress",) in with_50
