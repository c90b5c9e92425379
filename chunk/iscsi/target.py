"""The built-in iSCSI target of a chunk server: portal, logins, sessions, LUNs.

Policy comes from the export catalog (etcd, mirrored by watches); data goes
through a BlockDevice per volume, opened on first use. One LogicalUnit is
kept per (volume, view seq, read-only) — view seq > 0 for a snapshot exported
as a LUN — and shared by every session, so SCSI state such as reservations and
unit attentions is per LU, not per connection.

The session table is published (``session_list``, listeners told of every
login and logout) so the cluster can see which initiator is where; it is also the
scope of task management functions that reach beyond the issuing session (LOGICAL UNIT
RESET, CLEAR TASK SET, the target resets: see ``Session._task_mgmt``). A draining
target (``set_draining``) asks its normal sessions to log out and closes the
ones still there after a grace period, so initiators log in again through the
VIP and land on another chunk server; new logins are still served.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from dataclasses import dataclass, field
from typing import Any, Callable

from chunk import scsi
from chunk.catalog import Catalog, CatalogChange, LunExport
from chunk.lun_device import open_export

from .constants import LoginStatus
from .errors import LoginError
from .login import LoginResult, login
from .negotiation import TargetPreferences
from .session import Session

log = logging.getLogger(__name__)


@dataclass
class TargetConfig:
    host: str = "127.0.0.1"
    port: int = 3260
    advertise: str | None = None          # "host:port" put in SendTargets answers
    tpgt: int = 1
    prefs: TargetPreferences = field(default_factory=TargetPreferences)
    login_timeout: float = 15.0
    max_connections: int = 1024
    nop_interval: float = 15.0
    nop_timeout: float = 15.0
    window: int = 128
    drain_grace: float = 10.0             # seconds a draining target waits for logouts
    drain_idle_timeout: float = 30.0      # then: wait at most this for in-flight I/O, then close
    reinstate_timeout: float = 10.0       # a reinstating login waits at most this for the old session's end
    write_buffer_budget: int = 64 << 20   # write data buffers a session grants before its R2Ts wait


class Units:
    """LogicalUnits by (volume id, view seq, read-only), created on first use.

    ``open_device(volume, readonly[, view_seq])`` is the storage engine's opener;
    ``reservations`` (``chunk.shared_reservations.ReservationStore``), when given, holds
    the LUs' reservation states, shared with the other chunk servers through etcd."""

    def __init__(self, catalog: Catalog, open_device: Callable[..., Any], reservations: Any = None):
        self.catalog = catalog
        self.open_device = open_device
        self.reservations = reservations
        self._units: dict[tuple[str, int, bool], Any] = {}
        _on_delta(catalog, self._on_catalog)

    def get(self, ex: LunExport):
        unit = self._units.get(ex.unit_key)
        if unit is None:
            dev, ident = open_export(self.open_device, ex)
            shared = (self.reservations.state(ex.volume.volume_id, ex.view_seq)
                      if self.reservations is not None else None)
            unit = scsi.LogicalUnit(dev, ident, reservations=shared)
            self._units[ex.unit_key] = unit
        return unit

    def opened(self, ex: LunExport):
        """The unit already open for this export, or None (never opens one)."""
        return self._units.get(ex.unit_key)

    def close(self) -> None:
        for unit in self._units.values():
            close = getattr(unit.dev, "close", None)
            if close:
                close()
        self._units.clear()

    def _on_catalog(self, change: CatalogChange) -> None:
        """Close units whose volume is gone, and snapshot units whose snapshot is no longer exported
        (their view coordinators follow etcd for nothing); grow volume units that grew. Only the
        units of the volumes the change touched are looked at."""
        if change.kind not in ("volumes", "snapshots", "luns") or change.volumes == frozenset():
            return
        cat = self.catalog
        views: dict[str, set[int]] = {}
        vids = change.volumes
        for key, unit in [(k, u) for k, u in self._units.items() if vids is None or k[0] in vids]:
            vid, seq, _ = key
            vol = cat.volumes.get(vid)
            if seq and vid not in views:
                views[vid] = cat.views_of(vid)
            if vol is None or vol.state == "deleted" or (seq and seq not in views[vid]):
                self._units.pop(key, None)
                close = getattr(unit.dev, "close", None)
                if close:
                    close()
                if self.reservations is not None and not any(k[:2] == key[:2] for k in self._units):
                    self.reservations.forget(vid, seq)
            elif not seq and vol.size > unit.dev.size:
                unit.dev.resize(vol.size)        # the LU notices and posts CAPACITY DATA HAS CHANGED


