"""Deleting sticky redirect records that no login can use any more.

Records are written behind logins and never rewritten once they stick, so without this
they would pile up in etcd (and in every redirector's mirror) for ever. A record is
deleted when:

- its key is not the canonical one (the lower-case initiator name; records written
  before names were lower-cased): a canonical record replaces it at the next login;
- its target is gone;
- its initiator sees no LUN on its target any more (no ACL entry left there): the rule
  under which it is written (``RedirectPolicy.redirect``), so one would not be written now;
- its chunk server was removed from the cluster (no key of it left; a server that is
  merely down keeps its records, it may come back).

Only the VIP holder sweeps (one writer, not one per redirector), one page of records per
pass, first at once after taking the VIP, then every ``interval``. It judges by its
mirrors, never while the catalog mirror is stale, and deletes a record only if it is
unchanged since read (compared on its mod revision), so a choice written meanwhile stays.
"""

from __future__ import annotations

import asyncio
import heapq
import logging

import aetcd

from chunk.catalog import Catalog
from zstore.keys import Keys
from zstore.records import RecordError, RedirectRecord

from .members import Members

log = logging.getLogger(__name__)

SWEEP_INTERVAL = 60.0       # seconds between passes
SWEEP_PAGE = 100            # records looked at per pass


class RedirectSweeper:
    def __init__(self, etcd: aetcd.Client, keys: Keys, catalog: Catalog, members: Members,
                 interval: float = SWEEP_INTERVAL, page: int = SWEEP_PAGE):
        self.etcd, self.keys, self.catalog, self.members = etcd, keys, catalog, members
        self.interval, self.page = interval, page

    async def run(self) -> None:
        """Sweep page after page until cancelled; an etcd error only skips a pass."""
        cursor = b""
        while True:
            try:
                cursor = await self.sweep_page(cursor)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - etcd down: the next pass tries again
                log.warning("sweeping redirect records failed (%s); next pass in %.0fs", e, self.interval)
            await asyncio.sleep(self.interval)

    async def sweep_page(self, cursor: bytes) -> bytes:
        """Look at the page of mirrored record keys after ``cursor``; returns the next cursor
        (b"" once the last page is done: the next pass starts over)."""
        if self.catalog.stale:
            return cursor
        page = heapq.nsmallest(self.page, (k for k in self.members.redirect_keys() if k > cursor))
        for key in page:
            rec = self.members.redirect_at(key)
            if rec is None or self.stale_reason(key, rec):      # None: a non-canonical key
                await self._delete_if_stale(key)
        return page[-1] if len(page) == self.page else b""

    def stale_reason(self, key: bytes, rec: RedirectRecord) -> str | None:
        """Why no login can use this record any more; None if one can."""
        if key != self.keys.redirect(rec.target, rec.initiator.lower()):
            return "its key is not the lower-case initiator name"
        if self.catalog.target(rec.target) is None:
            return "its target is gone"
        if not self.catalog.visible_luns(rec.target, rec.initiator):
            return "its initiator has no ACL entry left on the target"
        if rec.chunk_id not in self.members.chunks:
            return f"chunk server {rec.chunk_id} was removed"
        return None

    async def _delete_if_stale(self, key: bytes) -> None:
        """Judge the record as stored now; delete it unless it changed since."""
        got = await self.etcd.get(key)
        if got is None:
            return
        try:
            rec = RedirectRecord.decode(got.value)
        except RecordError:
            return                  # not ours to judge (a newer schema?)
        why = self.stale_reason(key, rec)
        if why is None:
            return
        t = self.etcd.transactions
        deleted, _ = await self.etcd.transaction(compare=[t.mod(key) == got.mod_revision],
                                                 success=[t.delete(key)], failure=[])
        if deleted:
            log.info("deleted redirect record %s -> %s (chunk %s): %s", rec.initiator, rec.target,
                     rec.chunk_id, why)
