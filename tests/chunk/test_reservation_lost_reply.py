"""A restricting reservation change whose etcd reply was lost (chunk/shared_reservations.py).

The compare-and-swap reached etcd and was applied, but its reply did not come back (a
timeout, etcd unavailable): the command ended ABORTED COMMAND and the initiator retried.
The retry found its own change already in the record, a no-op, and answered GOOD at once,
before the other live chunk servers had applied (acknowledged) it: a host fenced off by
the reservation could still write through another server. The retry must wait for the
acknowledgements exactly as after a fresh change.
"""

from __future__ import annotations

import asyncio

import pytest
from aetcd import exceptions as aetcd_exc

import chunk.shared_reservations as sr
from chunk.scsi.sense import ABORTED_COMMAND
from chunk.shared_reservations import ReservationStore
from tests.cluster import async_wait_for
from zstore.keys import Keys

from .scsi.helpers import H1, check, good, make_lu, prout, prout_params, run

K1 = 0x1111
REGISTER, RESERVE = 0, 1
WE = 1
RESERVE6 = bytes((0x16,)) + bytes(5)


@pytest.fixture
async def store_a(etcd_client, etcd_config, monkeypatch):
    """Server a, its store running; chunk-b live (its key exists) but running no store, so
    it acknowledges only when the test says so."""
    monkeypatch.setattr(sr, "CONFIRM_WAIT", 30.0)
    keys = Keys(etcd_config.prefix)
    for c in ("chunk-a", "chunk-b"):
        await etcd_client.put(keys.chunk_live(c), b"{}")
    stop = asyncio.Event()
    a = ReservationStore(etcd_client, keys, "chunk-a")
    a.start(stop)
    await asyncio.wait_for(a.synced.wait(), 10)
    yield a, keys
    stop.set()
    await a.close()


def lose_next_reply(store: ReservationStore) -> list[int]:
    """The next swap is applied in etcd, then fails as if its reply timed out."""
    real = store.swap
    applied: list[int] = []

    async def swap(key, revision, rec):
        if applied:
            return await real(key, revision, rec)
        stored = await real(key, revision, rec)
        assert stored
        applied.append(stored)
        raise aetcd_exc.ConnectionTimeoutError("deadline exceeded")
    store.swap = swap
    return applied


def spy_confirmed(store: ReservationStore) -> list[int]:
    real = store.confirmed
    asked: list[int] = []

    async def confirmed(key, revision, wait=None):
        asked.append(revision)
        await real(key, revision, wait)
    store.confirmed = confirmed
    return asked


def spy_waiting(store: ReservationStore) -> list[tuple[int, set[str]]]:
    """Each check ``confirmed`` makes in its wait loop: (revision, servers still missing)."""
    real = store._unacknowledged                # noqa: SLF001 - observed, not replaced
    seen: list[tuple[int, set[str]]] = []

    async def unacknowledged(parts, revision):
        missing = await real(parts, revision)
        seen.append((revision, set(missing)))
        return missing
    store._unacknowledged = unacknowledged      # noqa: SLF001
    return seen


async def wait_until_waiting_for_b(seen: list[tuple[int, set[str]]], revision: int | None,
                                   command: asyncio.Future) -> None:
    """Until the command is provably inside ``confirmed``'s wait loop: it checked etcd twice
    and found chunk-b's acknowledgement of ``revision`` (any, if None) missing both times,
    so it went on waiting after the first. An answer given without waiting ends the command
    instead, and the caller's ``not done`` check fails."""
    def waiting() -> bool:
        return sum(m == {"chunk-b"} and revision in (None, r) for r, m in seen) >= 2
    await async_wait_for(lambda: command.done() or waiting(),
                         5, "the command to wait for chunk-b's acknowledgement", interval=0.01)


async def check_retry_waits(a: ReservationStore, keys: Keys, etcd_client, lu, command) -> None:
    applied = lose_next_reply(a)
    asked = spy_confirmed(a)
    r = await asyncio.wait_for(command(), 10)
    check(r, ABORTED_COMMAND, 0)                    # the outcome was unknown
    assert applied, "the swap was applied in etcd"

    seen = spy_waiting(a)
    retry = asyncio.ensure_future(command())        # the initiator retries
    try:
        await wait_until_waiting_for_b(seen, applied[0], retry)
        # No further wait needed: confirmed() returns only once no server is missing, or at
        # its deadline (CONFIRM_WAIT, 30 s here); it has just found chunk-b missing, and
        # chunk-b's acknowledgement is written only below.
        assert not retry.done(), "GOOD before chunk-b applied the change"
        assert asked == [applied[0]]
        await etcd_client.put(keys.reservation_ack("vol", 0, "chunk-b"), str(applied[0]).encode())
        good(await asyncio.wait_for(retry, 5))
    finally:
        retry.cancel()
        await asyncio.gather(retry, return_exceptions=True)


async def test_a_reserve6_retried_after_a_lost_reply_waits_for_the_other_servers(
        store_a, etcd_client):
    a, keys = store_a
    lu = make_lu(reservations=a.state("vol"))
    await check_retry_waits(a, keys, etcd_client, lu, lambda: run(lu, RESERVE6, nexus=H1))


async def test_a_pr_reserve_retried_after_a_lost_reply_waits_for_the_other_servers(
        store_a, etcd_client):
    a, keys = store_a
    lu = make_lu(reservations=a.state("vol"))
    good(await run(lu, prout(REGISTER), prout_params(0, K1), nexus=H1))    # adds: no wait
    await check_retry_waits(a, keys, etcd_client, lu,
                            lambda: run(lu, prout(RESERVE, WE), prout_params(K1), nexus=H1))


async def test_a_settled_change_is_not_waited_for_again(store_a, etcd_client):
    """Once a change was confirmed, a no-op repeat (the holder reserving again) answers at
    once: the wait is not paid twice."""
    a, keys = store_a
    lu = make_lu(reservations=a.state("vol"))
    seen = spy_waiting(a)
    reserve = asyncio.ensure_future(run(lu, RESERVE6, nexus=H1))
    try:
        await wait_until_waiting_for_b(seen, None, reserve)
        # as above: inside the wait loop, chunk-b missing, so no answer until the ack below
        assert not reserve.done(), "GOOD before chunk-b applied the change"
        got = await etcd_client.get(keys.reservation("vol"))
        await etcd_client.put(keys.reservation_ack("vol", 0, "chunk-b"), str(got.mod_revision).encode())
        good(await asyncio.wait_for(reserve, 5))
    finally:
        reserve.cancel()
        await asyncio.gather(reserve, return_exceptions=True)
    await etcd_client.delete(keys.reservation_ack("vol", 0, "chunk-b"))     # would not ack again
    asked = spy_confirmed(a)
    good(await asyncio.wait_for(run(lu, RESERVE6, nexus=H1), 2))
    assert asked == []
