"""What is mounted where, read from /proc/self/mountinfo every time.

The node plugin keeps no state in memory: whether a volume is staged or
published is whether its path is a mount point, so a plugin restart between
two calls changes nothing.
"""

from __future__ import annotations

import os
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


def canonical(path: str) -> str:
    """``path`` as /proc/self/mountinfo names mount points: absolute, ``.``/``..`` and every
    symlink *above* the last component resolved (a kubelet root ``/var/lib/kubelet`` ->
    ``/data/kubelet`` is listed under ``/data/kubelet``). The last component is kept as
    it is: a mount point is never a symlink, so a path whose last component is one names no
    mount, and following it would let NodeUnpublish/NodeUnstage unmount whatever it points
    at (``umount`` follows a final symlink). Not resolving the last component also means
    the mount root itself is never stat'ed (a hung file system there cannot block us). A
    path that no longer exists is resolved as far as it exists; nothing is raised."""
    path = os.path.normpath(os.path.abspath(path))
    head, tail = os.path.split(path)
    if not tail:                                    # "/"
        return path
    return os.path.join(os.path.realpath(head), tail)


def mount_at(target: str, table: list[Mount] | None = None) -> Mount | None:
    """The topmost mount at ``target`` (the last one listed), or None.

    ``target`` is resolved above its last component (``canonical``); the table's mount
    points are the kernel's, canonical already and unescaped (``\\040`` is a space) by
    ``parse_mountinfo``. Only symlinks are resolved: a bind mount is another path to the same
    directory, and a mount made under one of its paths is listed (and seen) there only, unless
    propagated, when the kernel lists each copy at its own path. A mount whose mount point
    was deleted is gone from the table (the kernel detaches it), so a deleted target is not
    mounted."""
    target = canonical(target)
    found = [m for m in (mounts() if table is None else table) if m.target == target]
    return found[-1] if found else None
