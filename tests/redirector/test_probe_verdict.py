"""What the VIP holder's portal probes may do to logins and sticky records.

A real redirector process on 127.0.0.2, real etcd, chunk servers registered in etcd (their
leases alive) whose portals on 127.0.0.1 listen or refuse as the test says. The probes
used to be trusted whenever one portal answered: a holder reaching only some portals moved
every initiator onto them, and rewrote their sticky records, so they never came back.
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
DISTRUST = "ignoring the probes"
TRUSTED = "portal probes trusted again"


async def record_of(e, keys: Keys, initiator: str) -> str | None:
    v = await e.get(keys.redirect(TARGET, initiator))
    return RedirectRecord.decode(v.value).chunk_id if v else None


async def probe_passes(live: Portal, n: int) -> None:
    """Until ``n`` more probe passes have started: the verdict of the one before is applied
    (a pass connects to every portal, then applies its verdict, then sleeps)."""
    want = live.accepted + n
    await async_wait_for(lambda: live.accepted >= want, n * PROMISE, f"{n} more probe passes")


async def test_most_portals_failing_is_blamed_on_the_holder_and_logins_stay_sticky(
        tmp_path, etcd_server, etcd_client, etcd_config):
    keys, e = Keys(etcd_config.prefix), etcd_client
    await put_target(e, keys)
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
        # 2 of 3 portals fail: the probes are ignored, the sticky choice stands.
        for _ in range(3):
            assert await login_to(c.vips[0]) == home.address
        await probe_passes(live, 2)
        log = c.redirectors[0].log()
        assert log.count(DISTRUST) == 1, log            # once per change, not per pass or login

        # 1 of 3 fails: the probes are trusted again; the sticky pair is diverted.
        await other.listen()
        await async_wait_for(lambda: other.accepted >= 1, 2 * PROMISE, "a probe of c3")
        await probe_passes(live, 2)         # 2: that pass's own probe of c1 may not be counted yet
        assert c.redirectors[0].log().count(TRUSTED) == 1
        assert await login_to(c.vips[0]) == {"c1": live, "c3": other}[
            hashing.pick(INIT, TARGET, ["c1", "c3"])].address
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
        # 1 of 2 fails (not more than half): trusted, this login goes elsewhere...
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


async def test_probes_are_distrusted_only_when_more_than_half_fail(members, caplog):
    m, etcd, keys = members
    cids = ["c1", "c2", "c3", "c4"]
    for i, cid in enumerate(cids):
        await add_chunk(etcd, keys, cid, 4000 + i)
    await async_wait_for(lambda: m.usable() == cids, 10, "4 usable chunk servers")
    caplog.set_level(logging.WARNING, "redirector.members")
    m.set_unreachable({"c1", "c2"})                 # half: trusted
    assert m.usable() == ["c3", "c4"]
    assert DISTRUST not in caplog.text
    for _ in range(2):                              # more than half, twice: one warning
        m.set_unreachable({"c1", "c2", "c3"})
        assert m.usable() == cids
    assert caplog.text.count(DISTRUST) == 1
    m.set_unreachable({"c1"})
    assert m.usable() == ["c2", "c3", "c4"] and caplog.text.count(TRUSTED) == 1
