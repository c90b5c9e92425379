"""SYNCHRONIZE CACHE's owner-record reads, coalesced per chunk server (owner_reads.py).

Every flush reads its volume's owner record in etcd, after the command arrived. Before, one
read per flush: N volumes flushing at once sent N reads. Now reads asked while one is in
flight go together in the next one, and an answer always comes from a read begun after it
was asked (a change committed before the ask is seen).
"""

from __future__ import annotations

import asyncio

import pytest

from chunk.storage.owner_reads import OwnerReads
from zstore.keys import Keys
from zstore.records import VolumeOwner


async def _own(etcd, keys: Keys, vid: str, epoch: int) -> None:
    await etcd.put(keys.owner(vid), VolumeOwner(volume_id=vid, chunk_id="c", epoch=epoch).encode())


class _Counting:
    """The etcd client, with its transactions counted and each one slowed to ``delay`` s, or
    held until ``gate`` is set (no timing to lose on a loaded machine)."""

    def __init__(self, etcd, delay: float = 0.05, gate: asyncio.Event | None = None) -> None:
        self._etcd, self.delay, self.gate, self.txns = etcd, delay, gate, 0

    def __getattr__(self, name):
        return getattr(self._etcd, name)

    async def transaction(self, **kw):
        self.txns += 1
        if self.gate is not None:
            await self.gate.wait()
        else:
            await asyncio.sleep(self.delay)
        return await self._etcd.transaction(**kw)


async def test_many_volumes_flushing_at_once_share_reads(etcd_client, etcd_config):
    keys = Keys(etcd_config.prefix)
    for i in range(100):
        await _own(etcd_client, keys, f"v{i}", i + 1)
    etcd = _Counting(etcd_client)
    reads = OwnerReads(etcd, keys, batch=64)
    got = await asyncio.gather(*(reads.epoch(f"v{i}") for i in range(100)), reads.epoch("none"))
    assert got == [i + 1 for i in range(100)] + [None]
    assert etcd.txns == 2                    # 101 asks: one batch of 64, one of 37 (was: 101)


async def test_an_ask_during_a_read_waits_for_the_next_and_sees_a_change_made_before_it(
        etcd_client, etcd_config):
    keys = Keys(etcd_config.prefix)
    await _own(etcd_client, keys, "v", 1)
    gate = asyncio.Event()
    etcd = _Counting(etcd_client, gate=gate)
    reads = OwnerReads(etcd, keys)
    first = asyncio.ensure_future(reads.epoch("v"))
    while etcd.txns < 1:                     # its read in flight, held before etcd
        await asyncio.sleep(0.01)
    await _own(etcd_client, keys, "v", 2)    # another server took the volume, then...
    second = asyncio.ensure_future(reads.epoch("v"))     # ...a SYNCHRONIZE CACHE arrives
    await asyncio.sleep(0.05)
    assert etcd.txns == 1                    # not sent: a read is in flight
    gate.set()
    assert await second == 2                 # never the in-flight read's answer
    assert etcd.txns == 2
    assert await first in (1, 2)


async def test_an_etcd_error_reaches_every_asker_and_the_next_ask_reads_again(etcd_client, etcd_config):
    keys = Keys(etcd_config.prefix)
    await _own(etcd_client, keys, "v", 7)
    etcd = _Counting(etcd_client)
    reads = OwnerReads(etcd, keys)

    async def failing(**kw):
        etcd.txns += 1
        raise ConnectionError("etcd away")
    etcd.transaction = failing
    results = await asyncio.gather(reads.epoch("v"), reads.epoch("w"), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    del etcd.transaction                     # etcd back
    assert await reads.epoch("v") == 7


async def test_one_asker_cancelled_leaves_the_others_answered(etcd_client, etcd_config):
    keys = Keys(etcd_config.prefix)
    await _own(etcd_client, keys, "v", 3)
    gate = asyncio.Event()
    reads = OwnerReads(_Counting(etcd_client, gate=gate), keys)
    a = asyncio.ensure_future(reads.epoch("v"))
    b = asyncio.ensure_future(reads.epoch("v"))
    await asyncio.sleep(0.02)
    a.cancel()
    gate.set()
    assert await b == 3
    with pytest.raises(asyncio.CancelledError):
        await a


async def test_a_runner_cancelled_before_it_ran_does_not_stop_later_asks(etcd_client, etcd_config):
    """Review: a runner task cancelled before its first step never ran its clean-up, and every
    later ask waited for ever on it."""
    keys = Keys(etcd_config.prefix)
    await _own(etcd_client, keys, "v", 5)
    reads = OwnerReads(etcd_client, keys)
    first = asyncio.ensure_future(reads.epoch("v"))
    await asyncio.sleep(0)                    # the ask queued, its runner created, not run
    reads._runner.cancel()                    # noqa: SLF001 - as a loop teardown would
    with pytest.raises(ConnectionError):
        await first                           # an error to retry (NOT READY), not a hang
    assert await asyncio.wait_for(reads.epoch("v"), 5) == 5


async def test_a_runner_cancelled_mid_read_fails_its_askers_without_cancelling_them(etcd_client, etcd_config):
    keys = Keys(etcd_config.prefix)
    await _own(etcd_client, keys, "v", 5)
    etcd = _Counting(etcd_client, gate=asyncio.Event())           # never set: held
    reads = OwnerReads(etcd, keys)
    ask = asyncio.ensure_future(reads.epoch("v"))
    while etcd.txns < 1:                      # its read in flight
        await asyncio.sleep(0.01)
    reads._runner.cancel()                    # noqa: SLF001
    with pytest.raises(ConnectionError):
        await ask


async def test_fewer_replies_than_gets_leave_no_asker_waiting(etcd_client, etcd_config):
    keys = Keys(etcd_config.prefix)
    etcd = _Counting(etcd_client, delay=0)

    async def short(**kw):
        return True, []                       # a malformed answer: no reply at all
    etcd.transaction = short
    reads = OwnerReads(etcd, keys)
    with pytest.raises(ConnectionError, match="fewer"):
        await asyncio.wait_for(reads.epoch("v"), 5)
