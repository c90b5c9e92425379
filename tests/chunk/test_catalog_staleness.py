"""A chunk server cut off from etcd must not go on serving the ACLs it last saw.

Its own etcd (a real subprocess on loopback, not the session-wide one: it is paused and
stopped here), the real catalog and target, and a hand-built initiator. Past the catalog's
bound without etcd confirming the mirror, logins get 0x0301 and every command of an
existing session NOT READY (04/01), reads included; a fresh listing brings both back.
"""

from __future__ import annotations

import asyncio
import os
import signal
import struct

import pytest

from chunk.iscsi.constants import LoginStatus
from meta import exports
from tests.chunk.iscsi.test_login import Client
from tests.chunk.iscsi.test_lun_inventory import Initiator, volume_a_served_to_h1
from tests.cluster import Etcd, async_wait_for, unique_prefix

H1 = "iqn.2004-10.com.example:h1"        # the session's initiator, on the volume's ACL
H2 = "iqn.2004-10.com.example:h2"        # only logs in (another ISID space: no reinstatement)
BOUND = 1.0                               # the catalog's stale_after (a chunk server: its lease TTL)
NOT_READY = (0x02, 0x04, 0x01)
READ10 = struct.pack(">BBIBHB", 0x28, 0, 0, 0, 1, 0)


@pytest.fixture
def own_etcd(tmp_path):
    server = Etcd(tmp_path).start()
    yield server
    if server.proc and server.proc.alive():
        os.kill(server.proc.pid, signal.SIGCONT)
    server.stop()


@pytest.fixture
async def served(own_etcd):
    from zstore import etcd as zetcd
    from zstore.config import EtcdConfig

    cfg = EtcdConfig(endpoints=[own_etcd.endpoint], prefix=unique_prefix(), timeout=2.0)
    client = zetcd.client(cfg)
    await client.connect()
    try:
        async with volume_a_served_to_h1(client, cfg, stale_after=BOUND) as served:
            yield served
    finally:
        await client.close()


async def login_status(port: int, iqn: str) -> int:
    c = Client(*await asyncio.open_connection("127.0.0.1", port))
    try:
        pairs = [("InitiatorName", H2), ("SessionType", "Normal"), ("TargetName", iqn), ("AuthMethod", "None")]
        resp, _ = await c.step(pairs, csg=0, nsg=1, transit=True)
        return resp.status
    finally:
        c.close()


async def assert_serving(port: int, iqn: str, ini: Initiator, lun: int) -> None:
    status, sense, data = await ini.command(lun, READ10, 512)
    assert (status, sense, len(data)) == (0, None, 512)
    assert await ini.report_luns() == [lun]
    assert await login_status(port, iqn) == LoginStatus.SUCCESS


async def assert_fenced(port: int, iqn: str, ini: Initiator, lun: int) -> None:
    assert await ini.command(lun, READ10, 512) == (2, NOT_READY, b"")      # reads stop too
    assert await ini.tur(lun) == (2, NOT_READY)
    assert (await ini.command(1, struct.pack(">B5xIxx", 0xA0, 4096), 4096))[:2] == (2, NOT_READY)
    assert await login_status(port, iqn) == LoginStatus.SERVICE_UNAVAILABLE


async def settle(ini: Initiator, lun: int) -> None:
    """Consume the power-on unit attention of a first command."""
    for _ in range(3):
        if await ini.tur(lun) == (0, None):
            return
    raise AssertionError("the LU never answered GOOD")


async def test_a_paused_etcd_fences_logins_and_commands_until_a_fresh_listing(served, own_etcd):
    ctx, cat, target, iqn, ini, lun = served
    port = target.cfg.port
    await settle(ini, lun)
    await assert_serving(port, iqn, ini, lun)
    os.kill(own_etcd.proc.pid, signal.SIGSTOP)      # the TCP connection stays up: nothing errors
    try:
        await async_wait_for(lambda: cat.stale, BOUND + 5, "the catalog marked stale")
        assert not cat.synced
        await assert_fenced(port, iqn, ini, lun)
    finally:
        os.kill(own_etcd.proc.pid, signal.SIGCONT)
    await async_wait_for(lambda: not cat.stale, 15, "the catalog listed afresh")
    await assert_serving(port, iqn, ini, lun)


async def test_a_stopped_etcd_fences_and_an_acl_revoked_meanwhile_holds_after_resync(served, own_etcd):
    ctx, cat, target, iqn, ini, lun = served
    port = target.cfg.port
    await settle(ini, lun)
    await assert_serving(port, iqn, ini, lun)
    own_etcd.stop()
    await async_wait_for(lambda: cat.stale, BOUND + 5, "the catalog marked stale")
    await assert_fenced(port, iqn, ini, lun)
    await asyncio.sleep(BOUND)                      # still fenced well past the bound
    await assert_fenced(port, iqn, ini, lun)
    own_etcd.start()
    await async_wait_for(lambda: not cat.stale, 20, "the catalog listed afresh")
    await assert_serving(port, iqn, ini, lun)
    # The watches work again: a revocation reaches the existing session.
    await exports.remove_acl(ctx, "a", H1)
    await async_wait_for(lambda: cat.lun_access(iqn, H1, lun) is None, 5, "ACL removal mirrored")
    status, sense, _ = await ini.command(lun, READ10, 512)
    assert status == 2 and sense[0] == 0x05        # ILLEGAL REQUEST: LUN not supported


async def test_a_short_watch_outage_within_the_bound_does_not_fence(served):
    """A watch that breaks and relists within the bound (an etcd leader change, a restart)
    never makes the catalog stale: the confirmation is what counts, not one failure."""
    ctx, cat, target, iqn, ini, lun = served
    await settle(ini, lun)
    for _ in range(int(3 * BOUND / 0.2)):
        assert not cat.stale
        await asyncio.sleep(0.2)
    await assert_serving(target.cfg.port, iqn, ini, lun)
