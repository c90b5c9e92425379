"""A task watching a prefix ends when cancelled, even if the cancel came while its watch was
being created and aetcd lost it (Python 3.11's ``wait_for`` returns the "created" answer
instead of raising when it is already in). ``LostCancel`` makes that order happen every time."""

from __future__ import annotations

import asyncio

from zstore import etcd as zetcd


class LostCancel:
    """The etcd client, whose first watch creation loses a cancel that comes while it is in
    flight, as 3.11's ``wait_for`` does: it goes on, creates the watch and returns it."""

    def __init__(self, etcd) -> None:
        self._etcd = etcd
        self.creating = asyncio.Event()
        self.lost = False
        self.watches: list = []

    def __getattr__(self, name):
        return getattr(self._etcd, name)

    async def watch_prefix(self, prefix: bytes, **kw):
        if not self.lost:
            self.creating.set()
            try:
                await asyncio.sleep(30)          # the create request in flight
            except asyncio.CancelledError:
                self.lost = True                 # the answer was in: the cancel is dropped
        watch = await self._etcd.watch_prefix(prefix, **kw)
        self.watches.append(watch)
        return watch


async def test_a_prefix_watch_cancelled_while_its_watch_is_created_ends(etcd_client):
    etcd = LostCancel(etcd_client)
    events: list = []

    async def on_snapshot(kvs):
        pass

    async def on_event(ev):
        events.append(ev)

    stop = asyncio.Event()                       # never set: the task is stopped by cancel only
    open_ = asyncio.Event()
    witness = None

    def opened(ok: bool) -> None:
        if ok:
            open_.set()
    task = asyncio.ensure_future(zetcd.watch_prefix(etcd, b"lost-cancel/", on_snapshot, on_event, stop))
    try:
        await asyncio.wait_for(etcd.creating.wait(), 10)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=10)
        assert etcd.lost                         # the losing order did happen
        assert task in done, "the watching task outlived its cancel"
        assert task.cancelled()
        # And its watch is gone, not delivering: a second watch, opened after it on the same
        # client, sees the put; by then the first would have had it too.
        seen = asyncio.Event()

        async def on_witness(ev):
            seen.set()

        witness = asyncio.ensure_future(zetcd.watch_prefix(etcd_client, b"lost-cancel/", on_snapshot,
                                                           on_witness, stop, on_status=opened))
        await asyncio.wait_for(open_.wait(), 10)
        await etcd_client.put(b"lost-cancel/k", b"v")
        await asyncio.wait_for(seen.wait(), 10)
        assert events == []
    finally:
        stop.set()
        await asyncio.wait({task}, timeout=5)
        if witness is not None:
            await asyncio.wait({witness}, timeout=5)
