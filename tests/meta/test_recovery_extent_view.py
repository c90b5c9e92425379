"""The recovery pass takes the extent records from the leader's watched view, not etcd.

Every pass used to list and decode every extent record (~1 s of CPU per 100k records, on
the leader's event loop): at tens of TiB the leader's keepalive and API starved. Now they
are listed once per leader term and followed by a watch; the pass's writes still compare
each record's mod revision, so a view behind etcd only fails a write.
"""

import asyncio
import time

import pytest

from meta import chunks, extents, volumes
from meta.recovery import Recovery
from tests.cluster import until
from tests.meta.helpers import chunk_down as down, make_ctx, register_zones
from zstore.records import ExtentRecord, RecoveryTask

GRACE = 60.0
ZONES = {"c0": "a", "c1": "b", "c2": "c", "c3": "d", "c4": "a"}


@pytest.fixture
async def ctx(etcd_client, etcd_config):
    return await register_zones(make_ctx(etcd_client, etcd_config), ZONES)


def count_listings(ctx, monkeypatch) -> list:
    """Counts the Range calls that start a listing of the extent records (the seam every
    paged read goes through: ``Client._range``)."""
    listings, real = [], ctx.etcd._range
    prefix = ctx.keys.all_extents()

    async def counting(req):
        if req.key == prefix:
            listings.append(req.revision)
        return await real(req)
    monkeypatch.setattr(ctx.etcd, "_range", counting)
    return listings


async def volume(ctx, name, replicas=3):
    return (await volumes.create_volume(ctx, name, "1Gi", replicas))[0].volume_id


async def put_extent(ctx, vid, index, replicas) -> int:
    """A plain etcd write of an extent record (not through recovery); its revision."""
    rec = ExtentRecord(volume_id=vid, index=index, replicas=list(replicas))
    return (await ctx.etcd.put(ctx.keys.extent(vid, index), rec.encode())).header.revision


async def test_passes_with_nothing_changed_do_not_read_the_extents_again(ctx, monkeypatch):
    listings = count_listings(ctx, monkeypatch)
    v, w = await volume(ctx, "v"), await volume(ctx, "w")
    for i in range(50):
        await put_extent(ctx, v, i, ["c0", "c1", "c2"])
    await put_extent(ctx, w, 0, ["c0", "c1"])             # one copy short
    rec = Recovery(ctx, grace=GRACE, period=0.05)
    passes, step = [], rec.step

    async def counted(now=None):
        passes.append(await step(now))
        return passes[-1]
    rec.step = counted
    stop = asyncio.Event()
    runner = asyncio.ensure_future(rec.run(stop))
    try:
        await until(lambda: len(passes) >= 4, "four recovery passes")
    finally:
        stop.set()
        await asyncio.wait_for(runner, 10)
    assert [c[:2] for c in passes[0]["created"]] == [(w, 0)]   # the pass saw the records
    assert len(listings) == 1, f"{len(listings)} listings of the extent records in {len(passes)} passes"


async def test_changes_made_in_etcd_between_passes_are_seen(ctx, monkeypatch):
    """A record changed, added or deleted by someone else reaches the next pass through the
    watch (no new listing), and so do the pass's own drops when it plans right after."""
    listings = count_listings(ctx, monkeypatch)
    v, w = await volume(ctx, "v"), await volume(ctx, "w")
    await put_extent(ctx, v, 0, ["c0", "c1", "c2"])
    await put_extent(ctx, w, 0, ["c0", "c1"])
    await down(ctx, "c3", ago=GRACE + 5)                  # its replicas are to be dropped
    rec = Recovery(ctx, grace=GRACE)
    async with rec.following() as view:
        first = await rec.step()
        assert [c[:2] for c in first["created"]] == [(w, 0)] and first["dropped"] == []
        changed = await put_extent(ctx, v, 0, ["c0", "c1", "c3"])
        added = await put_extent(ctx, v, 1, ["c0", "c3", "c2"])
        await ctx.etcd.delete(ctx.keys.extent(w, 0))      # its task is no longer needed
        await until(lambda: (s := view.snapshot()).get((v, 0), (None, 0))[1] == changed
                    and s.get((v, 1), (None, 0))[1] == added and (w, 0) not in s, "the view to follow")
        second = await rec.step()
        assert sorted(second["dropped"]) == [(v, 0, "c3"), (v, 1, "c3")]
        assert second["deleted"] == [(w, 0)]
        # Planned on the records as dropped (the pass waited for its own writes to show).
        assert sorted(c[:2] for c in second["created"]) == [(v, 0), (v, 1)]
        assert (await extents.get_extent(ctx, v, 0))[0].replicas == ["c0", "c1"]
        assert await ctx.get(ctx.keys.recovery_task(w, 0), RecoveryTask) == (None, 0)
    assert len(listings) == 1


