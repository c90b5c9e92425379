"""Fixtures shared by the storage tests."""

from __future__ import annotations

import pytest

from zstore.keys import Keys

from .replica_nodes import Nodes


@pytest.fixture
async def nodes(tmp_path, etcd_client, etcd_config):
    """Chunk-server stand-ins (stores, replica servers, clients) over the test etcd."""
    n = Nodes(tmp_path, etcd_client, Keys(etcd_config.prefix))
    try:
        yield n
    finally:
        await n.close()
