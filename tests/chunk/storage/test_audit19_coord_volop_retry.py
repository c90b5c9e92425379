"""A volume op that fails NotServing before it is claimed (etcd out of reach for the owner
read, ``_owner_confirmed``) is left pending and assigned to this server, and nothing else
starts it again: the meta moves an op only off an executor that is not live. The engine's
runner ended there (the op pending until a restart); it now tries again with backoff while
the record still assigns the op here, and stops once it does not.

test_volops' harness (a real Coordinator's ``run_volop`` over a real etcd, in-memory
replicas), run by the real StorageEngine's assignment side (``_on_volop``, ``_spawn``,
``_run_volop``); the owner read fails once through test_recovery_runner_errors' _FlakyEtcd
(the real etcd, whose n-th get of a key raises EtcdUnavailable)."""

from __future__ import annotations

import asyncio

import pytest

from chunk.storage.engine import StorageEngine

from .test_recovery_runner_errors import _FlakyEtcd
from .test_volops import _op, _stored, keys, setup  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(60)


def _engine(etcd, keys, coord) -> StorageEngine:  # noqa: F811
    eng = StorageEngine.__new__(StorageEngine)        # the assignment side only
    eng._running, eng._rerun, eng._stop = {}, {}, asyncio.Event()   # noqa: SLF001
    eng.etcd, eng.keys, eng.chunk_id = etcd, keys, "me"

    async def coordinator(vid):
        return coord

    async def release(c):
        pass
    eng.coordinator, eng.release = coordinator, release
    return eng


async def _ran(eng, key, op, wait: float = 20):
    await eng._on_volop(key, op.encode())                             # noqa: SLF001
    runner = eng._running[f"op/{op.op_id}"]                            # noqa: SLF001
    try:
        await asyncio.wait_for(asyncio.shield(runner), wait)
    except Exception:  # noqa: BLE001 - the old runner ended with the NotServing
        pass
    finally:
        eng._stop.set()                                                # noqa: SLF001
        if not runner.done():
            runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_a_volop_whose_owner_read_fails_once_runs_on_the_next_try(setup, etcd_client, keys):  # noqa: F811
    coord, rep = setup
    await coord.ensure_owner()                           # owned (real etcd)
    flaky = _FlakyEtcd(etcd_client, keys.owner("v"), {1}, set())
    coord.engine.etcd = flaky                            # the owner read before the claim fails
    op = await _op(etcd_client, keys)
    await _ran(_engine(etcd_client, keys, coord), keys.volop("v", "op1"), op)
    assert flaky.raised == 1, "the injected etcd error was not hit"
    got = await _stored(etcd_client, keys)
    assert got.state == "done", got
    assert rep.reverts == [(0, coord.epoch, 1, 3), (1, coord.epoch, 1, 3)]


async def test_the_retry_stops_once_the_op_is_no_longer_assigned_here(setup, etcd_client, keys):  # noqa: F811
    """The owner read keeps failing; meanwhile the meta moves the op to another server: the
    runner reads the record before its next try and ends, running nothing."""
    coord, rep = setup
    await coord.ensure_owner()
    coord.engine.etcd = _FlakyEtcd(etcd_client, keys.owner("v"), set(range(1, 100)), set())
    op = await _op(etcd_client, keys)
    eng = _engine(etcd_client, keys, coord)
    await eng._on_volop(keys.volop("v", "op1"), op.encode())           # noqa: SLF001
    runner = eng._running["op/op1"]                                    # noqa: SLF001
    await asyncio.sleep(0.2)
    assert not runner.done()                              # waiting out its backoff
    await _op(etcd_client, keys, executor="other")        # the meta moved it
    try:
        await asyncio.wait_for(asyncio.shield(runner), 10)
    finally:
        if not runner.done():
            runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    assert (await _stored(etcd_client, keys)).executor == "other"
    assert rep.reverts == []


@pytest.mark.parametrize("where", ["read", "swap"])
async def test_a_volop_whose_claim_meets_etcd_unreachable_runs_on_the_next_try(
        setup, etcd_client, keys, where):  # noqa: F811
    """The claim's read of the op, or its compare-and-swap, fails once (etcdserver: leader
    changed): a raw etcd error came out of ``run_volop`` and ended the runner, the op left
    pending. NotServing now (nothing run yet), tried again: claimed and run at this epoch."""
    coord, rep = setup
    await coord.ensure_owner()
    flaky = _FlakyEtcd(etcd_client, keys.volop("v", "op1"),
                       {1} if where == "read" else set(), {1} if where == "swap" else set())
    coord.engine.etcd = flaky
    op = await _op(etcd_client, keys)
    await _ran(_engine(etcd_client, keys, coord), keys.volop("v", "op1"), op)
    assert flaky.raised == 1, "the injected etcd error was not hit"
    got = await _stored(etcd_client, keys)
    assert (got.state, got.claim_epoch) == ("done", coord.epoch), got
    assert len(rep.reverts) == 2


async def test_opening_the_volume_meets_etcd_unreachable_and_the_op_runs_on_the_next_try(
        setup, etcd_client, keys):  # noqa: F811
    """Review of a0a8d9a: ``engine.coordinator`` reads the volume record from etcd for a volume
    not open here; its raw etcd error ended the runner, the op left pending. Now it is tried
    again like NotServing."""
    from zstore.etcd import EtcdUnavailable
    coord, rep = setup
    await coord.ensure_owner()
    op = await _op(etcd_client, keys)
    eng = _engine(etcd_client, keys, coord)
    calls = 0

    async def coordinator(vid):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise EtcdUnavailable("etcd out")
        return coord
    eng.coordinator = coordinator
    await _ran(eng, keys.volop("v", "op1"), op)
    got = await _stored(etcd_client, keys)
    assert got.state == "done", got
    assert len(rep.reverts) == 2


async def test_one_coordinator_across_the_tries(setup, etcd_client, keys):  # noqa: F811
    """Review of a0a8d9a: the claim's swap lands and its reply is lost (NotServing). The runner
    released its coordinator between tries: an unmapped volume's closed, and the next try's new
    coordinator took a new epoch and failed the op, never run, as "interrupted". Now it keeps
    one coordinator until the op ends: claimed again at the same epoch, run once."""
    from zstore.etcd import EtcdUnavailable

    class LandedThenLost(_FlakyEtcd):
        async def transaction(self, **kw):
            self.txns += 1
            res = await self._etcd.transaction(**kw)
            if self.txns in self.fail_txn:
                self.raised += 1
                raise EtcdUnavailable("reply lost")
            return res

    coord, rep = setup
    await coord.ensure_owner()
    flaky = LandedThenLost(etcd_client, b"-", set(), {1})
    coord.engine.etcd = flaky
    op = await _op(etcd_client, keys)
    eng = _engine(etcd_client, keys, coord)
    opened, released = [], []

    async def coordinator(vid):
        opened.append(vid)
        return coord

    async def release(c):
        released.append(c)
    eng.coordinator, eng.release = coordinator, release
    await _ran(eng, keys.volop("v", "op1"), op)
    assert flaky.raised == 1, "the injected lost reply was not hit"
    got = await _stored(etcd_client, keys)
    assert (got.state, got.claim_epoch) == ("done", coord.epoch), got
    assert len(rep.reverts) == 2
    assert (len(opened), released) == (1, [coord])
