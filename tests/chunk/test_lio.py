"""The LIO frontend's desired state, computed from a real catalog mirrored from etcd, and its
clear refusal to start on a kernel without LIO/TCMU (this machine's). Applying the state to
LIO and serving the TCMU rings is proven in the kernel lab (tests/lab/test_lab_lio.py)."""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from chunk import lio
from meta import exports, volumes
from tests.cluster import PY, ROOT, async_wait_for, free_port

H1 = "iqn.2004-10.com.example:h1"
H2 = "iqn.2004-10.com.example:h2"


async def test_desired_state_masks_luns_per_acl_and_carries_chap(catalog_setup):
    ctx, cat = catalog_setup
    a, _ = await volumes.create_volume(ctx, "a", "64Mi", 1)
    b, _ = await volumes.create_volume(ctx, "b", "32Mi", 1)
    await exports.add_acl(ctx, "a", H1)
    await exports.add_acl(ctx, "b", H1, readonly=True)
    await exports.add_acl(ctx, "b", H2)
    iqn = (await exports.list_targets(ctx))[0]["iqn"]
    await exports.set_chap(ctx, {"target": iqn, "initiator": H2, "user": "h2user", "secret": "s" * 12,
                                 "mutual_user": "tgt", "mutual_secret": "m" * 12})
    await async_wait_for(lambda: len(cat.acl.get(b.volume_id, {})) == 2 and cat.chap and len(cat.luns) == 2
                         and len(cat.volumes) == 2 and cat.targets, 5, "catalog")

    d = lio.desired_state(cat)
    b_ro = lio.backstore_name(b.volume_id) + lio.RO_SUFFIX       # b's read-only twin, for H1
    assert set(d.backstores) == {lio.backstore_name(a.volume_id), lio.backstore_name(b.volume_id), b_ro}
    assert d.backstores[lio.backstore_name(a.volume_id)].size == 64 << 20
    assert d.backstores[b_ro].readonly and not d.backstores[lio.backstore_name(b.volume_id)].readonly
    t = d.targets[iqn]
    assert t.luns == {a.lun: lio.backstore_name(a.volume_id), b.lun: lio.backstore_name(b.volume_id),
                      lio.RO_TPG_LUN_BASE + b.lun: b_ro}
    assert t.acls[H1].mapped == {a.lun: False, b.lun: True}       # b read-only for H1
    assert t.acls[H1].tpg_luns == {b.lun: lio.RO_TPG_LUN_BASE + b.lun} and not t.acls[H2].tpg_luns
    assert t.acls[H2].mapped == {b.lun: False}                    # H2 does not see a
    assert t.acls[H1].chap is None
    assert t.acls[H2].chap == lio.Chap("h2user", "s" * 12, "tgt", "m" * 12)

    await exports.remove_acl(ctx, "b", H2)
    await async_wait_for(lambda: H2 not in cat.acl.get(b.volume_id, {}), 5, "ACL removal mirrored")
    assert H2 not in lio.desired_state(cat).targets[iqn].acls


async def test_deleted_volume_leaves_no_backstore(catalog_setup):
    ctx, cat = catalog_setup
    v, _ = await volumes.create_volume(ctx, "gone", "16Mi", 1)
    await exports.add_acl(ctx, "gone", H1)
    await async_wait_for(lambda: v.volume_id in cat.acl and cat.luns and cat.targets and cat.volumes, 5, "catalog")
    assert lio.backstore_name(v.volume_id) in lio.desired_state(cat).backstores
    await volumes.delete_volume(ctx, "gone", force=True)
    await async_wait_for(lambda: lio.backstore_name(v.volume_id) not in lio.desired_state(cat).backstores,
                         5, "volume deletion mirrored")


def test_owned_targets_survive_a_restart_and_bad_state_is_refused(tmp_path: Path):
    o = lio.Owned(tmp_path / lio.OWNED_FILE)
    assert o.targets == set()
    o.targets.add("iqn.2026-01.io.zstore:abc.t0001")
    o.save()
    assert lio.Owned(tmp_path / lio.OWNED_FILE).targets == {"iqn.2026-01.io.zstore:abc.t0001"}
    (tmp_path / lio.OWNED_FILE).write_text("{not json")
    with pytest.raises(lio.LioUnavailable, match="unreadable"):
        lio.Owned(tmp_path / lio.OWNED_FILE)


