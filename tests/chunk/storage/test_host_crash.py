"""A host crash (the page cache lost) told apart from a process restart at chunk-server start
(chunk/storage/host_crash.py, docs/storage.md "Durability contract").

A replica back from a host crash may miss acknowledged writes that were never flushed while it
is still listed as in sync: it must drop itself (and be resynced) before it serves. A clean
stop flushes every replica first, so a reboot after one changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from types import SimpleNamespace

import pytest

from chunk.storage.engine import StorageEngine
from chunk.storage.host_crash import STATE_FILE, BootState, current_boot_id
from chunk.storage.metaclient import MetaError
from tests.cluster import cluster, wait_for
from zstore.keys import Keys
from zstore.records import ExtentRecord

MiB = 1 << 20


# -- the boot record -------------------------------------------------------------------------

def test_an_unclean_stop_under_another_boot_makes_every_extent_suspect_until_settled(tmp_path):
    exts = [("v", 0), ("v", 1)]
    assert BootState(tmp_path, "boot-1").begin(exts) == set()      # new data dir: nothing known
    assert BootState(tmp_path, "boot-1").begin(exts) == set()      # SIGKILL: the page cache stayed
    crashed = BootState(tmp_path, "boot-2")
    assert crashed.begin(exts) == set(exts) and crashed.host_crash
    # Not settled yet (a crash again, or a plain restart): still suspect, from the record.
    again = BootState(tmp_path, "boot-2")
    assert again.begin(exts[:1]) == set(exts) and not again.host_crash
    again.write({("v", 1)}, clean=False)
    assert BootState(tmp_path, "boot-2").begin(exts) == {("v", 1)}


def test_a_clean_stop_then_a_reboot_is_not_a_crash(tmp_path):
    BootState(tmp_path, "boot-1").begin([("v", 0)])
    BootState(tmp_path, "boot-1").write(set(), clean=True)
    after = BootState(tmp_path, "boot-2")
    assert after.begin([("v", 0)]) == set() and not after.host_crash
    # ...and the start recorded "running, not clean" before anything could write.
    assert json.loads((tmp_path / STATE_FILE).read_text()) == {"boot_id": "boot-2", "clean": False,
                                                               "suspect": []}


# -- the engine: clean stop, settling suspects ------------------------------------------------

def _engine(tmp_path, boot_id: str) -> StorageEngine:
    return StorageEngine(None, Keys("/hc"), "me", [(tmp_path / "disk0", None)], listen=("127.0.0.1", 0),
                         token=None, boot_state=BootState(tmp_path, boot_id))


def test_a_clean_stop_flushes_every_replica_before_it_records_itself(tmp_path):
    eng = _engine(tmp_path, "boot-1")
    for i in range(3):
        eng.store.create("v", i, 1)
        eng.store.write("v", i, 0, b"x" * 4096, seq=1)
    flushed = []
    real = eng.store.flush
    eng.store.flush = lambda vid, idx: (flushed.append((vid, idx)), real(vid, idx))[1]
    asyncio.run(eng.stop())
    assert sorted(flushed) == [("v", 0), ("v", 1), ("v", 2)]
    assert json.loads((tmp_path / STATE_FILE).read_text())["clean"] is True
    eng2 = _engine(tmp_path, "boot-2")                 # rebooted since: nothing suspect
    assert eng2.suspect == set()
    eng2.store.close()


def test_a_failed_flush_at_stop_is_not_a_clean_stop(tmp_path):
    eng = _engine(tmp_path, "boot-1")
    eng.store.create("v", 0, 1)
    eng.store.create("v", 1, 1)

    def flush(vid, idx):
        raise OSError(5, "Input/output error")
    eng.store.flush = flush
    asyncio.run(eng.stop())
    assert json.loads((tmp_path / STATE_FILE).read_text())["clean"] is False
    eng2 = _engine(tmp_path, "boot-2")
    assert eng2.suspect == {("v", 0), ("v", 1)}
    eng2.store.close()


class _Etcd:
    def __init__(self, kv: dict[bytes, bytes]) -> None:
        self.kv = kv

    async def get(self, key: bytes):
        v = self.kv.get(key)
        return None if v is None else SimpleNamespace(value=v)


class _Meta:
    """The meta's drop, on the fake etcd (refusing the last replica, as meta/extents.py does)."""

    def __init__(self, etcd: _Etcd, keys: Keys) -> None:
        self.etcd, self.keys, self.calls = etcd, keys, []

    async def call(self, method, path, body):
        self.calls.append(path)
        _, vid, idx, _ = path.strip("/").split("/")
        key = self.keys.extent(vid, int(idx))
        rec = ExtentRecord.decode(self.etcd.kv[key])
        if rec.replicas == [body["chunk_id"]]:
            raise MetaError(409, "last replica")
        rec.replicas.remove(body["chunk_id"])
        rec.stale[body["chunk_id"]] = rec.generation
        rec.generation += 1
        self.etcd.kv[key] = rec.encode()
        return rec.to_dict()


