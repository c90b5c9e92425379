"""CSI Node service: attach a zstore volume with the host's kernel initiator and mount it.

The portal handed over by the controller is the redirector's VIP, so a session
survives losing its chunk server. Nothing is remembered in memory: staged and
published mean "is a mount point", attached means "the kernel has a session to
the target and a disk with the volume's WWN". The few facts unstage needs and
cannot derive (target, WWN: unstage gets only the volume id) are written next
to nothing else, in ``state_dir/<volume id>.json`` on disk (and, while our mkfs of
its disk has not finished, ``state_dir/<volume id>.mkfs``). A call on a volume id
that has another in flight is answered ABORTED at once (the spec's "operation
pending for volume"), rather than queued behind a call that may be stuck in a
login; calls on different volumes run concurrently.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import re
import stat
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import grpc

from csi import csi_pb2 as pb
from csi import csi_pb2_grpc as pbg
from csi.chap import ChapError, from_secrets
from csi.host import Host, HostError
from csi.iscsiadm import AuthFailed, Iscsiadm
from csi.mounts import MOUNTINFO, canonical, mount_at, mounts
from csi.status import Abort, guard, invalid
from zstore import naming

log = logging.getLogger("zstore.csi.node")

INITIATOR_FILE = Path("/etc/iscsi/initiatorname.iscsi")
FS_TYPES = ("ext4", "xfs")
RPC = pb.NodeServiceCapability.RPC
CAPABILITIES = [RPC.STAGE_UNSTAGE_VOLUME, RPC.EXPAND_VOLUME, RPC.GET_VOLUME_STATS]
Mode = pb.VolumeCapability.AccessMode
READ_ONLY = {Mode.SINGLE_NODE_READER_ONLY, Mode.MULTI_NODE_READER_ONLY}
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def initiator_iqn(path: Path = INITIATOR_FILE) -> str:
    """The ``InitiatorName=`` of open-iscsi's config: the node id the controller puts on ACLs."""
    for line in path.read_text().splitlines():
        key, _, value = line.strip().partition("=")
        if key == "InitiatorName" and value:
            return value.strip()
    raise ValueError(f"no InitiatorName in {path}")


def volume_id(request: Any) -> str:
    if not request.volume_id:
        raise invalid("volume_id is required")
    if not _ID_RE.match(request.volume_id):
        raise invalid(f"volume_id {request.volume_id!r} is not a zstore volume id")
    return request.volume_id


def required_path(request: Any, field: str) -> str:
    p = getattr(request, field)
    if not p:
        raise invalid(f"{field} is required")
    if not os.path.isabs(p):
        raise invalid(f"{field} must be an absolute path")
    return os.path.normpath(p)


def refuse_symlink(path: str, field: str) -> None:
    """A mount at a symlink lands where it points (mount follows it), where no later call
    finds it (a mount point is never a symlink, so ``mount_at`` of the link is None): a
    publish there would mount over whatever the link names, stack another mount at each
    retry, and leave NodeUnpublish refusing. FAILED_PRECONDITION, nothing done."""
    if os.path.islink(path):
        try:
            dest = os.readlink(path)
        except OSError:
            dest = "?"
        raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                    f"{field} {path} is a symlink (to {dest}): not mounting through it")


# mount(8)'s own operations and helpers, which libmount takes from the -o string as well: not
# options of the filesystem being mounted
_MOUNT_OPS = {"bind", "rbind", "move", "remount", "offset", "sizelimit", "encryption", "helper"}


def check_mount_flags(flags: Any) -> None:
    """INVALID_ARGUMENT unless every flag is one filesystem option: they are joined into the
    one argument after ``mount -o``, which libmount splits at commas and where it also takes
    its own operations (``bind``, ``move``, ``remount``, ``loop``, ``X-mount.*``). A comma is
    kept only inside a double-quoted value (an SELinux ``context="...:s0:c1,c2"``)."""
    for flag in flags:
        quoted, bare = False, []
        for c in flag:
            if c == '"':
                quoted = not quoted
            elif not quoted:
                bare.append(c)
        name = flag.split("=", 1)[0].strip().lower()
        if (not flag.strip() or flag.lstrip().startswith("-") or "," in bare or quoted
                or any(ord(c) < 32 or ord(c) == 127 for c in flag)
                or name in _MOUNT_OPS or name.startswith(("loop", "x-mount."))):
            raise invalid(f"mount flag {flag!r} is not a single filesystem mount option "
                          "(no commas outside quotes, no leading '-', none of mount's own "
                          "bind/move/remount/loop/X-mount options)")


def check_capability(cap: pb.VolumeCapability) -> str:
    """'block' or the filesystem type; INVALID_ARGUMENT for what we cannot do."""
    if not cap.HasField("access_mode") or cap.access_mode.mode == Mode.UNKNOWN:
        raise invalid("volume_capability.access_mode is required")
    kind = cap.WhichOneof("access_type")
    if kind is None:
        raise invalid("volume_capability needs block or mount")
    if kind == "block":
        return "block"
    fs = cap.mount.fs_type or "ext4"
    if fs not in FS_TYPES:
        raise invalid(f"fs_type {fs!r} is not supported (one of {', '.join(FS_TYPES)})")
    check_mount_flags(cap.mount.mount_flags)
    return fs


def attach_info(request: Any) -> dict[str, str]:
    """Target, LUN, WWN and portal from publish_context (over volume_context)."""
    ctx = {**request.volume_context, **request.publish_context}
    missing = [k for k in ("targetIQN", "lun", "wwn", "portal") if not ctx.get(k)]
    if missing:
        raise invalid(f"publish_context/volume_context lack {', '.join(missing)}")
    wwn = ctx["wwn"].lower().removeprefix("0x")
    if not re.fullmatch(r"[0-9a-f]{16,32}", wwn):
        raise invalid(f"wwn {ctx['wwn']!r} is not a hex NAA id")
    if not ctx["lun"].isdigit():
        raise invalid(f"lun {ctx['lun']!r} is not a number")
    return {"target": ctx["targetIQN"], "lun": ctx["lun"], "wwn": wwn, "portal": ctx["portal"]}


