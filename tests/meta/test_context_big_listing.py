"""``Ctx.list`` / ``Ctx.list_raw`` read a prefix in pages, not in one Range reply.

gRPC's client refuses a reply over ``grpc.max_receive_message_length`` (4 MiB by default),
and every meta listing (snapshots, volumes, targets, LUNs, ACLs, chunk records) went through
one Range: past that size each of them failed. Here the client's limit is 32 KiB and the page
40 keys, so a few hundred records show the same failure.
"""

import uuid

import pytest
from aetcd import exceptions as aetcd_exc

from meta import volumes
from tests.meta.helpers import make_ctx
from zstore import etcd as zetcd
from zstore.records import Snapshot

from tests.conftest import SMALL_REPLY as LIMIT
N = 400


async def test_listings_larger_than_one_reply_are_read_in_pages(small_client, etcd_config, monkeypatch):
    monkeypatch.setattr(zetcd, "PAGE_SIZE", 40, raising=False)
    ctx = make_ctx(small_client, etcd_config)
    vid = uuid.uuid4().hex
    snaps = {}
    for start in range(0, N, 100):                      # etcd takes up to 128 ops per txn
        ops = []
        for i in range(start, min(N, start + 100)):
            s = Snapshot(snapshot_id=f"s{i:04d}", name=f"snapshot-{i}-" + "x" * 60, volume_id=vid,
                         size=1 << 30, seq=i)
            snaps[ctx.keys.snapshot(s.snapshot_id)] = s
            ops.append(ctx.put(ctx.keys.snapshot(s.snapshot_id), s))
        await ctx.etcd.transaction(compare=[], success=ops, failure=[])
    prefix = ctx.keys.snapshots()
    with pytest.raises(aetcd_exc.ClientError, match="larger than max"):
        await small_client.get_prefix(prefix)                       # what one Range does
    keys = sorted(snaps)

    got = await ctx.list(prefix, Snapshot)                          # [(key, record)] in key order
    assert [k for k, _ in got] == keys
    assert all(type(k) is bytes and s == snaps[k] for k, s in got)
    raw = await ctx.list_raw(prefix)                                # [(key, value)] in key order
    assert [k for k, _ in raw] == keys
    assert all(type(v) is bytes and Snapshot.decode(v) == snaps[k] for k, v in raw)
    assert await ctx.list_raw(prefix, keys_only=True) == [(k, b"") for k in keys]
    assert await ctx.list(ctx.keys.volumes(), Snapshot) == []       # an empty prefix: empty

    listed = await volumes.list_snapshots(ctx)                      # a caller, unchanged
    assert sorted(s.snapshot_id for s in listed) == [f"s{i:04d}" for i in range(N)]
