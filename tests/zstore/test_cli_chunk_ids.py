"""Chunk commands print the full id the meta acted on, not the prefix typed; an
ambiguous prefix is the meta's error, exit 4."""

from __future__ import annotations

from tests.zstore.test_cli_unit import CHUNK, FakeMeta, fake, run  # noqa: F401 - fixture

FULL = "c-aaa0123456789"


def test_drain_undrain_remove_print_the_full_id(fake: FakeMeta, capsys) -> None:
    fake.route("POST", "/chunks/c-aa/drain", 200, {**CHUNK, "chunk_id": FULL})
    fake.route("POST", "/chunks/c-aa/undrain", 200, {**CHUNK, "chunk_id": FULL, "state": "active"})
    fake.route("DELETE", "/chunks/c-aa", 200, {"removed": FULL})
    for action, want in (("drain", f"chunk server {FULL} is draining"),
                         ("undrain", f"chunk server {FULL} is active again"),
                         ("remove", f"removed chunk server {FULL}\n")):
        code, out, err = run(["--endpoint", fake.url, "chunk", action, "c-aa"], capsys)
        assert (code, err) == (0, "") and want in out, (action, out)


def test_an_ambiguous_prefix_exits_4_naming_the_matches(fake: FakeMeta, capsys) -> None:
    fake.route("DELETE", "/chunks/c-aa", 409, {"error": {
        "code": "conflict", "message": "chunk server id 'c-aa' is ambiguous: matches c-aa1, c-aa2",
        "hint": "give more of the id (see `zstore chunk list`)"}})
    code, out, err = run(["--endpoint", fake.url, "chunk", "remove", "c-aa"], capsys)
    assert code == 4 and out == ""
    assert err.splitlines()[0] == "zstore: error: chunk server id 'c-aa' is ambiguous: matches c-aa1, c-aa2"
