"""A logged-in initiator is told when the LUNs it may see change (SPC-4 unit attention
REPORTED LUNS DATA HAS CHANGED, 3F/0E), else Linux, ESXi and Windows never rescan.

Real etcd and meta calls for the catalog, the real target and SCSI layer on loopback
(memory block devices), and a hand-built initiator that reads every answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct

import pytest

from chunk.blockdev import MemoryBlockDevice
from chunk.catalog import Catalog
from chunk.iscsi import pdu as P
from chunk.iscsi.target import IscsiTarget, TargetConfig
from meta import exports, volumes
from tests.chunk.iscsi.raw_initiator import TUR
from tests.chunk.iscsi.raw_initiator import Initiator as RawInitiator
from tests.cluster import async_wait_for, free_port
from tests.meta.helpers import make_ctx, register_chunk

H1 = "iqn.2004-10.com.example:h1"
UA_POWER_ON = (0x06, 0x29, 0x00)
UA_LUNS_CHANGED = (0x06, 0x3F, 0x0E)


class Initiator(RawInitiator):
    """The raw session with data-in in every answer, as these tests and the catalog staleness
    and shared reservation suites read it."""

    async def command(self, lun: int, cdb: bytes, expected_length: int = 0):
        """(status, sense key/ASC/ASCQ or None, data-in) of one command."""
        return await self.transfer(lun, cdb, read=expected_length)

    async def tur(self, lun: int):
        return (await self.command(lun, TUR))[:2]

    async def report_luns(self) -> list[int]:
        status, sense, data = await self.command(1, struct.pack(">B5xIxx", 0xA0, 4096), 4096)
        assert status == 0, sense
        n, = struct.unpack_from(">I", data)
        return [P.decode_lun(struct.unpack_from(">Q", data, 8 + 8 * i)[0]) for i in range(n // 8)]


@contextlib.asynccontextmanager
async def volume_a_served_to_h1(client, etcd_config, **catalog_kw):
    """(meta ctx, catalog, target, target iqn, initiator, LUN): volume "a" (LUN 1) on the
    ACL of H1, a target over a catalog of ``client`` (``catalog_kw`` for the Catalog), H1
    logged in; everything stopped on the way out."""
    ctx = make_ctx(client, etcd_config)
    await register_chunk(ctx, "c0")
    vol, _ = await volumes.create_volume(ctx, "a", "1Mi", 1)
    assert vol.lun == 1
    iqn = (await exports.list_targets(ctx))[0]["iqn"]
    await exports.add_acl(ctx, "a", H1)
    stop = asyncio.Event()
    cat = Catalog(client, ctx.keys, **catalog_kw)
    await cat.start(stop)
    target = IscsiTarget(TargetConfig(port=free_port()), cat,
                         lambda volume, readonly, view_seq=0: MemoryBlockDevice(1 << 20, readonly=readonly))
    await target.start()
    try:
        ini = await Initiator.connect(target.cfg.port, iqn, H1)
        try:
            yield ctx, cat, target, iqn, ini, vol.lun
        finally:
            ini.close()
    finally:
        stop.set()
        await target.stop()
        await cat.close()


@pytest.fixture
async def served(etcd_client, etcd_config):
    """(meta ctx, catalog, target iqn, initiator) with volume "a" (LUN 1) visible to H1."""
    async with volume_a_served_to_h1(etcd_client, etcd_config) as (ctx, cat, _, iqn, ini, _):
        yield ctx, cat, iqn, ini


async def test_a_lun_mapped_to_a_logged_in_initiator_is_announced_by_a_unit_attention(served):
    ctx, cat, iqn, ini = served
    assert await ini.tur(1) == (2, UA_POWER_ON)
    assert await ini.tur(1) == (0, None)
    assert await ini.report_luns() == [1]

    b, _ = await volumes.create_volume(ctx, "b", "1Mi", 1)     # LUN 2, not on H1's ACL yet
    await async_wait_for(lambda: any(lun == b.lun for _, lun in cat.luns), 5, "LUN 2 mirrored")
    assert await ini.tur(1) == (0, None)                        # nothing this initiator sees changed
    await exports.add_acl(ctx, "b", H1)
    await async_wait_for(lambda: cat.lun_access(iqn, H1, b.lun), 5, "the ACL entry mirrored")
    assert await ini.tur(1) == (2, UA_LUNS_CHANGED)
    assert await ini.report_luns() == [1, b.lun]
    assert await ini.tur(1) == (0, None)
    assert await ini.tur(b.lun) == (2, UA_POWER_ON)             # a new LU to this nexus
    assert await ini.tur(b.lun) == (0, None)

    # Taken away again: LUN 1, the LU it used and still sees, tells it.
    await exports.remove_acl(ctx, "b", H1)
    await async_wait_for(lambda: cat.lun_access(iqn, H1, b.lun) is None, 5, "the ACL removal mirrored")
    assert await ini.tur(1) == (2, UA_LUNS_CHANGED)
    assert await ini.report_luns() == [1]


async def test_report_luns_clears_the_unit_attention_on_every_lu(served):
    ctx, cat, iqn, ini = served
    b, _ = await volumes.create_volume(ctx, "b", "1Mi", 1)
    await exports.add_acl(ctx, "b", H1)
    await async_wait_for(lambda: cat.lun_access(iqn, H1, b.lun), 5, "LUN 2 visible")
    for lun in (1, b.lun):                     # both LUs used: each holds a UA for this nexus
        assert await ini.tur(lun) == (2, UA_POWER_ON)
        assert await ini.tur(lun) == (0, None)
    await volumes.create_volume(ctx, "c", "1Mi", 1)
    await exports.add_acl(ctx, "c", H1)
    await async_wait_for(lambda: len(cat.visible_luns(iqn, H1)) == 3, 5, "LUN 3 visible")
    assert await ini.tur(1) == (2, UA_LUNS_CHANGED)
    assert await ini.report_luns() == [1, b.lun, b.lun + 1]    # learnt here: LUN 2 need not repeat it
    assert await ini.tur(b.lun) == (0, None)
    assert await ini.tur(1) == (0, None)
