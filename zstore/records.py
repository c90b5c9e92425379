"""Typed records stored in etcd.

Every record is a dataclass with a ``schema`` field (its schema version) and
is stored as JSON, so ``etcdctl get`` stays readable during an incident.
Decoding ignores unknown fields, so an older daemon can read a record a newer
one wrote; a record whose schema is newer than this code knows is refused
rather than misread. Every known field's value is checked against its annotation
(a ``float`` takes an int too; ``bool`` and ``int`` never take each other; a
container's items are checked): a record that decodes as JSON but holds a
wrongly typed value (a hand-edited ``"created": null``) is a ``RecordError``
there, not a TypeError in whatever step first uses the field.
"""

from __future__ import annotations

import dataclasses
import json
import time
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, TypeVar

T = TypeVar("T", bound="Record")


class RecordError(ValueError):
    """A stored value that does not decode as the expected record."""


class NewerSchemaError(RecordError):
    """A record written by a newer zstore (its schema above this code's): not garbage; a
    caller that must not ignore what it cannot read tells it apart from a corrupt value."""


@dataclass
class Record:
    SCHEMA: ClassVar[int] = 1
    schema: int = field(default=0, kw_only=True)

    def __post_init__(self) -> None:
        if not self.schema:
            self.schema = self.SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def encode(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        if not isinstance(data, dict):
            raise RecordError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
        checks = _CHECKS.get(cls) or _compile(cls)
        schema = data.get("schema", 1)
        if type(schema) is not int and not _is_int(schema):
            raise RecordError(_mistyped(cls, "schema", schema))
        if schema > cls.SCHEMA:     # before any other field: a newer writer's may not fit ours
            raise NewerSchemaError(
                f"{cls.__name__}: schema {schema!r} is newer than this code ({cls.SCHEMA})")
        known = {}
        for k, v in data.items():
            check = checks.get(k)
            if check is None:           # unknown: a newer writer's field, dropped
                continue
            if type(v) not in check[0] and (check[1] is None or not check[1](v)):
                raise RecordError(_mistyped(cls, k, v))
            known[k] = v
        try:
            return cls(**known)
        except TypeError as e:
            raise RecordError(f"{cls.__name__}: {e}") from None

    @classmethod
    def decode(cls: type[T], raw: bytes) -> T:
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise RecordError(f"{cls.__name__}: not JSON: {e}") from None
        return cls.from_dict(data)


# Field checks, compiled once per record class from its annotations (``_compile``):
# name -> (the exact types that fit outright, a check for the rest or None). The first
# test (a set lookup of the value's type) settles every scalar JSON decodes to; the
# check looks into containers and takes subclasses (an IntEnum for an int).
_Check = tuple[frozenset, "Callable[[Any], bool] | None"]
_CHECKS: dict[type, dict[str, _Check]] = {}
_HINTS: dict[type, dict[str, Any]] = {}
_NONE = type(None)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and type(v) is not bool


def _is_float(v: Any) -> bool:
    return isinstance(v, (int, float)) and type(v) is not bool


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


_SCALARS: dict[Any, _Check] = {
    int: (frozenset({int}), _is_int),
    float: (frozenset({float, int}), _is_float),      # a whole number of seconds may be written as one
    str: (frozenset({str}), _is_str),
    bool: (frozenset({bool}), None),
    _NONE: (frozenset({_NONE}), None),
}


def _fits(check: _Check, v: Any) -> bool:
    return type(v) in check[0] or (check[1] is not None and check[1](v))


def _items_fit(item: _Check) -> Callable[[Any], bool]:
    """Whether every item of an iterable fits ``item``: the items' types at C speed, each
    item's own check only when some type is not an exact fit (a subclass, or a container)."""
    exact, slow = item
    if slow is None:
        return lambda items: exact.issuperset(map(type, items))
    return lambda items: exact.issuperset(map(type, items)) or all(_fits(item, x) for x in items)


def _check_of(hint: Any, where: str) -> _Check:
    """The check for one annotation; a form this decoder does not know is a TypeError (a
    programming error in the record's definition, met by the tests of every record).

    A ``dict[str, X]``'s keys are not checked: a JSON object's keys are strings."""
    if hint is Any:
        return frozenset(), lambda v: True
    if hint in _SCALARS:
        return _SCALARS[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        parts = [_check_of(a, where) for a in args]
        exact = frozenset().union(*(p[0] for p in parts))
        slow = [p[1] for p in parts if p[1] is not None]
        return exact, (None if not slow else slow[0] if len(slow) == 1
                       else (lambda v: any(f(v) for f in slow)))
    if hint is list or (origin is list and args in ((), (Any,))):
        return frozenset({list}), lambda v: isinstance(v, list)
    if origin is list and len(args) == 1:
        items = _items_fit(_check_of(args[0], where))
        return frozenset(), lambda v: isinstance(v, list) and items(v)
    if hint is dict or (origin is dict and len(args) == 2 and args[0] is str and args[1] is Any):
        return frozenset({dict}), lambda v: isinstance(v, dict)
    if origin is dict and len(args) == 2 and args[0] is str:
        values = _items_fit(_check_of(args[1], where))
        return frozenset(), lambda v: isinstance(v, dict) and values(v.values())
    raise TypeError(f"{where}: annotation {hint!r} is not a form the record decoder checks "
                    "(zstore.records._check_of)")


def _compile(cls: type) -> dict[str, _Check]:
    hints = typing.get_type_hints(cls)
    _HINTS[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    checks = {name: _check_of(hint, f"{cls.__name__}.{name}") for name, hint in _HINTS[cls].items()}
    _CHECKS[cls] = checks
    return checks


def _type_text(hint: Any) -> str:
    if hint is _NONE:
        return "None"
    if hint is Any:
        return "Any"
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return " | ".join(_type_text(a) for a in args)
    return f"{origin.__name__}[{', '.join(_type_text(a) for a in args)}]"


def _what(hint: Any, v: Any) -> str:
    """What of ``v`` does not fit ``hint``: its type, or where in it the item that does not fit
    is. Never the value itself (a ChapRecord's secret must not reach a log)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        for a in args:       # the container member, if v is one, says more than its type
            if typing.get_origin(a) in (list, dict) and isinstance(v, typing.get_origin(a)):
                return _what(a, v)
    if origin is list and args and isinstance(v, list):
        item = _check_of(args[0], "")
        for i, x in enumerate(v):
            if not _fits(item, x):
                return f"list with item [{i}] {_what(args[0], x)}"
    if origin is dict and args and isinstance(v, dict):
        value = _check_of(args[1], "")
        for k, x in v.items():
            if not _fits(value, x):
                return f"dict with item [{k!r}] {_what(args[1], x)}"
    return type(v).__name__


def _mistyped(cls: type, name: str, v: Any) -> str:
    hint = _HINTS[cls][name]
    return f"{cls.__name__}: field {name!r} must be {_type_text(hint)}, got {_what(hint, v)}"


def now() -> float:
    return round(time.time(), 3)


@dataclass
class ClusterInfo(Record):
    """Written once by the first meta server; the id seeds IQNs."""
    cluster_id: str
    name: str = "zstore"
    created: float = field(default_factory=now)


@dataclass
class LeaderRecord(Record):
    """Value of the leader key, held under the leader's lease.

    ``epoch`` grows by one at every change of leader; every write the leader
    makes compares this exact value, so a deposed leader cannot write.
    """
    meta_id: str
    url: str
    epoch: int
    since: float = field(default_factory=now)


@dataclass
class MetaMember(Record):
    meta_id: str
    url: str
    started: float = field(default_factory=now)


@dataclass
class Disk(Record):
    path: str
    capacity: int
    used: int = 0
    state: str = "ok"            # ok | full | failed


@dataclass
class ChunkInfo(Record):
    """What a chunk server says about itself; written by the chunk server only."""
    chunk_id: str
    hostname: str
    address: str                 # host the chunk server is reached at
    data_port: int               # replication port
    portal: str                  # iSCSI portal host:port
    labels: dict[str, str] = field(default_factory=dict)
    disks: list[dict[str, Any]] = field(default_factory=list)
    registered: float = field(default_factory=now)


@dataclass
class ChunkLive(Record):
    """Held under the chunk server's lease: exists exactly while it is alive."""
    chunk_id: str
    pid: int
    started: float
    lease_ttl: int
    disks: list[dict[str, Any]] = field(default_factory=list)
    heartbeat: float = field(default_factory=now)
    sessions: list[dict[str, Any]] = field(default_factory=list)   # [{initiator, target, type}]
    storage: dict[str, Any] = field(default_factory=dict)          # storage engine counters
    # Shutting down: still the owner of its volumes (the lease holds until its writes have
    # stopped, so the meta keeps seeing it up), but its listener is closing, so redirectors
    # send no new logins here. Schema stays 1 on purpose: a reader that predates the field
    # ignores it (unknown fields are dropped) instead of refusing the whole record.
    stopping: bool = False


@dataclass
class VipRecord(Record):
    """Who holds the iSCSI VIP; under the holder's lease. ``epoch`` +1 per new holder."""
    redirector_id: str
    vip: str                     # address
    port: int
    epoch: int
    interface: str | None = None
    since: float = field(default_factory=now)


@dataclass
class RedirectorMember(Record):
    redirector_id: str
    hostname: str
    started: float = field(default_factory=now)


@dataclass
class RedirectRecord(Record):
    """Sticky login redirect: sessions of this initiator to this target go to ``chunk_id``."""
    target: str
    initiator: str
    chunk_id: str
    chosen: float = field(default_factory=now)


@dataclass
class ChunkAdmin(Record):
    """Administrative state of a chunk server; written by the meta leader only."""
    chunk_id: str
    state: str = "active"        # active | draining
    down_since: float | None = None
    changed: float = field(default_factory=now)


@dataclass
class Volume(Record):
    volume_id: str
    name: str
    size: int
    replicas: int
    thin: bool = True
    block_size: int = 512
    placement: list[str] = field(default_factory=list)   # chunk ids of the planned replica set
    target_index: int = 0
    lun: int = 0
    wwn: str = ""
    source_snapshot: str | None = None                    # snapshot id a clone was made from
    state: str = "available"     # available | deleted (kept while snapshots reference it)
    created: float = field(default_factory=now)
    request_name: str | None = None
    snap_seq: int = 1            # write sequence; taking a snapshot freezes it and adds 1


@dataclass
class ExtentRecord(Record):
    """Replica set of one 64 MiB extent of a volume (docs/storage.md)."""
    volume_id: str
    index: int
    replicas: list[str] = field(default_factory=list)     # in-sync chunk ids
    generation: int = 1                                   # +1 per change of replicas
    stale: dict[str, int] = field(default_factory=dict)   # dropped chunk id -> generation dropped at
    created: float = field(default_factory=now)


@dataclass
class VolumeOwner(Record):
    """The one coordinator allowed to write a volume; ``epoch`` +1 per acquisition."""
    volume_id: str
    chunk_id: str
    epoch: int
    released: bool = False
    since: float = field(default_factory=now)


@dataclass
class ReservationRecord(Record):
    """One logical unit's reservations, shared by every chunk server that exports it.

    A nexus is ``[initiator port, target port, relative port id]``; every chunk server
    presents the same target ports, so an initiator port is the same I_T nexus whichever
    server its session reached. ``change`` grows by one per write of the record;
    ``history`` holds the last changes' ``[change, origin, [[nexus, asc, ascq], ...]]``, the
    unit attentions each established: the other servers post those they have not posted
    yet for the sessions they hold (``origin`` posted its own), also when their mirror
    skipped a change.
    ``confirm``: the change can refuse a command the state before it allowed (a new
    reservation, a removed registration), so ``origin`` answers it only once every live
    chunk server has applied it (``reservation-acks``).
    ``spc2_chunk``: the chunk server whose session holds ``spc2``. An SPC-2 reservation does
    not outlive its I_T nexus or a power-on: when that server restarts (its first listing)
    or its live key goes, the reservation is released. Added without a schema change, as
    ``ChunkLive.stopping`` was: an older reader drops the field (and keeps such a holder
    until LU reset, as it always did); a record without it ("") is never released that way.
    """
    generation: int = 0                                         # PRgeneration (SPC-4)
    registrations: list[list] = field(default_factory=list)     # [nexus, key]
    holder: list | None = None                                  # nexus holding the PR
    type: int = 0                                               # its PR type, 0 = none
    spc2: list | None = None                                    # nexus holding RESERVE(6)
    spc2_chunk: str = ""                                        # chunk id serving that nexus
    change: int = 0
    origin: str = ""
    history: list[list] = field(default_factory=list)
    confirm: bool = False


@dataclass
class VolumeOp(Record):
    """A volume operation only its coordinator may run (snapshot barrier, revert)."""
    op_id: str
    volume_id: str
    kind: str                    # snapshot | revert
    snapshot_id: str
    executor: str                # chunk id
    state: str = "pending"       # pending | running (claimed by executor) | done | failed
    error: str | None = None
    created: float = field(default_factory=now)
    claim_epoch: int = 0         # the executor's owner epoch when it claimed the op (running)


# Copies a chunk server runs at once (its engine's recovery slots); the meta leader counts on
# it to tell a pending task queued for a slot from one whose executor missed it.
RECOVERY_SLOTS = 2


@dataclass
class RecoveryTask(Record):
    """Bring one extent back to full replica count: resync a stale copy or rebuild a new one."""
    volume_id: str
    index: int
    target: str                  # chunk id receiving the copy
    kind: str                    # resync | rebuild
    executor: str                # chunk id running the copy (the volume's coordinator)
    generation: int              # extent generation the task was planned at
    done_bytes: int = 0
    total_bytes: int = 0
    state: str = "pending"       # pending | running
    error: str | None = None
    created: float = field(default_factory=now)
    # A move off a draining server: the replica the copy joins in place of ("" otherwise, and
    # in records written before the field). Schema stays 1: older code reads the record and
    # ignores the field; a join without it checks failure domains (meta.extents.join).
    replaces: str = ""


@dataclass
class Snapshot(Record):
    snapshot_id: str
    name: str
    volume_id: str
    size: int
    state: str = "ready"         # creating | ready | deleted (kept while clones reference it)
    seq: int = 0                 # the volume's snap_seq when taken (its COW view)
    created: float = field(default_factory=now)


@dataclass
class Target(Record):
    index: int
    iqn: str
    created: float = field(default_factory=now)


@dataclass
class LunMapping(Record):
    """One LUN slot: a volume, or (``snapshot_id`` set) a snapshot of it exported read-only.

    A snapshot mapping is written as schema 2 so that code which does not know
    ``snapshot_id`` refuses it instead of serving the live volume in its place;
    volume mappings stay schema 1.
    """
    SCHEMA: ClassVar[int] = 2
    target_index: int
    lun: int
    volume_id: str
    readonly: bool = False
    snapshot_id: str | None = None

    def __post_init__(self) -> None:
        if not self.schema:
            self.schema = 2 if self.snapshot_id else 1


@dataclass
class AclEntry(Record):
    """An initiator allowed to see a LUN. Stored at ``acl/{volume id}/...`` for a volume and at
    ``acl/{snapshot id}/...`` (``snapshot_id`` set, schema 2, always read-only) for an exported
    snapshot, so older readers never take it for access to the live volume."""
    SCHEMA: ClassVar[int] = 2
    volume_id: str
    initiator: str
    readonly: bool = False
    added: float = field(default_factory=now)
    snapshot_id: str | None = None

    def __post_init__(self) -> None:
        if not self.schema:
            self.schema = 2 if self.snapshot_id else 1

    @property
    def export_id(self) -> str:
        """The id its ACL is keyed by: the snapshot's for a snapshot LUN, else the volume's."""
        return self.snapshot_id or self.volume_id


@dataclass
class ChapRecord(Record):
    """CHAP credentials an initiator uses on a target ('*' = every target).

    The secrets are readable by the daemons that authenticate logins and never
    leave the meta API (``public()`` drops them).
    """
    target: str
    initiator: str
    user: str
    secret: str
    mutual_user: str | None = None
    mutual_secret: str | None = None
    changed: float = field(default_factory=now)

    def public(self) -> dict[str, Any]:
        return {"target": self.target, "initiator": self.initiator, "user": self.user,
                "mutual": self.mutual_user is not None, "mutual_user": self.mutual_user,
                "changed": self.changed}

    def __repr__(self) -> str:  # never print secrets, even in a traceback
        return f"ChapRecord(target={self.target!r}, initiator={self.initiator!r}, user={self.user!r})"
