"""A disk that hangs at the chunk server's start (a dead NFS mount, a failing disk: a stat or open
that never returns) is failed after the probe's timeout, and the server starts with the others
(chunk/disks.py ``prepare_all(timeout=)``, ``probe_at_start``; chunk/server.py ``main``).

The hang is made as in test_disks_probe_stall.py: the disk's prepare or probe waits on an event.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest

from chunk import disks
from tests.cluster import Cluster, Proc, async_wait_for, wait_for
from zstore.keys import Keys
from zstore.records import ChunkInfo

pytestmark = pytest.mark.timeout(120)


def test_a_disk_whose_prepare_hangs_is_failed_after_the_timeout(tmp_path, caplog):
    data = tmp_path / "data"
    data.mkdir()
    specs = [disks.DiskSpec(tmp_path / "good"), disks.DiskSpec(tmp_path / "hung")]
    release = threading.Event()

    def prepare(spec, *a, **kw):
        if spec.path.name == "hung":
            release.wait(30)               # a mount that does not answer
        return disks.prepare(spec, *a, **kw)
    try:
        t0 = time.monotonic()
        with caplog.at_level(logging.ERROR, "chunk.disks"):
            got = disks.prepare_all(specs, data, "c" * 32, timeout=0.5, prepare_one=prepare)
        assert time.monotonic() - t0 < 5
        assert got[0].disk_id is not None and got[0].error is None
        assert got[1].disk_id is None and "did not finish within 0.5s" in got[1].error
        assert f"disk {tmp_path / 'hung'}: preparing it did not finish within 0.5s" in caplog.text
        assert set(disks.load_known(data)) == {str(tmp_path / "good")}     # no id recorded for it
        recs = disks.probe_all(got)
        assert recs[0]["state"] == "ok"
        assert recs[1]["state"] == "failed" and "did not finish" in recs[1]["error"]
    finally:
        release.set()


def test_a_disk_whose_start_probe_hangs_is_failed_until_a_restart(tmp_path, caplog):
    prepared = [disks.prepare(disks.DiskSpec(tmp_path / n)) for n in ("good", "hung")]
    release = threading.Event()
    touched = []

    def probe(d):
        if d.path.name == "hung" and d.disk_id is not None:
            touched.append(d)
            release.wait(30)
        return disks.probe(d)
    try:
        t0 = time.monotonic()
        with caplog.at_level(logging.ERROR, "chunk.disks"):
            got, recs = disks.probe_at_start(prepared, timeout=0.5, probe_one=probe)
        assert time.monotonic() - t0 < 5
        assert got[0] is prepared[0] and recs[0]["state"] == "ok"
        # Replaced by a failed disk: the extent store does not open it (its scan would hang).
        assert got[1].disk_id is None and "its probe did not finish within 0.5s" in got[1].error
        assert recs[1]["state"] == "failed" and recs[1]["error"] == got[1].error
        assert f"disk {tmp_path / 'hung'}: its probe did not finish" in caplog.text
        release.set()
        # The periodic probe keeps it failed with its reason, without touching it again.
        assert disks.probe(got[1])["error"] == got[1].error and len(touched) == 1
    finally:
        release.set()


# A chunk server whose disk "hung-prepare" never finishes preparing and whose disk
# "hung-probe" never answers a probe that touches it (a probe of a failed disk does not).
WRAPPER = """
import sys, threading
from chunk import disks
disks.PROBE_TIMEOUT = 1.0
never = threading.Event()
prepare, probe = disks.prepare, disks.probe

def hung_prepare(spec, *a, **kw):
    if spec.path.name == "hung-prepare":
        never.wait()
    return prepare(spec, *a, **kw)

def hung_probe(d):
    if d.path.name == "hung-probe" and d.disk_id is not None:
        never.wait()
    return probe(d)
disks.prepare, disks.probe = hung_prepare, hung_probe
from chunk.server import main
sys.exit(main())
"""


def _chunk(c: Cluster, names: list[str]) -> Proc:
    """A chunk server with the disks ``names``, run through WRAPPER."""
    return c.start_chunk(labels={"zone": "z0"}, disks=names, wrapper=WRAPPER)


@pytest.mark.slow
async def test_the_server_starts_with_its_other_disks_when_two_hang(tmp_path, etcd_server, etcd_client,
                                                                   etcd_config):
    c = Cluster(tmp_path, etcd_server, prefix=etcd_config.prefix)
    keys = Keys(etcd_config.prefix)
    try:
        p = _chunk(c, ["good", "hung-prepare", "hung-probe"])
        chunk_id = await async_wait_for(
            lambda: (tmp_path / "chunk0" / "chunk-id").read_text().strip(), 20, "a chunk id")

        async def live():
            assert p.alive(), p.log()[-3000:]
            return await etcd_client.get(keys.chunk_live(chunk_id))
        await async_wait_for(live, 30, "the chunk server serving")   # was: never, stuck at start
        info = ChunkInfo.decode((await etcd_client.get(keys.chunk_info(chunk_id))).value)
        by_name = {os.path.basename(d["path"]): d for d in info.disks}
        assert by_name["good"]["state"] == "ok"
        for name, what in (("hung-prepare", "preparing it"), ("hung-probe", "its probe")):
            assert by_name[name]["state"] == "failed", by_name
            assert f"{what} did not finish within 1s" in by_name[name]["error"]
            assert f"disk {tmp_path / 'chunk0' / name}: {what} did not finish within 1s" in p.log()
    finally:
        c.stop()


@pytest.mark.slow
def test_the_server_exits_with_a_clear_error_when_every_disk_hangs(tmp_path, etcd_server):
    c = Cluster(tmp_path, etcd_server)
    try:
        p = _chunk(c, ["hung-prepare", "hung-probe"])
        wait_for(lambda: not p.alive(), 30, "the chunk server to give up")   # was: stuck for ever
        assert p.popen.returncode == 1, p.log()[-3000:]
        assert "every disk failed" in p.log() and "did not finish within 1s" in p.log(), p.log()[-3000:]
    finally:
        c.stop()
