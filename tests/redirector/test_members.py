"""Members: live/draining chunk servers and sticky choices, mirrored from a real etcd."""

from __future__ import annotations

import asyncio

import pytest

from redirector import hashing
from redirector.members import Members
from tests.cluster import async_wait_for
from zstore.keys import Keys
from zstore.records import ChunkAdmin, ChunkInfo, ChunkLive, RedirectRecord

pytestmark = pytest.mark.timeout(60)

TARGET = "iqn.2026-01.io.zstore:abcd1234.t0000"
INIT = "iqn.1994-05.com.example:host1"


async def add_chunk(etcd, keys: Keys, cid: str, port: int, live: bool = True) -> None:
    await etcd.put(keys.chunk_info(cid), ChunkInfo(chunk_id=cid, hostname="h", address="127.0.0.1",
                                                   data_port=1, portal=f"127.0.0.1:{port}").encode())
    if live:
        await etcd.put(keys.chunk_live(cid), ChunkLive(chunk_id=cid, pid=1, started=0.0, lease_ttl=5).encode())


@pytest.fixture
async def members(etcd_client, etcd_config):
    keys = Keys(etcd_config.prefix)
    stop = asyncio.Event()
    m = Members(etcd_client, keys)
    await asyncio.wait_for(m.start(stop), 10)
    yield m, etcd_client, keys
    stop.set()
    await m.close()


async def stored(etcd, keys: Keys, target: str = TARGET, initiator: str = INIT) -> RedirectRecord | None:
    v = await etcd.get(keys.redirect(target, initiator))
    return RedirectRecord.decode(v.value) if v else None


async def test_no_chunk_servers_means_none(members):
    m, _, _ = members
    assert m.choose(INIT, TARGET) is None


async def test_hash_pick_is_recorded_and_sticks(members):
    m, etcd, keys = members
    for i, cid in enumerate(("c1", "c2", "c3")):
        await add_chunk(etcd, keys, cid, 4000 + i)
    await async_wait_for(lambda: len(m.usable()) == 3, 10, "3 usable chunk servers")
    want = hashing.pick(INIT, TARGET, ["c1", "c2", "c3"])
    portal = m.choose(INIT, TARGET)
    assert portal == f"127.0.0.1:{4000 + ['c1', 'c2', 'c3'].index(want)}"
    rec = await async_wait_for(lambda: stored(etcd, keys), 10, "the sticky record in etcd")
    assert (rec.target, rec.initiator, rec.chunk_id) == (TARGET, INIT, want)

    # A new chunk server that would win the hash does not move the sticky pair.
    newcomer = next(f"n{i}" for i in range(1000)
                    if hashing.pick(INIT, TARGET, ["c1", "c2", "c3", f"n{i}"]) == f"n{i}")
    await add_chunk(etcd, keys, newcomer, 4999)
    await async_wait_for(lambda: len(m.usable()) == 4, 10, "4 usable chunk servers")
    assert m.choose(INIT, TARGET) == portal


async def test_choice_without_record_is_not_written_or_remembered(members):
    m, etcd, keys = members
    for i, cid in enumerate(("c1", "c2", "c3")):
        await add_chunk(etcd, keys, cid, 4000 + i)
    await async_wait_for(lambda: len(m.usable()) == 3, 10, "3 usable chunk servers")
    assert m.choose("iqn.x:nobody", TARGET, record=False) is not None
    assert m.choose(INIT, TARGET) is not None                    # this one is written...
    await async_wait_for(lambda: stored(etcd, keys), 10, "INIT's record")
    assert (TARGET, "iqn.x:nobody") not in m.redirects            # ...the other never was
    assert await stored(etcd, keys, initiator="iqn.x:nobody") is None


async def test_down_or_draining_sticky_chunk_is_replaced(members):
    m, etcd, keys = members
    for i, cid in enumerate(("c1", "c2", "c3")):
        await add_chunk(etcd, keys, cid, 4000 + i)
    # Sticky record written by an earlier redirector: c2.
    await etcd.put(keys.redirect(TARGET, INIT), RedirectRecord(TARGET, INIT, "c2").encode())
    await async_wait_for(lambda: len(m.usable()) == 3 and (TARGET, INIT) in m.redirects, 10, "mirror")
    assert m.choose(INIT, TARGET) == "127.0.0.1:4001"

    await etcd.put(keys.chunk_admin("c2"), ChunkAdmin(chunk_id="c2", state="draining").encode())
    await async_wait_for(lambda: "c2" not in m.usable(), 10, "c2 draining")
    portal = m.choose(INIT, TARGET)
    want = hashing.pick(INIT, TARGET, ["c1", "c3"])
    assert portal == f"127.0.0.1:{4000 + int(want[1]) - 1}"
    await async_wait_for(lambda: _is(stored(etcd, keys), want), 10, "record rewritten to the new pick")

    # Its live key gone (lease expired): the new pick is down too, the other one takes it.
    await etcd.delete(keys.chunk_live(want))
    other = ({"c1", "c3"} - {want}).pop()
    await async_wait_for(lambda: m.usable() == [other], 10, "only one usable")
    assert m.choose(INIT, TARGET) == f"127.0.0.1:{4000 + int(other[1]) - 1}"

    # Nothing usable: None, and the record is left as it was (a hint, not a lock).
    await etcd.delete(keys.chunk_live(other))
    await async_wait_for(lambda: m.usable() == [], 10, "none usable")
    assert m.choose(INIT, TARGET) is None


async def _is(rec_coro, chunk_id: str) -> bool:
    rec = await rec_coro
    return rec is not None and rec.chunk_id == chunk_id


def test_wildcard_portal_is_reached_at_the_chunk_address():
    from redirector.members import ChunkState

    def state(portal: str, address: str = "10.0.0.7") -> ChunkState:
        return ChunkState("c", info=ChunkInfo(chunk_id="c", hostname="h", address=address, data_port=1,
                                              portal=portal))
    assert state("0.0.0.0:3261").portal == "10.0.0.7:3261"
    assert state("[::]:3261", "fd00::7").portal == "[fd00::7]:3261"
    assert state("10.0.0.8:3261").portal == "10.0.0.8:3261"
    assert state("storage-1.example:3261").portal == "storage-1.example:3261"


async def test_registered_but_not_live_is_not_usable_and_garbage_is_ignored(members):
    m, etcd, keys = members
    await add_chunk(etcd, keys, "c1", 4000, live=False)
    await etcd.put(keys.chunk_live("c2"), b"not json")          # live without info, unreadable
    await etcd.put(keys.redirects() + b"x/y", b"{bad")
    await add_chunk(etcd, keys, "c3", 4002)
    await async_wait_for(lambda: m.usable() == ["c3"], 10, "only c3 usable")
    assert m.choose(INIT, TARGET) == "127.0.0.1:4002"
