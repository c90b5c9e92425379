"""Unit attentions of a reservation change reach every LU over the shared state.

A volume's read-write and read-only LUs on one chunk server share one reservation state.
A PR OUT posted its attentions only on the LU that received it, and the mirror skips a
server's own changes, so a host reaching the volume through the sibling LU of the same
server was never told (other servers were). Attentions also went to nexuses the LU had
never seen, which only kept other hosts off the write fast path.
"""

from __future__ import annotations

from chunk.blockdev import MemoryBlockDevice
from chunk.scsi import Nexus

from .scsi.helpers import H1, H2, TUR, check, good, make_lu, run
from .test_shared_reservations import CLEAR, REGISTER, out, stores, until  # noqa: F401 - fixture

H3 = Nexus("iqn.2004-10.com.example:h3,i,0x23d000000003", "iqn.2026-01.io.zstore:c.t0000,t,0x0001", 1)
UNIT_ATTENTION, RESERVATIONS_PREEMPTED = 0x06, (0x2A, 0x03)


async def test_a_clear_reaches_the_sibling_lu_on_the_same_server(stores):
    a, b = await stores("chunk-a"), await stores("chunk-b")
    st = a.state("vol")
    lu_rw = make_lu(MemoryBlockDevice(1 << 20), reservations=st)
    lu_ro = make_lu(MemoryBlockDevice(1 << 20, readonly=True), reservations=st)
    lu_b = make_lu(reservations=b.state("vol"))
    good(await out(lu_rw, H1, REGISTER, 0, 0x11))
    good(await out(lu_ro, H2, REGISTER, 0, 0x22))          # H2 reaches the volume read-only
    good(await out(lu_b, H3, REGISTER, 0, 0x33))
    good(await out(lu_rw, H1, CLEAR, 0x11))
    check(await run(lu_ro, TUR, nexus=H2), UNIT_ATTENTION, *RESERVATIONS_PREEMPTED)
    good(await run(lu_ro, TUR, nexus=H2))                   # once
    await until(lambda: H3 in lu_b._ua, "b to post H3's attention")   # noqa: SLF001
    check(await run(lu_b, TUR, nexus=H3), UNIT_ATTENTION, *RESERVATIONS_PREEMPTED)
    # H2 and H3 never came through the read-write LU: nothing is queued for them there
    assert lu_rw._ua == {}                                  # noqa: SLF001


async def test_no_attention_is_queued_for_a_nexus_the_lu_never_saw(stores):
    a = await stores("chunk-a")
    lu, other = make_lu(reservations=a.state("vol")), make_lu(reservations=a.state("vol"))
    good(await out(other, H2, REGISTER, 0, 0x22))
    good(await out(lu, H1, REGISTER, 0, 0x11))
    good(await out(lu, H1, CLEAR, 0x11))
    assert lu._ua == {}                                     # noqa: SLF001 - H2 never came here
    check(await run(other, TUR, nexus=H2), UNIT_ATTENTION, *RESERVATIONS_PREEMPTED)


async def test_a_single_server_lu_posts_only_to_nexuses_it_saw():
    lu = make_lu()
    good(await out(lu, H2, REGISTER, 0, 0x22))
    lu.nexus_lost(H2)                                       # H2 logs out; its registration stays
    good(await out(lu, H1, REGISTER, 0, 0x11))
    good(await out(lu, H1, CLEAR, 0x11))
    assert lu._ua == {}                                     # noqa: SLF001
