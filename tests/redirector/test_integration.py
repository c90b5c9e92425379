"""The redirector as a real process on 127.0.0.2 in front of three real chunk servers.

etcd, a meta server, three chunk servers and one redirector run on loopback;
volumes and ACLs are made through the meta API. libiscsi's tools and qemu only
know the VIP; we check where they were sent through the sticky record in etcd
and the chunk servers' own logs.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time

import pytest

from chunk.iscsi import pdu as P
from chunk.iscsi.constants import LoginStatus
from redirector import hashing
from tests.cluster import Cluster, cluster, port_open, wait_for
from tests.redirector.iscsi_client import RawInitiator
from zstore import etcd as zetcd
from zstore.config import EtcdConfig
from zstore.keys import Keys
from zstore.records import RedirectRecord

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240),
              pytest.mark.skipif(not shutil.which("iscsi-inq"), reason="libiscsi-bin is not installed")]

INIT = "iqn.2026-01.io.zstore.test:init1"
VIP = "127.0.0.2"


def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, timeout=timeout, text=True)


@pytest.fixture
def vip_cluster(tmp_path, etcd_server):
    with cluster(tmp_path, etcd_server, metas=1, chunks=3) as c:
        wait_for(lambda: c.api("GET", "/cluster")[1]["chunks"]["up"] == 3, 30, "3 chunk servers up")
        for port in c.portals:
            wait_for(lambda: port_open(port), 20, f"portal {port}")
        c.start_redirector(VIP, login_timeout=3.0, max_connections=256)
        yield c


def vip_url(c: Cluster, vol: dict | None = None, target: str | None = None) -> str:
    host, port = c.vips[0]
    if vol is None and target is None:
        return f"iscsi://{host}:{port}"
    return f"iscsi://{host}:{port}/{target or vol['target_iqn']}/{vol['lun'] if vol else 1}"


def make_volume(c: Cluster, name: str = "v") -> dict:
    status, vol = c.api("POST", "/volumes", {"name": name, "size": "64Mi", "replicas": 1})
    assert status == 201, vol
    assert c.api("PUT", f"/volumes/{name}/acl/{INIT}")[0] == 200
    return vol


def chunk_index(c: Cluster) -> dict[str, int]:
    """chunk id -> index in c.chunks (by portal port)."""
    chunks = c.api("GET", "/chunks")[1]["chunks"]
    return {ch["chunk_id"]: c.portals.index(int(ch["portal"].rsplit(":", 1)[1])) for ch in chunks}


def sticky(c: Cluster, target: str, initiator: str = INIT) -> RedirectRecord | None:
    async def get():
        etcd = zetcd.client(EtcdConfig(endpoints=[c.etcd.endpoint], prefix=c.prefix))
        try:
            got = await etcd.get(Keys(c.prefix).redirect(target, initiator))
            return RedirectRecord.decode(got.value) if got else None
        finally:
            await etcd.close()
    return asyncio.run(get())


def sessions_logged(c: Cluster, i: int, target: str, initiator: str = INIT) -> int:
    return c.chunks[i].log().count(f"normal session: {initiator} -> {target}")


def wait_served(c: Cluster, vol: dict) -> None:
    """Redirector and chunk servers learn of the volume by watch: wait until a login works
    and the VIP's discovery lists the target (a login is redirected before the redirector's
    own catalog has the target; SendTargets answers from that catalog)."""
    wait_for(lambda: run("iscsi-inq", "-i", INIT, vip_url(c, vol)).returncode == 0, 20,
             "the LUN to be served through the VIP")
    wait_for(lambda: vol["target_iqn"] in run("iscsi-ls", "-i", INIT, vip_url(c)).stdout, 20,
             "the target in the VIP's discovery")


def sticky_after_login(c: Cluster, target: str):
    """The sticky record, logging in again until there is one.

    The redirector records only logins of initiators its catalog already knows
    may see the target; its catalog can trail the chunk servers' by a moment, so
    the login that proved the LUN is served may have gone unrecorded."""
    rec = sticky(c, target)
    if rec is None:
        asyncio.run(raw_login(c, target))
        rec = sticky(c, target)
    return rec


async def raw_login(c: Cluster, target: str | None, initiator: str = INIT,
                    source: str | None = None) -> tuple[int, dict[str, str]]:
    conn = await RawInitiator.connect(*c.vips[0], source=source)
    try:
        resp, keys = await conn.login(initiator, target)
        return resp.status, keys
    finally:
        conn.close()


def test_discovery_inquiry_and_io_are_redirected_to_the_hashed_chunk(vip_cluster: Cluster):
    c = vip_cluster
    vol = make_volume(c)
    target = vol["target_iqn"]
    wait_served(c, vol)

    # Discovery on the VIP lists the target at the VIP, never at a chunk server.
    ls = run("iscsi-ls", "-i", INIT, "-s", vip_url(c))
    assert ls.returncode == 0, ls.stderr
    assert target in ls.stdout and f"Portal:{VIP}:{c.vips[0][1]},1" in ls.stdout, ls.stdout
    assert f"Lun:{vol['lun']}" in ls.stdout.replace(" ", "")
    assert not any(f":{p}" in ls.stdout for p in c.portals)
    assert target not in run("iscsi-ls", "-i", "iqn.2026-01.io.zstore.test:other", vip_url(c)).stdout

    inq = run("iscsi-inq", "-i", INIT, vip_url(c, vol))
    assert inq.returncode == 0 and "ZSTORE" in inq.stdout, inq.stderr

    # Sent where the hash says, recorded, and the session really is on that chunk server.
    index = chunk_index(c)
    want = hashing.pick(INIT, target, list(index))
    rec = wait_for(lambda: sticky_after_login(c, target), 10, "the sticky record")
    assert rec.chunk_id == want
    chosen = index[want]
    before = [sessions_logged(c, i, target) for i in range(3)]
    assert before[chosen] >= 2 and sum(before) == before[chosen], before
    assert f"redirect {INIT} -> {target}: chunk {want}" in c.redirectors[0].log()

    opts = (f"driver=iscsi,transport=tcp,portal={VIP}:{c.vips[0][1]},target={target},"
            f"lun={vol['lun']},initiator-name={INIT}")
    io = run("qemu-io", "--image-opts", opts, "-c", "write -P 0x5a 0 4096", "-c", "read -P 0x5a 0 4096")
    assert io.returncode == 0 and io.stdout.count("ops/sec") == 2, io.stdout + io.stderr
    assert "fail" not in io.stdout.lower()
    after = [sessions_logged(c, i, target) for i in range(3)]
    assert after[chosen] == before[chosen] + 1 and sum(after) == after[chosen], after


def test_unknown_target_dead_chunk_and_no_chunk_at_all(vip_cluster: Cluster):
    c = vip_cluster
    vol = make_volume(c)
    target = vol["target_iqn"]
    wait_served(c, vol)
    nope = target.rsplit(".", 1)[0] + ".t4095"

    assert run("iscsi-inq", "-i", INIT, vip_url(c, target=nope)).returncode != 0
    assert asyncio.run(raw_login(c, nope))[0] == LoginStatus.NOT_FOUND

    # The sticky chunk server dies: the next login goes to a live one, and sticks there.
    index = chunk_index(c)
    first = wait_for(lambda: sticky_after_login(c, target), 10, "the sticky record").chunk_id
    c.chunks[index[first]].kill()
    status, keys = wait_for(lambda: (r := asyncio.run(raw_login(c, target)))[1].get("TargetAddress")
                            != f"127.0.0.1:{c.portals[index[first]]}" and r, 20, "a redirect elsewhere")
    assert status == LoginStatus.TARGET_MOVED_TEMPORARILY
    assert run("iscsi-inq", "-i", INIT, vip_url(c, vol)).returncode == 0
    second = wait_for(lambda: (r := sticky(c, target)) and r.chunk_id != first and r, 10, "record moved")
    assert second.chunk_id == hashing.pick(INIT, target, [i for i in index if i != first])
    assert keys["TargetAddress"] == f"127.0.0.1:{c.portals[index[second.chunk_id]]}"

    # No chunk server at all: "service unavailable", and the initiator's login fails.
    for p in c.chunks:
        p.stop()
    wait_for(lambda: asyncio.run(raw_login(c, target))[0] == LoginStatus.SERVICE_UNAVAILABLE, 20,
             "service unavailable")
    assert run("iscsi-inq", "-i", INIT, vip_url(c, vol)).returncode != 0
    assert "SERVICE_UNAVAILABLE" in c.redirectors[0].log()
    # A discovery session does not need a chunk server.
    ls = run("iscsi-ls", "-i", INIT, vip_url(c))
    assert ls.returncode == 0 and target in ls.stdout


MALFORMED = [
    os.urandom(48),                                            # random header
    b"\x00" * 47,                                              # truncated BHS, then silence
    P.LoginRequest(transit=True, csg=1, nsg=3).to_bytes()[:4] + b"\xff" * 44,    # 16 MiB segment
    P.NopOut(itt=1).to_bytes(),                                # not a login
    P.LoginRequest(transit=True, cont=True, csg=1, nsg=3, data=b"InitiatorName=x\0").to_bytes(),
    P.LoginRequest(transit=True, csg=1, nsg=3, data=b"\xff\xfe=\0garbage").to_bytes(),
    P.LoginRequest(transit=True, csg=1, nsg=3, version_min=9).to_bytes(),
]


async def _abuse_and_inquire(c: Cluster, vol: dict) -> dict[str, object]:
    host, port = c.vips[0]
    target = vol["target_iqn"]
    conns: list[RawInitiator] = []
    results: dict[str, object] = {}

    async def flood_login(i: int) -> int | None:
        try:
            return (await raw_login(c, target, f"iqn.2026-01.io.zstore.test:flood{i}", source="127.0.0.3"))[0]
        except (OSError, AssertionError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            return None                                       # refused over the per-host share

    async def slowloris() -> None:
        conn = await RawInitiator.connect(host, port, source="127.0.0.4")
        conns.append(conn)
        data = P.LoginRequest(transit=True, csg=1, nsg=3, data=b"InitiatorName=slow\0").to_bytes()
        for b in data:
            conn.w.write(bytes([b]))
            await asyncio.sleep(0.1)
            if conn.w.is_closing():
                return

    for _ in range(100):                                      # half-open: connect, send nothing
        conns.append(await RawInitiator.connect(host, port, source="127.0.0.5"))
    for i in range(40):
        conn = await RawInitiator.connect(host, port, source="127.0.0.4")
        conn.w.write(MALFORMED[i % len(MALFORMED)])
        conns.append(conn)
    slow = asyncio.ensure_future(slowloris())
    flood = asyncio.ensure_future(asyncio.gather(*(flood_login(i) for i in range(200))))

    # Meanwhile, the well-behaved initiator, three times.
    t0 = time.monotonic()
    for _ in range(3):
        proc = await asyncio.create_subprocess_exec("iscsi-inq", "-i", INIT, vip_url(c, vol),
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0, err
    results["inquiry_seconds"] = time.monotonic() - t0
    results["flood"] = await asyncio.wait_for(flood, 30)
    # Half-open and malformed connections are all closed by the redirector within its login timeout.
    closed = await asyncio.wait_for(asyncio.gather(*(x.closed(10) for x in conns), return_exceptions=True), 20)
    results["closed"] = sum(x is True for x in closed)
    results["conns"] = len(conns)
    slow.cancel()
    for x in conns:
        x.close()
    return results


def test_floods_half_open_and_garbage_do_not_block_a_good_initiator(vip_cluster: Cluster):
    c = vip_cluster
    vol = make_volume(c)
    wait_served(c, vol)
    r = asyncio.run(_abuse_and_inquire(c, vol))
    assert r["inquiry_seconds"] < 30
    assert r["closed"] == r["conns"]
    flood = r["flood"]
    redirected = [i for i, s in enumerate(flood) if s == LoginStatus.TARGET_MOVED_TEMPORARILY]
    assert len(redirected) >= 64 and all(s in (LoginStatus.TARGET_MOVED_TEMPORARILY, None) for s in flood)
    assert c.redirectors[0].alive()
    # The flood's made-up initiators are on no ACL: redirected, but none left a record in etcd.
    target = vol["target_iqn"]
    assert sticky(c, target) is not None
    assert not any(sticky(c, target, f"iqn.2026-01.io.zstore.test:flood{i}") for i in redirected[:20])
    # And the redirector still serves afterwards.
    assert run("iscsi-inq", "-i", INIT, vip_url(c, vol)).returncode == 0


def test_standby_redirector_takes_over_the_vip(vip_cluster: Cluster):
    c = vip_cluster
    vol = make_volume(c)
    wait_served(c, vol)
    host, port = c.vips[0]
    standby = c.start_redirector(host, port, wait=False)
    wait_for(lambda: "campaigning for VIP" in standby.log(), 20, "the standby to campaign")
    assert "holding VIP" not in standby.log()
    c.redirectors[0].stop()                 # SIGTERM: gives the VIP back at once
    wait_for(lambda: "holding VIP" in standby.log(), 10, "the standby to take the VIP")
    wait_for(lambda: port_open(port, host), 10, "the VIP served again")
    inq = run("iscsi-inq", "-i", INIT, vip_url(c, vol))
    assert inq.returncode == 0, inq.stderr
    assert f"redirect {INIT} -> {vol['target_iqn']}: chunk" in standby.log()
