"""Scrubber against real stores, replica servers and etcd."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from chunk.storage.extent_file import BLOCK_SIZE
from chunk.storage.peers import Peers
from chunk.storage.repair import LocalRepair
from chunk.storage.scrubber import Scrubber, TokenBucket
from zstore.keys import Keys

from .replica_nodes import block

pytestmark = pytest.mark.timeout(60)

VID = "vol-s"


async def setup(nodes):
    a, b = await nodes.add("A"), await nodes.add("B")
    await nodes.extent(VID, 0, ["A", "B"], {1: block("one"), 300: block("three hundred")})
    await nodes.extent(VID, 1, ["A", "B"], {0: block("zero"), 511: block("last")})
    return a, b


async def test_scrub_finds_rot_and_repair_restores_agreement(nodes):
    a, b = await setup(nodes)
    b.corrupt(VID, 1, 511)
    b.corrupt(VID, 0, 1)
    b.repair.start()
    scrub = Scrubber(b.store, b.repair, rate_bytes_per_s=64 << 20, interval=3600, recheck_delay=0.2)
    counts = await scrub.run_pass()

    assert counts["extents"] == 2 and counts["bad_blocks"] == 2 and counts["mismatches"] == 0
    assert counts["bytes"] > 0
    assert b.store.verify(VID, 0) == [] and b.store.verify(VID, 1) == []
    assert b.store.read(VID, 1, 511 * BLOCK_SIZE, BLOCK_SIZE)[0] == block("last")
    assert b.store.read(VID, 0, BLOCK_SIZE, BLOCK_SIZE)[0] == block("one")
    for idx in (0, 1):
        assert b.store.digest(VID, idx) == a.store.digest(VID, idx)
    st = scrub.status()
    assert st["passes"] == 1 and st["extents_scrubbed"] == 2 and st["errors"] == 2
    assert st["mismatches"] == 0 and st["mismatched"] == []
    assert st["last_pass_end"] is not None and st["current"] is None
    assert st["repair"]["repaired"] == 2 and st["repair"]["checksum_errors"] == 2

    again = await scrub.run_pass()      # clean now
    assert again["bad_blocks"] == 0 and scrub.status()["passes"] == 2


async def test_persistent_disagreement_is_reported_not_repaired(nodes):
    a, b = await setup(nodes)
    # Both copies verify, but they hold different blocks: a lost write on B.
    b.store.write(VID, 0, 7 * BLOCK_SIZE, block("only on B"), 1)
    scrub = Scrubber(b.store, b.repair, rate_bytes_per_s=64 << 20, interval=3600, recheck_delay=0.2)
    counts = await scrub.run_pass()
    assert counts["mismatches"] == 0 and counts["bad_blocks"] == 0
    st = scrub.status()
    assert st["mismatches"] == 0 and st["mismatched"] == []
    assert st["suspected"] == [{"volume": VID, "extent": 0, "peers": ["A"], "passes": 1}]

    assert (await scrub.run_pass())["mismatches"] == 1       # the next pass confirms it
    st = scrub.status()
    assert st["mismatches"] == 1 and st["suspected"] == []
    assert st["mismatched"] == [{"volume": VID, "extent": 0, "peers": ["A"]}]
    assert (await scrub.run_pass())["mismatches"] == 1       # still there, counted once
    assert scrub.status()["mismatches"] == 1
    # Not repaired: neither side was touched.
    assert b.store.read(VID, 0, 7 * BLOCK_SIZE, BLOCK_SIZE)[0] == block("only on B")
    assert a.store.read(VID, 0, 7 * BLOCK_SIZE, BLOCK_SIZE)[1] == b"\x00"

    # Once the replicas agree again (e.g. after a resync) the entry goes away.
    a.store.write(VID, 0, 7 * BLOCK_SIZE, block("only on B"), 1)
    await scrub.run_pass()
    assert scrub.status()["mismatched"] == [] and scrub.status()["mismatches"] == 1


async def test_one_pass_confirmation_when_configured(nodes):
    a, b = await setup(nodes)
    b.store.write(VID, 1, 7 * BLOCK_SIZE, block("only on B"), 1)
    scrub = Scrubber(b.store, b.repair, rate_bytes_per_s=64 << 20, interval=3600,
                     recheck_delay=0.1, confirm_passes=1)
    assert (await scrub.run_pass())["mismatches"] == 1
    assert scrub.status()["mismatched"] == [{"volume": VID, "extent": 1, "peers": ["A"]}]


async def test_trim_not_yet_done_everywhere_is_only_suspected(nodes):
    """Reclaimers trim a deleted snapshot's versions on their own schedules."""
    a, b = await setup(nodes)
    for n in (a, b):
        n.store.write(VID, 0, BLOCK_SIZE, block("one, later"), 2)   # version (1, 1) on both
    assert a.store.digest(VID, 0) == b.store.digest(VID, 0)
    assert a.store.trim(VID, 0, set()) == 1                          # A's reclaimer ran first
    scrub = Scrubber(b.store, b.repair, rate_bytes_per_s=64 << 20, interval=3600, recheck_delay=0.1)
    await scrub.run_pass()
    assert [s["peers"] for s in scrub.status()["suspected"]] == [["A"]]
    assert b.store.trim(VID, 0, set()) == 1                          # then B's
    await scrub.run_pass()
    st = scrub.status()
    assert st["suspected"] == [] and st["mismatched"] == [] and st["mismatches"] == 0


