"""A move off a draining server swaps out the replica it was planned for, never into a shared domain.

Recovery places the copy away from the failure domains of every replica but the draining one it
moves off. Before, the task did not say which one that was, and the join removed whichever
replica was draining at join time: drain c0 (zone a) -> copy planned to c3 (zone a, c0's host);
undrain c0 and drain c1 before the join -> the join removed c1, leaving [c0, c3] in one domain,
and nothing repaired it (audit). Now the task names the replica (``replaces``) and the join
removes exactly that one; without it (an older task, or the named replica dropped meanwhile) the
join swaps only a draining replica whose going leaves no two replicas in one domain, else 409.
"""

import json

import pytest

from meta import chunks, extents, volumes
from meta.recovery import Recovery
from tests.meta.helpers import make_ctx, register_chunk
from zstore.errors import Conflict
from zstore.records import ExtentRecord, RecoveryTask

LABELS = {"c0": {"zone": "a", "host": "h0"}, "c1": {"zone": "b", "host": "h1"},
          "c2": {"zone": "c", "host": "h2"},
          "c3": {"zone": "a", "host": "h0"},   # c3 shares c0's failure domain
          "c4": {"zone": "e", "host": "h4"}}


def domains(replicas):
    return [tuple(sorted(LABELS[c].items())) for c in replicas]


@pytest.fixture
async def ctx(etcd_client, etcd_config):
    return make_ctx(etcd_client, etcd_config)


async def setup(ctx, name, replicas, spare):
    for cid in replicas:
        await register_chunk(ctx, cid, labels=LABELS[cid])
    vol, _ = await volumes.create_volume(ctx, name, "1Gi", len(replicas))
    vid = vol.volume_id
    await ctx.etcd.put(ctx.keys.extent(vid, 0), ExtentRecord(volume_id=vid, index=0, replicas=list(replicas)).encode())
    await register_chunk(ctx, spare, labels=LABELS[spare])
    return vid


async def plan_move(ctx, vid, draining, target):
    await chunks.set_admin_state(ctx, draining, "draining")
    done = await Recovery(ctx, grace=60).step()
    assert [(vid, 0, "rebuild", target)] == done["created"]
    task, _ = await ctx.get(ctx.keys.recovery_task(vid, 0), RecoveryTask)
    # getattr: so that run against the code before the field, the tests fail at the join.
    assert task.target == target and getattr(task, "replaces", draining) == draining
    return task


async def as_old_record(ctx, vid, task):
    """Rewrite the task as code before ``replaces`` wrote it (no such field)."""
    data = task.to_dict()
    data.pop("replaces", None)
    await ctx.etcd.put(ctx.keys.recovery_task(vid, 0), json.dumps(data).encode())
    old, _ = await ctx.get(ctx.keys.recovery_task(vid, 0), RecoveryTask)
    assert getattr(old, "replaces", "") == "" and old.target == task.target


async def test_drain_set_changing_before_join_keeps_domains_apart(ctx):
    """The audit's sequence: the join swaps out c0 (the planned one), not c1 (draining now)."""
    vid = await setup(ctx, "v", ["c0", "c1"], "c3")
    await plan_move(ctx, vid, "c0", "c3")          # away from c1 only: c0 is the one leaving
    await chunks.set_admin_state(ctx, "c0", "active")
    await chunks.set_admin_state(ctx, "c1", "draining")
    await Recovery(ctx, grace=60).step()
    r, _ = await extents.get_extent(ctx, vid, 0)
    r = await extents.join(ctx, vid, 0, "c3", r.generation)
    assert sorted(r.replicas) == ["c1", "c3"]
    assert len(set(domains(r.replicas))) == 2, f"two replicas in one failure domain: {r.replicas}"
    assert (await ctx.get(ctx.keys.recovery_task(vid, 0), RecoveryTask))[0] is None


async def test_normal_drain_move_swaps_out_the_draining_replica(ctx):
    vid = await setup(ctx, "n", ["c0", "c1"], "c2")
    await plan_move(ctx, vid, "c0", "c2")
    before, _ = await extents.get_extent(ctx, vid, 0)
    r = await extents.join(ctx, vid, 0, "c2", before.generation)
    assert sorted(r.replicas) == ["c1", "c2"] and r.generation == before.generation + 1
    assert (await ctx.get(ctx.keys.recovery_task(vid, 0), RecoveryTask))[0] is None


async def test_old_task_without_replaces_still_joins(ctx):
    vid = await setup(ctx, "o", ["c0", "c1"], "c3")
    task = await plan_move(ctx, vid, "c0", "c3")
    await as_old_record(ctx, vid, task)
    r, _ = await extents.get_extent(ctx, vid, 0)
    r = await extents.join(ctx, vid, 0, "c3", r.generation)
    assert sorted(r.replicas) == ["c1", "c3"]
    assert (await ctx.get(ctx.keys.recovery_task(vid, 0), RecoveryTask))[0] is None


async def test_old_task_refused_when_swap_would_share_a_domain(ctx):
    """No ``replaces`` and only c1 draining now: swapping c1 for c3 would put c3 beside c0."""
    vid = await setup(ctx, "p", ["c0", "c1"], "c3")
    task = await plan_move(ctx, vid, "c0", "c3")
    await as_old_record(ctx, vid, task)
    await chunks.set_admin_state(ctx, "c0", "active")
    await chunks.set_admin_state(ctx, "c1", "draining")
    r, _ = await extents.get_extent(ctx, vid, 0)
    with pytest.raises(Conflict) as e:
        await extents.join(ctx, vid, 0, "c3", r.generation)
    assert "failure domain" in e.value.message
    after, _ = await extents.get_extent(ctx, vid, 0)
    assert after.replicas == ["c0", "c1"] and after.generation == r.generation


async def test_named_replica_dropped_meanwhile_falls_back_to_a_safe_draining_one(ctx):
    """3 replicas: the named c0 is no longer in the record; c1 is draining and safe to swap."""
    vid = await setup(ctx, "d", ["c0", "c1", "c2"], "c4")
    await plan_move(ctx, vid, "c0", "c4")
    # c0 is dropped (a write to it failed) and c3 joins meanwhile: [c1, c2, c3], c1 draining.
    await register_chunk(ctx, "c3", labels=LABELS["c3"])
    r, _ = await extents.get_extent(ctx, vid, 0)
    r.replicas, r.generation = ["c1", "c2", "c3"], r.generation + 2
    await ctx.etcd.put(ctx.keys.extent(vid, 0), r.encode())
    await chunks.set_admin_state(ctx, "c1", "draining")
    r = await extents.join(ctx, vid, 0, "c4", r.generation)
    assert sorted(r.replicas) == ["c2", "c3", "c4"]
    assert len(set(domains(r.replicas))) == 3
