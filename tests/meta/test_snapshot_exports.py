"""Snapshots exported read-only as LUNs: the meta operations on a real etcd (idempotence,
`creating` refused, ACL masking as the chunk servers' catalog sees it, deletes and garbage
collection), then the same through the HTTP API and the CLI of a real meta server."""

from __future__ import annotations

import asyncio
import json

import pytest

from chunk.catalog import Catalog
from meta import exports, snapshot_exports, volops, volumes
from tests.cluster import async_wait_for, cluster
from tests.meta.helpers import make_ctx, register_chunk
from zstore import naming
from zstore.errors import Conflict, NotFound
from meta.context import Ctx
from zstore.keys import Keys
from zstore.records import LunMapping, RecordError, Snapshot, Volume

H1 = "iqn.2004-10.com.example:h1"
H2 = "iqn.2004-10.com.example:h2"


@pytest.fixture
async def ctx(etcd_client, etcd_config):
    ctx = make_ctx(etcd_client, etcd_config)
    await register_chunk(ctx, "c0")
    return ctx


async def snap(ctx, vol="v", name="s"):
    s, _ = await volops.create_snapshot(ctx, vol, name)
    assert s.state == "ready" and s.seq > 0
    return s


async def test_export_is_idempotent_and_takes_its_own_slot(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 1)
    s = await snap(ctx)
    view, created = await snapshot_exports.export_snapshot(ctx, "v@s")
    assert created and view["readonly"] and view["snapshot_id"] == s.snapshot_id
    assert (view["target_index"], view["lun"]) != (vol.target_index, vol.lun)
    assert view["wwn"] == naming.snapshot_wwn(s.snapshot_id) != vol.wwn
    assert view["acl"] == [] and view["volume"] == "v"
    again, created = await snapshot_exports.export_snapshot(ctx, s.snapshot_id)   # by id, too
    assert not created and again == view
    concurrent = await asyncio.gather(*(snapshot_exports.export_snapshot(ctx, "v@s") for _ in range(5)))
    assert {(v["target_index"], v["lun"]) for v, _ in concurrent} == {(view["target_index"], view["lun"])}
    m, _ = await ctx.get(ctx.keys.lun(view["target_index"], view["lun"]), LunMapping)
    assert (m.volume_id, m.snapshot_id, m.readonly, m.schema) == (vol.volume_id, s.snapshot_id, True, 2)
    # A reader that predates snapshot LUNs (schema 1) refuses the mapping instead of serving the volume.
    raw = await ctx.get_raw(ctx.keys.lun(view["target_index"], view["lun"]))
    with pytest.raises(RecordError, match="newer"):
        type("OldLunMapping", (LunMapping,), {"SCHEMA": 1}).decode(raw)
    vm, _ = await ctx.get(ctx.keys.lun(vol.target_index, vol.lun), LunMapping)
    assert vm.schema == 1 and vm.snapshot_id is None                          # volumes unchanged
    # Unexport: slot, pointer and ACL go; twice is fine.
    await exports.add_acl(ctx, "v@s", H1)
    _, removed = await snapshot_exports.unexport_snapshot(ctx, "v@s")
    assert removed
    _, removed = await snapshot_exports.unexport_snapshot(ctx, "v@s")
    assert not removed
    assert await ctx.get_raw(ctx.keys.lun(view["target_index"], view["lun"])) is None
    assert await ctx.list_raw(ctx.keys.volume_acl(s.snapshot_id)) == []
    assert await ctx.list_raw(ctx.keys.snapshot_luns()) == []


async def test_creating_snapshot_and_unknown_refs_are_refused(ctx):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 1)
    # As the barrier leaves it while the volume's writer has not answered yet.
    await ctx.etcd.put(ctx.keys.snapshot("f" * 32), Snapshot(
        snapshot_id="f" * 32, name="busy", volume_id=vol.volume_id, size=2**30, state="creating").encode())
    await ctx.etcd.put(ctx.keys.snapshot_name(vol.volume_id, "busy"), b"f" * 32)
    with pytest.raises(Conflict, match="still being created"):
        await snapshot_exports.export_snapshot(ctx, "v@busy")
    assert await ctx.list_raw(ctx.keys.snapshot_luns()) == []
    with pytest.raises(NotFound):
        await snapshot_exports.export_snapshot(ctx, "v@nope")
    await snap(ctx)
    with pytest.raises(Conflict, match="not exported"):
        await exports.add_acl(ctx, "v@s", H1)                  # ACLs only on an export


