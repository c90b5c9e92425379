"""The meta leader election against a real etcd, in-process."""

from __future__ import annotations

import asyncio

import pytest

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
        await async_wait_for(lambda: e.is_leader, 10, "leadership")
        first = e.record.epoch
        await etcd_client.delete(keys.leader())

        async def again():
            return e.is_leader and e.record.epoch > first
        await async_wait_for(again, 10, "a step-down and a new election")
        assert changes[:3] == [True, False, True]
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


class _RefreshFailsOnce:
    """The real client, except that one lease refresh times out: a lost etcd session as the
    election loop sees it, while the lease itself lives on in etcd."""

    def __init__(self, client, error: Exception):
        self._client, self.error, self.failed = client, error, False

    def __getattr__(self, name):
        return getattr(self._client, name)

    async def refresh_lease(self, lease_id):
        if not self.failed:
            self.failed = True
            raise self.error
        return await self._client.refresh_lease(lease_id)


@pytest.mark.parametrize("error", [asyncio.TimeoutError("refresh timed out"), RuntimeError("unexpected")])
async def test_a_lost_session_revokes_its_lease_so_the_leader_key_is_freed(etcd_client, etcd_config, error):
    """The loop gave up a session and granted a new lease, but left the old one, and the
    leader key under it, to expire: no meta server could lead for up to a TTL. The old lease
    is revoked now, and leadership comes back at once under the new one: after an etcd
    error, and after anything unexpected."""
    keys = Keys(etcd_config.prefix)
    client = _RefreshFailsOnce(etcd_client, error)
    e = Election(client, keys, "m1", "http://127.0.0.1:1", ttl=30)
    stop = asyncio.Event()
    task = asyncio.create_task(e.run(stop))
    try:
        await async_wait_for(lambda: e.is_leader, 10, "leadership")
        first, old_lease = e.record.epoch, e._lease.id

        async def session_lost():
            return client.failed and not e.is_leader
        await async_wait_for(session_lost, 15, "the refresh to fail")

        async def again():
            return e.is_leader and e.record.epoch > first
        await async_wait_for(again, 10, "a new election well inside the old lease's 30 s TTL")
        info = await etcd_client.get_lease_info(old_lease)
        assert info.TTL == -1, "the old lease still lives"
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
