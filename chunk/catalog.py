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

Each etcd event is applied alone: only the changed key is decoded, and indexes by
target (its LUNs), by export (the LUNs mapping a volume or snapshot), by volume and by
initiator (what it is on the ACL of) keep every query proportional to one target or
one initiator, never to the cluster (4096 targets x 255 LUNs). Listeners given
``on_delta`` learn which targets, initiators and volumes a change touched, so the
target re-checks only those sessions. Where two keys decode to the same entry (an ACL
entry stored under an initiator name in two cases), the one under the greater etcd key
is served: what a fresh, key-ordered listing gives.

The mirror fails closed. A server cut off from etcd cannot learn that an ACL was
revoked, so once the mirror has not been confirmed current for ``stale_after``
seconds (the chunk server's lease TTL: by then its live key is gone and the cluster
counts it down) it is *stale*: ``synced`` is False (logins are refused as retryable,
0x0301) and the target answers commands NOT READY, until a fresh full listing of every
section, started after the staleness, brings it back. Confirmed current means: every
section's watch is open (``zetcd.watch_prefix``'s status), a linearizable read
through the same client succeeded since, and every section's watch has since delivered
that read's revision: an event or a progress marker at or past it, asked for on the
watch stream after the read. A watch open but stalled delivers neither, so a revoked
ACL entry, a deleted key or a changed CHAP secret it holds back makes the mirror stale,
with no transfer that grows with the catalog. A hung etcd (or one cut off from its
quorum) fails the read well before gRPC's keepalive would fail the watches.

And every section's mirror holds as many keys as etcd did at the revision the mirror is
at (a Txn of count-only ranges: etcd counts in its in-memory index and answers six
numbers). etcd 3.4 answers a progress request with its store revision whatever each
watch's state inside it, so a watch stalled in etcd while its stream flows still gets
the marker; the count catches a key created or deleted there (not a put to an existing
key: nothing cheap does), and the section is listed afresh, which ends that watch, so
the mirror usually stays current. A mismatch is asked again as the mirror moves first:
3.4 may send the marker just ahead of events it has already queued.

