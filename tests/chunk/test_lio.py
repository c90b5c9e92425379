"""The LIO frontend's desired state, computed from a real catalog mirrored from etcd, and its
clear refusal to start on a kernel without LIO/TCMU (this machine's). Applying the state to
LIO and serving the TCMU rings is proven in the kernel lab (tests/lab/test_lab_lio.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

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
    assert set(d.backstores) == {lio.backstore_name(a.volume_id), lio.backstore_name(b.volume_id)}
    assert d.backstores[lio.backstore_name(a.volume_id)].size == 64 << 20
    t = d.targets[iqn]
    assert t.luns == {a.lun: lio.backstore_name(a.volume_id), b.lun: lio.backstore_name(b.volume_id)}
    assert t.acls[H1].mapped == {a.lun: False, b.lun: True}       # b read-only for H1
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
