"""The storage-engine side of the meta API over HTTP and the CLI: a real meta server
(its leader runs the recovery loop) and fake chunk servers written into its etcd prefix."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from meta.context import Ctx
from tests.cluster import Cluster, async_wait_for, cluster
from tests.meta.helpers import Executor, own, register_chunk, register_zones
from zstore.keys import Keys

pytestmark = pytest.mark.slow
ZONES = {"c0": "a", "c1": "b", "c2": "c", "c3": "d"}


@pytest.fixture
async def env(tmp_path, etcd_server, etcd_client, monkeypatch):
    """(cluster, ctx on its prefix): one meta server with a 1 s recovery grace, 4 fake chunk servers."""
    monkeypatch.setenv("ZSTORE_META_RECOVERY_GRACE", "1")
    with cluster(tmp_path, etcd_server, metas=1) as c:
        ctx = Ctx(etcd=etcd_client, keys=Keys(c.prefix))
        await register_zones(ctx, ZONES)
        await async_wait_for(lambda: c.api("GET", "/meta/leader")[0] == 200, 20, "a leader")
        try:
            yield c, ctx
        finally:
            await etcd_client.delete_prefix(c.prefix.encode() + b"/")


async def api(c: Cluster, *args, **kw):
    return await asyncio.to_thread(c.api, *args, **kw)


async def cli(c: Cluster, *args):
    return await asyncio.to_thread(c.cli, *args)


async def test_extent_allocate_list_drop_join(env):
    c, ctx = env
    status, vol = await api(c, "POST", "/volumes", {"name": "v", "size": "200Mi", "replicas": 3})
    assert status == 201
    vid = vol["volume_id"]
    with ThreadPoolExecutor(10) as pool:
        got = list(pool.map(lambda _: c.api("POST", f"/extents/{vid}/1"), range(10)))
    assert sorted(s for s, _ in got) == [200] * 9 + [201]
    assert len({json.dumps(r, sort_keys=True) for _, r in got}) == 1
    rec = got[0][1]
    assert rec["generation"] == 1 and len(set(rec["replicas"])) == 3
    assert len({ZONES[x] for x in rec["replicas"]}) == 3                   # distinct zones
    assert (await api(c, "POST", f"/extents/{vid}/0"))[0] == 201
    status, body = await api(c, "POST", f"/extents/{vid}/4")          # 200 MiB = extents 0..3
    assert status == 400 and "beyond the end" in body["error"]["message"]
    assert (await api(c, "POST", f"/extents/{vid}/-1"))[0] == 400
    assert (await api(c, "POST", f"/extents/{'0' * 32}/0"))[0] == 404
    status, page = await api(c, "GET", "/volumes/v/extents?limit=1")
    assert status == 200 and [e["index"] for e in page["extents"]] == [0] and page["next"] == 0
    status, page = await api(c, "GET", "/volumes/v/extents?start_after=0")
    assert [e["index"] for e in page["extents"]] == [1] and page["next"] is None
    assert page["extent_size"] == 64 * 2**20
    a, b, x = rec["replicas"]
    status, r = await api(c, "POST", f"/extents/{vid}/1/drop", {"chunk_id": a, "generation": 1, "reason": "EIO"})
    assert status == 200 and r["changed"] and r["replicas"] == [b, x] and r["stale"] == {a: 1}
    status, r = await api(c, "POST", f"/extents/{vid}/1/drop", {"chunk_id": b, "generation": 1})
    assert status == 200 and not r["changed"] and r["generation"] == 2      # old view: re-read
    await api(c, "POST", f"/extents/{vid}/1/drop", {"chunk_id": b, "generation": 2})
    status, body = await api(c, "POST", f"/extents/{vid}/1/drop", {"chunk_id": x, "generation": 3})
    assert status == 409 and body["error"]["details"]["record"]["replicas"] == [x]
    status, body = await api(c, "POST", f"/extents/{vid}/1/join", {"chunk_id": a, "generation": 2})
    assert status == 409 and body["error"]["details"]["record"]["generation"] == 3
    status, r = await api(c, "POST", f"/extents/{vid}/1/join", {"chunk_id": a, "generation": 3})
    assert status == 200 and r["replicas"] == [x, a] and r["stale"] == {b: 2} and r["generation"] == 4
    assert (await api(c, "POST", f"/extents/{vid}/1/join", {"chunk_id": a}))[0] == 400
    status, got = await api(c, "GET", f"/extents/{vid}/1")
    assert status == 200 and got["generation"] == 4
    # One usable server: the extent is placed degraded (recovery adds copies later) ...
    for cid in ("c0", "c1", "c2"):
        assert (await api(c, "POST", f"/chunks/{cid}/drain"))[0] == 200
    status, body = await api(c, "POST", f"/extents/{vid}/2")
    assert status == 201 and body["replicas"] == ["c3"]
    # ... none: 507.
    assert (await api(c, "POST", "/chunks/c3/drain"))[0] == 200
    status, body = await api(c, "POST", f"/extents/{vid}/3")
    assert status == 507 and body["error"]["code"] == "insufficient_resources"


async def test_snapshot_and_revert_through_the_owner(env):
    c, ctx = env
    status, vol = await api(c, "POST", "/volumes", {"name": "v", "size": "1Gi", "replicas": 2})
    await api(c, "POST", "/volumes", {"name": "w", "size": "1Gi", "replicas": 2})
    await own(ctx, vol["volume_id"], "c3")
    async with Executor(ctx, "c3") as ex:
        r = await cli(c, "snapshot", "create", "v@s1", "--json")
        assert r.returncode == 0, r.stderr
        snap = json.loads(r.stdout)
        assert snap["state"] == "ready" and snap["seq"] == 1
        r = await cli(c, "volume", "revert", "v", "s1")
        assert r.returncode == 0 and "volume v reverted to snapshot s1" in r.stdout, r.stderr
        r = await cli(c, "volume", "revert", "v@s1", "--json")
        assert json.loads(r.stdout)["snapshot_id"] == snap["snapshot_id"]
        # A request sent again with its request id (the client's retry after a lost answer)
        # is answered from the first revert's op: not reverted a second time.
        for _ in range(2):
            status, body = await api(c, "POST", "/volumes/v/revert", {"snapshot": "s1", "request_id": "r-1"})
            assert status == 200 and body["reverted"] is True
    assert [op.kind for op in ex.ran] == ["snapshot", "revert", "revert", "revert"]
    status, body = await api(c, "POST", "/volumes/v/revert", {"snapshot": "s1", "request_id": "a/b"})
    assert status == 400 and "request_id" in body["error"]["message"]
    assert (await api(c, "GET", "/volumes/v"))[1]["snap_seq"] == 2
    await api(c, "POST", "/volumes/w/snapshots", {"name": "other"})
    r = await cli(c, "volume", "revert", "v", "w@other")
    assert r.returncode == 4 and "not a snapshot of volume 'v'" in r.stderr
    # With nobody executing, the snapshot answers 503 after 10 s and stays pending.
    status, body = await api(c, "POST", "/volumes/v/snapshots", {"name": "s2"}, timeout=30)
    assert status == 503 and "c3" in body["error"]["message"]
    snaps = (await api(c, "GET", "/snapshots?volume=v"))[1]["snapshots"]
    assert {s["name"]: s["state"] for s in snaps} == {"s1": "ready", "s2": "creating"}


async def test_recovery_loop_in_the_leader_and_status(env):
    c, ctx = env
    status, vol = await api(c, "POST", "/volumes", {"name": "v", "size": "1Gi", "replicas": 3})
    vid = vol["volume_id"]
    _, rec = await api(c, "POST", f"/extents/{vid}/0")
    spare = next(x for x in ZONES if x not in rec["replicas"])
    victim = rec["replicas"][0]
    st = (await api(c, "GET", "/cluster/status"))[1]
    assert st["recovery"] == {"degraded_extents": 0, "degraded_live_extents": 0, "unavailable_extents": 0,
                              "tasks": [], "bytes_done": 0, "bytes_total": 0}
    await ctx.etcd.delete(ctx.keys.chunk_live(victim))
    # The leader notices, waits out the 1 s grace, drops the dead replica and plans a rebuild.
    st = await async_wait_for(lambda: _with_tasks(c), 20, "a recovery task")
    [task] = st["recovery"]["tasks"]
    assert st["recovery"]["degraded_extents"] == 1
    assert (task["volume"], task["index"], task["kind"], task["target"]) == ("v", 0, "rebuild", spare)
    assert task["executor"] == spare and task["state"] == "pending"
    assert st["recovery"]["bytes_total"] == 64 * 2**20
    text = (await cli(c, "cluster", "status")).stdout
    assert "recovery       1 degraded extent(s), 1 recovery task(s), 0B of 64Mi copied (0%)" in text
    assert "recovery tasks:" in text and "rebuild" in text
    show = (await cli(c, "volume", "show", "v")).stdout
    assert "1 of 16 allocated, 1 degraded" in show and "rebuild" in show
    detail = (await api(c, "GET", "/volumes/v"))[1]
    assert detail["extents"] == {"total": 16, "allocated": 1, "degraded": 1}
    assert [t["target"] for t in detail["recovery"]["tasks"]] == [spare]
    # The executor copies and joins the target: the task is done.
    _, cur = await api(c, "GET", f"/extents/{vid}/0")
    status, _ = await api(c, "POST", f"/extents/{vid}/0/join", {"chunk_id": spare, "generation": cur["generation"]})
    assert status == 200
    st = (await api(c, "GET", "/cluster"))[1]
    assert st["recovery"]["degraded_extents"] == 0 and st["recovery"]["tasks"] == []
    assert "all extents fully replicated" in (await cli(c, "cluster", "status")).stdout


def _with_tasks(c: Cluster):
    st = c.api("GET", "/cluster")[1]
    return st if st["recovery"]["tasks"] else None


async def test_capacity_per_disk_chunk_and_cluster(env):
    c, ctx = env
    await register_chunk(ctx, "c0", labels={"zone": "a"}, capacity=10 * 2**30, used=2**30)
    text = (await cli(c, "chunk", "show", "c0")).stdout
    assert "10Gi total, 1Gi used" in text and "disks:" in text
    assert [r for r in (line.split() for line in text.splitlines()) if r[:1] == ["/d/c0"]] == [
        ["/d/c0", "ok", "10Gi", "1Gi", "9Gi", "-"]]       # an older record: no zstore bytes of its own
    listing = (await cli(c, "chunk", "list")).stdout
    assert "10Gi" in listing and "1Gi" in listing
    st = (await cli(c, "cluster", "status")).stdout
    assert "capacity       310Gi total, 1Gi used, 309Gi free" in st


async def test_capacity_counts_a_filesystem_shared_by_chunk_servers_once(env, tmp_path):
    """Two chunk servers (as `zstore up` runs them) with unlimited disks in one filesystem: the
    cluster's total counts it once (it counted it per disk), each server offers placement all
    that filesystem has available (not its size), and `chunk show` lists free and ours."""
    import os
    from chunk import disks as zdisks
    from zstore.records import ChunkInfo, ChunkLive, now
    c, ctx = env
    recs = {}
    for cid, zone in (("c4", "e"), ("c5", "f")):
        d = zdisks.prepare(zdisks.DiskSpec(tmp_path / f"disk-{cid}"))
        (d.path / "blob").write_bytes(b"x" * 300_000)
        rec = recs[cid] = zdisks.probe(d)
        await ctx.etcd.put(ctx.keys.chunk_info(cid), ChunkInfo(
            chunk_id=cid, hostname="host", address="127.0.0.1", data_port=1, portal="127.0.0.1:3260",
            labels={"zone": zone}, disks=[rec]).encode())
        await ctx.etcd.put(ctx.keys.chunk_live(cid), ChunkLive(
            chunk_id=cid, pid=os.getpid(), started=now(), lease_ttl=30, disks=[rec]).encode(),
            lease=await ctx.etcd.lease(30))
    st = os.statvfs(tmp_path)
    fs_size = st.f_blocks * st.f_frsize
    others = 4 * 100 * 2**30                           # the env's four servers of 100Gi, none used
    cap = (await api(c, "GET", "/cluster"))[1]["capacity"]
    assert cap["total"] == others + fs_size            # was others + 2 * fs_size
    assert recs["c4"]["fs"] == recs["c5"]["fs"]
    fs_free = min(r["fs_free"] for r in recs.values())
    assert (cap["used"], cap["free"]) == (fs_size - fs_free, others + fs_free)
    from meta.chunks import space
    assert space(list(recs.values())) == (fs_size, fs_size - fs_free, fs_free)
    for cid, rec in recs.items():
        got = (await api(c, "GET", f"/chunks/{cid}"))[1]
        assert (got["capacity"], got["used"], got["free"]) == (fs_size, rec["used"], rec["free"])
        assert rec["free"] <= fs_size - rec["used"] and rec["used"] > rec["zstore_used"]
    text = (await cli(c, "chunk", "show", "c4")).stdout
    row = next(r for r in (line.split() for line in text.splitlines()) if r[:1] == [recs["c4"]["path"]])
    from zstore.units import format_size
    assert row[4:] == [format_size(recs["c4"]["free"]), format_size(recs["c4"]["zstore_used"])]
    assert f"{format_size(recs['c4']['free'])} free" in text


async def test_a_drained_chunk_can_be_removed_once_its_replicas_moved(env):
    c, ctx = env
    status, vol = await api(c, "POST", "/volumes", {"name": "v", "size": "1Gi", "replicas": 3})
    vid = vol["volume_id"]
    _, rec = await api(c, "POST", f"/extents/{vid}/0")
    leaving = rec["replicas"][0]
    assert (await api(c, "POST", f"/chunks/{leaving}/drain"))[0] == 200
    st = await async_wait_for(lambda: _with_tasks(c), 20, "a task moving the replica")
    [task] = st["recovery"]["tasks"]
    assert task["kind"] == "rebuild" and task["target"] not in rec["replicas"]
    assert st["recovery"]["degraded_extents"] == 0
    await ctx.etcd.delete(ctx.keys.chunk_live(leaving))                     # stopped
    await async_wait_for(lambda: c.api("GET", f"/chunks/{leaving}")[1]["status"] == "down", 10, "down")
    status, body = await api(c, "DELETE", f"/chunks/{leaving}")
    assert status == 409 and "holds replicas of 1 volume(s): v" in body["error"]["message"]
    # The copy is done. (The leader may meanwhile drop the stopped server's replica, down past
    # the 1 s grace: the join then fills the gap instead. Either way the data left it.)
    for _ in range(3):
        gen = (await api(c, "GET", f"/extents/{vid}/0"))[1]["generation"]
        status, _ = await api(c, "POST", f"/extents/{vid}/0/join", {"chunk_id": task["target"], "generation": gen})
        if status == 200:
            break
    assert status == 200
    _, now = await api(c, "GET", f"/extents/{vid}/0")
    assert leaving not in now["replicas"] and len(now["replicas"]) == 3
    assert (await api(c, "DELETE", f"/chunks/{leaving}"))[0] == 200
