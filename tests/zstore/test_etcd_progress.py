"""Watch progress requests (zstore/etcd.py) against a real etcd.

aetcd can neither ask for a watch's progress nor pass etcd's answer on. A caller that must
know its watch still delivers (chunk/catalog.py) asks etcd for its revision on the watch
stream: a watch created with ``progress_notify`` gets the answer as a ``Progress`` marker,
in order with its events; a stalled stream cannot answer. Watches that did not ask for
progress still see events only (the redirector and meta iterate aetcd watches directly).
"""

from __future__ import annotations

import asyncio

import pytest

from zstore import etcd as zetcd

TIMEOUT = 5.0


async def _next(items: asyncio.Queue):
    return await asyncio.wait_for(items.get(), TIMEOUT)


def _collect(watch) -> tuple[asyncio.Queue, asyncio.Task]:
    items: asyncio.Queue = asyncio.Queue()

    async def pump():
        async for item in watch:
            await items.put(item)
    return items, asyncio.ensure_future(pump())


async def _stop(task: asyncio.Task, watch) -> None:
    await watch.cancel()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_progress_request_reports_a_revision_at_or_past_a_write_made_before(
        etcd_client, etcd_config):
    prefix = etcd_config.prefix.encode() + b"/progress/"
    watch = await etcd_client.watch_prefix(prefix, progress_notify=True)
    items, task = _collect(watch)
    try:
        written = (await etcd_client.put(prefix + b"k", b"v")).header.revision
        await etcd_client.request_progress()
        seen = [await _next(items), await _next(items)]
        # (etcd 3.4.23 may answer just ahead of an event it has queued: order not asserted)
        events = [x for x in seen if not isinstance(x, zetcd.Progress)]
        marks = [x for x in seen if isinstance(x, zetcd.Progress)]
        assert [e.kv.key for e in events] == [prefix + b"k"]
        assert len(marks) == 1 and marks[0].revision >= written
        assert marks[0].revision == await etcd_client.revision(prefix)   # nothing written since
    finally:
        await _stop(task, watch)


async def test_a_watch_that_did_not_ask_for_progress_sees_events_only(etcd_client, etcd_config):
    prefix = etcd_config.prefix.encode() + b"/plain/"
    taker = await etcd_client.watch_prefix(prefix, progress_notify=True)
    plain = await etcd_client.watch_prefix(prefix)
    taken, t1 = _collect(taker)
    plain_items, t2 = _collect(plain)
    try:
        await etcd_client.request_progress()
        assert isinstance(await _next(taken), zetcd.Progress)   # etcd answered on the stream
        await etcd_client.put(prefix + b"after", b"v")
        first = await _next(plain_items)
        assert not isinstance(first, zetcd.Progress) and first.kv.key == prefix + b"after"
    finally:
        await _stop(t1, taker)
        await _stop(t2, plain)


async def test_watch_prefix_hands_progress_to_on_progress(etcd_client, etcd_config):
    prefix = etcd_config.prefix.encode() + b"/mirror/"
    stop = asyncio.Event()
    opened = asyncio.Event()
    marks: asyncio.Queue = asyncio.Queue()
    events: list = []

    async def on_snapshot(kvs):
        pass

    async def on_event(ev):
        events.append(ev.kv.key)

    async def on_progress(revision):
        await marks.put(revision)

    def on_status(ok):
        if ok:
            opened.set()
    task = asyncio.ensure_future(zetcd.watch_prefix(etcd_client, prefix, on_snapshot, on_event,
                                                    stop, on_status=on_status,
                                                    on_progress=on_progress))
    try:
        await asyncio.wait_for(opened.wait(), TIMEOUT)
        written = (await etcd_client.put(prefix + b"k", b"v")).header.revision
        await etcd_client.request_progress()
        assert await _next(marks) >= written
        deadline = asyncio.get_running_loop().time() + TIMEOUT
        while not events and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert events == [prefix + b"k"]
    finally:
        stop.set()
        await asyncio.wait_for(task, TIMEOUT)


async def test_progress_requests_do_not_pile_up_in_the_shared_request_queue():
    """aetcd's request queue is small and shared; a watch cancel waits for room in it while
    holding the watcher's lock. Probes on a stalled stream (nothing taken from the queue)
    must not fill it: a request goes only into an empty queue, else EtcdUnavailable."""
    w = zetcd._Watcher.__new__(zetcd._Watcher)          # a stream that takes nothing
    w._request_handler = object()                        # noqa: SLF001
    w._request_queue = asyncio.Queue(maxsize=10)         # noqa: SLF001 - aetcd's size
    w.request_progress()
    for _ in range(20):                                  # a probe every round, stalled
        with pytest.raises(zetcd.EtcdUnavailable):
            w.request_progress()
    assert w._request_queue.qsize() == 1                 # noqa: SLF001 - room for a cancel
