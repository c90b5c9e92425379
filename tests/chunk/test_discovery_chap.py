"""Discovery is checked against CHAP under target '*'; with only per-target CHAP set for an
initiator it is refused, on a chunk server's portal and at the redirector's VIP alike.

Real etcd and meta calls, the real catalog, the chunk server's target on loopback and the
redirector's login policy over the same catalog.
"""

from __future__ import annotations

import asyncio

import pytest

from chunk.blockdev import MemoryBlockDevice
from chunk.iscsi.constants import LoginStatus
from chunk.iscsi.errors import LoginError
from chunk.iscsi.target import IscsiTarget, TargetConfig
from meta import exports, volumes
from redirector.portal import RedirectPolicy
from tests.chunk.iscsi.test_login import Client
from tests.cluster import async_wait_for, free_port

H1 = "iqn.2004-10.com.example:h1"
H2 = "iqn.2004-10.com.example:h2"


async def discovery_status(port: int, initiator: str) -> int:
    c = Client(*await asyncio.open_connection("127.0.0.1", port))
    try:
        pairs = [("InitiatorName", initiator), ("SessionType", "Discovery"), ("AuthMethod", "None")]
        resp, _ = await c.step(pairs, csg=0, nsg=1, transit=True)
        return resp.status
    finally:
        c.close()


def redirector_discovery(cat, initiator: str):
    policy = RedirectPolicy(cat, members=None, tsihs=set(), holding=lambda: True)
    return policy.chap_for(None, initiator)


async def test_only_per_target_chap_refuses_discovery_without_a_password(catalog_setup, caplog):
    ctx, cat = catalog_setup
    await volumes.create_volume(ctx, "v", "1Gi", 1)
    iqn = (await exports.list_targets(ctx))[0]["iqn"]
    await exports.add_acl(ctx, "v", H1)
    await exports.add_acl(ctx, "v", H2)
    target = IscsiTarget(TargetConfig(port=free_port()), cat,
                         lambda volume, readonly, view_seq=0: MemoryBlockDevice(1 << 20, readonly=readonly))
    await target.start()
    port = target.cfg.port
    try:
        await async_wait_for(lambda: cat.visible_targets(H1) == [iqn], 5, "the ACL mirrored")
        assert await discovery_status(port, H1) == LoginStatus.SUCCESS         # no CHAP at all
        await exports.set_chap(ctx, {"target": iqn, "initiator": H1, "user": "h1", "secret": "per-target-secret"})
        await async_wait_for(lambda: cat.chap, 5, "CHAP mirrored")
        assert await discovery_status(port, H1) == LoginStatus.AUTHENTICATION_FAILURE
        assert await discovery_status(port, H1.upper()) == LoginStatus.AUTHENTICATION_FAILURE
        assert await discovery_status(port, H2) == LoginStatus.SUCCESS         # not H2's CHAP
        assert "set CHAP under target '*'" in caplog.text
        with pytest.raises(LoginError) as e:
            redirector_discovery(cat, H1)
        assert e.value.status == LoginStatus.AUTHENTICATION_FAILURE
        assert redirector_discovery(cat, H2) is None
        # discovery CHAP under '*' is what discovery is checked against
        await exports.set_chap(ctx, {"target": "*", "initiator": H1, "user": "d1", "secret": "discovery-secret"})
        await async_wait_for(lambda: len(cat.chap) == 2, 5, "CHAP mirrored")
        assert redirector_discovery(cat, H1).user == "d1"
        assert await discovery_status(port, H1) == LoginStatus.AUTHENTICATION_FAILURE  # CHAP, not None
        await exports.clear_chap(ctx, "*", H1)
        await exports.clear_chap(ctx, iqn, H1)
        await async_wait_for(lambda: not cat.chap, 5, "CHAP removal mirrored")
        assert await discovery_status(port, H1) == LoginStatus.SUCCESS
        assert redirector_discovery(cat, H1) is None
        # per-target CHAP for every initiator: nobody discovers without a password
        await exports.set_chap(ctx, {"target": iqn, "initiator": "*", "user": "all", "secret": "every-initiator"})
        await async_wait_for(lambda: cat.chap, 5, "CHAP mirrored")
        assert await discovery_status(port, H2) == LoginStatus.AUTHENTICATION_FAILURE
    finally:
        await target.stop()
