"""The storage engine end to end: real etcd, meta, chunk servers on loopback, real initiators.

Each test is one acceptance item of the storage-engine issue: writes survive a
replica's SIGKILL and the replica resyncs; snapshots, clones and revert;
flipped bytes on disk are detected, served around and repaired; a chunk
server down past the grace period is re-replicated; a full disk.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import time

import pytest

from tests.cluster import Cluster, cluster, wait_for

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not shutil.which("qemu-io"), reason="qemu-utils is not installed")]

INIT = "iqn.2026-01.io.zstore.test:repl"
MiB = 1 << 20


def run(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, timeout=timeout)


def opts(c: Cluster, vol: dict, chunk: int) -> str:
    return (f"driver=iscsi,transport=tcp,portal=127.0.0.1:{c.portals[chunk]},"
            f"target={vol['target_iqn']},lun={vol['lun']},initiator-name={INIT}")


def make_volume(c: Cluster, name: str, size: str, replicas: int) -> dict:
    status, vol = c.api("POST", "/volumes", {"name": name, "size": size, "replicas": replicas})
    assert status == 201, vol
    assert c.api("PUT", f"/volumes/{name}/acl/{INIT}")[0] == 200
    return vol


def serving_volume(c: Cluster, chunks: int, name: str, size: str, replicas: int,
                   served_on: tuple[int, ...] = (0,)) -> dict:
    """Once ``chunks`` chunk servers are up: a new volume, its LUN answering on ``served_on``."""
    c.wait_chunks_up(chunks)
    vol = make_volume(c, name, size, replicas)
    for chunk in served_on:
        wait_served(c, vol, chunk)
    return vol


def wait_served(c: Cluster, vol: dict, chunk: int) -> None:
    url = f"iscsi://127.0.0.1:{c.portals[chunk]}/{vol['target_iqn']}/{vol['lun']}"
    wait_for(lambda: run("iscsi-inq", "-i", INIT, url, timeout=15).returncode == 0, 20, "LUN served")


def qemu_io(c: Cluster, vol: dict, chunk: int, *cmds: str, timeout: float = 120) -> str:
    argv = ["qemu-io", "--image-opts", opts(c, vol, chunk)]
    for cmd in cmds:
        argv += ["-c", cmd]
    r = run(*argv, timeout=timeout)
    out = r.stdout.decode() + r.stderr.decode()
    assert r.returncode == 0 and "failed" not in out and "error" not in out.lower(), out
    return out


def write_argv(c: Cluster, vol: dict, chunk: int, src) -> list[str]:
    """qemu-img copying the raw image ``src`` onto the LUN through chunk server ``chunk``."""
    return ["qemu-img", "convert", "-n", "-f", "raw", "--target-image-opts", str(src), opts(c, vol, chunk)]


def write_image(c: Cluster, vol: dict, chunk: int, src) -> subprocess.CompletedProcess:
    return run(*write_argv(c, vol, chunk, src), timeout=240)


def read_back(c: Cluster, vol: dict, chunk: int, dest) -> bytes:
    r = run("qemu-img", "convert", "-O", "raw", "--image-opts", opts(c, vol, chunk), str(dest), timeout=300)
    assert r.returncode == 0, r.stderr
    return dest.read_bytes()


def extents(c: Cluster, name: str) -> list[dict]:
    status, body = c.api("GET", f"/volumes/{name}/extents")
    assert status == 200, body
    return body["extents"]


async def _digests(c: Cluster, vid: str) -> dict[int, dict[str, bytes]]:
    """Per extent, per in-sync replica: the replica's digest, asked over the replication port."""
    from chunk.storage.peer_auth import load_or_create_secret
    from chunk.storage.replica_client import ReplicaClient
    from zstore import etcd as zetcd
    from zstore.config import EtcdConfig
    from zstore.keys import Keys
    from zstore.records import ChunkInfo, ClusterInfo, ExtentRecord

    keys = Keys(c.prefix)
    etcd = zetcd.client(EtcdConfig(endpoints=[c.etcd.endpoint], prefix=c.prefix))
    try:
        secret = await load_or_create_secret(etcd, keys)
        cluster_id = ClusterInfo.decode((await etcd.get(keys.cluster())).value).cluster_id
        client = ReplicaClient(secret, cluster_id, "test", timeout=10)
        out: dict[int, dict[str, bytes]] = {}
        try:
            for kv in await etcd.get_prefix(keys.extents(vid)):
                rec = ExtentRecord.decode(kv.value)
                for cid in rec.replicas:
                    info = ChunkInfo.decode((await etcd.get(keys.chunk_info(cid))).value)
                    out.setdefault(rec.index, {})[cid] = await client.digest(
                        (info.address, info.data_port), vid, rec.index)
        finally:
            await client.close()
        return out
    finally:
        await etcd.close()