async def test_acl_masks_the_snapshot_lun_separately_from_the_volume(ctx, etcd_client):
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 1)
    s = await snap(ctx)
    stop = asyncio.Event()
    cat = Catalog(etcd_client, ctx.keys)
    await cat.start(stop)
    try:
        view, _ = await snapshot_exports.export_snapshot(ctx, "v@s")
        iqn, lun = view["target_iqn"], view["lun"]
        await exports.add_acl(ctx, "v", H2)                    # H2 sees the volume only
        e = await exports.add_acl(ctx, "v@s", H1, readonly=False)
        assert e.readonly and e.snapshot_id == s.snapshot_id and e.volume_id == vol.volume_id
        assert (await exports.add_acl(ctx, "v@s", H1)).added == e.added          # idempotent
        name, entries = await exports.list_acl(ctx, "v@s")
        assert name == "v@s" and [x.initiator for x in entries] == [H1]
        assert [x.initiator for x in (await exports.list_acl(ctx, "v"))[1]] == [H2]
        ex = await async_wait_for(lambda: cat.lun_access(iqn, H1, lun), 5, "snapshot LUN mirrored")
        assert ex.readonly and ex.view_seq == s.seq and ex.snapshot_id == s.snapshot_id
        assert ex.wwn == view["wwn"] and ex.size == s.size and ex.volume.volume_id == vol.volume_id
        assert cat.lun_access(iqn, H2, lun) is None                           # masked
        assert cat.lun_access(vol_iqn := (await exports.target_iqn_of(ctx, vol)), H1, vol.lun) is None
        assert cat.lun_access(vol_iqn, H2, vol.lun).view_seq == 0
        assert iqn in cat.visible_targets(H1)
        targets = await exports.list_targets(ctx)
        names = {(t["iqn"], v["lun"]): v["volume"] for t in targets for v in t["volumes"]}
        assert names[(iqn, lun)] == "v@s" and names[(vol_iqn, vol.lun)] == "v"
        # CHAP for the snapshot's target may be named by VOL@SNAP, too.
        rec = await exports.set_chap(ctx, {"target": "v@s", "initiator": H1, "user": "u", "secret": "s" * 12})
        assert rec.target == iqn
        await exports.remove_acl(ctx, "v@s", H1)
        await async_wait_for(lambda: cat.lun_access(iqn, H1, lun) is None, 5, "ACL removal mirrored")
        with pytest.raises(NotFound):
            await exports.remove_acl(ctx, "v@s", H1)
    finally:
        stop.set()
        await cat.close()


async def test_deleting_an_exported_snapshot_needs_force(ctx):
    await volumes.create_volume(ctx, "v", "1Gi", 1)
    s = await snap(ctx)
    view, _ = await snapshot_exports.export_snapshot(ctx, "v@s")
    await exports.add_acl(ctx, "v@s", H1)
    with pytest.raises(Conflict, match="exported as LUN") as e:
        await volumes.delete_snapshot(ctx, "v", "s")
    assert "unexport" in e.value.hint
    assert (await volumes.resolve_snapshot(ctx, "v@s")).snapshot_id == s.snapshot_id
    await volumes.delete_snapshot(ctx, "v", "s", force=True)
    assert await ctx.get_raw(ctx.keys.lun(view["target_index"], view["lun"])) is None
    assert await ctx.list_raw(ctx.keys.snapshot_luns()) == []
    assert await ctx.list_raw(ctx.keys.volume_acl(s.snapshot_id)) == []


async def test_volume_delete_and_gc_take_snapshot_exports_along(ctx):
    await volumes.create_volume(ctx, "v", "1Gi", 1)
    s = await snap(ctx)
    view, _ = await snapshot_exports.export_snapshot(ctx, "v@s")
    await exports.add_acl(ctx, "v@s", H1)
    with pytest.raises(Conflict, match="v@s is exported to 1 initiator"):
        await volumes.delete_volume(ctx, "v")
    await volumes.delete_volume(ctx, "v", force=True)             # tombstone: the snapshot stays
    assert (await volumes.resolve_snapshot(ctx, s.snapshot_id)).state == "ready"
    assert await ctx.get_raw(ctx.keys.lun(view["target_index"], view["lun"])) is None
    assert await ctx.list_raw(ctx.keys.snapshot_luns()) == []
    assert await ctx.list_raw(ctx.keys.acls()) == []
    with pytest.raises(Conflict, match="deleted volume"):
        await snapshot_exports.export_snapshot(ctx, s.snapshot_id)
    # An export left behind (a crash, a race) is dropped by the garbage collector.
    await volumes.create_volume(ctx, "w", "1Gi", 1)
    s2 = await snap(ctx, "w", "s2")
    view2, _ = await snapshot_exports.export_snapshot(ctx, "w@s2")
    await exports.add_acl(ctx, "w@s2", H1)
    await ctx.etcd.delete(ctx.keys.snapshot(s2.snapshot_id))        # the snapshot vanishes behind our back
    await volumes.collect_garbage(ctx)
    assert await ctx.get_raw(ctx.keys.lun(view2["target_index"], view2["lun"])) is None
    assert await ctx.list_raw(ctx.keys.snapshot_luns()) == []
    assert await ctx.list_raw(ctx.keys.volume_acl(s2.snapshot_id)) == []
    # The tombstone volume goes once its last snapshot does; nothing is left.
    await volumes.delete_snapshot_by_id(ctx, s.snapshot_id)
    assert [v.name for _, v in await ctx.list(ctx.keys.volumes(), Volume)] == ["w"]


