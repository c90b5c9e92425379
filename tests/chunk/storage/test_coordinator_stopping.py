"""A write reaching the coordinator once its chunk server is stopping ends at once with a
retryable error (NOT READY), instead of waiting for a lease that never comes back. Driven
over the in-memory stand-ins of test_coordinator_ownership (its lease double)."""

from __future__ import annotations

import asyncio
import time

import pytest

from chunk.scsi.sense import NOT_READY, ScsiError
from chunk.storage import coordinator as cm
from tests.chunk.storage.test_coordinator_ownership import _SrvReplica, _setup

pytestmark = pytest.mark.timeout(30)


def test_a_write_after_stop_fails_not_ready_instead_of_waiting_for_the_lease(monkeypatch):
    async def main():
        reps = {k: _SrvReplica(k) for k in "ABC"}
        coord, lease, acquired = _setup(monkeypatch, reps, 0.0)
        await asyncio.wait_for(coord.write(0, b"0" * 4096), 3)       # owner, as in service
        sent = sum(len(r.epochs) for r in reps.values())
        # SIGTERM: Registration.run sets the deadline to 0 and it never comes back.
        lease.lease_deadline, lease.stopping = 0.0, True
        t0 = time.monotonic()
        with pytest.raises(ScsiError) as got:
            await asyncio.wait_for(coord.write(4096, b"1" * 4096), 3)
        assert time.monotonic() - t0 < 2                  # at once (the first lease check raises), not after the 3 s lease wait
        assert (got.value.key, got.value.asc, got.value.ascq) == (NOT_READY, 0x04, 0x01)
        assert sum(len(r.epochs) for r in reps.values()) == sent     # nothing sent
        # Not stopping (a lapsed lease, etcd away): writes wait for the lease as before.
        lease.stopping = False
        w = asyncio.ensure_future(coord.write(8192, b"2" * 4096))
        await asyncio.sleep(0.3)
        assert not w.done()
        lease.lease_gen, lease.lease_deadline = 2, time.monotonic() + 60
        await asyncio.wait_for(w, 3)
    asyncio.run(main())


def test_io_waiting_for_an_engine_that_never_starts_fails_not_ready_in_bounded_time(monkeypatch):
    """A volume's first I/O waited for ``engine.started`` for ever: with the replication port
    in use the engine never starts, and an initiator sent here never got an answer."""
    async def main():
        monkeypatch.setattr(cm, "START_WAIT", 0.5, raising=False)
        reps = {k: _SrvReplica(k) for k in "ABC"}
        coord, lease, acquired = _setup(monkeypatch, reps, 0.0)
        coord.engine.started = asyncio.Event()            # never set
        coord._is_ready = False                           # noqa: SLF001 - as opened, first I/O
        t0 = time.monotonic()
        with pytest.raises(ScsiError) as got:
            await asyncio.wait_for(coord.read(0, 4096), 3)
        assert 0.4 < time.monotonic() - t0 < 2.5          # after START_WAIT (0.5 s), not before
        assert (got.value.key, got.value.asc, got.value.ascq) == (NOT_READY, 0x04, 0x01)
        assert coord._ready_task is None                  # noqa: SLF001 - the next I/O tries again
    asyncio.run(main())
