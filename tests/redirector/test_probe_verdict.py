"""What the VIP holder's portal probes may do to logins and sticky records.

A real redirector process on 127.0.0.2, real etcd, chunk servers registered in etcd (their
leases alive) whose portals on 127.0.0.1 listen or refuse as the test says. A probe verdict
diverts the login at hand and never rewrites the sticky record (it used to, so initiators
never came back); it is obeyed however many portals fail (for a while it was ignored when
more than half failed, which in a real outage of most portals sent their initiators to
portals they could not reach for the whole outage).
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from redirector import hashing
from tests.cluster import Cluster, async_wait_for
from tests.redirector.portal_helpers import INIT, PROMISE, TARGET, Portal, login_to, put_target
from tests.redirector.test_members import add_chunk, members  # noqa: F401 - a fixture
from zstore.keys import Keys
from zstore.records import RedirectRecord

pytestmark = pytest.mark.timeout(120)

INIT2 = "iqn.1994-05.com.example:host2"
MOST_FAIL = "suspect this host's network"


async def record_of(e, keys: Keys, initiator: str) -> str | None:
    v = await e.get(keys.redirect(TARGET, initiator))
    return RedirectRecord.decode(v.value).chunk_id if v else None


async def probe_passes(live: Portal, n: int) -> None:
    """Until ``n`` more probe passes have started: the verdict of the one before is applied
    (a pass connects to every portal, then applies its verdict, then sleeps)."""
    want = live.accepted + n
    await async_wait_for(lambda: live.accepted >= want, n * PROMISE, f"{n} more probe passes")


async def test_when_most_portals_fail_logins_go_to_the_one_that_answers_and_come_back(
        tmp_path, etcd_server, etcd_client, etcd_config):
    """A front-end network fault on 2 of 3 chunk servers, their leases alive: the sticky
    pair on one of them is diverted to the portal that answers, its record kept."""
    keys, e = Keys(etcd_config.prefix), etcd_client
    await put_target(e, keys, (INIT, INIT2))
    live, home, other = Portal(), Portal(), Portal()
    await live.listen()
    for cid, p in (("c1", live), ("c2", home), ("c3", other)):
        await add_chunk(e, keys, cid, p.port)
    await e.put(keys.redirect(TARGET, INIT), RedirectRecord(target=TARGET, initiator=INIT,
                                                            chunk_id="c2").encode())
    c = Cluster(workdir=tmp_path, etcd=etcd_server, prefix=etcd_config.prefix)
    try:
        await asyncio.to_thread(c.start_redirector, "127.0.0.2", login_timeout=3.0)
        await async_wait_for(lambda: live.accepted >= 3, 4 * PROMISE, "3 probe passes")
        # 2 of 3 portals fail: every login goes to the one that answers, the sticky one too.
        for _ in range(3):
            assert await login_to(c.vips[0]) == live.address
        assert await login_to(c.vips[0], INIT2) == live.address
        # The record is not rewritten: once INIT2's new record is written (the writer goes
        # in login order), INIT's still names c2.
        await async_wait_for(lambda: record_of(e, keys, INIT2), 10, "INIT2's record written")
        assert await record_of(e, keys, INIT) == "c2"
        await probe_passes(live, 2)
        log = c.redirectors[0].log()
        assert log.count(MOST_FAIL) == 1, log           # information, once: not per pass or login

        # c2's portal answers again: INIT lands back where it was.
        await home.listen()
        await async_wait_for(lambda: home.accepted >= 1, 2 * PROMISE, "a probe of c2")
        await probe_passes(live, 2)         # 2: that pass's own probe of c1 may not be counted yet
        assert await login_to(c.vips[0]) == home.address
        assert await record_of(e, keys, INIT) == "c2"
    finally:
        await asyncio.to_thread(c.stop)
        for p in (live, home, other):
            await p.close()


async def test_a_probe_failed_portal_keeps_its_sticky_records_and_gets_them_back(
        tmp_path, etcd_server, etcd_client, etcd_config):
    keys, e = Keys(etcd_config.prefix), etcd_client
    await put_target(e, keys, (INIT, INIT2))
    live, home = Portal(), Portal()
    await live.listen()
    await add_chunk(e, keys, "c1", live.port)
    await add_chunk(e, keys, "c2", home.port)
    await e.put(keys.redirect(TARGET, INIT), RedirectRecord(target=TARGET, initiator=INIT,
                                                            chunk_id="c2").encode())
    c = Cluster(workdir=tmp_path, etcd=etcd_server, prefix=etcd_config.prefix)
    try:
        await asyncio.to_thread(c.start_redirector, "127.0.0.2", login_timeout=3.0)
        await async_wait_for(lambda: live.accepted >= 3, 4 * PROMISE, "3 probe passes")
        # c2's portal fails: this login goes elsewhere...
        assert await login_to(c.vips[0]) == live.address
        # ... but the record is not rewritten: once a later login's new record is written
        # (the writer goes in login order), INIT's still names c2.
        await login_to(c.vips[0], INIT2)
        await async_wait_for(lambda: record_of(e, keys, INIT2), 10, "INIT2's record written")
        assert await record_of(e, keys, INIT) == "c2"

        # c2's portal answers again: INIT lands back where it was.
        await home.listen()
        await async_wait_for(lambda: home.accepted >= 1, 2 * PROMISE, "a probe of c2")
        await probe_passes(live, 2)         # 2: that pass's own probe of c1 may not be counted yet
        assert await login_to(c.vips[0]) == home.address
    finally:
        await asyncio.to_thread(c.stop)
        for p in (live, home):
            await p.close()


async def test_probe_failed_servers_take_no_logins_unless_none_answers(members, caplog):
    m, etcd, keys = members
    cids = ["c1", "c2", "c3", "c4"]
    for i, cid in enumerate(cids):
        await add_chunk(etcd, keys, cid, 4000 + i)
    await async_wait_for(lambda: m.usable() == cids, 10, "4 usable chunk servers")
    caplog.set_level(logging.WARNING, "redirector.members")
    m.set_unreachable({"c1", "c2"})                 # half: no warning
    assert m.usable() == ["c3", "c4"]
    assert MOST_FAIL not in caplog.text
    for _ in range(2):                              # more than half, twice: one warning...
        m.set_unreachable({"c1", "c2", "c3"})
        assert m.usable() == ["c4"]                 # ... and still obeyed
    assert caplog.text.count(MOST_FAIL) == 1
    m.set_unreachable(set(cids))                    # none answers: all of them take logins
    assert m.usable() == cids
    assert caplog.text.count(MOST_FAIL) == 1
    m.set_unreachable({"c1"})
    assert m.usable() == ["c2", "c3", "c4"]
    m.set_unreachable({"c1", "c2", "c3"})           # a new episode: warned again
    assert m.usable() == ["c4"] and caplog.text.count(MOST_FAIL) == 2
