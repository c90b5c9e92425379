"""Mutual TLS to a real etcd started with certificates made here."""

import pytest

from tests.certs import make_pki
from tests.cluster import Etcd
from zstore import etcd as zetcd
from zstore.config import EtcdConfig


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls-etcd")
    pki = make_pki(d / "pki")
    server = Etcd(d, tls={"ca_file": pki["ca_file"], "cert_file": pki["server_cert"],
                          "key_file": pki["server_key"]}).start()
    yield server, pki
    server.stop()


async def test_mutual_tls_client_reads_and_writes(tls_etcd):
    server, pki = tls_etcd
    cfg = EtcdConfig(endpoints=[server.endpoint], ca_file=pki["ca_file"], cert_file=pki["client_cert"],
                     key_file=pki["client_key"], timeout=5)
    c = zetcd.client(cfg)
    try:
        await c.put(b"/tls/k", b"v")
        assert (await c.get(b"/tls/k")).value == b"v"
        ok, _ = await c.transaction(compare=[c.transactions.version(b"/tls/k") > 0],
                                    success=[c.transactions.put(b"/tls/k2", b"w")], failure=[])
        assert ok and (await c.get(b"/tls/k2")).value == b"w"
    finally:
        await c.close()


async def test_client_without_certificate_is_refused(tls_etcd):
    server, pki = tls_etcd
    c = zetcd.client(EtcdConfig(endpoints=[server.endpoint], ca_file=pki["ca_file"], timeout=3))
    try:
        with pytest.raises(Exception):
            await c.put(b"/tls/nocert", b"v")
    finally:
        await c.close()


async def test_plaintext_client_cannot_talk_to_tls_etcd(tls_etcd):
    server, _ = tls_etcd
    c = zetcd.client(EtcdConfig(endpoints=[server.endpoint], timeout=3))
    try:
        with pytest.raises(zetcd.UNAVAILABLE_ERRORS + (Exception,)):
            await c.get(b"/tls/k")
    finally:
        await c.close()


def test_cert_without_key_is_a_config_error():
    from zstore.config import ConfigError
    with pytest.raises(ConfigError):
        zetcd.client(EtcdConfig(endpoints=["127.0.0.1:1"], ca_file="/x", cert_file="/y"))
