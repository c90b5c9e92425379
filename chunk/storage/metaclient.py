"""The chunk server's client of the meta leader's JSON API (extent allocation, drop, join).

Chunk servers find the leader in etcd (its ``LeaderRecord.url``) rather than
in config, so a meta failover needs no chunk-side change. Calls retry on 503
and connection errors for a bounded time: a write waiting on a replica drop
must ride out a leader election (a few seconds), never hang forever.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp

from zstore.cli.client import tls_context
from zstore.keys import Keys
from zstore.records import LeaderRecord, RecordError

log = logging.getLogger(__name__)


class MetaError(Exception):
    def __init__(self, status: int, message: str, data: Any = None) -> None:
        super().__init__(f"meta answered {status}: {message}")
        self.status = status
        self.data = data


class MetaClient:
    def __init__(self, etcd, keys: Keys, token: str | None, ca_file: str | None = None,
                 retry_for: float = 15.0) -> None:
        self.etcd, self.keys, self.token = etcd, keys, token
        self.retry_for = retry_for
        self._ssl = tls_context(ca_file) if ca_file else None     # ConfigError if unusable
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    async def _leader_url(self) -> str | None:
        got = await self.etcd.get(self.keys.leader())
        if got is None:
            return None
        try:
            return LeaderRecord.decode(got.value).url.rstrip("/")
        except RecordError:
            return None

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        """JSON result of ``method /api/v1{path}``; MetaError for a definite refusal, and for
        a client closed before or during the call (503: a stopping server's, nothing refused)."""
        if self._closed:
            raise MetaError(503, "meta client closed (this server is stopping)")
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        session = self._session
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_for
        last = "no meta leader"
        while True:
            url = await self._leader_url()
            if self._closed:
                raise MetaError(503, "meta client closed (this server is stopping)")
            if url:
                try:
                    async with session.request(method, f"{url}/api/v1{path}", json=body,
                                                     headers=headers, ssl=self._ssl) as r:
                        data = await r.json(content_type=None)
                        if r.status < 300:
                            return data
                        msg = data.get("error", {}).get("message", str(data)) if isinstance(data, dict) else str(data)
                        if r.status != 503:
                            raise MetaError(r.status, msg, data)
                        last = msg
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, RuntimeError) as e:
                    if self._closed:        # the session closed under the request
                        raise MetaError(503, "meta client closed (this server is stopping)") from None
                    if isinstance(e, RuntimeError):
                        raise
                    last = f"{type(e).__name__}: {e}"
            if loop.time() >= deadline:
                raise MetaError(503, f"meta unreachable for {self.retry_for:.0f}s: {last}")
            await asyncio.sleep(0.3)
            if self._closed:
                raise MetaError(503, "meta client closed (this server is stopping)")

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None
