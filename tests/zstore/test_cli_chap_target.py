"""CHAP is per target and many volumes share one: `zstore chap set/clear VOLUME` names
the target IQN it resolved and the other volumes on it, refuses (exit 2, naming them)
unless --whole-target when there are others, and sends the IQN, so the meta changes
exactly the target shown."""

from __future__ import annotations

import io

import pytest

from tests.zstore.test_cli_unit import VOLUME, FakeMeta, fake, run  # noqa: F401 - fixture

IQN = "iqn.2004-10.com.example:h1"
T0 = VOLUME["target_iqn"]
TARGETS = {"targets": [{"index": 0, "iqn": T0, "luns": 3, "volumes": [
    {"lun": 1, "volume": "v1"}, {"lun": 2, "volume": "db"}, {"lun": 3, "volume": "v1@snap",
                                                            "snapshot_id": "ab" * 16}]},
    {"index": 1, "iqn": T0[:-1] + "1", "luns": 1, "volumes": [{"lun": 1, "volume": "alone"}]}]}
PUBLIC = {"target": T0, "initiator": IQN, "user": "u", "mutual": False, "mutual_user": None, "changed": 1.0}


@pytest.fixture
def meta(fake: FakeMeta) -> FakeMeta:
    fake.route("GET", "/volumes/v1", 200, VOLUME)
    fake.route("GET", "/volumes/alone", 200, {**VOLUME, "name": "alone", "target_iqn": T0[:-1] + "1"})
    fake.route("GET", "/targets", 200, TARGETS)
    fake.route("PUT", "/chap", 200, PUBLIC)
    fake.route("DELETE", "/chap", 200, {"removed": True})
    return fake


@pytest.mark.parametrize("action", ["set", "clear"])
def test_a_shared_target_is_refused_naming_the_other_volumes(meta: FakeMeta, action: str, capsys,
                                                             monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("initiator-secret-1\n"))
    extra = ["--user", "u"] if action == "set" else []
    code, out, err = run(["--endpoint", meta.url, "chap", action, "v1", IQN, *extra], capsys)
    assert code == 2 and out == ""
    first = err.splitlines()[0]
    assert first == (f"zstore: error: CHAP is per target, and v1's target {T0} also serves db, v1@snap: "
                     "pass --whole-target to change CHAP for all of them")
    assert not [r for r in meta.requests if r["method"] in ("PUT", "DELETE")]     # nothing changed


@pytest.mark.parametrize("action", ["set", "clear"])
def test_whole_target_changes_the_target_shown_and_says_so(meta: FakeMeta, action: str, capsys,
                                                           monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("initiator-secret-1\n"))
    extra = ["--user", "u"] if action == "set" else []
    code, out, err = run(["--endpoint", meta.url, "chap", action, "v1", IQN, "--whole-target", *extra], capsys)
    assert (code, err) == (0, "")
    assert f"on target {T0} (the target of v1; also serving db, v1@snap)" in out
    sent = [r for r in meta.requests if r["method"] in ("PUT", "DELETE")]
    assert len(sent) == 1 and sent[0]["body"]["target"] == T0          # the IQN, not the name


def test_a_volume_alone_on_its_target_needs_no_flag_and_the_target_is_named(meta: FakeMeta, capsys,
                                                                            monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("initiator-secret-1\n"))
    code, out, err = run(["--endpoint", meta.url, "chap", "set", "alone", IQN, "--user", "u"], capsys)
    assert (code, err) == (0, "")
    assert f"on target {T0[:-1]}1 (the target of alone)" in out


def test_an_iqn_or_star_is_used_as_given(meta: FakeMeta, capsys) -> None:
    for target in (T0, "*"):
        code, out, err = run(["--endpoint", meta.url, "chap", "clear", target, IQN], capsys)
        assert (code, err) == (0, "")
    assert [r["body"]["target"] for r in meta.requests] == [T0, "*"]
    assert not [r for r in meta.requests if r["method"] == "GET"]
