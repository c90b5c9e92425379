"""A disk of another chunk server mounted at one of this server's paths is refused, not
scanned: generations are not comparable across servers, and settling its copies against this
server's would delete the in-sync one and serve stale data (chunk/disks.py, ``prepare``)."""

from __future__ import annotations

import shutil
from pathlib import Path

from chunk import disks
from chunk.storage.replica_store import ReplicaStore

X, Y = "a" * 32, "b" * 32                  # two chunk servers' ids


def _server_x_disk(t: Path, chunk_id: str | None) -> Path:
    """Server X's disk: extent v/0 resynced to it (generation 7), holding OLD data."""
    data = t / "xdata"
    data.mkdir()
    spec = disks.DiskSpec(t / "x_d0")
    if chunk_id is None:                   # prepared by a version without owner markers
        disks.prepare(spec)
    else:
        disks.prepare_all([spec], data, chunk_id)
    with ReplicaStore([(spec.path, None)]) as x:
        x.create("v", 0, 1)
        x.write("v", 0, 0, b"O" * 4096, seq=1)
        x.set_generation("v", 0, 7)
    return spec.path


def _prepare_all(specs, data, chunk_id):
    return disks.prepare_all(specs, data, chunk_id) if chunk_id else disks.prepare_all(specs, data)


def _server_y(t: Path, chunk_id: str | None = Y) -> tuple[list[disks.DiskSpec], Path]:
    """Server Y, disks d0 and d1; its in-sync copy of v/0 (generation 1) holds NEW data on d0."""
    data = t / "ydata"
    data.mkdir()
    specs = [disks.DiskSpec(t / "y_d0"), disks.DiskSpec(t / "y_d1")]
    assert all(d.error is None for d in _prepare_all(specs, data, chunk_id))
    with ReplicaStore([(s.path, None) for s in specs]) as y:
        y._disks[1].enospc = True                                     # noqa: SLF001
        y.create("v", 0, 1)
        y.write("v", 0, 0, b"N" * 4096, seq=2)
        y.flush("v", 0)
    return specs, data


def _start_y(specs, data, chunk_id: str | None = Y) -> tuple[list[disks.LocalDisk], ReplicaStore]:
    """What the chunk server does at start: prepare, then the store beside the failed ones."""
    prepared = _prepare_all(specs, data, chunk_id)
    failed = {str(d.path): d.error for d in prepared if d.error is not None}
    return prepared, ReplicaStore([(s.path, None) for s in specs], failed=failed)


def _mount_at(src: Path, dst: Path) -> None:
    shutil.rmtree(dst)
    shutil.copytree(src, dst)


def test_another_servers_disk_at_a_known_path_is_refused_and_ours_still_served(tmp_path):
    x_disk = _server_x_disk(tmp_path, None)                   # no owner marker: the disk-id tells
    specs, data = _server_y(tmp_path, None)
    _mount_at(x_disk, specs[1].path)                          # the operator mixes up disks
    prepared, y = _start_y(specs, data, None)
    assert prepared[0].error is None
    assert prepared[1].disk_id is None and "not disk" in prepared[1].error
    assert disks.probe(prepared[1])["state"] == "failed"
    with y:
        assert bytes(y.read("v", 0, 0, 4096)[0]) == b"N" * 4096       # served stale "O" before
        assert y.stat("v", 0)["disk"] == str(specs[0].path)
    assert any(p.name.startswith("v.0") for p in specs[0].path.iterdir())  # not deleted


def test_a_disk_owned_by_another_server_is_refused_at_a_new_path(tmp_path):
    x_disk = _server_x_disk(tmp_path, X)
    assert (x_disk / disks.OWNER_FILE).read_text().strip() == X
    specs, data = _server_y(tmp_path)
    new = disks.DiskSpec(tmp_path / "y_d2")                   # a path Y never knew
    shutil.copytree(x_disk, new.path)
    prepared = disks.prepare_all([*specs, new], data, Y)
    assert prepared[2].disk_id is None and X in prepared[2].error
    assert str(new.path) not in disks.load_known(data)        # not recorded as Y's
    assert (new.path / disks.OWNER_FILE).read_text().strip() == X


def test_disks_swapped_within_one_server_are_fine(tmp_path):
    specs, data = _server_y(tmp_path)
    before = {str(s.path): d.disk_id for s, d in zip(specs, disks.prepare_all(specs, data, Y))}
    tmp = tmp_path / "swap"
    specs[0].path.rename(tmp)
    specs[1].path.rename(specs[0].path)
    tmp.rename(specs[1].path)
    prepared, y = _start_y(specs, data)
    assert all(d.error is None for d in prepared)
    assert {str(d.path): d.disk_id for d in prepared} == {
        str(specs[0].path): before[str(specs[1].path)], str(specs[1].path): before[str(specs[0].path)]}
    assert disks.load_known(data) == {p: i for p, i in
                                      {str(d.path): d.disk_id for d in prepared}.items()}
    with y:
        assert bytes(y.read("v", 0, 0, 4096)[0]) == b"N" * 4096
        assert y.stat("v", 0)["disk"] == str(specs[1].path)


def test_a_disk_without_the_owner_marker_is_adopted(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    spec = disks.DiskSpec(tmp_path / "d0")
    first = disks.prepare_all([spec], data)                   # an older version: no marker
    assert not (spec.path / disks.OWNER_FILE).exists()
    again = disks.prepare_all([spec], data, Y)
    assert again[0].error is None and again[0].disk_id == first[0].disk_id
    assert (spec.path / disks.OWNER_FILE).read_text().strip() == Y
    assert disks.prepare_all([spec], data, Y)[0].error is None
