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


@pytest.fixture
def meta_cluster(tmp_path: Path, etcd_server):
    """One meta server, no chunk servers; yielded once it leads (writes need a leader, and
    a loaded machine can take a few seconds to elect one)."""
    with cluster(tmp_path, etcd_server, metas=1) as c:
        wait_for(lambda: c.api("GET", "/meta/leader")[0] == 200, 30, "a meta leader")
        yield c