@pytest.mark.slow
async def test_api_and_cli(tmp_path, etcd_server, etcd_client):
    with cluster(tmp_path, etcd_server, metas=1) as c:
        ctx = Ctx(etcd=etcd_client, keys=Keys(c.prefix))
        await register_chunk(ctx, "c0")
        await async_wait_for(lambda: c.api("GET", "/meta/leader")[0] == 200, 20, "a leader")
        api = lambda *a, **kw: asyncio.to_thread(c.api, *a, **kw)        # noqa: E731
        cli = lambda *a: asyncio.to_thread(c.cli, *a)                    # noqa: E731
        assert (await api("POST", "/volumes", {"name": "v", "size": "1Gi", "replicas": 1}))[0] == 201
        status, s = await api("POST", "/volumes/v/snapshots", {"name": "s"})
        assert status == 201 and s["export"] is None
        r = await cli("snapshot", "export", "v@s")
        assert r.returncode == 0 and "exported read-only as LUN" in r.stdout and "zstore acl add v@s" in r.stdout, r.stderr
        status, view = await api("POST", "/snapshots/v@s/export")
        assert status == 200 and view["snapshot_id"] == s["snapshot_id"]
        status, view2 = await api("POST", f"/snapshots/{s['snapshot_id']}/export")
        assert status == 200 and view2 == view
        r = await cli("acl", "add", "v@s", H1)
        assert r.returncode == 0 and "may read snapshot v@s (read-only)" in r.stdout, r.stderr
        r = await cli("acl", "list", "v@s", "--json")
        assert [e["initiator"] for e in json.loads(r.stdout)] == [H1]
        assert json.loads(r.stdout)[0]["readonly"] is True
        status, acl = await api("GET", f"/snapshots/{s['snapshot_id']}/acl")
        assert status == 200 and [e["initiator"] for e in acl["initiators"]] == [H1]
        r = await cli("snapshot", "list")
        line = next(x for x in r.stdout.splitlines() if x.startswith("v "))
        assert f"{view['target_iqn']} LUN {view['lun']} (1 initiator(s))" in line
        status, listed = await api("GET", "/snapshots")
        [one] = listed["snapshots"]
        assert one["export"]["lun"] == view["lun"] and one["export"]["acl"] == [H1]
        assert one["export"]["wwn"] != (await api("GET", "/volumes/v"))[1]["wwn"]
        r = await cli("snapshot", "delete", "v@s")
        assert r.returncode == 4 and "exported" in r.stderr and "unexport" in r.stderr
        r = await cli("snapshot", "unexport", "v", "s")
        assert r.returncode == 0 and "snapshot v@s unexported" in r.stdout, r.stderr
        r = await cli("snapshot", "unexport", "v@s")
        assert r.returncode == 0 and "was not exported" in r.stdout
        r = await cli("acl", "add", "v@s", H1)
        assert r.returncode == 4 and "zstore snapshot export v@s" in r.stderr
        status, _ = await api("POST", "/snapshots/v@nope/export")
        assert status == 404
        r = await cli("snapshot", "export", "v@s", "--json")
        assert json.loads(r.stdout)["acl"] == []
        r = await cli("snapshot", "delete", "v@s", "--force")
        assert r.returncode == 0, r.stderr
        assert await ctx.list_raw(ctx.keys.snapshot_luns()) == []
        assert [v["volume"] for t in (await api("GET", "/targets"))[1]["targets"] for v in t["volumes"]] == ["v"]


async def test_garbage_collection_keeps_an_export_newer_than_its_listings(ctx, monkeypatch):
    """The collector lists snapshots and volumes, then exports: a snapshot taken and exported
    in between is missing from the first listings, and its fresh export must not be dropped
    as an orphan. An export whose snapshot is really gone still goes."""
    await volumes.create_volume(ctx, "v", "1Gi", 1)
    real_list, raced = ctx.list, []

    async def list_then_export(prefix, cls):
        got = await real_list(prefix, cls)
        if prefix == ctx.keys.volumes() and not raced:     # after both listings of the pass
            raced.append(await snap(ctx, "v", "fresh"))
            await snapshot_exports.export_snapshot(ctx, "v@fresh")
        return got

    monkeypatch.setattr(ctx, "list", list_then_export)
    await volumes.collect_garbage(ctx)
    assert raced and raced[0].snapshot_id in await snapshot_exports.exported_slots(ctx)
    monkeypatch.setattr(ctx, "list", real_list)
    # Gone for real (its record erased behind the meta's back): dropped.
    await ctx.txn([], [ctx.delete(ctx.keys.snapshot(raced[0].snapshot_id))])
    assert await snapshot_exports.collect_orphans(ctx)
    assert await snapshot_exports.exported_slots(ctx) == {}
