"""ReservationStore.close() ends its watches even when a cancel is lost.

close() only cancelled its watch tasks and then awaited them. A cancel can be lost: Python
3.11's ``asyncio.wait_for``, which aetcd's watch creation waits in, returns the result
instead of raising CancelledError when the awaited reply is already in as the cancel comes.
The watch then went on to watch until the caller's stop event, and close() waited for it
without bound (1 run in ~20 of tests/chunk/test_spc2_power_on.py hung for 300 s in
``a.close()``; a chunk server whose frontend fails to start, its stop event unset, would hang
the same way). ``LostCancel`` makes that losing order happen every time.
"""

from __future__ import annotations

import asyncio

from chunk import shared_reservations
from chunk.shared_reservations import ReservationStore
from zstore.keys import Keys


class LostCancel:
    """The etcd client, whose watch creation on ``prefix`` loses the first cancel that comes
    while it is in flight, as 3.11's ``wait_for`` does when the "created" reply is already in:
    it goes on to create the watch and returns it."""

    def __init__(self, etcd, prefix: bytes) -> None:
        self._etcd, self._prefix = etcd, prefix
        self.creating = asyncio.Event()
        self.lost = False

    def __getattr__(self, name):
        return getattr(self._etcd, name)

    async def watch_prefix(self, prefix: bytes, **kw):
        if prefix == self._prefix and not self.lost:
            self.creating.set()
            try:
                await asyncio.sleep(30)          # the create request in flight
            except asyncio.CancelledError:
                self.lost = True                 # the reply was in: the cancel is dropped
        return await self._etcd.watch_prefix(prefix, **kw)


async def test_close_ends_a_watch_whose_cancel_was_lost(etcd_client, etcd_config):
    keys = Keys(etcd_config.prefix)
    etcd = LostCancel(etcd_client, keys.chunks())
    store = ReservationStore(etcd, keys, "chunk-a")
    stop = asyncio.Event()                           # not set: a stop on error, not on signal
    store.start(stop)
    try:
        await asyncio.wait_for(store.synced.wait(), 10)
        await asyncio.wait_for(etcd.creating.wait(), 10)
        watches = [store._watch, store._live_watch]
        bound = 3 * 2 * shared_reservations.CLOSE_WAIT   # close() promises 2 * CLOSE_WAIT
        try:
            await asyncio.wait_for(store.close(), bound)
        except asyncio.TimeoutError:
            raise AssertionError(f"close() still waiting after {bound:.0f} s") from None
        assert etcd.lost                             # the losing order did happen
        assert all(t.done() for t in watches)        # and the watches ended all the same
    finally:
        stop.set()                                   # ends what an old close() left running
        await asyncio.sleep(0)
