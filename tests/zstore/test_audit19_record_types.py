"""Record decoding checks every field's value against its annotation (audit 19).

A record whose JSON decodes but holds a wrongly typed value (a hand-edited
``"created": null`` in a VolumeOp) must be a RecordError at decode, which the callers
catch, not a TypeError in the first step that uses the field (``tidy_ops``).
"""

import dataclasses
import enum
import json

import pytest

from zstore import records
from zstore.records import NewerSchemaError, Record, RecordError

# One valid record of every kind, every field set to a non-default value of its type.
VALID: dict[type, dict] = {
    records.ClusterInfo: dict(cluster_id="c" * 32, name="z1", created=1.25),
    records.LeaderRecord: dict(meta_id="m1", url="http://m1:8400", epoch=3, since=2.5),
    records.MetaMember: dict(meta_id="m1", url="http://m1:8400", started=3.5),
    records.Disk: dict(path="/d1", capacity=1 << 30, used=5, state="full"),
    records.ChunkInfo: dict(chunk_id="k1", hostname="h1", address="10.0.0.1", data_port=7000,
                            portal="10.0.0.1:3260", labels={"rack": "r1"},
                            disks=[{"path": "/d1", "capacity": 1, "used": 0, "state": "ok"}],
                            registered=4.5),
    records.ChunkLive: dict(chunk_id="k1", pid=42, started=5.5, lease_ttl=10,
                            disks=[{"path": "/d1", "capacity": 1}], heartbeat=6.5,
                            sessions=[{"initiator": "i", "target": "t", "type": "normal"}],
                            storage={"writes": 3, "nested": {"a": [1]}}, stopping=True),
    records.VipRecord: dict(redirector_id="r1", vip="10.0.0.9", port=3260, epoch=2,
                            interface="eth0", since=7.5),
    records.RedirectorMember: dict(redirector_id="r1", hostname="h1", started=8.5),
    records.RedirectRecord: dict(target="iqn.t", initiator="iqn.i", chunk_id="k1", chosen=9.5),
    records.ChunkAdmin: dict(chunk_id="k1", state="draining", down_since=10.5, changed=11.5),
    records.Volume: dict(volume_id="v" * 32, name="vol", size=1 << 30, replicas=3, thin=False,
                         block_size=4096, placement=["k1", "k2", "k3"], target_index=1, lun=2,
                         wwn="6001405abc", source_snapshot="s" * 32, state="deleted",
                         created=12.5, request_name="pvc-1", snap_seq=4),
    records.ExtentRecord: dict(volume_id="v" * 32, index=7, replicas=["k1", "k2"], generation=5,
                               stale={"k3": 4}, created=13.5),
    records.VolumeOwner: dict(volume_id="v" * 32, chunk_id="k1", epoch=6, released=True,
                              since=14.5),
    records.ReservationRecord: dict(generation=3, registrations=[[["i", "t", 1], 5]],
                                    holder=["i", "t", 1], type=5, spc2=["i", "t", 2],
                                    spc2_chunk="k1", change=8, origin="k2",
                                    history=[[8, "k2", [[["i", "t", 1], 6, 3]]]], confirm=True),
    records.VolumeOp: dict(op_id="o" * 32, volume_id="v" * 32, kind="revert",
                           snapshot_id="s" * 32, executor="k1", state="failed", error="boom",
                           created=15.5, claim_epoch=6),
    records.RecoveryTask: dict(volume_id="v" * 32, index=7, target="k3", kind="rebuild",
                               executor="k1", generation=5, done_bytes=10, total_bytes=20,
                               state="running", error="slow", created=16.5, replaces="k4"),
    records.Snapshot: dict(snapshot_id="s" * 32, name="snap", volume_id="v" * 32, size=1 << 30,
                           state="creating", seq=3, created=17.5),
    records.Target: dict(index=1, iqn="iqn.2024-01.io.zstore:t1", created=18.5),
    records.LunMapping: dict(target_index=1, lun=2, volume_id="v" * 32, readonly=True,
                             snapshot_id="s" * 32),
    records.AclEntry: dict(volume_id="v" * 32, initiator="iqn.i", readonly=True, added=19.5,
                           snapshot_id="s" * 32),
    records.ChapRecord: dict(target="*", initiator="iqn.i", user="u", secret="s3cret-s3cret",
                             mutual_user="mu", mutual_secret="m-s3cret-s3cret", changed=20.5),
}

# Wrongly typed values for each annotation form the records use. A record field of a form not
# listed here fails test_every_annotation_form_is_covered: add its wrong values with it.
WRONG: dict[str, list] = {
    "int": ["7", 7.5, 7.0, True, None, [7], {"a": 7}],
    "float": ["1.5", True, False, None, [1.5]],
    "str": [5, 5.5, True, None, ["a"], {"a": "b"}],
    "bool": [1, 0, "true", None, 1.0],
    "str | None": [5, True, ["a"], {}],
    "float | None": ["1.5", True, [1.5]],
    "list[str]": ["abc", {"a": "b"}, None, ["a", 1], ["a", None], [True]],
    "dict[str, int]": [[], "x", None, {"a": "1"}, {"a": 1.5}, {"a": True}, {"a": None}],
    "dict[str, str]": [[], "x", None, {"a": 1}, {"a": None}],
    "list[dict[str, Any]]": [{}, "x", None, [1], [["a"]], [{"a": 1}, None]],
    "dict[str, Any]": [[], "x", None, 5],
    "list[list]": [{}, "x", None, [1], [{"a": 1}], [[1], "x"]],
    "list | None": [{}, "x", 5, True],
}