def digests(c: Cluster, vid: str) -> dict[int, dict[str, bytes]]:
    return asyncio.run(_digests(c, vid))


def chunk_ids(c: Cluster) -> list[str]:
    """Chunk id of chunk server i, from its data dir."""
    return [(c.workdir / f"chunk{i}" / "chunk-id").read_text().strip() for i in range(len(c.chunks))]


def wait_disk_full(c: Cluster, chunk_id: str) -> None:
    """`zstore chunk list` shows a disk of this chunk server as full (refreshed every ~10 s)."""
    def full() -> bool:
        rows = {r["chunk_id"]: r for r in c.cli_json("chunk", "list")}
        return any(d.get("state") == "full" for d in rows[chunk_id].get("disks") or [])
    wait_for(full, 30, "the full disk shown in chunk list")


@pytest.mark.timeout(300)
def test_replica_killed_during_writes_loses_nothing_and_resyncs(tmp_path, etcd_server):
    with cluster(tmp_path, etcd_server, metas=1, chunks=3, chunk_options={"replica_timeout": 2.0}) as c:
        vol = serving_volume(c, 3, "r3", "192Mi", 3, served_on=(0, 1))
        src = tmp_path / "src.img"
        payload = os.urandom(192 * MiB)
        src.write_bytes(payload)
        writer = subprocess.Popen(write_argv(c, vol, 0, src), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # SIGKILL a replica (not the chunk server serving the LUN) while the copy runs: as soon as
        # its first extent is allocated, with most of the 192 MiB still to write (killing at extent
        # 1 left ~0.8 s of copy here, too little margin on a faster machine).
        wait_for(lambda: extents(c, "r3") or writer.poll() is not None, 60, "first extent allocated",
                 interval=0.02)
        assert writer.poll() is None, f"the copy ended before the kill: {writer.communicate()[1].decode()}"
        c.chunks[2].kill()
        out, err = writer.communicate(timeout=240)
        assert writer.returncode == 0, err.decode()
        # Every acknowledged write reads back, through the other surviving chunk server.
        back = read_back(c, vol, 1, tmp_path / "back.img")
        assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()
        killed = chunk_ids(c)[2]
        assert any(killed not in e["replicas"] for e in extents(c, "r3")), extents(c, "r3")
        # Back it comes: recognised as stale, resynced, rejoined.
        c.start_chunk(index=2, options={"replica_timeout": 2.0})
        wait_for(lambda: all(len(e["replicas"]) == 3 for e in extents(c, "r3")), 120,
                 "every extent back at 3 replicas")
        d = digests(c, vol["volume_id"])
        assert len(d) == 3                              # 192 MiB = 3 extents of 64 MiB
        for idx, per in d.items():
            assert len(per) == 3 and len(set(per.values())) == 1, (idx, per)
        back = read_back(c, vol, 2, tmp_path / "back2.img")
        assert back == payload
        # The copy went through the coordinator's write fast path (counted in `chunk list`).
        serving = chunk_ids(c)[0]
        wait_for(lambda: storage_counter(c, serving, "fast_writes") > 0, 30, "fast-path writes counted")


def storage_counter(c: Cluster, chunk_id: str, name: str) -> int:
    rows = {r["chunk_id"]: r for r in c.cli_json("chunk", "list")}
    return int((rows[chunk_id].get("storage") or {}).get(name) or 0)


@pytest.mark.timeout(240)
def test_snapshot_clone_and_revert(tmp_path, etcd_server):
    with cluster(tmp_path, etcd_server, metas=1, chunks=2) as c:
        vol = serving_volume(c, 2, "s", "128Mi", 2)
        qemu_io(c, vol, 0, "write -P 0xaa 0 4M", "write -P 0xaa 100M 1M")
        c.cli("snapshot", "create", "s", "snap", check=True)
        qemu_io(c, vol, 0, "write -P 0xbb 0 2M", "write -P 0xbb 100M 4k")
        # The volume reads B where written since, A elsewhere.
        qemu_io(c, vol, 0, "read -P 0xbb 0 2M", "read -P 0xaa 2M 2M", "read -P 0xbb 100M 4k",
                "read -P 0xaa 104861696 1020k", "read -P 0 4M 1M")
        # A clone of the snapshot reads A, and then diverges on its own.
        c.cli("volume", "clone", "s@snap", "cl", "--replicas", "2", check=True)
        assert c.api("PUT", f"/volumes/cl/acl/{INIT}")[0] == 200
        clone = c.cli_json("volume", "show", "cl")
        wait_served(c, clone, 1)
        qemu_io(c, clone, 1, "read -P 0xaa 0 4M", "read -P 0xaa 100M 1M", "read -P 0 4M 1M")
        qemu_io(c, clone, 1, "write -P 0xcc 1M 512", "write -P 0xcc 101M 64k")
        qemu_io(c, clone, 1, "read -P 0xaa 0 1M", "read -P 0xcc 1M 512", "read -P 0xaa 1049088 3145216",
                "read -P 0xcc 101M 64k", "read -P 0xaa 100M 1M")
        qemu_io(c, vol, 0, "read -P 0xbb 0 2M", "read -P 0xaa 2M 2M")      # the source is untouched
        # Partial blocks of a clone: two sector writes into one block at once both land (each
        # reads the rest of the block back under the block's lock), and zeroing one sector
        # keeps the parent's data in the rest of its block.
        qemu_io(c, clone, 1, "aio_write -P 0x11 3M 512", "aio_write -P 0x22 3146240 512", "aio_flush",
                "write -z 2M 512")
        qemu_io(c, clone, 1, "read -P 0x11 3M 512", "read -P 0x22 3146240 512", "read -P 0xaa 3146752 3072",
                "read -P 0 2M 512", "read -P 0xaa 2097664 3584")
        # Revert brings A back (online, through the owner of the volume).
        c.cli("volume", "revert", "s", "snap", check=True)
        qemu_io(c, vol, 0, "read -P 0xaa 0 4M", "read -P 0xaa 100M 1M", "read -P 0 4M 1M")
        qemu_io(c, clone, 1, "read -P 0xcc 1M 512", "read -P 0xaa 0 1M")   # the clone keeps its own


@pytest.mark.timeout(240)
def test_flipped_bytes_are_detected_served_around_and_repaired(tmp_path, etcd_server):
    with cluster(tmp_path, etcd_server, metas=1, chunks=2) as c:
        vol = serving_volume(c, 2, "f", "64Mi", 2)
        qemu_io(c, vol, 0, "write -P 0x5a 0 8M", "flush")
        ext = extents(c, "f")
        assert len(ext) == 1 and len(ext[0]["replicas"]) == 2
        # chunk0 serves the LUN and reads its local replica first: damage that one.
        data_files = [p for p in (c.workdir / "chunk0").rglob("*") if p.is_file()
                      and vol["volume_id"] in p.name and p.name.endswith(".data")]
        assert data_files, list((c.workdir / "chunk0").rglob("*"))
        target = data_files[0]
        with open(target, "r+b") as f:
            f.seek(3 * MiB + 123)
            f.write(b"\x00\xff\x00\xff")
        qemu_io(c, vol, 0, "read -P 0x5a 0 8M")         # right data, from the other replica
        # The bad block is rewritten from the good replica.
        def repaired() -> bool:
            with open(target, "rb") as f:
                f.seek(3 * MiB)
                return f.read(4096) == b"\x5a" * 4096
        wait_for(repaired, 30, "the damaged block repaired")
        d = digests(c, vol["volume_id"])
        assert len(set(d[0].values())) == 1
        # ...and counted, where an admin looks.
        def counted():
            rows = c.cli_json("chunk", "list")
            return any((r.get("storage") or {}).get("checksum_errors", 0) >= 1 for r in rows)
        wait_for(counted, 20, "the checksum error counted in chunk list")


@pytest.mark.timeout(300)
def test_chunk_down_past_grace_is_rebuilt_elsewhere(tmp_path, etcd_server):
    with cluster(tmp_path, etcd_server, metas=1, chunks=3, meta_options={"recovery_grace": 3},
                 chunk_options={"replica_timeout": 2.0}) as c:
        vol = serving_volume(c, 3, "g", "128Mi", 2)
        payload = os.urandom(128 * MiB)
        (tmp_path / "src.img").write_bytes(payload)
        r = write_image(c, vol, 0, tmp_path / "src.img")
        assert r.returncode == 0, r.stderr
        ids = chunk_ids(c)
        holders = {cid for e in extents(c, "g") for cid in e["replicas"]}
        victim = next(i for i in (1, 2) if ids[i] in holders)
        c.chunks[victim].kill()
        seen_progress = []

        def rebuilt() -> bool:
            st = c.cli_json("cluster", "status")
            rec = st.get("recovery") or {}
            if rec.get("tasks"):
                seen_progress.append(rec)
            ex = extents(c, "g")
            return all(len(e["replicas"]) == 2 and ids[victim] not in e["replicas"] for e in ex)
        wait_for(rebuilt, 150, "every extent re-replicated away from the dead chunk server")
        assert seen_progress, "cluster status never showed the recovery"
        for per in digests(c, vol["volume_id"]).values():
            assert len(per) == 2 and len(set(per.values())) == 1
        survivor = next(i for i in (1, 2) if i != victim)
        assert read_back(c, vol, survivor, tmp_path / "back.img") == payload


@pytest.mark.timeout(300)
def test_full_disk_on_one_chunk_server(tmp_path, etcd_server):
    """Writes go on where placement allows; where it cannot, a clear ENOSPC and nothing lost."""
    with cluster(tmp_path, etcd_server, metas=1, chunks=3, capacities=["10Gi", "10Gi", "96Mi"],
                 chunk_options={"replica_timeout": 2.0}) as c:
        vol = serving_volume(c, 3, "big", "256Mi", 3)
        ids = chunk_ids(c)
        payload = os.urandom(256 * MiB)
        (tmp_path / "src.img").write_bytes(payload)
        r = write_image(c, vol, 0, tmp_path / "src.img")
        assert r.returncode == 0, r.stderr
        assert read_back(c, vol, 1, tmp_path / "back.img") == payload
        ex = extents(c, "big")
        assert len(ex) == 4 and all(ids[0] in e["replicas"] and ids[1] in e["replicas"] for e in ex)
        assert any(ids[2] not in e["replicas"] for e in ex)          # the full one was left out
        wait_disk_full(c, ids[2])          # and the admin sees why


@pytest.mark.timeout(240)
def test_full_disk_gives_enospc_and_keeps_what_was_written(tmp_path, etcd_server):
    """Where no replica has room, the initiator gets SPACE ALLOCATION FAILED (ENOSPC), and
    everything acknowledged before reads back."""
    with cluster(tmp_path, etcd_server, metas=1, chunks=1, capacities=["160Mi"]) as c:
        vol = serving_volume(c, 1, "only", "256Mi", 1)
        payload = os.urandom(256 * MiB)
        (tmp_path / "src.img").write_bytes(payload)
        r = write_image(c, vol, 0, tmp_path / "src.img")
        assert r.returncode != 0 and b"No space left on device" in r.stderr, r.stderr
        done = len(extents(c, "only"))
        assert done >= 1
        back = read_back(c, vol, 0, tmp_path / "back.img")
        assert back[:64 * MiB] == payload[:64 * MiB]       # the first extent was acknowledged whole
        wait_disk_full(c, chunk_ids(c)[0])
        status, body = c.api("POST", "/volumes", {"name": "more", "size": "1Gi", "replicas": 1})
        assert status == 507 and "free space" in body["error"]["message"], body


@pytest.mark.timeout(240)
def test_a_full_cluster_refuses_writes_and_drops_no_replica(tmp_path, etcd_server):
    """Every replica is full: the initiator gets ENOSPC, and no extent loses a replica over
    it (a full disk is not a failed replica when all of them are full)."""
    with cluster(tmp_path, etcd_server, metas=1, chunks=2, capacities=["160Mi", "160Mi"]) as c:
        vol = serving_volume(c, 2, "twofull", "256Mi", 2)
        payload = os.urandom(256 * MiB)
        (tmp_path / "src.img").write_bytes(payload)
        r = write_image(c, vol, 0, tmp_path / "src.img")
        assert r.returncode != 0 and b"No space left on device" in r.stderr, r.stderr
        ex = extents(c, "twofull")
        assert ex and all(len(e["replicas"]) == 2 and not e["stale"] for e in ex), ex
        back = read_back(c, vol, 0, tmp_path / "back.img")
        assert back[:64 * MiB] == payload[:64 * MiB]


@pytest.mark.timeout(180)
def test_concurrent_first_writes_to_a_fresh_extent_drop_nothing(tmp_path, etcd_server):
    """32 writes in flight into a never-written extent: one allocation, every replica CREATEd
    before any write reaches it (the extent record can arrive by watch before that)."""
    with cluster(tmp_path, etcd_server, metas=1, chunks=2) as c:
        vol = serving_volume(c, 2, "fresh", "256Mi", 2)
        r = run("qemu-img", "bench", "--image-opts", "-w", "-d", "32", "-s", "4096", "-S", str(8 * MiB + 4096),
                "-c", "128", opts(c, vol, 0), timeout=120)
        assert r.returncode == 0, r.stderr
        ex = extents(c, "fresh")
        assert len(ex) == 4 and all(len(e["replicas"]) == 2 and not e["stale"] for e in ex), ex


@pytest.mark.timeout(240)
def test_two_servers_writing_one_volume_both_succeed_and_drop_nothing(tmp_path, etcd_server):
    """Multipath across chunk servers: two coordinators write one volume at once. They fence
    each other and take ownership back in turns; every write completes, no replica is dropped
    for being fenced, and a third server reads exactly what was written."""
    with cluster(tmp_path, etcd_server, metas=1, chunks=3) as c:
        vol = serving_volume(c, 3, "shared", "128Mi", 3, served_on=(0, 1, 2))
        slot = 512 * 1024                  # 3 rounds x 64 slots = 96 MiB: two extents
        procs = []
        for chunk, pattern in ((0, 0x11), (1, 0x22)):
            argv = ["qemu-io", "--image-opts", opts(c, vol, chunk)]
            for rnd in range(3):           # several rounds of 32 writes in flight per server
                for k in range(32):
                    off = (rnd * 64 + 2 * k + chunk) * slot
                    argv += ["-c", f"aio_write -P {pattern:#x} {off} {slot}"]
                argv += ["-c", "aio_flush"]
            procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        outs = [p.communicate(timeout=180)[0].decode() for p in procs]
        for p, out in zip(procs, outs):
            assert p.returncode == 0 and "failed" not in out and "error" not in out.lower(), out
        back = read_back(c, vol, 2, tmp_path / "back.raw")
        for s in range(96 * MiB // slot):
            want = bytes([0x11 if s % 2 == 0 else 0x22]) * slot
            assert back[s * slot:(s + 1) * slot] == want, f"slot {s}"
        ex = extents(c, "shared")
        assert ex and all(len(e["replicas"]) == 3 and not e["stale"] for e in ex), ex


@pytest.mark.timeout(240)
def test_snapshots_between_fast_path_writes_in_flight(tmp_path, etcd_server):
    """Snapshots taken while 32 fast-path writes are in flight: each waits for the writes it
    must (the write gate) and completes, no write fails, nothing is dropped, and the replicas
    end identical. A fast-path write that left the gate or a range lock held would hang the
    barrier here."""
    with cluster(tmp_path, etcd_server, metas=1, chunks=2) as c:
        vol = serving_volume(c, 2, "g", "64Mi", 2)
        qemu_io(c, vol, 0, "write -P 0x11 0 64M")          # allocated: later writes take the fast path
        writer = subprocess.Popen(
            ["qemu-img", "bench", "-w", "-d", "32", "-s", "4096", "-c", "60000", "-t", "none",
             "--pattern=0xa5", "--image-opts", opts(c, vol, 0)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            made = 0
            for k in range(3):
                time.sleep(0.3)
                if writer.poll() is not None:
                    break
                c.cli("snapshot", "create", "g", f"s{k}", check=True, timeout=30)
                made += 1
            out, err = writer.communicate(timeout=180)
        finally:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
        assert writer.returncode == 0, err.decode()
        assert made >= 1, "the writer ended before any snapshot was taken"
        serving, peer = chunk_ids(c)[:2]
        assert all(len(e["replicas"]) == 2 for e in extents(c, "g")), extents(c, "g")
        wait_for(lambda: storage_counter(c, serving, "fast_writes") > 0, 30, "fast-path writes counted")
        assert storage_counter(c, serving, "replica_drops") == 0
        d = digests(c, vol["volume_id"])
        assert d and all(len(per) == 2 and len(set(per.values())) == 1 for per in d.values()), d
        # the volume reads what the bench wrote
        qemu_io(c, vol, 0, "read -P 0xa5 0 4M")