class LateWrite:
    """The real client; after the first DIGEST answer for extent 1 the write in flight lands."""

    def __init__(self, inner, lands) -> None:
        self.inner, self.lands, self.digests, self.landed = inner, lands, 0, False

    async def digest(self, addr, vid, idx, *args, **kw):
        got = await self.inner.digest(addr, vid, idx, *args, **kw)
        self.digests += 1
        if idx == 1 and not self.landed:
            self.landed = True
            self.lands()
        return got

    def __getattr__(self, name):
        return getattr(self.inner, name)


async def test_transient_disagreement_of_a_write_in_flight_is_not_counted(nodes, etcd_client,
                                                                          etcd_config):
    a, b = await setup(nodes)
    b.store.write(VID, 1, 9 * BLOCK_SIZE, block("in flight"), 1)     # reached B, not yet A
    keys = Keys(etcd_config.prefix)
    client = LateWrite(b.client, lambda: a.store.write(VID, 1, 9 * BLOCK_SIZE, block("in flight"), 1))
    repair = LocalRepair(b.store, client, Peers(etcd_client, keys), keys, etcd_client, "B")
    scrub = Scrubber(b.store, repair, rate_bytes_per_s=64 << 20, interval=3600,
                     recheck_delay=0.1, confirm_passes=1)
    counts = await scrub.run_pass()
    assert client.digests == 3, "extent 0 once; extent 1 differed, so it was checked again"
    assert counts["mismatches"] == 0
    assert scrub.status()["mismatched"] == [] and scrub.status()["suspected"] == []


async def test_not_in_sync_replica_is_not_compared(nodes, etcd_client, etcd_config):
    a, b = await setup(nodes)
    await nodes.extent(VID, 2, ["A"], {0: block("a")})
    b.store.create(VID, 2, 1)             # a stale copy on B (dropped, awaiting resync)
    b.store.write(VID, 2, 0, block("stale"), 1)
    scrub = Scrubber(b.store, b.repair, rate_bytes_per_s=64 << 20, interval=3600, recheck_delay=0.1)
    counts = await scrub.run_pass()
    assert counts["mismatches"] == 0 and counts["extents"] == 3


async def test_throttle_paces_the_pass(nodes):
    a = await nodes.add("A")
    data = {i: block(i % 251) for i in range(0, 512)}          # the whole 2 MiB extent
    await nodes.extent(VID, 0, ["A"], data)
    allocated = a.store.stat(VID, 0)["allocated"]
    assert allocated >= 2 << 20
    rate = 1 << 20
    scrub = Scrubber(a.store, a.repair, rate_bytes_per_s=rate, interval=3600)
    assert scrub.slice_blocks * BLOCK_SIZE <= rate
    t0 = time.monotonic()
    counts = await scrub.run_pass()
    elapsed = time.monotonic() - t0
    # The first slice rides the initial burst; the rest waits for tokens.
    assert elapsed >= (counts["bytes"] - rate) / rate * 0.9
    assert elapsed >= 0.9