OPTIONAL = ("str | None", "float | None", "list | None")
KINDS = sorted(VALID, key=lambda c: c.__name__)


def _record_classes() -> set[type]:
    return {c for c in vars(records).values()
            if isinstance(c, type) and issubclass(c, Record) and c is not Record}


def _fields(cls: type) -> list[tuple[str, str]]:
    records._compile(cls)
    return [(name, records._type_text(hint)) for name, hint in records._HINTS[cls].items()]


def _wire(cls: type) -> dict:
    """The valid record as stored: the dict its JSON decodes to."""
    return json.loads(cls(**VALID[cls]).encode())


def _cases():
    for cls in KINDS:
        for name, text in _fields(cls):
            for bad in WRONG.get(text, []):
                yield pytest.param(cls, name, text, bad, id=f"{cls.__name__}.{name}={bad!r}")


def test_every_record_kind_and_annotation_form_is_covered():
    assert set(VALID) == _record_classes()
    for cls in KINDS:
        for name, text in _fields(cls):
            assert text in WRONG, f"{cls.__name__}.{name}: {text} has no wrong values here"
            if name != "schema":
                assert name in VALID[cls], f"{cls.__name__}.{name} is left at its default"


@pytest.mark.parametrize("cls", KINDS, ids=lambda c: c.__name__)
def test_a_valid_record_round_trips(cls):
    rec = cls(**VALID[cls])
    back = cls.decode(rec.encode())
    assert back == rec and type(back) is cls
    assert cls.from_dict(rec.to_dict()) == rec


@pytest.mark.parametrize("cls,name,text,bad", list(_cases()))
def test_a_wrongly_typed_field_is_a_record_error_naming_it(cls, name, text, bad):
    data = _wire(cls)
    data[name] = bad
    raw = json.dumps(data).encode()
    with pytest.raises(RecordError) as e:
        cls.decode(raw)
    assert type(e.value) is RecordError          # garbage, not a newer schema
    msg = str(e.value)
    assert msg.startswith(f"{cls.__name__}: field {name!r} must be {text}, got "), msg
    with pytest.raises(RecordError):
        cls.from_dict(data)


def test_the_message_says_what_does_not_fit():
    data = _wire(records.VolumeOp)
    data["created"] = None
    with pytest.raises(RecordError, match=r"^VolumeOp: field 'created' must be float, got NoneType$"):
        records.VolumeOp.decode(json.dumps(data).encode())
    data = _wire(records.ExtentRecord)
    data["replicas"] = ["k1", 2]
    with pytest.raises(RecordError, match=r"must be list\[str\], got list with item \[1\] int$"):
        records.ExtentRecord.decode(json.dumps(data).encode())
    data = _wire(records.ExtentRecord)
    data["stale"] = {"k3": "4"}
    with pytest.raises(RecordError, match=r"must be dict\[str, int\], got dict with item \['k3'\] str$"):
        records.ExtentRecord.decode(json.dumps(data).encode())
    data = _wire(records.Snapshot)
    data["name"] = None
    with pytest.raises(RecordError, match=r"^Snapshot: field 'name' must be str, got NoneType$"):
        records.Snapshot.decode(json.dumps(data).encode())


def test_the_message_never_carries_the_value():
    data = _wire(records.ChapRecord)
    data["secret"] = ["s3cret-s3cret"]
    data["mutual_secret"] = 123456789
    with pytest.raises(RecordError) as e:
        records.ChapRecord.decode(json.dumps(data).encode())
    assert "s3cret" not in str(e.value) and "123456789" not in str(e.value)


@pytest.mark.parametrize("cls", KINDS, ids=lambda c: c.__name__)
def test_an_int_is_taken_for_a_float(cls):
    floats = [name for name, text in _fields(cls) if text in ("float", "float | None")]
    data = _wire(cls)
    for name in floats:
        data[name] = 1700000000
    rec = cls.decode(json.dumps(data).encode())
    for name in floats:
        assert getattr(rec, name) == 1700000000


@pytest.mark.parametrize("cls", KINDS, ids=lambda c: c.__name__)
def test_none_is_refused_for_every_field_that_is_not_optional(cls):
    for name, text in _fields(cls):
        data = _wire(cls)
        data[name] = None
        if text in OPTIONAL:
            assert getattr(cls.from_dict(data), name) is None
        else:
            with pytest.raises(RecordError, match=f"field {name!r}"):
                cls.from_dict(data)


@pytest.mark.parametrize("cls", KINDS, ids=lambda c: c.__name__)
def test_a_newer_schema_is_refused_as_newer_before_any_field_check(cls):
    data = {name: None for name, _ in _fields(cls)}
    data["schema"] = cls.SCHEMA + 1
    with pytest.raises(NewerSchemaError):
        cls.decode(json.dumps(data).encode())


