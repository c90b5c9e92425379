"""The chunk server's iSCSI target driven by real initiators (libiscsi tools, qemu).

A real etcd, a meta server and two chunk servers run on loopback; volumes,
ACLs and CHAP are set through the meta API exactly as an admin would.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.cluster import Cluster, cluster, port_open, wait_for

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not shutil.which("iscsi-inq"), reason="libiscsi-bin is not installed")]

INIT = "iqn.2026-01.io.zstore.test:init1"
OTHER = "iqn.2026-01.io.zstore.test:stranger"


def run(*argv: str, timeout: float = 60, input: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, timeout=timeout, input=input)


@pytest.fixture
def two_chunks(tmp_path, etcd_server):
    with cluster(tmp_path, etcd_server, metas=1, chunks=2) as c:
        wait_for(lambda: c.api("GET", "/cluster")[1]["chunks"]["up"] == 2, 30, "2 chunk servers up")
        for port in c.portals:
            wait_for(lambda: port_open(port), 20, f"portal {port}")
        yield c


def make_volume(c: Cluster, name: str = "v", size: str = "256Mi", acl: list[str] = (INIT,)) -> dict:
    status, vol = c.api("POST", "/volumes", {"name": name, "size": size, "replicas": 1})
    assert status == 201, vol
    for iqn in acl:
        assert c.api("PUT", f"/volumes/{name}/acl/{iqn}")[0] == 200
    return vol


def url(c: Cluster, vol: dict, chunk: int = 0, creds: str = "") -> str:
    return f"iscsi://{creds}127.0.0.1:{c.portals[chunk]}/{vol['target_iqn']}/{vol['lun']}"


def wait_visible(c: Cluster, vol: dict, initiator: str = INIT, chunk: int = 0) -> None:
    """The chunk server learns of volumes and ACLs by watch: wait until it has."""
    wait_for(lambda: run("iscsi-inq", "-i", initiator, url(c, vol, chunk)).returncode == 0, 15,
             "the LUN to be served")


def test_discovery_inquiry_and_capacity(two_chunks: Cluster):
    c = two_chunks
    vol = make_volume(c)
    wait_visible(c, vol)
    ls = run("iscsi-ls", "-i", INIT, "-s", f"iscsi://127.0.0.1:{c.portals[0]}")
    assert ls.returncode == 0, ls.stderr
    out = ls.stdout.decode()
    assert vol["target_iqn"] in out and f"Lun:{vol['lun']}" in out.replace(" ", "")
    inq = run("iscsi-inq", "-i", INIT, url(c, vol))
    assert inq.returncode == 0 and b"ZSTORE" in inq.stdout
    vpd83 = run("iscsi-inq", "-i", INIT, "-e", "1", "-c", "131", url(c, vol))   # device identification
    assert vpd83.returncode == 0 and b"Designator Type:(3) NAA" in vpd83.stdout
    vpd80 = run("iscsi-inq", "-i", INIT, "-e", "1", "-c", "128", url(c, vol))   # unit serial number
    assert vpd80.returncode == 0 and vol["volume_id"].encode() in vpd80.stdout
    rc16 = run("iscsi-readcapacity16", "-i", INIT, url(c, vol))
    assert rc16.returncode == 0
    assert str(256 * 2**20 // 512) in rc16.stdout.decode() or str(256 * 2**20) in rc16.stdout.decode()


def test_discovery_shows_only_permitted_targets(two_chunks: Cluster):
    c = two_chunks
    vol = make_volume(c)
    wait_visible(c, vol)
    ls = run("iscsi-ls", "-i", OTHER, f"iscsi://127.0.0.1:{c.portals[0]}")
    assert ls.returncode == 0 and vol["target_iqn"].encode() not in ls.stdout


def test_qemu_img_round_trip_through_two_chunk_servers(two_chunks: Cluster, tmp_path):
    c = two_chunks
    vol = make_volume(c)
    wait_visible(c, vol)
    wait_visible(c, vol, chunk=1)
    src, back = tmp_path / "src.img", tmp_path / "back.img"
    src.write_bytes(os.urandom(256 * 2**20))

    def opts(chunk: int) -> str:
        return (f"driver=iscsi,transport=tcp,portal=127.0.0.1:{c.portals[chunk]},"
                f"target={vol['target_iqn']},lun={vol['lun']},initiator-name={INIT}")

    w = run("qemu-img", "convert", "-n", "-f", "raw", "--target-image-opts", str(src), opts(0), timeout=300)
    assert w.returncode == 0, w.stderr
    # Read it back through the other chunk server: any chunk server serves any LUN.
    r = run("qemu-img", "convert", "-O", "raw", "--image-opts", opts(1), str(back), timeout=300)
    assert r.returncode == 0, r.stderr
    assert back.read_bytes() == src.read_bytes()


def test_masking_applies_live_within_one_session(two_chunks: Cluster):
    c = two_chunks
    vol = make_volume(c, acl=[OTHER])
    wait_visible(c, vol, initiator=OTHER)       # the chunk server knows the LUN now
    # INIT is not on the ACL: nothing to see, and direct access fails.
    assert run("iscsi-inq", "-i", INIT, url(c, vol)).returncode != 0
    ls = run("iscsi-ls", "-i", INIT, "-s", f"iscsi://127.0.0.1:{c.portals[0]}")
    assert vol["target_iqn"].encode() not in ls.stdout
    # One long-lived qemu-io session: access follows the ACL without reconnecting.
    assert c.api("PUT", f"/volumes/v/acl/{INIT}")[0] == 200
    wait_visible(c, vol)
    opts = (f"driver=iscsi,transport=tcp,portal=127.0.0.1:{c.portals[0]},target={vol['target_iqn']},"
            f"lun={vol['lun']},initiator-name={INIT}")
    p = subprocess.Popen(["qemu-io", "--image-opts", opts], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        def cmd(line: str) -> str:
            p.stdin.write(line + "\n")
            p.stdin.flush()
            out = []
            while True:
                s = p.stdout.readline()
                out.append(s)
                # qemu-io ends each command with a rate line, or "<cmd> failed: ..."
                if "ops/sec" in s or s.startswith(("read failed", "write failed")) or not s:
                    return "".join(out)
        assert "ops/sec" in cmd("write -P 0x5a 0 4096")
        assert c.api("DELETE", f"/volumes/v/acl/{INIT}")[0] == 200
        wait_for(lambda: run("iscsi-inq", "-i", INIT, url(c, vol)).returncode != 0, 15, "access cut")
        assert "ops/sec" not in cmd("read -P 0x5a 0 4096")
        assert c.api("PUT", f"/volumes/v/acl/{INIT}")[0] == 200
        wait_visible(c, vol)
        assert "ops/sec" in cmd("read -P 0x5a 0 4096")
    finally:
        p.kill()
        p.wait(10)


def test_chap_wrong_secret_fails_right_one_works(two_chunks: Cluster):
    c = two_chunks
    vol = make_volume(c)
    wait_visible(c, vol)
    assert c.api("PUT", "/chap", {"target": "v", "initiator": INIT, "user": "init1",
                                  "secret": "right-secret-123"})[0] == 200
    wait_for(lambda: run("iscsi-inq", "-i", INIT, url(c, vol)).returncode != 0, 15, "CHAP required")
    bad = run("iscsi-inq", "-i", INIT, url(c, vol, creds="init1%wrong-secret-123@"))
    assert bad.returncode != 0
    good = run("iscsi-inq", "-i", INIT, url(c, vol, creds="init1%right-secret-123@"))
    assert good.returncode == 0, good.stderr


def test_mutual_chap_with_libiscsi(two_chunks: Cluster):
    c = two_chunks
    vol = make_volume(c)
    wait_visible(c, vol)
    assert c.api("PUT", "/chap", {"target": "v", "initiator": INIT, "user": "init1", "secret": "initiator-secret-1",
                                  "mutual_user": "target1", "mutual_secret": "target-secret-22"})[0] == 200
    base = url(c, vol, creds="init1%initiator-secret-1@")
    wait_for(lambda: run("iscsi-inq", "-i", INIT, url(c, vol)).returncode != 0, 15, "CHAP required")
    good = run("iscsi-inq", "-i", INIT, f"{base}?target_user=target1&target_password=target-secret-22")
    assert good.returncode == 0, good.stderr
    # The initiator refuses a target that cannot prove the mutual secret it expects.
    bad = run("iscsi-inq", "-i", INIT, f"{base}?target_user=target1&target_password=not-the-target-secret")
    assert bad.returncode != 0


def test_several_luns_and_sessions_at_once(two_chunks: Cluster, tmp_path):
    c = two_chunks
    a = make_volume(c, "a", size="64Mi")
    b = make_volume(c, "b", size="64Mi")
    assert a["target_iqn"] == b["target_iqn"] and {a["lun"], b["lun"]} == {1, 2}   # volumes share a target
    for vol in (a, b):          # both chunk servers serve both LUNs below: each learns by its own watch
        for chunk in (0, 1):
            wait_visible(c, vol, chunk=chunk)
    ls = run("iscsi-ls", "-i", INIT, "-s", f"iscsi://127.0.0.1:{c.portals[0]}").stdout.decode().replace(" ", "")
    assert "Lun:1" in ls and "Lun:2" in ls
    # Four concurrent sessions (two per LUN, one per chunk server) writing distinct patterns.
    procs = []
    for vol, pattern in ((a, 0x11), (b, 0x22)):
        for chunk in (0, 1):
            opts = (f"driver=iscsi,transport=tcp,portal=127.0.0.1:{c.portals[chunk]},target={vol['target_iqn']},"
                    f"lun={vol['lun']},initiator-name={INIT}")
            off = chunk * 8 * 2**20
            procs.append(subprocess.Popen(
                ["qemu-io", "--image-opts", opts, "-c", f"write -P {pattern:#x} {off} 8M",
                 "-c", f"read -P {pattern:#x} {off} 8M"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outs = [p.communicate(timeout=120)[0].decode() for p in procs]
    bad = [f"session {k} (exit {p.returncode}): {o}" for k, (p, o) in enumerate(zip(procs, outs))
           if p.returncode != 0 or "Pattern verification failed" in o]
    assert not bad, "\n".join(bad)


def test_session_reinstatement_closes_the_old_connection(two_chunks: Cluster):
    """A new login with the same initiator, ISID and target replaces the old session (RFC 7143 6.3.5)."""
    import asyncio

    from tests.redirector.iscsi_client import RawInitiator
    c = two_chunks
    vol = make_volume(c)
    wait_visible(c, vol)

    async def scenario():
        old = await RawInitiator.connect("127.0.0.1", c.portals[0])
        resp, _ = await old.login(INIT, vol["target_iqn"])
        assert resp.status_class == 0 and resp.tsih
        new = await RawInitiator.connect("127.0.0.1", c.portals[0])
        resp2, _ = await new.login(INIT, vol["target_iqn"])
        assert resp2.status_class == 0 and resp2.tsih != resp.tsih
        assert await old.closed()                       # the old connection is dropped
        assert (await new.send_targets("")) == [("TargetName", vol["target_iqn"]),
                                                ("TargetAddress", f"127.0.0.1:{c.portals[0]},1")]
        new.close()

    asyncio.run(scenario())
