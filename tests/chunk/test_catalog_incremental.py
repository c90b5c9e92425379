"""The catalog applies each etcd event alone, and what it serves equals a full rebuild.

Real etcd. ``reference`` is the straightforward full rebuild (every record of every
section decoded, every query a scan of everything): after each change the live catalog,
fed event by event, must answer exactly as it does for the same etcd state. The scale
checks count work instead of timing it: records decoded per event, sessions re-checked.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from chunk.blockdev import MemoryBlockDevice
from chunk.catalog import Catalog
from chunk.iscsi import target as target_mod
from chunk.iscsi.target import IscsiTarget, TargetConfig
from meta import exports, volumes
from tests.chunk.iscsi.raw_login import normal_login
from tests.cluster import async_wait_for, free_port
from tests.meta.helpers import make_ctx, register_chunk
from zstore import records
from zstore.records import AclEntry, ChapRecord, LunMapping, Snapshot, Target, Volume

H = [f"iqn.2004-10.com.example:h{i}" for i in range(4)]
SECTIONS = {"targets": Target, "luns": LunMapping, "volumes": Volume, "snapshots": Snapshot,
            "acl": AclEntry, "chap": ChapRecord}


def tiqn(i: int) -> str:
    return f"iqn.2026-01.io.zstore:test.t{i:04d}"


class Reference:
    """The full rebuild: listings decoded whole, queries by scanning."""

    def __init__(self, listings: dict[str, list[tuple[bytes, bytes]]]):
        dec = {k: [r for r in (_decode(SECTIONS[k], v) for _, v in sorted(kvs)) if r]
               for k, kvs in listings.items()}
        self.targets = {t.iqn: t for t in dec["targets"]}
        self.by_index = {t.index: t for t in dec["targets"]}
        self.luns = {(m.target_index, m.lun): m for m in dec["luns"]}
        self.volumes = {v.volume_id: v for v in dec["volumes"]}
        self.snapshots = {s.snapshot_id: s for s in dec["snapshots"]}
        self.acl: dict[str, dict[str, AclEntry]] = {}
        for e in dec["acl"]:
            self.acl.setdefault(e.export_id, {})[e.initiator.lower()] = e
        self.chap = {(c.target, c.initiator.lower()): c for c in dec["chap"]}

    def visible_luns(self, cat: Catalog, iqn: str, ini: str) -> dict:
        t = self.targets.get(iqn)
        if t is None:
            return {}
        out = {}
        for (ti, lun), m in sorted(self.luns.items()):
            entry = self.acl.get(m.snapshot_id or m.volume_id, {}).get(ini.lower())
            if ti == t.index and entry is not None:
                ex = _resolve(self, m, entry)
                if ex is not None:
                    out[lun] = ex
        return out

    def visible_targets(self, ini: str) -> list[str]:
        allowed = {x for x, es in self.acl.items() if ini.lower() in es}
        idx = {ti for (ti, _), m in self.luns.items() if (m.snapshot_id or m.volume_id) in allowed}
        return sorted(self.by_index[i].iqn for i in idx if i in self.by_index)


def _decode(cls, v):
    try:
        return cls.decode(v)
    except records.RecordError:
        return None


def _resolve(ref: Reference, m, entry):
    """``Catalog.resolve`` over the reference's dicts."""
    return Catalog.resolve(SimpleNamespace(volumes=ref.volumes, snapshots=ref.snapshots), m, entry)


async def listings(ctx) -> dict[str, list[tuple[bytes, bytes]]]:
    k = ctx.keys
    prefixes = {"targets": k.targets(), "luns": k.luns(), "volumes": k.volumes(),
                "snapshots": k.snapshots(), "acl": k.acls(), "chap": k.chaps()}
    out = {}
    for kind, p in prefixes.items():
        out[kind] = [(kv.key, kv.value) for kv in await ctx.etcd.get_prefix(p)]
    return out


