"""An ACL or mapping change applies to a command that was waiting when it came.

A write with InitialR2T=Yes waits for its Data-Out as long as the initiator likes (NOP
pings keep the session alive), and a command may wait for its CmdSN turn. Its LUN was
resolved when it arrived; when it starts it must still be allowed: a write whose ACL
entry was removed meanwhile is answered LOGICAL UNIT NOT SUPPORTED, one whose entry
became read-only WRITE PROTECTED, and nothing of it is stored. The other LUs of the
session are not disturbed. Raw sessions on loopback through the real target
(``IscsiTarget``, ``SessionView``) over a catalog the tests change, and real LUs.
"""

from __future__ import annotations

import struct
from types import SimpleNamespace
from typing import NamedTuple

import pytest

from chunk.blockdev import MemoryBlockDevice
from chunk.iscsi import pdu as P
from chunk.iscsi.target import IscsiTarget, TargetConfig
from chunk.scsi import LogicalUnit, LunIdentity
from tests.chunk.iscsi.raw_initiator import TUR, Initiator
from tests.chunk.iscsi.test_session import Harness, Resolver, params, until
from tests.chunk.iscsi.test_session import read10 as read10_pdu
from tests.chunk.iscsi.test_session import write10 as write10_pdu
from tests.cluster import free_port

TARGET = "iqn.2026-01.io.zstore:test.t0000"
HOST = "iqn.2004-10.com.example:h1"
ISID = bytes.fromhex("80aabbcc0001")

LUN_NOT_SUPPORTED = (0x05, 0x25, 0x00)
WRITE_PROTECTED = (0x07, 0x27, 0x00)
LUNS_CHANGED = (0x06, 0x3F, 0x0E)


def wwn(n: int) -> str:
    return "6" + "5a5354" + f"{n:025x}"


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0).ljust(16, b"\0")


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0).ljust(16, b"\0")


class Export(NamedTuple):
    """What a LUN resolves to (a ``LunExport`` in the real catalog)."""
    key: str                 # which LU: "vol-1:rw", "vol-1:ro", ...

    @property
    def export_id(self) -> str:
        return self.key.split(":")[0]


class Catalog:
    """The export catalog as the target reads it: LUN access per (initiator, LUN), changed by
    the test as an etcd watch would (generation bumped, listeners told)."""

    synced = True
    stale = False

    def __init__(self, access: dict[int, str]):
        self.access = dict(access)            # LUN -> unit key, for HOST
        self.generation = 1
        self._listeners = []

    def on_change(self, fn) -> None:
        self._listeners.append(fn)

    def set(self, lun: int, key: str | None) -> None:
        if key is None:
            self.access.pop(lun, None)
        else:
            self.access[lun] = key
        self.generation += 1
        for fn in self._listeners:
            fn("acl")

    def target(self, iqn):
        return object() if iqn == TARGET else None

    def chap_for(self, target, initiator):
        return None

    def lun_access(self, target, initiator, lun):
        key = self.access.get(lun) if initiator == HOST and target == TARGET else None
        return None if key is None else Export(key)

    def visible_luns(self, target, initiator):
        if initiator != HOST or target != TARGET:
            return {}
        return {lun: Export(key) for lun, key in self.access.items()}

    def visible_targets(self, initiator):
        return [TARGET]


class Served:
    """Volume 1 (read-write and read-only LUs over the same blocks) and volume 2, behind a
    target whose catalog maps LUN 1 -> vol-1 and LUN 2 -> vol-2 for HOST."""

    def __init__(self):
        self.dev1 = MemoryBlockDevice(1 << 20)
        self.dev1_ro = MemoryBlockDevice(1 << 20, readonly=True)
        self.dev1_ro.buf = self.dev1.buf                  # the same volume, viewed read-only
        self.dev2 = MemoryBlockDevice(1 << 20)
        self.units = {
            "vol-1:rw": LogicalUnit(self.dev1, LunIdentity(wwn=wwn(1), serial="vol-1", lun=1)),
            "vol-1:ro": LogicalUnit(self.dev1_ro, LunIdentity(wwn=wwn(1), serial="vol-1", lun=1)),
            "vol-2:rw": LogicalUnit(self.dev2, LunIdentity(wwn=wwn(2), serial="vol-2", lun=2)),
        }
        self.catalog = Catalog({1: "vol-1:rw", 2: "vol-2:rw"})
        self.port = free_port()
        self.target = IscsiTarget(TargetConfig(port=self.port, nop_interval=3600, nop_timeout=3600),
                                  self.catalog, open_device=None)
        self.target.units = SimpleNamespace(get=lambda ex: self.units[ex.key],
                                            opened=lambda ex: self.units.get(ex.key), close=lambda: None)

    def session(self):
        return next(iter(self.target.sessions.values()))


@pytest.fixture
async def served():
    s = Served()
    await s.target.start()
    try:
        yield s
    finally:
        await s.target.stop()


