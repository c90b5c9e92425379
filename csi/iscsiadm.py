"""open-iscsi's iscsiadm, driven the way os-brick learned to (field notes §6 D).

Check the session list before logging in ("duplicate logins crash iscsiadm"),
treat exit 15 (session exists) as success, and key everything on the target
IQN rather than on the device, so cleanup still works when the device is gone.
Sessions are logged in with ``node.session.scan = manual`` and only our LUN is
scanned: zstore serves many volumes as LUNs of one target, and an automatic
scan would attach every one of them, so no session could ever be told apart
as unused. Parsing is kept in pure functions so the recorded outputs can be
unit-tested.

CHAP (``csi.chap``) is written into our node record (and, for discovery, the
discovery record) right before the login; a failed login deletes the node
record again, and so does the last logout, so no record, with or without
credentials in it, outlives the volumes that needed it.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from csi.chap import Chap, secrets_of
from csi.host import Host, HostError

EXIT_NO_OBJS = 21          # "No active sessions" / no records found
EXIT_SESSION_EXISTS = 15   # login: "session exists"; -o new: record exists
EXIT_AUTH_FAILED = 24      # login: "iSCSI login failed due to authorization failure"
EXIT_FATAL_LOGIN = 19      # "non-retryable iSCSI login failure": also what the initiator's own
                           # rejection of the target's mutual CHAP answer gives (seen in the lab)


class AuthFailed(HostError):
    """The target refused our CHAP credentials (or asked for CHAP and we had none)."""

_SESSION_RE = re.compile(r"^\S+: \[(\d+)\] (\S+?),(\d+) (\S+)")


@dataclass
class Session:
    sid: int
    portal: str            # the connected portal (a chunk server's, after a redirect)
    tpgt: int
    target: str
    disks: list[str] = field(default_factory=list)   # "sda", ... (only from -P 3)


def parse_sessions(out: str) -> list[Session]:
    """``iscsiadm -m session``: ``tcp: [1] 192.168.77.1:3261,1 iqn... (non-flash)``."""
    sessions = []
    for line in out.splitlines():
        m = _SESSION_RE.match(line.strip())
        if m:
            sessions.append(Session(int(m[1]), m[2], int(m[3]), m[4]))
    return sessions


def parse_session_disks(out: str) -> dict[int, list[str]]:
    """``iscsiadm -m session -P 3``: the attached SCSI disks of every session id."""
    disks: dict[int, list[str]] = {}
    sid: int | None = None
    for line in out.splitlines():
        s = line.strip()
        m = re.match(r"SID: (\d+)", s)
        if m:
            sid = int(m[1])
            disks[sid] = []
            continue
        m = re.match(r"Attached scsi disk (\S+)", s)
        if m and sid is not None:
            disks[sid].append(m[1])
    return disks


def parse_discovery(out: str) -> list[tuple[str, str]]:
    """``iscsiadm -m discovery -t st``: ``portal,tpgt target`` lines as (portal, target)."""
    found = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and "," in parts[0]:
            found.append((parts[0].rsplit(",", 1)[0], parts[1]))
    return found


class Iscsiadm:
    def __init__(self, host: Host, sysfs: Path = Path("/sys")):
        self.host = host
        self.sysfs = sysfs

    def scsi_host(self, sid: int) -> str:
        """The SCSI host (``host2``) of an iSCSI session: the session's sysfs parent."""
        return (self.sysfs / "class" / "iscsi_session" / f"session{sid}" / "device").resolve().parent.name

    def scan_lun(self, sid: int, lun: int | str) -> None:
        """Ask the kernel to scan just this LUN of the session (any channel and target id)."""
        (self.sysfs / "class" / "scsi_host" / self.scsi_host(sid) / "scan").write_text(f"- - {int(lun)}")

    def lun_device(self, sid: int, lun: int | str) -> Path | None:
        """The SCSI device (``.../target2:0:0/2:0:0:5``) at our LUN of the session, or None.

        What the kernel has at that H:C:T:L, whichever disk it is: a scan of a LUN that already
        has a device does not INQUIRE again, so a disk of a deleted volume whose LUN was handed
        to a new one stays there, with the old volume's WWN (``wwid``)."""
        base = self.sysfs / "class" / "iscsi_session" / f"session{sid}" / "device"
        for d in sorted(base.glob("target*/*:*:*:*")):
            if d.name.rsplit(":", 1)[-1] == str(int(lun)):
                return d
        return None

    async def sessions(self, detail: bool = False) -> list[Session]:
        rc, out, err = await self.host.run(["iscsiadm", "-m", "session"], ok=(0, EXIT_NO_OBJS))
        if rc == EXIT_NO_OBJS:
            return []
        sessions = parse_sessions(out)
        if detail and sessions:
            _, out3, _ = await self.host.run(["iscsiadm", "-m", "session", "-P", "3"], ok=(0, EXIT_NO_OBJS))
            disks = parse_session_disks(out3)
            for s in sessions:
                s.disks = disks.get(s.sid, [])
        return sessions

    async def session_for(self, target: str, detail: bool = False) -> Session | None:
        return next((s for s in await self.sessions(detail) if s.target == target), None)

    async def discover(self, portal: str, chap: Chap | None = None) -> list[tuple[str, str]]:
        """SendTargets at the portal through its discovery record, whose auth settings are set
        every time: CHAP as given, or none (not a previous call's credentials)."""
        db = ["iscsiadm", "-m", "discoverydb", "-t", "sendtargets", "-p", portal]
        # create the record if missing; an existing one is fine (a real failure shows in the update)
        await self.host.run([*db, "-o", "new"], ok=range(256))
        prefix = "discovery.sendtargets.auth"
        for name, value in chap.settings(prefix) if chap else [(f"{prefix}.authmethod", "None")]:
            await self.host.run([*db, "-o", "update", "-n", name, "-v", value], secret=secrets_of(chap))
        try:
            _, out, _ = await self.host.run([*db, "--discover"])
        except HostError as e:
            if e.rc == EXIT_AUTH_FAILED:
                raise AuthFailed(f"SendTargets discovery at {portal} refused (CHAP, iscsiadm exit 24)",
                                 e.rc, e.stderr) from None
            raise
        return parse_discovery(out)

    async def configure(self, target: str, portal: str, chap: Chap | None) -> None:
        """Our node record's settings: scan manual, and CHAP from the request or none at all
        (a record left from an earlier CHAP login must not log in with stale credentials)."""
        node = ["iscsiadm", "-m", "node", "-T", target, "-p", portal, "-o", "update"]
        settings = [("node.session.scan", "manual")]
        settings += chap.settings("node.session.auth") if chap else [("node.session.auth.authmethod", "None")]
        for name, value in settings:
            await self.host.run([*node, "-n", name, "-v", value], secret=secrets_of(chap))

    async def login(self, target: str, portal: str, chap: Chap | None = None) -> None:
        """Log in through the portal we were given (the VIP), which stays the node record's
        persistent portal, so reconnects after a failover go back through the redirector."""
        try:
            await self.host.run(["iscsiadm", "-m", "node", "-T", target, "-p", portal, "--login"],
                                ok=(0, EXIT_SESSION_EXISTS))
        except HostError as e:
            if e.rc == EXIT_AUTH_FAILED:
                raise AuthFailed(f"login to {target} at {portal} refused (CHAP, iscsiadm exit 24)",
                                 e.rc, e.stderr) from None
            if e.rc == EXIT_FATAL_LOGIN and chap is not None and chap.username_in:
                # discovery has just listed the target, so with mutual CHAP this is the target
                # failing to prove the secret we expect (iscsiadm does not say which)
                raise AuthFailed(f"login to {target} at {portal} failed (iscsiadm exit 19, non-retryable): "
                                 f"with mutual CHAP, most likely the target did not prove "
                                 f"node.session.auth.password_in", e.rc, e.stderr) from None
            raise

    async def forget(self, target: str, portal: str) -> None:
        """Delete our node record (CHAP secrets included); nothing to do when it is gone."""
        await self.host.run(["iscsiadm", "-m", "node", "-T", target, "-p", portal, "-o", "delete"],
                            ok=(0, EXIT_NO_OBJS))

    async def attach(self, target: str, portal: str, lun: int | str, chap: Chap | None = None,
                     discovery_chap: Chap | None = None) -> Session:
        """Log in (scan manual, CHAP as given) unless a session to the target exists; then scan
        our LUN. A failed login leaves no node record behind."""
        s = await self.session_for(target)
        if s is None:
            found = await self.discover(portal, discovery_chap)
            if not any(t == target for _, t in found):
                raise HostError(f"target {target} not advertised at {portal} (discovery: {found})")
            try:
                await self.configure(target, portal, chap)
                await self.login(target, portal, chap)
                s = await self.session_for(target)
                if s is None:
                    raise HostError(f"no session to {target} after login")
            except BaseException:
                with contextlib.suppress(Exception):
                    if await self.session_for(target) is None:
                        await self.forget(target, portal)
                raise
        self.scan_lun(s.sid, lun)
        return s

    async def rescan(self, sid: int) -> None:
        await self.host.run(["iscsiadm", "-m", "session", "-r", str(sid), "--rescan"])

    async def logout(self, sid: int) -> None:
        await self.host.run(["iscsiadm", "-m", "session", "-r", str(sid), "--logout"], ok=(0, EXIT_NO_OBJS))

    async def detach(self, s: Session, portal: str) -> None:
        """Log the session out and delete its node record: the last disk of the target is gone."""
        await self.logout(s.sid)
        await self.forget(s.target, portal)
