"""A watch whose creation timed out and was answered late must not become the next watch.

aetcd hands a "created" answer to whichever create is pending: etcd restarting answered
one section's create after its timeout, the next section's create got that watch (the
other prefix) and never its own, and looked open. A scripted Watch stream shows it (a
real etcd cannot be made to answer late on cue); the end-to-end case, an etcd restart
under the export catalog, is tests/chunk/test_catalog_staleness.py.
"""

from __future__ import annotations

import asyncio

import aetcd.watcher
import pytest
from aetcd import exceptions as aetcd_exc
from aetcd import rpc

from zstore import etcd as zetcd


class ScriptedStub:
    """A Watch stream whose answers the test sends; ids as etcd gives them (the asked-for
    one, else its own counter)."""

    def __init__(self):
        self.requests: list = []
        self.answers: asyncio.Queue = asyncio.Queue()
        self._auto = 100

    def id_for(self, req) -> int:
        if req.create_request.watch_id:
            return req.create_request.watch_id
        self._auto += 1
        return self._auto

    def Watch(self, requests, metadata=None):  # noqa: N802 - gRPC's name
        async def stream():
            async def pump():
                async for r in requests:
                    self.requests.append((r, self.id_for(r)))
            pumping = asyncio.ensure_future(pump())
            try:
                while True:
                    yield await self.answers.get()
            finally:
                pumping.cancel()
        return stream()


async def test_a_late_created_answer_is_cancelled_not_given_to_the_next_watch():
    stub = ScriptedStub()
    watcher_cls = getattr(zetcd, "_Watcher", aetcd.watcher.Watcher)
    w = watcher_cls(stub, timeout=0.2)
    got: list = []

    async def on_b(event):
        got.append(event)

    with pytest.raises(aetcd_exc.WatchTimeoutError):
        await w.add_callback(b"/a/", lambda e: None, range_end=b"/a0")
    creating_b = asyncio.ensure_future(w.add_callback(b"/b/", on_b, range_end=b"/b0"))
    for _ in range(100):
        if len(stub.requests) == 2:
            break
        await asyncio.sleep(0.01)
    (req_a, id_a), (req_b, id_b) = stub.requests
    assert req_b.create_request.key == b"/b/"
    await stub.answers.put(rpc.WatchResponse(created=True, watch_id=id_a))      # late: A's
    await stub.answers.put(rpc.WatchResponse(created=True, watch_id=id_b))
    b = await asyncio.wait_for(creating_b, 2)
    assert b.watch_id == id_b
    # an event on A's watch is not B's; one on B's is
    await stub.answers.put(rpc.WatchResponse(watch_id=id_a, events=[rpc.Event(kv=rpc.KeyValue(key=b"/a/x"))]))
    await stub.answers.put(rpc.WatchResponse(watch_id=id_b, events=[rpc.Event(kv=rpc.KeyValue(key=b"/b/y"))]))
    for _ in range(100):
        if got:
            break
        await asyncio.sleep(0.01)
    assert [e.kv.key for e in got] == [b"/b/y"]
    # A's stray watch was cancelled on the stream
    for _ in range(100):
        if any(r.HasField("cancel_request") for r, _ in stub.requests):
            break
        await asyncio.sleep(0.01)
    assert [r.cancel_request.watch_id for r, _ in stub.requests if r.HasField("cancel_request")] == [id_a]
    await w.shutdown()
