"""Disk specs, preparation and probing, and the atomic id files (no etcd needed)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from chunk import disks
from chunk.identity import IdentityError, load_or_create, write_atomic
from zstore.config import ConfigError


def test_parse_spec_with_and_without_capacity(tmp_path: Path):
    assert disks.parse_spec(f"{tmp_path}/d0:10Gi") == disks.DiskSpec(tmp_path / "d0", 10 * 2**30)
    assert disks.parse_spec(f"{tmp_path}/d0") == disks.DiskSpec(tmp_path / "d0", None)
    assert disks.parse_spec("rel/d1:1M").path == Path(os.path.abspath("rel/d1"))


@pytest.mark.parametrize("spec, msg", [("/d:lots", "invalid size"), ("/d:0", "must be positive"),
                                       (":10Gi", "missing path"), ("", "empty disk spec")])
def test_parse_spec_rejects_bad_input(spec: str, msg: str):
    with pytest.raises(ConfigError, match=msg):
        disks.parse_spec(spec)


def test_prepare_creates_dir_and_stable_disk_id(tmp_path: Path):
    spec = disks.DiskSpec(tmp_path / "a" / "disk0", 2**30)
    first = disks.prepare(spec)
    assert first.disk_id and first.error is None
    assert (spec.path / disks.DISK_ID_FILE).read_text().strip() == first.disk_id
    assert disks.prepare(spec).disk_id == first.disk_id


def test_probe_reports_capacity_usage_and_state(tmp_path: Path):
    d = disks.prepare(disks.DiskSpec(tmp_path / "disk0", 10 * 2**20))
    (d.path / "blob").write_bytes(b"x" * 300_000)
    rec = disks.probe(d)
    assert rec["state"] == "ok" and rec["capacity"] == 10 * 2**20 and rec["disk_id"] == d.disk_id
    assert 300_000 <= rec["used"] < 400_000          # allocated bytes: the blob plus the id file
    (d.path / "big").write_bytes(b"y" * (10 * 2**20))
    assert disks.probe(d)["state"] == "full"


def test_probe_without_capacity_uses_filesystem_size(tmp_path: Path):
    d = disks.prepare(disks.DiskSpec(tmp_path / "disk0"))
    st = os.statvfs(tmp_path)
    assert disks.probe(d)["capacity"] == st.f_blocks * st.f_frsize


def test_unusable_directory_is_failed_not_fatal(tmp_path: Path):
    (tmp_path / "file").write_text("not a dir")
    bad = disks.prepare(disks.DiskSpec(tmp_path / "file" / "disk0", 2**30))
    good = disks.prepare(disks.DiskSpec(tmp_path / "disk1", 2**30))
    recs = disks.probe_all([bad, good])
    assert recs[0]["state"] == "failed" and "Not a directory" in recs[0]["error"]
    assert recs[1]["state"] == "ok"
    assert not disks.all_failed(recs) and disks.all_failed(recs[:1])


def test_vanished_or_swapped_disk_is_failed(tmp_path: Path):
    d = disks.prepare(disks.DiskSpec(tmp_path / "disk0", 2**30))
    (d.path / disks.DISK_ID_FILE).write_text("0" * 32 + "\n")   # another filesystem's id
    assert "changed" in disks.probe(d)["error"]
    for p in d.path.iterdir():
        p.unlink()
    d.path.rmdir()
    assert disks.probe(d) | {"error": None} == {
        "path": str(d.path), "capacity": 2**30, "used": 0, "state": "failed", "schema": 1,
        "disk_id": d.disk_id, "free": 0, "error": None}


def test_id_file_is_created_once_and_validated(tmp_path: Path):
    path = tmp_path / "chunk-id"
    cid, created = load_or_create(path)
    assert created and len(cid) == 32
    assert load_or_create(path) == (cid, False)
    assert not [p for p in tmp_path.iterdir() if p.name != "chunk-id"]   # no temp file left
    write_atomic(path, b"garbage\n")
    with pytest.raises(IdentityError, match="not hold a valid id"):
        load_or_create(path)


def test_a_disk_whose_id_vanished_gets_no_new_extent(tmp_path: Path):
    """Unmounted under a running server: the probe fails the disk, and the extent store must
    not go on placing extents there (on the root filesystem's empty mount point)."""
    from chunk.server import ChunkServer
    from chunk.storage.extent_file import BLOCK_SIZE
    from chunk.storage.replica_store import ReplicaStore
    size = 32 * BLOCK_SIZE
    a, b = (disks.prepare(disks.DiskSpec(tmp_path / n, c)) for n, c in (("a", 4 * size), ("b", 8 * size)))
    server = ChunkServer(None, "c" * 32, [a, b])
    with ReplicaStore([(d.path, d.spec.capacity) for d in (a, b)], extent_size=size) as store:
        server.engine = SimpleNamespace(store=store)     # what probe_disks uses of the engine
        store.create("v", 0, 1)
        assert store.stat("v", 0)["disk"] == str(b.path)          # b has the most room
        store.write("v", 0, 0, b"\x77" * BLOCK_SIZE, seq=1)
        (b.path / disks.DISK_ID_FILE).unlink()
        recs = {r["path"]: r for r in asyncio.run(server.probe_disks())}
        assert recs[str(b.path)]["state"] == "failed" and "vanished" in recs[str(b.path)]["error"]
        store.create("v", 1, 1)
        assert store.stat("v", 1)["disk"] == str(a.path)
        assert {u["path"]: u["state"] for u in store.usage()} == {str(a.path): "ok", str(b.path): "failed"}
        assert store.read("v", 0, 0, BLOCK_SIZE)[0] == b"\x77" * BLOCK_SIZE     # what is there still reads
        (b.path / disks.DISK_ID_FILE).write_text(b.disk_id + "\n")             # mounted again
        assert all(r["state"] != "failed" for r in asyncio.run(server.probe_disks()))
        store.create("v", 2, 1)
        assert store.stat("v", 2)["disk"] == str(b.path)


def test_a_restart_does_not_reinitialize_a_known_disk_missing_its_id(tmp_path: Path):
    """A path this server gave an id to and whose disk-id is gone is a disk that is not mounted
    (an empty mount point), not a new disk: failed, no new id, the directory not re-made."""
    data = tmp_path / "data"
    data.mkdir()
    specs = [disks.DiskSpec(tmp_path / n, 2**30) for n in ("m0", "m1", "m2")]
    first = disks.prepare_all(specs[:2], data)
    assert all(d.error is None for d in first)
    (specs[0].path / disks.DISK_ID_FILE).unlink()
    specs[1].path.joinpath(disks.DISK_ID_FILE).unlink()
    specs[1].path.rmdir()
    again = disks.prepare_all(specs, data)                  # restart, with a new disk m2 added
    for d in again[:2]:
        assert d.disk_id is None and "vanished" in d.error
        assert disks.probe(d)["state"] == "failed"
    assert not (specs[0].path / disks.DISK_ID_FILE).exists() and not specs[1].path.exists()
    assert again[2].error is None and again[2].disk_id        # a path it never knew is a new disk
    (specs[0].path / disks.DISK_ID_FILE).write_text(first[0].disk_id + "\n")   # mounted again
    assert disks.prepare_all(specs, data)[0].disk_id == first[0].disk_id


# -- space: the filesystem's real state, each filesystem counted once (docs/storage.md, "Disk space")

_SLACK = 256 * 2**20      # other writers on the test filesystem between our statvfs and the probe's


def _avail(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _probed(d: disks.LocalDisk) -> tuple[dict, int, int]:
    """The probe's record and what statvfs said just before and after it."""
    before = _avail(d.path)
    rec = disks.probe(d)
    return rec, min(before, _avail(d.path)) - _SLACK, max(before, _avail(d.path)) + _SLACK


def test_a_disk_without_a_limit_is_its_whole_filesystem(tmp_path: Path):
    """Free is what an unprivileged writer can still use (f_bavail), used everything else on the
    filesystem (other files, root-reserved blocks), not only zstore's files; ours separately."""
    d = disks.prepare(disks.DiskSpec(tmp_path / "disk0"))
    (d.path / "blob").write_bytes(b"x" * 300_000)
    st = os.statvfs(tmp_path)
    fs_size = st.f_blocks * st.f_frsize
    rec, low, high = _probed(d)
    assert rec["state"] == "ok" and rec["capacity"] == fs_size
    assert rec["used"] >= fs_size - high                        # was: only zstore's few bytes
    assert low <= rec["free"] <= high and rec["used"] == fs_size - rec["free"]
    assert rec["limited"] is False and rec["fs_free"] == rec["free"] and rec["fs_capacity"] == fs_size
    assert 300_000 <= rec["zstore_used"] < 400_000
    assert rec["fs"] == disks.filesystem_id(os.stat(tmp_path).st_dev)


def test_a_limit_never_offers_more_than_the_filesystem_has(tmp_path: Path):
    """PATH:CAPACITY keeps (limit, our bytes), but a limit beyond what is available is no room."""
    st = os.statvfs(tmp_path)
    limit = 2 * st.f_blocks * st.f_frsize                     # more than the filesystem could hold
    d = disks.prepare(disks.DiskSpec(tmp_path / "disk0", limit))
    (d.path / "blob").write_bytes(b"x" * 300_000)
    rec, low, high = _probed(d)
    assert rec["capacity"] == limit and 300_000 <= rec["used"] < 400_000
    assert low <= _view([rec]).free <= high                # was: limit - used, twice the filesystem
    assert low <= rec["free"] <= high and rec["used"] == rec["zstore_used"] and rec["limited"] is True
    small = disks.prepare(disks.DiskSpec(tmp_path / "disk1", 10 * 2**20))
    rec = disks.probe(small)
    assert rec["free"] == 10 * 2**20 - rec["used"]            # the limit binds: its own room


def _view(recs: list[dict], cid: str = "c" * 32):
    from meta.chunks import ChunkView
    from zstore.records import ChunkInfo, ChunkLive
    info = ChunkInfo(chunk_id=cid, hostname="h", address="127.0.0.1", data_port=1, portal="p:3260",
                     disks=recs)
    return ChunkView(info=info, live=ChunkLive(chunk_id=cid, pid=1, started=1.0, lease_ttl=5, disks=recs),
                     admin=None, chunk_id=cid)


def test_disks_sharing_a_filesystem_count_it_once(tmp_path: Path):
    """Two disk directories on one filesystem each report its state; the server's totals, and
    the free space placement weighs the server by, count the filesystem once (was: twice)."""
    from meta.chunks import candidates
    a, b = (disks.prepare(disks.DiskSpec(tmp_path / n)) for n in ("d0", "d1"))
    st = os.statvfs(tmp_path)
    fs_size = st.f_blocks * st.f_frsize
    low = _avail(tmp_path) - _SLACK
    recs = disks.probe_all([a, b])
    high = _avail(tmp_path) + _SLACK
    view = _view(recs)
    assert view.capacity == fs_size                           # was: twice
    assert low <= view.free <= high                           # was: twice its size
    assert recs[0]["fs"] == recs[1]["fs"] and view.free == min(r["fs_free"] for r in recs)
    for r in recs:                              # each disk: all the filesystem has, as either could use it
        assert r["state"] == "ok" and r["capacity"] == fs_size and low <= r["free"] <= high
    assert view.used == fs_size - view.free
    assert view.to_dict()["free"] == view.free
    (cand,), _ = candidates([view])
    assert cand.free == view.free
    limited = [disks.probe(disks.prepare(disks.DiskSpec(tmp_path / n, 2**30))) for n in ("l0", "l1")]
    both = _view(limited)                       # limits add up, to at most the filesystem's size
    assert both.capacity == min(2 * 2**30, fs_size) and both.used == sum(r["used"] for r in limited)
    assert both.free == min(sum(r["free"] for r in limited), min(r["fs_free"] for r in limited))
    mixed = _view(recs + limited)               # an unlimited disk stands for the whole filesystem
    assert mixed.capacity == fs_size and mixed.free == min(r["fs_free"] for r in recs + limited)


def test_records_from_an_older_server_count_as_they_say():
    view = _view([{"path": "/a", "capacity": 10 * 2**30, "used": 2**30, "state": "ok"},
                  {"path": "/b", "capacity": 10 * 2**30, "used": 2**30, "state": "full"},
                  {"path": "/c", "capacity": 10 * 2**30, "used": 0, "state": "failed"}])
    assert (view.capacity, view.used, view.free) == (20 * 2**30, 2 * 2**30, 9 * 2**30)


def test_storage_allocated_is_our_extents_not_the_filesystems_usage(tmp_path: Path):
    """``storage.allocated`` (the live record) counts this server's replicas' bytes; it was the
    disks' usage: without a limit, the whole filesystem's, once per disk on it."""
    from chunk.storage.engine import StorageEngine
    from chunk.storage.host_crash import BootState
    from zstore.keys import Keys
    eng = StorageEngine(None, Keys("/cap"), "me", [(tmp_path / "d0", None), (tmp_path / "d1", None)],
                        listen=("127.0.0.1", 0), token=None, boot_state=BootState(tmp_path, "boot-1"))
    try:
        for i in range(2):
            eng.store.create("v", i, 1)
            eng.store.write("v", i, 0, b"x" * 8192, seq=1)
        ours = sum(eng.store.stat("v", i)["allocated"] for i in range(2))
        assert 16384 <= ours < 4 * 2**20
        assert eng.status()["allocated"] == ours
    finally:
        eng.store.close()


def _boot(tmp_path: Path, specs: list[disks.DiskSpec]):
    """What ``chunk.server.main`` does with its disks up to the storage engine: prepare them
    against the recorded ids, probe them, and build the engine (no etcd: it is not started)."""
    from chunk.server import ChunkServer
    from zstore.config import Config
    from zstore.keys import Keys
    cfg = Config()
    cfg.chunk.data_dir = str(tmp_path / "data")
    server = ChunkServer(cfg, "c" * 32, disks.prepare_all(specs, tmp_path / "data"))
    server.probed(disks.probe_all(server.disks))
    return server, server.storage_engine(None, Keys("/boot"))


def test_a_disk_not_mounted_at_startup_makes_its_extents_io_errors_not_absent(tmp_path: Path):
    """A disk whose filesystem did not mount at a restart (its disk-id gone from the empty mount
    point) failed to prepare and was left out of the extent store, which then knew of no lost
    disk and answered NO_EXTENT for its extents: every replica saying so on a generation-1
    record read as zeros, and a write re-created the extent empty here. The store gets every
    configured disk, the failed one marked unusable: an I/O error (the coordinator drops this
    replica and serves from the others), nothing placed there, the disk still reported failed."""
    from chunk.storage.replica_store import StoreIOError
    from chunk.storage.scrubber import _default_cursor
    (tmp_path / "data").mkdir()
    d1, d2 = specs = [disks.DiskSpec(tmp_path / "d1", 8 << 30), disks.DiskSpec(tmp_path / "d2", 4 << 30)]
    _, eng = _boot(tmp_path, specs)
    try:
        eng.store.create("v", 0, 1)
        assert eng.store.stat("v", 0)["disk"] == str(d1.path)         # the most room
        eng.store.write("v", 0, 0, b"DATA" * 1024, seq=1)
        eng.store.flush("v", 0)
    finally:
        eng.store.close()
    os.rename(d1.path, tmp_path / "d1.fs")              # the restart: d1's filesystem not mounted
    d1.path.mkdir()
    server, eng = _boot(tmp_path, specs)
    store = eng.store
    try:
        assert "vanished" in (server.disks[0].error or "")
        with pytest.raises(StoreIOError, match="may be there"):
            store.read("v", 0, 0, 4096)
        with pytest.raises(StoreIOError):
            store.write("v", 0, 0, b"x" * 4096, seq=2)
        store.create("v", 1, 1)                          # a new extent: never on the failed disk
        assert store.stat("v", 1)["disk"] == str(d2.path)
        assert os.listdir(d1.path) == []                 # nothing written on the mount point
        usage = {u["path"]: u for u in store.usage()}
        assert usage[str(d1.path)]["state"] == "failed" and "vanished" in usage[str(d1.path)]["error"]
        assert usage[str(d2.path)]["state"] == "ok"
        recs = {r["path"]: r for r in asyncio.run(server.probe_disks())}    # reported as before
        assert recs[str(d1.path)]["state"] == "failed" and "vanished" in recs[str(d1.path)]["error"]
        assert recs[str(d2.path)]["state"] == "ok"
        store.create("v", 2, 1)                          # a later probe leaves it unusable
        assert store.stat("v", 2)["disk"] == str(d2.path)
        assert _default_cursor(store) == d2.path / ".scrub-cursor"     # not on the failed disk
    finally:
        store.close()


def test_a_disk_whose_mount_point_is_gone_at_startup_is_not_created_again(tmp_path: Path):
    """A disk that failed to prepare is never written to: the store made its path again
    (mkdir on the root filesystem where the mount point was), which prepare deliberately
    avoids. Its path stays absent, and it is still a lost disk: "may be there", not NO_EXTENT."""
    from chunk.storage.replica_store import StoreIOError
    from chunk.storage.scrubber import _default_cursor
    (tmp_path / "data").mkdir()
    d1, d2 = specs = [disks.DiskSpec(tmp_path / "mnt" / "d1", 8 << 30),
                      disks.DiskSpec(tmp_path / "d2", 4 << 30)]
    _, eng = _boot(tmp_path, specs)
    try:
        eng.store.create("v", 0, 1)
        assert eng.store.stat("v", 0)["disk"] == str(d1.path)
    finally:
        eng.store.close()
    os.rename(tmp_path / "mnt", tmp_path / "mnt.gone")  # its mount point (and parent) gone
    server, eng = _boot(tmp_path, specs)
    store = eng.store
    try:
        assert "vanished" in (server.disks[0].error or "")
        assert not (tmp_path / "mnt").exists()           # nothing made where it was
        with pytest.raises(StoreIOError, match="may be there"):
            store.read("v", 0, 0, 4096)
        store.create("v", 1, 1)
        assert store.stat("v", 1)["disk"] == str(d2.path)
        usage = {u["path"]: u for u in store.usage()}
        assert usage[str(d1.path)]["state"] == "failed"
        asyncio.run(server.probe_disks())
        assert _default_cursor(store) == d2.path / ".scrub-cursor"
        assert not (tmp_path / "mnt").exists()
    finally:
        store.close()


def test_an_extent_on_a_disk_whose_disk_id_does_not_read_is_not_served(tmp_path: Path):
    """A disk-id that does not read (garbage: another filesystem, a torn write) fails prepare,
    yet the store opened the extents under that path and served them as if the disk were ours.
    They are "may be there but unreadable" now: I/O errors, never data, never NO_EXTENT, and
    their files are left exactly as they are."""
    from chunk.storage.replica_store import StoreIOError
    from chunk.storage.scrubber import _default_cursor
    (tmp_path / "data").mkdir()
    d1, d2 = specs = [disks.DiskSpec(tmp_path / "d1", 8 << 30), disks.DiskSpec(tmp_path / "d2", 4 << 30)]
    _, eng = _boot(tmp_path, specs)
    try:
        eng.store.create("v", 0, 1)
        assert eng.store.stat("v", 0)["disk"] == str(d1.path)
        eng.store.write("v", 0, 0, b"DATA" * 1024, seq=1)
        eng.store.flush("v", 0)
    finally:
        eng.store.close()
    (d1.path / disks.DISK_ID_FILE).write_text("not an id\n")
    before = {p.name: p.read_bytes() for p in d1.path.iterdir() if p.is_file()}
    server, eng = _boot(tmp_path, specs)
    store = eng.store
    try:
        assert "valid id" in (server.disks[0].error or "")
        assert not store.has("v", 0) and ("v", 0) not in store.extents()
        with pytest.raises(StoreIOError, match="may be there"):
            store.read("v", 0, 0, 4096)
        with pytest.raises(StoreIOError):
            store.write("v", 0, 0, b"x" * 4096, seq=2)
        with pytest.raises(StoreIOError):
            store.stat("v", 0)
        store.create("v", 1, 1)
        assert store.stat("v", 1)["disk"] == str(d2.path)
        assert _default_cursor(store) == d2.path / ".scrub-cursor"
    finally:
        store.close()
    assert {p.name: p.read_bytes() for p in d1.path.iterdir() if p.is_file()} == before
