"""``get_prefix_paged``: a prefix read in pages of a few keys, all at one revision.

Listings that grow with the data (every extent record) outgrow gRPC's reply limit in one
Range; read in pages they must still be one consistent snapshot, as one Range would be.
tests/meta/test_recovery_big_listing.py covers the callers.
"""

from __future__ import annotations

import pytest

from zstore import etcd as zetcd


class HookedKV:
    """The client's KV stub, running ``after_first`` once the first Range has answered."""

    def __init__(self, real, after_first):
        self.real, self.after_first, self.calls = real, after_first, []

    def __getattr__(self, name):
        return getattr(self.real, name)

    async def Range(self, req, **kw):
        resp = await self.real.Range(req, **kw)
        self.calls.append((req.key, req.limit, req.revision))
        if len(self.calls) == 1:
            await self.after_first()
        return resp


async def fill(c, prefix, n):
    t = c.transactions
    await c.transaction(compare=[], success=[t.put(prefix + b"%04d" % i, b"v%d" % i) for i in range(n)],
                        failure=[])


async def test_pages_cover_the_prefix_in_order(etcd_client, etcd_config):
    p = etcd_config.prefix.encode() + b"/paged/"
    await fill(etcd_client, p, 95)
    await etcd_client.put(etcd_config.prefix.encode() + b"/pagee", b"outside")   # past the prefix
    kvs, rev = await zetcd.get_prefix_paged(etcd_client, p, page=10)
    assert [kv.key for kv in kvs] == [p + b"%04d" % i for i in range(95)]
    assert [kv.value for kv in kvs] == [b"v%d" % i for i in range(95)]
    assert rev > 0 and all(0 < kv.mod_revision <= rev for kv in kvs)
    assert (await zetcd.get_prefix_paged(etcd_client, p + b"none/"))[0] == []
    with pytest.raises(ValueError):
        await zetcd.get_prefix_paged(etcd_client, p, page=0)


async def test_later_pages_are_read_at_the_first_pages_revision(etcd_client, etcd_config):
    p = etcd_config.prefix.encode() + b"/paged/"
    await fill(etcd_client, p, 30)

    async def change():                      # between pages: one changed, one deleted, one new
        await etcd_client.put(p + b"0025", b"changed")
        await etcd_client.delete(p + b"0027")
        await etcd_client.put(p + b"0015x", b"new")
    hooked = HookedKV(etcd_client.kvstub, change)
    etcd_client.kvstub = hooked
    try:
        kvs, rev = await zetcd.get_prefix_paged(etcd_client, p, page=10)
    finally:
        etcd_client.kvstub = hooked.real
    assert [kv.key for kv in kvs] == [p + b"%04d" % i for i in range(30)]
    assert dict((kv.key, kv.value) for kv in kvs)[p + b"0025"] == b"v25"
    assert len(hooked.calls) == 3 and hooked.calls[0][2] == 0
    assert all(r == rev for _, _, r in hooked.calls[1:])


async def test_a_snapshot_compacted_between_pages_is_read_again(etcd_client, etcd_config):
    p = etcd_config.prefix.encode() + b"/paged/"
    await fill(etcd_client, p, 30)
    compacted = []

    async def change_and_compact():
        if compacted:
            return
        await etcd_client.put(p + b"0025", b"changed")
        got = await etcd_client.get(p + b"0025")
        await etcd_client.compact(got.mod_revision)
        compacted.append(got.mod_revision)
    hooked = HookedKV(etcd_client.kvstub, change_and_compact)
    etcd_client.kvstub = hooked
    try:
        kvs, rev = await zetcd.get_prefix_paged(etcd_client, p, page=10)
    finally:
        etcd_client.kvstub = hooked.real
    assert rev >= compacted[0]
    assert len(kvs) == 30 and dict((kv.key, kv.value) for kv in kvs)[p + b"0025"] == b"changed"
