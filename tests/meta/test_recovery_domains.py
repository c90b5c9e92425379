"""Recovery keeps an extent's copies in distinct failure domains, stale copies included.

A rebuild joins beside the in-sync replicas *and* the stale copies the plan waits for (they
rejoin when their server is back), so it is placed away from all their domains; and a stale
copy is resynced back only if no in-sync replica holds its domain meanwhile. Before, a rebuild
planned while c2 was restarting landed on c5 (c2's host), c2 was then resynced back beside it:
two of three copies on one host while another zone was free (audit, meta leader).
"""


import pytest

from meta import chunks, extents, placement, volumes
from meta.recovery import Recovery
from tests.meta.helpers import chunk_down as down, make_ctx, register_chunk
from zstore.records import ExtentRecord, RecoveryTask

GRACE = 60.0
LABELS = {"c0": {"zone": "a"}, "c1": {"zone": "b"}, "c2": {"zone": "c", "host": "h2"},
          "c5": {"zone": "c", "host": "h2"}, "c6": {"zone": "d"}}


def domain(cid):
    return tuple(sorted(LABELS[cid].items()))


@pytest.fixture
async def ctx(etcd_client, etcd_config):
    return make_ctx(etcd_client, etcd_config)


async def up(ctx, cid):
    await register_chunk(ctx, cid, labels=LABELS[cid])
    await chunks.mark_liveness(ctx, cid, True)




async def volume_with(ctx, rec_kw):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    rec = ExtentRecord(volume_id=vol.volume_id, index=0, **rec_kw)
    await ctx.etcd.put(ctx.keys.extent(vol.volume_id, 0), rec.encode())
    return vol.volume_id


async def task_of(ctx, vid):
    return (await ctx.get(ctx.keys.recovery_task(vid, 0), RecoveryTask))[0]


async def finish(ctx, vid):
    """The task's copy is done: its target joins."""
    t = await task_of(ctx, vid)
    r, _ = await extents.get_extent(ctx, vid, 0)
    return await extents.join(ctx, vid, 0, t.target, r.generation)


async def test_rebuild_avoids_the_domain_of_a_stale_copy_it_waits_for(ctx):
    """The auditor's sequence: c1 dead, c2 restarting (dropped, within the grace). The one
    missing copy beyond c2's goes to a domain neither c0 nor c2 is in, never c5 (c2's host)."""
    for cid in ("c0", "c1", "c2", "c5"):
        await register_chunk(ctx, cid, labels=LABELS[cid])
    vid = await volume_with(ctx, {"replicas": ["c0", "c1", "c2"]})
    await down(ctx, "c1", ago=3600)          # past the grace
    await down(ctx, "c2", ago=5)             # restarting
    await extents.drop(ctx, vid, 0, "c2", 1, "write timed out")
    rec = Recovery(ctx, grace=GRACE)
    done = await rec.step()
    assert [d[2] for d in done["dropped"]] == ["c1"]
    # Only c5 is usable, on c2's host: no rebuild there (before: rebuild to c5).
    assert done["created"] == [] and await task_of(ctx, vid) is None
    await up(ctx, "c6")                      # a server in a free zone
    done = await rec.step()
    assert done["created"] == [(vid, 0, "rebuild", "c6")]
    await finish(ctx, vid)
    await up(ctx, "c2")                      # back within the grace: resynced
    done = await rec.step()
    assert done["created"] == [(vid, 0, "resync", "c2")]
    r = await finish(ctx, vid)
    assert sorted(r.replicas) == ["c0", "c2", "c6"]
    assert len({domain(c) for c in r.replicas}) == 3


async def test_stale_copy_in_a_held_domain_gets_a_rebuild_elsewhere(ctx):
    """The record the auditor ended up with before the last resync: [c0, c5] in sync, c2 (c5's
    host) stale and back. c2 is not resynced; a rebuild goes to zone d (before: resync to c2)."""
    for cid in ("c0", "c2", "c5", "c6"):
        await register_chunk(ctx, cid, labels=LABELS[cid])
    vid = await volume_with(ctx, {"replicas": ["c0", "c5"], "stale": {"c2": 1, "c1": 2}, "generation": 4})
    done = await Recovery(ctx, grace=GRACE).step()
    assert done["created"] == [(vid, 0, "rebuild", "c6")]
    r = await finish(ctx, vid)
    assert sorted(r.replicas) == ["c0", "c5", "c6"]


async def test_stale_copy_in_a_held_domain_with_no_free_domain_waits(ctx):
    """docs/storage.md "Degraded placement": with no free domain the extent waits, degraded."""
    for cid in ("c0", "c2", "c5", "c6"):
        await register_chunk(ctx, cid, labels=LABELS[cid])
    vid = await volume_with(ctx, {"replicas": ["c0", "c5"], "stale": {"c2": 1}, "generation": 3})
    await down(ctx, "c6", ago=3600)          # zone d's only server is gone
    done = await Recovery(ctx, grace=GRACE).step()
    assert done["created"] == [] and await task_of(ctx, vid) is None


async def test_waiting_copy_in_a_held_domain_is_not_counted(ctx):
    """c2 is restarting but c5 already holds its host: c2 will not rejoin, so the missing copy
    is rebuilt now instead of waiting for c2 (before: nothing until the grace ran out)."""
    for cid in ("c0", "c2", "c5", "c6"):
        await register_chunk(ctx, cid, labels=LABELS[cid])
    vid = await volume_with(ctx, {"replicas": ["c0", "c5"], "stale": {"c2": 1}, "generation": 3})
    await down(ctx, "c2", ago=5)
    done = await Recovery(ctx, grace=GRACE).step()
    assert done["created"] == [(vid, 0, "rebuild", "c6")]


async def test_shared_domains_allowed_resyncs_the_stale_copy(ctx, monkeypatch):
    """meta.allow_shared_failure_domain = true: the stale copy is resynced as before."""
    monkeypatch.setattr(placement, "ALLOW_SHARED_DOMAIN", True)
    for cid in ("c0", "c2", "c5", "c6"):
        await register_chunk(ctx, cid, labels=LABELS[cid])
    vid = await volume_with(ctx, {"replicas": ["c0", "c5"], "stale": {"c2": 1}, "generation": 3})
    done = await Recovery(ctx, grace=GRACE).step()
    assert done["created"] == [(vid, 0, "resync", "c2")]