async def test_token_bucket_rejects_nonsense():
    with pytest.raises(ValueError):
        TokenBucket(0, 1)


async def test_background_loop_scrubs_and_repairs(nodes):
    a, b = await setup(nodes)
    b.corrupt(VID, 0, 300)
    scrub = Scrubber(b.store, b.repair, rate_bytes_per_s=64 << 20, interval=0.1, recheck_delay=0.1)
    scrub.start()                      # starts the repair worker too
    try:
        for _ in range(200):
            if scrub.status()["passes"] >= 1:
                break
            await asyncio.sleep(0.05)
    finally:
        await scrub.stop()
    assert scrub.status()["passes"] >= 1
    assert b.repair.repaired == 1 and b.store.verify(VID, 0) == []


def meta_drop(etcd_client, keys: Keys):
    """The scrubber's drop callback, going to the meta's own drop (what the API runs) on real etcd."""
    from meta import extents
    from meta.context import Ctx
    ctx = Ctx(etcd=etcd_client, keys=keys)
    calls = []

    async def drop(vid, idx, chunk_id, generation, reason):
        calls.append((vid, idx, chunk_id, generation))
        await extents.drop(ctx, vid, idx, chunk_id, generation, reason)
    return drop, calls


async def record(nodes, vid, idx):
    from zstore.records import ExtentRecord
    got = await nodes.etcd.get(nodes.keys.extent(vid, idx))
    return ExtentRecord.decode(got.value)


def _voter(node, drop) -> Scrubber:
    """A scrubber that acts on the first confirmed disagreement (the voting tests')."""
    return Scrubber(node.store, node.repair, rate_bytes_per_s=64 << 20, interval=3600,
                    recheck_delay=0.1, confirm_passes=1, drop=drop)


async def test_confirmed_disagreement_drops_the_minority_replica_for_a_resync(nodes, etcd_client):
    """Three replicas, one holds a block the others do not (a write never acknowledged): the
    majority side drops it from the extent, which is what makes recovery resync it in full;
    the minority side's own scrubber does nothing."""
    a, b, _ = await nodes.add("A"), await nodes.add("B"), await nodes.add("C")
    await nodes.extent(VID, 0, ["A", "B", "C"], {1: block("one")})
    b.store.write(VID, 0, 7 * BLOCK_SIZE, block("only on B"), 1)
    drop, calls = meta_drop(etcd_client, nodes.keys)
    on_b = _voter(b, drop)
    assert (await on_b.run_pass())["mismatches"] == 1
    assert calls == [] and on_b.status()["resyncs_requested"] == 0      # outvoted 2 to 1
    on_a = _voter(a, drop)
    assert (await on_a.run_pass())["mismatches"] == 1
    assert calls == [(VID, 0, "B", 1)] and on_a.status()["resyncs_requested"] == 1
    rec = await record(nodes, VID, 0)
    assert rec.replicas == ["A", "C"] and rec.stale == {"B": 1} and rec.generation == 2
    # Both copies left untouched by the scrubber: the resync (recovery) rewrites B's.
    assert b.store.read(VID, 0, 7 * BLOCK_SIZE, BLOCK_SIZE)[0] == block("only on B")
    assert (await on_a.run_pass())["mismatches"] == 0                   # B is out of the set now


async def test_a_tie_goes_to_the_side_holding_the_first_replica(nodes, etcd_client):
    a, b = await setup(nodes)                                          # extents 0 and 1 on [A, B]
    b.store.write(VID, 1, 9 * BLOCK_SIZE, block("only on B"), 1)
    drop, calls = meta_drop(etcd_client, nodes.keys)
    assert (await _voter(b, drop).run_pass())["mismatches"] == 1
    assert calls == []                                                 # B is not the first replica
    assert (await _voter(a, drop).run_pass())["mismatches"] == 1
    assert calls == [(VID, 1, "B", 1)]
    assert (await record(nodes, VID, 1)).replicas == ["A"]
    assert (await record(nodes, VID, 0)).replicas == ["A", "B"]        # the agreeing extent is left


