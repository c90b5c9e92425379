"""A chunk server that is up in etcd but whose iSCSI portal cannot be reached gets no logins.

A real redirector process on 127.0.0.2, real etcd, two chunk servers registered in etcd: one
with a listening portal, one whose portal port is closed (its lease renewed, its listener
dead). Its initiators used to be sent back to the dead portal at every login.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from chunk.iscsi.constants import LoginStatus
from redirector import hashing
from tests.cluster import Cluster, async_wait_for
from tests.redirector.iscsi_client import RawInitiator
from tests.redirector.test_members import add_chunk
from zstore.keys import Keys
from zstore.records import AclEntry, LunMapping, RedirectRecord, Target, Volume

pytestmark = pytest.mark.timeout(90)

TARGET = "iqn.2026-01.io.zstore:abcd1234.t0001"
INIT = "iqn.1994-05.com.example:host1"
PROMISE = 2.0 * 2 + 1.0         # probe interval * failures + timeout (redirector/probe.py)


async def login_to(vip: tuple[str, int]) -> str:
    c = await RawInitiator.connect(*vip)
    try:
        resp, kv = await c.login(INIT, TARGET)
    finally:
        c.close()
    assert resp.status == LoginStatus.TARGET_MOVED_TEMPORARILY
    return kv["TargetAddress"]


async def test_logins_and_the_sticky_record_leave_a_chunk_server_whose_portal_is_closed(
        tmp_path, etcd_server, etcd_client, etcd_config):
    keys, e = Keys(etcd_config.prefix), etcd_client
    await e.put(keys.volume("v1"), Volume(volume_id="v1", name="v", size=1 << 26, replicas=1,
                                          target_index=1, lun=1).encode())
    await e.put(keys.target(1), Target(index=1, iqn=TARGET).encode())
    await e.put(keys.lun(1, 1), LunMapping(target_index=1, lun=1, volume_id="v1").encode())
    await e.put(keys.acl("v1", INIT), AclEntry(volume_id="v1", initiator=INIT).encode())
    listener = socket.create_server(("127.0.0.1", 0))
    closed = socket.create_server(("127.0.0.1", 0))
    ports = {"live": listener.getsockname()[1], "dead": closed.getsockname()[1]}
    closed.close()                                  # connects there are refused
    dead = hashing.pick(INIT, TARGET, ["c1", "c2"])   # the hash's first choice is the dead one
    live = ({"c1", "c2"} - {dead}).pop()
    await add_chunk(e, keys, dead, ports["dead"])
    await add_chunk(e, keys, live, ports["live"])
    await e.put(keys.redirect(TARGET, INIT), RedirectRecord(target=TARGET, initiator=INIT,
                                                            chunk_id=dead).encode())
    c = Cluster(workdir=tmp_path, etcd=etcd_server, prefix=etcd_config.prefix)
    try:
        await asyncio.to_thread(c.start_redirector, "127.0.0.2", login_timeout=3.0)
        t0 = time.monotonic()
        sent: list[str] = []

        async def moved() -> bool:
            sent.append(await login_to(c.vips[0]))
            return sent[-1] == f"127.0.0.1:{ports['live']}"
        await async_wait_for(moved, 3 * PROMISE, "a login sent to the reachable chunk server")
        assert time.monotonic() - t0 < 3 * PROMISE
        assert set(sent) <= {f"127.0.0.1:{ports['live']}", f"127.0.0.1:{ports['dead']}"}

        async def record() -> bool:
            v = await e.get(keys.redirect(TARGET, INIT))
            return RedirectRecord.decode(v.value).chunk_id == live
        await async_wait_for(record, 10, "the sticky record moved to the reachable chunk server")
        for _ in range(3):                          # and it stays there
            assert await login_to(c.vips[0]) == f"127.0.0.1:{ports['live']}"
    finally:
        listener.close()
        await asyncio.to_thread(c.stop)
