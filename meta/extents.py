"""The extent map in etcd: allocate (place) an extent, drop a replica, join a replica.

One ``ExtentRecord`` per allocated 64 MiB extent (docs/storage.md). Only the
meta leader changes these records, each change one compare-and-swap
transaction on the record's mod revision, so concurrent callers (a
coordinator dropping a failed replica while recovery joins another) are
serialized by etcd: whoever lost re-reads and decides again.

``generation`` grows by one at every change of ``replicas``; drop and join
name the generation they saw, so a decision taken on an old view is never
applied to a newer one.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from zstore.errors import Conflict, InvalidArgument, NotFound
from zstore.etcd import get_prefix_paged, prefix_end
from zstore.records import ExtentRecord, RecoveryTask, Volume, VolumeOwner

from . import chunks as chunkmod
from .context import Ctx
from .placement import Candidate, choose, describe, place, shared_allowed, too_few_domains

log = logging.getLogger(__name__)

# Must equal chunk.storage.extent_file.EXTENT_SIZE (a test checks); kept here so the
# meta server does not import the chunk server's storage code.
EXTENT_SIZE = 64 * 2**20
MAX_RETRIES = 64


def extent_count(size: int) -> int:
    return -(-size // EXTENT_SIZE)


def check_index(value: Any) -> int:
    """An extent index from JSON or a URL path: a whole number >= 0."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"invalid extent index {value!r}: must be a whole number >= 0")
    return value


