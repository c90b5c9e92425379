"""An SPC-2 RESERVE(6) does not outlive the chunk server session that holds it.

SPC-2 releases a RESERVE(6) on I_T nexus loss and on power-on. The shared record kept the
holder as a bare nexus, released only by ``nexus_lost`` on the server holding the session:
after that server crashed or restarted, every other host got RESERVATION CONFLICT until a
LOGICAL UNIT RESET. The record now names the serving chunk server (``spc2_chunk``): a
restarted server releases the holders naming itself, the others those of a server whose
live key is gone.
"""

from __future__ import annotations

import json

import pytest

from chunk.scsi import Nexus
from zstore.keys import Keys
from zstore.records import ReservationRecord

from .scsi.helpers import H1, H2, TUR, good, make_lu, run, write10
from .test_shared_reservations import RESERVE6, closed, live, stores, until  # noqa: F401 - fixture

# Each wait below is bounded (``until``, ``stores``, ``closed``, etcd calls by the client's
# timeout); this is the backstop for one that is not: a hang fails in a minute, not 300 s.
pytestmark = pytest.mark.timeout(45)

H3 = Nexus("iqn.2004-10.com.example:h3,i,0x23d000000003", "iqn.2026-01.io.zstore:c.t0000,t,0x0001", 1)


async def free_for(lu, n) -> bool:
    """``n`` is not locked out: TEST UNIT READY and a WRITE both pass."""
    return (await run(lu, TUR, nexus=n)).status == 0 and \
        (await run(lu, write10(0, 1), bytes(512), nexus=n)).status == 0


async def record(etcd_client, etcd_config) -> ReservationRecord:
    raw = await etcd_client.get(Keys(etcd_config.prefix).reservation("vol"))
    return ReservationRecord.decode(raw.value)


async def test_a_restarted_server_releases_the_reservation_its_old_session_held(
        stores, etcd_client, etcd_config):
    # Both up, and a back within its lease TTL (its live key stays): only the restart counts.
    await live(etcd_client, etcd_config, "chunk-a", "chunk-b")
    a, b = await stores("chunk-a"), await stores("chunk-b")
    lu, lu_b = make_lu(reservations=a.state("vol")), make_lu(reservations=b.state("vol"))
    good(await run(lu, RESERVE6, nexus=H1))
    await until(lambda: lu_b.reservations.spc2 == H1, "b to mirror the reservation")
    await closed(a)                                  # a crashes: no nexus_lost runs
    a2 = await stores("chunk-a")                     # a restarted (same id, new process)
    lu_a2 = make_lu(reservations=a2.state("vol"))
    await until(lambda: lu_a2.reservations.spc2 is None and lu_b.reservations.spc2 is None,
                "the restarted server to release its old session's reservation")
    assert await free_for(lu_a2, H2) and await free_for(lu_b, H2)
    assert (await record(etcd_client, etcd_config)).spc2 is None


async def test_a_reservation_taken_after_the_restart_is_kept(stores, etcd_client, etcd_config):
    await live(etcd_client, etcd_config, "chunk-a", "chunk-b")
    a, b = await stores("chunk-a"), await stores("chunk-b")
    lu, lu_b = make_lu(reservations=a.state("vol")), make_lu(reservations=b.state("vol"))
    good(await run(lu, RESERVE6, nexus=H1))
    a._sweep(own=True)                               # a sweep again must spare this process's own
    assert (await record(etcd_client, etcd_config)).spc2_chunk == "chunk-a"
    await until(lambda: lu_b.reservations.spc2 == H1, "b to mirror the reservation")
    assert not await free_for(lu_b, H2)
    assert (await record(etcd_client, etcd_config)).spc2 == list(H1)


async def test_the_others_release_the_reservation_of_a_server_whose_live_key_is_gone(
        stores, etcd_client, etcd_config):
    await live(etcd_client, etcd_config, "chunk-a", "chunk-b")
    a, b = await stores("chunk-a"), await stores("chunk-b")
    lu_a, lu_b = make_lu(reservations=a.state("vol")), make_lu(reservations=b.state("vol"))
    good(await run(lu_a, RESERVE6, nexus=H1))
    await until(lambda: lu_b.reservations.spc2 == H1, "b to mirror the reservation")
    assert not await free_for(lu_b, H2)
    await closed(a)                                  # a dies and stays down ...
    await etcd_client.delete(Keys(etcd_config.prefix).chunk_live("chunk-a"))   # ... its lease expires
    await until(lambda: lu_b.reservations.spc2 is None, "b to release a's reservation")
    assert await free_for(lu_b, H2)
    assert (await record(etcd_client, etcd_config)).spc2 is None


async def test_a_server_starting_after_the_holder_died_releases_it(stores, etcd_client, etcd_config):
    await live(etcd_client, etcd_config, "chunk-a")
    a = await stores("chunk-a")
    good(await run(make_lu(reservations=a.state("vol")), RESERVE6, nexus=H1))
    await closed(a)
    await etcd_client.delete(Keys(etcd_config.prefix).chunk_live("chunk-a"))
    b = await stores("chunk-b")                      # never saw a's live key go
    lu_b = make_lu(reservations=b.state("vol"))
    await until(lambda: lu_b.reservations.spc2 is None, "b to release the dead server's reservation")
    assert await free_for(lu_b, H2)


async def test_a_live_server_keeps_the_reservation_of_another_live_one(stores, etcd_client, etcd_config):
    await live(etcd_client, etcd_config, "chunk-a", "chunk-b")
    a, b = await stores("chunk-a"), await stores("chunk-b")
    good(await run(make_lu(reservations=a.state("vol")), RESERVE6, nexus=H1))
    await live(etcd_client, etcd_config, "chunk-c")
    await etcd_client.delete(Keys(etcd_config.prefix).chunk_live("chunk-c"))   # someone else goes
    c2 = await stores("chunk-c")                     # and another server starts
    lu_c = make_lu(reservations=c2.state("vol"))
    await until(lambda: lu_c.reservations.spc2 == H1, "c to mirror the reservation")
    assert not await free_for(lu_c, H3)
    assert (await record(etcd_client, etcd_config)).spc2 == list(H1)


async def test_close_lets_a_queued_release_reach_etcd(stores, etcd_client, etcd_config):
    await live(etcd_client, etcd_config, "chunk-a")
    a = await stores("chunk-a")
    lu = make_lu(reservations=a.state("vol"))
    good(await run(lu, RESERVE6, nexus=H1))
    lu.nexus_lost(H1)                                # the session closes as the server stops
    await closed(a)                                  # graceful stop: the release is not cancelled
    assert (await record(etcd_client, etcd_config)).spc2 is None


async def test_a_record_written_before_spc2_chunk_still_reads_and_is_not_released(
        stores, etcd_client, etcd_config):
    key = Keys(etcd_config.prefix).reservation("vol")
    old = {"schema": 1, "generation": 0, "registrations": [], "holder": None, "type": 0,
           "spc2": list(H1), "change": 1, "origin": "chunk-a", "history": [], "confirm": False}
    await etcd_client.put(key, json.dumps(old).encode())
    assert ReservationRecord.decode(json.dumps(old).encode()).spc2_chunk == ""
    b = await stores("chunk-b")                      # no live key anywhere: still unknown holder
    lu_b = make_lu(reservations=b.state("vol"))
    assert lu_b.reservations.spc2 == H1
    assert not await free_for(lu_b, H2)
    lu_b.reset()                                     # a LU reset still releases it
    await until(lambda: lu_b.reservations.spc2 is None, "the reset to release it")