@pytest.mark.parametrize("bad", ["2", 1.0, True, None])
def test_a_schema_that_is_not_an_int_is_garbage(bad):
    data = _wire(records.Volume)
    data["schema"] = bad
    with pytest.raises(RecordError) as e:
        records.Volume.from_dict(data)
    assert type(e.value) is RecordError


@pytest.mark.parametrize("cls", KINDS, ids=lambda c: c.__name__)
def test_unknown_fields_are_still_dropped_whatever_their_type(cls):
    data = _wire(cls)
    data.update(from_the_future=None, other={"x": [1, None]}, flag=True)
    rec = cls.decode(json.dumps(data).encode())
    assert rec == cls(**VALID[cls])
    assert not hasattr(rec, "from_the_future")


@pytest.mark.parametrize("cls", KINDS, ids=lambda c: c.__name__)
def test_missing_fields_with_defaults_still_take_them(cls):
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    rec = cls.decode(json.dumps({k: v for k, v in _wire(cls).items() if k in required}).encode())
    assert type(rec) is cls and rec.schema in (1, cls.SCHEMA)


def test_a_missing_required_field_is_still_a_record_error():
    data = _wire(records.VolumeOp)
    del data["op_id"]
    with pytest.raises(RecordError):
        records.VolumeOp.from_dict(data)


def test_subclasses_of_the_annotated_types_are_taken_but_bool_never_for_int():
    class Kind(enum.IntEnum):
        FIVE = 5

    class Name(str):
        pass

    data = dict(VALID[records.ReservationRecord], type=Kind.FIVE, origin=Name("k2"))
    assert records.ReservationRecord.from_dict(data).type == 5
    data = dict(VALID[records.ExtentRecord], replicas=[Name("k1")], stale={"k3": Kind.FIVE})
    assert records.ExtentRecord.from_dict(data).stale == {"k3": 5}
    for bad in (True, False):
        with pytest.raises(RecordError):
            records.ExtentRecord.from_dict(dict(VALID[records.ExtentRecord], index=bad))
        with pytest.raises(RecordError):
            records.ExtentRecord.from_dict(dict(VALID[records.ExtentRecord], stale={"k": bad}))
    with pytest.raises(RecordError):
        records.Volume.from_dict(dict(VALID[records.Volume], thin=1))


def test_a_record_subclass_outside_the_module_is_checked_too():
    from meta.recovery import TrackedTask

    data = dict(_wire(records.RecoveryTask), idle_for=3, idle_version=2, failures=1)
    task = TrackedTask.decode(json.dumps(data).encode())
    assert (task.idle_for, task.idle_version, task.failures) == (3, 2, 1)
    for name, bad in (("idle_for", "3"), ("idle_version", None), ("failures", 1.5),
                      ("created", None)):
        with pytest.raises(RecordError, match=f"^TrackedTask: field {name!r}"):
            TrackedTask.decode(json.dumps(dict(data, **{name: bad})).encode())


def test_an_annotation_form_the_decoder_does_not_know_is_a_programming_error():
    with pytest.raises(TypeError, match="not a form the record decoder checks"):
        records._check_of(tuple[int, str], "X.f")
    with pytest.raises(TypeError, match="not a form the record decoder checks"):
        records._check_of(bytes, "X.f")


def test_tidy_ops_input_a_null_created_op_no_longer_decodes():
    """The reviewer's case: the op that stopped every recovery pass at ``now - op.created``."""
    op = records.VolumeOp(op_id="o", volume_id="v", kind="snapshot", snapshot_id="s", executor="k1")
    data = json.loads(op.encode())
    data["created"] = None
    with pytest.raises(RecordError):
        records.VolumeOp.decode(json.dumps(data).encode())


async def test_tidy_ops_goes_on_past_a_wrongly_typed_op(etcd_client, etcd_config):
    """End to end, against a real etcd: a VolumeOp with ``"created": null`` no longer stops the
    leader's recovery pass at its first step (``now - op.created``, a TypeError); the op is left
    (a record it cannot read) and the others are tidied as before."""
    import time

    from meta import volops, volumes
    from tests.meta.helpers import make_ctx, register_zones

    ctx = await register_zones(make_ctx(etcd_client, etcd_config), {"c0": "a", "c1": "b", "c2": "c"})
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 3)
    vid = vol.volume_id
    receipt = records.VolumeOp(op_id="old", volume_id=vid, kind="revert", snapshot_id="x",
                               executor="c0", state="done")
    bad = json.loads(receipt.encode())
    bad.update(op_id="nulled", created=None)
    await ctx.etcd.put(ctx.keys.volop(vid, "nulled"), json.dumps(bad).encode())
    await ctx.etcd.put(ctx.keys.volop(vid, "old"), receipt.encode())
    assert await volops.tidy_ops(ctx, now=time.time() + 10**6) == ["old"]
    assert [k.rsplit(b"/", 1)[-1] for k, _ in await ctx.list_raw(ctx.keys.volops(vid))] == [b"nulled"]
