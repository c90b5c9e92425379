"""Reservations shared through etcd by several chunk servers (chunk/shared_reservations.py).

Two ``ReservationStore``s on one real etcd stand for two chunk servers, each with its own
LogicalUnit of one volume, as when the redirector sends two hosts of a shared LUN to
different servers. Before, each server kept reservations in memory: a host registered or
preempted on one server was unknown to the other.
"""

from __future__ import annotations

import asyncio
import inspect
import struct
import uuid

import pytest

from chunk.blockdev import MemoryBlockDevice
from chunk.scsi import Nexus
from chunk.shared_reservations import CLOSE_WAIT, ReservationStore
from tests.cluster import until as poll_until
from zstore.keys import Keys
from zstore.records import ReservationRecord

from .scsi import test_reservations as single
from .scsi.helpers import H1, H2, check, good, make_lu, prin, prout, prout_params, run, write10

K1, K2 = 0x1111, 0x2222
REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT = range(5)
WE = 1
RESERVE6, RELEASE6 = bytes((0x16,)) + bytes(5), bytes((0x17,)) + bytes(5)


@pytest.fixture
async def stores(etcd_client, etcd_config):
    keys = Keys(etcd_config.prefix)
    stop = asyncio.Event()
    made: list[ReservationStore] = []

    async def store(chunk_id: str) -> ReservationStore:
        s = ReservationStore(etcd_client, keys, chunk_id)
        made.append(s)                           # closed even if its first listing never comes
        s.start(stop)
        await asyncio.wait_for(s.synced.wait(), 10)
        return s

    yield store
    stop.set()
    await asyncio.gather(*(closed(s) for s in made))


CLOSE_BOUND = 3 * 2 * CLOSE_WAIT        # close() returns within 2 * CLOSE_WAIT


async def closed(store: ReservationStore) -> None:
    """``store.close()``, failing in seconds instead of hanging if it does not return."""
    try:
        await asyncio.wait_for(store.close(), CLOSE_BOUND)
    except asyncio.TimeoutError:
        raise AssertionError(f"close() of {store.chunk_id} still waiting after {CLOSE_BOUND:.0f} s") from None


async def until(cond, what: str, timeout: float = 10.0) -> None:
    await poll_until(cond, what, timeout, 0.01)


async def out(lu, nexus, sa, key=0, sark=0, rtype=0):
    return await run(lu, prout(sa, rtype), prout_params(key, sark), nexus=nexus)


async def read_keys(lu, n=H2) -> tuple[int, list[int]]:
    d = good(await run(lu, prin(0), nexus=n))
    gen, size = struct.unpack_from(">II", d)
    return gen, [struct.unpack_from(">Q", d, 8 + i)[0] for i in range(0, size, 8)]


async def can_write(lu, n) -> bool:
    return (await run(lu, write10(0, 1), bytes(512), nexus=n)).status == 0


async def reserved_pair(stores, dev=None):
    """LUs of one volume on servers a and b: H1 registered through a, H2 through b, and H1
    holding a WRITE EXCLUSIVE reservation (taken through a)."""
    a, b = await stores("chunk-a"), await stores("chunk-b")
    lu_a, lu_b = make_lu(dev, reservations=a.state("vol")), make_lu(reservations=b.state("vol"))
    good(await out(lu_a, H1, REGISTER, 0, K1))
    good(await out(lu_b, H2, REGISTER, 0, K2))
    good(await out(lu_a, H1, RESERVE, K1, rtype=WE))
    return lu_a, lu_b


async def test_the_single_server_rules_hold_on_the_shared_state(stores, monkeypatch):
    """Every scenario of tests/chunk/scsi/test_reservations.py, each LU over a shared state
    of its own volume: going through etcd changes none of the SPC-4 behaviour."""
    a = await stores("chunk-a")

    def shared_lu(dev=None, **kw):
        return make_lu(dev, reservations=a.state(str(uuid.uuid4())), **kw)

    monkeypatch.setattr(single, "make_lu", shared_lu)
    scenarios = [f for name, f in inspect.getmembers(single, inspect.iscoroutinefunction)
                 if name.startswith("test_")]
    assert len(scenarios) >= 10
    for scenario in scenarios:
        marks = [m for m in getattr(scenario, "pytestmark", []) if m.name == "parametrize"]
        if not marks:
            await scenario()
            continue
        (names, values), = (m.args for m in marks)          # one parametrize, as there
        for value in values:
            await scenario(**dict(zip([n.strip() for n in names.split(",")],
                                      value if "," in names else (value,))))


