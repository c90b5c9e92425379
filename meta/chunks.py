"""Chunk servers as the meta service sees them: registration + liveness + admin state.

A chunk server writes ``info`` (what it is) and ``live`` (under its lease:
that it is alive right now); the meta leader writes ``admin`` (drain state,
when it went down). Status is derived from the live key, so it is exactly as
fresh as etcd's lease expiry: a dead server shows down within its TTL.

``down_since`` belongs to one registration: the server rewrites ``info`` each time it
registers (before its live key), so an ``admin`` record written before the ``info`` key's
current mod revision names an outage that ended when the server registered again, even if
no leader saw it up in between (a leader change, a watch relisting). Such a ``down_since``
is not counted (``ChunkView.down_since``), and the leader records the current outage from
when it sees it (``mark_liveness``). While the leader watches, an info write of a server
that stays down keeps its outage's start; the leader sets it aside meanwhile (a marker: the
admin record with ``down_since`` None, counted as not known, like an older record) and
writes it back from what its own ordered stream of events shows (``mark_registration``,
``restore_outage``).
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from zstore.errors import Conflict, NotFound
from zstore.etcd import get_prefix_paged
from zstore.records import ChunkAdmin, ChunkInfo, ChunkLive, ExtentRecord, Volume, now

from .context import Ctx
from .placement import Candidate

log = logging.getLogger(__name__)


@dataclass
class ChunkView:
    info: ChunkInfo | None
    live: ChunkLive | None
    admin: ChunkAdmin | None
    chunk_id: str
    removing: bool = False        # a removal holds its marker (``remove_chunk``): no new replica
    # Mod revisions of the info and admin keys as listed (0: not known, e.g. a view built by
    # hand): an admin record older than the info key predates the latest registration.
    info_rev: int = 0
    admin_rev: int = 0

    @property
    def up(self) -> bool:
        return self.live is not None

    @property
    def down_since(self) -> float | None:
        """When the current outage began, as the leader recorded it; None while up, and while
        the recorded outage is one from before the server's latest registration (it came back
        since: the current outage is not recorded yet, so it has had no grace counted)."""
        if self.up or self.admin is None:
            return None
        return current_down_since(self.admin, self.admin_rev, self.info_rev)

    @property
    def draining(self) -> bool:
        return self.admin is not None and self.admin.state == "draining"

    @property
    def stopping(self) -> bool:
        """Up but shutting down (its live key stays until its writes are flushed): still
        an owner for fencing, but no place for a new replica or a new login."""
        return self.live is not None and self.live.stopping

    @property
    def disks(self) -> list[dict[str, Any]]:
        if self.live and self.live.disks:
            return self.live.disks
        return self.info.disks if self.info else []

    @property
    def capacity(self) -> int:
        return space(self.disks)[0]

    @property
    def used(self) -> int:
        return space(self.disks)[1]

    @property
    def free(self) -> int:
        """What placement weighs servers by: room left on its ok disks, each filesystem once."""
        return space(self.disks)[2]

    def to_dict(self) -> dict[str, Any]:
        i = self.info
        return {
            "chunk_id": self.chunk_id,
            "hostname": i.hostname if i else "",
            "address": i.address if i else "",
            "data_port": i.data_port if i else 0,
            "portal": i.portal if i else "",
            "labels": i.labels if i else {},
            "capacity": self.capacity,
            "used": self.used,
            "free": self.free,
            "status": "up" if self.up else "down",
            "stopping": self.stopping,
            "state": self.admin.state if self.admin else "active",
            "down_since": self.down_since,
            "heartbeat": self.live.heartbeat if self.live else None,
            "started": self.live.started if self.live else None,
            "disks": self.disks,
            "sessions": self.live.sessions if self.live else [],
            "storage": self.live.storage if self.live else {},
            "registered": i.registered if i else None,
        }


def disk_free(d: dict[str, Any]) -> int:
    """A disk's free bytes: its record's (capped by what its filesystem has available),
    or capacity - used in a record from before the field."""
    if "free" in d:
        return max(int(d["free"]), 0)
    return max(int(d.get("capacity", 0)) - int(d.get("used", 0)), 0)


def space(disks: list[dict[str, Any]]) -> tuple[int, int, int]:
    """(capacity, used, free) bytes of disk records, a filesystem several share counted once.

    Failed disks count for nothing, full ones for no free space. Disks are grouped by
    ``fs`` (one filesystem cluster-wide; a record without it is its own). In a group, a
    disk without a capacity limit stands for the whole filesystem: its size, everything on
    it used; with limits only, the limits (at most the filesystem's size) and zstore's own
    bytes. Free space is the ok disks' sum, at most what the filesystem has available.
    docs/storage.md, "Disk space".
    """
    groups: dict[Any, list[dict[str, Any]]] = {}
    for i, d in enumerate(disks):
        if d.get("state", "ok") != "failed":
            groups.setdefault(d.get("fs") or ("disk", i), []).append(d)
    capacity = used = free = 0
    for ds in groups.values():
        free_here = sum(disk_free(d) for d in ds if d.get("state", "ok") == "ok")
        if "fs_capacity" not in ds[0]:           # an older record: as it says
            capacity += sum(int(d.get("capacity", 0)) for d in ds)
            used += sum(int(d.get("used", 0)) for d in ds)
            free += free_here
            continue
        fs_capacity = max(int(d.get("fs_capacity", 0)) for d in ds)
        fs_free = min(int(d.get("fs_free", 0)) for d in ds)   # probed apart: the lower
        if any(not d.get("limited") for d in ds):
            capacity += fs_capacity
            used += max(fs_capacity - fs_free, 0)
        else:
            capacity += min(sum(int(d.get("capacity", 0)) for d in ds), fs_capacity)
            used += sum(int(d.get("used", 0)) for d in ds)
        free += min(free_here, fs_free)
    return capacity, used, free


def current_down_since(admin: ChunkAdmin, admin_rev: int, info_rev: int) -> float | None:
    """``admin.down_since`` if it names the outage of the server's latest registration: the
    admin record was written after the info key (or either revision is not known, 0)."""
    if admin_rev and info_rev and admin_rev < info_rev:
        return None
    return admin.down_since


async def list_chunks(ctx: Ctx) -> list[ChunkView]:
    base = ctx.keys.chunks()
    parts: dict[str, dict[str, Any]] = {}
    kvs, _ = await get_prefix_paged(ctx.etcd, base)     # with mod revisions (``down_since``)
    for kv in kvs:
        kp = ctx.keys.chunk_key_parts(kv.key, base)
        if kp:
            parts.setdefault(kp[0], {})[kp[1]] = kv
    views = []
    for cid, p in sorted(parts.items()):
        if "info" not in p:
            continue        # a half-removed or never-registered id: nothing to show
        views.append(ChunkView(
            info=ChunkInfo.decode(p["info"].value),
            live=ChunkLive.decode(p["live"].value) if "live" in p else None,
            admin=ChunkAdmin.decode(p["admin"].value) if "admin" in p else None,
            chunk_id=cid, removing=REMOVING in p, info_rev=p["info"].mod_revision,
            admin_rev=p["admin"].mod_revision if "admin" in p else 0))
    return views


MIN_PREFIX = 4


async def get_chunk(ctx: Ctx, chunk_id: str) -> ChunkView:
    """A chunk server by its id, or by a prefix of 4+ characters that only it has."""
    views = await list_chunks(ctx)
    for v in views:
        if v.chunk_id == chunk_id:
            return v
    matches = [v for v in views if len(chunk_id) >= MIN_PREFIX and v.chunk_id.startswith(chunk_id)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        ids = [v.chunk_id for v in matches]
        raise Conflict(f"chunk server id {chunk_id!r} is ambiguous: matches "
                       + ", ".join(ids[:5]) + ("..." if len(ids) > 5 else ""),
                       hint="give more of the id (see `zstore chunk list`)", matches=ids)
    raise NotFound(f"chunk server {chunk_id!r} not found", hint="see `zstore chunk list`")


def candidates(views: list[ChunkView]) -> tuple[list[Candidate], int]:
    """Usable placement targets (up, active, not stopping) and how many servers are not usable."""
    usable = [v for v in views if v.up and not v.draining and not v.stopping and not v.removing]
    return ([Candidate(chunk_id=v.chunk_id, free=v.free, labels=v.info.labels if v.info else {},
                       host=v.info.hostname if v.info else "") for v in usable],
            len(views) - len(usable))


async def set_admin_state(ctx: Ctx, chunk_id: str, state: str) -> ChunkView:
    view = await get_chunk(ctx, chunk_id)
    key = ctx.keys.chunk_admin(view.chunk_id)
    info_key, live_key = ctx.keys.chunk_info(view.chunk_id), ctx.keys.chunk_live(view.chunk_id)
    for _ in range(10):
        admin, rev = await ctx.get(key, ChunkAdmin)
        admin = admin or ChunkAdmin(chunk_id=view.chunk_id)
        if admin.state == state:
            break
        info = await ctx.etcd.get(info_key)
        compare = [ctx.unchanged(key, rev) if rev else ctx.absent(key)]
        if info is not None:
            compare.append(ctx.unchanged(info_key, info.mod_revision))
            if admin.down_since is not None and current_down_since(admin, rev, info.mod_revision) is None:
                # The outage it names ended with a registration since: this write would make it
                # look current (newer than the info key). The current one starts now, if any.
                live = await ctx.etcd.get(live_key)
                admin.down_since = None if live is not None else now()
                compare.append(ctx.absent(live_key) if live is None else ctx.t.version(live_key) > 0)
        admin.state, admin.changed = state, now()
        if await ctx.txn(compare, [ctx.put(key, admin)]):
            log.info("chunk server %s is now %s", view.chunk_id, state)
            break
    return await get_chunk(ctx, view.chunk_id)


REMOVE_ATTEMPTS = 5     # fresh starts a removal takes while the server's own records keep changing
REMOVING = "removing"   # kind of the marker key a removal puts under the server's records
REMOVING_TTL = 60       # seconds: a removal that dies midway leaves no marker for longer


def removing_key(ctx: Ctx, chunk_id: str) -> bytes:
    """The marker of a removal in progress, beside the server's info/live/admin keys (the
    removal's prefix delete takes it too)."""
    return ctx.keys.chunk_dir(chunk_id) + REMOVING.encode()


def placeable(ctx: Ctx, chunk_id: str) -> list:
    """Compares for a transaction that puts a replica on ``chunk_id``: still registered and no
    removal under way (``remove_chunk``)."""
    return [ctx.t.version(ctx.keys.chunk_info(chunk_id)) > 0,
            ctx.absent(removing_key(ctx, chunk_id))]


async def holders_of(ctx: Ctx, chunk_id: str) -> list[str]:
    """Names of the volumes an extent record lists ``chunk_id`` in sync for.

    The extent map, not the volumes' planned placement, says where data is: once recovery
    moved a server's replicas away it holds none, whatever the plan said."""
    kvs, _ = await get_prefix_paged(ctx.etcd, ctx.keys.all_extents())
    vids = sorted({rec.volume_id for rec in map(ExtentRecord.decode, (kv.value for kv in kvs))
                   if chunk_id in rec.replicas})
    if not vids:
        return []
    names = {v.volume_id: v.name for _, v in await ctx.list(ctx.keys.volumes(), Volume)}
    return [names.get(vid, vid) for vid in vids]


async def remove_chunk(ctx: Ctx, chunk_id: str, force: bool) -> str:
    """Delete a chunk server's records: only while it is down and holds no in-sync replica
    (``force`` skips both checks).

    Guarded at the server, not over the whole extent map: one transaction first marks the
    server as being removed (a ``removing`` key under its records, on a lease so a removal
    that dies midway does not keep it), if it is still down and its info unchanged.
    Placement and join require that marker absent (``placeable``), so from then on no
    replica lands on it; the extent map read after the mark shows every one that landed
    before. The delete then requires that none of the server's keys was put since the mark
    and the mark is still this removal's. Writes to other extents meanwhile do not matter;
    the server registering again fails the delete, and the checks run again on fresh reads
    (a persisting change answers 409).
    """
    cid = (await get_chunk(ctx, chunk_id)).chunk_id
    info_key, live_key, mark = ctx.keys.chunk_info(cid), ctx.keys.chunk_live(cid), removing_key(ctx, cid)
    for _ in range(REMOVE_ATTEMPTS):
        info = await ctx.etcd.get(info_key)
        if info is None:
            raise NotFound(f"chunk server {chunk_id!r} not found", hint="see `zstore chunk list`")
        if await ctx.etcd.get(live_key) is not None and not force:
            raise Conflict(f"chunk server {cid} is up",
                           hint="stop it first, or drain it and pass --force to remove it anyway")
        if await ctx.etcd.get(mark) is not None:
            raise Conflict(f"chunk server {cid} is being removed by another request",
                           hint=f"see `zstore chunk list`; retry in {REMOVING_TTL}s if it stays",
                           retry=True)
        token = uuid.uuid4().hex.encode()
        lease = await ctx.etcd.lease(REMOVING_TTL)
        try:
            compare = [ctx.unchanged(info_key, info.mod_revision), ctx.absent(mark)]
            if not force:
                compare.append(ctx.absent(live_key))
            if not await ctx.txn(compare, [ctx.etcd.transactions.put(mark, token, lease=lease)]):
                continue
            got = await ctx.etcd.get(mark)
            if got is None or got.value != token:
                continue
            marked = got.mod_revision
            holders = [] if force else await holders_of(ctx, cid)
            if holders:
                raise Conflict(f"chunk server {cid} holds replicas of {len(holders)} volume(s): "
                               + ", ".join(holders[:5]) + ("..." if len(holders) > 5 else ""),
                               hint="wait for recovery to move them, or pass --force", volumes=holders)
            compare = [ctx.unchanged(mark, marked), ctx.untouched_since(ctx.keys.chunk_dir(cid), marked)]
            if await ctx.txn(compare, [ctx.delete(ctx.keys.chunk_dir(cid), prefix=True)]):
                log.warning("chunk server %s removed from the cluster%s", cid, " (forced)" if force else "")
                return cid
        finally:
            # The marker goes with the lease (if the delete left it); else it expires.
            with contextlib.suppress(Exception):
                await lease.revoke()
    raise Conflict(f"chunk server {cid} was not removed: its records kept changing while it was "
                   f"being removed ({REMOVE_ATTEMPTS} attempts)",
                   hint="see `zstore chunk list`, then retry", retry=True)


async def mark_liveness(ctx: Ctx, chunk_id: str, up: bool) -> None:
    """Leader bookkeeping: remember when a chunk server went down (for recovery grace).

    Down: an outage already recorded since the server's latest registration keeps its start;
    one recorded before it is over (the server came back, whether or not a leader saw it up),
    and the current one is recorded from now. (A registration that does not come up while
    the liveness follower watches: ``mark_registration``.)"""
    key, info_key = ctx.keys.chunk_admin(chunk_id), ctx.keys.chunk_info(chunk_id)
    for _ in range(5):
        info = await ctx.etcd.get(info_key)
        if info is None:
            return
        admin, rev = await ctx.get(key, ChunkAdmin)
        admin = admin or ChunkAdmin(chunk_id=chunk_id)
        fresh = rev > info.mod_revision          # written since the latest registration
        if up:
            want = None
            if admin.down_since is None and rev:
                return
        else:
            want = (admin.down_since if fresh else None) or now()
            if fresh and admin.down_since == want:
                return
        was = admin.down_since
        admin.down_since = want
        cmp = ctx.unchanged(key, rev) if rev else ctx.absent(key)
        if await ctx.txn([cmp, ctx.unchanged(info_key, info.mod_revision)], [ctx.put(key, admin)]):
            if up:
                log.info("chunk server %s is up", chunk_id)
            elif was is not None and was != want:
                log.warning("chunk server %s is DOWN (lease expired or revoked); its outage recorded "
                            "at %s ended with a registration since (not seen up by this leader)",
                            chunk_id, _when(was))
            else:
                log.warning("chunk server %s is DOWN (lease expired or revoked)", chunk_id)
            return


@dataclass
class Pending:
    """An outage's start the liveness follower may write back (``mark_registration``): the
    server registered again while down, and whether it came up since shows only in the
    follower's own stream of events, up to ``marker`` (the revision of the admin write that
    set the start aside; 0: carried to the server's next info write, ``restore_outage``)."""
    start: float
    marker: int
    info_rev: int                # the info key's mod revision the marker was written over


async def _put_admin(ctx: Ctx, key: bytes, compare: list, admin: ChunkAdmin) -> int:
    """``ctx.txn`` putting ``admin`` at ``key``, answering the revision of the write (0: a
    compare failed; Unavailable when the fence did)."""
    ok, responses = await ctx.etcd.transaction(compare=compare + ctx.fence(),
                                               success=[ctx.put(key, admin)], failure=[])
    if ok:
        return responses[0].response_put.header.revision
    await ctx.txn([], [])                        # raises Unavailable if the fence failed
    return 0


@dataclass
class Registration:
    """A chunk server's three keys as the liveness follower reads them (``registration_state``)."""
    key: bytes                   # its admin key
    info: Any                    # its info key's kv
    live: bool                   # its live key is there
    admin: ChunkAdmin | None
    rev: int                     # the admin record's mod revision (0: none)
    compare: list                # all three unchanged since (the admin record, or its absence;
                                 # the info key; the live key absent)


async def registration_state(ctx: Ctx, chunk_id: str) -> Registration | None:
    """The info, live and admin keys of ``chunk_id``, read in that order, with the compares
    that keep them so (None: not registered). The one read of ``mark_registration`` and
    ``restore_outage``."""
    key, info_key, live_key = (ctx.keys.chunk_admin(chunk_id), ctx.keys.chunk_info(chunk_id),
                               ctx.keys.chunk_live(chunk_id))
    info = await ctx.etcd.get(info_key)
    if info is None:
        return None
    live = await ctx.etcd.get(live_key) is not None
    admin, rev = await ctx.get(key, ChunkAdmin)
    return Registration(key=key, info=info, live=live, admin=admin, rev=rev,
                        compare=[ctx.unchanged(key, rev) if rev else ctx.absent(key),
                                 ctx.unchanged(info_key, info.mod_revision), ctx.absent(live_key)])


async def mark_registration(ctx: Ctx, chunk_id: str, carried: float | None = None) -> Pending | None:
    """The liveness follower's handling of an info write (a registration) of ``chunk_id``:
    what to write now, and the outage's start it may write back once its stream shows more.

    Up now: nothing (the live key's own event records it). Down, with an outage recorded
    since that write: it goes on with its start. Down, with an outage ``S`` recorded before
    it: the server has not been up between that record and the info write (the follower
    watched without a gap: it would have handled a live event in between), but it may have
    come up since and gone down again (the follower handles the event late). So the admin
    record is written with the start not known (``down_since`` None: what readers made of a
    record older than the info key already, so nothing is counted for it meanwhile: a
    *marker*), compared on the admin, info and live keys, and the follower keeps
    ``Pending(S, marker revision)``: if its stream shows a live put or delete of the server
    before the marker's own event, the outage ``S`` is over and the live events record the
    truth; if the marker's event comes first, nothing happened to the live key in between and
    ``restore_outage`` writes ``S`` back. Nothing here waits for anything but its writes.

    ``carried``: an outage's start still pending from a marker written before (its event
    came with the server registering again since, ``restore_outage``), and no live event in
    the follower's stream since: a new marker carries it. So a server that keeps failing
    half-way through registering (info written, no live key) does not restart its grace."""
    for _ in range(5):
        reg = await registration_state(ctx, chunk_id)
        if reg is None or reg.live:
            return None                          # up: the live key's own event records it
        info, rev, compare, key = reg.info, reg.rev, reg.compare, reg.key
        admin = reg.admin or ChunkAdmin(chunk_id=chunk_id)
        fresh = rev > info.mod_revision          # written since the latest registration
        start = carried if carried is not None and admin.down_since is None else (
            admin.down_since if not fresh else None)
        if start is not None:
            admin.down_since = None              # the marker: the start not known yet
            marker = await _put_admin(ctx, key, compare, admin)
            if marker:
                log.info("chunk server %s wrote its registration but is not up: its outage since "
                         "%s goes on unless it came up meanwhile (revision %d)", chunk_id,
                         _when(start), marker)
                return Pending(start=start, marker=marker, info_rev=info.mod_revision)
            continue
        want = admin.down_since or now()         # fresh: an outage recorded since the write
        if fresh and admin.down_since == want:
            return None
        admin.down_since = want
        if await ctx.txn(compare, [ctx.put(key, admin)]):
            log.warning("chunk server %s is DOWN (registered again, not up)", chunk_id)
            return None
    log.warning("chunk server %s: its registration's outage not recorded (its records kept "
                "changing under 5 attempts); left so until its next event or the next listing",
                chunk_id)
    return None


async def restore_outage(ctx: Ctx, chunk_id: str, pending: Pending) -> Pending | None:
    """The follower's handling of its marker's own event (``mark_registration``): no live
    event of the server came in its stream between the info write and the marker, so the
    server has not been up since the outage ``pending.start`` was recorded; write that start
    back, compared on the admin record (still the marker's start not known: a drain since
    is kept), the info key (no registration since the marker) and the live key (absent).

    Answers None when done (written back, or the outage is over: the server is up now, or
    was removed, or an outage was recorded since), or the entry to carry to the server's
    next info write: it registered again since the marker (that write's event is still to
    come in the follower's stream, after the marker's)."""
    for _ in range(5):
        reg = await registration_state(ctx, chunk_id)
        if reg is None:
            return None
        if reg.info.mod_revision != pending.info_rev:
            return Pending(start=pending.start, marker=0, info_rev=reg.info.mod_revision)
        if reg.live:
            return None                          # up: its live event, still to come, records it
        admin = reg.admin
        if admin is None or admin.down_since is not None:
            return None
        admin.down_since = pending.start
        if await ctx.txn(reg.compare, [ctx.put(reg.key, admin)]):
            log.info("chunk server %s wrote its registration but did not come up: still down "
                     "since %s", chunk_id, _when(pending.start))
            return None
    log.warning("chunk server %s: its outage since %s not written back (its records kept "
                "changing under 5 attempts); left so until its next event or the next listing",
                chunk_id, _when(pending.start))
    return None


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