async def test_suspects_are_dropped_beside_an_up_peer_and_wait_while_every_peer_is_down(tmp_path):
    keys = Keys("/hc")
    recs = {0: ["me", "up"], 1: ["me", "down"], 2: ["me"], 3: ["up"]}      # 4: gone
    kv = {keys.extent("v", i): ExtentRecord(volume_id="v", index=i, replicas=r).encode()
          for i, r in recs.items()}
    kv[keys.chunk_live("up")] = b"{}"
    eng = _engine(tmp_path, "boot-1")
    eng.etcd = _Etcd(kv)
    eng.meta = _Meta(eng.etcd, keys)
    eng.suspect = {("v", i) for i in range(5)}
    await eng._settle_suspects()                                        # noqa: SLF001
    assert eng.meta.calls == ["/extents/v/0/drop"]
    assert ExtentRecord.decode(kv[keys.extent("v", 0)]).replicas == ["up"]
    assert ExtentRecord.decode(kv[keys.extent("v", 1)]).replicas == ["me", "down"]
    assert eng.suspect == {("v", 1)}             # its peer may come back with what it lost
    assert json.loads((tmp_path / STATE_FILE).read_text())["suspect"] == [["v", 1]]
    kv[keys.chunk_live("down")] = b"{}"          # it is back: now this one goes
    await eng._settle_suspects()                                        # noqa: SLF001
    assert ExtentRecord.decode(kv[keys.extent("v", 1)]).replicas == ["down"] and not eng.suspect
    eng.store.close()


# -- real chunk servers ----------------------------------------------------------------------

def _setup(c, name: str):
    from tests.chunk.storage.test_replication import chunk_ids, extents, qemu_io, serving_volume
    vol = serving_volume(c, 2, name, "64Mi", 2, served_on=(0, 1))
    qemu_io(c, vol, 0, "write -P 0xaa 0 4M", "flush")
    ext = extents(c, name)
    assert len(ext) == 1 and sorted(ext[0]["replicas"]) == sorted(chunk_ids(c))
    return vol, ext[0]


def _set_recorded_boot_id(c, i: int, boot_id: str) -> dict:
    """What chunk server ``i`` recorded, with another boot id put in (a reboot since)."""
    path = c.workdir / f"chunk{i}" / STATE_FILE
    state = json.loads(path.read_text()) if path.exists() else {"clean": False, "suspect": []}
    path.write_text(json.dumps({**state, "boot_id": boot_id}))
    return state


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(not shutil.which("qemu-io"), reason="qemu-utils is not installed")
def test_a_replica_back_from_a_host_crash_is_not_served_as_in_sync_and_is_resynced(tmp_path, etcd_server):
    from tests.chunk.storage.test_replication import chunk_ids, digests, extents, qemu_io
    with cluster(tmp_path, etcd_server, metas=1, chunks=2) as c:
        vol, ext = _setup(c, "hc")
        # A is on disk on chunk1; B is acknowledged on both replicas but not flushed.
        saved = tmp_path / "chunk1-disk-as-flushed"
        shutil.copytree(c.workdir / "chunk1" / "disk0", saved)
        qemu_io(c, vol, 0, "write -P 0xbb 0 4M")
        # chunk1's host loses power: its page cache (B) is gone, the disk holds A.
        c.chunks[1].kill()
        shutil.rmtree(c.workdir / "chunk1" / "disk0")
        shutil.copytree(saved, c.workdir / "chunk1" / "disk0")
        _set_recorded_boot_id(c, 1, "a-boot-before-the-crash")
        c.start_chunk(index=1)
        victim = chunk_ids(c)[1]
        # Its coordinator reads its local replica first: it must not be in sync any more.
        from tests.chunk.storage.test_replication import wait_served
        wait_served(c, vol, 1)
        qemu_io(c, vol, 1, "read -P 0xbb 0 4M")
        assert "host crashed" in c.chunks[1].log()
        # Dropped with a generation bump, then resynced and back in sync.
        wait_for(lambda: (e := extents(c, "hc")[0])["generation"] >= ext["generation"] + 2
                 and victim in e["replicas"], 90, "the crashed replica resynced")
        per = digests(c, vol["volume_id"])[0]
        assert len(per) == 2 and len(set(per.values())) == 1, per
        qemu_io(c, vol, 1, "read -P 0xbb 0 4M")


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(not shutil.which("qemu-io"), reason="qemu-utils is not installed")
def test_a_clean_stop_then_a_reboot_keeps_the_replica_in_sync(tmp_path, etcd_server):
    from tests.chunk.storage.test_replication import chunk_ids, extents, qemu_io, wait_served
    with cluster(tmp_path, etcd_server, metas=1, chunks=2) as c:
        vol, ext = _setup(c, "hc")
        qemu_io(c, vol, 0, "write -P 0xbb 0 4M")                 # not flushed by the initiator
        c.chunks[1].stop()                                       # SIGTERM: flushed, recorded clean
        assert c.chunks[1].popen.returncode == 0
        state = _set_recorded_boot_id(c, 1, "a-boot-before-the-reboot")
        assert state.get("clean") is True and state.get("boot_id") == current_boot_id(), state
        c.start_chunk(index=1)
        wait_served(c, vol, 1)
        qemu_io(c, vol, 1, "read -P 0xbb 0 4M")
        time.sleep(5)                                            # two recovery passes
        now = extents(c, "hc")[0]
        assert now["generation"] == ext["generation"] and chunk_ids(c)[1] in now["replicas"], now
        assert "host crashed" not in c.chunks[1].log()