async def login(port: int) -> Initiator:
    return await Initiator.connect(port, TARGET, HOST, ISID, keys=(("InitialR2T", "Yes"),))


async def prearm(a: Initiator, lun: int, lba: int, blocks: int) -> tuple[int, P.R2T]:
    """A WRITE whose data is held back: the target has solicited it (R2T)."""
    itt = a.send(lun, write10(lba, blocks), edtl=blocks * 512)
    r2t = await a.pdu()
    assert isinstance(r2t, P.R2T) and r2t.itt == itt and r2t.desired_length == blocks * 512, r2t
    return itt, r2t


async def test_a_write_whose_acl_entry_is_removed_before_its_data_comes_is_refused(served: Served):
    s = served
    a = await login(s.port)
    await a.ready(1)
    await a.ready(2)
    itt, r2t = await prearm(a, 1, 0, 8)
    other, r2t2 = await prearm(a, 2, 0, 8)             # another LU of the same session
    s.catalog.set(1, None)                             # the admin removes the ACL entry
    assert await a.command(1, read10(0, 1), read=512) == (2, LUN_NOT_SUPPORTED)
    a.data_out(r2t, b"X" * 4096)                       # the withheld data, now
    assert await a.answer() == (itt, 2, LUN_NOT_SUPPORTED)
    assert bytes(s.dev1.buf[:4096]) == bytes(4096), "a write to a revoked LUN was stored"
    assert list(s.session().tasks) == [other]
    # LUN 2 is still there: its next command reports the LUN inventory change (SPC-4, as
    # without the check), then its writes are stored
    a.data_out(r2t2, b"Y" * 4096)
    assert await a.answer() == (other, 2, LUNS_CHANGED)
    assert await a.command(2, write10(0, 8), b"Y" * 4096) == (0, None)
    assert bytes(s.dev2.buf[:4096]) == b"Y" * 4096
    assert not s.session().tasks
    # the session goes on: LUN 1 stays refused, LUN 2 serves
    assert await a.command(1, write10(8, 1), b"Z" * 512) == (2, LUN_NOT_SUPPORTED)
    assert await a.command(2, read10(0, 1), read=512) == (0, None)
    assert bytes(s.dev1.buf[:8192]) == bytes(8192)


async def test_a_write_whose_acl_entry_becomes_read_only_before_its_data_comes_is_write_protected(
        served: Served):
    s = served
    a = await login(s.port)
    s.catalog.set(1, "vol-1:ro")
    await a.ready(1)             # this nexus knows the read-only LU (no POWER ON left to report)
    s.catalog.set(1, "vol-1:rw")
    await a.ready(1)
    await a.ready(2)
    itt, r2t = await prearm(a, 1, 16, 8)
    other, r2t2 = await prearm(a, 2, 16, 8)
    s.catalog.set(1, "vol-1:ro")                       # the ACL entry becomes read-only
    a.data_out(r2t2, b"B" * 4096)                      # the other LU's write: unaffected
    assert await a.answer() == (other, 0, None)
    a.data_out(r2t, b"A" * 4096)
    assert await a.answer() == (itt, 2, WRITE_PROTECTED)
    assert bytes(s.dev1.buf[16 * 512:24 * 512]) == bytes(4096), "a write through a read-only ACL was stored"
    assert bytes(s.dev2.buf[16 * 512:24 * 512]) == b"B" * 4096
    assert not s.session().tasks
    # reads of the LU go on; a new write is refused the same way
    assert await a.command(1, read10(16, 1), read=512) == (0, None)
    assert await a.command(1, write10(16, 1), b"C" * 512) == (2, WRITE_PROTECTED)
    # made writable again, a write is stored
    s.catalog.set(1, "vol-1:rw")
    assert await a.command(1, write10(16, 1), b"D" * 512) == (0, None)
    assert bytes(s.dev1.buf[16 * 512:17 * 512]) == b"D" * 512


async def test_a_write_held_for_its_cmdsn_turn_across_a_revoke_is_refused(served: Served):
    s = served
    a = await login(s.port)
    await a.ready(1)
    await a.ready(2)
    gap = a.cmdsn
    a.cmdsn += 1
    held = a.send(1, write10(24, 1), b"H" * 512)      # CmdSN gap+1: held until gap comes
    held_r2t = a.send(1, write10(32, 8), edtl=4096)   # gap+2: held, then solicits its data
    await until(lambda: len(s.session().pending) == 2)
    s.catalog.set(1, None)
    first = a.send(2, TUR, cmdsn=gap)                  # fills the gap: the held ones run now
    answers = {}
    for _ in range(3):
        itt, status, sense = await a.answer()
        answers[itt] = (status, sense)
    assert answers[held] == (2, LUN_NOT_SUPPORTED)
    assert answers[held_r2t] == (2, LUN_NOT_SUPPORTED)
    assert answers[first][0] in (0, 2)                 # GOOD, or the LUN inventory change (3F/0E)
    assert bytes(s.dev1.buf[24 * 512:40 * 512]) == bytes(16 * 512)
    assert not s.session().tasks and not s.session().pending