def test_check_kernel_names_everything_missing(tmp_path: Path):
    with pytest.raises(lio.LioUnavailable) as e:
        lio.check_kernel(configfs=tmp_path / "no-configfs", sys_module=tmp_path / "no-modules")
    msg = str(e.value)
    for what in ("configfs mounted", "target_core_mod", "iscsi_target_mod", "target_core_user", "uio"):
        assert what in msg


@pytest.mark.skipif(os.path.isdir("/sys/kernel/config/target") and os.path.isdir("/sys/module/target_core_user"),
                    reason="this kernel has LIO and TCMU")
def test_chunk_server_with_lio_frontend_refuses_to_start_here(tmp_path: Path, etcd_config):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZSTORE_")}
    r = subprocess.run([PY, "-m", "chunk.server", "--frontend", "lio", "--data-dir", str(tmp_path / "d"),
                        "--etcd-endpoints", etcd_config.endpoints[0], "--prefix", etcd_config.prefix,
                        "--data-port", str(free_port()), "--portal", f"127.0.0.1:{free_port()}"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert r.returncode == 1, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("zstore-chunk: error:")]
    assert len(lines) == 1 and "the lio frontend needs" in lines[0]
    assert "target_core_user" in lines[0]
    assert not (tmp_path / "d").exists()                    # refused before touching the data dir


def test_frontend_flag_is_validated(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZSTORE_")}
    r = subprocess.run([PY, "-m", "chunk.server", "--frontend", "spdk", "--data-dir", str(tmp_path / "d")],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=30)
    assert r.returncode == 2 and "invalid choice: 'spdk'" in r.stderr


async def test_desired_state_serves_a_snapshot_export_on_its_own_backstore(catalog_setup):
    """A snapshot LUN gets backstore zs-<snapshot id> sized as the snapshot, write-protected
    MappedLUNs for the initiators on the snapshot's ACL only, and is served as the volume's view
    at the snapshot's seq."""
    from meta import snapshot_exports, volops
    ctx, cat = catalog_setup
    v, _ = await volumes.create_volume(ctx, "v", "64Mi", 1)
    s, _ = await volops.create_snapshot(ctx, "v", "s")
    await volumes.resize_volume(ctx, "v", "128Mi")
    view, _ = await snapshot_exports.export_snapshot(ctx, "v@s")
    await exports.add_acl(ctx, "v", H1)
    await exports.add_acl(ctx, "v@s", H2)
    await async_wait_for(lambda: s.snapshot_id in cat.acl and v.volume_id in cat.acl and len(cat.luns) == 2
                         and s.snapshot_id in cat.snapshots and cat.volumes.get(v.volume_id, v).size > v.size,
                         5, "catalog")
    d = lio.desired_state(cat)
    name = lio.backstore_name(s.snapshot_id)
    ex = d.backstores[name]
    assert (ex.size, ex.view_seq, ex.readonly, ex.wwn) == (64 << 20, s.seq, True, view["wwn"])
    assert d.backstores[lio.backstore_name(v.volume_id)].size == 128 << 20
    t = d.targets[view["target_iqn"]]
    assert t.luns[view["lun"]] == name
    assert t.acls[H2].mapped == {view["lun"]: True}               # write-protected
    assert view["lun"] not in t.acls[H1].mapped                   # the volume's initiator: masked


# -- applying the state: LioConfig and LioFrontend over a fake rtslib, TCMU rings in bytearrays --

class _Attrs:
    def __init__(self):
        self.attrs: dict[str, str] = {}

    def get_attribute(self, k):
        return self.attrs.get(k)

    def set_attribute(self, k, v):
        self.attrs[k] = v


class FakeRts:
    """Just the rtslib-fb surface ``LioConfig`` uses, over plain lists; ``reject`` names the
    initiators whose NodeACL rtslib refuses (as it does an IQN it cannot parse)."""

    class RTSLibError(Exception):
        pass

    def __init__(self, reject=()):
        self.sos: dict[str, Any] = {}
        self.targets: list[Any] = []
        self.reject = set(reject)
        self._index = 0

    def RTSRoot(self):
        return self

    @property
    def storage_objects(self):
        return list(self.sos.values())

    def UserBackedStorageObject(self, name, config=None, size=None, index=None, **kw):
        if index is not None:
            assert self.sos[name].index == index
            return self.sos[name]
        self._index += 1
        so = _Attrs()
        so.attrs["dev_size"] = str(size)
        so.name, so.config, so.size, so.index, so.plugin = name, config, size, self._index, "user"
        so.path = f"/sys/kernel/config/target/core/user_{self._index}/{name}"
        so.delete = lambda: self.sos.pop(name)
        self.sos[name] = so
        return so

    def FabricModule(self, name):
        return SimpleNamespace(name=name)

    def Target(self, fabric, wwn, mode):
        t = SimpleNamespace(wwn=wwn, fabric_module=fabric, tpgs=[])
        t.delete = lambda: self.targets.remove(t)
        self.targets.append(t)
        return t

    def TPG(self, t, tag, mode):
        tpg = _Attrs()
        tpg.tag, tpg.luns, tpg.node_acls, tpg.network_portals, tpg.enable = tag, [], [], [], False
        tpg.delete = lambda: t.tpgs.remove(tpg)
        t.tpgs.append(tpg)
        return tpg

    def NetworkPortal(self, tpg, ip, port, mode):
        p = SimpleNamespace(ip_address=ip, port=port)
        p.delete = lambda: tpg.network_portals.remove(p)
        tpg.network_portals.append(p)
        return p

    def LUN(self, tpg, n, so):
        lun = SimpleNamespace(lun=n, storage_object=so, tpg=tpg)

        def delete():
            tpg.luns.remove(lun)
            for a in tpg.node_acls:
                a.mapped_luns[:] = [m for m in a.mapped_luns if m.tpg_lun is not lun]
        lun.delete = delete
        tpg.luns.append(lun)
        return lun

    def NodeACL(self, tpg, wwn, mode):
        if wwn in self.reject:
            raise self.RTSLibError(f"invalid initiator name {wwn}")
        a = _Attrs()
        a.node_wwn, a.mapped_luns, a.path = wwn, [], "/nonexistent"
        a.chap_userid = a.chap_password = a.chap_mutual_userid = a.chap_mutual_password = ""
        a.delete = lambda: tpg.node_acls.remove(a)
        tpg.node_acls.append(a)
        a.tpg = tpg
        return a

    def MappedLUN(self, a, n, tpg_lun, write_protect=False):
        lun = next(l for l in a.tpg.luns if l.lun == tpg_lun)
        m = SimpleNamespace(mapped_lun=n, tpg_lun=lun, write_protect=write_protect)
        m.delete = lambda: a.mapped_luns.remove(m)
        a.mapped_luns.append(m)
        return m

    # what an initiator sees
    def mapping(self, iqn, initiator, n):
        """The backstore behind ``initiator``'s LUN ``n`` on target ``iqn``, and its write protection."""
        t = next(t for t in self.targets if t.wwn == iqn)
        a = next(a for a in t.tpgs[0].node_acls if a.node_wwn == initiator)
        m = next(m for m in a.mapped_luns if m.mapped_lun == n)
        return m.tpg_lun.storage_object.name, m.write_protect


@pytest.fixture
def fake_lio(monkeypatch, tmp_path):
    """A ``LioFrontend`` factory over a fake rtslib; every uio device is a ``FakeKernel`` ring and
    every volume a ``MemoryBlockDevice`` opened as ``open_device`` is asked (read-only or not)."""
    from chunk.blockdev import MemoryBlockDevice
    from tests.chunk.tcmu.fakering import FakeKernel

    rings: dict[str, FakeKernel] = {}
    devices: list[Any] = []
    real_exists = os.path.exists

    def open_device(volume, readonly, seq=0):
        dev = MemoryBlockDevice(volume.size, readonly=readonly)
        dev.closed = False
        dev.close = lambda: setattr(dev, "closed", True)
        devices.append(dev)
        return dev

    broken: set[str] = set()                           # uio devices that fail to map
    preload: dict[str, Any] = {}                       # uio device -> fn(ring): what it holds at open
    actions: list[tuple[str, str, str]] = []           # (backstore, action, value) written

    def uio_device(found):
        if found in broken:
            raise lio.tuio.UioError(f"{found}: mmap failed")
        if found not in rings or rings[found].r < 0:   # the kernel's ring outlives a server
            rings[found] = FakeKernel(cmdr_size=4096, data_size=1 << 20)
            if found in preload:
                preload[found](rings[found])
        return rings[found]

    def action(self, bs, name, value):
        actions.append((bs.name, name, value))
        ring = rings["fake-" + bs.name]
        if name == "reset_ring":
            ring.reset()
        elif name == "block_dev":
            ring.blocked = value == "1"
    monkeypatch.setattr(lio.LioConfig, "_action", action, raising=False)

    monkeypatch.setattr(lio.tuio, "find", lambda name, suffix=None: "fake-" + name.split("/")[2])
    monkeypatch.setattr(lio.tuio, "UioDevice", uio_device)
    monkeypatch.setattr(lio.os.path, "exists", lambda p: p.startswith("/dev/fake-") or real_exists(p))
    made = []

    def make(cat, fake: FakeRts | None = None):
        fake = fake or FakeRts()
        monkeypatch.setitem(sys.modules, "rtslib_fb", fake)
        fe = lio.LioFrontend("127.0.0.1:3260", cat, open_device, tmp_path)
        fe.fake, fe.rings, fe.devices, fe.broken_uio = fake, rings, devices, broken
        fe.preload, fe.actions = preload, actions
        made.append(fe)
        return fe
    yield make
    for fe in made:
        for name in list(fe.loops):
            fe.loops.pop(name)
    for ring in rings.values():
        ring.close()


def write_same16_ndob(lba: int, n: int) -> bytes:
    return struct.pack(">BBQIBB", 0x93, 0x01, lba, n, 0, 0)


async def test_read_only_acl_entry_is_served_by_a_read_only_backstore(catalog_setup, fake_lio):
    """H1 is read-only on "b" and H2 read-write: H1's LUN must be a backstore over a read-only
    device, since LIO's write_protect lets WRITE SAME(16) NDOB (no data-out) through to the unit."""
    ctx, cat = catalog_setup
    b, _ = await volumes.create_volume(ctx, "b", "16Mi", 1)
    await exports.add_acl(ctx, "b", H1, readonly=True)
    await exports.add_acl(ctx, "b", H2)
    iqn = (await exports.list_targets(ctx))[0]["iqn"]
    await async_wait_for(lambda: len(cat.acl.get(b.volume_id, {})) == 2 and cat.luns and cat.targets
                         and cat.volumes, 5, "catalog")
    fe = fake_lio(cat)
    await fe.start()
    try:
        name = lio.backstore_name(b.volume_id)
        ro_name, wp = fe.fake.mapping(iqn, H1, b.lun)
        assert ro_name != name and wp                               # same LUN number, own backstore
        assert fe.fake.mapping(iqn, H2, b.lun) == (name, False)
        ring = fe.rings["fake-" + ro_name]
        c = ring.queue(write_same16_ndob(0, 8))
        await async_wait_for(lambda: "status" in ring.answers[c], 5, "answer")
        a = ring.answers[c]
        assert a["status"] == 2 and a["sense"][2] & 0x0F == 0x07    # CHECK CONDITION, DATA PROTECT

        await exports.remove_acl(ctx, "b", H1)                       # no read-only entry left
        await async_wait_for(lambda: H1 not in cat.acl.get(b.volume_id, {}), 5, "ACL removal mirrored")
        await fe.reconcile()
        assert ro_name not in fe.fake.sos and ro_name not in fe.loops
        assert set(fe.fake.sos) == {name}
    finally:
        await fe.stop()


async def test_a_rejected_initiator_stops_neither_other_targets_nor_start(catalog_setup, fake_lio, monkeypatch):
    """rtslib refusing one initiator's NodeACL used to abort the whole apply (later targets,
    ACL removals, stale backstores skipped) and, at start, the chunk server."""
    ctx, cat = catalog_setup
    ctx.luns_per_target = 1                                          # a second volume: a second target
    bad = "iqn.2004-10.com.example:rejected"
    a, _ = await volumes.create_volume(ctx, "a", "16Mi", 1)
    b, _ = await volumes.create_volume(ctx, "b", "16Mi", 1)
    await exports.add_acl(ctx, "a", bad)
    await exports.add_acl(ctx, "a", H1)
    await exports.add_acl(ctx, "b", H2)
    await async_wait_for(lambda: len(cat.targets) == 2 and len(cat.luns) == 2 and len(cat.volumes) == 2
                         and len(cat.acl.get(a.volume_id, {})) == 2 and b.volume_id in cat.acl, 5, "catalog")
    d = lio.desired_state(cat)
    iqn_a = next(i for i, t in d.targets.items() if t.luns.get(a.lun) == lio.backstore_name(a.volume_id))
    iqn_b = next(i for i, t in d.targets.items() if t.luns.get(b.lun) == lio.backstore_name(b.volume_id))
    assert iqn_a != iqn_b
    fe = fake_lio(cat, FakeRts(reject={bad}))
    monkeypatch.setattr(lio, "RETRY_SECONDS", 0.2, raising=False)
    await fe.start()                                                 # does not raise
    try:
        assert fe.failed
        assert fe.fake.mapping(iqn_a, H1, a.lun) == (lio.backstore_name(a.volume_id), False)
        assert fe.fake.mapping(iqn_b, H2, b.lun) == (lio.backstore_name(b.volume_id), False)
        n = fe.applied
        await async_wait_for(lambda: fe.applied > n, 5, "a retry without any catalog change")
        fe.fake.reject.clear()                                       # e.g. a kernel that now takes it
        await async_wait_for(lambda: not fe.failed, 5, "retried until clean")
        assert fe.fake.mapping(iqn_a, bad, a.lun) == (lio.backstore_name(a.volume_id), False)
    finally:
        await fe.stop()


def tur() -> bytes:
    return bytes(6)


async def test_a_grown_volume_grows_its_lio_lun(catalog_setup, fake_lio):
    """A resize reached neither the served device nor the kernel's backstore: the initiator kept
    the old capacity and was never told CAPACITY DATA HAS CHANGED."""
    ctx, cat = catalog_setup
    v, _ = await volumes.create_volume(ctx, "v", "16Mi", 1)
    await exports.add_acl(ctx, "v", H1)
    await async_wait_for(lambda: v.volume_id in cat.acl and cat.luns and cat.targets and cat.volumes,
                         5, "catalog")
    fe = fake_lio(cat)
    await fe.start()
    try:
        name = lio.backstore_name(v.volume_id)
        ring = fe.rings["fake-" + name]
        c = ring.queue(tur())
        await async_wait_for(lambda: "status" in ring.answers[c], 5, "answer")
        assert ring.answers[c]["status"] == 0
        await volumes.resize_volume(ctx, "v", "32Mi")
        await async_wait_for(lambda: cat.volumes[v.volume_id].size == 32 << 20, 5, "resize mirrored")
        await fe.reconcile()
        assert fe.loops[name][2].size == 32 << 20
        assert fe.fake.sos[name].attrs["dev_size"] == str(32 << 20)
        c = ring.queue(tur())
        await async_wait_for(lambda: "status" in ring.answers[c], 5, "answer")
        sense = ring.answers[c]["sense"]
        assert ring.answers[c]["status"] == 2 and (sense[2] & 0x0F, sense[12], sense[13]) == (0x06, 0x2A, 0x09)
    finally:
        await fe.stop()


async def test_a_backstore_that_cannot_be_served_gets_no_lun_and_leaks_nothing(catalog_setup, fake_lio):
    """An exception after open_export used to leak the device and abort the reconcile (no other
    LUN applied); a LUN over a ring nobody serves would leave its commands hanging."""
    ctx, cat = catalog_setup
    a, _ = await volumes.create_volume(ctx, "a", "16Mi", 1)
    b, _ = await volumes.create_volume(ctx, "b", "16Mi", 1)
    await exports.add_acl(ctx, "a", H1)
    await exports.add_acl(ctx, "b", H1)
    iqn = (await exports.list_targets(ctx))[0]["iqn"]
    await async_wait_for(lambda: len(cat.luns) == 2 and len(cat.acl) == 2 and cat.targets
                         and len(cat.volumes) == 2, 5, "catalog")
    fe = fake_lio(cat)
    name_a, name_b = lio.backstore_name(a.volume_id), lio.backstore_name(b.volume_id)
    fe.broken_uio.add("fake-" + name_a)
    await fe.start()
    try:
        assert name_a not in fe.loops and fe.failed
        assert len(fe.devices) == 2 and sum(d.closed for d in fe.devices) == 1      # a's: closed
        assert fe.fake.mapping(iqn, H1, b.lun) == (name_b, False)
        t = next(t for t in fe.fake.targets if t.wwn == iqn)
        assert [l.storage_object.name for l in t.tpgs[0].luns] == [name_b]         # no LUN over a
        fe.broken_uio.clear()
        await fe.reconcile()
        assert name_a in fe.loops and not fe.failed
        assert fe.fake.mapping(iqn, H1, a.lun) == (name_a, False)
    finally:
        await fe.stop()


async def test_a_restart_fails_what_the_ring_holds_instead_of_replaying_it(catalog_setup, fake_lio):
    """A WRITE queued while no chunk server served the ring (the kernel timed it out; the host
    wrote newer data since) used to be run when serving started: old data over new. Serving
    now starts with block_dev=1, reset_ring=1 (the kernel fails it BUSY: the host retries),
    the loop at the head, then block_dev=0."""
    from tests.chunk.tcmu.test_loop import write10
    ctx, cat = catalog_setup
    v, _ = await volumes.create_volume(ctx, "v", "16Mi", 1)
    await exports.add_acl(ctx, "v", H1)
    await async_wait_for(lambda: v.volume_id in cat.acl and cat.luns and cat.targets and cat.volumes,
                         5, "catalog")
    fe = fake_lio(cat)
    name = lio.backstore_name(v.volume_id)
    stale = []
    fe.preload["fake-" + name] = lambda ring: stale.append(
        ring.queue(write10(3, 1), b"O" * 512, notify=False))
    await fe.start()
    try:
        ring = fe.rings["fake-" + name]
        await asyncio.sleep(0.1)
        assert ring.answers[stale[0]]["status"] == "reset"           # failed by the kernel
        dev = fe.loops[name][2]
        assert bytes(await dev.read(3 * 512, 512)) == bytes(512)     # never written
        assert [(a, v_) for b, a, v_ in fe.actions if b == name] == [
            ("block_dev", "1"), ("reset_ring", "1"), ("block_dev", "0")]
        assert fe.fake.sos[name].attrs["cmd_time_out"] == "0"
        c = ring.queue(tur())                                        # served from the head on
        await async_wait_for(lambda: "status" in ring.answers[c], 5, "answer")
        assert ring.answers[c]["status"] == 0
    finally:
        await fe.stop()


class ChapRefusingRts(FakeRts):
    """rtslib refusing a CHAP value (as its _set_auth_attr refuses "NULL"); it records, for every
    MappedLUN made, the ACL's authentication and CHAP user at that moment."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.mapped_with: list[tuple[str, Any, str]] = []

    def NodeACL(self, tpg, wwn, mode):
        a = super().NodeACL(tpg, wwn, mode)
        fake = self

        class Acl(type(a)):
            @property
            def chap_userid(self):
                return self.__dict__.get("_user", "")

            @chap_userid.setter
            def chap_userid(self, v):
                if v == "NULL":
                    raise fake.RTSLibError("'NULL' is not a permitted value")
                self.__dict__["_user"] = v
        a.__class__ = Acl
        return a

    def MappedLUN(self, a, n, tpg_lun, write_protect=False):
        self.mapped_with.append((a.node_wwn, a.attrs.get("authentication"), a.chap_userid))
        return super().MappedLUN(a, n, tpg_lun, write_protect)


def _one_lun_config(fake, tmp_path):
    """A LioConfig over ``fake`` (already in sys.modules) holding backstore zs-v."""
    cfg = lio.LioConfig("127.0.0.1", 3260, lio.Owned(tmp_path / lio.OWNED_FILE))
    fake.UserBackedStorageObject("zs-v", config="zstore/v", size=1 << 20)
    return cfg, {"zs-v": lio.Backstore("zs-v", 1, "/x", "tcm-user/1/zs-v/zstore/v")}


def test_chap_that_cannot_be_applied_leaves_no_acl_mapped(tmp_path, monkeypatch):
    """CHAP rtslib refuses used to leave the NodeACL mapped with authentication unset (the TPG's
    0): a login without CHAP. Now CHAP and authentication=1 come before any MappedLUN, and an ACL
    whose CHAP cannot be set is deleted (fail closed); the others are applied."""
    fake = ChapRefusingRts()
    monkeypatch.setitem(sys.modules, "rtslib_fb", fake)
    cfg, bs = _one_lun_config(fake, tmp_path)
    spec = lio.TargetSpec("iqn.t", luns={1: "zs-v"}, acls={
        H1: lio.AclSpec(mapped={1: False}, chap=lio.Chap("NULL", "s" * 12)),
        H2: lio.AclSpec(mapped={1: False}, chap=lio.Chap("h2user", "s" * 12))})
    cfg.apply_targets(lio.Desired(targets={"iqn.t": spec}), bs)
    tpg = fake.targets[0].tpgs[0]
    assert cfg.errors == 1
    assert [a.node_wwn for a in tpg.node_acls] == [H2]                     # H1: no ACL at all
    assert fake.mapped_with == [(H2, "1", "h2user")]                       # CHAP before mapping
    # CHAP added later to a mapped ACL, and refused: that ACL goes too
    spec.acls[H2] = lio.AclSpec(mapped={1: False}, chap=lio.Chap("NULL", "s" * 12))
    cfg.apply_targets(lio.Desired(targets={"iqn.t": spec}), bs)
    assert tpg.node_acls == []


def test_chap_on_a_kernel_without_per_acl_authentication_is_not_offered_unenforced(tmp_path, monkeypatch):
    """A kernel without the per-ACL authentication attribute used to get a warning and a mapped
    ACL anyone could log in to without CHAP; now that ACL is not created."""
    fake = FakeRts()
    monkeypatch.setitem(sys.modules, "rtslib_fb", fake)
    cfg, bs = _one_lun_config(fake, tmp_path)
    real = fake.NodeACL

    def node_acl(tpg, wwn, mode):
        a = real(tpg, wwn, mode)

        def no_attr(k, v=None):
            raise fake.RTSLibError(f"no attribute {k}")
        a.get_attribute = a.set_attribute = no_attr
        return a
    monkeypatch.setattr(fake, "NodeACL", node_acl)
    spec = lio.TargetSpec("iqn.t", luns={1: "zs-v"}, acls={
        H1: lio.AclSpec(mapped={1: False}, chap=lio.Chap("h1user", "s" * 12)),
        H2: lio.AclSpec(mapped={1: False})})
    cfg.apply_targets(lio.Desired(targets={"iqn.t": spec}), bs)
    assert [a.node_wwn for a in fake.targets[0].tpgs[0].node_acls] == [H2] and cfg.errors == 1


def test_a_failing_portal_or_lun_step_leaves_nothing_revoked_mapped(tmp_path, monkeypatch):
    """A portal rtslib refused (an address in use, say) used to abort the target's apply before
    the ACL step: an ACL or LUN mapping revoked in etcd stayed in LIO. Revocations now come
    first, and the portal and every LUN are steps of their own."""
    fake = FakeRts()
    monkeypatch.setitem(sys.modules, "rtslib_fb", fake)
    cfg, bs = _one_lun_config(fake, tmp_path)
    fake.UserBackedStorageObject("zs-w", config="zstore/w", size=1 << 20)
    bs["zs-w"] = lio.Backstore("zs-w", 2, "/y", "tcm-user/2/zs-w/zstore/w")
    spec = lio.TargetSpec("iqn.t", luns={1: "zs-v", 2: "zs-w"}, acls={
        H1: lio.AclSpec(mapped={1: False, 2: False}), H2: lio.AclSpec(mapped={1: False})})
    cfg.apply_targets(lio.Desired(targets={"iqn.t": spec}), bs)
    assert cfg.errors == 0 and fake.mapping("iqn.t", H1, 2) == ("zs-w", False)

    def refuse(*a, **kw):
        raise fake.RTSLibError("Could not create NetworkPortal: address in use")
    monkeypatch.setattr(fake, "NetworkPortal", refuse)
    fake.targets[0].tpgs[0].network_portals.clear()          # e.g. the portal went with a reboot
    real_lun = fake.LUN
    monkeypatch.setattr(fake, "LUN", lambda tpg, n, so: refuse() if n == 3 else real_lun(tpg, n, so))
    # etcd: H2 revoked, H1 loses LUN 2, a new LUN 3 that LIO refuses
    spec = lio.TargetSpec("iqn.t", luns={1: "zs-v", 3: "zs-w"}, acls={
        H1: lio.AclSpec(mapped={1: False, 3: False})})
    cfg.errors = 0
    cfg.apply_targets(lio.Desired(targets={"iqn.t": spec}), bs)
    tpg = fake.targets[0].tpgs[0]
    assert cfg.errors == 2                                    # the portal and LUN 3
    assert [a.node_wwn for a in tpg.node_acls] == [H1]
    assert [m.mapped_lun for m in tpg.node_acls[0].mapped_luns] == [1]
    assert [lun.lun for lun in tpg.luns] == [1]


def test_discovery_lists_a_target_only_to_initiators_on_its_acl(tmp_path, monkeypatch):
    """LIO's TPG default demo_mode_discovery=1 answered SendTargets with every target to any
    initiator; it is set to 0 (only targets the initiator has a NodeACL on)."""
    fake = FakeRts()
    monkeypatch.setitem(sys.modules, "rtslib_fb", fake)
    cfg, bs = _one_lun_config(fake, tmp_path)
    spec = lio.TargetSpec("iqn.t", luns={1: "zs-v"}, acls={H1: lio.AclSpec(mapped={1: False})})
    cfg.apply_targets(lio.Desired(targets={"iqn.t": spec}), bs)
    tpg = fake.targets[0].tpgs[0]
    assert tpg.attrs["demo_mode_discovery"] == "0" and tpg.attrs["generate_node_acls"] == "0"


async def test_draining_and_stopping_disable_the_tpgs(catalog_setup, fake_lio):
    """Stop used to only detach the rings (portal and sessions left up: hosts queued commands
    on rings nobody served) and draining only logged a warning. Now draining disables our TPGs
    and undraining enables them; stop disables them while the loops still answer."""
    ctx, cat = catalog_setup
    v, _ = await volumes.create_volume(ctx, "v", "16Mi", 1)
    await exports.add_acl(ctx, "v", H1)
    iqn = (await exports.list_targets(ctx))[0]["iqn"]
    await async_wait_for(lambda: v.volume_id in cat.acl and cat.luns and cat.targets and cat.volumes,
                         5, "catalog")
    fe = fake_lio(cat)
    await fe.start()
    tpg = next(t for t in fe.fake.targets if t.wwn == iqn).tpgs[0]
    assert tpg.enable
    fe.set_draining(True)
    await async_wait_for(lambda: not tpg.enable, 5, "TPG disabled while draining")
    fe.set_draining(False)
    await async_wait_for(lambda: tpg.enable, 5, "TPG enabled again")
    seen = []
    detach = fe._detach

    async def recording_detach(name):
        seen.append((name in fe.loops, tpg.enable))
        await detach(name)
    fe._detach = recording_detach
    await fe.stop()
    assert seen and all(served and not enabled for served, enabled in seen)
    assert not tpg.enable and [t.wwn for t in fe.fake.targets] == [iqn]     # configuration kept


async def test_a_stale_catalog_disables_the_tpgs_and_answers_not_ready(catalog_setup, fake_lio, monkeypatch):
    """LioFrontend never looked at catalog.stale: from a mirror that may still hold revoked ACLs,
    LIO kept its sessions and the rings kept serving. Now the TPGs are disabled while stale
    (logins refused, 0x0301) and commands answered NOT READY (02/04/01), as the built-in target
    does; the relist that makes the catalog current re-enables them."""
    from chunk.catalog import Catalog
    ctx, cat = catalog_setup
    v, _ = await volumes.create_volume(ctx, "v", "16Mi", 1)
    await exports.add_acl(ctx, "v", H1)
    iqn = (await exports.list_targets(ctx))[0]["iqn"]
    await async_wait_for(lambda: v.volume_id in cat.acl and cat.luns and cat.targets and cat.volumes,
                         5, "catalog")
    fe = fake_lio(cat)
    await fe.start()
    try:
        tpg = next(t for t in fe.fake.targets if t.wwn == iqn).tpgs[0]
        ring = fe.rings["fake-" + lio.backstore_name(v.volume_id)]
        assert tpg.enable
        monkeypatch.setattr(cat, "_resynced", lambda: None)         # stays stale through the relist
        cat._go_stale(60.0)
        await async_wait_for(lambda: not tpg.enable, 5, "TPG disabled while stale")
        c = ring.queue(tur())
        await async_wait_for(lambda: "status" in ring.answers[c], 5, "answer")
        sense = ring.answers[c]["sense"]
        assert ring.answers[c]["status"] == 2 and (sense[2] & 0x0F, sense[12], sense[13]) == (0x02, 0x04, 0x01)
        Catalog._resynced(cat)                                      # current again
        await async_wait_for(lambda: tpg.enable, 5, "TPG enabled after the relist")
        c = ring.queue(tur())
        await async_wait_for(lambda: "status" in ring.answers[c], 5, "answer")
        assert ring.answers[c]["status"] == 0
    finally:
        await fe.stop()
