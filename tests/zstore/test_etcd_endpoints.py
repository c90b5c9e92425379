"""Every configured etcd endpoint is used: a dead first member (named by hostname, IPv4
address, or either) costs a call nothing but a failover to the next one."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from zstore import etcd as zetcd
from zstore.config import EtcdConfig


def dead_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_endpoint_becomes_a_target():
    eps = ["http://zstore-etcd-0.zstore-etcd:2379", "zstore-etcd-1.zstore-etcd:2379/",
           "https://10.0.0.3:2379", "[fd00::4]:2379"]
    targets = zetcd._targets(eps)
    for host in ("zstore-etcd-0.zstore-etcd:2379", "zstore-etcd-1.zstore-etcd:2379",
                 "10.0.0.3:2379", "[fd00::4]:2379"):
        assert any(host in t for t in ([targets] if isinstance(targets, str) else targets)), \
            f"{host} is not used: {targets!r}"


async def _get_within(endpoints: list[str], etcd_client, seconds: float):
    key = b"/endpoints-test/" + str(time.monotonic_ns()).encode()
    await etcd_client.put(key, b"v")
    c = zetcd.client(EtcdConfig(endpoints=endpoints, timeout=3.0))
    try:
        t0 = time.monotonic()
        got = await asyncio.wait_for(c.get(key), seconds)
        assert got is not None and got.value == b"v"
        await asyncio.wait_for(c.put(key + b"/2", b"w"), seconds)     # and it stays usable
        assert time.monotonic() - t0 < seconds
    finally:
        await c.close()
        await etcd_client.delete(key)
        await etcd_client.delete(key + b"/2")


async def test_hostname_endpoints_with_the_first_dead(etcd_server, etcd_client):
    await _get_within([f"localhost:{dead_port()}", f"localhost:{etcd_server.client_port}"],
                      etcd_client, 5)


async def test_ipv4_endpoints_with_the_first_dead(etcd_server, etcd_client):
    await _get_within([f"127.0.0.1:{dead_port()}", etcd_server.endpoint], etcd_client, 5)


async def test_a_watch_follows_the_failover(etcd_server, etcd_client):
    """A client whose first endpoint is dead still mirrors a prefix (list, then watch)."""
    prefix = b"/endpoints-watch-" + str(time.monotonic_ns()).encode() + b"/"
    c = zetcd.client(EtcdConfig(endpoints=[f"localhost:{dead_port()}",
                                           f"localhost:{etcd_server.client_port}"], timeout=3.0))
    stop = asyncio.Event()
    seen: list[bytes] = []
    ready = asyncio.Event()

    async def on_snapshot(kvs):
        seen.extend(k for k, _ in kvs)

    async def on_event(ev):
        seen.append(ev.kv.key)

    task = asyncio.ensure_future(zetcd.watch_prefix(c, prefix, on_snapshot, on_event, stop,
                                                    retry_delay=0.2,
                                                    on_status=lambda ok: ok and ready.set()))
    try:
        await asyncio.wait_for(ready.wait(), 5)
        await etcd_client.put(prefix + b"a", b"1")
        deadline = time.monotonic() + 5
        while prefix + b"a" not in seen and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert prefix + b"a" in seen
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        await c.close()
        await etcd_client.delete_prefix(prefix)


async def test_every_call_asks_for_a_member_with_a_leader(etcd_config):
    c = zetcd.client(etcd_config)
    try:
        await c.connect()
        assert ("hasleader", "true") in tuple(c.metadata or ())
    finally:
        await c.close()


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory):
    from tests.certs import make_pki
    from tests.cluster import Etcd
    d = tmp_path_factory.mktemp("tls-endpoints")
    pki = make_pki(d / "pki")
    server = Etcd(d, tls={"ca_file": pki["ca_file"], "cert_file": pki["server_cert"],
                          "key_file": pki["server_key"]}).start()
    yield server, pki
    server.stop()


async def test_tls_hostname_endpoints_with_the_first_dead(tls_etcd):
    """Over mutual TLS the server's name is still verified: its certificate names
    ``localhost``, the endpoint it is reached by."""
    server, pki = tls_etcd
    c = zetcd.client(EtcdConfig(endpoints=[f"localhost:{dead_port()}", f"localhost:{server.client_port}"],
                                ca_file=pki["ca_file"], cert_file=pki["client_cert"],
                                key_file=pki["client_key"], timeout=3.0))
    try:
        await asyncio.wait_for(c.put(b"/tls-endpoints/k", b"v"), 5)
        assert (await asyncio.wait_for(c.get(b"/tls-endpoints/k"), 5)).value == b"v"
    finally:
        await c.close()
