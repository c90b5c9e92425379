"""A chunk server stops in bounded time whatever it is doing: SIGTERM while initiators write.

Real etcd, meta and chunk server on loopback (tests/cluster.py), qemu-img as the initiator.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time

import pytest

from chunk.storage.host_crash import STATE_FILE
from tests.cluster import cluster, wait_for

MiB = 1 << 20


def _state(c, i: int) -> dict:
    path = c.workdir / f"chunk{i}" / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.skipif(not shutil.which("qemu-img"), reason="qemu-utils is not installed")
def test_sigterm_while_an_initiator_writes_stops_cleanly_in_bounded_time(tmp_path, etcd_server):
    """SIGTERM set the lease deadline to 0 at once; every write reaching the coordinator from
    then on waited for a lease that never came back (``ensure_owner``), the session's close
    down waited for those writes without a bound, and the server never got to stop its engine
    or revoke its lease: it hung until SIGKILL, which the next boot takes for a host crash."""
    from tests.chunk.storage.test_replication import extents, opts, qemu_io, serving_volume
    with cluster(tmp_path, etcd_server, metas=1, chunks=1) as c:
        vol = serving_volume(c, 1, "sd", "64Mi", 1)
        qemu_io(c, vol, 0, "write -P 0x11 0 64M")           # allocated: writes take the fast path
        assert extents(c, "sd")
        # A writer that keeps 64 writes in flight, for far longer than the test.
        writers = [subprocess.Popen(["qemu-img", "bench", "--image-opts", "-w", "-d", "64", "-s", "4096",
                                     "-c", "100000000", opts(c, vol, 0)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)]
        try:
            chunk = c.chunks[0]
            log_size = len(chunk.log())
            # Writing: the session logged in (the chunk server logs nothing per write; the
            # writer being alive after its login is the condition).
            wait_for(lambda: "normal session:" in chunk.log()[log_size:] or
                     any(w.poll() is not None for w in writers), 30, "the writer logged in")
            assert all(w.poll() is None for w in writers), [w.stderr.read() for w in writers]
            time.sleep(1.0)                                  # writes flowing (not a proof)
            assert all(w.poll() is None for w in writers)
            chunk.popen.send_signal(signal.SIGTERM)
            try:
                rc = chunk.popen.wait(20)
            except subprocess.TimeoutExpired:
                pytest.fail("the chunk server did not stop within 20 s of SIGTERM:\n" + chunk.log()[-3000:])
            assert rc == 0, chunk.log()[-3000:]
            state = _state(c, 0)
            assert state.get("clean") is True, (state, chunk.log()[-3000:])
        finally:
            for w in writers:
                if w.poll() is None:
                    w.kill()
                w.wait(10)
                w.stderr.close()