async def test_no_replica_is_dropped_while_a_vote_is_missing(nodes, etcd_client):
    """Three replicas, C does not answer its digest: A (the first replica) disagrees with B.
    Counting only the answers, A would win the 1-1 tie and drop B although C may agree with
    B; nothing is dropped until every replica answers."""
    a, _ = await nodes.add("A"), await nodes.add("B")
    await nodes.add_dead("C")                                      # registered, not answering
    await nodes.extent(VID, 0, ["A", "B", "C"], {1: block("one")})
    a.store.write(VID, 0, 7 * BLOCK_SIZE, block("only on A"), 1)
    drop, calls = meta_drop(etcd_client, nodes.keys)
    on_a = _voter(a, drop)
    assert (await on_a.run_pass())["mismatches"] == 1
    assert calls == [] and (await record(nodes, VID, 0)).replicas == ["A", "B", "C"]


class MediaError:
    """os.preadv/os.pread failing with EIO on some blocks of one real file until they are
    rewritten (a drive remaps a bad sector on write)."""

    def __init__(self, monkeypatch, path, blocks, data_at: int = 0) -> None:
        import os
        self.ino, self.bad, self.data_at = os.stat(path).st_ino, set(blocks), data_at
        self.real_preadv, self.real_pread, self.real_pwrite = os.preadv, os.pread, os.pwrite
        self.failed = 0
        monkeypatch.setattr(os, "preadv", self.preadv)
        monkeypatch.setattr(os, "pread", self.pread)
        monkeypatch.setattr(os, "pwrite", self.pwrite)

    def _hits(self, fd, offset, length) -> list[int]:
        import os
        if os.fstat(fd).st_ino != self.ino:
            return []
        lo = (offset - self.data_at) // BLOCK_SIZE
        hi = (offset - self.data_at + length - 1) // BLOCK_SIZE
        return [b for b in self.bad if lo <= b <= hi]

    def preadv(self, fd, buffers, offset):
        if self._hits(fd, offset, sum(len(b) for b in buffers)):
            import errno
            self.failed += 1
            raise OSError(errno.EIO, "Input/output error")
        return self.real_preadv(fd, buffers, offset)

    def pread(self, fd, n, offset):
        if self._hits(fd, offset, n):
            import errno
            self.failed += 1
            raise OSError(errno.EIO, "Input/output error")
        return self.real_pread(fd, n, offset)

    def pwrite(self, fd, data, offset):
        for b in self._hits(fd, offset, len(data)):
            if offset - self.data_at <= b * BLOCK_SIZE and \
                    (b + 1) * BLOCK_SIZE <= offset - self.data_at + len(data):
                self.bad.discard(b)          # the whole block rewritten: readable again
        return self.real_pwrite(fd, data, offset)


async def test_unreadable_block_is_repaired_and_the_rest_of_the_extent_still_scrubbed(nodes, monkeypatch):
    """An EIO reading one block used to escape the slice's verify: the rest of the extent
    was never verified and its digests never compared, on every pass."""
    a, b = await setup(nodes)
    b.corrupt(VID, 0, 300)                         # rot in a later slice of the same extent
    b.corrupt(VID, 1, 511)                         # and in the next extent
    eio = MediaError(monkeypatch, b.data_path(VID, 0), [1])
    b.repair.start()
    scrub = Scrubber(b.store, b.repair, rate_bytes_per_s=1 << 20, interval=3600, recheck_delay=0.1)
    assert scrub.slice_blocks == 256               # block 1 and block 300 in different slices
    counts = await scrub.run_pass()
    await b.repair.wait_idle(timeout=10)

    assert eio.failed and counts["extents"] == 2 and counts["unreadable"] == 0
    assert counts["bad_blocks"] == 3 and scrub.status()["errors"] == 3
    assert b.repair.status()["repaired"] == 3 and b.repair.status()["repair_failed"] == 0
    assert eio.bad == set()                        # the unreadable block was rewritten from A
    assert b.store.read(VID, 0, BLOCK_SIZE, BLOCK_SIZE)[0] == block("one")
    for idx in (0, 1):
        assert b.store.verify(VID, idx) == [] and b.store.digest(VID, idx) == a.store.digest(VID, idx)


