"""A disk that stalls its probe costs neither the keepalives nor the other disks' reports: the
probe runs beside the keepalive loop, and a disk that does not answer in time is failed
(chunk/registration.py, chunk/disks.py ``probe_all_async``)."""

from __future__ import annotations

import asyncio
import threading
import time

from chunk import disks
from chunk.registration import Registration
from zstore.keys import Keys
from zstore.records import ChunkInfo

TTL = 3


def _info(records):
    return ChunkInfo(chunk_id="stall-test", hostname="h", address="127.0.0.1", data_port=1,
                     portal="127.0.0.1:3260", disks=records)


async def test_a_stalled_probe_does_not_delay_the_keepalives(etcd_client, etcd_config):
    keys = Keys(etcd_config.prefix)
    stall = asyncio.Event()
    calls = 0

    async def probe():
        nonlocal calls
        calls += 1
        if calls > 1:
            await stall.wait()             # the second probe hangs on a dead disk
        return [{"path": "/d0", "state": "ok"}]
    reg = Registration(etcd_client, keys, "stall-test", lease_ttl=TTL, build_info=_info,
                       probe_disks=probe, refresh_interval=0.2)
    stop = asyncio.Event()
    task = asyncio.create_task(reg.run(stop))
    try:
        await asyncio.wait_for(reg.registered.wait(), 10)
        end = time.monotonic() + 2 * TTL                 # well past the lease's deadline
        while time.monotonic() < end:
            assert reg.lease_valid(), "the keepalive loop waited on the stalled probe"
            await asyncio.sleep(0.1)
        assert calls == 2 and reg.lease_gen == 1 and reg.registered.is_set()
        stall.set()                                      # it answers again: published
        await asyncio.sleep(TTL / 3 + 0.5)
        assert calls >= 3 and reg.lease_valid()
    finally:
        stall.set()
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_a_disk_whose_probe_hangs_is_reported_failed_after_the_timeout(tmp_path):
    good, bad = (disks.prepare(disks.DiskSpec(tmp_path / n)) for n in ("good", "bad"))
    release = threading.Event()
    started = []

    def probe(d):
        if d is bad:
            started.append(d)
            release.wait(30)               # a device that does not answer
        return disks.probe(d)
    try:
        t0 = time.monotonic()
        recs = await disks.probe_all_async([good, bad], timeout=0.5, probe_one=probe)
        assert time.monotonic() - t0 < 2
        assert recs[0]["state"] == "ok"
        assert recs[1]["state"] == "failed" and "not answered" in recs[1]["error"]
        # Still stuck: reported failed again, and no second thread is started into it.
        recs = await disks.probe_all_async([good, bad], timeout=0.2, probe_one=probe)
        assert recs[1]["state"] == "failed" and len(started) == 1
        release.set()
        await asyncio.sleep(0.2)
        recs = await disks.probe_all_async([good, bad], timeout=5, probe_one=probe)
        assert [r["state"] for r in recs] == ["ok", "ok"]
    finally:
        release.set()