def differences(cat: Catalog, ref: Reference) -> list[str]:
    diffs = []
    for name in ("targets", "luns", "volumes", "snapshots", "acl", "chap"):
        if getattr(cat, name) != getattr(ref, name):
            diffs.append(name)
    if cat._target_by_index != ref.by_index:
        diffs.append("target index")
    inis = H + [h.upper() for h in H]
    iqns = set(ref.targets) | set(cat.targets) | {tiqn(i) for i in range(4)}
    for ini in inis:
        if cat.visible_targets(ini) != ref.visible_targets(ini):
            diffs.append(f"visible_targets({ini})")
        for iqn in iqns:
            if cat.visible_luns(iqn, ini) != ref.visible_luns(cat, iqn, ini):
                diffs.append(f"visible_luns({iqn}, {ini})")
            for lun in range(1, 6):
                want = ref.visible_luns(cat, iqn, ini).get(lun)
                if cat.lun_access(iqn, ini, lun) != want:
                    diffs.append(f"lun_access({iqn}, {ini}, {lun})")
        for iqn in list(iqns) + ["*"]:
            got = cat.chap_for(iqn, ini)
            want = next((ref.chap[k] for k in ((iqn, ini.lower()), ("*", ini.lower()), (iqn, "*"), ("*", "*"))
                         if k in ref.chap), None)
            if got != want:
                diffs.append(f"chap_for({iqn}, {ini})")
    return diffs


async def converged(ctx, cat: Catalog) -> None:
    ref = Reference(await listings(ctx))
    last: list[str] = []

    def same():
        nonlocal last
        last = differences(cat, ref)
        return not last

    try:
        await async_wait_for(same, 5, "the catalog to equal a full rebuild")
    except AssertionError as e:
        raise AssertionError(f"{e}: differs in {last}") from None


async def test_event_by_event_equals_a_full_rebuild(catalog_setup):
    ctx, cat = catalog_setup
    put, delete, k = ctx.etcd.put, ctx.etcd.delete, ctx.keys
    # through the meta: volumes (their target 0 and LUNs), ACLs, CHAP
    a, _ = await volumes.create_volume(ctx, "a", "1Mi", 1)
    b, _ = await volumes.create_volume(ctx, "b", "1Mi", 1)
    await converged(ctx, cat)
    await exports.add_acl(ctx, "a", H[0])
    await exports.add_acl(ctx, "b", H[0], readonly=True)
    await exports.add_acl(ctx, "b", H[1])
    await converged(ctx, cat)
    await exports.set_chap(ctx, {"target": "*", "initiator": H[0], "user": "u0", "secret": "cluster-wide-s0"})
    iqn0 = (await exports.list_targets(ctx))[0]["iqn"]
    await exports.set_chap(ctx, {"target": iqn0, "initiator": H[1], "user": "u1", "secret": "per-target-s1"})
    await converged(ctx, cat)
    await exports.remove_acl(ctx, "b", H[0])
    await exports.clear_chap(ctx, "*", H[0])
    await converged(ctx, cat)
    # directly in etcd: a second target, a LUN moved onto it, a snapshot exported as a LUN
    await put(k.target(1), Target(index=1, iqn=tiqn(1)).encode())
    await put(k.lun(1, 1), LunMapping(target_index=1, lun=1, volume_id=a.volume_id).encode())
    await converged(ctx, cat)
    snap = Snapshot(snapshot_id="s" * 32, name="s1", volume_id=a.volume_id, size=1 << 20, state="creating", seq=1)
    await put(k.snapshot(snap.snapshot_id), snap.encode())
    await put(k.lun(1, 2), LunMapping(target_index=1, lun=2, volume_id=a.volume_id,
                                      snapshot_id=snap.snapshot_id).encode())
    await put(k.acl(snap.snapshot_id, H[2]), AclEntry(volume_id=a.volume_id, initiator=H[2],
                                                      snapshot_id=snap.snapshot_id).encode())
    await converged(ctx, cat)
    assert cat.visible_luns(tiqn(1), H[2]) == {}               # not ready yet
    snap.state = "ready"
    await put(k.snapshot(snap.snapshot_id), snap.encode())
    await converged(ctx, cat)
    assert list(cat.visible_luns(tiqn(1), H[2])) == [2] and cat.visible_targets(H[2]) == [tiqn(1)]
    # the same ACL entry under two keys (a name stored before names were lower-cased)
    await put(k.acl(a.volume_id, H[3].upper()), AclEntry(volume_id=a.volume_id, initiator=H[3].upper()).encode())
    await put(k.acl(a.volume_id, H[3]), AclEntry(volume_id=a.volume_id, initiator=H[3], readonly=True).encode())
    await converged(ctx, cat)
    await delete(k.acl(a.volume_id, H[3]))
    await converged(ctx, cat)
    assert cat.lun_access(tiqn(1), H[3], 1) is not None
    # a LUN remapped to another volume, a target renamed, an unreadable record, deletes
    await put(k.lun(1, 1), LunMapping(target_index=1, lun=1, volume_id=b.volume_id).encode())
    await converged(ctx, cat)
    await put(k.target(1), Target(index=1, iqn=tiqn(2)).encode())
    await converged(ctx, cat)
    await put(k.volume(b.volume_id), b"not a record")
    await converged(ctx, cat)
    await delete(k.lun(1, 2))
    await delete(k.snapshot(snap.snapshot_id))
    await converged(ctx, cat)
    await volumes.delete_volume(ctx, "a", force=True)
    await converged(ctx, cat)
    await delete(k.target(1))
    await converged(ctx, cat)
    assert cat.visible_targets(H[1]) == [iqn0] or cat.visible_targets(H[1]) == []