async def test_unreadable_snapshot_version_is_counted_and_the_scrub_goes_on(nodes, monkeypatch):
    """A version block that cannot be read makes ``store.verify`` raise StoreIOError (repair
    verifies first, so it cannot take it): counted as unreadable, and the rest is scrubbed."""
    a, b = await setup(nodes)
    for n in (a, b):
        n.store.write(VID, 0, BLOCK_SIZE, block("one, later"), 2)   # version (1, 1) on both
    b.corrupt(VID, 0, 300)
    b.corrupt(VID, 1, 511)
    ver = next((b.data_path(VID, 0).parent / f"{VID}.0.v").glob("*.ver"))
    eio = MediaError(monkeypatch, ver, [1], data_at=BLOCK_SIZE)     # after 512 8-byte slots
    b.repair.start()
    scrub = Scrubber(b.store, b.repair, rate_bytes_per_s=1 << 20, interval=3600, recheck_delay=0.1)
    counts = await scrub.run_pass()
    await b.repair.wait_idle(timeout=10)

    assert eio.failed and counts["extents"] == 2
    assert counts["unreadable"] == 1 and scrub.status()["unreadable"] == 1
    assert counts["bad_blocks"] == 2 and b.repair.status()["repaired"] == 2
    for idx in (0, 1):
        assert b.store.digest(VID, idx) == a.store.digest(VID, idx)
    assert b.store.verify(VID, 1) == []


class Interrupted(Scrubber):
    """Records the extents it scrubs; its pass is cancelled once ``stop_after`` are done
    (the chunk server stopped for a restart)."""

    def __init__(self, *args, stop_after: int | None = None, **kw) -> None:
        super().__init__(*args, **kw)
        self.order: list[tuple[str, int]] = []
        self.stop_after = stop_after

    async def scrub_extent(self, vid, idx):
        got = await super().scrub_extent(vid, idx)
        self.order.append((vid, idx))
        if len(self.order) == self.stop_after:
            asyncio.current_task().cancel()
        return got


async def test_a_restarted_scrubber_resumes_after_the_last_extent_and_wraps_around(nodes):
    """At the throttled rate a pass takes days; starting from the first extent after every
    restart meant the last extents were never scrubbed."""
    a, b = await setup(nodes)
    for idx in (2, 3, 4):
        await nodes.extent(VID, idx, ["A", "B"], {idx: block(f"e{idx}")})
    kw = dict(rate_bytes_per_s=64 << 20, interval=3600, recheck_delay=0.1)
    first = Interrupted(b.store, b.repair, stop_after=2, **kw)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.create_task(first.run_pass())
    assert first.order == [(VID, 0), (VID, 1)]
    cursor = b.data_path(VID, 0).parent / ".scrub-cursor"      # in the store's disk directory
    assert cursor.exists()

    b.corrupt(VID, 0, 1)               # found by the resumed pass once it wraps around
    b.repair.start()
    again = Interrupted(b.store, b.repair, **kw)                # a new process
    counts = await again.run_pass()
    assert again.order == [(VID, 2), (VID, 3), (VID, 4), (VID, 0), (VID, 1)]
    assert counts["extents"] == 5 and counts["bad_blocks"] == 1
    assert not cursor.exists()         # a completed pass: the next one starts from the first

    third = Interrupted(b.store, b.repair, **kw)
    await third.run_pass()
    assert third.order == [(VID, i) for i in range(5)]


