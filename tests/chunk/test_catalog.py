"""The chunk server's mirror of export state follows etcd changes live."""

from meta import exports, volumes
from tests.cluster import async_wait_for

H1 = "iqn.2004-10.com.example:h1"
H2 = "iqn.2004-10.com.example:h2"


async def test_masking_follows_acl_changes(catalog_setup):
    ctx, cat = catalog_setup
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 1)
    iqn = (await exports.list_targets(ctx))[0]["iqn"]
    await async_wait_for(lambda: cat.target(iqn), 5, "target mirrored")
    assert cat.visible_luns(iqn, H1) == {} and cat.visible_targets(H1) == []
    await exports.add_acl(ctx, "v", H1)
    await async_wait_for(lambda: cat.lun_access(iqn, H1, vol.lun), 5, "ACL mirrored")
    assert list(cat.visible_luns(iqn, H1)) == [vol.lun] and cat.visible_targets(H1) == [iqn]
    assert cat.lun_access(iqn, H2, vol.lun) is None
    await exports.remove_acl(ctx, "v", H1)
    await async_wait_for(lambda: cat.lun_access(iqn, H1, vol.lun) is None, 5, "ACL removal mirrored")


async def test_readonly_acl_and_chap_lookup_order(catalog_setup):
    ctx, cat = catalog_setup
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 1)
    iqn = (await exports.list_targets(ctx))[0]["iqn"]
    await exports.add_acl(ctx, "v", H1, readonly=True)
    await exports.set_chap(ctx, {"target": "*", "initiator": H1, "user": "any", "secret": "cluster-wide-secret"})
    await exports.set_chap(ctx, {"target": iqn, "initiator": H1, "user": "own", "secret": "per-target-secret"})
    await async_wait_for(lambda: cat.lun_access(iqn, H1, vol.lun) and len(cat.chap) == 2, 5, "mirrored")
    assert cat.lun_access(iqn, H1, vol.lun)[1] is True
    assert cat.chap_for(iqn, H1).user == "own"
    assert cat.chap_for("iqn.other:t", H1).user == "any"
    assert cat.chap_for(iqn, H2) is None


async def test_initiator_names_match_whatever_their_case(catalog_setup):
    """iSCSI names are case-insensitive (RFC 3722) and the meta stores them lower-case: an
    initiator that sends its name in upper case got no LUNs and no CHAP."""
    ctx, cat = catalog_setup
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 1)
    iqn = (await exports.list_targets(ctx))[0]["iqn"]
    await exports.add_acl(ctx, "v", H1)
    await exports.set_chap(ctx, {"target": "*", "initiator": H1, "user": "any", "secret": "cluster-wide-secret"})
    await async_wait_for(lambda: cat.lun_access(iqn, H1, vol.lun) and cat.chap, 5, "mirrored")
    upper = H1.upper()
    assert cat.lun_access(iqn, upper, vol.lun) is not None
    assert list(cat.visible_luns(iqn, upper)) == [vol.lun] and cat.visible_targets(upper) == [iqn]
    assert cat.chap_for(iqn, upper).user == "any"


async def test_deleted_volume_disappears(catalog_setup):
    ctx, cat = catalog_setup
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 1)
    iqn = (await exports.list_targets(ctx))[0]["iqn"]
    await exports.add_acl(ctx, "v", H1)
    await async_wait_for(lambda: cat.lun_access(iqn, H1, vol.lun), 5, "visible")
    await volumes.delete_volume(ctx, "v", force=True)
    await async_wait_for(lambda: cat.lun_access(iqn, H1, vol.lun) is None, 5, "gone")


async def test_session_view_caches_units_until_the_catalog_changes(catalog_setup):
    """A session asks for its unit on every command: the answer is cached per session,
    and every catalog change (here the ACL turning read-only, then going away) drops it."""
    from types import SimpleNamespace

    from chunk.blockdev import MemoryBlockDevice
    from chunk.iscsi.target import SessionView, Units

    ctx, cat = catalog_setup
    vol, _ = await volumes.create_volume(ctx, "v", "1Gi", 1)
    iqn = (await exports.list_targets(ctx))[0]["iqn"]
    opened = []

    def open_device(volume, readonly, view_seq=0):
        opened.append(readonly)
        return MemoryBlockDevice(1 << 20, readonly=readonly)

    view = SessionView(SimpleNamespace(catalog=cat, units=Units(cat, open_device)), H1, iqn)
    assert view.unit(vol.lun) is None
    gen = cat.generation
    await exports.add_acl(ctx, "v", H1)
    await async_wait_for(lambda: cat.generation > gen and view.unit(vol.lun) is not None, 5, "ACL mirrored")
    unit = view.unit(vol.lun)
    assert view.unit(vol.lun) is unit and opened == [False]       # cached: no second look-up
    assert view.unit(vol.lun + 1) is None
    await exports.add_acl(ctx, "v", H1, readonly=True)
    await async_wait_for(lambda: view.unit(vol.lun) is not unit, 5, "read-only ACL mirrored")
    assert opened == [False, True]
    await exports.remove_acl(ctx, "v", H1)
    await async_wait_for(lambda: view.unit(vol.lun) is None, 5, "ACL removal mirrored")


async def test_target_refuses_logins_as_retryable_until_the_catalog_has_its_first_listing(
        etcd_client, etcd_config):
    """A chunk server restarted within its lease TTL still shows live (the old process's key)
    and listens before its catalog is loaded. A login then must get 0x0301 (service unavailable,
    retried by initiators), not 0x0203 (target not found, which may be final) or a session that
    sees no LUNs; once the first listing is in, the same login works."""
    import asyncio

    from chunk.blockdev import MemoryBlockDevice
    from chunk.catalog import Catalog
    from chunk.iscsi.constants import LoginStatus
    from chunk.iscsi.target import IscsiTarget, TargetConfig
    from tests.chunk.iscsi.test_login import Client
    from tests.cluster import free_port
    from tests.meta.helpers import make_ctx, register_chunk

    ctx = make_ctx(etcd_client, etcd_config)
    await register_chunk(ctx, "c0")
    await volumes.create_volume(ctx, "v", "1Gi", 1)
    iqn = (await exports.list_targets(ctx))[0]["iqn"]
    await exports.add_acl(ctx, "v", H1)
    cat = Catalog(etcd_client, ctx.keys)        # its first listing is held back: not started yet
    target = IscsiTarget(TargetConfig(port=free_port()), cat,
                         lambda volume, readonly, view_seq=0: MemoryBlockDevice(1 << 20, readonly=readonly))
    stop = asyncio.Event()
    await target.start()

    async def login(session: str, target_name: str | None) -> int:
        c = Client(*await asyncio.open_connection("127.0.0.1", target.cfg.port))
        try:
            pairs = [("InitiatorName", H1), ("SessionType", session)]
            if target_name:
                pairs.append(("TargetName", target_name))
            resp, _ = await c.step(pairs + [("AuthMethod", "None")], csg=0, nsg=1, transit=True)
            return resp.status
        finally:
            c.close()

    try:
        assert not cat.synced
        assert await login("Normal", iqn) == LoginStatus.SERVICE_UNAVAILABLE
        assert await login("Discovery", None) == LoginStatus.SERVICE_UNAVAILABLE
        await cat.start(stop)
        assert cat.synced
        assert await login("Normal", iqn) == LoginStatus.SUCCESS
        assert await login("Discovery", None) == LoginStatus.SUCCESS
        assert await login("Normal", iqn + "x") == LoginStatus.NOT_FOUND
    finally:
        stop.set()
        await target.stop()
        await cat.close()