The sections' watches have a watch stream of their own (``zetcd.Client.watch_on``): etcd
answers a progress request per stream, and from 3.5.8 (etcd-io/etcd#15237) only once
every watch of that stream is synced, so on the stream the chunk server's other watches
share, one catching up (a volume's extents listed, then watched from that revision) would
hold the answer back and the catalog would go stale, refusing logins, for a mirror that
was current. On its own stream only the catalog's watches can hold it back: rightly.
A slow answer is never taken as confirmation (a laxer rule, e.g. "confirmed recently
enough", would serve through a watch stalled since): both fixes keep the rule strict and
remove the causes of a false "unconfirmed" or a false "confirmed" instead.
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

# The catalog's watches have a gRPC Watch stream of their own (see the module docstring).
WATCH_STREAM = "catalog"


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


_RECORDS = {"targets": Target, "luns": LunMapping, "volumes": Volume, "snapshots": Snapshot,
            "acl": AclEntry, "chap": ChapRecord}


class CatalogChange(NamedTuple):
    """What one applied etcd event (or a listing) may have changed, for ``on_delta``."""
    kind: str
    targets: frozenset[str] | None        # target IQNs whose LUNs may look different to someone
    initiators: frozenset[str] | None     # lower-case: only these initiators' view; None: anyone's
    volumes: frozenset[str] | None        # volume ids whose record, snapshots or LUN mappings changed
    # (None: any; the catalog itself always names them)


class _Delta:
    __slots__ = ("tis", "targets", "initiators", "volumes")

    def __init__(self):
        self.tis: set[int] = set()
        self.targets: set[str] = set()
        self.initiators: set[str] | None = set()
        self.volumes: set[str] = set()

    def everyone(self) -> None:
        self.initiators = None

    def initiator(self, ini: str) -> None:
        if self.initiators is not None:
            self.initiators.add(ini)


class _Slots:
    """Entry key -> {etcd key: record}. The record under the greatest etcd key is served."""

    __slots__ = ("by",)

    def __init__(self):
        self.by: dict = {}

    def put(self, lk, ek: bytes, rec):
        srcs = self.by.setdefault(lk, {})
        was = srcs[max(srcs)] if srcs else None
        srcs[ek] = rec
        return was, (rec if len(srcs) == 1 else srcs[max(srcs)])

    def remove(self, lk, ek: bytes):
        srcs = self.by.get(lk)
        if not srcs or ek not in srcs:
            return None, None
        was = srcs[max(srcs)] if len(srcs) > 1 else srcs[ek]
        del srcs[ek]
        if not srcs:
            del self.by[lk]
            return was, None
        return was, srcs[max(srcs)]


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
        self._raw: dict[str, dict[bytes, bytes]] = {}          # kind -> etcd key -> value
        self._recs: dict[str, dict[bytes, object]] = {}        # kind -> etcd key -> its record
        self._slots: dict[str, _Slots] = {}                    # entry kind -> _Slots
        self._luns_by_target: dict[int, dict[int, LunMapping]] = {}  # target index -> lun -> mapping
        self._luns_by_export: dict[str, set[tuple[int, int]]] = {}   # volume|snapshot id -> LUNs
        self._luns_by_volume: dict[str, set[tuple[int, int]]] = {}   # mapping's volume id -> LUNs
        self._acl_by_initiator: dict[str, set[str]] = {}       # initiator -> export ids
        self._chap_targets: dict[str, set[str]] = {}           # initiator | '*' -> its CHAP's targets but '*'
        self.decoded = 0             # records decoded so far (one per changed key)
        self._delta_listeners: list[Callable[[CatalogChange], None]] = []
        self.generation = 0          # bumped on every change: lets readers cache what they derived
        self._listeners: list[Callable[[str], None]] = []
        self._stale_listeners: list[Callable[[bool], None]] = []
        self._synced: dict[str, asyncio.Event] = {}
        self._tasks: list[asyncio.Task] = []
        self._relist: dict[str, asyncio.Event] = {}   # per section: list afresh
        self._watching: dict[str, bool] = {}        # per section: its watch is open
        self._applied: dict[str, int] = {}          # per section: revision its mirror is at
        self._confirmed = 0.0                       # loop time the mirror was last known current
        self.stale = False
        self._relisted: set[str] = set()            # sections listed afresh since going stale
        self.miscounted = 0                         # sections relisted: key count not etcd's

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
        for lun, m in sorted(self._luns_by_target.get(t.index, {}).items()):
            ex = self._access(m, initiator)
            if ex is not None:
                out[lun] = ex
        return out

    def lun_access(self, target_iqn: str, initiator: str, lun: int) -> LunExport | None:
        """What this LUN serves if this initiator may use it right now, else None."""
        t = self.targets.get(target_iqn)
        if t is None:
            return None
        m = self.luns.get((t.index, lun))
        return None if m is None else self._access(m, initiator)

    def visible_targets(self, initiator: str) -> list[str]:
        """Targets with at least one LUN this initiator may see (SendTargets answers only these)."""
        by_export = self._luns_by_export
        idx = {ti for xid in self._acl_by_initiator.get(initiator.lower(), ())
               for ti, _ in by_export.get(xid, ())}
        return sorted(self._target_by_index[i].iqn for i in idx if i in self._target_by_index)

    def chap_for(self, target_iqn: str, initiator: str) -> ChapRecord | None:
        """Credentials for this pair: the target's own first, then the cluster-wide ('*') ones."""
        initiator = initiator.lower()
        for key in ((target_iqn, initiator), ("*", initiator), (target_iqn, "*"), ("*", "*")):
            rec = self.chap.get(key)
            if rec is not None:
                return rec
        return None

    def per_target_chap(self, initiator: str) -> list[str]:
        """Targets (not '*') with CHAP configured for this initiator, or for every initiator:
        while there are any, a discovery session must prove a secret too (``discovery_chap``
        in chunk/iscsi/target.py), or SendTargets would tell anyone claiming the name what
        it may see."""
        initiator = initiator.lower()
        return sorted(self._chap_targets.get(initiator, set()) | self._chap_targets.get("*", set()))

    def views_of(self, volume_id: str) -> set[int]:
        """The snapshot seqs of ``volume_id`` exported now (by a LUN mapping that resolves)."""
        out = set()
        for key in self._luns_by_volume.get(volume_id, ()):
            m = self.luns.get(key)
            if m is not None and m.snapshot_id:
                ex = self.resolve(m)
                if ex is not None and ex.volume.volume_id == volume_id:
                    out.add(ex.view_seq)
        return out

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

    def on_stale(self, fn: Callable[[bool], None]) -> None:
        """Call ``fn(stale)`` when the mirror goes stale (True) and when it is current again."""
        self._stale_listeners.append(fn)

    def _tell_stale(self) -> None:
        for fn in self._stale_listeners:
            try:
                fn(self.stale)
            except Exception:  # noqa: BLE001 - a listener must not break mirroring
                log.exception("catalog staleness listener failed")

    def on_delta(self, fn: Callable[[CatalogChange], None]) -> None:
        """Call ``fn(change)`` after each change, after the ``on_change`` listeners: which
        targets, initiators and volumes it touched (a session elsewhere is unaffected)."""
        self._delta_listeners.append(fn)

    # -- mirroring -------------------------------------------------------------

    def _sections(self) -> dict[str, bytes]:
        k = self.keys
        return {"targets": k.targets(), "luns": k.luns(), "volumes": k.volumes(),
                "snapshots": k.snapshots(), "acl": k.acls(), "chap": k.chaps()}

    def _decode(self, kind: str, value: bytes):
        cls = _RECORDS[kind]
        self.decoded += 1
        try:
            return cls.decode(value)
        except RecordError as e:
            log.error("ignoring unreadable %s record: %s", kind, e)
            return None

    def _apply(self, kind: str, ek: bytes, value: bytes | None, d: _Delta) -> bool:
        """One key put (``value``) or deleted (None); False if that changes nothing."""
        raw = self._raw.setdefault(kind, {})
        recs = self._recs.setdefault(kind, {})
        if value is None:
            if raw.pop(ek, None) is None:
                return False
            new = None
        else:
            if raw.get(ek) == value:       # a record put back unchanged (no change to mirror)
                return False
            raw[ek] = value
            new = self._decode(kind, value)
        old = recs.pop(ek, None)
        if new is not None:
            recs[ek] = new
        if old is not None:
            self._place(kind, ek, old, False, d)
        if new is not None:
            self._place(kind, ek, new, True, d)
        return old is not None or new is not None

    def _slot(self, name: str, lk, ek: bytes, rec, add: bool):
        slots = self._slots.get(name)
        if slots is None:
            slots = self._slots[name] = _Slots()
        return slots.put(lk, ek, rec) if add else slots.remove(lk, ek)

    def _place(self, kind: str, ek: bytes, rec, add: bool, d: _Delta) -> None:
        """Add or withdraw one key's record; update what is served where the winner changed."""
        if kind == "targets":
            was, now = self._slot("targets", rec.iqn, ek, rec, add)
            if was is not now:
                if now is None:
                    self.targets.pop(rec.iqn, None)
                else:
                    self.targets[rec.iqn] = now
                d.targets.add(rec.iqn)
                d.everyone()
            was, now = self._slot("target_index", rec.index, ek, rec, add)
            if was is not now:
                if now is None:
                    self._target_by_index.pop(rec.index, None)
                else:
                    self._target_by_index[rec.index] = now
                d.targets.update(t.iqn for t in (was, now) if t is not None)
                d.everyone()
        elif kind == "luns":
            key = (rec.target_index, rec.lun)
            was, now = self._slot("luns", key, ek, rec, add)
            if was is not now:
                if was is not None:
                    self._unindex_lun(key, was)
                if now is not None:
                    self._index_lun(key, now)
                d.tis.add(key[0])
                d.volumes.update(m.volume_id for m in (was, now) if m is not None)
                d.everyone()
        elif kind == "volumes":
            was, now = self._slot("volumes", rec.volume_id, ek, rec, add)
            if was is not now:
                vid = rec.volume_id
                if now is None:
                    self.volumes.pop(vid, None)
                else:
                    self.volumes[vid] = now
                d.volumes.add(vid)
                d.tis.update(ti for ti, _ in self._luns_by_volume.get(vid, ()))
                d.everyone()
        elif kind == "snapshots":
            was, now = self._slot("snapshots", rec.snapshot_id, ek, rec, add)
            if was is not now:
                sid = rec.snapshot_id
                if now is None:
                    self.snapshots.pop(sid, None)
                else:
                    self.snapshots[sid] = now
                d.volumes.update(x.volume_id for x in (was, now) if x is not None)
                d.tis.update(ti for ti, _ in self._luns_by_export.get(sid, ()))
                d.everyone()
        elif kind == "acl":
            # iSCSI names are case-insensitive (RFC 3722): keyed and looked up lower-case
            xid, ini = rec.export_id, rec.initiator.lower()
            was, now = self._slot("acl", (xid, ini), ek, rec, add)
            if was is not now:
                if now is None:
                    entries = self.acl.get(xid)
                    if entries is not None:
                        entries.pop(ini, None)
                        if not entries:
                            del self.acl[xid]
                    xs = self._acl_by_initiator.get(ini)
                    if xs is not None:
                        xs.discard(xid)
                        if not xs:
                            del self._acl_by_initiator[ini]
                else:
                    self.acl.setdefault(xid, {})[ini] = now
                    self._acl_by_initiator.setdefault(ini, set()).add(xid)
                d.tis.update(ti for ti, _ in self._luns_by_export.get(xid, ()))
                d.initiator(ini)
        elif kind == "chap":
            if add:
                logs.redact(rec.secret)
                logs.redact(rec.mutual_secret)
            key = (rec.target, rec.initiator.lower())
            was, now = self._slot("chap", key, ek, rec, add)
            if was is not now:
                if now is None:
                    self.chap.pop(key, None)
                else:
                    self.chap[key] = now
                if key[0] != "*":
                    ts = self._chap_targets.setdefault(key[1], set())
                    if now is None:
                        ts.discard(key[0])
                        if not ts:
                            del self._chap_targets[key[1]]
                    else:
                        ts.add(key[0])

    def _index_lun(self, key: tuple[int, int], m: LunMapping) -> None:
        self.luns[key] = m
        self._luns_by_target.setdefault(key[0], {})[key[1]] = m
        self._luns_by_export.setdefault(m.snapshot_id or m.volume_id, set()).add(key)
        self._luns_by_volume.setdefault(m.volume_id, set()).add(key)

    def _unindex_lun(self, key: tuple[int, int], m: LunMapping) -> None:
        self.luns.pop(key, None)
        by_t = self._luns_by_target.get(key[0])
        if by_t is not None:
            by_t.pop(key[1], None)
            if not by_t:
                del self._luns_by_target[key[0]]
        for index, xid in ((self._luns_by_export, m.snapshot_id or m.volume_id),
                           (self._luns_by_volume, m.volume_id)):
            keys = index.get(xid)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del index[xid]

    def _changed(self, kind: str, d: _Delta) -> None:
        self.generation += 1
        targets = set(d.targets)
        by_index = self._target_by_index
        targets.update(by_index[ti].iqn for ti in d.tis if ti in by_index)
        change = CatalogChange(kind, frozenset(targets),
                               None if d.initiators is None else frozenset(d.initiators),
                               frozenset(d.volumes))
        for fn in self._listeners:
            try:
                fn(kind)
            except Exception:  # noqa: BLE001 - a listener must not break mirroring
                log.exception("catalog listener failed")
        for fn in self._delta_listeners:
            try:
                fn(change)
            except Exception:  # noqa: BLE001 - a listener must not break mirroring
                log.exception("catalog listener failed")

    def _listing(self, kind: str, kvs) -> None:
        """A full listing of a section: applied as the keys that differ from the mirror."""
        new = dict(kvs)
        d = _Delta()
        for ek in [k for k in self._raw.get(kind, {}) if k not in new]:
            self._apply(kind, ek, None, d)
        for ek, value in new.items():
            self._apply(kind, ek, value, d)
        self._changed(kind, d)          # always: the first listing is news even when empty

    def _event(self, kind: str, ev) -> None:
        """One watch event, or a progress marker (``zetcd.Progress``): either way the section's
        stream has delivered everything up to its revision (one path, so a stream that
        stops delivering stops both)."""
        if isinstance(ev, zetcd.Progress):
            revision = ev.revision
        else:
            d = _Delta()
            if self._apply(kind, ev.kv.key, ev.kv.value if ev.kind == "PUT" else None, d):
                self._changed(kind, d)
            revision = ev.kv.mod_revision   # (a delete's is the revision of the deletion)
        self._applied[kind] = max(self._applied.get(kind, 0), revision)

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

        async def on_snapshot(kvs, revision):
            self._listing(kind, kvs)
            self._applied[kind] = revision
            self._synced[kind].set()
            # Stale: only a listing begun after the catalog went stale counts (``relist`` is
            # cleared as a listing begins, set when the catalog goes stale).
            if self.stale and not relist.is_set():
                self._relisted.add(kind)
                if self._relisted >= set(self._sections()):
                    self._resynced()

        async def on_event(ev):
            self._event(kind, ev)

        async def on_progress(revision):
            self._event(kind, zetcd.Progress(revision))

        await zetcd.watch_prefix(self.etcd, prefix, on_snapshot, on_event, stop,
                                 on_status=on_status, relist=relist, with_revision=True,
                                 on_progress=on_progress, stream=WATCH_STREAM)

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

    async def _ask_progress(self) -> int:
        """etcd's revision now (a linearizable read of one key), then a progress request on
        the catalog's watch stream: each of its open watches answers with a marker at or
        past it."""
        revision = await self.etcd.revision(self.keys.targets())
        await self.etcd.request_progress(WATCH_STREAM)
        return revision

    def _caught_up(self, revision: int) -> bool:
        return all(self._applied.get(kind, 0) >= revision for kind in self._sections())

    async def _probe(self, timeout: float) -> None:
        """A linearizable read through the watches' client, then a progress request: while
        every watch stays open across it and every section's stream delivered the read's
        revision (an event or progress marker at or past it; a stalled stream delivers
        neither), and every section holds etcd's key count there (``_counts_agree``), the
        mirror was current when it was sent.

        An etcd without etcd-io/etcd#15237 (3.4.23, as installed here) may answer just
        ahead of events it has already queued (such a section is milliseconds behind), or
        to a watch stalled inside it (the key counts catch a create or delete there). One
        with it holds the answer back while a watch of the catalog's stream is catching
        up: this probe is not confirmed, the next one is."""
        loop = asyncio.get_running_loop()
        sent = loop.time()
        if self.stale or not all(self._watching.get(k) for k in self._sections()):
            return
        try:
            revision = await asyncio.wait_for(self._ask_progress(), timeout)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - not confirmed: staleness is the answer
            log.debug("export catalog: etcd did not confirm the mirror: %s", e)
            return
        pause = 0.005
        while not self._caught_up(revision):
            if self.stale or loop.time() - sent > timeout:
                log.warning("export catalog: the watches have not delivered etcd's revision %d "
                            "(each section at %s); not confirmed current", revision,
                            {k: self._applied.get(k, 0) for k in self._sections()})
                return
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)
        if not await self._counts_agree(sent, timeout):
            return
        if not self.stale and all(self._watching.get(k) for k in self._sections()):
            self._confirmed = max(self._confirmed, sent)

    async def _counts_agree(self, sent: float, timeout: float) -> bool:
        """Whether every section's mirror holds as many keys as etcd did at the revision the
        mirror is at (one Txn of count-only ranges, at each section's applied revision).

        etcd 3.4 answers a progress request with its store revision whatever its watches'
        state, so a watch stalled inside etcd while the stream flows gets the marker: its
        section looks caught up while missing a create or a delete. A mismatch is asked
        again as the mirror moves (3.4 may also send the marker just ahead of events it has
        queued); one that lasts ``timeout``/4 has that section listed afresh (and this probe
        does not confirm)."""
        loop = asyncio.get_running_loop()
        sections = self._sections()
        asked: dict[str, tuple[int, int]] | None = None
        counts: list[int] = []
        first_off: float | None = None
        pause = 0.005
        while True:
            # taken at once (no await): each section's revision and its key count there
            marks = {k: (self._applied.get(k, 0), len(self._raw.get(k, {}))) for k in sections}
            if marks != asked:
                try:
                    counts = await asyncio.wait_for(
                        self.etcd.counts([(sections[k], marks[k][0]) for k in sections]),
                        max(0.01, sent + timeout - loop.time()))
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - not confirmed: staleness is the answer
                    log.debug("export catalog: etcd did not count the sections: %s", e)
                    return False
                asked = marks
            off = [k for k, n in zip(sections, counts) if n != marks[k][1]]
            if not off:
                return True
            now = loop.time()
            first_off = now if first_off is None else first_off
            if self.stale or now - sent > timeout:
                return False
            if now - first_off > timeout / 4:
                log.warning("export catalog: etcd counts %s keys where the mirror holds %s, at "
                            "the revision its watch delivered; listing those sections afresh",
                            {k: n for k, n in zip(sections, counts) if k in off},
                            {k: marks[k][1] for k in off})
                self.miscounted += len(off)
                for k in off:
                    self._relist[k].set()
                return False
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _go_stale(self, age: float) -> None:
        log.warning("export catalog: not confirmed current with etcd for %.1fs (bound %.1fs): "
                    "stale; logins refused as retryable and commands answered NOT READY until "
                    "every section is listed afresh", age, self.stale_after)
        self.stale = True
        self._relisted = set()
        self.generation += 1           # per-session caches must not answer from before
        for e in self._relist.values():   # a hung watch may never fail: list and watch anew
            e.set()
        self._tell_stale()

    def _resynced(self) -> None:
        self.stale = False
        self._relisted = set()
        self._confirmed = asyncio.get_running_loop().time()
        self.generation += 1
        log.warning("export catalog: listed afresh from etcd; current again")
        self._tell_stale()

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
