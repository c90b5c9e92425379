"""Two hosts of one shared LUN, each logged in to a different chunk server's target, see one
set of persistent reservations (fence_scsi's sequence: register, reserve, preempt).

Real etcd and meta calls, two real targets on loopback (each with its own reservation store,
as two chunk servers have), hand-built initiators. Before the reservations were shared, the
host on the second server saw no registration and wrote through the first host's reservation.
"""

from __future__ import annotations

import asyncio
import struct

import pytest

from chunk.blockdev import MemoryBlockDevice
from chunk.catalog import Catalog
from chunk.iscsi import pdu as P
from chunk.iscsi.constants import TARGET_OPCODES
from chunk.iscsi.target import IscsiTarget, TargetConfig
from chunk.shared_reservations import ReservationStore
from meta import exports, volumes
from tests.chunk.iscsi.raw_login import normal_login
from tests.chunk.iscsi.test_lun_inventory import Initiator
from tests.cluster import async_wait_for, free_port
from tests.meta.helpers import make_ctx, register_chunk

HOST1 = "iqn.2004-10.com.example:node1"
HOST2 = "iqn.2004-10.com.example:node2"
K1, K2 = 0x1111, 0x2222
REGISTER, RESERVE, PREEMPT = 0, 1, 4
WE = 1
CONFLICT = 0x18


class Host(Initiator):
    async def command_out(self, lun: int, cdb: bytes, data: bytes):
        """(status, sense) of a command whose data goes out as immediate data."""
        self.itt += 1
        self.w.write(P.ScsiCommand(itt=self.itt, cmdsn=self.cmdsn, lun=P.encode_lun(lun), write=True,
                                   expected_length=len(data), cdb=cdb.ljust(16, b"\0"),
                                   data=data).to_bytes())
        self.cmdsn += 1
        pdu = await asyncio.wait_for(P.read_pdu(self.r, max_recv_data_segment_length=1 << 20,
                                                opcodes=TARGET_OPCODES), 10)
        assert isinstance(pdu, P.ScsiResponse), pdu
        s = pdu.sense
        return pdu.status, ((s[2] & 0x0F, s[12], s[13]) if s else None)

    async def prout(self, lun: int, sa: int, key: int, sark: int = 0, rtype: int = 0):
        cdb = struct.pack(">BBBxxIxx", 0x5F, sa, rtype, 24)
        return await self.command_out(lun, cdb, struct.pack(">QQ8x", key, sark))

    async def write(self, lun: int):
        return await self.command_out(lun, struct.pack(">BxIxHx", 0x2A, 0, 1), b"\xa5" * 512)

    async def read_keys(self, lun: int) -> tuple[int, list[int]]:
        status, sense, data = await self.command(lun, struct.pack(">BBxxxxxHx", 0x5E, 0, 4096), 4096)
        assert status == 0, sense
        gen, n = struct.unpack_from(">II", data)
        return gen, [struct.unpack_from(">Q", data, 8 + i)[0] for i in range(0, n, 8)]


@pytest.fixture
async def two_servers(etcd_client, etcd_config):
    ctx = make_ctx(etcd_client, etcd_config)
    await register_chunk(ctx, "c0")
    vol, _ = await volumes.create_volume(ctx, "shared", "1Mi", 1)
    iqn = (await exports.list_targets(ctx))[0]["iqn"]
    await exports.add_acl(ctx, "shared", HOST1)
    await exports.add_acl(ctx, "shared", HOST2)
    stop = asyncio.Event()
    made = []
    for chunk_id in ("c0", "c1"):
        cat = Catalog(etcd_client, ctx.keys)
        await cat.start(stop)
        store = ReservationStore(etcd_client, ctx.keys, chunk_id)
        store.start(stop)
        target = IscsiTarget(TargetConfig(port=free_port()), cat,
                             lambda volume, readonly, view_seq=0: MemoryBlockDevice(1 << 20, readonly=readonly),
                             store)
        await target.start()
        made.append((cat, store, target))
    await async_wait_for(lambda: all(c.lun_access(iqn, HOST2, vol.lun) for c, _, _ in made), 5,
                         "the ACL mirrored on both servers")
    hosts = []
    try:
        for (_, store, target), name in zip(made, (HOST1, HOST2)):
            await asyncio.wait_for(store.synced.wait(), 10)
            hosts.append(Host(*await normal_login(target.cfg.port, iqn, name)))
        yield vol.lun, hosts[0], hosts[1]
    finally:
        for h in hosts:
            h.close()
        stop.set()
        for cat, store, target in made:
            await target.stop()
            await store.close()
            await cat.close()


async def test_fence_scsi_sequence_across_two_chunk_servers(two_servers):
    lun, node1, node2 = two_servers
    for h in (node1, node2):
        await h.tur(lun)                                     # the power-on unit attention
    assert (await node1.prout(lun, REGISTER, 0, K1))[0] == 0
    assert (await node2.prout(lun, REGISTER, 0, K2))[0] == 0
    assert await node2.read_keys(lun) == (2, [K1, K2])      # node1's key, seen through c1
    assert (await node1.prout(lun, RESERVE, K1, rtype=WE))[0] == 0

    async def node2_refused() -> bool:
        return (await node2.write(lun))[0] == CONFLICT
    deadline = asyncio.get_running_loop().time() + 5
    while not await node2_refused():                        # c1's mirror follows within ms
        assert asyncio.get_running_loop().time() < deadline, "node2 still writes through node1's reservation"
        await asyncio.sleep(0.02)
    assert (await node1.write(lun))[0] == 0

    # node1 stops answering the cluster: node2 fences it off by preempting its key
    assert (await node2.prout(lun, PREEMPT, K2, K1, rtype=WE))[0] == 0
    assert (await node2.write(lun))[0] == 0
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        status, sense = await node1.write(lun)
        if status == 2 and sense == (0x6, 0x2A, 0x05):       # REGISTRATIONS PREEMPTED, via c0
            break
        assert status == 0 and asyncio.get_running_loop().time() < deadline, (status, sense)
        await asyncio.sleep(0.02)
    assert (await node1.write(lun))[0] == CONFLICT
    assert await node1.read_keys(lun) == (3, [K2])