async def test_a_write_held_for_its_cmdsn_turn_and_then_its_data_is_refused(served: Served):
    """Held for its CmdSN turn, then for its data: revoked while it waits for the data."""
    s = served
    a = await login(s.port)
    await a.ready(1)
    gap = a.cmdsn
    a.cmdsn += 1
    held = a.send(1, write10(40, 8), edtl=4096)
    await until(lambda: len(s.session().pending) == 1)
    a.send(1, TUR, cmdsn=gap)
    assert (await a.answer())[1:] == (0, None)
    r2t = await a.pdu()
    assert isinstance(r2t, P.R2T) and r2t.itt == held, r2t
    s.catalog.set(1, None)
    a.data_out(r2t, b"Q" * 4096)
    assert await a.answer() == (held, 2, LUN_NOT_SUPPORTED)
    assert bytes(s.dev1.buf[40 * 512:48 * 512]) == bytes(4096)


# --- the check's cost: with a resolver generation, one comparison ------------------------


class GenResolver(Resolver):
    """A resolver with a generation (what the catalog's changes bump); unit() calls counted."""

    def __init__(self, unit):
        super().__init__(unit)
        self.generation = 0
        self.calls = 0
        self.revoked = False

    def unit(self, lun):
        self.calls += 1
        return None if self.revoked else super().unit(lun)


async def test_a_waiting_write_is_resolved_again_only_when_the_generation_changed():
    p = params(initial_r2t=True, immediate_data=False)
    async with Harness(p, resolver_cls=GenResolver) as h:
        h.send(write10_pdu(0, 8, itt=1, cmdsn=1))
        r2t = await h.recv()
        res = h.session.resolver
        assert isinstance(r2t, P.R2T)
        h.send(P.DataOut(itt=1, ttt=r2t.ttt, final=True, datasn=0, buffer_offset=0, data=b"a" * 4096))
        resp = await h.recv()
        assert resp.status == 0 and res.calls == 1       # nothing changed: not resolved again
        # a change that leaves the LUN where it was: resolved again, runs
        h.send(write10_pdu(8, 8, itt=2, cmdsn=2))
        r2t = await h.recv()
        res.generation += 1
        h.send(P.DataOut(itt=2, ttt=r2t.ttt, final=True, datasn=0, buffer_offset=0, data=b"b" * 4096))
        resp = await h.recv()
        assert resp.status == 0 and res.calls == 3
        # revoked: refused, nothing stored
        h.send(write10_pdu(16, 8, itt=3, cmdsn=3))
        r2t = await h.recv()
        res.revoked = True
        res.generation += 1
        h.send(P.DataOut(itt=3, ttt=r2t.ttt, final=True, datasn=0, buffer_offset=0, data=b"c" * 4096))
        resp = await h.recv()
        assert resp.itt == 3 and resp.status == 2 and resp.sense[12] == 0x25
        assert resp.underflow and resp.residual == 4096  # none of its data taken
        assert h.unit.writes == [(0, b"a" * 4096), (8, b"b" * 4096)]
        assert not h.session.tasks and not h.session._buf_bytes     # noqa: SLF001


async def test_without_a_generation_a_waiting_write_is_resolved_again_when_it_starts():
    """The auditor's case on the bare session: a resolver with no generation."""
    class Revocable(Resolver):
        revoked = False

        def unit(self, lun):
            return None if self.revoked else super().unit(lun)

    p = params(initial_r2t=True, immediate_data=False)
    async with Harness(p, resolver_cls=Revocable) as h:
        h.send(write10_pdu(0, 8, itt=1, cmdsn=1))
        r2t = await h.recv()
        assert isinstance(r2t, P.R2T)
        h.session.resolver.revoked = True
        h.send(read10_pdu(0, 1, itt=2, cmdsn=2))
        resp = await h.recv()
        assert resp.status == 2 and resp.sense[12] == 0x25
        h.send(P.DataOut(itt=1, ttt=r2t.ttt, final=True, datasn=0, buffer_offset=0, data=b"X" * 4096))
        resp = await h.recv()
        assert resp.itt == 1 and resp.status == 2 and resp.sense[12] == 0x25
        assert h.unit.writes == []


async def test_the_target_session_view_gives_the_catalog_generation_live(served: Served):
    """The real resolver has a generation, so a waiting write costs one comparison; it must be
    the catalog's own counter, not the view's cache stamp, which moves only when ``unit`` is
    asked and so would hide a change made while the command waited."""
    from chunk.iscsi.target import SessionView
    view = SessionView(served.target, HOST, TARGET)
    assert view.unit(1) is served.units["vol-1:rw"]
    before = view.generation
    served.catalog.set(1, None)                   # revoked while nobody asks the view
    assert view.generation != before == view._gen    # noqa: SLF001 - the cache has not moved
    assert view.unit(1) is None