def readonly_of(request: Any) -> bool:
    """Whether the disk is exported write-protected: a reader-only access mode, or the
    controller's ``readonly`` in publish_context (a PV with ``readOnly: true`` keeps its
    writer access mode, and ControllerPublish puts it on the ACL read-only all the same)."""
    mode = request.volume_capability.access_mode.mode
    return mode in READ_ONLY or request.publish_context.get("readonly", "").strip().lower() == "true"


def by_id(wwn: str) -> Path:
    return Path(f"/dev/disk/by-id/wwn-0x{wwn}")


def _read_head(dev: str, length: int = 1 << 20) -> bool:
    """Read the first ``length`` bytes of ``dev`` (all of it, if smaller); OSError unless every
    byte came back. A short read is a failed one (the kernel returns what it read before an
    I/O error), and a disk with no capacity (a LUN the target reports empty, a disk going
    away) has nothing that proves it blank. True when every byte read is zero."""
    fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        if size <= 0:
            raise OSError(errno.EIO, f"{dev} reports a capacity of {size} bytes")
        want = min(length, size)
        head = os.pread(fd, want, 0)
        got = len(head)
        if got != want:
            raise OSError(errno.EIO, f"short read of {dev}: {got} of {want} bytes")
        return not any(head)
    finally:
        os.close(fd)


async def probe_device(host: Host, dev: str, read_timeout: float = 30.0, mkfs_cut_short: bool = False) -> str:
    """The filesystem type on ``dev``, or "" only when it is provably blank (mkfs may run).

    ``blkid -p`` exits 0 for a partition table with no filesystem on the whole disk (no
    TYPE then), and exits 2 both for "no signature" and for a device it could not read:
    either way "blank" would format a disk holding data (a cloned VM image, a LUN failing
    its reads). A partition table or an unnamed signature is refused; exit 2 counts as
    blank only once the head of the device reads, and reads all zeros: exit 2 is also
    what data with no signature blkid knows gives (plain dm-crypt, an application's raw
    data on a volume once used as raw block). ``mkfs_cut_short``: our own mkfs ran on this
    disk and was cut short (its partial writes are no one's data), so a non-zero head is
    formatted again."""
    rc, out, _ = await host.run(["blkid", "-p", "-o", "export", dev], ok=(0, 2))
    if rc == 0:
        tags = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        if tags.get("TYPE"):
            return tags["TYPE"]
        what = f"a {tags['PTTYPE']} partition table" if tags.get("PTTYPE") else "data blkid cannot name"
        raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                    f"{dev} holds {what} and no filesystem: not formatting it; "
                    "use it as a raw block volume, or zero its first MiB (blkdiscard, or dd from "
                    "/dev/zero) if it is not needed: after wipefs alone it is still not blank")
    try:
        zero = await asyncio.wait_for(asyncio.to_thread(_read_head, dev), read_timeout)
    except (OSError, asyncio.TimeoutError) as e:
        raise Abort(grpc.StatusCode.UNAVAILABLE,
                    f"{dev} does not read ({type(e).__name__}: {e}): not formatting it")
    if not zero and not mkfs_cut_short:
        raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                    f"{dev} has no signature blkid knows, but its first MiB is not all zeros: it holds "
                    "data (plain dm-crypt, a raw volume's data); not formatting it. Use it as a raw "
                    "block volume, or zero its head (blkdiscard, dd) if it is not needed")
    return ""


def _entries(path: str, shown: int = 3) -> str:
    """A few of a directory's entries, for an error message."""
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        return f"unreadable: {e.strerror}"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(repr(n) for n in names[:shown]) + more


def _kind(mode: int) -> str:
    for test, what in ((stat.S_ISLNK, "a symlink"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISFIFO, "a fifo"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return f"of file type {stat.S_IFMT(mode):o}"


def remove_publish_target(target: str) -> None:
    """Remove what NodePublish made at ``target``, once nothing is mounted there: an empty
    directory (a filesystem publish) or an empty file (a raw block one, the disk's device node
    was bound onto it). Gone already is done (the spec: idempotent).

    Anything else is not ours to delete: a directory or file holding data (a pod that wrote
    to the node's own disk while the target was not mounted, something put there by hand), a
    symlink, a device node. It is left as it is, never removed recursively, and the call is
    FAILED_PRECONDITION naming the path: the CO retries, and succeeds once someone cleared it.
    Another failure to remove is INTERNAL with the path, not an UNKNOWN from a stray OSError."""
    try:
        st = os.lstat(target)
    except (FileNotFoundError, NotADirectoryError):
        return                          # no such path (a component is a file: cannot exist)
    except OSError as e:
        raise Abort(grpc.StatusCode.INTERNAL, f"cannot look at the publish target {target}: {e}") from None
    kept = f"{target} is not a mount point (nothing of the volume is published there)"
    try:
        if stat.S_ISDIR(st.st_mode):
            os.rmdir(target)            # refuses a directory that is not empty, atomically
        elif stat.S_ISREG(st.st_mode) and st.st_size == 0:
            os.unlink(target)
        elif stat.S_ISREG(st.st_mode):
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                        f"{kept} but a file holding {st.st_size} bytes, not the empty one NodePublish "
                        "makes: left as it is; remove it to unpublish")
        else:
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                        f"{kept} but {_kind(st.st_mode)}, neither a directory nor a file NodePublish "
                        "makes: left as it is; remove it to unpublish")
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                        f"{kept} but a directory holding {_entries(target)}: left as it is, never "
                        "deleted with its contents; move them away to unpublish") from None
        raise Abort(grpc.StatusCode.INTERNAL, f"cannot remove the publish target {target}: {e}") from None


