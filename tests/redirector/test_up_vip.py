"""``zstore up`` runs a redirector on 127.0.0.2: initiators need only that address."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.cluster import PY, ROOT, free_port, free_port_range, wait_for
from tests.zstore.test_up import Up, _env, zstore_down

INIT = "iqn.2026-01.io.zstore.test:up-init"


def _call(base: int, token: str, method: str, path: str) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{base + 10}/api/v1{path}", method=method,
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
                                 data=json.dumps({"name": "v", "size": "64Mi", "replicas": 1}).encode()
                                 if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=15) as r:
        return json.loads(r.read())


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.skipif(not shutil.which("iscsi-inq"), reason="libiscsi-bin is not installed")
def test_up_serves_iscsi_through_the_vip(tmp_path: Path):
    state = tmp_path / "state"
    base, vip_port = free_port_range(40), free_port("127.0.0.2")
    up = Up(state, base, "--vip-port", str(vip_port))
    try:
        up.wait_banner()
        url = f"iscsi://127.0.0.2:{vip_port}"
        assert f"{url}/<target>/<lun>" in up.output()
        assert json.loads((state / "up.json").read_text())["redirector"]["port"] == vip_port
        token = (state / "token").read_text().strip()
        vol = _call(base, token, "POST", "/volumes")
        _call(base, token, "PUT", f"/volumes/v/acl/{INIT}")
        lun_url = f"{url}/{vol['target_iqn']}/{vol['lun']}"
        wait_for(lambda: subprocess.run(["iscsi-inq", "-i", INIT, lun_url], capture_output=True,
                                        timeout=30).returncode == 0, 30, "iscsi-inq through the VIP")
        ls = subprocess.run(["iscsi-ls", "-i", INIT, url], capture_output=True, text=True, timeout=30)
        assert f"Portal:127.0.0.2:{vip_port},1" in ls.stdout, ls.stdout + ls.stderr
        assert "redirect " in (state / "logs" / "redirector.log").read_text()

        # qemu-io through the VIP: its session sits on the chunk server the hash picks,
        # as the chunk servers' own session lists show, and I/O works.
        from redirector import hashing
        opts = (f"driver=iscsi,transport=tcp,portal=127.0.0.2:{vip_port},target={vol['target_iqn']},"
                f"lun={vol['lun']},initiator-name={INIT}")
        io = subprocess.Popen(["qemu-io", "--image-opts", opts], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        try:
            io.stdin.write("write -P 0x3c 0 64k\n")
            io.stdin.flush()
            assert "ops/sec" in io.stdout.readline() + io.stdout.readline()

            def holders():
                chunks = _call(base, token, "GET", "/chunks")["chunks"]
                return [ch["chunk_id"] for ch in chunks
                        if any(s["initiator"] == INIT and s["type"] == "normal" for s in ch.get("sessions", []))]
            on = wait_for(lambda: holders(), 10, "the qemu-io session in a chunk server's session list")
            all_ids = [ch["chunk_id"] for ch in _call(base, token, "GET", "/chunks")["chunks"]]
            assert on == [hashing.pick(INIT, vol["target_iqn"], all_ids)]
            io.stdin.write("read -P 0x3c 0 64k\n")
            io.stdin.flush()
            assert "ops/sec" in io.stdout.readline() + io.stdout.readline()
        finally:
            io.kill()
            io.wait(10)

        r = zstore_down(state)
        assert r.returncode == 0, r.stdout + r.stderr
        assert up.popen.wait(30) == 0
        out = up.output()
        assert out.index("stopping redirector") < out.index("stopping chunk servers")
    finally:
        up.kill()


def test_vip_port_in_use_is_named(tmp_path: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([PY, "-m", "zstore.up", "--state-dir", str(tmp_path), "--base-port",
                            str(free_port_range(40)), "--vip-port", str(port)],
                           capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=60)
    assert r.returncode == 1
    assert f"port {port} on 127.0.0.2 (the redirector's VIP) is unusable" in r.stderr
    assert "--vip-port" in r.stderr and not (tmp_path / "up.pid").exists()
