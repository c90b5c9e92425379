"""A coordinator never runs the same volume op twice under one claim.

Reviewer's case (pre-existing): the revert ran, then its "done" write (``_finish_op``) met
etcd out of reach. A rerun of the op was queued meanwhile (the watch event of the op's own
claim write, ``StorageEngine._spawn``): it found the op still ``running`` at the same epoch,
which ``_claim_op`` accepts as resumable, and applied the revert a second time, rolling back
a write the initiator made (and was answered for) between the two.

test_volops' harness (a real Coordinator's ``run_volop`` over a real etcd, in-memory
replicas), run by the real StorageEngine's assignment side (test_audit19_coord_volop_retry's
``_engine``); the replica here keeps what is written (test_coordinator's ``_MemReplica``) and
a REVERT rolls it back to the snapshot (empty)."""

from __future__ import annotations

import asyncio

import pytest

from chunk.storage.coordinator import Coordinator
from zstore.etcd import EtcdUnavailable

from .test_audit19_coord_volop_retry import _engine
from .test_coordinator import _MemReplica
from .test_volops import _op, _stored, keys, setup  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(90)

DATA = b"\x55" * 4096


class _Replica(_MemReplica):
    def __init__(self, chunk_id: str) -> None:
        super().__init__(chunk_id)
        self.reverts: list[tuple] = []
        self.on_revert = None

    async def revert(self, vid, idx, epoch, to_seq, seq, sole=False):
        self.reverts.append((idx, epoch, to_seq, seq))
        self.state.clear()                  # the snapshot (seq 1) held nothing
        if self.on_revert:
            await self.on_revert(idx)

    async def fence(self, vid, idx, epoch):
        pass


class _DoneWriteFails:
    """The real etcd; once ``armed``, its next ``fails`` transactions raise EtcdUnavailable
    (the first of them is the op's done write)."""

    def __init__(self, etcd, fails: int = 1) -> None:
        self._etcd, self.transactions = etcd, etcd.transactions
        self.armed, self.fails, self.raised = False, fails, 0

    async def get(self, key):
        return await self._etcd.get(key)

    async def transaction(self, **kw):
        if self.armed and self.raised < self.fails:
            self.raised += 1
            raise EtcdUnavailable("etcdserver: leader changed")
        return await self._etcd.transaction(**kw)


async def _setup(setup, etcd_client, fails: int = 1):  # noqa: F811
    coord, _ = setup
    rep = _Replica("A")
    coord.engine.reps["A"] = rep
    await coord.ensure_owner()                      # owned (real etcd), epoch 5
    flaky = _DoneWriteFails(etcd_client, fails)
    coord.engine.etcd = flaky
    return coord, rep, flaky