def mount_options(fs: str, flags: list[str] | tuple[str, ...], readonly: bool) -> list[str]:
    """The options of the staging mount of a ``fs`` filesystem.

    xfs: ``nouuid``: a clone or a restored snapshot carries its source's filesystem UUID, and
    xfs refuses to mount a second filesystem with a UUID already mounted on the host ("duplicate
    UUID"), which is the case wherever the source is staged too.

    Read-only (a reader-only access mode, or ``readonly`` in publish_context: the disk is
    exported write-protected): no journal
    replay, which needs to write (``noload`` for ext3/4, ``norecovery`` for xfs). A volume
    restored from a crash-consistent snapshot, or one whose writer crashed, has a dirty
    journal, and a plain ro mount of it fails ("write access unavailable", "recovery required
    on read-only device")."""
    opts = list(flags)
    if readonly:
        opts.append("ro")
        skip = {"ext3": "noload", "ext4": "noload", "xfs": "norecovery"}.get(fs)
        if skip and skip not in opts:
            opts.append(skip)
    if fs == "xfs" and "nouuid" not in opts:
        opts.append("nouuid")
    return opts


class Node(pbg.NodeServicer):
    def __init__(self, node_id: str, host: Host | None = None, state_dir: str = "/var/lib/zstore-csi",
                 device_timeout: float = 60.0, sysfs: Path = Path("/sys"), mountinfo: Path = MOUNTINFO):
        self.node_id = node_id
        self.sysfs = sysfs              # for the raw disks' ro flag; tests point both elsewhere
        self.mountinfo = mountinfo
        self.host = host or Host()
        self.iscsi = Iscsiadm(self.host)
        self.state_dir = Path(state_dir)
        self.device_timeout = device_timeout
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        # volumes share targets (they are LUNs of one): a login/scan for one volume must not
        # interleave with the "last disk gone, log out" of another
        self._target_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        # stages between their LUN scan and their disk's appearance, per target (their disk
        # may not be in the session's list yet: the session is not unused)
        self._pending: defaultdict[str, int] = defaultdict(int)

    def _exclusive(self, vid: str) -> asyncio.Lock:
        """The volume's lock, free (ABORTED otherwise): taken with no await in between."""
        lock = self._locks[vid]
        if lock.locked():
            raise Abort(grpc.StatusCode.ABORTED, f"an operation on volume {vid} is in progress; retry")
        return lock

    # ---- state on disk ----
    def _state_path(self, vid: str) -> Path:
        return self.state_dir / f"{vid}.json"

    def _read_state(self, vid: str) -> tuple[dict[str, Any] | None, bool]:
        """(state, corrupt): the saved state, or None with corrupt=True when the file is there
        but unusable (empty or truncated by a power loss, not JSON, lacking the target or the
        WWN). A corrupt file is logged and counts as no saved state; it never fails a call."""
        path = self._state_path(vid)
        try:
            info = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None, False
        except (OSError, ValueError) as e:      # JSONDecodeError, UnicodeDecodeError are ValueErrors
            log.warning("volume %s: state file %s is unreadable (%s: %s): ignored",
                        vid, path, type(e).__name__, e)
            return None, True
        if not isinstance(info, dict) or not all(isinstance(info.get(k), str) and info[k]
                                                 for k in ("target", "wwn", "portal")):
            log.warning("volume %s: state file %s lacks target/wwn/portal: ignored", vid, path)
            return None, True
        return info, False

    def _load(self, vid: str) -> dict[str, Any] | None:
        return self._read_state(vid)[0]

    def _save(self, vid: str, info: dict[str, Any]) -> None:
        """Written durably: the temp file is fsynced before it replaces the state, and the
        directory after, so a power loss leaves the old state or the new one, not an empty file."""
        self._write_durably(self._state_path(vid), self._state_path(vid).with_suffix(".tmp"),
                            json.dumps(info).encode())

    def _fsync_state_dir(self) -> None:
        fd = os.open(self.state_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write_durably(self, path: Path, tmp: Path, data: bytes) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        self._fsync_state_dir()

    # The mark of our own mkfs, ``<volume id>.mkfs`` holding the disk's WWN: written before mkfs
    # runs, removed once a filesystem is on the disk. A file of its own, not a key of the state
    # file: NodeUnstage deletes the state file, and kubelet unstages an uncertain stage (mkfs of
    # a large volume killed at the call's deadline) once the pod goes away; without the mark the
    # next stage finds mkfs's partial writes, no signature, and refuses the disk forever.
    def _mkfs_mark_path(self, vid: str) -> Path:
        return self.state_dir / f"{vid}.mkfs"

    def _mark_mkfs(self, vid: str, wwn: str) -> None:
        # the temp name starts with a dot, which no volume id does: never another volume's file
        self._write_durably(self._mkfs_mark_path(vid), self.state_dir / f".{vid}.mkfs.tmp",
                            f"{wwn}\n".encode())

    def _mkfs_marked(self, vid: str, wwn: str) -> bool:
        """Whether our mkfs of the disk with WWN ``wwn`` was cut short: the mark is there and
        names that WWN (a stale mark of another disk formats nothing)."""
        try:
            return self._mkfs_mark_path(vid).read_text().strip() == wwn
        except FileNotFoundError:
            return False
        except (OSError, ValueError) as e:
            log.warning("volume %s: mkfs mark %s is unreadable (%s: %s): ignored",
                        vid, self._mkfs_mark_path(vid), type(e).__name__, e)
            return False

    def _clear_mkfs_mark(self, vid: str) -> None:
        path = self._mkfs_mark_path(vid)
        if path.exists():
            path.unlink(missing_ok=True)
            self._fsync_state_dir()

    async def _state_from_disk(self, vid: str, dev: str | None) -> dict[str, Any] | None:
        """For an unstage whose state file is corrupt: the target, portal and WWN of the session
        that has the volume's disk; None when no session has it. The disk is ``dev``, mounted at
        the staging path (a filesystem; its WWN from sysfs), else (raw block: nothing is
        mounted) the disk of the WWN the meta derives from the volume id, by its link: a stale
        link names no disk, so another volume's disk never leads to its session."""
        wwn = naming.volume_wwn(vid) if dev is None else self._wwn_of(dev) or ""
        dev = dev or self._linked_disk(wwn)
        if dev is None:
            return None
        name = os.path.basename(dev)
        s = next((s for s in await self.iscsi.sessions(detail=True) if name in s.disks), None)
        if s is None:
            return None
        return {"target": s.target, "portal": s.portal, "wwn": wwn, "lun": ""}

    # ---- devices ----
    async def _wait_device(self, wwn: str) -> str:
        """The /dev/sdX of the WWN; NOT_FOUND when udev never publishes it.

        FAILED_PRECONDITION when the link is a device-mapper device: multipathd claimed the
        disk (its by-id link then points at /dev/dm-N). zstore needs the SCSI disk itself
        (its sysfs wwid, ro flag, rescan and delete; one path is all the redirector's VIP
        gives), and a dm map over it is not ours to stack on or tear down."""
        link = by_id(wwn)
        deadline = time.monotonic() + self.device_timeout
        while True:
            if link.exists() and re.fullmatch(r"dm-\d+", os.path.basename(os.path.realpath(link))):
                raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                            f"{link} is {os.path.realpath(link)}: multipathd claimed the disk; zstore needs "
                            "the SCSI disk, blacklist it in multipath.conf (vendor \"ZSTORE\", or its wwid)")
            if link.exists() and self._is_disk_of(os.path.realpath(link), wwn) is not False:
                return os.path.realpath(link)
            if time.monotonic() > deadline:
                raise Abort(grpc.StatusCode.NOT_FOUND, f"{link} did not appear within {self.device_timeout:.0f}s")
            await asyncio.sleep(0.2)

    async def _remove_device(self, dev: str) -> None:
        """Flush and delete the SCSI device, so that no stale sdX stays behind the LUN."""
        name = os.path.basename(dev)
        await self.host.run(["blockdev", "--flushbufs", dev], ok=(0, 1))
        delete = self.sysfs / "block" / name / "device" / "delete"
        if delete.exists():
            delete.write_text("1")
        for _ in range(50):
            if not (self.sysfs / "block" / name).exists():
                return
            await asyncio.sleep(0.1)

    def _lun_disk(self, sid: int, lun: str) -> str | None:
        """/dev/sdX of the disk the kernel has at our LUN of session ``sid``, or None."""
        d = self.iscsi.lun_device(sid, lun)
        names = sorted(p.name for p in (d / "block").glob("*")) if d is not None else []
        return f"/dev/{names[0]}" if names else None

    async def _replace_stale_disk(self, vid: str, sid: int, info: dict[str, str]) -> None:
        """Under the target lock, after the LUN scan: the disk at our H:C:T:L must be our volume's.

        meta hands a deleted volume's LUN to the next volume at once; if this node still has
        the old disk there, the scan does not INQUIRE again, no link for our WWN ever appears,
        and the old volume's link points at our data. An unused stale disk (no mount, no
        holder, no stage of it here) is deleted and the LUN scanned again; a used one is
        FAILED_PRECONDITION."""
        d = self.iscsi.lun_device(sid, info["lun"])
        if d is None:
            return
        try:
            got = (d / "wwid").read_text().strip().lower().removeprefix("naa.")
        except OSError:
            return                       # not INQUIRED yet: a fresh device, ours
        if got == info["wwn"]:
            return
        names = sorted(p.name for p in (d / "block").glob("*"))
        used = [u for n in names for u in self._users(f"/dev/{n}")]
        used += [f"{n} holder {h.name}" for n in names for h in (d / "block" / n / "holders").glob("*")]
        used += [f"the stage of volume {p.stem}" for p in self.state_dir.glob("*.json")
                 if p.stem != vid and (self._load(p.stem) or {}).get("wwn") == got]
        what = f"{d.name} ({', '.join(f'/dev/{n}' for n in names) or 'no block device'}, wwid {got})"
        if used:
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                        f"LUN {info['lun']} of {info['target']} is still the disk of another volume here: "
                        f"{what}, in use by {', '.join(used[:3])}; unstage that volume first")
        log.warning("volume %s: deleting the stale disk %s at its LUN", vid, what)
        for n in names:
            await self.host.run(["blockdev", "--flushbufs", f"/dev/{n}"], ok=(0, 1))
        (d / "delete").write_text("1")
        for _ in range(50):
            if not d.exists():
                break
            await asyncio.sleep(0.1)
        else:
            raise Abort(grpc.StatusCode.UNAVAILABLE, f"the stale disk {what} at our LUN was not deleted in 5s")
        self.iscsi.scan_lun(sid, info["lun"])

    async def _sync_ro(self, name: str) -> None:
        """Make the raw disk ``name`` (sdX) read-only exactly while every publish of it is.

        A ro bind mount of a device node does not stop writes through it (the kernel checks
        the device, not the mount the node was opened through), so a readonly raw block
        publish sets the device's own ro flag; derived from the mount table each time, so a
        restart changes nothing."""
        flag = self.sysfs / "block" / name / "ro"
        if not flag.exists():
            return
        pubs = [m for m in mounts(self.mountinfo) if m.fstype == "devtmpfs" and m.root == f"/{name}"]
        want = bool(pubs) and all("ro" in m.options.split(",") for m in pubs)
        if want != (flag.read_text().strip() == "1"):
            await self.host.run(["blockdev", "--setro" if want else "--setrw", f"/dev/{name}"])

    async def _size(self, dev: str) -> int:
        _, out, _ = await self.host.run(["blockdev", "--getsize64", dev])
        return int(out.strip())

    # ---- RPCs ----
    @guard
    async def NodeGetInfo(self, request: pb.NodeGetInfoRequest,
                          context: grpc.aio.ServicerContext) -> pb.NodeGetInfoResponse:
        # The IQN normalized (lower case), as the meta stores ACL entries: iSCSI names are
        # case-insensitive, and the controller reports published_node_ids in this form.
        return pb.NodeGetInfoResponse(node_id=naming.normalize_iqn(self.node_id.strip()))

    @guard
    async def NodeGetCapabilities(self, request: pb.NodeGetCapabilitiesRequest,
                                  context: grpc.aio.ServicerContext) -> pb.NodeGetCapabilitiesResponse:
        return pb.NodeGetCapabilitiesResponse(capabilities=[
            pb.NodeServiceCapability(rpc=RPC(type=t)) for t in CAPABILITIES])

    @guard
    async def NodeStageVolume(self, request: pb.NodeStageVolumeRequest,
                              context: grpc.aio.ServicerContext) -> pb.NodeStageVolumeResponse:
        vid = volume_id(request)
        staging = required_path(request, "staging_target_path")
        if not request.HasField("volume_capability"):
            raise invalid("volume_capability is required")
        kind = check_capability(request.volume_capability)
        if kind != "block":
            refuse_symlink(staging, "staging_target_path")      # the filesystem mounts there
        info = attach_info(request)
        try:
            chap, discovery_chap = from_secrets(request.secrets)
        except ChapError as e:
            raise invalid(str(e))
        readonly = readonly_of(request)
        state = {**info, "kind": kind, "ro": readonly}
        async with self._exclusive(vid):
            prior = saved = self._load(vid)
            # our own mkfs of this disk was cut short (the plugin died in it, or the call's
            # deadline killed it): its mark, kept until a filesystem is on the disk
            mkfs_cut_short = self._mkfs_marked(vid, info["wwn"])
            if prior and prior.get("mkfs") is True and prior.get("wwn") == info["wwn"]:
                # the mark as 9631de3 kept it, in the state file: moved to its own file
                self._mark_mkfs(vid, info["wwn"])
                mkfs_cut_short = True
            if (readonly and prior is not None and prior.get("ro") is False and kind != "block"
                    and (sm := self._mount_at(staging)) is not None and "ro" in sm.options.split(",")):
                # staged before publish_context's readonly was read: recorded read-write, but
                # mount fell back to ro on the write-protected disk; the record is corrected
                prior = {**prior, "ro": True}
            self._check_compatible(vid, prior, info, kind, readonly)
            if self._already_staged(vid, prior, info, kind, staging):
                # kubelet re-sends NodeStage for staged volumes (after its own restart, say):
                # success, and nothing run that could fail and "undo" a volume in use
                if saved != state:
                    self._save(vid, state)
                if mkfs_cut_short:              # a filesystem of this disk is in use: no more mkfs
                    self._clear_mkfs_mark(vid)
                return pb.NodeStageVolumeResponse()
            # a state file from before this call (a stage cut short, then retried) is not
            # ours to remove when this one fails: the CO may still unstage the earlier one
            keep = prior is not None
            # written once the request is known compatible with an earlier stage (never a
            # block stage's state turned into a filesystem's), before the login: a plugin
            # that dies after it leaves unstage what it needs to log out
            self._save(vid, state)
            async with self._target_locks[info["target"]]:
                try:
                    s = await self.iscsi.attach(info["target"], info["portal"], info["lun"], chap, discovery_chap)
                    await self._replace_stale_disk(vid, s.sid, info)
                except (HostError, OSError) as e:
                    await self._undo_stage(vid, info, None, keep)
                    if isinstance(e, AuthFailed):
                        raise Abort(grpc.StatusCode.UNAUTHENTICATED,
                                    f"iSCSI {e}: check the CHAP credentials in the node-stage secret")
                    raise Abort(grpc.StatusCode.UNAVAILABLE, f"iSCSI login to {info['target']}: {e}")
                except Abort:
                    await self._undo_stage(vid, info, None, keep)
                    raise
                self._pending[info["target"]] += 1
            # the wait (up to device_timeout) is outside the target lock, or one stuck volume
            # stalls every stage and unstage of the target's (up to 255) volumes; the pending
            # count keeps an unstage of another volume from logging the session out meanwhile
            try:
                dev = await self._wait_device(info["wwn"])
            except BaseException as e:
                self._pending[info["target"]] -= 1
                if isinstance(e, Abort):
                    async with self._target_locks[info["target"]]:
                        # the disk the scan found, if any (udev never linked it): deleted with the rest
                        await self._undo_stage(vid, info, self._lun_disk(s.sid, info["lun"]), keep)
                raise
            self._pending[info["target"]] -= 1
            if kind == "block":
                if mkfs_cut_short:              # the disk is the application's now: never formatted
                    self._clear_mkfs_mark(vid)
                return pb.NodeStageVolumeResponse()
            m = self._mount_at(staging)
            if m is not None:
                if os.path.realpath(m.source) != dev:
                    raise Abort(grpc.StatusCode.ALREADY_EXISTS, f"{staging} has {m.source} mounted, not {dev}")
                if mkfs_cut_short:              # mounted: a filesystem is there
                    self._clear_mkfs_mark(vid)
                return pb.NodeStageVolumeResponse()
            # A disk something else uses (a pod's raw block publish of it, a filesystem of it
            # mounted elsewhere, a holder such as a dm map) is neither probed nor formatted:
            # blkid calls a raw volume's data "blank", and mkfs would destroy it. Nothing is
            # undone either: the session and disk are in use.
            users = self._users(dev) + self._holders(dev)
            if users:
                if not keep:
                    self._state_path(vid).unlink(missing_ok=True)
                raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                            f"{dev} (volume {vid}) is in use by {', '.join(users[:3])}: not mounting it at "
                            f"{staging}; unpublish and unstage it there first")
            try:
                fs = await probe_device(self.host, dev, mkfs_cut_short=mkfs_cut_short)
                if not fs and readonly:
                    # exported write-protected: a mkfs could only fail, on every retry
                    why = Mode.Mode.Name(request.volume_capability.access_mode.mode)
                    if request.volume_capability.access_mode.mode not in READ_ONLY:
                        why = "readonly in publish_context"
                    raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"volume {vid} has no filesystem and is staged read-only "
                                f"({why}): nothing to mount, and it cannot be formatted")
                if not fs:
                    # marked first: a retry after a mkfs cut short finds its partial writes and
                    # no signature, which is not blank, and would otherwise refuse the disk forever
                    self._mark_mkfs(vid, info["wwn"])
                    await self.host.run([f"mkfs.{kind}", *(["-F", "-q"] if kind == "ext4" else ["-q"]), dev])
                    fs = kind
                    # done: the filesystem's signature speaks for the disk from now on
                    self._clear_mkfs_mark(vid)
                    mkfs_cut_short = False
                os.makedirs(staging, exist_ok=True)
                opts = mount_options(fs, request.volume_capability.mount.mount_flags, readonly)
                await self.host.run(["mount", "-t", fs, *(["-o", ",".join(opts)] if opts else []), dev, staging])
            except Exception:
                if self._mount_at(staging) is None:
                    async with self._target_locks[info["target"]]:
                        # the mark of a mkfs that did not finish stays (a file of its own) for the retry
                        await self._undo_stage(vid, info, dev, keep)
                raise
            if mkfs_cut_short:                  # an earlier mkfs had finished: its mark goes
                self._clear_mkfs_mark(vid)
        return pb.NodeStageVolumeResponse()

    def _mount_at(self, path: str) -> Any:
        return mount_at(path, mounts(self.mountinfo))

    def _wwn_of(self, dev: str) -> str | None:
        """The disk's WWN as the kernel read it (``device/wwid``, "naa.<hex>"), or None."""
        try:
            wwid = (self.sysfs / "block" / os.path.basename(dev) / "device" / "wwid").read_text()
        except OSError:
            return None
        return wwid.strip().lower().removeprefix("naa.")

    def _is_disk_of(self, dev: str, wwn: str) -> bool | None:
        """Whether ``dev`` is the disk with WWN ``wwn``: from sysfs, else from the by-id link;
        None when neither says (the link is missing and sysfs has no wwid)."""
        got = self._wwn_of(dev)
        if got is not None:
            return got == wwn
        link = by_id(wwn)
        return os.path.realpath(link) == dev if link.exists() else None

    def _link(self, wwn: str) -> tuple[str | None, bool]:
        """(disk, stale): the disk ``/dev/disk/by-id/wwn-0x<wwn>`` names (None: no link), and
        whether the link is stale: it names a disk whose sysfs wwid is another WWN (the
        volume's disk went away and its sdX name was reused for another volume's disk before
        udev removed the link). Nothing may be deleted, bound or grown through such a link."""
        link = by_id(wwn)
        if not link.exists():
            return None, False
        dev = os.path.realpath(link)
        stale = self._is_disk_of(dev, wwn) is False
        if stale:
            log.warning("%s names %s, whose wwid is %s: a stale link, not this volume's disk",
                        link, dev, self._wwn_of(dev))
        return dev, stale

    def _linked_disk(self, wwn: str) -> str | None:
        """The disk of the WWN by its link; None when there is no link or a stale one."""
        dev, stale = self._link(wwn)
        return None if stale else dev

    def _staged_disk(self, vid: str, info: dict[str, Any] | None, code: grpc.StatusCode) -> str:
        """The disk of the staged volume ``vid`` by its WWN link; ``code`` when the volume is
        not staged here (no state, no link), FAILED_PRECONDITION when the link names another
        volume's disk."""
        dev, stale = self._link(info["wwn"]) if info is not None else (None, False)
        if dev is None:
            raise Abort(code, f"volume {vid} is not staged on this node")
        if stale:
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                        f"{by_id(info['wwn'])} names {dev}, whose wwid is {self._wwn_of(dev)}, not volume "
                        f"{vid}'s {info['wwn']}: a stale link to another volume's disk; stage the volume again")
        return dev

    @staticmethod
    def _check_compatible(vid: str, prior: dict[str, Any] | None, info: dict[str, str], kind: str,
                          readonly: bool) -> None:
        """ALREADY_EXISTS (the spec's "volume published but is incompatible") when this node
        has a stage of the same disk (the state's WWN) as raw block and a filesystem is asked,
        or the reverse, or another fs_type, or a filesystem staged read-write and read-only
        asked (or the reverse). A state from before the ``ro`` key is not compared on it."""
        if prior is None or prior.get("wwn") != info["wwn"] or "kind" not in prior:
            return
        was = prior["kind"]
        if was != kind:
            def what(k: str) -> str:
                return "raw block" if k == "block" else f"a filesystem ({k})"
            raise Abort(grpc.StatusCode.ALREADY_EXISTS,
                        f"volume {vid} is staged on this node as {what(was)}, not {what(kind)}: "
                        "unstage it first")
        if kind != "block" and "ro" in prior and bool(prior["ro"]) != readonly:
            modes = ("read-write", "read-only")
            raise Abort(grpc.StatusCode.ALREADY_EXISTS,
                        f"volume {vid} is staged on this node {modes[bool(prior['ro'])]}, "
                        f"not {modes[readonly]}: unstage it first")

    def _holders(self, dev: str) -> list[str]:
        """The kernel's holders of the disk (dm maps, md arrays): ``holder dm-0``."""
        d = self.sysfs / "block" / os.path.basename(dev) / "holders"
        return [f"holder {h.name}" for h in sorted(d.glob("*"))]

    def _refuse_held(self, dev: str | None) -> None:
        """FAILED_PRECONDITION while a holder (a dm map, LVM, md over the disk) uses ``dev`` as
        a mount does: deleting the disk under it fails its I/O, logging out takes it away."""
        holders = self._holders(dev) if dev is not None else []
        if holders:
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                        f"{dev} is in use by {', '.join(holders[:3])}: remove it first "
                        "(dmsetup remove, vgchange -an, mdadm --stop)")

    def _already_staged(self, vid: str, prior: dict[str, str] | None, info: dict[str, str], kind: str,
                        staging: str) -> bool:
        """A repeated NodeStage of a volume staged here: the disk mounted at the staging path
        (a filesystem), or the state of an earlier stage of this WWN and its disk present (raw
        block). ALREADY_EXISTS when another disk is mounted there."""
        if kind != "block":
            m = self._mount_at(staging)
            if m is None:
                return False
            dev = os.path.realpath(m.source)
            ours = self._is_disk_of(dev, info["wwn"])
            if ours is False:
                raise Abort(grpc.StatusCode.ALREADY_EXISTS, f"{staging} has {m.source} mounted, "
                            f"not volume {vid} (wwn {info['wwn']})")
            return bool(ours)
        return (prior is not None and prior.get("wwn") == info["wwn"]
                and self._linked_disk(info["wwn"]) is not None)

    async def _undo_stage(self, vid: str, info: dict[str, str], dev: str | None, keep_state: bool = False) -> None:
        """A NodeStage that failed after logging in leaves nothing behind (under the target
        lock): a final error tells the CO nothing was staged, so no NodeUnstage would ever
        come for the session, the disk and the node record (which may hold CHAP secrets).
        ``keep_state``: the state file was there before the call, and stays."""
        try:
            self._refuse_held(dev)
            await self._release(info, dev)
        except Exception as e:  # noqa: BLE001 - the stage's own error is the one to report
            log.warning("volume %s: undoing a failed stage: %s", vid, e)
            return
        if not keep_state:
            self._state_path(vid).unlink(missing_ok=True)

    def _users(self, dev: str) -> list[str]:
        """Mount points still using the disk ``dev``: its filesystem, or a bind of its node."""
        name = os.path.basename(dev)
        return [m.target for m in mounts(self.mountinfo)
                if os.path.realpath(m.source) == dev
                or (m.fstype == "devtmpfs" and m.root == f"/{name}")]

    async def _release(self, info: dict[str, str], dev: str | None) -> None:
        """Under the target lock: delete the disk ``dev`` (FAILED_PRECONDITION while anything
        still mounts it: a publish not yet unpublished, a second staging path), then log out
        of the target once no disk of it is left. Its holders are checked by the caller
        (_refuse_held), before anything changes."""
        if dev is not None:
            users = self._users(dev)
            if users:
                raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                            f"{dev} is still mounted at {', '.join(users[:3])}: unpublish it first")
            await self._remove_device(dev)
        s = await self.iscsi.session_for(info["target"], detail=True)
        if s is not None and not [d for d in s.disks if f"/dev/{d}" != dev]:
            if self._pending[info["target"]]:
                log.info("%s: no disk left, but a stage is waiting for its disk: staying logged in",
                         info["target"])
                return
            await self.iscsi.detach(s, info["portal"])

    @guard
    async def NodeUnstageVolume(self, request: pb.NodeUnstageVolumeRequest,
                                context: grpc.aio.ServicerContext) -> pb.NodeUnstageVolumeResponse:
        vid = volume_id(request)
        staging = required_path(request, "staging_target_path")
        async with self._exclusive(vid):
            m = self._mount_at(staging)
            dev = os.path.realpath(m.source) if m is not None and m.source.startswith("/dev/") else None
            info, corrupt = self._read_state(vid)
            if corrupt:
                # the state file was lost to a crash: the volume's disk says which session it is on
                info = await self._state_from_disk(vid, dev)
            if dev is not None and info is not None and self._is_disk_of(dev, info["wwn"]) is False:
                # another volume's disk at our staging path: unmounted, never deleted by us
                log.warning("volume %s: %s at %s is not its disk (wwid %s): not deleting it",
                            vid, dev, staging, self._wwn_of(dev))
                dev = None
            elif dev is None and info is not None:
                # a stale link (another volume's disk) counts as "our disk is gone"
                dev = self._linked_disk(info["wwn"])
            # Refused before anything changes: unmounting the staging path under a publish
            # that is still there leaves kubelet a volume it cannot publish again (a second
            # pod: "not staged") and cannot stage again (the disk is in use).
            # the kernel lists the staging mount at its canonical path (a symlinked kubelet root)
            others = [u for u in self._users(dev) if u != canonical(staging)] if dev is not None else []
            if others:
                raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                            f"{dev} is still mounted at {', '.join(others[:3])}: unpublish it first")
            self._refuse_held(dev)
            if m is not None:
                await self.host.run(["umount", m.target])      # the mount found, canonical
            if info is None:
                if corrupt:
                    self._state_path(vid).unlink(missing_ok=True)
                return pb.NodeUnstageVolumeResponse()      # never staged here, or done already
            async with self._target_locks[info["target"]]:
                await self._release(info, dev)
            self._state_path(vid).unlink(missing_ok=True)
        return pb.NodeUnstageVolumeResponse()

    @guard
    async def NodePublishVolume(self, request: pb.NodePublishVolumeRequest,
                                context: grpc.aio.ServicerContext) -> pb.NodePublishVolumeResponse:
        vid = volume_id(request)
        staging = required_path(request, "staging_target_path")
        target = required_path(request, "target_path")
        if not request.HasField("volume_capability"):
            raise invalid("volume_capability is required")
        refuse_symlink(target, "target_path")
        kind = check_capability(request.volume_capability)
        ro = request.readonly or readonly_of(request)
        async with self._exclusive(vid):
            m = self._mount_at(target)
            if m is not None:
                if (m.fstype == "devtmpfs") != (kind == "block"):
                    raise Abort(grpc.StatusCode.ALREADY_EXISTS,
                                f"{target} is published as a {'raw block' if kind != 'block' else 'filesystem'}"
                                f" volume, not as asked")
                if not ro and "ro" in m.options.split(","):
                    raise Abort(grpc.StatusCode.ALREADY_EXISTS, f"{target} is published readonly, not read-write")
                self._check_published_here(vid, m, kind, staging)
                if ro and "ro" not in m.options.split(","):
                    # A publish cut short between the bind and its ro remount (the plugin
                    # restarted, or the call was cancelled): finish it, never answer rw as ro.
                    await self.host.run(["mount", "-o", "remount,bind,ro", target])
                if kind == "block" and m.fstype == "devtmpfs":
                    await self._sync_ro(m.root.lstrip("/"))   # a restart may have come in between
                return pb.NodePublishVolumeResponse()
            if kind == "block":
                src = self._staged_disk(vid, self._load(vid), grpc.StatusCode.FAILED_PRECONDITION)
                Path(target).parent.mkdir(parents=True, exist_ok=True)
                Path(target).touch()
            else:
                if self._mount_at(staging) is None:
                    raise Abort(grpc.StatusCode.FAILED_PRECONDITION, f"volume {vid} is not staged at {staging}")
                src = staging
                os.makedirs(target, exist_ok=True)
            await self.host.run(["mount", "--bind", src, target])
            if ro:
                await self.host.run(["mount", "-o", "remount,bind,ro", target])
            if kind == "block":
                await self._sync_ro(os.path.basename(src))
        return pb.NodePublishVolumeResponse()

    def _check_published_here(self, vid: str, m: Any, kind: str, staging: str) -> None:
        """The mount ``m`` at a publish's target path is this volume's: a bind of its staging
        mount (same source and root; filesystem) or of its disk's device node (raw block).
        ALREADY_EXISTS when it is another volume's; FAILED_PRECONDITION, as for a first
        publish, when this volume is not staged (nothing to tell it by)."""
        if kind == "block":
            disk = self._staged_disk(vid, self._load(vid), grpc.StatusCode.FAILED_PRECONDITION)
            if m.root != f"/{os.path.basename(disk)}":
                raise Abort(grpc.StatusCode.ALREADY_EXISTS, f"{m.target} is a publish of /dev{m.root}, "
                            f"not of volume {vid}'s disk {disk}")
            return
        sm = self._mount_at(staging)
        if sm is None:
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION, f"volume {vid} is not staged at {staging}")
        if os.path.realpath(m.source) != os.path.realpath(sm.source) or m.root != sm.root:
            raise Abort(grpc.StatusCode.ALREADY_EXISTS, f"{m.target} has {m.source} ({m.root}) mounted, not "
                        f"volume {vid}'s staging mount {staging} ({sm.source})")

    @guard
    async def NodeUnpublishVolume(self, request: pb.NodeUnpublishVolumeRequest,
                                  context: grpc.aio.ServicerContext) -> pb.NodeUnpublishVolumeResponse:
        vid = volume_id(request)
        target = required_path(request, "target_path")
        async with self._exclusive(vid):
            disks = set()
            while (m := self._mount_at(target)) is not None:
                if m.fstype == "devtmpfs" and m.root != "/":
                    disks.add(m.root.lstrip("/"))
                await self.host.run(["umount", m.target])  # the mount found, canonical
            for name in disks:                  # the last readonly publish gone: writable again
                await self._sync_ro(name)
            remove_publish_target(target)
        return pb.NodeUnpublishVolumeResponse()

    @guard
    async def NodeGetVolumeStats(self, request: pb.NodeGetVolumeStatsRequest,
                                 context: grpc.aio.ServicerContext) -> pb.NodeGetVolumeStatsResponse:
        vid = volume_id(request)
        path = required_path(request, "volume_path")
        m = self._mount_at(path) if os.path.exists(path) else None
        if m is None:
            raise Abort(grpc.StatusCode.NOT_FOUND, f"{path} is not a published volume")
        # the spec's NOT_FOUND is also "volume_id does not exist on volume_path": a disk there
        # whose wwid is another volume's (a raw bind names it by its root, a filesystem by source)
        disk = f"/dev{m.root}" if m.fstype == "devtmpfs" else os.path.realpath(m.source)
        wwn = (self._load(vid) or {}).get("wwn") or naming.volume_wwn(vid)
        got = self._wwn_of(disk)
        if got is not None and got != wwn:
            raise Abort(grpc.StatusCode.NOT_FOUND, f"{path} has {disk} (wwid {got}) mounted, "
                        f"not volume {vid}'s disk (wwn {wwn})")
        U = pb.VolumeUsage
        if not os.path.isdir(path):
            size = await self._size(path)
            return pb.NodeGetVolumeStatsResponse(usage=[U(total=size, unit=U.BYTES)])
        st = os.statvfs(path)
        return pb.NodeGetVolumeStatsResponse(usage=[
            U(total=st.f_blocks * st.f_frsize, available=st.f_bavail * st.f_frsize,
              used=(st.f_blocks - st.f_bfree) * st.f_frsize, unit=U.BYTES),
            U(total=st.f_files, available=st.f_favail, used=st.f_files - st.f_ffree, unit=U.INODES)])

    @guard
    async def NodeExpandVolume(self, request: pb.NodeExpandVolumeRequest,
                               context: grpc.aio.ServicerContext) -> pb.NodeExpandVolumeResponse:
        vid = volume_id(request)
        path = required_path(request, "volume_path")
        async with self._exclusive(vid):
            info = self._load(vid)
            dev = self._staged_disk(vid, info, grpc.StatusCode.NOT_FOUND)
            want = request.capacity_range.required_bytes if request.HasField("capacity_range") else 0
            # the device's own rescan re-reads its capacity; a session rescan would attach
            # every other LUN of the target as well
            rescan = self.sysfs / "block" / os.path.basename(dev) / "device" / "rescan"
            deadline = time.monotonic() + self.device_timeout
            while True:
                if rescan.exists():
                    rescan.write_text("1")
                size = await self._size(dev)
                if size >= want:
                    break
                if time.monotonic() > deadline:
                    raise Abort(grpc.StatusCode.INTERNAL, f"{dev} is {size} bytes, not {want}, after a rescan")
                await asyncio.sleep(0.5)
            # What is at volume_path decides, not the stage's kind or the request's capability
            # (either may say raw block over a filesystem): a filesystem there is grown, or the
            # call fails; success is never answered for a filesystem left at its old size.
            m = self._mount_at(path)
            block = info.get("kind") == "block" or (
                request.HasField("volume_capability") and request.volume_capability.HasField("block"))
            if m is None:
                if not block:
                    raise Abort(grpc.StatusCode.NOT_FOUND, f"{path} is not mounted")
            elif m.fstype != "devtmpfs":                # a raw block publish: no filesystem to grow
                if os.path.realpath(m.source) != dev:
                    raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"{path} has {m.source} mounted, not volume {vid}'s disk {dev}")
                if m.fstype == "xfs":
                    await self.host.run(["xfs_growfs", path])
                elif m.fstype in ("ext2", "ext3", "ext4"):
                    await self.host.run(["resize2fs", dev])
                else:
                    raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"{path} is a {m.fstype} filesystem: zstore grows only ext4 and xfs")
        return pb.NodeExpandVolumeResponse(capacity_bytes=size)
