"""The meta leader election against a real etcd, in-process."""

from __future__ import annotations

import asyncio

from meta.election import Election
from tests.cluster import async_wait_for
from zstore.keys import Keys


async def test_a_leader_whose_key_is_taken_away_steps_down_and_stands_again(etcd_client, etcd_config):
    """The leader key deleted behind the leader while its lease lives on: it used to go on
    leading (every write failing its fence) until restarted. It steps down within a third of
    a TTL and, the key being free, is elected again under a new epoch."""
    keys = Keys(etcd_config.prefix)
    changes: list[bool] = []
    e = Election(etcd_client, keys, "m1", "http://127.0.0.1:1", ttl=3, on_change=changes.append)
    stop = asyncio.Event()
    task = asyncio.create_task(e.run(stop))
    try:
        async def leading():
            return e.is_leader
        await async_wait_for(leading, 10, "leadership")
        first = e.record.epoch
        await etcd_client.delete(keys.leader())

        async def again():
            return e.is_leader and e.record.epoch > first
        await async_wait_for(again, 10, "a step-down and a new election")
        assert changes[:3] == [True, False, True]
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
