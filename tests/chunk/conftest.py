"""Fixtures shared by the chunk server's tests."""

import asyncio

import pytest

from chunk.catalog import Catalog
from tests.meta.helpers import make_ctx, register_chunk


@pytest.fixture
async def catalog_setup(etcd_client, etcd_config):
    """A meta context with one registered chunk server, and a started Catalog mirroring its etcd
    (used by test_catalog.py and test_lio.py: the LIO state is computed from the same mirror)."""
    ctx = make_ctx(etcd_client, etcd_config)
    await register_chunk(ctx, "c0")
    stop = asyncio.Event()
    cat = Catalog(etcd_client, ctx.keys)
    await cat.start(stop)
    yield ctx, cat
    stop.set()
    await cat.close()
