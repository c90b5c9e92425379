"""Unusable TLS files in the meta config are config errors naming the setting, file and reason."""

from __future__ import annotations

import asyncio

import pytest

from meta.server import serve
from tests.certs import make_pki
from tests.cluster import free_port
from zstore import config as zconfig


def meta_config(tmp_path, **meta) -> zconfig.Config:
    cfg = zconfig.Config()
    token = tmp_path / "token"
    token.write_text("tls-token-0123456789\n")
    cfg.meta.token_file = str(token)
    cfg.meta.listen = f"127.0.0.1:{free_port()}"
    cfg.etcd.endpoints = [f"http://127.0.0.1:{free_port()}"]   # never reached
    for k, v in meta.items():
        setattr(cfg.meta, k, v)
    return cfg


def serve_error(cfg: zconfig.Config) -> str:
    with pytest.raises(zconfig.ConfigError) as e:
        asyncio.run(asyncio.wait_for(serve(cfg, asyncio.Event()), 10))
    return str(e.value)


@pytest.mark.parametrize("kind, reason", [
    ("missing", "cannot read client.ca_file {ca}: No such file or directory"),
    ("not-a-cert", "client.ca_file {ca} holds no usable CA certificate (no certificate or crl found)"),
])
def test_bad_client_ca_file_is_a_config_error(kind: str, reason: str, tmp_path) -> None:
    ca = tmp_path / "ca.pem"
    if kind == "not-a-cert":
        ca.write_text("not a certificate\n")
    cfg = meta_config(tmp_path)
    cfg.client.ca_file = str(ca)
    assert reason.format(ca=ca) in serve_error(cfg)


def test_bad_tls_cert_file_is_a_config_error(tmp_path) -> None:
    pki = make_pki(tmp_path / "pki")
    missing = str(tmp_path / "nope.pem")
    err = serve_error(meta_config(tmp_path, tls_cert_file=missing, tls_key_file=pki["server_key"]))
    assert f"cannot read meta.tls_cert_file {missing}" in err and "No such file or directory" in err
    junk = tmp_path / "junk.pem"
    junk.write_text("junk\n")
    err = serve_error(meta_config(tmp_path, tls_cert_file=str(junk), tls_key_file=pki["server_key"]))
    assert f"meta.tls_cert_file {junk}" in err and "not a usable PEM certificate" in err
