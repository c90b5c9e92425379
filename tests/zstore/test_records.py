import json

import pytest

from zstore.records import ChapRecord, RecordError, Volume


def test_round_trip_and_schema_version():
    v = Volume(volume_id="a" * 32, name="v", size=1, replicas=3, placement=["x"])
    assert v.schema == Volume.SCHEMA == 1
    back = Volume.decode(v.encode())
    assert back == v


def test_unknown_fields_are_ignored_for_forward_compatibility():
    data = json.loads(Volume(volume_id="a", name="v", size=1, replicas=1).encode())
    data["new_field_from_the_future"] = 1
    assert Volume.decode(json.dumps(data).encode()).name == "v"


def test_newer_schema_is_refused():
    data = json.loads(Volume(volume_id="a", name="v", size=1, replicas=1).encode())
    data["schema"] = 99
    with pytest.raises(RecordError, match="newer"):
        Volume.decode(json.dumps(data).encode())


@pytest.mark.parametrize("raw", [b"not json", b"[1,2]", b'{"name": "v"}'])
def test_garbage_is_a_record_error(raw):
    with pytest.raises(RecordError):
        Volume.decode(raw)


def test_chap_repr_and_public_form_hide_secrets():
    r = ChapRecord(target="*", initiator="iqn.x", user="u", secret="s3cret-s3cret", mutual_user="m",
                   mutual_secret="m-s3cret-s3cret")
    assert "s3cret" not in repr(r) and "s3cret" not in json.dumps(r.public())
    assert ChapRecord.decode(r.encode()).secret == "s3cret-s3cret"
