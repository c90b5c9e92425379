"""Discovery is checked against CHAP under target '*'; with only per-target CHAP set for an
initiator it is refused, on a chunk server's portal and at the redirector's VIP alike.

Real etcd and meta calls, the real catalog, the chunk server's target on loopback and the
redirector's login policy over the same catalog.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from chunk.blockdev import MemoryBlockDevice
from chunk.iscsi import pdu as P
from chunk.iscsi.constants import TARGET_OPCODES, LoginStatus
from chunk.iscsi.errors import LoginError
from chunk.iscsi.target import IscsiTarget, TargetConfig
from chunk.iscsi.text import decode_text, encode_text
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



@contextlib.asynccontextmanager
async def per_target_chap_on_b(catalog_setup):
    """Targets A and B, H1 on both ACLs, CHAP for H1 on B only: H1 logs in to A without a
    password, and its discovery is refused. Yields (target, A, B)."""
    ctx, cat = catalog_setup
    ctx.luns_per_target = 1                         # each volume on a target of its own
    a = await exports.target_iqn_of(ctx, (await volumes.create_volume(ctx, "a", "1Gi", 1))[0])
    b = await exports.target_iqn_of(ctx, (await volumes.create_volume(ctx, "b", "1Gi", 1))[0])
    assert a != b
    for vol in ("a", "b"):
        await exports.add_acl(ctx, vol, H1)
    await exports.set_chap(ctx, {"target": b, "initiator": H1, "user": "h1", "secret": "per-target-secret"})
    target = IscsiTarget(TargetConfig(port=free_port()), cat,
                         lambda volume, readonly, view_seq=0: MemoryBlockDevice(1 << 20, readonly=readonly))
    await target.start()
    try:
        await async_wait_for(lambda: sorted(cat.visible_targets(H1)) == sorted([a, b]) and cat.chap,
                             5, "the ACL and CHAP mirrored")
        assert await discovery_status(target.cfg.port, H1) == LoginStatus.AUTHENTICATION_FAILURE
        yield target, a, b
    finally:
        await target.stop()


async def test_session_type_declared_late_cannot_turn_a_normal_login_into_discovery(catalog_setup):
    """Admitted as a normal session to A (SessionType omitted: Normal), then SessionType=Discovery
    in the next request: refused (0x0200), not a discovery session without its CHAP check."""
    async with per_target_chap_on_b(catalog_setup) as (target, a, _):
        c = Client(*await asyncio.open_connection("127.0.0.1", target.cfg.port))
        try:
            resp, _ = await c.step([("InitiatorName", H1), ("TargetName", a), ("AuthMethod", "None")],
                                   csg=0, nsg=1, transit=True)
            assert resp.status == LoginStatus.SUCCESS
            resp, _ = await c.step([("SessionType", "Discovery")], csg=1, nsg=3, transit=True)
            assert resp.status == LoginStatus.INITIATOR_ERROR and not resp.transit
            assert await c.closed()
        finally:
            c.close()
        assert target.session_list() == []


async def normal_session(port: int, initiator: str, target: str) -> Client:
    """A normal session to ``target`` without CHAP, through both login stages."""
    c = Client(*await asyncio.open_connection("127.0.0.1", port))
    resp, _ = await c.step([("InitiatorName", initiator), ("SessionType", "Normal"), ("TargetName", target),
                            ("AuthMethod", "None")], csg=0, nsg=1, transit=True)
    assert resp.status == LoginStatus.SUCCESS and resp.transit
    resp, _ = await c.step([("HeaderDigest", "None")], csg=1, nsg=3, transit=True)
    assert resp.status == LoginStatus.SUCCESS and resp.transit and resp.nsg == 3
    return c


async def send_targets(c: Client, which: str) -> list[tuple[str, str]]:
    c.itt += 1
    c.w.write(P.TextRequest(itt=c.itt, cmdsn=c.cmdsn, expstatsn=c.expstatsn, immediate=True,
                            data=encode_text([("SendTargets", which)])).to_bytes())
    resp = await asyncio.wait_for(P.read_pdu(c.r, opcodes=TARGET_OPCODES), 5)
    assert isinstance(resp, P.TextResponse) and resp.final and resp.itt == c.itt, resp
    c.expstatsn = resp.statsn + 1
    return decode_text(resp.data)


async def test_send_targets_in_a_normal_session_names_its_own_target_only(catalog_setup):
    """All (not supported in an operational session, RFC 7143 Appendix C) and another target's
    name get no targets; an empty value or the session's own name get its own target."""
    async with per_target_chap_on_b(catalog_setup) as (target, a, b):
        c = await normal_session(target.cfg.port, H1, a)
        try:
            own = [("TargetName", a), ("TargetAddress", f"{target.advertise},1")]
            assert await send_targets(c, "All") == []
            assert await send_targets(c, b) == []
            assert await send_targets(c, "") == own
            assert await send_targets(c, a) == own
        finally:
            c.close()