async def _wait(eng, name: str, timeout: float = 40) -> None:
    """Until no runner (nor a rerun queued behind it) is left for ``name``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while name in eng._running:                                           # noqa: SLF001
        assert asyncio.get_running_loop().time() < deadline, "the op's runner never ended"
        await asyncio.gather(asyncio.shield(eng._running[name]), return_exceptions=True)  # noqa: SLF001
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("fails", [1, 6])
async def test_a_revert_whose_done_write_fails_is_not_applied_again_by_a_rerun(
        setup, etcd_client, keys, fails):  # noqa: F811
    """The revert reverts both extents; then its done write fails (once; or six times, past
    any short retry, so the runner's backoff has to carry it). Meanwhile the watch event of
    the claim queued a rerun, and the initiator wrote (the write waited for the barrier and
    was answered once it opened). The op ends done, each extent reverted once, the write
    kept: before, the rerun re-claimed the op (running, same epoch) and reverted again, and
    the answered write was gone."""
    coord, rep, flaky = await _setup(setup, etcd_client, fails)
    key = keys.volop("v", "op1")
    op = await _op(etcd_client, keys)
    eng = _engine(etcd_client, keys, coord)
    writes = []

    async def after_revert(idx):
        if idx == 1 and not flaky.armed:
            flaky.armed = True                      # the next transaction: the done write
            claimed = (await etcd_client.get(key)).value
            await eng._on_volop(key, claimed)       # noqa: SLF001 - the claim's watch event
            writes.append(asyncio.ensure_future(coord.write(0, DATA)))
    rep.on_revert = after_revert
    await eng._on_volop(key, op.encode())                                 # noqa: SLF001
    try:
        await _wait(eng, "op/op1")
        await asyncio.wait_for(writes[0], 5)        # the initiator was answered
    finally:
        eng._stop.set()                                                   # noqa: SLF001
        for t in list(eng._running.values()):                             # noqa: SLF001
            t.cancel()
    assert flaky.raised == fails, "the injected etcd error was not hit"
    got = await _stored(etcd_client, keys)
    assert (got.state, got.claim_epoch) == ("done", coord.epoch), got
    assert rep.reverts == [(0, coord.epoch, 1, 3), (1, coord.epoch, 1, 3)], rep.reverts
    assert rep.state.get(0) == DATA, "the answered write was rolled back by a second revert"


def _arm_after_reverts(rep, flaky) -> None:
    async def after_revert(idx):
        if idx == 1:
            flaky.armed = True                      # the next transaction: the done write
    rep.on_revert = after_revert


async def test_a_rerun_after_ownership_moved_reports_the_revert_done_not_interrupted(
        setup, etcd_client, keys):  # noqa: F811
    """The revert ran at epoch 5 and its done write failed (past the short retry); then the
    volume was taken over and taken back (epoch 10) before the runner's next try. The op
    still holds our claim at epoch 5 and its work completed: the retry reports it done.
    Before, ``_claim_op`` saw a ``running`` op from another epoch and failed it as
    "interrupted ... not resumed", though the volume had been reverted."""
    from chunk.storage.coordinator import NotServing
    coord, rep, flaky = await _setup(setup, etcd_client, fails=3)
    _arm_after_reverts(rep, flaky)
    op = await _op(etcd_client, keys)
    with pytest.raises((NotServing, EtcdUnavailable)):
        await coord.run_volop(op)
    assert (await _stored(etcd_client, keys)).state == "running"
    coord.engine.etcd = etcd_client                           # etcd back
    from zstore.records import VolumeOwner
    await etcd_client.put(keys.owner("v"), VolumeOwner(volume_id="v", chunk_id="other", epoch=9).encode())
    await coord._take_back(9, "the test")                                 # noqa: SLF001
    assert coord.epoch == 10
    await coord.run_volop(await _stored(etcd_client, keys))               # the engine's retry
    got = await _stored(etcd_client, keys)
    assert (got.state, got.error, got.claim_epoch) == ("done", None, 5), got
    assert rep.reverts == [(0, 5, 1, 3), (1, 5, 1, 3)]


async def test_after_a_restart_a_revert_left_running_is_failed_as_interrupted(
        setup, etcd_client, keys):  # noqa: F811
    """The revert ran and its done write failed; then the server restarted (a new
    coordinator, nothing remembered, a new epoch). The existing rule applies: the op is
    failed as interrupted, never run again (this path was already right; it stays so), and
    its error says the revert may have been applied (here it was, in full)."""
    from chunk.storage.coordinator import NotServing
    coord, rep, flaky = await _setup(setup, etcd_client, fails=3)
    _arm_after_reverts(rep, flaky)
    op = await _op(etcd_client, keys)
    with pytest.raises((NotServing, EtcdUnavailable)):
        await coord.run_volop(op)
    engine = coord.engine
    engine.etcd = etcd_client
    again = Coordinator(engine, coord.volume)                 # the restarted server's
    again._is_ready = True                                    # noqa: SLF001
    again._refresh_extents = coord._refresh_extents           # noqa: SLF001
    again.extents = dict(coord.extents)
    await again.ensure_owner()
    assert again.epoch == 6
    await again.run_volop(await _stored(etcd_client, keys))
    got = await _stored(etcd_client, keys)
    assert got.state == "failed" and "interrupted" in got.error and "epoch 5, now 6" in got.error
    # The revert ran in full here; the failure must not read as "nothing was done".
    assert "applied in part, or in full" in got.error, got.error
    assert len(rep.reverts) == 2


async def test_a_revert_cut_short_is_not_run_again_under_the_same_claim(setup, etcd_client, keys):  # noqa: F811
    """The revert's task is cancelled after extent 0 (no outcome written: the op stays
    ``running`` at this epoch). A later run on the same coordinator fails it as cut short
    instead of reverting extent 0 again over writes made since."""
    coord, rep, _ = await _setup(setup, etcd_client, fails=0)
    blocked = asyncio.Event()

    async def hold_first(idx):
        if len(rep.reverts) == 1:
            blocked.set()
            await asyncio.Event().wait()
    rep.on_revert = hold_first
    op = await _op(etcd_client, keys)
    first = asyncio.ensure_future(coord.run_volop(op))
    await asyncio.wait_for(blocked.wait(), 10)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    assert (await _stored(etcd_client, keys)).state == "running"
    await coord.write(0, DATA)                                  # written since
    await coord.run_volop(await _stored(etcd_client, keys))
    got = await _stored(etcd_client, keys)
    assert got.state == "failed" and "cut short" in got.error, got
    assert [r[0] for r in rep.reverts] == [0]
    assert rep.state.get(0) == DATA


async def test_a_snapshot_barrier_is_not_run_again_under_the_same_claim(setup, etcd_client, keys):  # noqa: F811
    """A snapshot op's commit (one txn comparing the claimed record, the volume record and the
    snapshot, writing "done" with the commit) fails on etcd, and so does the failed write
    after it. Run again under the claim, the barrier would have been harmless (at most one
    commit can land, and a later barrier is a sound snapshot point), but the rule is one
    run per claim: the retry reports the failure (the meta's tidy pass removes the
    "creating" snapshot of a failed op), and the barrier (fencing every server) ran once.
    Before, the rerun fenced again and committed."""
    from chunk.storage.coordinator import NotServing
    from zstore.records import Snapshot
    coord, rep, flaky = await _setup(setup, etcd_client, fails=4)     # commit + 3 tries
    await etcd_client.put(keys.snapshot("s"), Snapshot(snapshot_id="s", name="s", volume_id="v",
                                                      size=coord.volume.size,
                                                      state="creating").encode())
    fences = []

    async def fence(vid, idx, epoch):
        fences.append(epoch)
        flaky.armed = True                          # the next transaction: the commit
    rep.fence = fence
    epoch = coord.epoch             # the barrier's (the lost commit makes ownership be retaken)
    op = await _op(etcd_client, keys, kind="snapshot")
    with pytest.raises((NotServing, EtcdUnavailable)):
        await coord.run_volop(op)
    coord.engine.etcd = etcd_client                           # etcd back
    await coord.run_volop(await _stored(etcd_client, keys))               # the engine's retry
    got = await _stored(etcd_client, keys)
    assert got.state == "failed" and "leader changed" in got.error, got
    snap = Snapshot.decode((await etcd_client.get(keys.snapshot("s"))).value)
    assert snap.state == "creating"
    assert fences == [epoch]


async def test_a_snapshot_found_committed_is_reported_done_when_etcd_comes_back(
        setup, etcd_client, keys):  # noqa: F811
    """The snapshot is ready already when the barrier comes to commit it (committed by the
    meta), so the op is only to be reported done; that write meets etcd out past the short
    retry. The retry reports it done: reported from inside the commit step, the
    NotServing was taken for the snapshot's failure and the op remembered as failed."""
    from chunk.storage.coordinator import NotServing
    from zstore.records import Snapshot
    coord, rep, flaky = await _setup(setup, etcd_client, fails=3)

    async def fence(vid, idx, epoch):
        flaky.armed = True                          # the next transaction: the done write
    rep.fence = fence
    op = await _op(etcd_client, keys, kind="snapshot")
    with pytest.raises((NotServing, EtcdUnavailable)):
        await coord.run_volop(op)
    coord.engine.etcd = etcd_client                           # etcd back
    await coord.run_volop(await _stored(etcd_client, keys))               # the engine's retry
    got = await _stored(etcd_client, keys)
    assert (got.state, got.error) == ("done", None), got
    assert Snapshot.decode((await etcd_client.get(keys.snapshot("s"))).value).state == "ready"


