"""A full extent whose replicas came to share a failure domain gets one of them moved.

Placement puts each replica in a domain of its own, but a chunk server can register again
with other labels: c1 (zone b) relabelled into c0's zone and host leaves [c0, c1, c2] with two
copies in one domain. Before, recovery looked only at degraded extents and draining servers,
so such an extent stayed that way. Now the leader plans the same move a drain gets (a rebuild
away from the other replicas' domains whose join replaces the crowded replica), when a domain
is free for it and meta.allow_shared_failure_domain is off.

Real etcd; the leader's recovery pass run directly (``Recovery.step``), the copy's end played
by the real ``extents.join``.
"""

from __future__ import annotations

import logging

import pytest

from meta import extents, placement, volumes
from meta.context import Ctx
from meta.recovery import Recovery
from tests.meta.helpers import chunk_down, make_ctx, register_chunk
from zstore.records import ExtentRecord, RecoveryTask

LABELS = {"c0": {"zone": "a", "host": "h0"}, "c1": {"zone": "b", "host": "h1"},
          "c2": {"zone": "c", "host": "h2"}, "c3": {"zone": "d", "host": "h3"}}
INTO_C0 = {"zone": "a", "host": "h0"}          # c1's labels after it registers again


@pytest.fixture
async def ctx(etcd_client, etcd_config) -> Ctx:
    return make_ctx(etcd_client, etcd_config)


async def crowded_extent(ctx: Ctx, name: str = "v") -> str:
    """A 3-replica extent on c0, c1, c2, placed in three domains; then c1 relabelled into c0's."""
    for cid in ("c0", "c1", "c2"):
        await register_chunk(ctx, cid, labels=LABELS[cid])
    vol, _ = await volumes.create_volume(ctx, name, "1Gi", 3)
    vid = vol.volume_id
    await ctx.etcd.put(ctx.keys.extent(vid, 0), ExtentRecord(
        volume_id=vid, index=0, replicas=["c0", "c1", "c2"], generation=4).encode())
    await register_chunk(ctx, "c1", labels=INTO_C0)
    return vid


async def test_a_relabelled_replica_is_moved_to_a_free_domain(ctx):
    vid = await crowded_extent(ctx)
    await register_chunk(ctx, "c3", labels=LABELS["c3"])
    rec = Recovery(ctx, grace=60)
    done = await rec.step()
    assert done["created"] == [(vid, 0, "rebuild", "c3")]
    task, _ = await ctx.get(ctx.keys.recovery_task(vid, 0), RecoveryTask)
    assert task.replaces == "c1"          # of the two in zone a, the one listed last
    # The next pass keeps the task (the extent still needs it) and plans nothing more.
    done = await rec.step()
    assert done["created"] == [] and done["deleted"] == []
    # The copy is made: c3 joins in place of c1, the extent never below 3 copies.
    joined = await extents.join(ctx, vid, 0, "c3", 4)
    assert joined.replicas == ["c0", "c2", "c3"]
    assert await ctx.get_raw(ctx.keys.recovery_task(vid, 0)) is None
    assert (await rec.step())["created"] == []


async def test_the_replica_on_a_down_server_is_the_one_moved(ctx):
    vid = await crowded_extent(ctx)
    await register_chunk(ctx, "c3", labels=LABELS["c3"])
    await chunk_down(ctx, "c0")               # within the grace: still listed in sync
    done = await Recovery(ctx, grace=60).step()
    assert done["created"] == [(vid, 0, "rebuild", "c3")]
    task, _ = await ctx.get(ctx.keys.recovery_task(vid, 0), RecoveryTask)
    assert task.replaces == "c0"


async def test_no_move_without_a_free_domain_and_one_summary_warning(ctx, caplog):
    vid = await crowded_extent(ctx)
    await ctx.etcd.put(ctx.keys.extent(vid, 1), ExtentRecord(
        volume_id=vid, index=1, replicas=["c0", "c1", "c2"]).encode())
    rec = Recovery(ctx, grace=60)
    with caplog.at_level(logging.WARNING, logger="meta.recovery"):
        for _ in range(2):
            done = await rec.step()
            assert done["created"] == []
    warnings = [r.getMessage() for r in caplog.records if r.name == "meta.recovery"]
    assert warnings == ["2 extent(s) have two replicas in one failure domain (a chunk server's labels "
                        "changed since they were placed) and no other domain with room to move one to"]
    # A domain with room appears: the moves are planned.
    await register_chunk(ctx, "c3", labels=LABELS["c3"])
    done = await rec.step()
    assert sorted(done["created"]) == [(vid, 0, "rebuild", "c3"), (vid, 1, "rebuild", "c3")]


async def test_no_move_when_shared_domains_are_allowed(ctx, monkeypatch):
    monkeypatch.setattr(placement, "ALLOW_SHARED_DOMAIN", True)
    await crowded_extent(ctx)
    await register_chunk(ctx, "c3", labels=LABELS["c3"])
    assert (await Recovery(ctx, grace=60).step())["created"] == []


async def test_moves_are_throttled_by_the_recovery_concurrency(ctx):
    vid = await crowded_extent(ctx)
    for index in (1, 2, 3):
        await ctx.etcd.put(ctx.keys.extent(vid, index), ExtentRecord(
            volume_id=vid, index=index, replicas=["c0", "c1", "c2"]).encode())
    await register_chunk(ctx, "c3", labels=LABELS["c3"])
    rec = Recovery(ctx, grace=60, concurrency=2)
    assert len((await rec.step())["created"]) == 2
    assert (await rec.step())["created"] == []
    assert len(await ctx.list(ctx.keys.recovery(vid), RecoveryTask)) == 2


async def test_many_stuck_extents_cost_one_placement_per_pass(ctx, monkeypatch):
    """A relabel in a 3-domain cluster leaves every extent crowded with no domain to move to.

    Before, each pass ran placement once per such extent (its pool built afresh, every
    server's free space summed again), in one synchronous stretch: 20k extents held the
    leader's loop for over a minute and its etcd keepalive lapsed. Now a pass finds once
    that no usable server is outside the domains the replicas stay in, and the other
    extents kept there fail at once; the servers' candidates are worked out once a pass."""
    from meta import recovery
    n = 2000
    vid = await crowded_extent(ctx)
    ids = ["c0", "c1", "c2"]
    for start in range(1, n, 100):                      # etcd takes up to 128 ops per txn
        ops = [ctx.put(ctx.keys.extent(vid, i), ExtentRecord(volume_id=vid, index=i, replicas=ids))
               for i in range(start, min(n, start + 100))]
        await ctx.etcd.transaction(compare=[], success=ops, failure=[])
    calls = {"place_more": 0, "candidate_of": 0}

    def counting(name):
        real = getattr(recovery, name)

        def wrapper(*args, **kw):
            calls[name] += 1
            return real(*args, **kw)
        return wrapper
    for name in calls:
        monkeypatch.setattr(recovery, name, counting(name))
    rec = Recovery(ctx, grace=60)
    for _ in range(2):
        done = await rec.step()
        assert done["created"] == [] and done["deleted"] == []
    assert rec._stuck_crowded == n                       # all of them still counted as stuck
    assert calls["place_more"] <= 2                      # once a pass, not once an extent
    assert calls["candidate_of"] <= 2 * 3                # once a server a pass
