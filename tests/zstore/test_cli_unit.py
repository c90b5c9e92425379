"""The CLI without a cluster: parsing, secrets, tables, and endpoint failover.

Failover runs against tiny real HTTP servers on 127.0.0.1 (real sockets, a
closed port for a dead meta server), so connection errors are the kernel's,
not mocks.
"""

from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest

from tests.cluster import free_port
from zstore import errors
from zstore.cli import main as cli
from zstore.cli import output
from zstore.cli.client import MetaClient
from zstore.config import ConfigError

GiB = 2**30


# -- a fake meta server ----------------------------------------------------------

class FakeMeta:
    """Answers canned JSON per (method, path with query, else path); records what it was sent."""

    def __init__(self, port: int = 0):
        self.routes: dict[tuple[str, str], tuple[int, Any]] = {}
        self.requests: list[dict[str, Any]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                fake.requests.append({"method": self.command, "path": self.path,
                                      "headers": dict(self.headers),
                                      "body": json.loads(body) if body else None})
                missing = (404, {"error": {"code": "not_found", "message": f"no route {self.path}"}})
                status, data = fake.routes.get((self.command, self.path)) or fake.routes.get(
                    (self.command, self.path.split("?")[0]), missing)
                raw = data if isinstance(data, bytes) else json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

            def log_message(self, *a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def route(self, method: str, path: str, status: int, data: Any) -> "FakeMeta":
        self.routes[(method, "/api/v1" + path)] = (status, data)
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake() -> Iterator[FakeMeta]:
    f = FakeMeta()
    yield f
    f.close()


@pytest.fixture
def dead_url() -> str:
    """A port nothing listens on: connecting is refused at once."""
    return f"http://127.0.0.1:{free_port()}"


NO_LEADER = {"error": {"code": "unavailable", "message": "no meta leader is elected right now",
                       "hint": "retry in a few seconds"}}
VOLUME = {"volume_id": "9f0c" * 8, "name": "v1", "size": GiB, "replicas": 2, "thin": True,
          "block_size": 512, "state": "available", "created": 1795.0,
          "target_iqn": "iqn.2026-01.io.zstore:1a2b3c4d.t0000", "target_index": 0, "lun": 1,
          "wwn": "65a5354" + "0" * 25, "source_snapshot": None,
          "placement": [{"chunk_id": "c-aaa", "hostname": "node-a", "address": "10.0.0.1",
                         "labels": {"zone": "a"}, "status": "up"},
                        {"chunk_id": "c-bbb", "hostname": "node-b", "address": "10.0.0.2",
                         "labels": {}, "status": "down"}],
          "acl": ["iqn.2004-10.com.example:host1"]}
CHUNK = {"chunk_id": "c-aaa", "hostname": "node-a", "address": "127.0.0.1", "data_port": 7500,
         "portal": "127.0.0.1:3261", "labels": {"zone": "a"}, "capacity": 10 * GiB, "used": GiB,
         "status": "up", "state": "draining", "down_since": None, "heartbeat": 1795.2, "disks": []}


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# -- parsing ----------------------------------------------------------------------

PARSES = [
    (["cluster", "status"], cli.cmd_cluster_status, {}),
    (["chunk", "list"], cli.cmd_chunk_list, {}),
    (["chunk", "drain", "c1"], cli.cmd_chunk_drain, {"id": "c1"}),
    (["chunk", "undrain", "c1"], cli.cmd_chunk_undrain, {"id": "c1"}),
    (["chunk", "remove", "c1", "--force"], cli.cmd_chunk_remove, {"id": "c1", "force": True}),
    (["volume", "create", "v1", "--size", "10Gi", "--replicas", "2", "--thick"], cli.cmd_volume_create,
     {"name": "v1", "size": "10Gi", "replicas": 2, "thick": True}),
    (["volume", "create", "v1", "--size", "1G"], cli.cmd_volume_create,
     {"replicas": None, "thick": False}),
    (["volume", "list", "--limit", "5", "--start-after", "a"], cli.cmd_volume_list,
     {"limit": 5, "start_after": "a"}),
    (["volume", "show", "v1"], cli.cmd_volume_show, {"name": "v1"}),
    (["volume", "resize", "v1", "--size", "20Gi"], cli.cmd_volume_resize, {"size": "20Gi"}),
    (["volume", "delete", "v1", "--force"], cli.cmd_volume_delete, {"force": True}),
    (["volume", "clone", "v1@s1", "v2"], cli.cmd_volume_clone, {"source": "v1@s1", "name": "v2"}),
    (["snapshot", "create", "v1", "s1"], cli.cmd_snapshot_create, {"volume": "v1", "snapshot": "s1"}),
    (["snapshot", "create", "v1@s1"], cli.cmd_snapshot_create, {"volume": "v1@s1", "snapshot": None}),
    (["snapshot", "list"], cli.cmd_snapshot_list, {"volume": None}),
    (["snapshot", "list", "v1"], cli.cmd_snapshot_list, {"volume": "v1"}),
    (["snapshot", "delete", "v1@s1"], cli.cmd_snapshot_delete, {"volume": "v1@s1"}),
    (["target", "list"], cli.cmd_target_list, {}),
    (["acl", "add", "v1", "iqn.2004-10.com.example:h", "--readonly"], cli.cmd_acl_add,
     {"initiator": "iqn.2004-10.com.example:h", "readonly": True}),
    (["acl", "remove", "v1", "iqn.2004-10.com.example:h"], cli.cmd_acl_remove, {"volume": "v1"}),
    (["acl", "list", "v1"], cli.cmd_acl_list, {"volume": "v1"}),
    (["chap", "set", "*", "iqn.2004-10.com.example:h", "--user", "u", "--mutual-user", "mu",
      "--secret-file", "s", "--mutual-secret-file", "m"], cli.cmd_chap_set,
     {"target": "*", "user": "u", "mutual_user": "mu", "secret_file": "s", "mutual_secret_file": "m"}),
    (["chap", "clear", "v1", "iqn.2004-10.com.example:h"], cli.cmd_chap_clear, {"target": "v1"}),
    (["chap", "list"], cli.cmd_chap_list, {}),
    (["up"], cli.cmd_up, {}),
    (["down"], cli.cmd_down, {}),
]


@pytest.mark.parametrize("argv,func,attrs", PARSES, ids=[" ".join(a[:2]) for a, _, _ in PARSES])
def test_every_subcommand_parses(argv: list[str], func: Any, attrs: dict[str, Any]) -> None:
    args = cli.build_parser(argv).parse_args(argv)
    cli._merge_globals(args)
    assert args.func is func
    for k, v in attrs.items():
        assert getattr(args, k) == v, k


def test_global_options_before_and_after_the_subcommand() -> None:
    argv = ["--endpoint", "http://a:1", "--config", "c.toml", "volume", "list",
            "--json", "--endpoint", "http://b:2", "--state-dir", "/s"]
    args = cli.build_parser(argv).parse_args(argv)
    cli._merge_globals(args)
    assert (args.json, args.config, args.state_dir) == (True, "c.toml", "/s")
    assert args.endpoint == ["http://a:1", "http://b:2"]
    args = cli.build_parser([]).parse_args(["chunk", "list"])
    cli._merge_globals(args)
    assert (args.json, args.config, args.state_dir, args.endpoint) == (False, None, None, None)


@pytest.mark.parametrize("argv", [
    ["volume", "create", "v1", "--size", "10Gx"],
    ["volume", "create", "v1", "--size", "0"],
    ["volume", "resize", "v1", "--size", "lots"],
    ["volume", "clone", "v1@s1", "v2", "--size", "-1"],
    ["volume", "create", "v1", "--size", "9" * 5000],
    ["volume", "resize", "v1", "--size", "9" * 5000 + "Gi"],
], ids=["bad-suffix", "zero", "word", "negative", "5000-digits", "5000-digits-Gi"])
def test_bad_sizes_exit_2_before_any_network_call(argv: list[str], capsys, dead_url: str) -> None:
    code, out, err = run(["--endpoint", dead_url, *argv], capsys)
    assert code == 2
    assert err.startswith("zstore: error: invalid size")
    assert out == ""


@pytest.mark.parametrize("argv", [[], ["volume"], ["volume", "create", "v1"], ["nope"],
                                  ["volume", "list", "--limit", "x"]])
def test_usage_errors_exit_2(argv: list[str], capsys) -> None:
    code, _, err = run(argv, capsys)
    assert code == 2
    assert "usage:" in err


def test_help_exits_0(capsys) -> None:
    code, out, _ = run(["volume", "create", "--help"], capsys)
    assert code == 0
    assert "--size" in out and "--thick" in out


@pytest.mark.parametrize("first,second,expected", [
    ("v1@s1", None, ("v1", "s1")), ("v1", "s1", ("v1", "s1")), ("v.1_x@s-2", None, ("v.1_x", "s-2")),
])
def test_snapshot_ref(first: str, second: str | None, expected: tuple[str, str]) -> None:
    assert cli.snapshot_ref(first, second) == expected


@pytest.mark.parametrize("first,second", [("v1", None), ("@s1", None), ("v1@", None),
                                          ("v1@s1@x", None), ("v1@s1", "s2")])
def test_snapshot_ref_rejects(first: str, second: str | None) -> None:
    with pytest.raises(errors.InvalidArgument) as e:
        cli.snapshot_ref(first, second)
    assert e.value.exit_code == 2


def test_bad_snapshot_ref_exits_2(capsys, dead_url: str) -> None:
    code, _, err = run(["--endpoint", dead_url, "snapshot", "delete", "v1"], capsys)
    assert code == 2
    assert "VOLUME@SNAPSHOT" in err


def test_state_dir_without_a_cluster_says_so(tmp_path, capsys) -> None:
    code, _, err = run(["--state-dir", str(tmp_path), "cluster", "status"], capsys)
    assert code == 2
    assert f"no cluster config in {tmp_path}" in err
    assert "zstore up --state-dir" in err


# -- CHAP secrets --------------------------------------------------------------------

class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def no_prompt(_: str) -> str:
    raise AssertionError("must not prompt")


def test_secrets_from_files(tmp_path) -> None:
    (tmp_path / "s").write_text("initiator-secret-1\n")
    (tmp_path / "m").write_text("target-secret-22\n")
    got = cli.read_chap_secrets(str(tmp_path / "s"), "mu", str(tmp_path / "m"),
                                stdin=io.StringIO(""), prompt=no_prompt)
    assert got == ("initiator-secret-1", "target-secret-22")


def test_secrets_from_stdin_lines() -> None:
    assert cli.read_chap_secrets(None, None, None, stdin=io.StringIO("initiator-secret-1\n"),
                                 prompt=no_prompt) == ("initiator-secret-1", None)
    got = cli.read_chap_secrets(None, "mu", None, prompt=no_prompt,
                                stdin=io.StringIO("initiator-secret-1\ntarget-secret-22\n"))
    assert got == ("initiator-secret-1", "target-secret-22")


def test_mutual_secret_alone_on_stdin_when_the_secret_is_in_a_file(tmp_path) -> None:
    (tmp_path / "s").write_text("initiator-secret-1")
    got = cli.read_chap_secrets(str(tmp_path / "s"), "mu", None, prompt=no_prompt,
                                stdin=io.StringIO("target-secret-22\n"))
    assert got == ("initiator-secret-1", "target-secret-22")


def test_secrets_prompted_twice_on_a_tty() -> None:
    answers = iter(["initiator-secret-1", "initiator-secret-1"])
    prompts: list[str] = []

    def prompt(text: str) -> str:
        prompts.append(text)
        return next(answers)
    assert cli.read_chap_secrets(None, None, None, stdin=TTY(), prompt=prompt) == ("initiator-secret-1", None)
    assert prompts == ["CHAP secret: ", "CHAP secret (again): "]


def test_prompted_secrets_must_match() -> None:
    answers = iter(["initiator-secret-1", "initiator-secret-2"])
    with pytest.raises(errors.InvalidArgument, match="differ"):
        cli.read_chap_secrets(None, None, None, stdin=TTY(), prompt=lambda _: next(answers))


@pytest.mark.parametrize("stdin,mutual,match", [
    ("", None, "no CHAP secret on stdin"),
    ("initiator-secret-1\n", "mu", "no mutual CHAP secret on stdin"),
    ("short\n", None, "12-255 bytes"),
    ("\u00e9" * 130 + "\n", None, "12-255 bytes long in UTF-8.*\\(got 260 bytes\\)"),   # 130 characters, 260 bytes
    ("\udcff" * 20 + "\n", None, "not UTF-8 text"),            # undecodable stdin bytes (surrogateescape)
    ("initiator-secret-1\ninitiator-secret-1\n", "mu", "must differ"),
])
def test_bad_secrets_are_refused_without_echoing_them(stdin: str, mutual: str | None, match: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=match) as e:
        cli.read_chap_secrets(None, mutual, None, stdin=io.StringIO(stdin), prompt=no_prompt)
    assert "initiator-secret" not in e.value.message and "short" not in e.value.message


BINARY = b"\xff\xfe\x00secret-\x9c\x81bytes"


def test_a_binary_secret_file_exits_2_naming_the_file(tmp_path, capsys, dead_url: str) -> None:
    (tmp_path / "s").write_bytes(BINARY)
    code, out, err = run(["--endpoint", dead_url, "chap", "set", "*", "iqn.2004-10.com.example:h",
                          "--user", "u", "--secret-file", str(tmp_path / "s")], capsys)
    assert (code, out) == (2, "")
    assert f"CHAP secret file {tmp_path / 's'} is not UTF-8 text" in err
    assert "Traceback" not in err and "secret-" not in err


def test_a_binary_config_file_exits_2_naming_the_file(tmp_path, capsys) -> None:
    (tmp_path / "c.toml").write_bytes(b"[client]\nendpoints = [\"http://x:1\"]\n# " + BINARY + b"\n")
    code, out, err = run(["--config", str(tmp_path / "c.toml"), "volume", "list"], capsys)
    assert (code, out) == (2, "")
    assert f"config file {tmp_path / 'c.toml'} is not UTF-8 text" in err
    assert "Traceback" not in err


def test_a_binary_token_file_exits_2_naming_the_file(tmp_path, capsys, monkeypatch, dead_url) -> None:
    monkeypatch.delenv("ZSTORE_TOKEN", raising=False)
    (tmp_path / "token").write_bytes(BINARY)
    (tmp_path / "c.toml").write_text(f'[client]\nendpoints = ["{dead_url}"]\ntoken_file = "token"\n')
    code, out, err = run(["--config", str(tmp_path / "c.toml"), "volume", "list"], capsys)
    assert (code, out) == (2, "")
    assert f"token file {tmp_path / 'token'} is not UTF-8 text" in err
    assert "Traceback" not in err and "secret-" not in err


@pytest.mark.parametrize("kind, reason", [
    ("missing", "No such file or directory"),
    ("not-a-cert", "holds no usable CA certificate (no certificate or crl found)"),
    ("directory", "Is a directory"),
])
def test_a_bad_ca_file_exits_2_naming_the_file_and_reason(kind: str, reason: str, tmp_path, capsys,
                                                          monkeypatch) -> None:
    """An https endpoint with an unusable client.ca_file: exit 2 and why, no traceback."""
    monkeypatch.delenv("ZSTORE_TOKEN", raising=False)
    ca = tmp_path / "ca.pem"
    if kind == "not-a-cert":
        ca.write_text("this is not a certificate\n")
    elif kind == "directory":
        ca.mkdir()
    (tmp_path / "c.toml").write_text(
        f'[client]\nendpoints = ["https://127.0.0.1:{free_port()}"]\nca_file = "ca.pem"\n')
    code, out, err = run(["--config", str(tmp_path / "c.toml"), "volume", "list"], capsys)
    assert (code, out) == (2, "")
    assert err.startswith("zstore: error: ") and "Traceback" not in err
    assert f"client.ca_file {ca}" in err and reason in err


def test_a_bad_ca_file_is_found_when_the_client_is_built(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read client.ca_file .*: No such file"):
        MetaClient(["https://127.0.0.1:1"], ca_file=str(tmp_path / "nope.pem"))
    # http-only endpoints never use it, so it is not an error there
    assert MetaClient(["http://127.0.0.1:1"], ca_file=str(tmp_path / "nope.pem"))._ssl is None


def test_a_good_ca_file_is_loaded_once(tmp_path) -> None:
    from tests.certs import make_pki
    pki = make_pki(tmp_path)
    c = MetaClient(["https://127.0.0.1:1"], ca_file=pki["ca_file"])
    ctx = c._ssl
    assert ctx is not None and ctx.cert_store_stats()["x509_ca"] >= 1
    c._connection(c.endpoints[0])
    assert c._ssl is ctx


def test_a_missing_token_file_error_keeps_its_reason(tmp_path, capsys, monkeypatch, dead_url) -> None:
    """The secret scrubber must not eat "No such file" because the path ends in /token."""
    monkeypatch.delenv("ZSTORE_TOKEN", raising=False)
    token = tmp_path / "secret" / "token"
    (tmp_path / "c.toml").write_text(f'[client]\nendpoints = ["{dead_url}"]\ntoken_file = "{token}"\n')
    code, out, err = run(["--config", str(tmp_path / "c.toml"), "volume", "list"], capsys)
    assert (code, out) == (2, "")
    assert f"cannot read token file {token}: No such file or directory" in err


def test_a_directory_as_config_file_exits_2(tmp_path, capsys) -> None:
    code, out, err = run(["--config", str(tmp_path), "volume", "list"], capsys)
    assert (code, out) == (2, "")
    assert f"cannot read config file {tmp_path}" in err


def test_secret_length_counts_utf8_bytes() -> None:
    """The secret is used as its UTF-8 bytes: six 2-byte characters are 12 bytes, enough."""
    got = cli.read_chap_secrets(None, None, None, stdin=io.StringIO("\u00e9" * 6 + "\n"), prompt=no_prompt)
    assert got == ("\u00e9" * 6, None)


@pytest.mark.parametrize("mutual_user", ["", "  "])
def test_an_empty_mutual_user_is_refused_not_dropped(mutual_user: str, capsys, dead_url: str) -> None:
    """An empty --mutual-user used to send one-way CHAP without a word."""
    with pytest.raises(errors.InvalidArgument, match="--mutual-user must not be empty"):
        cli.read_chap_secrets(None, mutual_user, None, stdin=io.StringIO("initiator-secret-1\n"),
                              prompt=no_prompt)
    code, out, err = run(["--endpoint", dead_url, "chap", "set", "*", "iqn.2004-10.com.example:h",
                          "--user", "u", "--mutual-user", mutual_user], capsys)
    assert (code, out) == (2, "") and "--mutual-user must not be empty" in err


def test_chap_set_sends_the_secret_only_in_the_body(fake: FakeMeta, monkeypatch, capsys) -> None:
    fake.route("PUT", "/chap", 200, {"target": "*", "initiator": "iqn.2004-10.com.example:h",
                                     "user": "u", "mutual": False, "mutual_user": None, "changed": 1.0})
    monkeypatch.setattr("sys.stdin", io.StringIO("initiator-secret-1\n"))
    code, out, err = run(["--endpoint", fake.url, "chap", "set", "*", "iqn.2004-10.com.example:h",
                          "--user", "u"], capsys)
    assert (code, err) == (0, "")
    assert fake.requests[0]["body"] == {"target": "*", "initiator": "iqn.2004-10.com.example:h",
                                        "user": "u", "secret": "initiator-secret-1"}
    assert "initiator-secret-1" not in out


def test_volume_revert_sends_one_request_id_for_all_its_retries(capsys) -> None:
    """A revert is not idempotent: the CLI makes one request id per invocation and its
    automatic retries send the same one (the meta answers a retry from the first revert's
    op instead of reverting again); running the command again is a new request."""
    leaderless, live = FakeMeta(), FakeMeta()
    try:
        leaderless.route("POST", "/volumes/v1/revert", 503, NO_LEADER)
        live.route("POST", "/volumes/v1/revert", 200, {"volume": "v1", "volume_id": "x", "snapshot": "s1",
                                                       "snapshot_id": "y", "seq": 1, "reverted": True})
        argv = ["--endpoint", leaderless.url, "--endpoint", live.url, "volume", "revert", "v1", "s1"]
        for _ in range(2):
            code, out, err = run(argv, capsys)
            assert (code, err) == (0, "") and "volume v1 reverted to snapshot s1" in out
        sent = [r["body"] for r in leaderless.requests]
        assert [r["body"] for r in live.requests] == sent                 # each retry: the same body
        assert [b["snapshot"] for b in sent] == ["s1", "s1"]
        ids = [b["request_id"] for b in sent]
        assert all(len(i) == 32 for i in ids) and ids[0] != ids[1]      # one per invocation
    finally:
        leaderless.close()
        live.close()


# -- tables ----------------------------------------------------------------------------

def test_table_aligns_columns_and_shows_blanks_as_dashes() -> None:
    text = output.table(["A", "LONGER"], [["xxxx", None], ["y", 3]])
    assert text.splitlines() == ["A     LONGER", "xxxx  -", "y     3"]


def test_chunk_table() -> None:
    lines = output.chunk_table([CHUNK]).splitlines()
    assert lines[0].split() == ["ID", "HOSTNAME", "ADDRESS", "PORTAL", "STATUS", "STATE",
                                "SESSIONS", "CAPACITY", "USED", "LABELS"]
    assert lines[1].split() == ["c-aaa", "node-a", "127.0.0.1:7500", "127.0.0.1:3261", "up",
                                "draining", "0", "10Gi", "1Gi", "zone=a"]


def test_chunk_table_counts_normal_sessions_of_servers_that_are_up() -> None:
    sessions = [{"initiator": "iqn.2004-10.com.example:h", "target": "iqn.t", "type": "normal", "since": 1.0},
                {"initiator": "iqn.2004-10.com.example:g", "target": "iqn.t", "type": "normal", "since": 2.0},
                {"initiator": "iqn.2004-10.com.example:h", "target": None, "type": "discovery", "since": 3.0}]
    up = output.chunk_table([{**CHUNK, "sessions": sessions}]).splitlines()[1].split()
    down = output.chunk_table([{**CHUNK, "status": "down", "sessions": sessions}]).splitlines()[1].split()
    assert up[6] == "2" and down[6] == "-"


def test_volume_detail_shows_export_and_replicas() -> None:
    text = output.volume_detail(VOLUME)
    assert "target           iqn.2026-01.io.zstore:1a2b3c4d.t0000" in text
    assert "LUN              1" in text
    assert f"WWN              {VOLUME['wwn']}" in text
    assert "size             1Gi (1073741824 bytes)" in text
    reps = text.split("replicas:\n", 1)[1].splitlines()
    assert reps[0].split() == ["CHUNK", "HOSTNAME", "ADDRESS", "STATUS", "LABELS"]
    assert reps[1].split() == ["c-aaa", "node-a", "10.0.0.1", "up", "zone=a"]
    assert reps[2].split() == ["c-bbb", "node-b", "10.0.0.2", "down", "-"]


def test_volume_table_and_target_table() -> None:
    lines = output.volume_table([VOLUME]).splitlines()
    assert lines[1].split()[:8] == ["v1", "1Gi", "2", "thin", "available", "t0", "1", "1"]
    t = output.target_table([{"index": 0, "iqn": "iqn.x:t0000", "luns": 2,
                              "volumes": [{"lun": 1, "volume": "v1"}, {"lun": 2, "volume": "v2"}]}])
    assert t.splitlines()[1].split() == ["0", "iqn.x:t0000", "2", "1:v1,2:v2"]


def test_chap_table_has_no_secret_column() -> None:
    text = output.chap_table([{"target": "*", "initiator": "iqn.x:h", "user": "u", "mutual": True,
                               "mutual_user": "mu", "changed": 0}])
    assert "SECRET" not in text
    assert text.splitlines()[1].split() == ["*", "iqn.x:h", "u", "mu", "-"]


# -- the client: finding a live meta server ------------------------------------------------

def client(endpoints: list[str], retry_for: float = 0.0, **kw: Any) -> MetaClient:
    return MetaClient(endpoints, token="tok-123456789", retry_for=retry_for, timeout=5, **kw)


def test_dead_endpoint_then_live_one(fake: FakeMeta, dead_url: str) -> None:
    fake.route("GET", "/cluster", 200, {"answered_by": "meta1"})
    c = client([dead_url, fake.url])
    assert c.get("/cluster") == {"answered_by": "meta1"}
    assert fake.requests[0]["headers"]["Authorization"] == "Bearer tok-123456789"
    c.get("/cluster")                 # the live one is now tried first
    assert len(fake.requests) == 2


def test_leaderless_server_is_skipped_for_writes(dead_url: str) -> None:
    leaderless, live = FakeMeta(), FakeMeta()
    try:
        leaderless.route("POST", "/volumes", 503, NO_LEADER)
        live.route("POST", "/volumes", 201, VOLUME)
        r = client([dead_url, leaderless.url, live.url]).request("POST", "/volumes", {"name": "v1"})
        assert (r.status, r.endpoint) == (201, live.url)
        assert leaderless.requests[0]["body"] == live.requests[0]["body"] == {"name": "v1"}
    finally:
        leaderless.close()
        live.close()


def test_every_endpoint_dead_is_unavailable(dead_url: str) -> None:
    other = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(errors.Unavailable) as e:
        client([dead_url, other], config_source="/etc/x.toml").get("/cluster")
    assert e.value.exit_code == 5
    assert e.value.message == f"cannot reach any meta server at {dead_url}, {other}: connection refused"
    assert "zstore up" in e.value.hint and "/etc/x.toml" in e.value.hint


def test_retries_until_a_meta_server_comes_up(dead_url: str) -> None:
    """A failover window: the only endpoint is down at first, then answers."""
    port = int(dead_url.rsplit(":", 1)[1])
    started: list[FakeMeta] = []
    pauses: list[float] = []

    def sleep(seconds: float) -> None:
        pauses.append(seconds)
        if len(pauses) == 2:          # down for two rounds, then back
            started.append(FakeMeta(port).route("GET", "/chunks", 200, {"chunks": []}))
    try:
        assert client([dead_url], retry_for=15, sleep=sleep).get("/chunks") == {"chunks": []}
        assert len(pauses) == 2 and all(0 < p <= 1 for p in pauses)
    finally:
        for f in started:
            f.close()


def test_leaderless_everywhere_reports_the_servers_words(fake: FakeMeta) -> None:
    fake.route("GET", "/cluster", 503, NO_LEADER)
    clock = iter([0.0, 1.0, 2.0, 99.0])
    c = client([fake.url], retry_for=10, sleep=lambda s: None, clock=lambda: next(clock))
    with pytest.raises(errors.Unavailable, match="no meta leader") as e:
        c.get("/cluster")
    assert e.value.hint == "retry in a few seconds"
    assert len(fake.requests) == 3


def test_api_errors_are_raised_at_once(fake: FakeMeta, dead_url: str) -> None:
    fake.route("GET", "/volumes/nope", 404,
               {"error": {"code": "not_found", "message": "volume 'nope' not found", "hint": "see list"}})
    with pytest.raises(errors.NotFound) as e:
        client([fake.url, dead_url], retry_for=10).get("/volumes/nope")
    assert (e.value.message, e.value.hint, e.value.exit_code) == ("volume 'nope' not found", "see list", 3)
    assert len(fake.requests) == 1


def test_unauthenticated_hint_depends_on_whether_a_token_was_sent(fake: FakeMeta) -> None:
    fake.route("GET", "/cluster", 401, {"error": {"code": "unauthenticated", "message": "missing or wrong token"}})
    with pytest.raises(errors.Unauthenticated) as e:
        client([fake.url]).get("/cluster")
    assert "refused" in e.value.hint and "tok-123456789" not in e.value.hint
    with pytest.raises(errors.Unauthenticated) as e:
        MetaClient([fake.url], token=None, retry_for=0).get("/cluster")
    assert "no token configured" in e.value.hint
    assert "Authorization" not in fake.requests[-1]["headers"]


def test_non_json_error_maps_by_status(fake: FakeMeta) -> None:
    fake.route("GET", "/cluster", 500, b"<html>oops</html>")
    with pytest.raises(errors.ZError) as e:
        client([fake.url]).get("/cluster")
    assert e.value.exit_code == 1
    assert "HTTP 500" in e.value.message


def test_query_and_path_quoting(fake: FakeMeta) -> None:
    fake.route("DELETE", "/volumes/v1/acl/iqn.2004-10.com.example:h", 200, {"removed": "x"})
    client([fake.url]).delete("/volumes/v1/acl/iqn.2004-10.com.example:h", force=True, skip=None)
    assert fake.requests[0]["path"] == "/api/v1/volumes/v1/acl/iqn.2004-10.com.example:h?force=true"


def test_token_from_env_wins_over_file(tmp_path) -> None:
    from zstore.config import ClientConfig
    (tmp_path / "token").write_text("from-file-token\n")
    cfg = ClientConfig(endpoints=["http://127.0.0.1:1"], token_file=str(tmp_path / "token"))
    assert MetaClient.from_config(cfg, env={}).token == "from-file-token"
    assert MetaClient.from_config(cfg, env={"ZSTORE_TOKEN": "from-env-token"}).token == "from-env-token"


# -- main() end to end against the fake server -----------------------------------------------

def test_list_json_prints_the_records(fake: FakeMeta, capsys) -> None:
    fake.route("GET", "/chunks", 200, {"chunks": [CHUNK]})
    code, out, _ = run(["chunk", "list", "--endpoint", fake.url, "--json"], capsys)
    assert code == 0
    assert json.loads(out) == [CHUNK]


def test_volume_list_follows_pages(fake: FakeMeta, capsys) -> None:
    fake.route("GET", "/volumes", 200, {"volumes": [VOLUME], "next": "v1"})
    fake.route("GET", "/volumes?start_after=v1", 200, {"volumes": [dict(VOLUME, name="v2")], "next": None})
    code, out, _ = run(["--endpoint", fake.url, "volume", "list", "--json"], capsys)
    assert code == 0
    assert [v["name"] for v in json.loads(out)] == ["v1", "v2"]
    code, out, _ = run(["--endpoint", fake.url, "volume", "list"], capsys)
    assert [line.split()[0] for line in out.splitlines()] == ["NAME", "v1", "v2"]


def test_volume_list_with_limit_is_one_page(fake: FakeMeta, capsys) -> None:
    page = {"volumes": [VOLUME], "next": "v1"}
    fake.route("GET", "/volumes?limit=1", 200, page)
    code, out, _ = run(["--endpoint", fake.url, "volume", "list", "--limit", "1", "--json"], capsys)
    assert code == 0 and json.loads(out) == page
    _, out, _ = run(["--endpoint", fake.url, "volume", "list", "--limit", "1"], capsys)
    assert out.splitlines()[-1] == "(more: zstore volume list --limit 1 --start-after v1)"


def test_errors_print_message_and_hint(fake: FakeMeta, capsys) -> None:
    fake.route("POST", "/volumes", 409, {"error": {"code": "conflict",
                                                   "message": "volume 'v1' already exists with size 1Gi (asked 2Gi)",
                                                   "hint": "pick another name"}})
    code, out, err = run(["--endpoint", fake.url, "volume", "create", "v1", "--size", "2Gi"], capsys)
    assert code == 4 and out == ""
    assert err == ("zstore: error: volume 'v1' already exists with size 1Gi (asked 2Gi)\n"
                   "  hint: pick another name\n")
    assert fake.requests[0]["body"] == {"name": "v1", "size": 2 * GiB, "thin": True}


def test_volume_create_says_created_or_existed(fake: FakeMeta, capsys) -> None:
    fake.route("POST", "/volumes", 201, VOLUME)
    code, out, _ = run(["--endpoint", fake.url, "volume", "create", "v1", "--size", "1Gi",
                        "--replicas", "2"], capsys)
    assert code == 0
    assert out.startswith("volume v1 created: 1Gi, 2 replica(s), thin")
    fake.route("POST", "/volumes", 200, VOLUME)
    _, out, _ = run(["--endpoint", fake.url, "volume", "create", "v1", "--size", "1Gi"], capsys)
    assert "already exists, unchanged" in out


def test_clone_takes_the_snapshot_size(fake: FakeMeta, capsys) -> None:
    fake.route("GET", "/snapshots", 200, {"snapshots": [{"snapshot_id": "s", "name": "s1", "volume": "v1",
                                                         "volume_id": "x", "size": 3 * GiB}]})
    fake.route("POST", "/volumes", 201, dict(VOLUME, name="v2", size=3 * GiB))
    code, _, _ = run(["--endpoint", fake.url, "volume", "clone", "v1@s1", "v2"], capsys)
    assert code == 0
    assert fake.requests[0]["path"] == "/api/v1/snapshots?volume=v1"
    assert fake.requests[1]["body"] == {"name": "v2", "size": 3 * GiB, "thin": True,
                                        "source_snapshot": "v1@s1"}


def test_token_is_never_printed(fake: FakeMeta, capsys, monkeypatch) -> None:
    """Even if a server echoed it back, the CLI scrubs the token from what it prints."""
    fake.route("GET", "/cluster", 401, {"error": {"code": "unauthenticated",
                                                  "message": "token s3cret-token-xyz is wrong"}})
    monkeypatch.setenv("ZSTORE_TOKEN", "s3cret-token-xyz")
    code, out, err = run(["--endpoint", fake.url, "cluster", "status"], capsys)
    assert code == 6
    assert "s3cret-token-xyz" not in out + err
    assert err.startswith("zstore: error: token *** is wrong")


def test_up_is_wired(capsys, monkeypatch) -> None:
    """With zstore/up.py present its handler runs; without, a clear message."""
    import importlib.util
    if importlib.util.find_spec("zstore.up") is None:
        code, _, err = run(["up"], capsys)
        assert code == 1 and "zstore/up.py is missing" in err
    else:
        from zstore import up
        seen: list[Any] = []
        monkeypatch.setattr(up, "run_down", lambda args: seen.append(args) or 0)
        code, _, _ = run(["down"], capsys)
        assert code == 0 and len(seen) == 1


def test_recovery_summary_names_extents_on_down_servers_and_unavailable_ones():
    """Within the grace a down server's extents are still listed in sync: the summary once said
    "all extents fully replicated" while every copy of some extents was on down servers."""
    from zstore.cli.output import recovery_summary
    assert recovery_summary({"degraded_extents": 0, "tasks": []}) == "all extents fully replicated"
    text = recovery_summary({"degraded_extents": 0, "degraded_live_extents": 3,
                             "unavailable_extents": 1, "tasks": []})
    assert text.startswith("0 degraded extent(s), 0 recovery task(s)")
    assert "3 more with a replica on a down server" in text
    assert "1 UNAVAILABLE (no in-sync replica up)" in text
    assert recovery_summary({"degraded_extents": 2, "degraded_live_extents": 2, "unavailable_extents": 0,
                             "tasks": [{}], "bytes_done": 0, "bytes_total": 64 << 20}) == \
        "2 degraded extent(s), 1 recovery task(s), 0B of 64Mi copied (0%)"
