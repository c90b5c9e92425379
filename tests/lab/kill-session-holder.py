"""Lab host hook of the failover test: SIGKILL the chunk server holding an initiator's session.

run-vm.sh runs it (``--hook``) inside the lab netns when the guest calls ``lab_host_hook``.
Argument: a JSON spec ``{"api", "token_file", "initiator", "pids": {portal: pid}, "out"}``.
It finds the chunk server whose published sessions (``GET /api/v1/chunks``, part of each
chunk server's live record) include a normal session of ``initiator``, SIGKILLs that pid (one
the test started), and writes ``{"portal", "chunk_id", "pid", "killed_at"}`` to ``out``.
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


def chunks(api: str, token: str) -> list[dict[str, Any]]:
    req = urllib.request.Request(f"{api}/api/v1/chunks", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())["chunks"]


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
    pid = spec["pids"][chunk["portal"]]
    os.kill(pid, signal.SIGKILL)
    killed = {"portal": chunk["portal"], "chunk_id": chunk["chunk_id"], "pid": pid, "killed_at": time.time()}
    print(f"SIGKILLed chunk server {chunk['chunk_id']} (pid {pid}) at {chunk['portal']}: "
          f"it held {[s for s in chunk['sessions'] if s['initiator'] == spec['initiator']]}")
    with open(spec["out"], "w") as f:
        json.dump(killed, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
