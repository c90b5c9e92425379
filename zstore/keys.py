"""The etcd key layout: the one module that knows where things live.

Everything sits under a configurable prefix (default ``/zstore``), so several
clusters (or test runs) can share one etcd. Layout::

    {p}/cluster                          ClusterInfo
    {p}/meta/leader                      LeaderRecord    (leader's lease)
    {p}/meta/epoch                       decimal int, +1 per leadership change
    {p}/meta/members/{meta_id}           MetaMember      (member's lease)
    {p}/chunks/{chunk_id}/info           ChunkInfo       (written by the chunk server)
    {p}/chunks/{chunk_id}/live           ChunkLive       (chunk server's lease)
    {p}/chunks/{chunk_id}/admin          ChunkAdmin      (written by the meta leader)
    {p}/volumes/id/{volume_id}           Volume
    {p}/volumes/name/{name}              volume_id       (name -> id, same txn as the record)
    {p}/snapshots/id/{snapshot_id}       Snapshot
    {p}/snapshots/name/{volume_id}/{name} snapshot_id
    {p}/snapshots/lun/{snapshot_id}      "{index:04d}/{lun:03d}" (the snapshot's read-only LUN)
    {p}/snapshots/unique/{name}          snapshot_id     (a name unique across volumes, as CSI's
                                         are: taken in the snapshot's create txn, freed with its name)
    {p}/targets/{index:04d}              Target
    {p}/luns/{index:04d}/{lun:03d}       LunMapping      (slot taken = key exists)
    {p}/lun-cursor                       "{index:04d}/{lun:03d}": where the LUN allocator looks
                                         next (after the last slot taken; absent = 0000/001), so a
                                         freed slot is not handed out again until it wraps around
    {p}/acl/{volume_id}/{initiator}      AclEntry
    {p}/acl/{snapshot_id}/{initiator}    AclEntry        (of a snapshot's LUN; ids are unique uuids)
    {p}/chap/{target}/{initiator}        ChapRecord      (target '*' = all targets)
    {p}/redirector/vip                   VipRecord       (VIP holder's lease)
    {p}/redirector/epoch                 decimal int, +1 per change of VIP holder
    {p}/redirector/members/{id}          RedirectorMember (member's lease)
    {p}/redirects/{target}/{initiator}   RedirectRecord  (sticky choice of chunk server)
    {p}/cluster/peer-secret              hex secret chunk servers prove to each other
    {p}/extents/{volume_id}/{index:08d}  ExtentRecord    (replica set of one extent)
    {p}/owners/{volume_id}               VolumeOwner     (writer's epoch; not leased)
    {p}/volops/{volume_id}/{op_id}       VolumeOp        (snapshot barrier, revert)
    {p}/recovery/{volume_id}/{index:08d} RecoveryTask
    {p}/reservations/{volume_id}/{view:020d} ReservationRecord (a LU's persistent reservations;
                                         view 0 = the volume, else a snapshot's seq)
    {p}/reservation-acks/{volume_id}/{view:020d}/{chunk_id}  decimal revision of that record
                                         the chunk server has applied (a restricting change)

Fixed-width numbers keep etcd's byte order equal to numeric order, which the
LUN allocator and paginated listings rely on.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote


def _seg(s: str) -> str:
    """Make a user-supplied string safe as one key segment (no '/')."""
    return quote(s, safe="-._:@*")


@dataclass(frozen=True)
class Keys:
    prefix: str = "/zstore"

    def __post_init__(self) -> None:
        p = "/" + self.prefix.strip("/")
        if p == "/":
            raise ValueError("etcd prefix must not be empty")
        object.__setattr__(self, "prefix", p)

    def _k(self, *parts: str) -> bytes:
        return "/".join((self.prefix, *parts)).encode()

    def _dir(self, *parts: str) -> bytes:
        return self._k(*parts) + b"/"

    # cluster and meta
    def cluster(self) -> bytes: return self._k("cluster")
    def leader(self) -> bytes: return self._k("meta", "leader")
    def epoch(self) -> bytes: return self._k("meta", "epoch")
    def meta_members(self) -> bytes: return self._dir("meta", "members")
    def meta_member(self, meta_id: str) -> bytes: return self._k("meta", "members", _seg(meta_id))

    # chunk servers
    def chunks(self) -> bytes: return self._dir("chunks")
    def chunk_info(self, cid: str) -> bytes: return self._k("chunks", _seg(cid), "info")
    def chunk_live(self, cid: str) -> bytes: return self._k("chunks", _seg(cid), "live")
    def chunk_admin(self, cid: str) -> bytes: return self._k("chunks", _seg(cid), "admin")
    def chunk_dir(self, cid: str) -> bytes: return self._dir("chunks", _seg(cid))

    @staticmethod
    def chunk_key_parts(key: bytes, chunks_prefix: bytes) -> tuple[str, str] | None:
        """(chunk_id, kind) of a key under ``chunks()``, kind in info|live|admin."""
        rest = key[len(chunks_prefix):].decode().split("/")
        return (rest[0], rest[1]) if len(rest) == 2 else None

    # volumes and snapshots
    def volumes(self) -> bytes: return self._dir("volumes", "id")
    def volume(self, vid: str) -> bytes: return self._k("volumes", "id", vid)
    def volume_names(self) -> bytes: return self._dir("volumes", "name")
    def volume_name(self, name: str) -> bytes: return self._k("volumes", "name", _seg(name))
    def snapshots(self) -> bytes: return self._dir("snapshots", "id")
    def snapshot(self, sid: str) -> bytes: return self._k("snapshots", "id", sid)
    def snapshot_names(self, vid: str) -> bytes: return self._dir("snapshots", "name", vid)
    def snapshot_name(self, vid: str, name: str) -> bytes:
        return self._k("snapshots", "name", vid, _seg(name))
    def snapshot_name_in(self, key: bytes, vid: str) -> str:
        """The name a ``snapshot_name(vid, name)`` key is of."""
        return unquote(key[len(self.snapshot_names(vid)):].decode())
    def snapshot_unique_name(self, name: str) -> bytes:
        return self._k("snapshots", "unique", _seg(name))
    def snapshot_luns(self) -> bytes: return self._dir("snapshots", "lun")
    def snapshot_lun(self, sid: str) -> bytes: return self._k("snapshots", "lun", sid)

    # targets, LUNs, ACLs, CHAP
    def targets(self) -> bytes: return self._dir("targets")
    def target(self, index: int) -> bytes: return self._k("targets", f"{index:04d}")
    def luns(self) -> bytes: return self._dir("luns")
    def target_luns(self, index: int) -> bytes: return self._dir("luns", f"{index:04d}")
    def lun(self, index: int, lun: int) -> bytes: return self._k("luns", f"{index:04d}", f"{lun:03d}")
    # Not under luns/: that prefix holds only LunMappings (listed, watched by chunk servers).
    def lun_cursor(self) -> bytes: return self._k("lun-cursor")

    @staticmethod
    def lun_key_parts(key: bytes) -> tuple[int, int]:
        t, lun = key.decode().rsplit("/", 2)[-2:]
        return int(t), int(lun)

    def acls(self) -> bytes: return self._dir("acl")
    def volume_acl(self, vid: str) -> bytes: return self._dir("acl", vid)
    def acl(self, vid: str, initiator: str) -> bytes: return self._k("acl", vid, _seg(initiator))
    # redirector
    def vip(self) -> bytes: return self._k("redirector", "vip")
    def vip_epoch(self) -> bytes: return self._k("redirector", "epoch")
    def redirector_members(self) -> bytes: return self._dir("redirector", "members")
    def redirector_member(self, rid: str) -> bytes: return self._k("redirector", "members", _seg(rid))
    def redirects(self) -> bytes: return self._dir("redirects")
    def redirect(self, target: str, initiator: str) -> bytes:
        return self._k("redirects", _seg(target), _seg(initiator))

    def chaps(self) -> bytes: return self._dir("chap")
    def chap(self, target: str, initiator: str) -> bytes:
        return self._k("chap", _seg(target), _seg(initiator))

    # storage engine (docs/storage.md)
    def peer_secret(self) -> bytes: return self._k("cluster", "peer-secret")
    def all_extents(self) -> bytes: return self._dir("extents")
    def extents(self, vid: str) -> bytes: return self._dir("extents", vid)
    def extent(self, vid: str, index: int) -> bytes: return self._k("extents", vid, f"{index:08d}")
    def owners(self) -> bytes: return self._dir("owners")
    def owner(self, vid: str) -> bytes: return self._k("owners", vid)
    def all_volops(self) -> bytes: return self._dir("volops")
    def volops(self, vid: str) -> bytes: return self._dir("volops", vid)
    def volop(self, vid: str, op_id: str) -> bytes: return self._k("volops", vid, op_id)
    def all_recovery(self) -> bytes: return self._dir("recovery")
    def recovery(self, vid: str) -> bytes: return self._dir("recovery", vid)
    def recovery_task(self, vid: str, index: int) -> bytes: return self._k("recovery", vid, f"{index:08d}")
    def all_reservations(self) -> bytes: return self._dir("reservations")
    def reservations(self, vid: str) -> bytes: return self._dir("reservations", vid)
    def reservation(self, vid: str, view: int = 0) -> bytes:
        return self._k("reservations", vid, f"{view:020d}")

    def reservation_key_parts(self, key: bytes) -> tuple[str, int] | None:
        """(volume id, view) of a ``reservation`` key, None for anything else."""
        rest = key[len(self.all_reservations()):].decode().split("/")
        return (rest[0], int(rest[1])) if len(rest) == 2 and rest[1].isdigit() else None

    def reservation_acks(self, vid: str, view: int | None = None) -> bytes:
        return self._dir("reservation-acks", vid) if view is None else \
            self._dir("reservation-acks", vid, f"{view:020d}")

    def reservation_ack(self, vid: str, view: int, chunk_id: str) -> bytes:
        return self._k("reservation-acks", vid, f"{view:020d}", _seg(chunk_id))

    @staticmethod
    def extent_key_parts(key: bytes) -> tuple[str, int]:
        """(volume id, index) of an extent or recovery-task key."""
        vid, index = key.decode().rsplit("/", 2)[-2:]
        return vid, int(index)
