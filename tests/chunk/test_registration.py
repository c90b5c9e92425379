"""The chunk server registers itself in a real etcd and shows down when it dies."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from chunk.registration import Registration
from tests.cluster import PY, ROOT, Cluster, Etcd, Proc, async_wait_for, free_port, write_config
from zstore import etcd as zetcd
from zstore.config import EtcdConfig
from zstore.keys import Keys
from zstore.records import ChunkInfo, ChunkLive

TTL = 3


@pytest.fixture
def cluster(tmp_path: Path, etcd_server: Etcd, etcd_config):
    c = Cluster(workdir=tmp_path, etcd=etcd_server, prefix=etcd_config.prefix, lease_ttl=TTL)
    yield c
    c.stop()


@pytest.fixture
def keys(etcd_config) -> Keys:
    return Keys(etcd_config.prefix)


def chunk_id_of(c: Cluster, i: int) -> str:
    return (c.workdir / f"chunk{i}" / "chunk-id").read_text().strip()


async def wait_live(etcd_client, keys: Keys, proc: Proc, c: Cluster, i: int, timeout: float = 15):
    """Wait for chunk ``i`` (run by ``proc``) to be live; return (chunk_id, ChunkLive, lease)."""
    async def live():
        assert proc.alive(), proc.log()
        got = await etcd_client.get(keys.chunk_live(chunk_id_of(c, i)))
        return got and (ChunkLive.decode(got.value), got.lease)
    rec, lease = await async_wait_for(live, timeout, f"chunk{i} live key")
    return rec.chunk_id, rec, lease


async def test_registers_info_and_live(cluster: Cluster, etcd_client, keys: Keys):
    p = cluster.start_chunk(labels={"zone": "a"}, capacity="10Gi")
    cid, live, lease = await wait_live(etcd_client, keys, p, cluster, 0)
    assert live.pid == p.pid and live.lease_ttl == TTL and lease != 0
    assert [d["state"] for d in live.disks] == ["ok"]
    info = ChunkInfo.decode((await etcd_client.get(keys.chunk_info(cid))).value)
    assert info.labels == {"zone": "a"} and info.address == "127.0.0.1"
    assert info.portal.startswith("127.0.0.1:") and info.data_port > 0 and info.hostname
    assert info.disks[0]["path"] == str(cluster.workdir / "chunk0" / "disk0")
    assert info.disks[0]["capacity"] == 10 * 2**30
    assert (cluster.workdir / "chunk0" / "disk0" / "disk-id").exists()


async def test_id_persists_across_restart(cluster: Cluster, etcd_client, keys: Keys):
    p = cluster.start_chunk()
    cid, first, _ = await wait_live(etcd_client, keys, p, cluster, 0)
    p.stop()
    assert p.popen.returncode == 0, p.log()
    p2 = cluster.start_chunk(index=0)
    cid2, second, _ = await wait_live(etcd_client, keys, p2, cluster, 0)
    assert cid2 == cid and second.pid == p2.pid != first.pid
    listing = await etcd_client.get_prefix(keys.chunks())
    assert {Keys.chunk_key_parts(kv.key, keys.chunks())[0] for kv in listing} == {cid}


async def test_sigkill_live_key_expires_within_ttl(cluster: Cluster, etcd_client, keys: Keys):
    p = cluster.start_chunk()
    cid, _, _ = await wait_live(etcd_client, keys, p, cluster, 0)
    p.kill()
    await async_wait_for(lambda: _absent(etcd_client, keys.chunk_live(cid)), TTL + 3, "live key to expire")
    assert await etcd_client.get(keys.chunk_info(cid)) is not None     # info outlives the process


async def test_sigterm_revokes_lease_promptly(cluster: Cluster, etcd_client, keys: Keys):
    p = cluster.start_chunk()
    cid, _, _ = await wait_live(etcd_client, keys, p, cluster, 0)
    p.popen.send_signal(signal.SIGTERM)
    await async_wait_for(lambda: _absent(etcd_client, keys.chunk_live(cid)), 1.5, "live key removed on SIGTERM")
    assert p.popen.wait(5) == 0
    assert "revoked lease" in p.log()


async def test_lost_lease_is_replaced(cluster: Cluster, etcd_client, keys: Keys):
    p = cluster.start_chunk()
    cid, _, lease = await wait_live(etcd_client, keys, p, cluster, 0)
    await etcd_client.revoke_lease(lease)          # as if it had expired during an outage

    async def new_lease():
        got = await etcd_client.get(keys.chunk_live(cid))
        return got is not None and got.lease != lease
    await async_wait_for(new_lease, TTL + 5, "re-registration under a new lease")
    assert "lost the etcd lease" in p.log()


async def test_failed_disk_is_reported(cluster: Cluster, etcd_client, keys: Keys, etcd_config):
    (cluster.workdir / "not-a-dir").write_text("x")
    p = _start(cluster, etcd_config, disks=[f"{cluster.workdir}/chunk0/disk0:1Gi",
                                            f"{cluster.workdir}/not-a-dir/disk1:1Gi"])
    cid, live, _ = await wait_live(etcd_client, keys, p, cluster, 0)
    assert [d["state"] for d in live.disks] == ["ok", "failed"]
    info = ChunkInfo.decode((await etcd_client.get(keys.chunk_info(cid))).value)
    assert "Not a directory" in info.disks[1]["error"] and \
        sum(d["capacity"] for d in info.disks if d["state"] != "failed") == 2**30   # the failed disk counts for nothing
    assert "disk1 failed" in p.log()


async def test_starts_before_etcd_and_registers_when_it_appears(tmp_path: Path, etcd_config):
    late = Etcd(tmp_path / "late-etcd")
    late.workdir.mkdir()
    c = Cluster(workdir=tmp_path / "c", etcd=late, prefix=etcd_config.prefix, lease_ttl=TTL)
    try:
        p = c.start_chunk()
        await async_wait_for(lambda: "unreachable" in p.log(), 15, "the chunk server to report etcd down")
        assert p.alive()
        late.start()
        client = zetcd.client(EtcdConfig(endpoints=[late.endpoint], prefix=etcd_config.prefix))
        try:
            await wait_live(client, Keys(etcd_config.prefix), p, c, 0, timeout=20)
        finally:
            await client.close()
    finally:
        c.stop()
        late.stop()


def test_all_disks_failed_exits_1(tmp_path: Path, etcd_config):
    (tmp_path / "f").write_text("x")
    r = _run(["--data-dir", str(tmp_path / "d"), "--disk", f"{tmp_path}/f/d0:1Gi",
              "--etcd-endpoints", etcd_config.endpoints[0], "--prefix", etcd_config.prefix])
    assert r.returncode == 1 and "every disk failed" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--data-port", "many"], "chunk.data_port: 'many' is not a valid int"),
    (["--disk", "/tmp/x:lots"], "invalid size"),
    (["--portal", "nohostport"], "chunk.portal"),
    (["--label", "novalue"], "use KEY=VALUE"),
    (["--lease-ttl", "1"], "chunk.lease_ttl"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--config", "/nonexistent/chunk.toml"], "does not exist"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path: Path, args: list[str], message: str):
    r = _run(["--data-dir", str(tmp_path / "d"), *args])
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and r.stderr.startswith("zstore-chunk: error:")
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()            # nothing touched before the config is valid


def test_bad_config_file_exits_2(tmp_path: Path):
    cfg = write_config(tmp_path / "c.toml", {"chunk": {"data_dir": str(tmp_path), "bogus": 1}})
    r = _run(["--config", str(cfg)])
    assert r.returncode == 2 and "unknown config key chunk.bogus" in r.stderr


@pytest.mark.parametrize("setting, content, message", [
    ("token_file", None, "cannot read meta token file"),
    ("ca_file", None, "cannot read client.ca_file"),
    ("ca_file", "not a certificate", "holds no usable CA certificate"),
])
def test_unusable_token_or_ca_file_exits_2_before_touching_the_data_dir(
        tmp_path: Path, setting: str, content: str | None, message: str):
    """Once a traceback from inside the running server (exit 1, "ConfigError: cannot read meta
    token file ..."): the chunk DaemonSet lacked the token mount and every pod died that way."""
    path = tmp_path / "file"
    if content is not None:
        path.write_text(content)
    cfg = write_config(tmp_path / "c.toml", {"chunk": {"data_dir": str(tmp_path / "d")},
                                             "client": {setting: str(path)}})
    r = _run(["--config", str(cfg)])
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and r.stderr.startswith("zstore-chunk: error:"), r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "d").exists()