@pytest.fixture
async def big(etcd_client, etcd_config):
    """40 targets x 25 LUNs, each LUN its own volume on H[LUN % 4]'s ACL, written straight to etcd."""
    ctx = make_ctx(etcd_client, etcd_config)
    await register_chunk(ctx, "c0")
    k = ctx.keys
    kvs = []
    for t in range(40):
        kvs.append((k.target(t), Target(index=t, iqn=tiqn(t)).encode()))
        for lun in range(1, 26):
            vid = f"{t:04d}{lun:04d}".ljust(32, "0")
            kvs.append((k.lun(t, lun), LunMapping(target_index=t, lun=lun, volume_id=vid).encode()))
            kvs.append((k.volume(vid), Volume(volume_id=vid, name=f"v{t}-{lun}", size=1 << 20, replicas=1,
                                              target_index=t, lun=lun).encode()))
            ini = H[lun % 4]
            kvs.append((k.acl(vid, ini), AclEntry(volume_id=vid, initiator=ini).encode()))
    for i in range(0, len(kvs), 100):
        await asyncio.gather(*(etcd_client.put(key, v) for key, v in kvs[i:i + 100]))
    stop = asyncio.Event()
    cat = Catalog(etcd_client, k)
    await cat.start(stop)
    assert len(cat.luns) == 1000
    yield ctx, cat
    stop.set()
    await cat.close()


def count_decodes(monkeypatch) -> dict[str, int]:
    counts = {}
    for name, cls in SECTIONS.items():
        counts[name] = 0
        orig = cls.decode.__func__

        def decode(c, raw, _orig=orig, _name=name):
            counts[_name] += 1
            return _orig(c, raw)
        monkeypatch.setattr(cls, "decode", classmethod(decode))
    return counts


