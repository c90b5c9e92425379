"""A chunk server that is up in etcd but whose iSCSI portal cannot be reached gets no logins.

A real redirector process on 127.0.0.2, real etcd, two chunk servers registered in etcd: one
with a listening portal, one whose portal port refuses connects (its lease renewed, its
listener dead). Its initiators used to be sent back to the dead portal at every login.
(Their sticky records are kept meanwhile: test_probe_verdict.py.)
"""

from __future__ import annotations

import asyncio
import time

import pytest

from redirector import hashing
from tests.cluster import Cluster, async_wait_for
from tests.redirector.portal_helpers import INIT, PROMISE, TARGET, Portal, login_to, put_target
from tests.redirector.test_members import add_chunk
from zstore.keys import Keys
from zstore.records import RedirectRecord

pytestmark = pytest.mark.timeout(90)


async def test_logins_leave_a_chunk_server_whose_portal_is_closed(
        tmp_path, etcd_server, etcd_client, etcd_config):
    keys, e = Keys(etcd_config.prefix), etcd_client
    await put_target(e, keys)
    listener, closed = await Portal().listen(), Portal()
    dead = hashing.pick(INIT, TARGET, ["c1", "c2"])   # the hash's first choice is the dead one
    live = ({"c1", "c2"} - {dead}).pop()
    await add_chunk(e, keys, dead, closed.port)
    await add_chunk(e, keys, live, listener.port)
    await e.put(keys.redirect(TARGET, INIT), RedirectRecord(target=TARGET, initiator=INIT,
                                                            chunk_id=dead).encode())
    c = Cluster(workdir=tmp_path, etcd=etcd_server, prefix=etcd_config.prefix)
    try:
        await asyncio.to_thread(c.start_redirector, "127.0.0.2", login_timeout=3.0)
        t0 = time.monotonic()
        sent: list[str] = []

        async def moved() -> bool:
            sent.append(await login_to(c.vips[0]))
            return sent[-1] == listener.address
        await async_wait_for(moved, 3 * PROMISE, "a login sent to the reachable chunk server")
        assert time.monotonic() - t0 < 3 * PROMISE
        assert set(sent) <= {listener.address, closed.address}
        for _ in range(3):                          # and they stay there
            assert await login_to(c.vips[0]) == listener.address
    finally:
        await asyncio.to_thread(c.stop)
        await listener.close()
        await closed.close()
