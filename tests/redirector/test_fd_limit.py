"""The redirector's open-file limit: its connection caps must act before descriptors run out.

A real redirector process (real etcd) started with a soft RLIMIT_NOFILE of 1024, the usual
default, and the default config: four hosts fill the portal with idle connections, a fifth
host must still get its redirect, and the log must not flood with accept errors.
"""

from __future__ import annotations

import asyncio
import resource
import socket
import subprocess

import pytest

from chunk.iscsi.constants import LoginStatus
from redirector import server
from redirector.portal import descriptors_needed
from tests.cluster import PY, ROOT, Proc, free_port, port_open, wait_for, write_config
from tests.redirector.iscsi_client import RawInitiator
from tests.redirector.test_members import add_chunk
from zstore.config import Config, ConfigError, RedirectorConfig
from zstore.fdlimit import raise_fd_limit
from zstore.keys import Keys
from zstore.records import AclEntry, LunMapping, Target, Volume

pytestmark = pytest.mark.timeout(120)

TARGET = "iqn.2026-01.io.zstore:abcd1234.t0001"
INIT = "iqn.1994-05.com.example:host1"
VIP = "127.0.0.2"
SOFT = 1024


async def _seed(e, keys: Keys) -> None:
    await e.put(keys.volume("v1"), Volume(volume_id="v1", name="v", size=1 << 26, replicas=1,
                                          target_index=1, lun=1).encode())
    await e.put(keys.target(1), Target(index=1, iqn=TARGET).encode())
    await e.put(keys.lun(1, 1), LunMapping(target_index=1, lun=1, volume_id="v1").encode())
    await e.put(keys.acl("v1", INIT), AclEntry(volume_id="v1", initiator=INIT).encode())
    await add_chunk(e, keys, "c1", 4000)


async def _idle(source: str, port: int) -> socket.socket:
    s = socket.socket()
    s.setblocking(False)
    s.bind((source, 0))
    await asyncio.get_running_loop().sock_connect(s, (VIP, port))
    return s


async def test_a_fifth_host_is_redirected_while_four_fill_a_portal_with_a_1024_file_limit(
        tmp_path, etcd_server, etcd_client, etcd_config):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if raise_fd_limit() < 4 * 256 + 100 or hard < descriptors_needed(RedirectorConfig().max_connections):
        pytest.skip(f"open-file hard limit {hard} too low for this test")
    await _seed(etcd_client, Keys(etcd_config.prefix))
    port = free_port(VIP)
    cfg = write_config(tmp_path / "r.toml", {
        "etcd": {"endpoints": [etcd_server.endpoint], "prefix": etcd_config.prefix},
        "redirector": {"vip": VIP, "port": port, "redirector_id": "r0", "lease_ttl": 2}})
    p = Proc("redirector", ["prlimit", f"--nofile={SOFT}:{hard}", PY, "-m", "redirector.server",
                            "--config", str(cfg), "--log-level", "WARNING"],
             tmp_path / "redirector.log").start()
    held: list[socket.socket] = []
    try:
        wait_for(lambda: port_open(port, VIP) or not p.alive(), 30, "the redirector on the VIP")
        assert p.alive(), p.log_path.read_text()
        for h in range(3, 7):                   # each host up to its share: 1024 / 4
            for _ in range(256):
                held.append(await _idle(f"127.0.0.{h}", port))
        await asyncio.sleep(2)                  # every connection accepted (or refused)
        c = await asyncio.wait_for(RawInitiator.connect(VIP, port, source="127.0.0.7"), 10)
        try:
            resp, keys = await asyncio.wait_for(c.login(INIT, TARGET), 10)
        finally:
            c.close()
        assert resp.status == LoginStatus.TARGET_MOVED_TEMPORARILY
        assert keys["TargetAddress"] == "127.0.0.1:4000"
        await asyncio.sleep(3)                  # two more lease refreshes
        assert p.alive()
        log = p.log_path.read_text()
        assert log.count("out of system resource") <= 2, log[-3000:]
        assert "releasing VIP" not in log
    finally:
        for s in held:
            s.close()
        p.stop()


def test_a_max_connections_beyond_the_file_limit_is_refused_at_start(tmp_path):
    """An explicit max_connections the limit cannot carry is refused; the default is lowered
    to fit (a container or host whose hard limit is 1024 still runs a redirector)."""
    cfg = Config()
    need = descriptors_needed(cfg.redirector.max_connections)
    server.validate(cfg, fd_limit=need)
    assert cfg.redirector.max_connections == 1024
    cfg = Config()
    cfg.redirector.max_connections = 2000
    with pytest.raises(ConfigError, match=f"redirector.max_connections: 2000 connections need an "
                                          f"open-file limit of at least {descriptors_needed(2000)}, "
                                          f"but it is {need}"):
        server.validate(cfg, fd_limit=need)
    cfg = Config()
    server.validate(cfg, fd_limit=need - 100)
    assert cfg.redirector.max_connections == 1024 - 100
    cfg = Config()
    server.validate(cfg, fd_limit=1024)
    assert cfg.redirector.max_connections == server.MIN_FITTED
    r = subprocess.run(["prlimit", "--nofile=1024:1024", PY, "-m", "redirector.server", "--config",
                        str(write_config(tmp_path / "r.toml", {"redirector": {"max_connections": 2000}}))],
                       capture_output=True, text=True, cwd=ROOT, timeout=30, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 2
    assert r.stderr.startswith("zstore-redirector: error: redirector.max_connections: 2000 connections "
                               f"need an open-file limit of at least {descriptors_needed(2000)}, "
                               "but it is 1024; raise it")