async def test_a_registration_made_through_one_server_is_seen_through_another(stores):
    a, b = await stores("chunk-a"), await stores("chunk-b")
    lu_a, lu_b = make_lu(reservations=a.state("vol")), make_lu(reservations=b.state("vol"))
    good(await out(lu_a, H1, REGISTER, 0, K1))
    assert await read_keys(lu_b) == (1, [K1])            # PR IN reads etcd first
    good(await out(lu_b, H2, REGISTER, 0, K2))
    assert await read_keys(lu_a) == (2, [K1, K2])
    # a wrong key is refused whichever server checks it, and changes nothing
    assert (await out(lu_b, H1, REGISTER, 0x9999, 0x3333)).status == 0x18
    assert await read_keys(lu_a) == (2, [K1, K2])


async def test_a_reservation_taken_on_one_server_fences_writes_through_the_other(stores):
    lu_a, lu_b = await reserved_pair(stores)
    await until(lambda: lu_b.reservations.holder == H1, "server b to see the reservation")
    assert not await can_write(lu_b, H2)                  # RESERVATION CONFLICT on b
    assert await can_write(lu_b, H1)                      # the holder writes through b too


async def test_a_preempt_on_one_server_reaches_the_preempted_host_on_the_other(stores):
    lu_a, lu_b = await reserved_pair(stores)
    # fence_scsi: the surviving host (H2, on server b) preempts H1's key
    good(await out(lu_b, H2, PREEMPT, K2, K1, rtype=WE))
    await until(lambda: lu_a.reservations.holder == H2, "server a to see the preemption")
    # H1, on server a, learns it was preempted and can no longer write there
    check(await run(lu_a, write10(0, 1), bytes(512), nexus=H1), 0x6, 0x2A, 0x05)
    assert not await can_write(lu_a, H1)
    assert await read_keys(lu_a) == (3, [K2])             # RESERVE does not count
    assert await can_write(lu_a, H2)


async def test_concurrent_registrations_on_two_servers_all_land(stores):
    a, b = await stores("chunk-a"), await stores("chunk-b")
    lu_a, lu_b = make_lu(reservations=a.state("vol")), make_lu(reservations=b.state("vol"))
    hosts = [Nexus(f"iqn.2004-10.com.example:h{i},i,0x1", H1.target_port, 1) for i in range(12)]
    results = await asyncio.gather(*(out(lu_a if i % 2 else lu_b, n, REGISTER, 0, 0x100 + i)
                                     for i, n in enumerate(hosts)))
    assert all(r.status == 0 for r in results)
    gen, got = await read_keys(lu_a)
    assert gen == 12 and sorted(got) == [0x100 + i for i in range(12)]


async def test_reservations_survive_a_restart_of_every_server(stores, etcd_client, etcd_config):
    a = await stores("chunk-a")
    lu_a = make_lu(reservations=a.state("vol"))
    good(await out(lu_a, H1, REGISTER, 0, K1))
    good(await out(lu_a, H1, RESERVE, K1, rtype=WE))
    await closed(a)
    c = await stores("chunk-c")                           # a fresh server: mirror from etcd
    lu_c = make_lu(reservations=c.state("vol"))
    assert lu_c.reservations.holder == H1                 # the mirror, before any PR IN
    assert not await can_write(lu_c, H2)
    assert await read_keys(lu_c) == (1, [K1])
    raw = await etcd_client.get(Keys(etcd_config.prefix).reservation("vol"))
    assert ReservationRecord.decode(raw.value).holder == list(H1)


async def test_spc2_reserve_is_shared_and_released_by_nexus_loss_everywhere(stores):
    a, b = await stores("chunk-a"), await stores("chunk-b")
    lu_a, lu_b = make_lu(reservations=a.state("vol")), make_lu(reservations=b.state("vol"))
    good(await run(lu_a, RESERVE6, nexus=H1))
    await until(lambda: lu_b.reservations.spc2 == H1, "server b to see RESERVE(6)")
    assert not await can_write(lu_b, H2)
    lu_a.nexus_lost(H1)                                   # H1's connection to a goes away
    await until(lambda: lu_b.reservations.spc2 is None, "server b to see the release")
    assert await can_write(lu_b, H2)


async def test_a_snapshot_lu_and_the_volume_have_separate_states(stores):
    a = await stores("chunk-a")
    vol, snap = make_lu(reservations=a.state("vol")), make_lu(reservations=a.state("vol", 7))
    good(await out(vol, H1, REGISTER, 0, K1))
    assert await read_keys(snap) == (0, [])
    assert a.state("vol") is vol.reservations             # one state per LU per server


