"""Follow this chunk server's admin record, so ``zstore chunk drain`` moves initiators off.

The meta leader writes ``chunks/{id}/admin`` (``ChunkAdmin``); the chunk server
watches it and hands each change of ``state`` to a callback (the iSCSI
target's ``set_draining``). The record also changes for other reasons (the
leader's ``down_since`` bookkeeping), so only changes of state are passed on.
A watch that breaks lists again (``zstore.etcd.watch_prefix``), so a drain
issued while etcd was unreachable still arrives.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import aetcd

from zstore import etcd as zetcd
from zstore.keys import Keys
from zstore.records import ChunkAdmin, RecordError

log = logging.getLogger(__name__)

ACTIVE = "active"


class AdminFollower:
    """Mirror of one chunk server's admin state; ``on_state(state)`` on each change."""

    def __init__(self, etcd: aetcd.Client, keys: Keys, chunk_id: str,
                 on_state: Callable[[str], None]) -> None:
        self.etcd, self.key = etcd, keys.chunk_admin(chunk_id)
        self.on_state = on_state
        self.state = ACTIVE

    async def run(self, stop: asyncio.Event) -> None:
        await zetcd.watch_prefix(self.etcd, self.key, self._on_snapshot, self._on_event, stop)

    async def _on_snapshot(self, kvs: list[tuple[bytes, bytes]]) -> None:
        self._apply(next((v for k, v in kvs if k == self.key), None))

    async def _on_event(self, ev) -> None:
        if ev.kv.key == self.key:
            self._apply(ev.kv.value if ev.kind == "PUT" else None)

    def _apply(self, raw: bytes | None) -> None:
        state = ACTIVE
        if raw is not None:
            try:
                state = ChunkAdmin.decode(raw).state
            except RecordError as e:
                log.error("ignoring unreadable admin record: %s", e)
                return
        if state != self.state:
            log.info("admin state %s -> %s", self.state, state)
            self.state = state
            self.on_state(state)
