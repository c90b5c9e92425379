"""Audit 16: ops the replica server admits at one moment and carry out later (from a task,
after a sync) must not act for an owner a newer one fenced in between.

Real sockets and a real ReplicaStore in tmp_path, frames sent raw (peer_auth + wire)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from chunk.storage import wire
from chunk.storage.extent_file import BLOCK_SIZE
from chunk.storage.wire import Frame, FrameReader, Op, Status
from tests.chunk.storage.raw_peer import authed_raw, replica_server
from tests.chunk.storage.worker_syncs import hold_syncs, replica_fds

pytestmark = pytest.mark.timeout(60)

VID = "vol-1"


@pytest.fixture
async def served(tmp_path: Path):
    async with replica_server(tmp_path, auth_timeout=2.0) as (server, store):
        yield server, store


async def _replies(reader: FrameReader, n: int) -> dict[int, Frame]:
    out = {}
    for _ in range(n):
        f = await asyncio.wait_for(reader.read(), 10)
        assert f is not None
        out[f.id] = f
    return out


async def test_audit16_revert_admitted_then_fenced_before_its_task_runs_changes_nothing(served):
    """REVERT is admitted in ``_execute`` but runs from a task, a loop turn later: a newer
    owner's WRITE served in between (here the next frame of the same segment) fenced it, yet
    its first run reverted the new owner's acknowledged write (``revert_async`` admits the
    epoch again only between runs, not before the first)."""
    server, store = served
    store.create(VID, 0, 1)
    store.admit(VID, 0, 1)
    store.write(VID, 0, 0, b"1" * BLOCK_SIZE, seq=1)
    reader, writer = await authed_raw(server)
    try:
        burst = (wire.encode(Frame(Op.REVERT, 10, VID, 0, 1, 1, seq=3, args={"to": 1}))
                 + wire.encode(Frame(Op.WRITE, 11, VID, 0, 2, 1, BLOCK_SIZE, BLOCK_SIZE,
                                     b"N" * BLOCK_SIZE, seq=2)))
        writer._writer.write(burst)
        got = await _replies(reader, 2)
        assert got[11].status is Status.OK                  # the new owner's write: acknowledged
        assert got[10].status is Status.STALE_EPOCH, got[10]
        assert store.read(VID, 0, BLOCK_SIZE, BLOCK_SIZE)[0] == b"N" * BLOCK_SIZE
    finally:
        await writer.close()


async def test_audit16_setgen_fenced_during_its_flush_records_no_generation(served, monkeypatch):
    """SETGEN is admitted, flushes in a worker thread, then writes the generation into the
    header: a newer owner admitted during that flush fenced the SETGEN's owner, whose
    generation was recorded (and answered OK) all the same."""
    server, store = served
    store.create(VID, 0, 1)
    store.admit(VID, 0, 1)
    store.write(VID, 0, 0, b"d" * BLOCK_SIZE, 1)
    reached, proceed, _ = hold_syncs(monkeypatch, replica_fds(store, VID, 0))
    reader, writer = await authed_raw(server)
    try:
        await writer.send(Frame(Op.SETGEN, 20, VID, 0, 1, 7))
        assert await asyncio.to_thread(reached.wait, 10)
        await writer.send(Frame(Op.WRITE, 21, VID, 0, 2, 1, BLOCK_SIZE, BLOCK_SIZE,
                                b"N" * BLOCK_SIZE, seq=2))
        first = await asyncio.wait_for(reader.read(), 10)
        assert first.id == 21 and first.status is Status.OK
        proceed.set()
        last = await asyncio.wait_for(reader.read(), 10)
        assert last.id == 20
        assert last.status is Status.STALE_EPOCH, last
        assert store.stat(VID, 0)["generation"] == 1
    finally:
        proceed.set()
        await writer.close()
