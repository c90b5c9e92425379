"""A DELETE whose first attempt may have reached the meta (sent, then no answer, a
reset, or a 503 such as a follower's forward timeout) and whose retry answers 404 was
done by that first attempt: the CLI reports success with a note, not "not found" (exit
3). A 404 with no such earlier attempt is still "not found".

Fake meta servers on 127.0.0.1 (real sockets): this tests the client's retry logic."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest

from tests.zstore.test_cli_unit import FakeMeta, run
from zstore import errors
from zstore.cli.client import MetaClient

NOT_FOUND = {"error": {"code": "not_found", "message": "volume 'v1' not found"}}
FORWARD_TIMEOUT = {"error": {"code": "unavailable", "message": "the meta leader m1 at http://x is "
                                                               "unreachable (TimeoutError)"}}


class Flaky:
    """The first request is read and then dropped (``mode`` "reset": the connection is
    closed unanswered; "slow": answered after ``delay`` s, too late); later ones get 404."""

    def __init__(self, mode: str, delay: float = 0.0):
        self.calls: list[str] = []
        flaky = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    self.rfile.read(n)
                flaky.calls.append(f"{self.command} {self.path}")
                if len(flaky.calls) == 1:
                    if mode == "reset":
                        self.close_connection = True
                        return
                    time.sleep(delay)
                raw = json.dumps(NOT_FOUND).encode()
                try:
                    self.send_response(404)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except OSError:         # the client gave up on this one
                    self.close_connection = True

            do_GET = do_POST = do_PUT = do_DELETE = _serve

            def log_message(self, *a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def pair() -> Iterator[tuple[FakeMeta, FakeMeta]]:
    """A follower whose forward to the leader timed out (503), then a server answering 404."""
    follower, live = FakeMeta(), FakeMeta()
    yield follower, live
    follower.close()
    live.close()


COMMANDS = [
    (["volume", "delete", "v1"], "DELETE", "/volumes/v1", "deleted volume v1"),
    (["snapshot", "delete", "v1@s1"], "DELETE", "/volumes/v1/snapshots/s1", "deleted snapshot v1@s1"),
    (["snapshot", "delete", "9f0c" * 8], "DELETE", "/snapshots/" + "9f0c" * 8, "deleted snapshot"),
    (["acl", "remove", "v1", "iqn.2004-10.com.example:h1"], "DELETE",
     "/volumes/v1/acl/iqn.2004-10.com.example:h1", "may no longer access volume v1"),
    (["chap", "clear", "*", "iqn.2004-10.com.example:h1"], "DELETE", "/chap", "CHAP cleared"),
    (["chunk", "remove", "c-aaa"], "DELETE", "/chunks/c-aaa", "removed chunk server c-aaa"),
]


@pytest.mark.parametrize("argv, method, path, said", COMMANDS)
def test_503_then_404_is_already_gone_for_every_delete(pair, argv, method, path, said, capsys) -> None:
    follower, live = pair
    follower.route(method, path, 503, FORWARD_TIMEOUT)
    live.route(method, path, 404, NOT_FOUND)
    code, out, err = run(["--endpoint", follower.url, "--endpoint", live.url, *argv], capsys)
    assert (code, err) == (0, ""), err
    assert said in out and "already gone: an earlier attempt deleted it" in out
    assert len(out.splitlines()) == 1


def test_a_reset_after_sending_then_404_is_already_gone(capsys) -> None:
    flaky = Flaky("reset")
    try:
        code, out, err = run(["--endpoint", flaky.url, "volume", "delete", "v1"], capsys)
    finally:
        flaky.close()
    assert (code, err) == (0, ""), err
    assert out == "deleted volume v1 (already gone: an earlier attempt deleted it (its answer was lost))\n"
    assert flaky.calls == ["DELETE /api/v1/volumes/v1"] * 2


def test_no_answer_in_time_then_404_is_already_gone_and_json_says_so() -> None:
    flaky = Flaky("slow", delay=1.0)
    try:
        client = MetaClient([flaky.url], timeout=0.3, retry_for=5)
        r = client.request("DELETE", "/volumes/v1")
    finally:
        flaky.close()
    assert r.status == 200 and r.data["already_gone"] is True and "earlier attempt" in r.data["note"]


def test_404_without_an_earlier_attempt_is_still_not_found(capsys, pair) -> None:
    _, live = pair
    live.route("DELETE", "/volumes/v1", 404, NOT_FOUND)
    code, out, err = run(["--endpoint", live.url, "volume", "delete", "v1"], capsys)
    assert (code, out) == (3, "") and err.startswith("zstore: error: volume 'v1' not found")


def test_a_refused_connection_never_reached_the_meta(capsys, pair) -> None:
    from tests.cluster import free_port
    _, live = pair
    live.route("DELETE", "/volumes/v1", 404, NOT_FOUND)
    dead = f"http://127.0.0.1:{free_port()}"
    code, out, err = run(["--endpoint", dead, "--endpoint", live.url, "volume", "delete", "v1"], capsys)
    assert (code, out) == (3, "") and "not found" in err


def test_other_methods_and_unexport_keep_their_404(pair) -> None:
    follower, live = pair
    for method, path in (("POST", "/volumes/v1/resize"), ("DELETE", "/snapshots/v1@s1/export")):
        follower.route(method, path, 503, FORWARD_TIMEOUT)
        live.route(method, path, 404, NOT_FOUND)
    client = MetaClient([follower.url, live.url], retry_for=5)
    with pytest.raises(errors.NotFound):
        client.request("POST", "/volumes/v1/resize", {"size": 1})
    with pytest.raises(errors.NotFound):
        client.delete_strict("/snapshots/v1@s1/export")


NO_LEADER_YET = {"error": {"code": "unavailable", "message": "no meta leader is elected right now",
                           "details": {"maybe_applied": False}}}


def test_a_503_that_says_nothing_was_done_then_404_is_still_not_found(pair, capsys) -> None:
    """No leader elected (or leadership changing, a forward refused): the meta says the
    request did nothing, so the 404 after it is the answer, not an earlier attempt's work
    (a mistyped name during a failover is "not found", not "deleted")."""
    follower, live = pair
    follower.route("DELETE", "/volumes/v1", 503, NO_LEADER_YET)
    live.route("DELETE", "/volumes/v1", 404, NOT_FOUND)
    code, out, err = run(["--endpoint", follower.url, "--endpoint", live.url, "volume", "delete", "v1"],
                         capsys)
    assert (code, out) == (3, "") and "not found" in err