async def test_second_server_on_same_data_dir_refused(cluster: Cluster, etcd_client, keys: Keys):
    p = cluster.start_chunk()
    await wait_live(etcd_client, keys, p, cluster, 0)
    r = _run(["--config", str(cluster.workdir / "chunk0.toml")])
    assert r.returncode == 1 and f"in use by another chunk server (pid {p.pid})" in r.stderr


async def _absent(etcd_client, key: bytes) -> bool:
    return await etcd_client.get(key) is None


def _start(c: Cluster, etcd_config, disks: list[str]) -> Proc:
    cfg = write_config(c.workdir / "chunk0.toml", {
        "etcd": {"endpoints": etcd_config.endpoints, "prefix": etcd_config.prefix},
        "chunk": {"data_dir": str(c.workdir / "chunk0"), "disks": disks, "lease_ttl": TTL,
                  "data_port": free_port(), "portal": f"127.0.0.1:{free_port()}"},
    })
    p = Proc("chunk0", [PY, "-m", "chunk.server", "--config", str(cfg)], c.workdir / "chunk0.log").start()
    c.chunks.append(p)
    return p


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZSTORE_")}
    return subprocess.run([PY, "-m", "chunk.server", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=30)


async def test_the_lease_deadline_tracks_keepalives_and_a_new_lease_bumps_its_generation(etcd_client, keys: Keys):
    """In-process, against the real etcd: while registered the lease is valid until about
    two thirds of a TTL after the last keepalive was sent; a lease lost behind its back is
    replaced and counted (coordinators then take ownership again)."""
    def info(disks):
        return ChunkInfo(chunk_id="lease-test", hostname="h", address="127.0.0.1", data_port=1,
                    portal="127.0.0.1:3260", disks=disks)

    async def disks():
        return []
    reg = Registration(etcd_client, keys, "lease-test", lease_ttl=TTL, build_info=info, probe_disks=disks)
    assert not reg.lease_valid() and reg.lease_gen == 0
    stop = asyncio.Event()
    task = asyncio.create_task(reg.run(stop))
    try:
        await asyncio.wait_for(reg.registered.wait(), 10)
        assert reg.lease_valid() and reg.lease_gen == 1
        assert 0 < reg.lease_deadline - time.monotonic() <= TTL - TTL / 3 + 0.1
        await asyncio.sleep(TTL)                        # keepalives every TTL/3 keep it valid
        assert reg.lease_valid() and reg.lease_gen == 1
        await etcd_client.revoke_lease(reg.lease.id)

        async def replaced():
            return reg.lease_gen == 2 and reg.registered.is_set()
        await async_wait_for(replaced, TTL + 5, "a new lease")
        assert reg.lease_valid()
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_stopping_ends_writes_at_once_and_revokes_only_when_asked(etcd_client, keys: Keys):
    """The chunk server stops its sessions and releases its volumes before the lease goes: a
    revoked lease makes the meta snapshot the volumes itself, so writes still landing then
    would fall into the snapshot. Stopping sets the deadline to now (no write starts), the
    live key stays until ``unregister``."""
    def info(disks):
        return ChunkInfo(chunk_id="stop-test", hostname="h", address="127.0.0.1", data_port=1,
                         portal="127.0.0.1:3260", disks=disks)

    async def disks():
        return []
    reg = Registration(etcd_client, keys, "stop-test", lease_ttl=TTL, build_info=info, probe_disks=disks,
                       revoke_on_stop=False)
    stop = asyncio.Event()
    task = asyncio.create_task(reg.run(stop))
    await asyncio.wait_for(reg.registered.wait(), 10)
    assert reg.lease_valid()
    stop.set()
    await asyncio.wait_for(task, 10)
    assert not reg.lease_valid()
    assert await etcd_client.get(keys.chunk_live("stop-test")) is not None     # not revoked yet
    await reg.unregister()
    assert await etcd_client.get(keys.chunk_live("stop-test")) is None


async def test_the_live_key_waits_for_serve_when(etcd_client, keys: Keys):
    """The chunk server shows live (redirectors send initiators to it) only once it can serve:
    its catalog has its first listing (``serve_when``); its info record is written before."""
    def info(disks):
        return ChunkInfo(chunk_id="gate-test", hostname="h", address="127.0.0.1", data_port=1,
                         portal="127.0.0.1:3260", disks=disks)

    async def disks():
        return []
    gate = asyncio.Event()
    reg = Registration(etcd_client, keys, "gate-test", lease_ttl=TTL, build_info=info, probe_disks=disks,
                       serve_when=gate.wait)
    stop = asyncio.Event()
    task = asyncio.create_task(reg.run(stop))
    try:
        async def info_written():
            return await etcd_client.get(keys.chunk_info("gate-test")) is not None
        await async_wait_for(info_written, 10, "the info record")
        await asyncio.sleep(0.3)
        assert await etcd_client.get(keys.chunk_live("gate-test")) is None and not reg.lease_valid()
        gate.set()
        await asyncio.wait_for(reg.registered.wait(), 10)
        assert await etcd_client.get(keys.chunk_live("gate-test")) is not None
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_a_stopping_server_keeps_its_lease_until_unregister(etcd_client, keys: Keys):
    """Stopping takes a while (sessions end, replica writes time out after seconds): the lease
    must not expire meanwhile, or the meta sees no owner while writes still land. So after
    ``run`` ends the lease is kept alive, without letting writes start, until ``unregister``."""
    def info(disks):
        return ChunkInfo(chunk_id="keep-test", hostname="h", address="127.0.0.1", data_port=1,
                         portal="127.0.0.1:3260", disks=disks)

    async def disks():
        return []
    reg = Registration(etcd_client, keys, "keep-test", lease_ttl=2, build_info=info, probe_disks=disks,
                       revoke_on_stop=False)
    stop = asyncio.Event()
    task = asyncio.create_task(reg.run(stop))
    try:
        await asyncio.wait_for(reg.registered.wait(), 10)
        stop.set()
        await asyncio.wait_for(task, 10)
        await asyncio.sleep(3)                          # longer than the whole TTL
        assert not reg.lease_valid()
        assert await etcd_client.get(keys.chunk_live("keep-test")) is not None
    finally:
        await reg.unregister()
    assert await etcd_client.get(keys.chunk_live("keep-test")) is None


async def test_no_write_starts_under_a_lease_whose_live_key_is_not_written(etcd_client, etcd_config,
                                                                           keys: Keys, monkeypatch):
    """A new lease allows writes (deadline, lease_gen) only once its live key is in etcd. Until
    then the meta sees no live owner and commits a snapshot itself at the volume's seq: had a
    coordinator re-taken ownership under the new lease meanwhile, it would read that seq and
    keep writing at it, into the snapshot (split brain). Here the live key's put fails after
    the lease is lost: the coordinator's ensure_owner waits, the meta's snapshot commits, and
    when the put succeeds on a retry ownership is re-taken at the seq after the snapshot."""
    from types import SimpleNamespace

    from chunk.registration import Backoff
    from chunk.storage.coordinator import Coordinator
    from meta import volops, volumes
    from tests.meta.helpers import make_ctx, register_chunk

    ctx = make_ctx(etcd_client, etcd_config)
    for cid, zone in (("c0", "a"), ("c1", "b")):
        await register_chunk(ctx, cid, labels={"zone": zone})
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 2)

    def info(disks):
        return ChunkInfo(chunk_id="gap-test", hostname="h", address="127.0.0.1", data_port=1,
                         portal="127.0.0.1:3260", disks=disks)

    async def disks():
        return []
    live_key = keys.chunk_live("gap-test")
    failing = {"on": False, "failed": 0}
    real_put = etcd_client.put

    async def put(key, value, *a, **kw):
        if failing["on"] and key == live_key:
            failing["failed"] += 1
            raise asyncio.TimeoutError()                # etcd slow on this one put
        return await real_put(key, value, *a, **kw)
    monkeypatch.setattr(etcd_client, "put", put)
    reg = Registration(etcd_client, keys, "gap-test", lease_ttl=TTL, build_info=info, probe_disks=disks,
                       backoff=Backoff(first=0.3, cap=0.6))
    stop = asyncio.Event()
    task = asyncio.create_task(reg.run(stop))
    try:
        await asyncio.wait_for(reg.registered.wait(), 10)
        assert reg.lease_valid() and reg.lease_gen == 1
        coord = Coordinator(SimpleNamespace(chunk_id="gap-test", etcd=etcd_client, keys=keys, lease=reg), vol)
        await asyncio.wait_for(coord.ensure_owner(), 5)
        first_epoch = coord.epoch
        assert first_epoch and coord.seq == vol.snap_seq

        failing["on"] = True
        await etcd_client.revoke_lease(reg.lease.id)    # the lease is lost (an etcd outage, a pause)

        async def put_failed_twice():
            return failing["failed"] >= 2
        await async_wait_for(put_failed_twice, TTL + 5, "the live key's put to fail on new leases")
        assert await etcd_client.get(live_key) is None
        assert not reg.lease_valid() and reg.lease_gen == 1 and not reg.registered.is_set()
        ensure = asyncio.create_task(coord.ensure_owner())  # a write arrives
        await asyncio.sleep(0.3)
        assert not ensure.done(), "ownership re-taken under a lease whose live key is not in etcd"

        snap, created = await volops.create_snapshot(ctx, "v", "s1", timeout=3)
        assert created and snap.state == "ready" and snap.seq == vol.snap_seq  # taken by the meta
        assert not ensure.done()

        failing["on"] = False                           # the next retry's put lands
        await asyncio.wait_for(ensure, TTL + 5)
        assert await etcd_client.get(live_key) is not None and reg.registered.is_set()
        assert reg.lease_valid() and reg.lease_gen == 2
        assert coord.epoch > first_epoch and coord.seq == snap.seq + 1   # writes after the snapshot
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
