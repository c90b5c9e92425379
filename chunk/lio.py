"""LIO frontend: the kernel's iSCSI target exports what etcd says, and the chunk
server serves the data of every LUN through TCMU (``chunk.tcmu``).

The desired state comes from the same export catalog the built-in target uses
(targets, LUN mappings, volumes, ACLs, CHAP), and is applied with rtslib-fb:

* one LIO iSCSI target per zstore target, with one TPG (tag 1) holding this
  server's portal (``chunk.portal``);
* per LUN mapping, a LUN over a ``user:`` backstore named ``zs-<id>`` with
  config ``zstore/<id>`` (the volume id, or the snapshot id of a snapshot
  exported read-only); the chunk server maps that backstore's uio device and
  runs its command ring through a ``LogicalUnit`` over the device
  ``chunk.lun_device.open_export`` opens, as the built-in target does;
* per initiator on a volume's ACL, a NodeACL with a MappedLUN (write-protected
  when the ACL entry or the mapping is read-only): LUN masking. LIO's write
  protection stops only data-carrying writes on a user backstore (WRITE SAME
  with NDOB, for one, gets through), so an initiator whose ACL entry alone is
  read-only is mapped (same LUN number) to a second backstore ``zs-<id>.ro``
  on TPG LUN ``RO_TPG_LUN_BASE + n``, served over the device opened read-only;
  it exists only while some ACL entry needs it;
* CHAP per NodeACL from ``catalog.chap_for``: userid/password, mutual ones
  when set, and the NodeACL's ``authentication`` attribute on, so an initiator
  with credentials cannot skip them; NodeACLs without credentials log in
  without CHAP (TPG ``authentication`` 0, i.e. per ACL).

It is applied at start (LIO forgets everything on reboot; after a restart of
the chunk server alone, the existing objects are found and kept: nothing is
created twice) and again after every catalog change (etcd watches). Only our
objects are touched: targets listed in ``<data dir>/lio-owned.json`` (written
before a target is created) and user backstores whose config is
``zstore/...``; anything else in LIO stays as it is.

configfs writes run in a thread: removing a LUN waits in the kernel for its
outstanding commands, which this process's event loop must keep serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from chunk import scsi
from chunk.catalog import Catalog, LunExport
from chunk.lun_device import open_export
from chunk.tcmu import uio as tuio
from chunk.tcmu.loop import CommandLoop
log = logging.getLogger(__name__)

CONFIGFS = Path("/sys/kernel/config")
HANDLER = "zstore"                 # the user: backstore's subtype (config = "zstore/<volume id>")
TPG_TAG = 1
MAX_SECTORS_BYTES = 1 << 20        # per command; the LU's Block Limits say 8 MiB, LIO splits nothing
DATA_AREA_MB = 64                  # room for the queued commands' data in the TCMU data area
OWNED_FILE = "lio-owned.json"
RETRY_SECONDS = 30.0               # a reconcile that hit errors is retried after this, changes or not
RO_SUFFIX = ".ro"                  # the read-only twin of a backstore, for read-only ACL entries
RO_TPG_LUN_BASE = 256              # its TPG LUN: LUN n + this (catalog LUNs are 1..255)
# demo_mode_discovery 0: SendTargets lists a target only to initiators with a NodeACL on it
# (LIO's default, 1, lists every target to anyone). Discovery CHAP is not configured: LIO
# has one fabric-wide discovery credential (iscsi/discovery_auth), which neither matches
# the catalog's per-initiator records under target '*' nor is ours to change (it applies
# to targets zstore does not own).
TPG_ATTRIBUTES = (("authentication", "0"), ("generate_node_acls", "0"),
                  ("demo_mode_write_protect", "1"), ("cache_dynamic_acls", "0"),
                  ("demo_mode_discovery", "0"))
# The kernel's per-backstore command timeout (seconds; 0: none). The kernel default, 30 s,
# answers a command the handler has not answered in time with CHECK CONDITION, but cannot
# stop the handler from executing it: a WRITE reported failed may still land afterwards,
# over what the host wrote since (it retried, maybe on another path, and went on). Only
# the handler can know whether a write may still land (it holds the replica round trip,
# and fencing), so the bound belongs there, not in the kernel. The cost: while a command
# hangs in the handler, or the chunk server is down and not restarted, the host gets no
# answer on this path; its own recovery (abort, reset, session replacement_timeout,
# multipath) takes over, and a restarted server fails what is queued as BUSY before serving
# (``_attach``). Silent corruption is worse than a slow failure: 0.
CMD_TIME_OUT = "0"


class LioUnavailable(Exception):
    """This kernel or system cannot run the LIO frontend; the message names what is missing."""


def check_kernel(configfs: Path = CONFIGFS, sys_module: Path = Path("/sys/module")) -> None:
    """Load LIO's modules if we can, then say in one message everything still missing."""
    missing = []
    try:
        import rtslib_fb  # noqa: F401
    except ImportError:
        missing.append("the rtslib-fb Python package (pip install rtslib-fb, or apt install python3-rtslib-fb)")
    try:
        subprocess.run(["modprobe", "-a", "configfs", "target_core_mod", "iscsi_target_mod", "target_core_user"],
                       capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        pass
    if not configfs.is_dir() or not os.path.ismount(configfs):
        missing.append(f"configfs mounted at {configfs}")
    for mod, what in (("target_core_mod", "LIO core"), ("iscsi_target_mod", "LIO iSCSI fabric"),
                      ("target_core_user", "TCMU"), ("uio", "userspace I/O")):
        if not (sys_module / mod).is_dir():
            missing.append(f"kernel module {mod} ({what})")
    if missing:
        raise LioUnavailable("the lio frontend needs " + "; ".join(missing))


# -- the desired state -------------------------------------------------------------------

@dataclass(frozen=True)
class Chap:
    user: str
    secret: str
    mutual_user: str | None = None
    mutual_secret: str | None = None


@dataclass
class AclSpec:
    mapped: dict[int, bool] = field(default_factory=dict)     # LUN -> write-protected
    chap: Chap | None = None
    tpg_luns: dict[int, int] = field(default_factory=dict)    # LUN -> TPG LUN, where not the same


@dataclass
class TargetSpec:
    iqn: str
    luns: dict[int, str] = field(default_factory=dict)        # TPG LUN -> backstore name
    acls: dict[str, AclSpec] = field(default_factory=dict)    # initiator -> masking + CHAP


@dataclass
class Desired:
    backstores: dict[str, LunExport] = field(default_factory=dict)
    targets: dict[str, TargetSpec] = field(default_factory=dict)


def backstore_name(export_id: str) -> str:
    """``zs-`` + the volume id, or the snapshot id of a snapshot LUN."""
    return f"zs-{export_id}"


def desired_state(catalog: Catalog) -> Desired:
    """What LIO should hold for this catalog (pure: no configfs)."""
    d = Desired()
    by_index = {t.index: t for t in catalog.targets.values()}
    for t in catalog.targets.values():
        d.targets[t.iqn] = TargetSpec(t.iqn)
    for (ti, lun), m in sorted(catalog.luns.items()):
        t = by_index.get(ti)
        ex = catalog.resolve(m)
        if t is None or ex is None:
            continue
        name = backstore_name(ex.export_id)
        d.backstores[name] = ex
        spec = d.targets[t.iqn]
        spec.luns[lun] = name
        for initiator, entry in sorted(catalog.acl.get(ex.export_id, {}).items()):
            acl = spec.acls.setdefault(initiator, AclSpec())
            acl.mapped[lun] = bool(entry.readonly or m.readonly)
            if entry.readonly and not ex.readonly:
                # the shared backstore is writable: this initiator gets the read-only twin
                ro = name + RO_SUFFIX
                d.backstores[ro] = ex._replace(readonly=True)
                spec.luns[RO_TPG_LUN_BASE + lun] = ro
                acl.tpg_luns[lun] = RO_TPG_LUN_BASE + lun
    for spec in d.targets.values():
        for initiator, acl in spec.acls.items():
            c = catalog.chap_for(spec.iqn, initiator)
            if c is not None:
                acl.chap = Chap(c.user, c.secret, c.mutual_user, c.mutual_secret)
    return d


# -- applying it with rtslib-fb (synchronous: runs in a thread) -----------------------------

class Owned:
    """The targets this chunk server created, kept across restarts in the data dir."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.targets = set(json.loads(path.read_text()).get("targets", []))
        except FileNotFoundError:
            self.targets = set()
        except (OSError, ValueError) as e:
            raise LioUnavailable(f"{path}: unreadable ({e}); remove it only if LIO holds no zstore target")

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"targets": sorted(self.targets)}))
        os.replace(tmp, self.path)


@dataclass(frozen=True)
class Backstore:
    name: str
    index: int              # of its user_N HBA dir
    path: str               # its configfs dir
    uio_name: str           # the name its /dev/uioN carries in sysfs


class LioConfig:
    def __init__(self, portal_host: str, portal_port: int, owned: Owned):
        import rtslib_fb as rts
        self.rts = rts
        self.root = rts.RTSRoot()
        self.host, self.port, self.owned = portal_host, portal_port, owned
        self.errors = 0          # objects rtslib refused since the last reset (the frontend retries)
        self._time_out_warned: set[str] = set()
        self.enable_tpgs = True  # False while draining or stopping: applying keeps TPGs disabled

    # backstores ---------------------------------------------------------------------

    def _ours(self) -> dict[str, Any]:
        out = {}
        for so in self.root.storage_objects:
            if so.plugin == "user" and (so.config or "").startswith(HANDLER + "/"):
                out[so.name] = so
        return out

    def _describe(self, so) -> Backstore:
        index = int(re.search(r"/user_(\d+)/", so.path + "/").group(1))
        return Backstore(so.name, index, so.path, tuio.uio_name(index, so.name, so.config))

    def ensure_backstores(self, want: dict[str, LunExport]) -> dict[str, Backstore]:
        """The backstores that exist; one that cannot be made is logged and left out (its LUNs
        with it), so it does not hold up the others."""
        have = self._ours()
        out = {}
        for name, ex in want.items():
            try:
                so = have.get(name)
                if so is None:
                    bs = ex.volume.block_size or 512
                    so = self.rts.UserBackedStorageObject(
                        name, config=f"{HANDLER}/{ex.export_id}", size=ex.size, wwn=ex.serial,
                        hw_max_sectors=MAX_SECTORS_BYTES // bs,
                        control=f"max_data_area_mb={DATA_AREA_MB},hw_block_size={bs}")
                    log.info("LIO: created backstore user/%s (%d bytes)", name, ex.size)
                self._set_cmd_time_out(so)
                out[name] = self._describe(so)
            except Exception:  # noqa: BLE001 - rtslib or configfs refused this one
                self.errors += 1
                log.exception("LIO: backstore user/%s", name)
        return out

    def _set_cmd_time_out(self, so) -> None:
        """``attrib/cmd_time_out`` = CMD_TIME_OUT (see there). The kernel takes it only while
        the backstore has no LUN, i.e. right after it is made; a backstore made by an older
        zstore keeps its value (logged once per start) until its LUN is re-made."""
        try:
            if str(so.get_attribute("cmd_time_out") or "").strip() == CMD_TIME_OUT:
                return
            so.set_attribute("cmd_time_out", CMD_TIME_OUT)
        except Exception as e:  # noqa: BLE001 - e.g. EINVAL: a LUN exists already
            if so.name not in self._time_out_warned:
                self._time_out_warned.add(so.name)
                log.warning("LIO: backstore user/%s keeps its cmd_time_out (%s): a write the kernel "
                            "times out may still land later", so.name, e)

    def grow_backstores(self, sizes: dict[str, int]) -> None:
        """Raise the kernel's ``dev_size`` of each backstore to its volume's size (a volume
        only grows; a restart after a resize finds the old size here too)."""
        have = self._ours()
        for name, size in sizes.items():
            so = have.get(name)
            if so is None:
                continue
            try:
                if int(so.get_attribute("dev_size") or 0) < size:
                    so.set_attribute("dev_size", str(size))
                    log.info("LIO: backstore user/%s grown to %d bytes", name, size)
            except Exception:  # noqa: BLE001
                self.errors += 1
                log.exception("LIO: growing backstore user/%s", name)

    def stale_backstores(self, want: dict[str, LunExport]) -> list[str]:
        return [n for n in self._ours() if n not in want]

    def delete_backstore(self, name: str) -> None:
        so = self._ours().get(name)
        if so is not None:
            try:
                so.delete()
                log.info("LIO: deleted backstore user/%s", name)
            except Exception:  # noqa: BLE001 - e.g. a LUN that could not be removed still uses it
                self.errors += 1
                log.exception("LIO: deleting backstore user/%s", name)

    def _action(self, bs: Backstore, name: str, value: str) -> None:
        """Write the backstore's ``action/<name>`` (target_core_user.c: block_dev 1|0,
        reset_ring 1 (queued commands fail BUSY: retryable) | 2 (CHECK CONDITION))."""
        with open(os.path.join(bs.path, "action", name), "w") as f:
            f.write(value)

    def reset_ring(self, bs: Backstore) -> None:
        """A ring that cannot be walked: fail what is queued (hard failure), restart at 0."""
        self._action(bs, "reset_ring", "2")

    def block_and_reset_ring(self, bs: Backstore) -> None:
        """Before a new CommandLoop serves ``bs`` (as tcmu-runner does on reopen): block the
        device (the kernel reaps what was answered, and new commands fail BUSY instead of
        queueing), then reset the ring: every command still in it (queued while nothing
        served the ring, or left unanswered by the last server) fails BUSY, so the host
        retries it, and head and tail go to 0. Nothing left in the ring is ever run."""
        self._action(bs, "block_dev", "1")
        self._action(bs, "reset_ring", "1")

    def unblock(self, bs: Backstore) -> None:
        self._action(bs, "block_dev", "0")

    # targets ------------------------------------------------------------------------

    def apply_targets(self, d: Desired, backstores: dict[str, Backstore]) -> None:
        rts = self.rts
        iscsi = rts.FabricModule("iscsi")
        existing = {t.wwn: t for t in self.root.targets if t.fabric_module.name == "iscsi"}
        # Targets no longer wanted go first (revocations before anything that may fail).
        for iqn in sorted(self.owned.targets - set(d.targets)):
            try:
                t = existing.get(iqn)
                if t is not None:
                    t.delete()
                    log.info("LIO: deleted target %s", iqn)
                self.owned.targets.discard(iqn)
                self.owned.save()
            except Exception:  # noqa: BLE001
                self.errors += 1
                log.exception("LIO: deleting target %s", iqn)
        # Each target (and, in _apply_tpg, each step) on its own: one that rtslib
        # refuses is logged and counted, and everything else is still applied.
        for iqn, spec in d.targets.items():
            try:
                t = existing.get(iqn)
                if t is not None and iqn not in self.owned.targets:
                    log.error("LIO: target %s exists and was not made by zstore; leaving it alone", iqn)
                    continue
                if t is None:
                    self.owned.targets.add(iqn)
                    self.owned.save()                    # before it exists: a crash cannot orphan it
                    t = rts.Target(iscsi, iqn, mode="create")
                    log.info("LIO: created target %s", iqn)
                self._apply_tpg(t, spec, backstores)
            except Exception:  # noqa: BLE001
                self.errors += 1
                log.exception("LIO: target %s", iqn)

    def _step(self, what: str, fn: Callable[[], Any]) -> bool:
        """Run one configfs step; one that rtslib refuses is logged and counted (retried on
        the timer), and the steps after it still run. True if it went through."""
        try:
            fn()
            return True
        except Exception:  # noqa: BLE001
            self.errors += 1
            log.exception("LIO: %s", what)
            return False

    def _apply_tpg(self, t, spec: TargetSpec, backstores: dict[str, Backstore]) -> None:
        """Revocations first (NodeACLs, MappedLUNs, LUNs no longer wanted), each step on its own:
        a portal, LUN or ACL that rtslib refuses never leaves what was revoked mapped."""
        rts = self.rts
        tpgs = {tpg.tag: tpg for tpg in t.tpgs}
        tpg = tpgs.get(TPG_TAG) or rts.TPG(t, TPG_TAG, mode="create")
        # 1. revoke: ACLs no longer wanted, then mappings that changed, then LUNs
        acls = {a.node_wwn: a for a in tpg.node_acls}
        for initiator, a in list(acls.items()):
            if initiator not in spec.acls:
                if self._step(f"{spec.iqn}: removing ACL {initiator}", a.delete):
                    log.info("LIO: %s: removed ACL %s", spec.iqn, initiator)
                acls.pop(initiator)
        for initiator, a in acls.items():
            want = spec.acls[initiator]
            for m in list(a.mapped_luns):
                n = m.mapped_lun
                if (n not in want.mapped or m.tpg_lun.lun != want.tpg_luns.get(n, n)
                        or bool(m.write_protect) != want.mapped[n]):
                    self._step(f"{spec.iqn}: unmapping LUN {n} of {initiator}", m.delete)
        luns = {lun.lun: lun for lun in tpg.luns}
        for n, lun in list(luns.items()):
            want_name = spec.luns.get(n)
            so = lun.storage_object
            if want_name is None or so.name != want_name or so.plugin != "user":
                if self._step(f"{spec.iqn}: removing LUN {n}", lun.delete):   # MappedLUNs go with it
                    log.info("LIO: %s LUN %d removed", spec.iqn, n)
                del luns[n]              # nothing is mapped to it (if it stays, a retry removes it)
        for tag, other in tpgs.items():
            if tag != TPG_TAG:
                self._step(f"{spec.iqn}: removing TPG {tag}", other.delete)
        # 2. the TPG's attributes, portal, LUNs, ACLs
        for name, value in TPG_ATTRIBUTES:
            if tpg.get_attribute(name) != value:
                self._step(f"{spec.iqn}: TPG attribute {name}", lambda: tpg.set_attribute(name, value))

        def portal() -> None:
            portals = {(p.ip_address, p.port): p for p in tpg.network_portals}
            for key, p in portals.items():
                if key != (self.host, self.port):
                    p.delete()
            if (self.host, self.port) not in portals:
                rts.NetworkPortal(tpg, self.host, self.port, mode="create")
        self._step(f"{spec.iqn}: portal {self.host}:{self.port}", portal)
        for n, name in spec.luns.items():
            if n not in luns and name in backstores:
                def make(n=n, name=name):
                    so = rts.UserBackedStorageObject(name, index=backstores[name].index)
                    luns[n] = rts.LUN(tpg, n, so)
                    log.info("LIO: %s LUN %d -> user/%s", spec.iqn, n, name)
                self._step(f"{spec.iqn} LUN {n} -> user/{name}", make)
        for initiator, want in spec.acls.items():
            self._step(f"{spec.iqn}: ACL {initiator}",   # e.g. an initiator name rtslib rejects
                       lambda: self._apply_acl(tpg, acls.get(initiator), initiator, want, luns, spec.iqn))
        if bool(tpg.enable) != self.enable_tpgs:      # off while draining or stopping
            self._step(f"{spec.iqn}: TPG enable={self.enable_tpgs}",
                       lambda: setattr(tpg, "enable", self.enable_tpgs))

    def set_enabled(self, enabled: bool) -> None:
        """Enable or disable the TPGs of every target we own. Disabled, LIO closes their
        sessions (waiting for their commands, which the loops keep answering) and refuses
        logins (0x0301, retryable): hosts go elsewhere (the redirector's VIP)."""
        self.enable_tpgs = enabled
        for t in self.root.targets:
            if t.wwn not in self.owned.targets:
                continue
            for tpg in t.tpgs:
                if bool(tpg.enable) != enabled:
                    if self._step(f"{t.wwn}: TPG enable={enabled}", lambda: setattr(tpg, "enable", enabled)):
                        log.info("LIO: %s TPG %d %s", t.wwn, tpg.tag, "enabled" if enabled else "disabled")

    def _apply_acl(self, tpg, a, initiator: str, want: AclSpec, luns: dict[int, Any], iqn: str) -> None:
        """CHAP (and ``authentication`` 1) is in place before any MappedLUN is made: if it
        cannot be set, the NodeACL is deleted (fail closed), never left mapped with
        ``authentication`` inherited from the TPG (0: login without CHAP)."""
        rts = self.rts
        if a is None:
            a = rts.NodeACL(tpg, initiator, mode="create")
            log.info("LIO: %s: added ACL %s", iqn, initiator)
        try:
            self._apply_chap(a, want.chap)
        except Exception:
            log.error("LIO: %s: CHAP for %s could not be applied; removing its ACL (no login "
                      "without the CHAP it needs)", iqn, initiator)
            a.delete()
            raise
        mapped = {m.mapped_lun: m for m in a.mapped_luns}
        for n, m in list(mapped.items()):
            if (n not in want.mapped or m.tpg_lun.lun != want.tpg_luns.get(n, n)
                    or bool(m.write_protect) != want.mapped[n]):
                m.delete()
                mapped.pop(n)
        for n, wp in want.mapped.items():
            tl = want.tpg_luns.get(n, n)
            if n not in mapped and tl in luns:
                rts.MappedLUN(a, n, tl, write_protect=wp)

    def _apply_chap(self, a, chap: Chap | None) -> None:
        """With CHAP: ``authentication`` 1 first (an ACL without credentials yet then refuses
        logins), then the credentials; raises when anything is refused (a kernel without
        the per-ACL attribute included: CHAP offered but not enforced is no CHAP). Without:
        credentials cleared, then 0."""
        want = {"chap_userid": chap.user if chap else "", "chap_password": chap.secret if chap else "",
                "chap_mutual_userid": (chap.mutual_user or "") if chap else "",
                "chap_mutual_password": (chap.mutual_secret or "") if chap else ""}
        auth = "1" if chap else "0"
        if chap and a.get_attribute("authentication") != auth:
            a.set_attribute("authentication", auth)
        for attr, value in want.items():
            if (getattr(a, attr) or "") != value:
                setattr(a, attr, value)
        if not chap:
            try:                 # no CHAP wanted: the TPG's 0 is what we want anyway
                if a.get_attribute("authentication") != auth:
                    a.set_attribute("authentication", auth)
            except self.rts.RTSLibError:
                log.warning("LIO: this kernel has no per-ACL authentication attribute (%s)", a.node_wwn)
        elif (a.get_attribute("authentication") or "").strip() != auth:
            raise self.rts.RTSLibError(f"authentication of {a.node_wwn} reads "
                                       f"{a.get_attribute('authentication')!r}, not 1")

    # what LIO holds now (for logs and tests) -----------------------------------------

    def sessions(self) -> list[dict[str, Any]]:
        out = []
        for t in self.root.targets:
            if t.wwn not in self.owned.targets:
                continue
            for tpg in t.tpgs:
                for a in tpg.node_acls:
                    try:
                        info = Path(a.path, "info").read_text()
                    except OSError:
                        continue
                    if "No active" not in info:
                        out.append({"initiator": a.node_wwn, "target": t.wwn, "type": "normal",
                                    "since": None, "frontend": "lio"})
        return out


# -- the frontend the chunk server runs ------------------------------------------------------

class LioFrontend:
    """What ``ChunkServer`` runs instead of ``IscsiTarget`` when ``chunk.frontend = "lio"``."""

    def __init__(self, portal: str, catalog: Catalog, open_device: Callable[..., Any],
                 state_dir: Path):
        host, _, port = portal.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.catalog, self.open_device = catalog, open_device
        self.owned = Owned(Path(state_dir) / OWNED_FILE)
        self.cfg: LioConfig | None = None
        self.loops: dict[str, tuple[CommandLoop, Any, Any]] = {}   # backstore -> (loop, uio, dev)
        self._lock = asyncio.Lock()
        self._dirty = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.applied = 0
        self.failed = False      # the last reconcile left something unapplied: retry on a timer
        self.draining = False
        self.stopping = False

    async def start(self) -> None:
        self.cfg = await asyncio.to_thread(LioConfig, self.host, self.port, self.owned)
        if not await self._catalog_synced():
            return
        try:
            await self.reconcile()
        except Exception:  # noqa: BLE001 - serve what could be applied; _follow retries the rest
            self.failed = True
            log.exception("LIO: applying the catalog failed; retrying in %.0f s", RETRY_SECONDS)
        self.catalog.on_change(lambda kind: self._dirty.set())
        on_stale = getattr(self.catalog, "on_stale", None)
        if on_stale is not None:
            on_stale(lambda stale: self._dirty.set())
        self._task = asyncio.ensure_future(self._follow())
        log.info("LIO frontend: portal %s:%d, %d LUNs served through TCMU", self.host, self.port,
                 len(self.loops))

    async def _catalog_synced(self) -> bool:
        """Apply nothing before the catalog's first full listing: an empty catalog would
        read as "delete every target", and a restart must leave LIO as it was. False if
        ``stop`` came first (etcd unreachable, say): the server must not wait for it."""
        while not self.catalog.synced:
            if self.stopping:                 # ``stop`` while starting: False, nothing applied
                return False
            await asyncio.sleep(0.05)
        return not self.stopping

    async def _follow(self) -> None:
        """Apply after every change, and again every RETRY_SECONDS while the last attempt
        left something unapplied (rtslib refused an object, or the attempt failed)."""
        while True:
            try:
                await asyncio.wait_for(self._dirty.wait(), RETRY_SECONDS if self.failed else None)
            except asyncio.TimeoutError:
                pass
            await asyncio.sleep(0.1)             # a change touches several sections: apply once
            self._dirty.clear()
            try:
                await self.reconcile()
            except Exception:  # noqa: BLE001 - keep following; the next change or the timer retries
                self.failed = True
                log.exception("LIO: applying the catalog failed")

    def _stale(self) -> bool:
        return getattr(self.catalog, "stale", False)      # (catalog doubles may not have it)

    def _tpgs_wanted(self) -> bool:
        """Whether our TPGs should be enabled: not while draining or stopping, nor while the
        catalog is stale (it may still hold ACLs an admin has revoked)."""
        return not (self.draining or self.stopping or self._stale())

    async def reconcile(self) -> None:
        async with self._lock:
            cfg = self.cfg
            cfg.errors = 0
            self.failed = True                   # until this attempt gets through cleanly
            cfg.enable_tpgs = self._tpgs_wanted()
            if self._stale():
                # Apply nothing from a mirror that may be out of date; the loops answer NOT
                # READY meanwhile. The TPGs come back with the reconcile after the relist.
                await asyncio.to_thread(cfg.set_enabled, False)
                self.failed = cfg.errors > 0
                return
            d = desired_state(self.catalog)
            backstores = await asyncio.to_thread(cfg.ensure_backstores, d.backstores)
            for name, bs in backstores.items():
                if name not in self.loops and not await self._attach(bs, d.backstores[name]):
                    cfg.errors += 1              # retried on the timer
            for name, (_loop, _u, dev) in self.loops.items():
                ex = d.backstores.get(name)
                if ex is not None and not ex.view_seq and ex.size > dev.size:
                    dev.resize(ex.size)          # the LU notices and posts CAPACITY DATA HAS CHANGED
            await asyncio.to_thread(cfg.grow_backstores, {n: ex.size for n, ex in d.backstores.items()
                                                          if not ex.view_seq and n in backstores})
            # a LUN only over a backstore whose ring someone serves: else its commands just hang
            served = {n: bs for n, bs in backstores.items() if n in self.loops}
            await asyncio.to_thread(cfg.apply_targets, d, served)
            for name in await asyncio.to_thread(cfg.stale_backstores, d.backstores):
                await self._detach(name)
                await asyncio.to_thread(cfg.delete_backstore, name)
            for name in [n for n in self.loops if n not in backstores]:
                await self._detach(name)
            self.applied += 1
            self.failed = cfg.errors > 0
            if self.failed:
                log.error("LIO: %d objects could not be applied; retrying in %.0f s", cfg.errors,
                          RETRY_SECONDS)

    async def _attach(self, bs: Backstore, ex: LunExport) -> bool:
        """Serve ``bs``'s ring; False (logged, nothing left open) if it cannot be served."""
        found = None
        for _ in range(50):                       # udev may lag behind configfs
            found = tuio.find(bs.uio_name, suffix=bs.uio_name.split("/", 2)[2])
            if found and os.path.exists(f"/dev/{found}"):
                break
            await asyncio.sleep(0.1)
        if not found:
            log.error("LIO: no uio device named %s for backstore %s", bs.uio_name, bs.name)
            return False
        dev = u = loop = None
        try:
            dev, ident = open_export(self.open_device, ex)     # read-only for a ".ro" backstore
            unit = scsi.LogicalUnit(dev, ident, power_on_ua=False)
            u = tuio.UioDevice(found)
            # Never replay: what the ring holds was queued while nothing served it (the
            # kernel may have timed it out and the host moved on) or left unanswered by the
            # last server (maybe answered already, out of order). The kernel fails all of it
            # BUSY (the host retries) and the loop starts at the empty ring's head. If a
            # step fails the device stays blocked: its commands fail BUSY instead of hanging.
            await asyncio.to_thread(self.cfg.block_and_reset_ring, bs)
            loop = CommandLoop(u, unit, name=f"{bs.name}({found})",
                               reset_ring=lambda: self.cfg.reset_ring(bs), stale=self._stale)
            loop.start()
            await asyncio.to_thread(self.cfg.unblock, bs)
        except Exception:  # noqa: BLE001 - this backstore goes unserved; the others go on
            log.exception("LIO: cannot serve backstore %s on /dev/%s", bs.name, found)
            if loop is not None:
                await loop.stop(timeout=1.0)
            if u is not None:
                u.close()
            close = getattr(dev, "close", None)
            if close:
                close()
            return False
        self.loops[bs.name] = (loop, u, dev)
        log.info("LIO: serving backstore %s on /dev/%s (%d-byte map)", bs.name, found, u.size)
        return True

    async def _detach(self, name: str) -> None:
        entry = self.loops.pop(name, None)
        if entry is None:
            return
        loop, u, dev = entry
        await loop.stop()
        u.close()
        close = getattr(dev, "close", None)
        if close:
            close()

    async def stop(self) -> None:
        """Stop serving. The TPGs are disabled first, while the loops still answer: LIO
        closes the sessions and refuses logins, so hosts go elsewhere instead of queueing
        on a ring nobody serves. LIO keeps its configuration: the next start picks it up
        and enables the TPGs again."""
        self.stopping = True
        if self._task:
            self._task.cancel()
        if self.cfg is not None:
            self.cfg.enable_tpgs = False         # a reconcile still running in its thread enables nothing
            async with self._lock:
                try:
                    await asyncio.to_thread(self.cfg.set_enabled, False)
                except Exception:  # noqa: BLE001 - still let go of the rings
                    log.exception("LIO: disabling the TPGs")
        for name in list(self.loops):
            await self._detach(name)

    # the parts of IscsiTarget's interface the chunk server uses ---------------------------

    def session_list(self) -> list[dict[str, Any]]:
        return self.cfg.sessions() if self.cfg else []

    def on_sessions_changed(self, fn: Callable[[], None]) -> None:
        """LIO does not tell us about logins; sessions are read when the record is written."""

    def set_draining(self, draining: bool) -> None:
        """Draining disables our TPGs (LIO closes the sessions at once: it cannot ask an
        initiator to log out; logins are refused as retryable, 0x0301); undraining enables
        them again. Applied by the next reconcile, which this schedules."""
        if draining == self.draining:
            return
        self.draining = draining
        if self.cfg is not None:
            self.cfg.enable_tpgs = self._tpgs_wanted()
        log.info("LIO: %s", "draining: disabling the TPGs" if draining else "draining stopped: enabling the TPGs")
        self._dirty.set()
