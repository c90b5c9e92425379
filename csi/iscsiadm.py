"""open-iscsi's iscsiadm, driven the way os-brick learned to (field notes §6 D).

Check the session list before logging in ("duplicate logins crash iscsiadm"),
treat exit 15 (session exists) as success, and key everything on the target
IQN rather than on the device, so cleanup still works when the device is gone.
Sessions are logged in with ``node.session.scan = manual`` and only our LUN is
scanned: zstore serves many volumes as LUNs of one target, and an automatic
scan would attach every one of them, so no session could ever be told apart
as unused. Parsing is kept in pure functions so the recorded outputs can be
unit-tested.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from csi.host import Host, HostError

EXIT_NO_OBJS = 21          # "No active sessions" / no records found
EXIT_SESSION_EXISTS = 15   # login: "session exists"

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

    async def discover(self, portal: str) -> list[tuple[str, str]]:
        _, out, _ = await self.host.run(["iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p", portal])
        return parse_discovery(out)

    async def login(self, target: str, portal: str) -> None:
        """Log in through the portal we were given (the VIP), which stays the node record's
        persistent portal, so reconnects after a failover go back through the redirector."""
        await self.host.run(["iscsiadm", "-m", "node", "-T", target, "-p", portal, "--login"],
                            ok=(0, EXIT_SESSION_EXISTS))

    async def attach(self, target: str, portal: str, lun: int | str) -> Session:
        """Log in (scan manual) unless a session to the target exists; then scan our LUN."""
        s = await self.session_for(target)
        if s is None:
            found = await self.discover(portal)
            if not any(t == target for _, t in found):
                raise HostError(f"target {target} not advertised at {portal} (discovery: {found})")
            await self.host.run(["iscsiadm", "-m", "node", "-T", target, "-p", portal, "-o", "update",
                                 "-n", "node.session.scan", "-v", "manual"])
            await self.login(target, portal)
            s = await self.session_for(target)
            if s is None:
                raise HostError(f"no session to {target} after login")
        self.scan_lun(s.sid, lun)
        return s

    async def rescan(self, sid: int) -> None:
        await self.host.run(["iscsiadm", "-m", "session", "-r", str(sid), "--rescan"])

    async def logout(self, sid: int) -> None:
        await self.host.run(["iscsiadm", "-m", "session", "-r", str(sid), "--logout"], ok=(0, EXIT_NO_OBJS))