async def test_one_event_decodes_one_record_and_queries_scan_one_target(big, monkeypatch):
    ctx, cat = big
    k = ctx.keys
    counts = count_decodes(monkeypatch)
    vid = f"{7:04d}{3:04d}".ljust(32, "0")
    vol = Volume(volume_id=vid, name="v7-3", size=2 << 20, replicas=1, target_index=7, lun=3)
    await ctx.etcd.put(k.volume(vid), vol.encode())
    await async_wait_for(lambda: cat.volumes[vid].size == 2 << 20, 5, "the resize mirrored")
    await ctx.etcd.put(k.acl(vid, H[0]), AclEntry(volume_id=vid, initiator=H[0]).encode())
    await async_wait_for(lambda: cat.lun_access(tiqn(7), H[0], 3), 5, "the ACL entry mirrored")
    await ctx.etcd.delete(k.acl(vid, H[0]))
    await async_wait_for(lambda: cat.lun_access(tiqn(7), H[0], 3) is None, 5, "the removal mirrored")
    assert sum(counts.values()) == 2, counts         # one per PUT; a DELETE decodes nothing
    # queries look at one target's LUNs (or one initiator's entries), not at all 1000
    looked = []

    class Spy(dict):
        def items(self):
            looked.append(len(self))
            return super().items()

        def values(self):
            looked.append(len(self))
            return super().values()

    cat.luns = Spy(cat.luns)
    assert list(cat.visible_luns(tiqn(7), H[3])) == [3, 7, 11, 15, 19, 23]
    assert len(cat.visible_targets(H[1])) == 40
    assert looked == []


async def test_a_change_rechecks_only_the_sessions_it_touches(big, monkeypatch):
    ctx, cat = big
    k = ctx.keys
    target = IscsiTarget(TargetConfig(port=free_port()), cat,
                         lambda volume, readonly, view_seq=0: MemoryBlockDevice(1 << 20, readonly=readonly))
    await target.start()
    conns = []
    try:
        for t in (1, 2):
            for ini in H:
                conns.append((await normal_login(target.cfg.port, tiqn(t), ini))[1])
        await async_wait_for(lambda: target.session_count() == 8, 5, "8 sessions")
        checked = []
        orig = target_mod.SessionView.inventory_changed

        def spy(view):
            checked.append((view.target_iqn, view.initiator))
            return orig(view)
        monkeypatch.setattr(target_mod.SessionView, "inventory_changed", spy)

        # an ACL entry on target 1 for H[0]: only H[0]'s session on target 1
        vid = f"{1:04d}{2:04d}".ljust(32, "0")                  # LUN 2 of target 1: H[2]'s
        await ctx.etcd.put(k.acl(vid, H[0]), AclEntry(volume_id=vid, initiator=H[0]).encode())
        await async_wait_for(lambda: cat.lun_access(tiqn(1), H[0], 2), 5, "the ACL entry mirrored")
        await asyncio.sleep(0)
        assert checked == [(tiqn(1), H[0])]
        # a volume of target 2 deleted: target 2's four sessions, none of target 1's
        checked.clear()
        vid = f"{2:04d}{5:04d}".ljust(32, "0")
        vol = Volume(volume_id=vid, name="v2-5", size=1 << 20, replicas=1, target_index=2, lun=5,
                     state="deleted")
        await ctx.etcd.put(k.volume(vid), vol.encode())
        await async_wait_for(lambda: cat.volumes[vid].state == "deleted", 5, "the delete mirrored")
        assert sorted(checked) == sorted((tiqn(2), ini) for ini in H)
        # a volume mapped nowhere, CHAP, a LUN of a target without sessions: no session
        checked.clear()
        await ctx.etcd.put(k.volume("f" * 32), Volume(volume_id="f" * 32, name="lone", size=1 << 20,
                                                      replicas=1).encode())
        await ctx.etcd.put(k.chap("*", H[0]), ChapRecord(target="*", initiator=H[0], user="u",
                                                         secret="s" * 12).encode())
        await ctx.etcd.put(k.lun(9, 30), LunMapping(target_index=9, lun=30, volume_id="f" * 32).encode())
        await async_wait_for(lambda: (9, 30) in cat.luns and cat.chap, 5, "mirrored")
        assert checked == []
    finally:
        for w in conns:
            w.close()
        await target.stop()