class ScsiGlue:
    """The target-level SCSI answers a session needs besides an LU's own."""

    @staticmethod
    def report_luns(luns: list[int], cdb: bytes):
        return scsi.report_luns_command(cdb, luns)

    lun_not_supported = staticmethod(scsi.lun_not_supported)
    luns_changed = scsi.sense.ASC_REPORTED_LUNS_CHANGED     # the UA a REPORT LUNS clears

    @staticmethod
    def internal_error():
        return scsi.ScsiResult(0x02, None, scsi.sense.fixed_sense(0x04, 0x44, 0x00))


# LOGICAL UNIT NOT READY, IN PROCESS OF BECOMING READY (04/01): what every command of a
# session gets while the export catalog is stale (chunk/catalog.py). It is transient, and
# hosts retry it (Linux: a delayed retry; 04/00 or the ALUA 04/0B-0C fail the I/O at once,
# and 04/0A/0B/0C would need REPORT TARGET PORT GROUPS to show a matching state, which a
# server unsure of its ACLs cannot answer either). The LU does become ready here as soon as
# a fresh listing resyncs the mirror; a long outage ends in the host's command timeout
# and its recovery (a new login through the VIP, which the redirector sends elsewhere).
ASC_NOT_READY_BECOMING_READY = (0x04, 0x01)


def not_ready(cdb: bytes):
    sense = scsi.sense.fixed_sense(scsi.sense.NOT_READY, *ASC_NOT_READY_BECOMING_READY)
    if cdb[0] == 0x03:                                   # REQUEST SENSE: the condition as data
        return scsi.ScsiResult(scsi.sense.GOOD, sense[:cdb[4]])
    return scsi.ScsiResult(scsi.sense.CHECK_CONDITION, None, sense)


def _stale(catalog) -> bool:
    return getattr(catalog, "stale", False)      # (test doubles of the catalog have no such thing)


def _on_delta(catalog, fn: Callable[[CatalogChange], None]) -> None:
    """``catalog.on_delta(fn)``; over a catalog double with only ``on_change``, every change
    is taken as touching everything."""
    on_delta = getattr(catalog, "on_delta", None)
    if on_delta is not None:
        on_delta(fn)
    else:
        catalog.on_change(lambda kind: fn(CatalogChange(kind, None, None, None)))


