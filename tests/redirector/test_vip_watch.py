"""Moving the VIP by deleting its record never leaves two holders.

Two VipHolders (each with its own etcd client, as two redirector hosts would have) on the real
etcd, loopback VIP (no address to manage). The holder watches its record, so it stops holding
as soon as etcd reports the delete; a standby (polling every 0.25 s) cannot have won by then.
Before the watch, the old holder noticed only at its next refresh (up to ttl/3 later), and for
that long both held the VIP.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from redirector.vip import VipHolder
from tests.cluster import async_wait_for
from zstore import etcd as zetcd
from zstore.config import RedirectorConfig
from zstore.keys import Keys

pytestmark = pytest.mark.timeout(90)

TRIALS = 4
WATCH = 2.0        # seconds sampled after each delete: longer than a refresh period (ttl/3 = 1 s)


async def _nop(*_args) -> None:
    pass


async def test_deleting_the_vip_record_never_leaves_two_holders(etcd_client, etcd_config):
    keys = Keys(etcd_config.prefix)
    cfg = RedirectorConfig(vip="127.0.0.2", port=3260, interface=None, lease_ttl=3)
    c1, c2 = zetcd.client(etcd_config), zetcd.client(etcd_config)
    h1, h2 = VipHolder(c1, keys, cfg, "r1"), VipHolder(c2, keys, cfg, "r2")
    stop = asyncio.Event()
    t1 = asyncio.ensure_future(h1.run(stop, _nop, _nop))
    tasks = [t1]
    try:
        await async_wait_for(lambda: h1.holding, 10, "r1 holds")
        tasks.append(asyncio.ensure_future(h2.run(stop, _nop, _nop)))
        await async_wait_for(lambda: etcd_client.get(keys.redirector_member("r2")), 10, "r2 campaigns")
        overlaps = []
        for trial in range(TRIALS):
            await async_wait_for(lambda: h1.holding or h2.holding, 10, "a holder")
            # delete at different points of the holder's refresh cycle (every ttl/3 = 1 s)
            await asyncio.sleep(0.2 + trial * 0.27)
            before = 1 if h1.holding else 2
            await etcd_client.delete(keys.vip())
            both, t0 = 0, time.monotonic()
            while time.monotonic() - t0 < WATCH:
                if h1.holding and h2.holding:
                    both += 1
                await asyncio.sleep(0.01)
            overlaps.append((trial, before, both))
        assert all(both == 0 for _, _, both in overlaps), f"(trial, holder, samples with two holders): {overlaps}"
        await async_wait_for(lambda: h1.holding or h2.holding, 10, "a holder after the last move")
        epoch = int((await etcd_client.get(keys.vip_epoch())).value)
        assert epoch == 1 + TRIALS                  # every delete moved it to exactly one new holder
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
        for c in (c1, c2):
            await asyncio.wait_for(c.close(), 5)
    assert not h1.holding and not h2.holding