# -- a restricting change holds everywhere before it is answered --------------------------

async def live(etcd_client, etcd_config, *chunk_ids: str) -> None:
    keys = Keys(etcd_config.prefix)
    for c in chunk_ids:
        await etcd_client.put(keys.chunk_live(c), b"{}")


class SlowDevice(MemoryBlockDevice):
    """Writes wait for ``release``: a write admitted and still in flight."""

    def __init__(self, size: int = 1 << 20) -> None:
        super().__init__(size)
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    async def write(self, offset, data, fua=False):
        self.started.set()
        await self.release.wait()
        await super().write(offset, data, fua)


async def test_a_preempt_is_answered_only_once_the_other_server_applied_it(stores, etcd_client, etcd_config):
    """No polling: right after PREEMPT's GOOD on b, the preempted host is refused on a."""
    await live(etcd_client, etcd_config, "chunk-a", "chunk-b")
    lu_a, lu_b = await reserved_pair(stores)
    assert lu_b.reservations.holder == H1                 # RESERVE waited for b's mirror too
    assert not await can_write(lu_b, H2)
    good(await out(lu_b, H2, PREEMPT, K2, K1, rtype=WE))
    r = await run(lu_a, write10(0, 1), bytes(512), nexus=H1)
    assert r.status != 0                                  # at once: UA, then conflict
    assert not await can_write(lu_a, H1)


async def test_a_write_admitted_before_a_preempt_finishes_before_the_preempt_is_answered(
        stores, etcd_client, etcd_config):
    await live(etcd_client, etcd_config, "chunk-a", "chunk-b")
    dev = SlowDevice()
    lu_a, lu_b = await reserved_pair(stores, dev)
    write = asyncio.ensure_future(run(lu_a, write10(0, 1), b"\x11" * 512, nexus=H1))
    await asyncio.wait_for(dev.started.wait(), 5)
    preempt = asyncio.ensure_future(out(lu_b, H2, PREEMPT, K2, K1, rtype=WE))
    await asyncio.sleep(0.3)                              # b stored it; a waits on the write
    assert not preempt.done()                             # a is still running H1's write
    dev.release.set()
    assert (await asyncio.wait_for(write, 5)).status == 0
    good(await asyncio.wait_for(preempt, 5))
    assert not await can_write(lu_a, H1)


async def test_a_silent_live_server_is_waited_for_until_its_lease_goes(stores, etcd_client, etcd_config,
                                                                      monkeypatch):
    import chunk.shared_reservations as sr
    monkeypatch.setattr(sr, "CONFIRM_WAIT", 30.0)
    await live(etcd_client, etcd_config, "chunk-a", "chunk-silent")    # no store runs for it
    a = await stores("chunk-a")
    lu_a = make_lu(reservations=a.state("vol"))
    good(await out(lu_a, H1, REGISTER, 0, K1))            # adds only: nothing to confirm
    reserve = asyncio.ensure_future(out(lu_a, H1, RESERVE, K1, rtype=WE))
    await asyncio.sleep(0.5)
    assert not reserve.done()
    await etcd_client.delete(Keys(etcd_config.prefix).chunk_live("chunk-silent"))   # lease gone
    good(await asyncio.wait_for(reserve, 5))


async def test_a_silent_live_server_is_waited_for_at_most_the_bound(stores, etcd_client, etcd_config,
                                                                   monkeypatch):
    import chunk.shared_reservations as sr
    monkeypatch.setattr(sr, "CONFIRM_WAIT", 0.5)
    await live(etcd_client, etcd_config, "chunk-a", "chunk-silent")
    a = await stores("chunk-a")
    lu_a = make_lu(reservations=a.state("vol"))
    good(await out(lu_a, H1, REGISTER, 0, K1))
    good(await asyncio.wait_for(out(lu_a, H1, RESERVE, K1, rtype=WE), 5))


# -- review findings (session 9) -----------------------------------------------------------

