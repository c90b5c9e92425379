"""Shared fixtures: one real etcd per test session, a fresh key prefix per test."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster import Etcd, cluster, unique_prefix, wait_for


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory) -> Etcd:
    server = Etcd(tmp_path_factory.mktemp("etcd")).start()
    yield server
    server.stop()


@pytest.fixture
def etcd_config(etcd_server):
    from zstore.config import EtcdConfig
    return EtcdConfig(endpoints=[etcd_server.endpoint], prefix=unique_prefix(), timeout=5.0)


@pytest.fixture
async def etcd_client(etcd_config):
    from zstore import etcd
    c = etcd.client(etcd_config)
    await c.connect()
    yield c
    await c.delete_prefix(etcd_config.prefix.encode() + b"/")
    await c.close()


SMALL_REPLY = 32 * 1024     # small_client's largest reply: a few hundred records pass it


@pytest.fixture
async def small_client(etcd_config, etcd_client):
    """A client refusing replies over SMALL_REPLY bytes, as gRPC refuses any over 4 MiB: a
    listing that is not paged fails with a few hundred records instead of ~13k extents
    (etcd_client cleans the prefix up)."""
    from zstore import etcd
    c = etcd.Client(etcd._targets(etcd_config.endpoints), timeout=etcd_config.timeout,
                    options={"grpc.max_receive_message_length": SMALL_REPLY})
    await c.connect()
    yield c
    await c.close()


@pytest.fixture
def meta_cluster(tmp_path: Path, etcd_server):
    """One meta server, no chunk servers; yielded once it leads (writes need a leader, and
    a loaded machine can take a few seconds to elect one)."""
    with cluster(tmp_path, etcd_server, metas=1) as c:
        wait_for(lambda: c.api("GET", "/meta/leader")[0] == 200, 30, "a meta leader")
        yield c
