"""zstore/daemon.py's stop_on_signals: the first SIGTERM/SIGINT asks for a clean stop; a
second one, while that stop hangs, ends the process at once (the chunk server's shutdown
must never need SIGKILL from an operator who already asked twice)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.cluster import ROOT, wait_for

pytestmark = pytest.mark.timeout(60)

# A daemon whose shutdown never ends: after stop it waits for ever.
DAEMON = """
import asyncio, logging, sys
from zstore.daemon import stop_on_signals
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
log = logging.getLogger("d")

async def main():
    stop = stop_on_signals(log)
    print("ready", flush=True)
    await stop.wait()
    print("stopping, blocked", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_ends_a_daemon_whose_shutdown_hangs(tmp_path, sig):
    out = tmp_path / "out"
    with open(out, "wb") as f:
        p = subprocess.Popen([sys.executable, "-c", DAEMON], stdout=f, stderr=subprocess.STDOUT,
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                             stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: "ready" in out.read_text() or p.poll() is not None, 20, "the daemon to start")
        p.send_signal(sig)
        wait_for(lambda: "stopping, blocked" in out.read_text() or p.poll() is not None, 10,
                 "the first signal to start the stop")
        assert p.poll() is None                       # the first one: a clean stop, which hangs
        t0 = time.monotonic()
        p.send_signal(sig)
        try:
            rc = p.wait(5)
        except subprocess.TimeoutExpired:
            pytest.fail("a second signal did not end the daemon:\n" + out.read_text())
        # "at once": the handler logs and calls os._exit, no clean stop (p.wait's 5 s is only
        # the test's own limit)
        assert time.monotonic() - t0 < 3
        assert rc != 0, out.read_text()
        assert "again" in out.read_text(), out.read_text()    # it said why it exits now
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)
