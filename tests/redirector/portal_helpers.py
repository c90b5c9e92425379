"""Setup shared by the tests that log in through a real redirector process: a target with
one LUN and ACL entries in etcd, a login that returns the redirect target, and chunk server
portals whose answer to the VIP holder's probes the test controls."""

from __future__ import annotations

import asyncio
import socket
from typing import Iterable

from chunk.iscsi.constants import LoginStatus
from tests.redirector.iscsi_client import RawInitiator
from zstore.keys import Keys
from zstore.records import AclEntry, LunMapping, Target, Volume

TARGET = "iqn.2026-01.io.zstore:abcd1234.t0001"
INIT = "iqn.1994-05.com.example:host1"
PROMISE = 2.0 * 2 + 1.0         # probe interval * failures + timeout (redirector/probe.py)


async def put_target(etcd, keys: Keys, initiators: Iterable[str] = (INIT,)) -> None:
    """Volume v1 as LUN 1 of target 1 (``TARGET``), visible to ``initiators``."""
    await etcd.put(keys.volume("v1"), Volume(volume_id="v1", name="v", size=1 << 26, replicas=1,
                                             target_index=1, lun=1).encode())
    await etcd.put(keys.target(1), Target(index=1, iqn=TARGET).encode())
    await etcd.put(keys.lun(1, 1), LunMapping(target_index=1, lun=1, volume_id="v1").encode())
    for ini in initiators:
        await etcd.put(keys.acl("v1", ini), AclEntry(volume_id="v1", initiator=ini).encode())


async def login_to(vip: tuple[str, int], initiator: str = INIT) -> str:
    """One Normal login to ``TARGET`` at the VIP; the TargetAddress it is redirected to."""
    c = await RawInitiator.connect(*vip)
    try:
        resp, kv = await c.login(initiator, TARGET)
    finally:
        c.close()
    assert resp.status == LoginStatus.TARGET_MOVED_TEMPORARILY
    return kv["TargetAddress"]


class Portal:
    """A chunk server's portal on 127.0.0.1. Its port is held from the start, but connects
    are refused (bound, not listening) until ``listen``; then each one is accepted, counted
    (only the VIP holder's probes connect here) and closed."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.accepted = 0
        self._server: asyncio.Server | None = None

    async def listen(self) -> "Portal":
        async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.accepted += 1
            writer.close()
        self._server = await asyncio.start_server(accept, sock=self.sock)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        else:
            self.sock.close()