async def test_an_attention_for_a_host_elsewhere_keeps_the_fast_path_for_the_others(stores):
    """A change posts attentions for hosts that may never come to this server; the fast write
    path once declined for every host while any attention was pending on the LU."""
    from .scsi.test_write_nowait import NowaitDevice
    a, b = await stores("chunk-a"), await stores("chunk-b")
    dev = NowaitDevice()
    lu_a, lu_b = make_lu(dev, reservations=a.state("vol")), make_lu(reservations=b.state("vol"))
    good(await run(lu_a, write10(0, 1), bytes(512), nexus=H2))     # H2 is seen on a
    elsewhere = Nexus("iqn.2004-10.com.example:h9,i,0x1", H1.target_port, 1)
    good(await out(lu_b, elsewhere, REGISTER, 0, 0x99))
    good(await out(lu_b, H1, REGISTER, 0, K1))
    good(await out(lu_b, H1, PREEMPT, K1, 0x99, rtype=WE))          # removes h9's registration
    await until(lambda: lu_a.reservations.registrations and
                elsewhere not in lu_a.reservations.registrations, "a to mirror the preempt")
    # h9 was never seen on a: no attention is queued for it there (it gets POWER ON first)
    assert elsewhere not in lu_a._ua                                 # noqa: SLF001
    assert lu_a.write_nowait(write10(0, 1), memoryview(bytes(512)), H2) is not None


async def test_attentions_of_a_change_the_mirror_skipped_are_still_posted(stores):
    a = await stores("chunk-a")
    st = a.state("vol")
    lu = make_lu(reservations=st)
    h3 = Nexus("iqn.2004-10.com.example:h3,i,0x1", H1.target_port, 1)
    for n in (h3, H2):
        good(await run(lu, bytes(6), nexus=n))                       # both known to this LU
    rec = ReservationRecord(change=2, origin="chunk-b", history=[
        [1, "chunk-b", [[list(h3), 0x2A, 0x05]]],
        [2, "chunk-b", [[list(H2), 0x2A, 0x03]]]])
    st.mirror(rec, 10)                    # changes 1 and 2 arrive as one (a relist, a PR IN)
    assert lu._ua.get(h3) == [(0x2A, 0x05)] and lu._ua.get(H2) == [(0x2A, 0x03)]   # noqa: SLF001
    st.mirror(ReservationRecord(change=2, origin="chunk-b", history=rec.history), 11)
    assert lu._ua.get(h3) == [(0x2A, 0x05)]                          # noqa: SLF001 - not twice


async def test_a_restricting_change_seen_only_under_a_later_record_is_paused_and_acknowledged(
        stores, etcd_client, etcd_config):
    """After a relist the newest record can be a plain registration on top of a reservation this
    server never saw: it must still apply it with writes paused and acknowledge it."""
    keys = Keys(etcd_config.prefix)
    a = await stores("chunk-a")
    key = keys.reservation("vol")
    await a._take(key, ReservationRecord(), 5)                       # noqa: SLF001 - held: nothing
    later = ReservationRecord(generation=2, registrations=[[list(H1), K1], [list(H2), K2]],
                              holder=list(H1), type=WE, change=3, origin="chunk-b", confirm=False)
    await a._take(key, later, 9)                                     # noqa: SLF001
    await until(lambda: False if key in a._chains else True, "the update to run")   # noqa: SLF001
    ack = await etcd_client.get(keys.reservation_ack("vol", 0, "chunk-a"))
    assert ack is not None and int(ack.value) == 9


async def test_one_lu_draining_its_writes_holds_up_no_other_lu(stores, etcd_client, etcd_config):
    await live(etcd_client, etcd_config, "chunk-a", "chunk-b")
    a, b = await stores("chunk-a"), await stores("chunk-b")
    slow = SlowDevice()
    lu1_a = make_lu(slow, reservations=a.state("vol1"))
    lu2_a = make_lu(reservations=a.state("vol2"))
    lu1_b, lu2_b = make_lu(reservations=b.state("vol1")), make_lu(reservations=b.state("vol2"))
    for lu_b in (lu1_b, lu2_b):
        good(await out(lu_b, H2, REGISTER, 0, K2))
    write = asyncio.ensure_future(run(lu1_a, write10(0, 1), bytes(512), nexus=H1))
    await asyncio.wait_for(slow.started.wait(), 5)
    reserve1 = asyncio.ensure_future(out(lu1_b, H2, RESERVE, K2, rtype=WE))   # a drains vol1
    await asyncio.sleep(0.2)
    good(await asyncio.wait_for(out(lu2_b, H2, RESERVE, K2, rtype=WE), 5))    # vol2 goes through
    assert lu2_a.reservations.holder == H2 and not reserve1.done()
    slow.release.set()
    assert (await asyncio.wait_for(write, 5)).status == 0
    good(await asyncio.wait_for(reserve1, 5))
