"""The redirector daemon's command line, config and lifecycle (real processes, etcd only)."""

from __future__ import annotations

import argparse
import socket
import subprocess

import pytest

from redirector import server
from tests.cluster import PY, ROOT, Cluster, port_open, wait_for, write_config
from zstore.config import ConfigError

pytestmark = pytest.mark.timeout(120)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "redirector.server", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=30, env={"PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("args, message", [
    (["--vip", "not-an-ip"], "redirector.vip: 'not-an-ip' is not an IP address"),
    # The portal listens on the VIP and SendTargets advertises it: one host's unicast address only.
    (["--vip", "0.0.0.0"], "redirector.vip: 0.0.0.0 is the wildcard address; "
                           "it must be one host's unicast address"),
    (["--vip", "::"], "redirector.vip: :: is the wildcard address; it must be one host's unicast address"),
    (["--vip", "224.0.0.1"], "redirector.vip: 224.0.0.1 is a multicast address; "
                             "it must be one host's unicast address"),
    (["--vip", "169.254.0.9"], "redirector.vip: 169.254.0.9 is a link-local address; "
                               "it must be one host's unicast address"),
    (["--vip", "fe80::1"], "redirector.vip: fe80::1 is a link-local address; "
                           "it must be one host's unicast address"),
    (["--port", "0"], "redirector.port: 0 is not a port (1-65535)"),
    (["--login-timeout", "0"], "redirector.login_timeout: 0.0 must be in (0, 300] seconds"),
    (["--max-connections", "many"], "redirector.max_connections: 'many' is not a valid int"),
    (["--lease-ttl", "0"], "redirector.lease_ttl: 0 must be between 1 and 600 seconds"),
    (["--prefix", "/"], "etcd.prefix: etcd prefix must not be empty"),
    (["--nonsense"], "unrecognized arguments: --nonsense (see --help)"),
    (["--config", "/nonexistent/zstore.toml"], "config file /nonexistent/zstore.toml does not exist"),
])
def test_bad_config_is_one_line_and_exit_2(args, message):
    r = cli(*args)
    assert r.returncode == 2
    assert r.stderr == f"zstore-redirector: error: {message}\n"


def test_flags_override_the_file_and_id_defaults_to_host_and_port(tmp_path):
    cfg_file = write_config(tmp_path / "r.toml", {"redirector": {"vip": "127.0.0.9", "port": 3260,
                                                                  "login_timeout": 4.0}})
    args = server.build_parser().parse_args(["--config", str(cfg_file), "--port", "3270"])
    cfg = server.load_config(args, env={})
    server.validate(cfg)
    r = cfg.redirector
    assert (r.vip, r.port, r.login_timeout) == ("127.0.0.9", 3270, 4.0)
    assert r.redirector_id == f"{socket.gethostname()}:3270"
    with pytest.raises(ConfigError):
        server.validate(server.load_config(argparse.Namespace(**{**vars(args), "vip": "::x"}), env={}))


def test_port_taken_on_the_vip_is_retried_until_free_and_sigterm_exits_0(tmp_path, etcd_server):
    c = Cluster(workdir=tmp_path, etcd=etcd_server)
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.2", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    try:
        p = c.start_redirector("127.0.0.2", port, wait=False, lease_ttl=2)
        wait_for(lambda: "could not serve the VIP" in p.log(), 20, "the bind failure to be reported")
        assert p.alive()
        blocker.close()
        wait_for(lambda: port_open(port, "127.0.0.2") and "redirecting iSCSI logins" in p.log(), 20,
                 "the VIP served once the port is free")
        p.popen.terminate()
        assert p.popen.wait(15) == 0
        assert "releasing VIP" in p.log() and "stopped" in p.log()
    finally:
        blocker.close()
        c.stop()
