"""What is mounted where, read from /proc/self/mountinfo every time.

The node plugin keeps no state in memory: whether a volume is staged or
published is whether its path is a mount point, so a plugin restart between
two calls changes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")


@dataclass
class Mount:
    root: str          # the path inside the source fs (a bind of a device file: "/sda")
    target: str
    fstype: str
    source: str
    options: str


def _unescape(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), s)


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        f, r = left.split(), right.split()
        if len(f) < 6 or len(r) < 2:
            continue
        mounts.append(Mount(_unescape(f[3]), _unescape(f[4]), r[0], _unescape(r[1]), f[5]))
    return mounts


def mounts(path: Path = MOUNTINFO) -> list[Mount]:
    return parse_mountinfo(path.read_text())


def mount_at(target: str, table: list[Mount] | None = None) -> Mount | None:
    """The topmost mount at ``target`` (the last one listed), or None."""
    target = str(Path(target))
    found = [m for m in (mounts() if table is None else table) if m.target == target]
    return found[-1] if found else None
