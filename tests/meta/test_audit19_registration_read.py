"""Duplicates D12: the liveness follower's two handlers read a chunk server's keys one way.

``chunks.mark_registration`` (an info write seen) and ``chunks.restore_outage`` (its marker's
own event seen) each read the same three keys (info, live, admin) with the same lines and
built the same compares on them. Both now go through ``chunks.registration_state``: what it
reports is what both act on, and the compares it gives are what both write under.
"""

from __future__ import annotations

import time

import pytest

from meta import chunks
from tests.meta.helpers import chunk_down, make_ctx, register_chunk
from zstore.records import ChunkAdmin


@pytest.fixture
async def ctx(etcd_client, etcd_config):
    return make_ctx(etcd_client, etcd_config)


async def _down_then_registered_again(ctx, cid="c0"):
    """``cid`` recorded down an hour ago, then registered again without coming up."""
    await register_chunk(ctx, cid)
    await chunk_down(ctx, cid, ago=3600)
    await register_chunk(ctx, cid, live=False)


async def test_both_handlers_act_on_the_one_read(ctx, monkeypatch):
    """The server is down in etcd, but the one read reports it live: neither handler writes."""
    await _down_then_registered_again(ctx)
    real = chunks.registration_state

    async def seen_live(c, cid):
        reg = await real(c, cid)
        reg.live = True
        return reg

    monkeypatch.setattr(chunks, "registration_state", seen_live)
    before = await ctx.get(ctx.keys.chunk_admin("c0"), ChunkAdmin)
    assert await chunks.mark_registration(ctx, "c0") is None
    info = await ctx.etcd.get(ctx.keys.chunk_info("c0"))
    pending = chunks.Pending(start=time.time() - 3600, marker=1, info_rev=info.mod_revision)
    assert await chunks.restore_outage(ctx, "c0", pending) is None
    assert await ctx.get(ctx.keys.chunk_admin("c0"), ChunkAdmin) == before


async def test_the_marker_and_its_restore_write_under_the_compares_of_the_read(ctx):
    """The marker, then the start written back, each compared on the three keys as read:
    the server coming up between the read and the write fails the write."""
    await _down_then_registered_again(ctx)
    admin, _ = await ctx.get(ctx.keys.chunk_admin("c0"), ChunkAdmin)
    pending = await chunks.mark_registration(ctx, "c0")
    assert pending is not None and pending.start == admin.down_since
    assert (await ctx.get(ctx.keys.chunk_admin("c0"), ChunkAdmin))[0].down_since is None    # the marker
    reg = await chunks.registration_state(ctx, "c0")
    assert not reg.live and reg.admin.down_since is None and reg.info.mod_revision == pending.info_rev
    await register_chunk(ctx, "c0", live=True)                          # up: info rewritten too
    assert not await ctx.txn(reg.compare, [])
    assert await chunks.restore_outage(ctx, "c0", pending) == chunks.Pending(
        start=pending.start, marker=0, info_rev=(await ctx.etcd.get(ctx.keys.chunk_info("c0"))).mod_revision)
    assert await chunks.registration_state(ctx, "nobody") is None