def check_generation(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgument(f"invalid generation {value!r}: must be a whole number >= 1")
    return value


def check_chunk_id(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidArgument("a chunk_id is required")
    return value


async def volume_by_id(ctx: Ctx, vid: str) -> tuple[Volume, int]:
    """A live (not deleted) volume by id, or NotFound."""
    if not isinstance(vid, str) or not vid or "/" in vid:
        raise InvalidArgument(f"invalid volume id {vid!r}")
    vol, rev = await ctx.get(ctx.keys.volume(vid), Volume)
    if vol is None or vol.state == "deleted":
        raise NotFound(f"volume {vid!r} not found", hint="see `zstore volume list`")
    return vol, rev


async def get_extent(ctx: Ctx, vid: str, index: int) -> tuple[ExtentRecord, int]:
    rec, rev = await ctx.get(ctx.keys.extent(vid, index), ExtentRecord)
    if rec is None:
        raise NotFound(f"extent {index} of volume {vid} is not allocated",
                       hint=f"allocate it with POST /api/v1/extents/{vid}/{index}")
    return rec, rev


def candidate_of(view: chunkmod.ChunkView) -> Candidate:
    return Candidate(chunk_id=view.chunk_id, free=view.free, labels=view.info.labels if view.info else {},
                     host=view.info.hostname if view.info else "")


def usable(view: chunkmod.ChunkView, need: int) -> bool:
    """Live, active, not stopping and with room: a chunk server that may receive a new replica."""
    return (view.up and not view.draining and not view.stopping and not view.removing
            and view.free > 0 and view.free >= need)


def place_more(pool: list[Candidate], keep: list[Candidate], n: int, need: int,
               rng: random.Random | None = None, allow_shared: bool | None = None) -> list[str]:
    """``n`` more chunk ids from ``pool``, in failure domains none of ``keep`` is in.

    Same policy as ``placement.place`` (a domain of its own per replica unless
    ``meta.allow_shared_failure_domain``; then fewest shared zones, racks, hosts;
    capacity-weighted among equals), but counting the replicas that already
    exist, which rebuilds and partially usable plans need.
    """
    taken = {c.chunk_id for c in keep}
    fit = [c for c in pool if c.chunk_id not in taken and c.free >= need and c.free > 0]
    if len(fit) < n:
        # Let place() phrase the error exactly as volume creation does.
        place(fit, n, need=need, allow_shared=allow_shared)
    return [c.chunk_id for c in choose(fit, keep, n, rng, allow_shared)]


def place_extent(vol: Volume, views: list[chunkmod.ChunkView],
                 allow_shared: bool | None = None) -> list[str]:
    """Replica set for a new extent: the volume's planned placement when all of it is usable.

    Every replica goes to a failure domain of its own (``placement``). If the cluster's
    chunk servers, down ones included, span fewer domains than the volume has replicas,
    the extent is refused; if only some domains are unusable now, it is placed degraded
    (one replica per usable domain) and recovery adds the missing copies later.
    """
    shared = shared_allowed(allow_shared)
    need = 0 if vol.thin else EXTENT_SIZE
    by_id = {v.chunk_id: v for v in views}
    plan = list(dict.fromkeys(vol.placement))
    keep: list[Candidate] = []
    for c in plan:
        if c in by_id and usable(by_id[c], need):
            cand = candidate_of(by_id[c])
            if shared or all(k.failure_domain != cand.failure_domain for k in keep):
                keep.append(cand)      # a plan made before domains were enforced may repeat one
    keep = keep[:vol.replicas]
    if len(plan) == vol.replicas and len(keep) == vol.replicas:
        return plan
    pool = [candidate_of(v) for v in views if usable(v, need)]
    if not pool:
        cands, unusable = chunkmod.candidates(views)
        place(cands, vol.replicas, need=need, unusable=unusable)     # raises the clear error
    if not shared:
        known = [candidate_of(v) for v in views]
        if len({c.failure_domain for c in known}) < vol.replicas:
            # Not an outage that recovery could heal later: the cluster has too few domains.
            raise too_few_domains(known, vol.replicas, f"the cluster's {len(known)} chunk server(s)")
    room = len(pool) if shared else len({c.failure_domain for c in pool})
    if room < vol.replicas:
        # Degraded, not refused: the write goes on where placement allows (as writes do on
        # surviving replicas), and the recovery loop adds the missing copies when it can.
        log.warning("volume %s: usable chunk servers in only %d failure domain(s) for %d replicas; "
                    "placing a degraded extent", vol.name, room, vol.replicas)
    want = min(vol.replicas, room)
    return [c.chunk_id for c in keep] + place_more(pool, keep, want - len(keep), need,
                                                   allow_shared=allow_shared)


async def allocate(ctx: Ctx, vid: str, index: Any) -> tuple[ExtentRecord, bool]:
    """(record, created). Idempotent: an existing record is returned unchanged."""
    index = check_index(index)
    key = ctx.keys.extent(vid, index)
    for _ in range(MAX_RETRIES):
        rec, _ = await ctx.get(key, ExtentRecord)
        if rec is not None:
            return rec, False
        vol, _ = await volume_by_id(ctx, vid)
        count = extent_count(vol.size)
        if index >= count:
            raise InvalidArgument(
                f"extent index {index} is beyond the end of volume {vol.name!r} "
                f"({vol.size} bytes = {count} extent(s) of {EXTENT_SIZE} bytes)")
        replicas = place_extent(vol, await chunkmod.list_chunks(ctx))
        rec = ExtentRecord(volume_id=vid, index=index, replicas=replicas)
        # Each replica's server still registered and not being removed (``remove_chunk``):
        # one removed since it was listed gets none; placed again, it is left out.
        registered = [cmp for c in replicas for cmp in chunkmod.placeable(ctx, c)]
        if await ctx.txn([ctx.absent(key), ctx.t.version(ctx.keys.volume(vid)) > 0, *registered],
                         [ctx.put(key, rec)]):
            log.info("extent %s/%d allocated on %s", vid, index, ",".join(replicas))
            return rec, True
    raise Conflict(f"could not allocate extent {index} of {vid}: too much concurrent change", hint="retry", retry=True)


async def drop(ctx: Ctx, vid: str, index: Any, chunk_id: Any, generation: Any,
               reason: str = "") -> tuple[ExtentRecord, bool]:
    """Remove a failed replica: (record, changed).

    A generation older than the record's means the caller decided on an old
    view: nothing changes and it gets the current record to re-read.
    """
    index, chunk_id, generation = check_index(index), check_chunk_id(chunk_id), check_generation(generation)
    reason = str(reason or "no reason given")[:500]
    key = ctx.keys.extent(vid, index)
    for _ in range(MAX_RETRIES):
        rec, rev = await get_extent(ctx, vid, index)
        if generation < rec.generation or chunk_id not in rec.replicas:
            return rec, False
        if generation > rec.generation:
            raise Conflict(f"generation {generation} of extent {vid}/{index} does not exist yet "
                           f"(current {rec.generation})", record=rec.to_dict())
        if rec.replicas == [chunk_id]:
            raise Conflict(f"refusing to drop {chunk_id}: it holds the last in-sync replica of "
                           f"extent {vid}/{index}", hint="fail the I/O instead; the data lives only there",
                           record=rec.to_dict())
        rec.replicas = [c for c in rec.replicas if c != chunk_id]
        rec.stale[chunk_id] = rec.generation
        rec.generation += 1
        if await ctx.txn([ctx.unchanged(key, rev)], [ctx.put(key, rec)]):
            log.warning("extent %s/%d: dropped replica on %s at generation %d (%s); in sync: %s",
                        vid, index, chunk_id, rec.generation - 1, reason, ",".join(rec.replicas))
            return rec, True
    raise Conflict(f"could not drop a replica of {vid}/{index}: too much concurrent change", hint="retry", retry=True)


async def join(ctx: Ctx, vid: str, index: Any, chunk_id: Any, generation: Any,
               epoch: Any = None) -> ExtentRecord:
    """Add a replica that has been brought in sync at ``generation``; 409 otherwise.

    With ``epoch`` (the copying coordinator's ownership epoch) the join also requires that
    epoch to still own the volume, in the same transaction: another server that took the
    volume over meanwhile may have written the extent without the new replica (it was not in
    its copy), so the copy is not proof any more.
    """
    index, chunk_id, generation = check_index(index), check_chunk_id(chunk_id), check_generation(generation)
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1):
        raise InvalidArgument(f"invalid epoch {epoch!r}: must be a whole number >= 1")
    key = ctx.keys.extent(vid, index)
    task_key = ctx.keys.recovery_task(vid, index)
    owner_key = ctx.keys.owner(vid)
    for _ in range(MAX_RETRIES):
        rec, rev = await get_extent(ctx, vid, index)
        owner_compare = []
        if epoch is not None:
            owner, owner_rev = await ctx.get(owner_key, VolumeOwner)
            if owner is None or owner.epoch != epoch:
                raise Conflict(f"{chunk_id} cannot join extent {vid}/{index}: epoch {epoch} no longer "
                               f"owns the volume (now {owner.epoch if owner else 'none'})",
                               hint="copy again as the volume's owner", record=rec.to_dict())
            owner_compare = [ctx.unchanged(owner_key, owner_rev)]
        # A deleted volume kept as a tombstone for its snapshots still needs its copies: its
        # extents hold the snapshots' data (erasing it takes the extent records, which the
        # compare below would then see).
        vol, _ = await ctx.get(ctx.keys.volume(vid), Volume)
        if vol is None:
            raise NotFound(f"volume {vid!r} not found", hint="see `zstore volume list`")
        if generation != rec.generation or chunk_id in rec.replicas:
            why = ("it is already in sync" if chunk_id in rec.replicas
                   else f"generation {generation} is not the current {rec.generation}")
            raise Conflict(f"{chunk_id} cannot join extent {vid}/{index}: {why}",
                           hint="re-read the extent record and resync again", record=rec.to_dict())
        views = {v.chunk_id: v for v in await chunkmod.list_chunks(ctx)}
        if chunk_id not in views:
            raise NotFound(f"chunk server {chunk_id!r} not found", hint="see `zstore chunk list`")
        if views[chunk_id].removing:
            raise Conflict(f"{chunk_id} cannot join extent {vid}/{index}: it is being removed "
                           "from the cluster", hint="retry; if the removal fails the join can go on",
                           retry=True, record=rec.to_dict())
        task, task_rev = await ctx.get(task_key, RecoveryTask)
        if task is not None and task.target != chunk_id:
            task = None
        leaving = None
        if len(rec.replicas) >= vol.replicas:
            leaving = _swap_out(rec, vol.replicas, chunk_id, views, task)
            rec.replicas.remove(leaving)
        rec.replicas.append(chunk_id)
        rec.stale.pop(chunk_id, None)
        rec.generation += 1
        # Still registered and not being removed (``remove_chunk`` may have marked or deleted
        # it since it was listed).
        compare = [ctx.unchanged(key, rev), *owner_compare, *chunkmod.placeable(ctx, chunk_id)]
        ops = [ctx.put(key, rec)]
        if task is not None:
            compare.append(ctx.unchanged(task_key, task_rev))
            ops.append(ctx.delete(task_key))
        if await ctx.txn(compare, ops):
            log.info("extent %s/%d: %s joined at generation %d%s; in sync: %s%s", vid, index, chunk_id,
                     rec.generation, f" in place of draining {leaving}" if leaving else "",
                     ",".join(rec.replicas), " (recovery task done)" if len(ops) > 1 else "")
            return rec
    raise Conflict(f"could not join a replica to {vid}/{index}: too much concurrent change", hint="retry", retry=True)


def _swap_out(rec: ExtentRecord, want: int, chunk_id: str, views: dict[str, chunkmod.ChunkView],
              task: RecoveryTask | None) -> str:
    """The replica a full extent gives up for ``chunk_id``; Conflict if there is none.

    A full extent takes a new replica only in place of another (recovery moves replicas off
    draining servers): the swap is one change of the replica set. The plan placed the copy
    away from the failure domains of every replica but the one it moves off, so:

    - the recovery task names that replica (``replaces``): if it is still in the record it
      leaves, draining or not any more (the operator may have undrained it since: the copy
      is made and the move harms nothing; a still-draining other replica gets its own move);
    - otherwise (it was dropped meanwhile, or an older task without the field, or a join
      without a task) a replica on a draining server leaves, the first whose going leaves
      ``chunk_id`` in a failure domain no staying replica is in. The draining set may have
      changed since the plan (one undrained, another drained), and taking out whichever is
      draining now could leave two replicas in one domain with nothing to repair it.

    If the swap would put ``chunk_id`` in a domain a staying replica is in (and
    ``meta.allow_shared_failure_domain`` is off), the join is refused (409), not made as a
    swap nor as an extra replica (nothing trims an extent with too many): the extent keeps
    its in-sync replicas, the task's error counts towards its replanning, and the next plan
    places a copy against the current draining set.
    """
    def domain(c: str) -> tuple[str, ...]:
        # A removed chunk server is a domain of its own (as recovery's placement counts it).
        return candidate_of(views[c]).failure_domain if c in views else ("", "", f"removed:{c}")

    def safe(leaving: str) -> bool:
        if shared_allowed(None) or chunk_id not in views:
            return True
        mine = domain(chunk_id)
        return all(domain(c) != mine for c in rec.replicas if c != leaving)

    named = task.replaces if task is not None else ""
    if named and named in rec.replicas:
        candidates = [named]
    else:
        candidates = [c for c in rec.replicas if c in views and views[c].draining]
    if not candidates:
        raise Conflict(f"{chunk_id} cannot join extent {rec.volume_id}/{rec.index}: it already has "
                       f"{len(rec.replicas)} of {want} replicas", record=rec.to_dict())
    leaving = next((c for c in candidates if safe(c)), None)
    if leaving is None:
        raise Conflict(f"{chunk_id} cannot join extent {rec.volume_id}/{rec.index} in place of "
                       f"{','.join(candidates)}: it would share failure domain "
                       f"{describe(domain(chunk_id))} with a replica that stays",
                       hint="recovery plans the move again", record=rec.to_dict())
    return leaving


async def list_extents(ctx: Ctx, vid: str, limit: int = 1000,
                       start_after: int | None = None) -> tuple[list[ExtentRecord], int | None]:
    """A page of a volume's extent records in index order, and the index to continue after."""
    if not 1 <= limit <= 10000:
        raise InvalidArgument(f"invalid limit {limit}: must be 1..10000")
    base = ctx.keys.extents(vid)
    start = ctx.keys.extent(vid, start_after) + b"\x00" if start_after is not None else base
    kvs, more = await ctx.etcd.range(start, prefix_end(base), limit=limit)
    recs = [ExtentRecord.decode(v) for _, v in kvs]
    return recs, (recs[-1].index if more and recs else None)


async def all_extents(ctx: Ctx, vid: str | None = None) -> list[ExtentRecord]:
    """Every extent record (of ``vid``, else of the cluster), read in pages at one revision."""
    prefix = ctx.keys.extents(vid) if vid else ctx.keys.all_extents()
    kvs, _ = await get_prefix_paged(ctx.etcd, prefix)
    return [ExtentRecord.decode(kv.value) for kv in kvs]
