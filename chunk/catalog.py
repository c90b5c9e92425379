"""What this chunk server may export, mirrored from etcd by watches.

Every chunk server can serve every target and LUN, so each keeps a local
copy of the export state — targets, LUN mappings, volumes, ACLs and CHAP
credentials — and follows changes through etcd watches. Logins and commands
consult only this copy (dict look-ups): no etcd or meta round trip per I/O or
per login, and ACL changes apply to the very next command.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import aetcd

from zstore import etcd as zetcd
from zstore import logs
from zstore.keys import Keys
from zstore.records import AclEntry, ChapRecord, LunMapping, RecordError, Target, Volume

log = logging.getLogger(__name__)


class Catalog:
    def __init__(self, etcd: aetcd.Client, keys: Keys):
        self.etcd, self.keys = etcd, keys
        self.targets: dict[str, Target] = {}                 # iqn -> Target
        self._target_by_index: dict[int, Target] = {}
        self.luns: dict[tuple[int, int], LunMapping] = {}    # (target index, lun) -> mapping
        self.volumes: dict[str, Volume] = {}                 # volume id -> Volume
        self.acl: dict[str, dict[str, AclEntry]] = {}        # volume id -> initiator -> entry
        self.chap: dict[tuple[str, str], ChapRecord] = {}    # (target iqn | '*', initiator) -> creds
        self._raw: dict[str, dict[bytes, bytes]] = {}
        self._listeners: list[Callable[[str], None]] = []
        self._synced: dict[str, asyncio.Event] = {}
        self._tasks: list[asyncio.Task] = []

    # -- queries (hot: called per login / per command) -------------------------

    def target(self, iqn: str) -> Target | None:
        return self.targets.get(iqn)

    def visible_luns(self, target_iqn: str, initiator: str) -> dict[int, tuple[Volume, bool]]:
        """LUN number -> (volume, readonly) this initiator may see on this target."""
        t = self.targets.get(target_iqn)
        if t is None:
            return {}
        out = {}
        for (ti, lun), m in self.luns.items():
            if ti != t.index:
                continue
            entry = self.acl.get(m.volume_id, {}).get(initiator)
            vol = self.volumes.get(m.volume_id)
            if entry is not None and vol is not None and vol.state != "deleted":
                out[lun] = (vol, entry.readonly or m.readonly)
        return dict(sorted(out.items()))

    def lun_access(self, target_iqn: str, initiator: str, lun: int) -> tuple[Volume, bool] | None:
        """(volume, readonly) if this initiator may use this LUN right now, else None."""
        t = self.targets.get(target_iqn)
        if t is None:
            return None
        m = self.luns.get((t.index, lun))
        if m is None:
            return None
        entry = self.acl.get(m.volume_id, {}).get(initiator)
        vol = self.volumes.get(m.volume_id)
        if entry is None or vol is None or vol.state == "deleted":
            return None
        return vol, entry.readonly or m.readonly

    def visible_targets(self, initiator: str) -> list[str]:
        """Targets with at least one LUN this initiator may see (SendTargets answers only these)."""
        allowed_vols = {vid for vid, entries in self.acl.items() if initiator in entries}
        idx = {ti for (ti, _), m in self.luns.items() if m.volume_id in allowed_vols}
        return sorted(self._target_by_index[i].iqn for i in idx if i in self._target_by_index)

    def chap_for(self, target_iqn: str, initiator: str) -> ChapRecord | None:
        """Credentials for this pair: the target's own first, then the cluster-wide ('*') ones."""
        for key in ((target_iqn, initiator), ("*", initiator), (target_iqn, "*"), ("*", "*")):
            rec = self.chap.get(key)
            if rec is not None:
                return rec
        return None

    def on_change(self, fn: Callable[[str], None]) -> None:
        """Call ``fn(kind)`` after each change (kind: targets|luns|volumes|acl|chap)."""
        self._listeners.append(fn)

    # -- mirroring -------------------------------------------------------------

    def _sections(self) -> dict[str, bytes]:
        k = self.keys
        return {"targets": k.targets(), "luns": k.luns(), "volumes": k.volumes(), "acl": k.acls(),
                "chap": k.chaps()}

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
        elif kind == "acl":
            acl: dict[str, dict[str, AclEntry]] = {}
            for v in raw.values():
                e = decode(AclEntry, v)
                if e:
                    acl.setdefault(e.volume_id, {})[e.initiator] = e
            self.acl = acl
        elif kind == "chap":
            chap = {}
            for v in raw.values():
                c = decode(ChapRecord, v)
                if c:
                    logs.redact(c.secret)
                    logs.redact(c.mutual_secret)
                    chap[(c.target, c.initiator)] = c
            self.chap = chap
        for fn in self._listeners:
            try:
                fn(kind)
            except Exception:  # noqa: BLE001 - a listener must not break mirroring
                log.exception("catalog listener failed")

    async def start(self, stop: asyncio.Event) -> None:
        """Start mirroring; returns once every section has its first full listing."""
        for kind, prefix in self._sections().items():
            self._synced[kind] = asyncio.Event()
            self._tasks.append(asyncio.ensure_future(self._follow(kind, prefix, stop)))
        await asyncio.gather(*(e.wait() for e in self._synced.values()))

    async def _follow(self, kind: str, prefix: bytes, stop: asyncio.Event) -> None:
        async def on_snapshot(kvs):
            self._raw[kind] = dict(kvs)
            self._rebuild(kind)
            self._synced[kind].set()

        async def on_event(ev):
            raw = self._raw.setdefault(kind, {})
            if ev.kind == "PUT":
                raw[ev.kv.key] = ev.kv.value
            else:
                raw.pop(ev.kv.key, None)
            self._rebuild(kind)

        await zetcd.watch_prefix(self.etcd, prefix, on_snapshot, on_event, stop)

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
