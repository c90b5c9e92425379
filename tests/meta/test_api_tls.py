"""The meta API over HTTPS: a client trusting the CA gets in; plain HTTP does not."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request

import pytest

from tests.certs import make_pki
from tests.cluster import PY, Proc, free_port, port_open, unique_prefix, wait_for, write_config


def test_meta_serves_tls(tmp_path, etcd_server):
    pki = make_pki(tmp_path / "pki")
    token = tmp_path / "token"
    token.write_text("tls-token-0123456789\n")
    port = free_port()
    cfg = write_config(tmp_path / "meta.toml", {
        "etcd": {"endpoints": [etcd_server.endpoint], "prefix": unique_prefix()},
        "meta": {"listen": f"127.0.0.1:{port}", "token_file": str(token), "lease_ttl": 3,
                 "tls_cert_file": pki["server_cert"], "tls_key_file": pki["server_key"]},
    })
    p = Proc("meta-tls", [PY, "-m", "meta.server", "--config", str(cfg)], tmp_path / "meta.log").start()
    try:
        wait_for(lambda: port_open(port) or not p.alive(), 20, "meta TLS port")
        assert p.alive(), p.log()
        ctx = ssl.create_default_context(cafile=pki["ca_file"])
        req = urllib.request.Request(f"https://127.0.0.1:{port}/api/v1/cluster",
                                     headers={"Authorization": "Bearer tls-token-0123456789"})
        body = wait_for(lambda: (b := json.loads(urllib.request.urlopen(req, context=ctx, timeout=5).read()))
                        and b["leader"] and b, 20, "a leader in cluster status over https")
        assert body["leader"]["url"].startswith("https://")
        # An untrusted client refuses the server; a plain-HTTP client gets nowhere.
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(req, context=ssl.create_default_context(), timeout=5)
        with pytest.raises((urllib.error.URLError, ConnectionError, http_errors())):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/health", timeout=5)
    finally:
        p.stop()


def http_errors():
    import http.client
    return http.client.HTTPException