async def test_cursor_is_saved_as_the_pass_goes_and_a_bad_one_is_ignored(nodes, tmp_path):
    """Saved every ``cursor_every`` seconds too (a crash loses at most that much progress);
    a cursor naming an extent deleted since resumes after it; a corrupt one starts over."""
    a, b = await setup(nodes)
    for idx in (2, 3):
        await nodes.extent(VID, idx, ["A", "B"], {idx: block(f"e{idx}")})
    path = tmp_path / "cursor"
    kw = dict(rate_bytes_per_s=64 << 20, interval=3600, recheck_delay=0.1, cursor_file=path)
    seen = []

    class Peek(Interrupted):
        async def scrub_extent(self, vid, idx):
            seen.append(path.read_text() if path.exists() else None)
            return await super().scrub_extent(vid, idx)

    await Peek(b.store, b.repair, cursor_every=0, **kw).run_pass()
    assert seen[0] is None and json.loads(seen[2]) == {"volume": VID, "extent": 1}
    assert not path.exists()

    path.write_text(json.dumps({"volume": VID, "extent": 1}))
    b.store.delete(VID, 1)
    s = Interrupted(b.store, b.repair, **kw)
    await s.run_pass()
    assert s.order == [(VID, 2), (VID, 3), (VID, 0)]
    for junk in (b"{not json", b'{"volume": 3, "extent": "x"}', b"[]"):
        path.write_bytes(junk)
        s = Interrupted(b.store, b.repair, **kw)
        await s.run_pass()
        assert s.order == [(VID, 0), (VID, 2), (VID, 3)]


class BlockedRead:
    """os.preadv of one extent's data file, in a worker thread, held until ``go`` is set:
    meanwhile the test closes the replica's fds on the loop and reuses the number."""

    def __init__(self, monkeypatch, path) -> None:
        import os
        import threading
        self.ino = os.stat(path).st_ino
        self.real = os.preadv
        self.started, self.go = threading.Event(), threading.Event()
        self.fd: int | None = None
        self.read_ino: int | None = None
        self.read: bytes = b""
        monkeypatch.setattr(os, "preadv", self.preadv)

    def preadv(self, fd, buffers, offset):
        import os
        import threading
        if (threading.current_thread() is threading.main_thread() or self.started.is_set()
                or os.fstat(fd).st_ino != self.ino):
            return self.real(fd, buffers, offset)
        self.fd = fd
        self.started.set()
        assert self.go.wait(10)
        got = self.real(fd, buffers, offset)
        self.read_ino = os.fstat(fd).st_ino
        self.read = b"".join(bytes(memoryview(b)) for b in buffers)[:got]
        return got


@pytest.mark.parametrize("closer", ["delete", "retire"])
async def test_a_verify_in_a_worker_never_reads_a_closed_and_reused_fd(nodes, monkeypatch,
                                                                      tmp_path, closer):
    """The scrub's worker read the replica's data fd while the loop closed it (DELETE, a
    failed flush retiring the replica): a number reused by another ``open`` made it read
    that file's bytes, i.e. false checksum errors (an ``unreadable`` block, once the loop's
    re-verify found the replica broken). It reads a dup: the extent as it was, then gone."""
    import errno
    import os
    a, b = await setup(nodes)
    held = BlockedRead(monkeypatch, b.data_path(VID, 0))
    scheduled = []
    monkeypatch.setattr(b.repair, "schedule", lambda *k: scheduled.append(k))
    scrub = Scrubber(b.store, b.repair, rate_bytes_per_s=64 << 20, interval=3600, recheck_delay=0.1)
    task = asyncio.create_task(scrub.run_pass())
    assert await asyncio.to_thread(held.started.wait, 10)

    if closer == "delete":
        b.store.delete(VID, 0)
    else:
        b.store._retire(b.store._replicas[(VID, 0)], OSError(errno.ENOSPC, "No space left"))
    other = tmp_path / "other"
    other.write_bytes(b"X" * (2 << 20))
    fd = os.open(other, os.O_RDONLY)
    reused = None
    try:
        os.fstat(held.fd)
    except OSError:                      # closed: the next open() may get that number
        reused = os.dup2(fd, held.fd)
    try:
        held.go.set()
        counts = await asyncio.wait_for(task, 10)
    finally:
        os.close(fd)
        if reused is not None:
            os.close(reused)

    assert held.read_ino == held.ino and b"X" * BLOCK_SIZE not in held.read
    assert held.read[BLOCK_SIZE:2 * BLOCK_SIZE] == block("one")
    assert counts["bad_blocks"] == 0 and counts["unreadable"] == 0 and counts["extents"] == 1
    assert scrub.errors == 0 and scrub.unreadable == 0 and scheduled == []
    assert not b.store.has(VID, 0)
