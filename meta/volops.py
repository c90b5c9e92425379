"""Volume operations that must be ordered with the volume's writes: snapshot, revert.

Snapshot barrier (docs/storage.md): a snapshot is ``Snapshot(state="creating")``
until one etcd transaction sets ``volume.snap_seq += 1``, ``snapshot.seq =
old snap_seq`` and ``state = "ready"``. While a coordinator serves the volume
(its ``VolumeOwner`` is not released and its chunk server is live) only that
coordinator may run the transaction, because it must first pause writes so
none straddles the change: the meta writes a ``VolumeOp(kind="snapshot")``
for it and waits. With no live owner the meta runs the transaction itself,
comparing the owner key's mod revision, so an owner appearing meanwhile makes
it fail and go through the op instead.

Revert is always done by a chunk server (it rewrites blocks on the replicas):
the live owner, else one that then acquires ownership.

The op id of a snapshot is derived from the snapshot id, so a retried create
finds and waits for the same op instead of making a second one.

A revert is not idempotent (a second one rolls back the writes made since the
first), so its request carries an id the client makes once per invocation and
sends again with each of its automatic retries: the op id is derived from it
(``revert_op_id``), and a retry finds that op in any state, done and failed
included, instead of making a new one. Finished ops stay, as receipts, until
the leader's ``tidy_ops`` removes them ``FINISHED_OP_TTL`` after they were made.
A request without an id (older clients) only finds an unfinished revert to
the same snapshot, as before.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
import uuid

from zstore import naming
from zstore.errors import Conflict, InvalidArgument, NotFound, Unavailable, ZError
from zstore.etcd import get_prefix_paged
from zstore.records import RecordError, Snapshot, Volume, VolumeOp, VolumeOwner, now

from . import chunks as chunkmod
from . import volumes
from .context import Ctx
from .volumes import (MAX_RETRIES, creating_snapshot_removal, find_volume, resolve_snapshot, snapshot_op_id,
                      unique_name_release)

log = logging.getLogger(__name__)

SNAPSHOT_TIMEOUT = 10.0
REVERT_TIMEOUT = 60.0
POLL = 0.05
# A done/failed op is tidied up this long after it was made. It is a revert's receipt for the
# retries of its request: the CLI client retries for DEFAULT_RETRY_FOR (15 s) from its first
# attempt, which made the op, so its last retry arrives well within this.
FINISHED_OP_TTL = 120.0
# An op record that does not decode (not one of a newer schema) is removed as a failed op once
# the leader has seen it unchanged this long: no chunk server runs it (its engine skips it),
# nothing can finish it, and a ``creating`` snapshot it belongs to was otherwise kept for ever.
# Far past a create's wait and its client's retries; time for an operator to see the log
# first (``decoded_op`` warns at once).
UNDECODABLE_OP_GRACE = 600.0
_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


async def live_owner(ctx: Ctx, vid: str) -> tuple[VolumeOwner | None, int]:
    """(the owner if it is not released and its chunk server is live, else None; the owner key's mod revision)."""
    owner, rev = await ctx.get(ctx.keys.owner(vid), VolumeOwner)
    if owner is None or owner.released:
        return None, rev
    if await ctx.get_raw(ctx.keys.chunk_live(owner.chunk_id)) is None:
        return None, rev
    return owner, rev


async def _is_live(ctx: Ctx, chunk_id: str) -> bool:
    return await ctx.get_raw(ctx.keys.chunk_live(chunk_id)) is not None


# --- snapshot ------------------------------------------------------------------

async def _unique_name_taken(ctx: Ctx, name: str, vid: str) -> tuple[list, Snapshot | None]:
    """(the compare that keeps the unique name ``name`` free for this create's txn, or the
    live snapshot of another volume that holds it). A key naming a snapshot that is gone,
    deleted or renamed is stale: taken over, compared on its revision."""
    key = ctx.keys.snapshot_unique_name(name)
    got = await ctx.etcd.get(key)
    if got is None:
        return [ctx.absent(key)], None
    holder, _ = await ctx.get(ctx.keys.snapshot(got.value.decode()), Snapshot)
    if holder is not None and holder.state != "deleted" and holder.name == name and holder.volume_id != vid:
        return [], holder
    return [ctx.unchanged(key, got.mod_revision)], None


async def create_snapshot(ctx: Ctx, volume: str, name: str, timeout: float = SNAPSHOT_TIMEOUT,
                          unique: bool = False) -> tuple[Snapshot, bool]:
    """(snapshot, created). Idempotent by name; returns once the snapshot is ready. Names
    are per volume; ``unique`` (CSI's, whose names are global) also takes the name across
    all volumes, in the same txn: the same name on another volume is a Conflict."""
    naming.check_name("snapshot", name)
    if not isinstance(unique, bool):
        raise InvalidArgument(f"invalid value for unique: {unique!r} (true or false)")
    deadline = time.monotonic() + timeout
    for _ in range(MAX_RETRIES):
        vol, _ = await find_volume(ctx, volume)
        # Read before the snapshot's name: see below.
        guard = await volumes.delete_guard(ctx, vol)
        if guard is None:
            continue                    # deleted meanwhile: find_volume says so
        name_key = ctx.keys.snapshot_name(vol.volume_id, name)
        existing = await ctx.get_raw(name_key)
        if existing is not None:
            snap, _ = await ctx.get(ctx.keys.snapshot(existing.decode()), Snapshot)
            if snap is None:
                continue
            if snap.state in ("creating", "ready"):
                # Ready: committed while nobody waited; _finish takes its done op away.
                return await _finish(ctx, vol, snap, deadline), False
            return snap, False
        sid = uuid.uuid4().hex
        snap = Snapshot(snapshot_id=sid, name=name, volume_id=vol.volume_id, size=vol.size, state="creating")
        # The volume's delete guard (its name key) is compared and put back unchanged so its
        # revision moves: a delete that listed its snapshots before this one existed fails its
        # compare and looks again (else it would erase the volume under a snapshot record left
        # "creating" for ever), and a delete that committed first (the key is gone) fails this.
        # Not the volume record (it was put back before): the coordinator's snapshot commit
        # compares that one, a few attempts, and creates of other snapshots used them up.
        gkey, grev = guard
        compare = [ctx.absent(name_key), ctx.unchanged(gkey, grev)]
        ops = [ctx.put(ctx.keys.snapshot(sid), snap), ctx.put(name_key, sid), ctx.put(gkey, vol.volume_id)]
        if unique:
            # Two creates of one name on two volumes: each txn compares the unique key as
            # read, so only one commits; the other looks again and finds it taken.
            free, holder = await _unique_name_taken(ctx, name, vol.volume_id)
            if holder is not None:
                raise Conflict(f"snapshot name {name!r} is taken by a snapshot of another volume "
                               f"({holder.volume_id})", hint="snapshot names are unique across volumes here")
            compare += free
            ops.append(ctx.put(ctx.keys.snapshot_unique_name(name), sid))
        if await ctx.txn(compare, ops):
            log.info("snapshot %s@%s (%s) being created", vol.name, name, sid)
            return await _finish(ctx, vol, snap, deadline), True
    raise Conflict(f"could not snapshot {volume!r}: too much concurrent change", hint="retry", retry=True)


async def _drop_creating(ctx: Ctx, snap: Snapshot, srev: int, op_key: bytes, op_rev: int | None) -> bool:
    """Remove ``creating`` snapshot ``snap`` (read at ``srev``), its names and its op (None:
    absent), all compared; False when something moved (a coordinator claimed the op or
    committed the snapshot meanwhile): the caller reads again and sees what happened."""
    compare, ops = await creating_snapshot_removal(ctx, snap, srev)
    if op_rev is None:
        compare.append(ctx.absent(op_key))
    else:
        compare.append(ctx.unchanged(op_key, op_rev))
        ops.append(ctx.delete(op_key))
    return await ctx.txn(compare, ops)


async def _finish(ctx: Ctx, vol: Volume, snap: Snapshot, deadline: float) -> Snapshot:
    """Bring a ``creating`` snapshot to ready: through its op when a coordinator serves the
    volume, else by the seq transaction here. Each pass re-reads everything."""
    vid, sid = vol.volume_id, snap.snapshot_id
    skey, vkey, okey = ctx.keys.snapshot(sid), ctx.keys.volume(vid), ctx.keys.owner(vid)
    op_key = ctx.keys.volop(vid, snapshot_op_id(sid))
    waited = False                       # for a revert of the volume (see below)
    while True:
        cur, srev = await ctx.get(skey, Snapshot)
        if cur is None or cur.state == "deleted":
            raise NotFound(f"snapshot {snap.name!r} was deleted while being created")
        got = await ctx.etcd.get(op_key)
        op_rev = got.mod_revision if got is not None else 0
        if cur.state == "ready":
            # Its op is done, whatever it holds: removed without decoding, so one written by a
            # newer zstore (a rolling upgrade) or garbled does not fail every repeated create.
            if got is not None:
                await ctx.txn([ctx.unchanged(op_key, op_rev)], [ctx.delete(op_key)])
            return cur
        # An op record that does not decode is no op (no chunk server runs it): handed over or
        # replaced below like a missing one, compared on its revision. One a newer zstore wrote
        # is left to a meta server that can read it.
        op = volumes.decoded_op(op_key, got.value) if got is not None else None
        if isinstance(op, volumes.NewerOp):
            raise Unavailable(f"snapshot {cur.name!r} of volume {vol.name!r} has its op written by a newer "
                              f"zstore ({op.op_id})",
                              hint="repeat the create from a meta server running the newer version (or "
                                   "finish the upgrade first)")
        if op is not None and op.state == "failed":
            ucompare, uops = await unique_name_release(ctx, cur)
            await ctx.txn([ctx.unchanged(op_key, op_rev), ctx.unchanged(skey, srev), *ucompare],
                          [ctx.delete(op_key), ctx.delete(skey),
                           ctx.delete(ctx.keys.snapshot_name(vid, cur.name)), *uops])
            log.warning("snapshot %s (%s) of volume %s failed on %s: %s",
                        cur.name, sid, vol.name, op.executor, op.error)
            raise ZError(f"snapshot {cur.name!r} of volume {vol.name!r} failed on chunk server "
                         f"{op.executor}: {op.error or 'no reason given'}", hint="retry the create")
        v, vrev = await ctx.get(vkey, Volume)
        if v is None:
            raise NotFound(f"volume {vol.name!r} was deleted while being snapshotted")
        reverting = await volumes.unfinished_reverts(ctx, vid)
        if waited and not reverting and v.state == "deleted":
            # The revert it waited for ended with the volume deleted: a forced delete cancels
            # an unfinished revert, so the volume may hold a half-reverted image, never a
            # state anyone had: the create fails (its snapshot and names go) rather than
            # commit that.
            if not await _drop_creating(ctx, cur, srev, op_key, op_rev if got is not None else None):
                continue
            raise NotFound(f"volume {vol.name!r} was deleted while the snapshot {cur.name!r} waited "
                           "for a revert of it (a forced delete cancels one)")
        if reverting:
            waited = True
            # Its executor writes at the seq it read when it took ownership: a snapshot
            # committed meanwhile (by the meta, once that server's lease lapsed) would take
            # in the revert's remaining writes. The snapshot waits for the revert.
            if time.monotonic() >= deadline:
                rop = reverting[0][2]
                which = (f"op {rop.op_id}, written by a newer zstore" if isinstance(rop, volumes.NewerOp)
                         else f"{rop.state} on chunk server {rop.executor}")
                raise Unavailable(
                    f"snapshot {cur.name!r} of volume {vol.name!r} waits for a revert of the volume "
                    f"that is still unfinished ({which})",
                    hint="the request stays pending: repeat the same create once the revert finished")
            await asyncio.sleep(POLL)
            continue
        owner, orev = await live_owner(ctx, vid)
        if owner is not None:
            if op is None or op.executor != owner.chunk_id:
                # Hand the op to the coordinator now serving the volume.
                new = VolumeOp(op_id=snapshot_op_id(sid), volume_id=vid, kind="snapshot",
                               snapshot_id=sid, executor=owner.chunk_id)
                cmp = ctx.unchanged(op_key, op_rev) if got is not None else ctx.absent(op_key)
                if await ctx.txn([cmp, ctx.unchanged(okey, orev), ctx.unchanged(skey, srev)],
                                 [ctx.put(op_key, new)]):
                    log.info("snapshot %s (%s) of volume %s: waiting for its coordinator on %s",
                             cur.name, sid, vol.name, owner.chunk_id)
                continue
        else:
            # Nobody serves the volume: take the snapshot here. The owner key's mod
            # revision is compared, so a coordinator that acquired ownership since fails it;
            # so is the absence of an unreleased owner's live key, so a server that came back
            # live since (and may still write at the seq it read) fails it too, and the next
            # pass hands the snapshot to it as an op.
            # Its size is the volume's at the barrier (an expand may have come after the
            # create): the volume is compared unchanged in the same txn.
            cur.seq, cur.state, cur.size = v.snap_seq, "ready", v.size
            v.snap_seq += 1
            compare = [ctx.t.mod(okey) == orev, ctx.unchanged(vkey, vrev), ctx.unchanged(skey, srev)]
            holder, hrev = await ctx.get(okey, VolumeOwner)
            if hrev != orev:
                continue                    # the owner changed since live_owner read it
            if holder is not None and not holder.released:
                compare.append(ctx.absent(ctx.keys.chunk_live(holder.chunk_id)))
            ops = [ctx.put(vkey, v), ctx.put(skey, cur)]
            if got is not None:
                compare.append(ctx.unchanged(op_key, op_rev))
                ops.append(ctx.delete(op_key))
            if await ctx.txn(compare, ops):
                log.info("snapshot %s@%s (%s) ready at seq %d (no coordinator; taken by the meta)",
                         vol.name, cur.name, sid, cur.seq)
                return cur
            continue
        if time.monotonic() >= deadline:
            raise Unavailable(
                f"snapshot {cur.name!r} of volume {vol.name!r} is still waiting for the volume's "
                f"coordinator on chunk server {op.executor}",
                hint="the request stays pending: repeat the same create to keep waiting for it")
        await asyncio.sleep(POLL)


# --- revert ---------------------------------------------------------------------

def revert_op_id(request_id: str) -> str:
    """The op id of the revert a request with this id made (or joined)."""
    return f"revert-{request_id}"


def check_request_id(request_id: object) -> str | None:
    if request_id is None:
        return None
    if not isinstance(request_id, str) or not _REQUEST_ID.fullmatch(request_id):
        raise InvalidArgument(f"invalid request_id {request_id!r}: 1 to 64 letters, digits, '-' or '_'",
                              hint="one id per request (a uuid4), the same for each retry of it")
    return request_id


async def _revert_snapshot(ctx: Ctx, vol: Volume, ref: str) -> Snapshot:
    if not isinstance(ref, str) or not ref:
        raise InvalidArgument("a snapshot is required: its name, VOLUME@SNAP or its id")
    if "@" not in ref:
        sid = await ctx.get_raw(ctx.keys.snapshot_name(vol.volume_id, ref))
        if sid is not None:
            ref = sid.decode()
    snap = await resolve_snapshot(ctx, ref)
    if snap.volume_id != vol.volume_id:
        raise Conflict(f"snapshot {snap.name!r} ({snap.snapshot_id}) is not a snapshot of volume {vol.name!r}",
                       hint=f"see `zstore snapshot list {vol.name}`")
    if snap.state != "ready":
        raise Conflict(f"snapshot {snap.name!r} is still being created", hint="retry when it is ready")
    return snap


async def _create_revert_op(ctx: Ctx, vol: Volume, snap: Snapshot, request_id: str | None = None) -> bytes:
    """The key of the op request ``request_id`` made, in whatever state (a retry of that
    request: done means done, it is not run again); else of the volume's unfinished revert
    to ``snap``; else of a new revert op (its id derived from ``request_id`` when given).

    One revert per volume at a time: while a revert of the volume is pending or running, one
    to another snapshot is refused (409), since a second op beside it would let the first
    run after it (its executor restarting, the leader moving it) and roll back the writes
    made in between. The volume is put back unchanged with the new op, so of two reverts
    created at once the second fails its compare and finds the first.

    The snapshot is put back unchanged in the same transaction: its revision moves, so a
    delete of it that read it before this op existed fails its compare, looks again and
    finds the revert (it refuses while one is pending or running: the revert needs the
    snapshot's block versions until it is done)."""
    vid = vol.volume_id
    vkey, skey = ctx.keys.volume(vid), ctx.keys.snapshot(snap.snapshot_id)
    for _ in range(MAX_RETRIES):
        v, vrev = await ctx.get(vkey, Volume)
        if v is None or v.state == "deleted":
            # A tombstone (kept for its snapshots) is deleted too: a revert handed out now
            # would run on a volume nobody can reach and answer the caller "reverted".
            raise NotFound(f"volume {vol.name!r} was deleted meanwhile")
        if request_id is not None:
            own_key = ctx.keys.volop(vid, revert_op_id(request_id))
            mine, _ = await ctx.get(own_key, VolumeOp)
            if mine is not None:
                if mine.kind != "revert" or mine.snapshot_id != snap.snapshot_id:
                    raise Conflict(f"request id {request_id!r} was used for a revert to another snapshot",
                                   hint="make a new request id for each new request")
                return own_key          # a retry of this request: its op, even done or failed
        unfinished = await volumes.unfinished_reverts(ctx, vid)
        for _, _, op in unfinished:
            if isinstance(op, volumes.NewerOp):     # maybe a revert to another snapshot
                raise volumes.newer_op_refusal(f"volume {vol.name!r}", op, "revert it")
        for k, _, op in unfinished:
            if op.snapshot_id == snap.snapshot_id:
                return k                # the same revert, unfinished: wait for its op
        if unfinished:
            op = unfinished[0][2]
            other, _ = await ctx.get(ctx.keys.snapshot(op.snapshot_id), Snapshot)
            raise Conflict(
                f"volume {vol.name!r}: a revert to snapshot {other.name if other else op.snapshot_id!r} "
                f"is still {op.state} on chunk server {op.executor}; only one revert of a volume "
                f"runs at a time", hint="wait for it to finish, then revert again")
        cur, srev = await ctx.get(skey, Snapshot)
        if cur is None or cur.state == "deleted":
            raise NotFound(f"snapshot {snap.name!r} ({snap.snapshot_id}) was deleted meanwhile")
        op = VolumeOp(op_id=revert_op_id(request_id) if request_id else uuid.uuid4().hex,
                      volume_id=vid, kind="revert",
                      snapshot_id=snap.snapshot_id, executor=await _revert_executor(ctx, vol))
        op_key = ctx.keys.volop(vid, op.op_id)
        if await ctx.txn([ctx.absent(op_key), ctx.unchanged(vkey, vrev), ctx.unchanged(skey, srev)],
                         [ctx.put(op_key, op), ctx.put(skey, cur), ctx.put(vkey, v)]):
            log.info("volume %s: revert to snapshot %s (seq %d) handed to %s", vol.name, snap.name,
                     snap.seq, op.executor)
            return op_key
    raise Conflict(f"volume {vol.name!r} or snapshot {snap.name!r} changed meanwhile", hint="retry", retry=True)


async def _revert_executor(ctx: Ctx, vol: Volume) -> str:
    """The live owner, else a live active chunk of the planned placement, else any live one."""
    owner, _ = await live_owner(ctx, vol.volume_id)
    if owner is not None:
        return owner.chunk_id
    views = await chunkmod.list_chunks(ctx)
    live = [v for v in views if v.up and not v.draining] or [v for v in views if v.up]
    planned = [v for v in live if v.chunk_id in vol.placement]
    pick = planned or live
    if not pick:
        raise Unavailable(f"no chunk server is up to revert volume {vol.name!r}",
                          hint="start a chunk server and retry")
    return pick[0].chunk_id


async def revert_volume(ctx: Ctx, volume: str, snapshot: str, timeout: float = REVERT_TIMEOUT,
                        request_id: str | None = None) -> tuple[Volume, Snapshot]:
    """Revert a volume to one of its snapshots (online); returns once a chunk server did it.

    ``request_id`` (one per request, the same for each retry of it) makes a retry return
    the outcome of the revert its request made instead of reverting again. The finished
    op is left as the receipt; ``tidy_ops`` removes it."""
    request_id = check_request_id(request_id)
    deadline = time.monotonic() + timeout
    vol, _ = await find_volume(ctx, volume)
    snap = await _revert_snapshot(ctx, vol, snapshot)
    op_key = await _create_revert_op(ctx, vol, snap, request_id)
    while True:
        op, op_rev = await ctx.get(op_key, VolumeOp)
        if op is None:
            raise ZError(f"the revert of volume {vol.name!r} was cancelled (its op record disappeared)",
                         hint="check that the volume still exists and retry")
        if op.state in ("done", "failed"):
            await _keep_receipt(ctx, vol.volume_id, request_id, op_key, op)
            if op.state == "failed":
                raise ZError(f"revert of volume {vol.name!r} to {snap.name!r} failed on chunk server "
                             f"{op.executor}: {op.error or 'no reason given'}", hint="retry the revert")
            log.info("volume %s reverted to snapshot %s by %s", vol.name, snap.name, op.executor)
            return vol, snap
        if await _route_revert(ctx, vol, op_key, op, op_rev):
            continue
        if time.monotonic() >= deadline:
            raise Unavailable(
                f"the revert of volume {vol.name!r} to snapshot {snap.name!r} is still running on "
                f"chunk server {op.executor}",
                hint="it continues on its own. Running the revert again is a new request: it waits "
                     "for this one while it is unfinished, but once this one finished it reverts "
                     "again and undoes the writes made since")
        await asyncio.sleep(POLL)


async def _keep_receipt(ctx: Ctx, vid: str, request_id: str | None, op_key: bytes, op: VolumeOp) -> None:
    """A request that joined another request's unfinished revert (same snapshot) records
    the outcome under its own id, so that its retries find it too. The op itself is left
    alone: it is its own request's receipt (``tidy_ops`` removes both in time)."""
    if request_id is None:
        return
    own_key = ctx.keys.volop(vid, revert_op_id(request_id))
    if own_key == op_key:
        return
    receipt = dataclasses.replace(op, op_id=revert_op_id(request_id), created=now())
    await ctx.txn([ctx.absent(own_key)], [ctx.put(own_key, receipt)])



async def _route_revert(ctx: Ctx, vol: Volume, op_key: bytes, op: VolumeOp, op_rev: int) -> bool:
    """Move an unfinished revert to the server that should run it; whether it moved.

    That is the live owner, else its executor if live, else a live chunk of the placement.
    A revert its executor has claimed (running) moves only once that executor is no longer
    live, and goes back to pending: one op never runs on two servers at once."""
    executor_live = await _is_live(ctx, op.executor)
    owner, _ = await live_owner(ctx, vol.volume_id)
    want = owner.chunk_id if owner else (op.executor if executor_live
                                         else await _revert_executor(ctx, vol))
    if want == op.executor or (op.state == "running" and executor_live):
        return False
    log.warning("volume %s: revert %s moves from %s to %s", vol.name, op.op_id, op.executor, want)
    op.executor, op.state = want, "pending"
    await ctx.txn([ctx.unchanged(op_key, op_rev)], [ctx.put(op_key, op)])
    return True


async def move_stranded_reverts(ctx: Ctx) -> list[str]:
    """The leader's half of ``revert_volume``'s routing, for reverts nobody waits for any more
    (the call timed out; the op continues): without it, a revert whose executor died would
    sit until that server came back, and run then, whatever was written meanwhile. The ids
    of the ops moved."""
    moved = []
    for kv in (await get_prefix_paged(ctx.etcd, ctx.keys.all_volops()))[0]:
        op = volumes.decoded_op(kv.key, kv.value)
        if not isinstance(op, VolumeOp) or op.kind != "revert" or op.state not in ("pending", "running"):
            continue                    # garbage (logged), or a newer zstore's: not ours to move
        vol, _ = await ctx.get(ctx.keys.volume(op.volume_id), Volume)
        if vol is None:
            continue
        try:
            if await _route_revert(ctx, vol, kv.key, op, kv.mod_revision):
                moved.append(op.op_id)
        except Unavailable as e:        # no chunk server up: the next pass tries again
            log.info("volume %s: revert %s not moved: %s", vol.name, op.op_id, e.message)
    return moved


# --- tidying (a leader duty, run with the recovery loop) ----------------------------------

async def tidy_ops(ctx: Ctx, now: float | None = None, ttl: float = FINISHED_OP_TTL,
                   grace: float = UNDECODABLE_OP_GRACE,
                   grace_clock: float | None = None) -> list[str]:
    """Move unfinished reverts whose executor is gone (``move_stranded_reverts``), and remove
    finished ops whose caller stopped waiting (timed out, gave up).

    A done op is only a receipt. A failed snapshot op also takes its
    ``creating`` snapshot and name with it, exactly as a waiting create would
    have, so the name can be used again. Pending and running ops are not removed, nor
    is a record that a newer zstore wrote (``volumes.decoded_op``): a newer meta or chunk
    server may own it. A record that does not decode at all is removed as a failed op (its
    ``creating`` snapshot along) once seen unchanged for ``grace`` (``_remove_undecodable``),
    timed on ``grace_clock`` (monotonic seconds by default: a wall-clock step must not cut
    the operator's window).  A record whose handling meets another record that does not
    decode (its snapshot's) is logged and left: one bad record must not stop the pass, which
    recovery runs first.
    A ``creating`` snapshot with no op at all goes the same way, in the garbage
    collection (``volumes.remove_stranded_snapshot``), which lists every snapshot anyway; so
    does one whose op waits for a chunk server gone for good (it fails the op, which is then
    tidied here as a failed one).
    """
    await move_stranded_reverts(ctx)
    now = time.time() if now is None else now
    mono = time.monotonic() if grace_clock is None else grace_clock
    removed = []
    kvs = (await get_prefix_paged(ctx.etcd, ctx.keys.all_volops()))[0]
    seen = {(kv.key, kv.mod_revision) for kv in kvs}
    for k in [k for k in _UNDECODABLE_SINCE if k not in seen]:
        del _UNDECODABLE_SINCE[k]       # removed or rewritten: its grace starts again if garbage
    _LEFT_LOGGED.intersection_update(seen)
    for kv in kvs:
        try:
            op_id = await _tidy_one(ctx, kv, now, ttl, mono, grace)
        except RecordError as e:
            if (kv.key, kv.mod_revision) not in _LEFT_LOGGED:
                _LEFT_LOGGED.add((kv.key, kv.mod_revision))
                log.warning("volume op record %s left: %s", kv.key.decode(errors="replace"), e)
            continue
        if op_id is not None:
            removed.append(op_id)
    return removed


async def _tidy_one(ctx: Ctx, kv, now: float, ttl: float, mono: float,
                    grace: float) -> str | None:
    """``tidy_ops`` for one op record: the id of the op removed, or None."""
    op = volumes.decoded_op(kv.key, kv.value)
    if op is None:
        if await _remove_undecodable(ctx, kv, mono, grace):
            return _op_id_of(ctx, kv.key)[1]
        return None
    if not isinstance(op, VolumeOp):
        return None                     # a newer zstore's: a newer meta or chunk server may own it
    if op.state in ("pending", "running") or now - op.created < ttl:
        return None
    compare, ops = [ctx.unchanged(kv.key, kv.mod_revision)], [ctx.delete(kv.key)]
    if op.kind == "snapshot" and op.state == "failed":
        snap, srev = await ctx.get(ctx.keys.snapshot(op.snapshot_id), Snapshot)
        if snap is not None and snap.state == "creating":
            scompare, sops = await creating_snapshot_removal(ctx, snap, srev)
            compare += scompare
            ops += sops
    if not await ctx.txn(compare, ops):
        return None
    log.info("volume op %s (%s, %s) tidied up%s", op.op_id, op.kind, op.state,
             f": {op.error}" if op.error else "")
    return op.op_id


# (op key, mod revision) -> the tidying's clock when it first saw that record not decode.
# Pruned to the records of the latest listing each pass; a meta that starts anew (or a record
# rewritten) starts the grace again.
_UNDECODABLE_SINCE: dict[tuple[bytes, int], float] = {}
# (op key, mod revision) of the records ``tidy_ops`` left for another's decode error, logged
# once each (pruned like ``_UNDECODABLE_SINCE``).
_LEFT_LOGGED: set[tuple[bytes, int]] = set()


def _op_id_of(ctx: Ctx, key: bytes) -> tuple[str, str]:
    """(volume id, op id) of volume op key ``key``."""
    vid, _, op_id = key[len(ctx.keys.all_volops()):].decode(errors="replace").partition("/")
    return vid, op_id


async def _remove_undecodable(ctx: Ctx, kv, now: float, grace: float) -> bool:
    """Remove the op record ``kv``, which does not decode, if it has been seen unchanged for
    ``grace``; whether it was removed. At a snapshot's op key it is taken as that snapshot's
    failed op: a ``creating`` snapshot goes with it, its names freed (as ``tidy_ops`` does for
    a failed one). All compared: a readable op written meanwhile (a repeated create handing it
    on) or a commit of the snapshot keeps both."""
    first = _UNDECODABLE_SINCE.setdefault((kv.key, kv.mod_revision), now)
    if now - first < grace:
        return False
    vid, op_id = _op_id_of(ctx, kv.key)
    compare, ops = [ctx.unchanged(kv.key, kv.mod_revision)], [ctx.delete(kv.key)]
    snap = None
    if op_id.startswith(snapshot_op_id("")):
        snap, srev = await ctx.get(ctx.keys.snapshot(op_id[len(snapshot_op_id("")):]), Snapshot)
        if snap is not None and snap.volume_id == vid and snap.state == "creating":
            scompare, sops = await creating_snapshot_removal(ctx, snap, srev)
            compare += scompare
            ops += sops
        else:
            snap = None
    if not await ctx.txn(compare, ops):
        return False
    _UNDECODABLE_SINCE.pop((kv.key, kv.mod_revision), None)
    log.error("volume op record %s does not decode and has not changed for %.0f s: removed as a "
              "failed op%s; it held %r", kv.key.decode(errors="replace"), now - first,
              f", with its creating snapshot {snap.name} ({snap.snapshot_id})" if snap else "",
              kv.value[:200])
    return True