@pytest.mark.parametrize("with_lease", [True, False])
async def test_a_snapshot_commit_whose_reply_is_lost_makes_the_next_write_take_the_new_seq(
        setup, etcd_client, keys, with_lease):  # noqa: F811
    """Review (session 19): the commit txn lands (snapshot ready at seq 3, the volume at 4, the
    op done) but its reply is lost. The coordinator kept writing at seq 3, inside the ready
    snapshot, until its next ownership change. Now ownership is taken again before the next
    write: a new epoch and the volume's current seq."""
    from zstore.records import Snapshot, Volume

    from .test_volops import _Lease
    coord, rep, flaky = await _setup(setup, etcd_client)
    if with_lease:
        coord.engine.lease = _Lease()
        coord._lease_gen = 1                                        # noqa: SLF001
    await etcd_client.put(keys.snapshot("s"), Snapshot(snapshot_id="s", name="s", volume_id="v",
                                                      size=coord.volume.size,
                                                      state="creating").encode())
    real = etcd_client.transaction
    lost = []

    async def landed_then_lost(**kw):
        res = await real(**kw)
        if not lost:
            lost.append(True)
            raise EtcdUnavailable("reply lost")
        return res

    async def fence(vid, idx, epoch):
        coord.engine.etcd.transaction = landed_then_lost            # the next txn: the commit
    rep.fence = fence
    epoch_before = coord.epoch
    op = await _op(etcd_client, keys, kind="snapshot")
    try:
        await coord.run_volop(op)
    except Exception:  # noqa: BLE001 - whatever the op's own reporting makes of it
        pass
    coord.engine.etcd.transaction = real
    snap = Snapshot.decode((await etcd_client.get(keys.snapshot("s"))).value)
    vol = Volume.decode((await etcd_client.get(keys.volume("v"))).value)
    assert lost and (snap.state, snap.seq, vol.snap_seq) == ("ready", 3, 4)
    await coord.ensure_owner()                     # what the next write does first
    assert coord.seq == 4 and coord.epoch > epoch_before