async def test_writes_from_a_stale_view_fail_and_the_next_pass_gets_it_right(ctx):
    """A world taken from the view, then a change in etcd the pass has not seen: each write
    based on the old record compares its mod revision and fails, changing nothing."""
    v = await volume(ctx, "v")
    await put_extent(ctx, v, 0, ["c0", "c1", "c3"])
    await put_extent(ctx, v, 1, ["c0", "c1", "c2"])
    task = RecoveryTask(volume_id=v, index=1, target="c4", kind="rebuild", executor="c4",
                        generation=1)
    await ctx.etcd.put(ctx.keys.recovery_task(v, 1), task.encode())
    await down(ctx, "c3", ago=GRACE + 5)
    rec = Recovery(ctx, grace=GRACE)
    async with rec.following() as view:
        assert await view.wait_ready(10)
        stale = await rec._world()
        # Behind the view's back: 0 moved off c1 (c3 still listed), 1 lost a copy (its task
        # is needed again). The world still has the old records.
        await put_extent(ctx, v, 0, ["c0", "c2", "c3"])
        await put_extent(ctx, v, 1, ["c0", "c1"])
        done = {"dropped": [], "deleted": [], "reassigned": [], "created": []}
        assert await rec._drop_dead(stale, time.time(), done) == {}
        assert done["dropped"] == []
        assert (await extents.get_extent(ctx, v, 0))[0].replicas == ["c0", "c2", "c3"]
        await rec._tidy(stale, time.time(), done)           # "has all its replicas": not so
        assert done["deleted"] == []
        assert (await ctx.get(ctx.keys.recovery_task(v, 1), RecoveryTask))[0] is not None
        # The world's record was not changed in place either (it is the view's own).
        assert stale.extents[(v, 0)][0].replicas == ["c0", "c1", "c3"]
        await until(lambda: view.snapshot()[(v, 0)][0].replicas == ["c0", "c2", "c3"], "the view")
        done = await rec.step()
        assert done["dropped"] == [(v, 0, "c3")] and done["deleted"] == []
        assert (await extents.get_extent(ctx, v, 0))[0].replicas == ["c0", "c2"]


async def test_a_watch_failure_lists_again(ctx):
    """After the view's watch breaks it lists in full again and follows on from there."""
    v = await volume(ctx, "v")
    await put_extent(ctx, v, 0, ["c0", "c1", "c2"])
    rec = Recovery(ctx, grace=GRACE)
    async with rec.following() as view:
        assert await view.wait_ready(10)
        await ctx.etcd._watcher.retire("test: the watch breaks")    # as a failover does
        await until(lambda: not view.ready, "the view to notice")
        rev = await put_extent(ctx, v, 1, ["c0", "c1", "c2"])
        assert await view.wait_ready(10)
        await until(lambda: view.snapshot().get((v, 1), (None, 0))[1] == rev, "the new record")
        assert sorted(view.snapshot()) == [(v, 0), (v, 1)]
    await chunks.list_chunks(ctx)                         # the client still works


async def test_own_writes_not_seen_while_a_listing_runs_do_not_restart_it():
    """A pass whose writes are not in the view after OWN_WRITES_WAIT reads etcd itself and
    asks the view to list again, but only a view that is following: one still listing
    (not ready) reads those writes anyway, and a relist asked then dropped the watch that
    listing was about to open, so on a big map every such pass restarted it."""
    from meta.extent_view import ExtentView
    from zstore.keys import Keys
    view = ExtentView(None, Keys("x"))              # never started: as if listing
    assert not await view.wait_past({("v", 0): 1}, 0.05)
    assert not view._relist.is_set()                 # noqa: SLF001
    view._ready = True                               # noqa: SLF001 - following ...
    view._records = {("v", 0): (None, 1)}            # noqa: SLF001 - ... and the write unseen
    assert not await view.wait_past({("v", 0): 1}, 0.05)
    assert view._relist.is_set()                     # noqa: SLF001 - then it lists again
