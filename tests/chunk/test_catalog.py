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
