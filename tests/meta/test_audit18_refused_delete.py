"""A refused volume delete changes nothing, against a real etcd.

Since ff44401 the delete dropped its snapshots' exports (those with no initiator), each in
its own transaction, before the transaction that deletes the volume. When that one then
failed its compare and the delete, looking again, refused (409: a revert made meanwhile, an
initiator put on the volume or on an export), the exports were already gone: a refused
delete had changed something. The delete now decides in one transaction, comparing
everything a refusal reads (the volume record, the guard of its exports), and drops the
exports only after it: each in its own transaction still, and nobody can export a snapshot of
the volume or put an initiator on one of its exports once the volume is deleted.
"""

import pytest

from meta import exports, snapshot_exports, volops, volumes
from tests.meta.helpers import make_ctx, register_zones
from zstore.errors import Conflict, Unavailable
from zstore.records import Volume

H1 = "iqn.2004-10.com.example:h1"
EXPORTS = 3


@pytest.fixture
async def ctx(etcd_client, etcd_config):
    return await register_zones(make_ctx(etcd_client, etcd_config), {"c0": "a", "c1": "b", "c2": "c"})


async def _volume_with_exported_snapshots(ctx, count=EXPORTS):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    for i in range(count):
        await volops.create_snapshot(ctx, "v", f"s{i}")
        await snapshot_exports.export_snapshot(ctx, f"v@s{i}")
    return vol


def before_the_deletes_first_write(ctx, monkeypatch, race) -> list:
    """Run ``race`` once, just before the first transaction the delete makes (whatever it
    writes first); the list returned holds True once it ran."""
    real_txn, raced = ctx.txn, []

    async def race_then_txn(compare, success):
        if not raced:
            raced.append(True)
            await race()
        return await real_txn(compare, success)

    monkeypatch.setattr(ctx, "txn", race_then_txn)
    return raced


async def _nothing_changed(ctx, vol):
    assert (await ctx.get(ctx.keys.volume(vol.volume_id), Volume))[0].state != "deleted"
    assert len(await snapshot_exports.exported_slots(ctx)) == EXPORTS
    assert (await volumes.find_volume(ctx, "v"))[0].volume_id == vol.volume_id


async def test_a_revert_made_before_the_delete_commits_refuses_it_and_no_export_is_dropped(ctx, monkeypatch):
    vol = await _volume_with_exported_snapshots(ctx)

    async def revert():
        with pytest.raises(Unavailable):
            await volops.revert_volume(ctx, "v", "s0", timeout=0.1)   # pending: nobody runs it

    raced = before_the_deletes_first_write(ctx, monkeypatch, revert)
    with pytest.raises(Conflict, match="revert still pending"):
        await volumes.delete_volume(ctx, "v")
    assert raced
    await _nothing_changed(ctx, vol)


async def test_an_initiator_put_on_an_export_before_the_delete_commits_refuses_it(ctx, monkeypatch):
    vol = await _volume_with_exported_snapshots(ctx)
    # The export the delete came to last (it goes in id order): the others were dropped first.
    last = max(s.snapshot_id for s in await volumes.list_snapshots(ctx, "v"))
    raced = before_the_deletes_first_write(ctx, monkeypatch, lambda: exports.add_snapshot_acl(ctx, last, H1))
    with pytest.raises(Conflict, match="exported to 1 initiator"):
        await volumes.delete_volume(ctx, "v")
    assert raced
    await _nothing_changed(ctx, vol)


async def test_an_initiator_put_on_the_volume_before_the_delete_commits_refuses_it(ctx, monkeypatch):
    vol = await _volume_with_exported_snapshots(ctx)
    raced = before_the_deletes_first_write(ctx, monkeypatch, lambda: exports.add_acl(ctx, "v", H1))
    with pytest.raises(Conflict, match="is exported to 1 initiator"):
        await volumes.delete_volume(ctx, "v")
    assert raced
    await _nothing_changed(ctx, vol)


async def test_the_delete_drops_the_exports_itself(ctx, monkeypatch):
    """Not left to the collection after it (left out here)."""
    vol = await _volume_with_exported_snapshots(ctx)
    await exports.add_snapshot_acl(ctx, "v@s0", H1)

    async def no_collection(*_):
        pass

    monkeypatch.setattr(volumes, "_collect_garbage_after", no_collection)
    assert await volumes.delete_volume(ctx, "v", force=True) == vol.volume_id
    assert await snapshot_exports.exported_slots(ctx) == {}
    for s in await volumes.list_snapshots(ctx):
        assert await snapshot_exports.export_acl(ctx, s.snapshot_id) == []


async def test_no_initiator_is_put_on_an_export_its_deleted_volume_left(ctx, monkeypatch):
    """The meta serving the delete dies after the volume's transaction, before it dropped the
    exports (the collection drops them later): until then none of them can be made visible."""
    await _volume_with_exported_snapshots(ctx, 1)
    sid = (await volumes.snapshot_named(ctx, "v", "s0")).snapshot_id

    async def died(*_):
        pass

    # (_drop_export_for_volume_delete: the drop before the volume's txn, in the code before.)
    for name in ("_drop_export_of_deleted_volume", "_drop_export_for_volume_delete", "_collect_garbage_after"):
        monkeypatch.setattr(volumes, name, died, raising=False)
    await volumes.delete_volume(ctx, "v")
    assert sid in await snapshot_exports.exported_slots(ctx)         # left behind
    with pytest.raises(Conflict, match="deleted volume"):
        await exports.add_snapshot_acl(ctx, sid, H1)
    assert await snapshot_exports.export_acl(ctx, sid) == []
