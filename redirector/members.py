"""Which chunk server a login goes to: live membership + sticky choices, mirrored from etcd.

Two prefixes are followed by watches (``zetcd.watch_prefix``: list, watch,
relist on failure): ``chunks/`` (info/live/admin of each chunk server, combined
the way ``meta/chunks.py`` does: up = the live key exists, draining = admin
state; a live record marked ``stopping`` takes no new logins) and
``redirects/`` (the sticky RedirectRecords). ``choose()`` is then a
pair of dict look-ups and at most one hash: no etcd round trip per login, so
a login storm after a failover costs etcd nothing but the record writes.

Sticky first: an initiator keeps going to the chunk server it was sent to
while that server is up and not draining, so adding a chunk server does not
move existing sessions on their next reconnect. Otherwise the rendezvous hash
picks among those servers and the choice is recorded. The record is written
behind the login (coalesced per pair, batched, retried), never awaited: a
record is only a hint, re-validated against liveness at every use, so a lost
or late write at worst costs one re-pick, and it needs no fencing by the VIP
epoch either.

The VIP holder's portal probes (``probe.py``) divert logins but never write a
record. The choice above is made from etcd's view alone (lease, stopping,
draining); if its portal fails the probes, this login goes to the hash's pick
among the servers whose portals answer, and the record keeps its choice. The
probe only sees the holder's route, not the initiators': when it recovers (or
was wrong), the initiator lands back where it was rather than having been moved
for good. That is why a failing verdict is always obeyed, however many portals
fail: sending a login to a portal that does not answer is only right when none
does (then every up server takes logins, rather than every login refused). When
more than half fail, one WARNING says so (the holder's own network may be at
fault), but routing does not change: in a genuine outage of most portals, the
initiators must go to the ones that answer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass

import aetcd

from zstore import etcd as zetcd
from zstore.keys import Keys
from zstore.records import ChunkAdmin, ChunkInfo, ChunkLive, RecordError, RedirectRecord

from . import hashing

log = logging.getLogger(__name__)

WRITE_BATCH = 64            # puts per etcd transaction (etcd's default limit is 128 ops)
WRITE_RETRY = 1.0           # seconds before retrying failed record writes


@dataclass
class ChunkState:
    """One chunk server as the redirector sees it (records decoded; None = key absent)."""
    chunk_id: str
    info: ChunkInfo | None = None
    live: ChunkLive | None = None
    admin: ChunkAdmin | None = None

    @property
    def usable(self) -> bool:
        """May receive new logins: registered with a portal, up, not shutting down (its live
        key stays while it stops, but its listener is closing), not draining."""
        return (self.info is not None and bool(self.info.portal) and self.live is not None
                and not self.live.stopping
                and not (self.admin is not None and self.admin.state == "draining"))

    @property
    def portal(self) -> str:
        """Where initiators reach its target. A portal bound to every address
        (0.0.0.0, [::]) is reached at the chunk server's own address instead."""
        assert self.info is not None
        host, sep, port = self.info.portal.rpartition(":")
        try:
            wildcard = sep and ipaddress.ip_address(host.strip("[]")).is_unspecified
        except ValueError:
            wildcard = False
        if not wildcard or not self.info.address:
            return self.info.portal
        a = self.info.address
        return f"[{a}]:{port}" if ":" in a and not a.startswith("[") else f"{a}:{port}"


