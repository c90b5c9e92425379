"""What this chunk server may export, mirrored from etcd by watches.

Every chunk server can serve every target and LUN, so each keeps a local
copy of the export state — targets, LUN mappings, volumes, snapshots, ACLs
and CHAP credentials — and follows changes through etcd watches. Logins and commands
consult only this copy (dict look-ups): no etcd or meta round trip per I/O or
per login, and ACL changes apply to the very next command.

A LUN resolves to a ``LunExport``: a volume (read-only if its ACL entry or
mapping says so), or a snapshot exported read-only — the snapshot's volume
viewed at the snapshot's ``seq``, with the snapshot's own WWN, serial and size
(docs/storage.md). A snapshot LUN's ACL is keyed by the snapshot id.

The mirror fails closed. A server cut off from etcd cannot learn that an ACL was
revoked, so once the mirror has not been confirmed current for ``stale_after``
seconds (the chunk server's lease TTL: by then its live key is gone and the cluster
counts it down) it is *stale*: ``synced`` is False (logins are refused as retryable,
0x0301) and the target answers commands NOT READY, until a fresh full listing of every
section, started after the staleness, brings it back. Confirmed current means: every
section's watch is open (``zetcd.watch_prefix``'s status) and a linearizable read
through the same client succeeded since; a hung etcd (or one cut off from its quorum)
fails the read well before gRPC's keepalive would fail the watches.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, NamedTuple

import aetcd

from zstore import etcd as zetcd
from zstore import logs, naming
from zstore.keys import Keys
from zstore.records import AclEntry, ChapRecord, LunMapping, RecordError, Snapshot, Target, Volume

log = logging.getLogger(__name__)


class LunExport(NamedTuple):
    """What one LUN serves to one initiator (indexable as (volume, readonly, ...))."""
    volume: Volume
    readonly: bool
    view_seq: int = 0                # > 0: the volume as of this snapshot seq (a snapshot LUN)
    wwn: str = ""
    serial: str = ""
    size: int = 0
    lun: int = 0
    snapshot_id: str | None = None

    @property
    def unit_key(self) -> tuple[str, int, bool]:
        """One LogicalUnit per (volume id, view seq, read-only), shared by every session."""
        return self.volume.volume_id, self.view_seq, self.readonly

    @property
    def export_id(self) -> str:
        """The snapshot id of a snapshot LUN, else the volume id (names its backstore, ACL)."""
        return self.snapshot_id or self.volume.volume_id


class Catalog:
    def __init__(self, etcd: aetcd.Client, keys: Keys, *, stale_after: float | None = 5.0):
        self.etcd, self.keys = etcd, keys
        self.stale_after = stale_after   # None: never stale (tools reading a one-off mirror)
        self.targets: dict[str, Target] = {}                 # iqn -> Target
        self._target_by_index: dict[int, Target] = {}
        self.luns: dict[tuple[int, int], LunMapping] = {}    # (target index, lun) -> mapping
        self.volumes: dict[str, Volume] = {}                 # volume id -> Volume
        self.snapshots: dict[str, Snapshot] = {}             # snapshot id -> Snapshot
        self.acl: dict[str, dict[str, AclEntry]] = {}        # volume or snapshot id -> initiator -> entry
        self.chap: dict[tuple[str, str], ChapRecord] = {}    # (target iqn | '*', initiator) -> creds
        self._raw: dict[str, dict[bytes, bytes]] = {}
        self.generation = 0          # bumped on every change: lets readers cache what they derived
        self._listeners: list[Callable[[str], None]] = []
        self._synced: dict[str, asyncio.Event] = {}
        self._tasks: list[asyncio.Task] = []
        self._relist: dict[str, asyncio.Event] = {}   # per section: list afresh
        self._watching: dict[str, bool] = {}        # per section: its watch is open
        self._confirmed = 0.0                       # loop time the mirror was last known current
        self.stale = False
        self._relisted: set[str] = set()            # sections listed afresh since going stale


    # -- queries (hot: called per login / per command) -------------------------

    def target(self, iqn: str) -> Target | None:
        return self.targets.get(iqn)

    def resolve(self, m: LunMapping, entry: AclEntry | None = None) -> LunExport | None:
        """What mapping ``m`` serves (read-only as ``entry`` says), or None if it serves nothing
        now: its volume is gone or deleted, or its snapshot is gone or not ready."""
        vol = self.volumes.get(m.volume_id)
        if vol is None or vol.state == "deleted":
            return None
        if m.snapshot_id is None:
            return LunExport(vol, bool(m.readonly or (entry is not None and entry.readonly)), 0,
                             vol.wwn, vol.volume_id[:32], vol.size, m.lun)
        snap = self.snapshots.get(m.snapshot_id)
        if snap is None or snap.state != "ready" or snap.seq <= 0 or snap.volume_id != vol.volume_id:
            return None
        return LunExport(vol, True, snap.seq, naming.snapshot_wwn(snap.snapshot_id), snap.snapshot_id[:32],
                         snap.size, m.lun, snap.snapshot_id)

    def _access(self, m: LunMapping, initiator: str) -> LunExport | None:
        entry = self.acl.get(m.snapshot_id or m.volume_id, {}).get(initiator.lower())
        return None if entry is None else self.resolve(m, entry)

    def visible_luns(self, target_iqn: str, initiator: str) -> dict[int, LunExport]:
        """LUN number -> what it serves, for the LUNs this initiator may see on this target."""
        t = self.targets.get(target_iqn)
        if t is None:
            return {}
        out = {}
        for (ti, lun), m in self.luns.items():
            if ti == t.index:
                ex = self._access(m, initiator)
                if ex is not None:
                    out[lun] = ex
        return dict(sorted(out.items()))

    def lun_access(self, target_iqn: str, initiator: str, lun: int) -> LunExport | None:
        """What this LUN serves if this initiator may use it right now, else None."""
        t = self.targets.get(target_iqn)
        if t is None:
            return None
        m = self.luns.get((t.index, lun))
        return None if m is None else self._access(m, initiator)

    def visible_targets(self, initiator: str) -> list[str]:
        """Targets with at least one LUN this initiator may see (SendTargets answers only these)."""
        initiator = initiator.lower()
        allowed = {xid for xid, entries in self.acl.items() if initiator in entries}
        idx = {ti for (ti, _), m in self.luns.items() if (m.snapshot_id or m.volume_id) in allowed}
        return sorted(self._target_by_index[i].iqn for i in idx if i in self._target_by_index)

    def chap_for(self, target_iqn: str, initiator: str) -> ChapRecord | None:
        """Credentials for this pair: the target's own first, then the cluster-wide ('*') ones."""
        initiator = initiator.lower()
        for key in ((target_iqn, initiator), ("*", initiator), (target_iqn, "*"), ("*", "*")):
            rec = self.chap.get(key)
            if rec is not None:
                return rec
        return None

    @property
    def synced(self) -> bool:
        """Every section has had its first full listing, and the mirror is not stale. Before
        that the mirror is partial (a target without its LUNs or ACLs, or nothing at all), so
        answers from it are wrong; stale, it may hold what an admin has since revoked."""
        return (not self.stale and len(self._synced) == len(self._sections())
                and all(e.is_set() for e in self._synced.values()))

    def on_change(self, fn: Callable[[str], None]) -> None:
        """Call ``fn(kind)`` after each change (kind: targets|luns|volumes|snapshots|acl|chap)."""
        self._listeners.append(fn)

    # -- mirroring -------------------------------------------------------------

    def _sections(self) -> dict[str, bytes]:
        k = self.keys
        return {"targets": k.targets(), "luns": k.luns(), "volumes": k.volumes(),
                "snapshots": k.snapshots(), "acl": k.acls(), "chap": k.chaps()}

    def _rebuild(self, kind: str) -> None:
        raw = self._raw.get(kind, {})

        def decode(cls, v):
            try:
                return cls.decode(v)
            except RecordError as e:
                log.error("ignoring unreadable %s record: %s", kind, e)
                return None

        if kind == "targets":
            ts = [t for t in (decode(Target, v) for v in raw.values()) if t]
            self.targets = {t.iqn: t for t in ts}
            self._target_by_index = {t.index: t for t in ts}
        elif kind == "luns":
            ms = [m for m in (decode(LunMapping, v) for v in raw.values()) if m]
            self.luns = {(m.target_index, m.lun): m for m in ms}
        elif kind == "volumes":
            vs = [v for v in (decode(Volume, v) for v in raw.values()) if v]
            self.volumes = {v.volume_id: v for v in vs}
        elif kind == "snapshots":
            ss = [x for x in (decode(Snapshot, v) for v in raw.values()) if x]
            self.snapshots = {x.snapshot_id: x for x in ss}
        elif kind == "acl":
            acl: dict[str, dict[str, AclEntry]] = {}
            for v in raw.values():
                e = decode(AclEntry, v)
                if e:
                    # iSCSI names are case-insensitive (RFC 3722): keyed and looked up lower-case
                    acl.setdefault(e.export_id, {})[e.initiator.lower()] = e
            self.acl = acl
        elif kind == "chap":
            chap = {}
            for v in raw.values():
                c = decode(ChapRecord, v)
                if c:
                    logs.redact(c.secret)
                    logs.redact(c.mutual_secret)
                    chap[(c.target, c.initiator.lower())] = c
            self.chap = chap
        self.generation += 1
        for fn in self._listeners:
            try:
                fn(kind)
            except Exception:  # noqa: BLE001 - a listener must not break mirroring
                log.exception("catalog listener failed")

    async def start(self, stop: asyncio.Event) -> None:
        """Start mirroring; returns once every section has its first full listing."""
        for kind, prefix in self._sections().items():
            self._synced[kind] = asyncio.Event()
            self._relist[kind] = asyncio.Event()
            self._watching[kind] = False
            self._tasks.append(asyncio.ensure_future(self._follow(kind, prefix, stop)))
        await asyncio.gather(*(e.wait() for e in self._synced.values()))
        self._confirmed = asyncio.get_running_loop().time()
        if self.stale_after is not None:
            self._tasks.append(asyncio.ensure_future(self._keep_confirmed(stop)))

    async def _follow(self, kind: str, prefix: bytes, stop: asyncio.Event) -> None:
        relist = self._relist[kind]

        def on_status(ok: bool) -> None:
            self._watching[kind] = ok

        async def on_snapshot(kvs):
            self._raw[kind] = dict(kvs)
            self._rebuild(kind)
            self._synced[kind].set()
            # Stale: only a listing begun after the catalog went stale counts (``relist`` is
            # cleared as a listing begins, set when the catalog goes stale).
            if self.stale and not relist.is_set():
                self._relisted.add(kind)
                if self._relisted >= set(self._sections()):
                    self._resynced()

        async def on_event(ev):
            raw = self._raw.setdefault(kind, {})
            if ev.kind == "PUT":
                raw[ev.kv.key] = ev.kv.value
            else:
                raw.pop(ev.kv.key, None)
            self._rebuild(kind)

        await zetcd.watch_prefix(self.etcd, prefix, on_snapshot, on_event, stop,
                                 on_status=on_status, relist=relist)

    # -- staleness ---------------------------------------------------------------

    async def _keep_confirmed(self, stop: asyncio.Event) -> None:
        """Confirm the mirror current every ``stale_after``/5 s; mark it stale when it has not
        been for ``stale_after`` s."""
        loop = asyncio.get_running_loop()
        bound = self.stale_after
        interval = max(0.05, bound / 5)
        probe: asyncio.Task | None = None
        try:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), interval)
                    break
                except asyncio.TimeoutError:
                    pass
                if probe is None or probe.done():
                    probe = asyncio.ensure_future(self._probe(bound))
                if not self.stale and loop.time() - self._confirmed > bound:
                    self._go_stale(loop.time() - self._confirmed)
        finally:
            if probe is not None:
                probe.cancel()

    async def _probe(self, timeout: float) -> None:
        """A linearizable read through the watches' client: while every watch stays open
        across it, the mirror was current when it was sent."""
        loop = asyncio.get_running_loop()
        sent = loop.time()
        if self.stale or not all(self._watching.get(k) for k in self._sections()):
            return
        try:
            await asyncio.wait_for(self.etcd.get(self.keys.targets()), timeout)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - not confirmed: staleness is the answer
            log.debug("export catalog: etcd did not confirm the mirror: %s", e)
            return
        if not self.stale and all(self._watching.get(k) for k in self._sections()):
            self._confirmed = max(self._confirmed, sent)

    def _go_stale(self, age: float) -> None:
        log.warning("export catalog: not confirmed current with etcd for %.1fs (bound %.1fs): "
                    "stale; logins refused as retryable and commands answered NOT READY until "
                    "every section is listed afresh", age, self.stale_after)
        self.stale = True
        self._relisted = set()
        self.generation += 1           # per-session caches must not answer from before
        for e in self._relist.values():   # a hung watch may never fail: list and watch anew
            e.set()

    def _resynced(self) -> None:
        self.stale = False
        self._relisted = set()
        self._confirmed = asyncio.get_running_loop().time()
        self.generation += 1
        log.warning("export catalog: listed afresh from etcd; current again")

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
