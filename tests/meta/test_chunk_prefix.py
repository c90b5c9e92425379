"""A chunk server id prefix that matches several servers is an error naming them
(409), not "not found"; a unique one acts on that server and answers its full id."""

from __future__ import annotations

import pytest

from meta import chunks
from tests.meta.helpers import make_ctx, register_chunk
from zstore.errors import Conflict, NotFound


@pytest.fixture
async def ctx(etcd_client, etcd_config):
    c = make_ctx(etcd_client, etcd_config)
    for cid in ("abcd1111", "abcd2222", "ffff0000"):
        await register_chunk(c, cid, live=False)
    return c


async def test_an_ambiguous_prefix_names_the_matches(ctx):
    with pytest.raises(Conflict) as e:
        await chunks.get_chunk(ctx, "abcd")
    assert e.value.status == 409
    assert "ambiguous" in e.value.message and "abcd1111, abcd2222" in e.value.message
    with pytest.raises(Conflict):
        await chunks.set_admin_state(ctx, "abcd", "draining")
    with pytest.raises(Conflict):
        await chunks.remove_chunk(ctx, "abcd", force=True)
    assert len(await chunks.list_chunks(ctx)) == 3          # nothing was removed


async def test_a_unique_prefix_or_full_id_finds_one_and_a_short_or_unknown_one_none(ctx):
    assert (await chunks.get_chunk(ctx, "abcd1")).chunk_id == "abcd1111"
    assert (await chunks.get_chunk(ctx, "ffff0000")).chunk_id == "ffff0000"
    assert (await chunks.set_admin_state(ctx, "ffff", "draining")).chunk_id == "ffff0000"
    for ref in ("abc", "0000", "nope"):
        with pytest.raises(NotFound):
            await chunks.get_chunk(ctx, ref)
    assert await chunks.remove_chunk(ctx, "ffff", force=False) == "ffff0000"