class Members:
    def __init__(self, etcd: aetcd.Client, keys: Keys):
        self.etcd, self.keys = etcd, keys
        self.chunks: dict[str, ChunkState] = {}
        self.redirects: dict[tuple[str, str], RedirectRecord] = {}     # (target, initiator) -> record
        self._up: list[str] = []                                # usable by their etcd records
        self._usable: list[str] = []                            # ... and probes not against them
        self._unreachable: set[str] = set()                     # portal probes fail (probe.py)
        self._most_fail = False                                 # > half fail: warned (only)
        self._raw_chunks: dict[str, dict[str, bytes]] = {}      # chunk id -> kind -> value
        self._redirect_keys: dict[bytes, tuple[str, str]] = {}
        self._pending: dict[tuple[str, str], RedirectRecord] = {}
        self._wake = asyncio.Event()
        self._synced = {"chunks": asyncio.Event(), "redirects": asyncio.Event()}
        self._tasks: list[asyncio.Task] = []

    # -- the decision (hot: once per login) ------------------------------------------

    def usable(self) -> list[str]:
        """Ids of chunk servers that may take new logins now."""
        return list(self._usable)

    def set_unreachable(self, cids: set[str]) -> None:
        """Chunk servers whose portal the VIP holder cannot reach (``probe.PortalProber``):
        their logins are diverted, their records kept (unless none answers: see
        ``_refresh_usable``)."""
        for cid in sorted(cids - self._unreachable):
            log.warning("chunk server %s: its portal fails this redirector's probes", cid)
        for cid in sorted(self._unreachable - cids):
            log.info("chunk server %s: its portal answers this redirector's probes again", cid)
        self._unreachable = set(cids)
        self._refresh_usable()

    def choose(self, initiator: str, target: str, record: bool = True) -> str | None:
        """Portal ("host:port") to redirect this login to, None if no chunk server is usable.

        ``record=False`` picks without writing a record: the caller passes it for
        initiators that may see nothing on the target, so that made-up initiator
        names cannot fill etcd with records.

        iSCSI names are case-insensitive, lower case canonical (RFC 3722; the catalog's ACLs
        match them so): the hash, the record and its key use the lower-case name, so case
        variants of one allowed name go to one chunk server and share one record."""
        initiator = initiator.lower()
        rec = self.redirects.get((target, initiator))
        if rec is not None and rec.chunk_id in self._up:
            cid, why = rec.chunk_id, "sticky"
        else:
            cid = hashing.pick(initiator, target, self._up)
            if cid is None:
                log.warning("redirect %s -> %s: no chunk server is up and active", initiator, target)
                return None
            why = f"hashed; was {rec.chunk_id}, now unusable" if rec else "hashed"
            if record:
                self._remember(RedirectRecord(target=target, initiator=initiator, chunk_id=cid))
        if cid not in self._usable:         # up, but its portal fails the probes: this login only
            why = f"chunk {cid} ({why}) fails portal probes; diverted, its record kept"
            cid = hashing.pick(initiator, target, self._usable)
            assert cid is not None          # _refresh_usable never leaves it empty while one is up
        c = self.chunks[cid]
        log.info("redirect %s -> %s: chunk %s at %s (%s)", initiator, target, cid, c.portal, why)
        return c.portal

    def _remember(self, rec: RedirectRecord) -> None:
        self.redirects[(rec.target, rec.initiator)] = rec
        self._pending[(rec.target, rec.initiator)] = rec
        self._wake.set()

    # -- lifecycle ------------------------------------------------------------------

    async def start(self, stop: asyncio.Event) -> None:
        """Start mirroring and the record writer; returns after both first listings."""
        self._tasks += [
            asyncio.ensure_future(zetcd.watch_prefix(self.etcd, self.keys.chunks(), self._chunks_snapshot,
                                                     self._chunks_event, stop)),
            asyncio.ensure_future(zetcd.watch_prefix(self.etcd, self.keys.redirects(),
                                                     self._redirects_snapshot, self._redirects_event, stop)),
            asyncio.ensure_future(self._writer(stop)),
        ]
        await asyncio.gather(*(e.wait() for e in self._synced.values()))

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    # -- chunk servers ----------------------------------------------------------------

    async def _chunks_snapshot(self, kvs: list[tuple[bytes, bytes]]) -> None:
        self._raw_chunks, self.chunks = {}, {}
        for key, value in kvs:
            self._set_raw(key, value)
        for cid in list(self._raw_chunks):
            self._rebuild(cid)
        self._refresh_usable()
        self._synced["chunks"].set()

    async def _chunks_event(self, ev) -> None:
        cid = self._set_raw(ev.kv.key, ev.kv.value if ev.kind == "PUT" else None)
        if cid is not None:
            self._rebuild(cid)
            self._refresh_usable()

    def _set_raw(self, key: bytes, value: bytes | None) -> str | None:
        """Store (or with None, drop) one chunks/ value; returns its chunk id."""
        parts = self.keys.chunk_key_parts(key, self.keys.chunks())
        if parts is None:
            return None
        cid, kind = parts
        if value is not None:
            self._raw_chunks.setdefault(cid, {})[kind] = value
        elif cid in self._raw_chunks:
            self._raw_chunks[cid].pop(kind, None)
        return cid

    def _rebuild(self, cid: str) -> None:
        state = ChunkState(cid)
        raw_kinds = self._raw_chunks.get(cid, {})
        for kind, cls in (("info", ChunkInfo), ("live", ChunkLive), ("admin", ChunkAdmin)):
            raw = raw_kinds.get(kind)
            if raw is None:
                continue
            try:
                setattr(state, kind, cls.decode(raw))
            except RecordError as e:
                log.error("ignoring unreadable %s record of chunk server %s: %s", kind, cid, e)
        if not raw_kinds:
            self.chunks.pop(cid, None)
            self._raw_chunks.pop(cid, None)
        else:
            self.chunks[cid] = state

    def _refresh_usable(self) -> None:
        """Usable by their records and reachable. If none of those usable by their records
        is reachable, the fault is more likely this redirector's own network: all of them,
        rather than refusing every login. More than half failing is only reported (once per
        change): it may be this host's network, but it may be a real outage of most portals,
        and then the few that answer are the only ones the initiators can use."""
        up = sorted(cid for cid, c in self.chunks.items() if c.usable)
        failing = [cid for cid in up if cid in self._unreachable]
        most_fail = 2 * len(failing) > len(up)
        if most_fail != self._most_fail:        # once per change, not per login or pass
            if most_fail:
                log.warning("portals of %d of %d up chunk servers fail this redirector's probes "
                            "(if initiators do reach them, suspect this host's network); logins "
                            "go to those that answer, or to all if none does", len(failing), len(up))
            else:
                log.info("portals of most up chunk servers answer this redirector's probes again")
            self._most_fail = most_fail
        usable = [cid for cid in up if cid not in self._unreachable] or up
        if usable != self._usable:
            log.info("chunk servers taking logins: %s", ", ".join(usable) or "none")
        self._up, self._usable = up, usable

    # -- sticky records -------------------------------------------------------------

    async def _redirects_snapshot(self, kvs: list[tuple[bytes, bytes]]) -> None:
        self._redirect_keys, self.redirects = {}, {}
        for key, value in kvs:
            self._put_redirect(key, value)
        for pair, rec in self._pending.items():      # our own writes still on their way
            self.redirects[pair] = rec
        self._synced["redirects"].set()

    async def _redirects_event(self, ev) -> None:
        if ev.kind == "PUT":
            self._put_redirect(ev.kv.key, ev.kv.value)
        else:
            pair = self._redirect_keys.pop(ev.kv.key, None)
            if pair is not None and self._canonical(ev.kv.key, pair):
                self.redirects.pop(pair, None)

    def _put_redirect(self, key: bytes, value: bytes) -> None:
        """Only a record under its canonical key (lower-case initiator) steers logins; the
        others, written before names were lower-cased, are kept track of for the sweep."""
        try:
            rec = RedirectRecord.decode(value)
        except RecordError as e:
            log.error("ignoring unreadable redirect record %s: %s", key.decode(errors="replace"), e)
            return
        pair = (rec.target, rec.initiator.lower())
        self._redirect_keys[key] = pair
        if self._canonical(key, pair):
            self.redirects[pair] = rec

    def _canonical(self, key: bytes, pair: tuple[str, str]) -> bool:
        return key == self.keys.redirect(*pair)

    def redirect_keys(self) -> list[bytes]:
        """Keys of the readable records in etcd (``sweep.py`` pages through them)."""
        return list(self._redirect_keys)

    def redirect_at(self, key: bytes) -> RedirectRecord | None:
        """The record mirrored under ``key``; None if none or the key is not canonical."""
        pair = self._redirect_keys.get(key)
        return self.redirects.get(pair) if pair is not None and self._canonical(key, pair) else None

    async def _writer(self, stop: asyncio.Event) -> None:
        """Write remembered choices behind the logins: coalesced per pair, batched, retried."""
        while not stop.is_set():
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = list(self._pending.items())[:WRITE_BATCH]
                for pair, _ in batch:
                    del self._pending[pair]
                ops = [self.etcd.transactions.put(self.keys.redirect(*pair), rec.encode())
                       for pair, rec in batch]
                try:
                    await self.etcd.transaction(compare=[], success=ops, failure=[])
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - etcd down: keep the choices, retry
                    log.warning("could not record %d redirect choice(s) (%s); retrying", len(batch), e)
                    for pair, rec in batch:
                        self._pending.setdefault(pair, rec)   # a newer choice wins
                    await asyncio.sleep(WRITE_RETRY)
