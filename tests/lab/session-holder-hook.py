"""Lab host hook of the VIP tests: take away the chunk server holding an initiator's session.

run-vm.sh runs it (``--hook``) inside the lab netns when the guest calls ``lab_host_hook``.
Argument: a JSON spec ``{"api", "token_file", "initiator", "pids": {portal: pid}, "out",
"action"}``. It finds the chunk server whose published sessions (``GET /api/v1/chunks``, part
of each chunk server's live record) include a normal session of ``initiator``; then, for
action ``kill`` (default), SIGKILLs that pid (one the test started), for ``drain`` drains it
through the meta API. It writes ``{"portal", "chunk_id", "pid", "action", "at"}`` to ``out``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.request
from typing import Any

FIND_TIMEOUT = 15.0     # the session is published within about a second of the login


def call(api: str, token: str, path: str, method: str = "GET") -> Any:
    req = urllib.request.Request(f"{api}/api/v1{path}", method=method,
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def chunks(api: str, token: str) -> list[dict[str, Any]]:
    return call(api, token, "/chunks")["chunks"]


def holder(spec: dict[str, Any], token: str) -> dict[str, Any] | None:
    """The up chunk server with a normal session of the initiator, if exactly one has it."""
    found = [c for c in chunks(spec["api"], token) if c["status"] == "up"
             and any(s["initiator"] == spec["initiator"] and s["type"] == "normal" for s in c["sessions"])]
    return found[0] if len(found) == 1 else None


def main(path: str) -> int:
    spec = json.loads(open(path).read())
    token = open(spec["token_file"]).read().strip()
    deadline = time.monotonic() + FIND_TIMEOUT
    chunk = None
    while chunk is None and time.monotonic() < deadline:
        chunk = holder(spec, token)
        if chunk is None:
            time.sleep(0.2)
    if chunk is None:
        print(f"no single chunk server lists a session of {spec['initiator']}: "
              f"{json.dumps(chunks(spec['api'], token), indent=1)}")
        return 1
    pid, action = spec["pids"][chunk["portal"]], spec.get("action", "kill")
    if action == "kill":
        os.kill(pid, signal.SIGKILL)
    else:
        call(spec["api"], token, f"/chunks/{chunk['chunk_id']}/drain", method="POST")
    done = {"portal": chunk["portal"], "chunk_id": chunk["chunk_id"], "pid": pid, "action": action,
            "at": time.time()}
    print(f"{'SIGKILLed' if action == 'kill' else 'drained'} chunk server {chunk['chunk_id']} (pid {pid}) "
          f"at {chunk['portal']}: it held "
          f"{[s for s in chunk['sessions'] if s['initiator'] == spec['initiator']]}")
    with open(spec["out"], "w") as f:
        json.dump(done, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
