"""The CSI plugin's view of the meta JSON API: the CLI's MetaClient, run off the event loop.

Reusing ``zstore.cli.client.MetaClient`` keeps one implementation of endpoint
failover, leader retries and token handling; a CSI call is a handful of small
requests, so a worker thread per call costs nothing that matters.
"""

from __future__ import annotations

import asyncio
from typing import Any

from zstore.cli.client import MetaClient, seg
from zstore.config import Config

__all__ = ["Meta", "seg"]


class Meta:
    def __init__(self, client: MetaClient):
        self.client = client

    @classmethod
    def from_config(cls, cfg: Config) -> "Meta":
        main = MetaClient.from_config(cfg.client, config_source=cfg.source)
        # A snapshot waits (up to 10 s) for the volume's coordinator to pass its write barrier.
        main.timeout = max(main.timeout, 30.0)
        return cls(main)

    async def get(self, path: str, **query: Any) -> Any:
        return await asyncio.to_thread(self.client.get, path, **query)

    async def post(self, path: str, body: Any = None) -> Any:
        return await asyncio.to_thread(self.client.post, path, body)

    async def put(self, path: str, body: Any = None) -> Any:
        return await asyncio.to_thread(self.client.put, path, body)

    async def delete(self, path: str, **query: Any) -> Any:
        return await asyncio.to_thread(self.client.delete, path, None, **query)