async def test_a_revert_handed_back_after_its_outcome_write_failed_is_reported_once(
        setup, etcd_client, keys):  # noqa: F811
    """Review (session 19): the revert ran, its done write failed (NotServing); the meta then
    moved the op away and handed it back, pending again. The remembered outcome was written
    over the old claim only: the compare failed ("handed elsewhere"), the memory was dropped,
    and the op stayed pending here with nobody to run it. Now the outcome is reported over the
    record as it is, and the revert is not run again."""
    from chunk.storage.coordinator import NotServing
    coord, rep, flaky = await _setup(setup, etcd_client, fails=3)
    _arm_after_reverts(rep, flaky)
    op = await _op(etcd_client, keys)
    with pytest.raises((NotServing, EtcdUnavailable)):
        await coord.run_volop(op)
    coord.engine.etcd = etcd_client                           # etcd back
    await _op(etcd_client, keys, executor="other")            # moved away ...
    back = await _op(etcd_client, keys)                       # ... and handed back, pending
    await coord.run_volop(back)
    got = await _stored(etcd_client, keys)
    assert (got.state, got.error) == ("done", None), got
    assert rep.reverts == [(0, 5, 1, 3), (1, 5, 1, 3)], rep.reverts
    assert "op1" not in coord._ran_ops                                    # noqa: SLF001


async def test_a_remembered_op_finished_meanwhile_is_left_as_it_is(setup, etcd_client, keys):  # noqa: F811
    from chunk.storage.coordinator import NotServing
    coord, rep, flaky = await _setup(setup, etcd_client, fails=3)
    _arm_after_reverts(rep, flaky)
    op = await _op(etcd_client, keys)
    with pytest.raises((NotServing, EtcdUnavailable)):
        await coord.run_volop(op)
    coord.engine.etcd = etcd_client
    done = await _op(etcd_client, keys, state="done")
    await coord.run_volop(done)
    assert (await _stored(etcd_client, keys)).state == "done"
    assert len(rep.reverts) == 2 and "op1" not in coord._ran_ops          # noqa: SLF001


async def test_a_handed_back_revert_whose_outcome_write_fails_again_is_not_run_twice(
        setup, etcd_client, keys):  # noqa: F811
    """Review of 1bf8f76: handed back, the remembered outcome's write met etcd out again; the
    memory was already dropped, and the engine's next try claimed the pending record and
    reverted a second time. Now the memory is kept until the outcome is written."""
    from chunk.storage.coordinator import NotServing
    coord, rep, flaky = await _setup(setup, etcd_client, fails=3)
    _arm_after_reverts(rep, flaky)
    with pytest.raises((NotServing, EtcdUnavailable)):
        await coord.run_volop(await _op(etcd_client, keys))
    await _op(etcd_client, keys, executor="other")            # moved away ...
    back = await _op(etcd_client, keys)                       # ... and handed back, pending
    flaky.raised = 0                                          # etcd out again for the report
    with pytest.raises((NotServing, EtcdUnavailable)):
        await coord.run_volop(back)
    coord.engine.etcd = etcd_client                           # etcd back
    await coord.run_volop(await _stored(etcd_client, keys))   # the engine's next try
    got = await _stored(etcd_client, keys)
    assert (got.state, got.error) == ("done", None), got
    assert rep.reverts == [(0, 5, 1, 3), (1, 5, 1, 3)], rep.reverts


async def test_a_pending_revert_that_was_claimed_before_is_failed_as_interrupted(
        setup, etcd_client, keys):  # noqa: F811
    """Review (pre-existing): the meta moves a running revert whose executor is not live to
    another server as pending, keeping its claim epoch. The new server claimed it fresh and
    reverted again, rolling back writes answered after the first run. A pending revert with a
    claim is now failed as interrupted, not run."""
    coord, rep, flaky = await _setup(setup, etcd_client)
    op = await _op(etcd_client, keys, claim_epoch=7)          # claimed elsewhere, moved here
    await coord.run_volop(op)
    got = await _stored(etcd_client, keys)
    assert got.state == "failed" and "interrupted" in got.error, got
    assert "stopped answering and then moved here" in got.error
    assert rep.reverts == []