class TargetGlue(ScsiGlue):
    """``ScsiGlue`` of one target: while its catalog is stale, a session's SessionView
    resolves no LU, and every command (REPORT LUNS and INQUIRY too: which LUNs this
    initiator may see is what is in doubt) is answered NOT READY instead of as a hole."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog

    def report_luns(self, luns: list[int], cdb: bytes):
        if _stale(self.catalog):
            return not_ready(cdb)
        return scsi.report_luns_command(cdb, luns)

    def lun_not_supported(self, cdb: bytes):
        if _stale(self.catalog):
            return not_ready(cdb)
        return scsi.lun_not_supported(cdb)


class SessionView:
    """What one session may see: LUNs of its target that its initiator is on the ACL of."""

    def __init__(self, target: "IscsiTarget", initiator: str, target_iqn: str | None):
        self.t, self.initiator, self.target_iqn = target, initiator, target_iqn
        self._units: dict[int, Any] = {}       # LUN -> unit (or None), for catalog generation _gen
        self._gen = -1
        self.inventory = self._inventory()     # as last told to the initiator (login, or a UA)

    def unit(self, lun: int):
        """Asked on every command: answered from a per-session cache that any catalog
        change empties, so an ACL or mapping change still applies to the next command."""
        cat = self.t.catalog
        if self._gen != cat.generation:
            self._units.clear()
            self._gen = cat.generation
        else:
            try:
                return self._units[lun]
            except KeyError:
                pass
        unit = None
        if self.target_iqn is not None and not _stale(cat):   # stale: NOT READY (TargetGlue)
            access = cat.lun_access(self.target_iqn, self.initiator, lun)
            if access is not None:
                unit = self.t.units.get(access)
        self._units[lun] = unit
        return unit

    @property
    def generation(self) -> int:
        """The catalog's generation, read live (``session.LunResolver``): a write that waited
        for its data is resolved again only when this moved. Not ``_gen``, which follows only
        ``unit`` calls and would miss a change made while the command waited."""
        return self.t.catalog.generation

    def opened_unit(self, lun: int):
        """The unit behind ``lun`` if this server has it open, else None (never opens one)."""
        if self.target_iqn is None or _stale(self.t.catalog):
            return None
        access = self.t.catalog.lun_access(self.target_iqn, self.initiator, lun)
        return self.t.units.opened(access) if access is not None else None

    def visible_luns(self) -> list[int]:
        if self.target_iqn is None:
            return []
        return list(self.t.catalog.visible_luns(self.target_iqn, self.initiator))

    def _inventory(self) -> dict[int, str]:
        """LUN -> the volume or snapshot behind it: what REPORT LUNS data stands for."""
        if self.target_iqn is None:
            return {}
        return {lun: ex.export_id for lun, ex in
                self.t.catalog.visible_luns(self.target_iqn, self.initiator).items()}

    def inventory_changed(self) -> bool:
        """Whether the LUNs this session may see changed since last asked (then remembered)."""
        now = self._inventory()
        if now == self.inventory:
            return False
        self.inventory = now
        return True

    def send_targets(self, which: str) -> list[tuple[str, list[str]]]:
        """The targets a SendTargets answer names (RFC 7143 Appendix C).

        A discovery session: All, or one named target, of those the initiator may see.
        A normal session names its own target only (empty value or its own name): All
        "MUST NOT be supported" there, and another target's name would open the list a
        discovery session guards with its own CHAP check. Those get no targets, an empty
        answer, which initiators read as such (libiscsi fails on any unknown key)."""
        if self.target_iqn is not None:
            names = [self.target_iqn] if which in ("", self.target_iqn) else []
        else:
            visible = self.t.catalog.visible_targets(self.initiator)
            names = visible if which == "All" else [which] if which in visible else []
        return [(n, [f"{self.t.advertise},{self.t.cfg.tpgt}"]) for n in names]


def discovery_chap(catalog, initiator: str):
    """The CHAP a discovery session of ``initiator`` must pass (None: none), for the chunk
    servers' portals and the redirector's VIP alike.

    Discovery is checked against the cluster-wide records only (target ``*``: the
    initiator's own, else the one for every initiator), never against a per-target secret
    (which of them? any one would let a secret for one target open the list of all). If
    there is none but per-target CHAP is configured for the initiator, discovery is refused
    (authentication failure, 0x0201) instead of served without a password, and the log says
    what to set: CHAP under target ``*``."""
    rec = catalog.chap_for("*", initiator)
    if rec is not None:
        return rec
    per_target = getattr(catalog, "per_target_chap", None)     # (catalog doubles in tests)
    targets = per_target(initiator) if per_target is not None else []
    if targets:
        log.warning("refusing discovery by %s: CHAP is set for it on %d target(s) (%s%s) but not for "
                    "discovery; set CHAP under target '*' for this initiator to allow discovery",
                    initiator, len(targets), ", ".join(targets[:3]), ", ..." if len(targets) > 3 else "")
        raise LoginError("discovery needs CHAP under target '*' (only per-target CHAP is set)",
                         LoginStatus.AUTHENTICATION_FAILURE)
    return None


class LoginPolicyImpl:
    def __init__(self, target: "IscsiTarget"):
        self.t = target

    def _check_synced(self) -> None:
        """Until the catalog has its first listing, refuse logins as retryable (0x0301): an
        unknown target (0x0203) may be taken as final, and an ACL not yet loaded hides LUNs.
        A chunk server restarted within its lease TTL gets logins this early."""
        if not self.t.catalog.synced:
            raise LoginError("the export catalog is still loading", LoginStatus.SERVICE_UNAVAILABLE)
        res = self.t.reservations
        if res is not None and not res.synced.is_set():
            # an empty mirror would let a host write through another's reservation
            raise LoginError("reservations are still loading", LoginStatus.SERVICE_UNAVAILABLE)

    def target_exists(self, iqn: str) -> bool:
        self._check_synced()
        return self.t.catalog.target(iqn) is not None

    def chap_for(self, target_iqn: str | None, initiator: str):
        self._check_synced()           # discovery sessions ask only this
        if target_iqn is None:
            return discovery_chap(self.t.catalog, initiator)
        return self.t.catalog.chap_for(target_iqn, initiator)

    def redirect(self, initiator: str, target_iqn: str | None) -> str | None:
        return None

    def new_tsih(self) -> int:
        while True:
            tsih = random.randint(1, 0xFFFF)
            if tsih not in self.t.tsihs:
                return tsih


class IscsiTarget:
    def __init__(self, cfg: TargetConfig, catalog: Catalog, open_device: Callable[..., Any],
                 reservations: Any = None):
        self.cfg, self.catalog = cfg, catalog
        self.reservations = reservations
        # listens first: closes units before we look
        self.units = Units(catalog, open_device, reservations)
        _on_delta(catalog, self._on_catalog)
        self.advertise = cfg.advertise or f"{cfg.host}:{cfg.port}"
        self.sessions: dict[tuple[str, bytes, str | None], Session] = {}
        self._by_target: dict[str | None, set[tuple[str, bytes, str | None]]] = {}  # iqn -> session keys
        self.tsihs: set[int] = set()
        self.policy = LoginPolicyImpl(self)
        self.glue = TargetGlue(catalog)
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.Task] = set()
        self._session_listeners: list[Callable[[], None]] = []
        self.draining = False
        self.rechecked = 0                        # sessions re-checked after catalog changes
        self._drain_task: asyncio.Task | None = None
        self._drain_login = asyncio.Event()       # a normal session logged in: the drain asks it

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.cfg.host, self.cfg.port,
                                                  limit=1 << 20, backlog=256, reuse_address=True)
        log.info("iSCSI target listening on %s:%d (advertised as %s)", self.cfg.host, self.cfg.port,
                 self.advertise)

    async def stop(self) -> None:
        if self._drain_task:
            self._drain_task.cancel()
        if self._server:
            self._server.close()
        for s in list(self.sessions.values()):
            await s.close()
        for t in list(self._conns):
            t.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        self.units.close()

    def session_count(self) -> int:
        return len(self.sessions)

    def session_list(self) -> list[dict[str, Any]]:
        """The sessions as published in the chunk server's live record."""
        out = []
        for (initiator, isid, target_iqn), s in self.sessions.items():
            peer = s.w.get_extra_info("peername")
            out.append({"initiator": initiator, "target": target_iqn,
                        "type": "discovery" if target_iqn is None else "normal",
                        "since": s.since, "isid": isid.hex(), "tsih": s.tsih,
                        "peer": f"{peer[0]}:{peer[1]}" if peer else None})
        return sorted(out, key=lambda d: (d["since"], d["initiator"]))

    def on_sessions_changed(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` after every login into and end of a session."""
        self._session_listeners.append(fn)

    def _sessions_changed(self) -> None:
        for fn in self._session_listeners:
            try:
                fn()
            except Exception:  # noqa: BLE001 - a listener must not break logins
                log.exception("session listener failed")

    # -- LUN inventory changes ----------------------------------------------------

    def _on_catalog(self, change: CatalogChange) -> None:
        """A session whose visible LUNs changed (a LUN mapped or unmapped, an ACL entry
        added or removed) gets REPORTED LUNS DATA HAS CHANGED, or hosts never rescan.

        SPC-4 establishes it on every LU for the I_T nexus; it is posted on the LUs the
        session has used and still sees. One it has not used reports POWER ON first
        anyway, and the initiator knows nothing of it (a newly mapped LUN). A LUN the
        session does not see answers LOGICAL UNIT NOT SUPPORTED, never a UA, so a session
        with no LU in use learns the change from its next REPORT LUNS.

        Only the sessions the change touched are looked at: those on its targets, and of
        its initiators when it names them (an ACL entry)."""
        if change.kind not in ("targets", "luns", "volumes", "snapshots", "acl"):
            return
        asc = scsi.sense.ASC_REPORTED_LUNS_CHANGED
        initiators = change.initiators
        targets = change.targets if change.targets is not None else list(self._by_target)
        for target_iqn in targets:
            if target_iqn is None:
                continue                              # discovery sessions: no LUNs
            for key in list(self._by_target.get(target_iqn, ())):
                s = self.sessions.get(key)
                if s is None or (initiators is not None and key[0].lower() not in initiators):
                    continue
                self.rechecked += 1
                view = s.resolver
                if not view.inventory_changed():
                    continue
                visible = {self.units.opened(ex) for ex in
                           self.catalog.visible_luns(target_iqn, view.initiator).values()}
                units = [u for u in s.units_used if u in visible]
                log.info("LUNs of %s on %s changed: now %s; telling it on %d LUs",
                         s.nexus.initiator, target_iqn, sorted(view.inventory), len(units))
                s.post_unit_attention(units, asc)

    # -- draining -------------------------------------------------------------------

    def set_draining(self, draining: bool) -> None:
        """Start or stop moving initiators off this target (idempotent)."""
        if draining == self.draining:
            return
        self.draining = draining
        if self._drain_task:
            self._drain_task.cancel()
            self._drain_task = None
        if draining:
            self._drain_task = asyncio.ensure_future(self._drain())
        else:
            for s in self.sessions.values():
                s.forget_logout_request()
            log.info("draining stopped; sessions stay")

    async def _drain(self) -> None:
        """Ask every normal session to log out; close those still here after the grace.

        A login during the grace is asked too: until the redirector has seen us draining it
        may send an initiator that just left straight back here. A later login is served."""
        loop = asyncio.get_running_loop()
        grace = self.cfg.drain_grace
        deadline = close_at = loop.time() + grace
        asked: list[Session] = []
        while True:
            self._drain_login.clear()
            now = loop.time()
            new = [s for (_, _, t), s in self.sessions.items() if t is not None and not s.logout_requested]
            if new:
                within = max(1, round(deadline - now))
                close_at = max(close_at, now + within)        # never close before the time we said
                log.info("draining: asking %d sessions to log out within %ds", len(new), within)
                for s in new:
                    await s.request_logout(within=within)
                asked += new
            if now >= deadline:
                break
            try:
                await asyncio.wait_for(self._drain_login.wait(), deadline - now)
            except asyncio.TimeoutError:
                pass
        await asyncio.sleep(max(0.0, close_at - loop.time()))
        left = [s for s in asked if s in self.sessions.values()]
        if left:
            log.info("draining: closing %d sessions that did not log out", len(left))
            await asyncio.gather(*(s.close_when_idle(self.cfg.drain_idle_timeout) for s in left))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._conns.add(task)
        try:
            if len(self._conns) > self.cfg.max_connections:
                log.warning("refusing connection from %s: %d connections open",
                            writer.get_extra_info("peername"), len(self._conns))
                return
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
                    except OSError:
                        pass
            result = await login(reader, writer, self.policy, self.cfg.prefs, tpgt=self.cfg.tpgt,
                                 first_pdu_timeout=self.cfg.login_timeout, window=self.cfg.window)
            if result is None:
                return
            await self._serve(reader, writer, result)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception:  # noqa: BLE001 - one connection must never take the target down
            log.exception("connection from %s failed", writer.get_extra_info("peername"))
        finally:
            self._conns.discard(task)
            try:
                writer.close()
            except Exception:  # noqa: BLE001
                pass

    async def _serve(self, reader, writer, r: LoginResult) -> None:
        p = r.params
        discovery = p.session_type == "Discovery"
        target_iqn = None if discovery else p.target_name
        key = (p.initiator_name, r.isid, target_iqn)
        old = self.sessions.get(key)
        if old is not None:                       # session reinstatement (RFC 7143 §6.3.5)
            log.info("reinstating session of %s isid %s", p.initiator_name, r.isid.hex())
            # Its tasks end and its nexus is released before this session runs a command:
            # the same nexus by value, released later it would wipe this session's state.
            await old.end_for_reinstatement(self.cfg.reinstate_timeout)
        tpgt = self.cfg.tpgt
        nexus = scsi.Nexus(initiator=f"{p.initiator_name},i,0x{r.isid.hex()}",
                           target_port=f"{target_iqn or 'discovery'},t,0x{tpgt:04x}",
                           relative_port_id=tpgt)
        sess = Session(reader, writer, p, isid=r.isid, tsih=r.tsih, statsn=r.statsn, expcmdsn=r.expcmdsn,
                       resolver=SessionView(self, p.initiator_name, target_iqn), scsi=self.glue, nexus=nexus,
                       window=self.cfg.window, nop_interval=self.cfg.nop_interval,
                       nop_timeout=self.cfg.nop_timeout, on_close=lambda s: self._closed(key, s),
                       write_buffer_budget=self.cfg.write_buffer_budget,
                       peers=self.sessions.values, cid=r.cid)
        self.sessions[key] = sess
        self._by_target.setdefault(target_iqn, set()).add(key)
        self.tsihs.add(r.tsih)
        self._sessions_changed()
        if target_iqn is not None:
            self._drain_login.set()
        log.info("%s session: %s -> %s (tsih %d)", "discovery" if discovery else "normal",
                 p.initiator_name, target_iqn or "-", r.tsih)
        await sess.run()

    def _closed(self, key, sess: Session) -> None:
        if self.sessions.get(key) is sess:
            del self.sessions[key]
            keys = self._by_target.get(key[2])
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_target[key[2]]
            self._sessions_changed()
            log.info("%s session ended: %s -> %s (tsih %d)", "discovery" if key[2] is None else "normal",
                     key[0], key[2] or "-", sess.tsih)
        self.tsihs.discard(sess.tsih)
