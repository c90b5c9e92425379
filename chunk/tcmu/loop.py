"""Serve one TCMU command ring with a ``LogicalUnit``: the same SCSI layer as the
built-in iSCSI target, so LIO adds transport (iSCSI login, sessions, ACLs, PRs)
and nothing about how a CDB is executed changes.

The kernel core has already done what needs the I_T nexus (REPORT LUNS, PR
and RESERVE, unit attentions, write protection of a mapped LUN) before a
command reaches the ring, and TCMU does not say which initiator sent it, so
every command runs under one nexus.

Commands run concurrently as asyncio tasks. Answers are written at
``cmd_tail`` (out of order when the kernel offers CAP_OOOC, in ring order
otherwise) and the kernel is kicked once per batch. An entry that points
outside the mapping fails its command with HARDWARE ERROR / INTERNAL TARGET
FAILURE; a ring that cannot be walked (bad head or entry length) is handed to
``reset_ring``, which makes the kernel fail every queued command with CHECK
CONDITION and restart the ring at 0, instead of leaving the LUN hanging.

A loop serves only what the kernel queues after it starts (it begins at the head,
never replaying what an earlier server left in the ring).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Callable

from chunk.iscsi.target import not_ready
from chunk.scsi import LogicalUnit, Nexus
from chunk.scsi.sense import CHECK_CONDITION, HARDWARE_ERROR, fixed_sense

from . import ring

log = logging.getLogger(__name__)

INTERNAL_TARGET_FAILURE = fixed_sense(HARDWARE_ERROR, 0x44, 0x00)
NEXUS = Nexus("tcmu", "lio", 1)


class CommandLoop:
    """Runs every command the kernel queues on ``dev`` (a mapped uio device, or any object
    with ``buf``, ``size``, ``fileno()``, ``ack()``, ``kick()``) through ``unit``."""

    def __init__(self, dev, unit: LogicalUnit, *, name: str = "",
                 reset_ring: Callable[[], None] | None = None,
                 stale: Callable[[], bool] | None = None):
        self.dev, self.unit, self.name = dev, unit, name or getattr(dev, "name", "tcmu")
        self.reset_ring = reset_ring
        # While ``stale()`` (the export catalog cannot be trusted: an ACL may have been
        # revoked), every command is answered NOT READY, as the built-in target does.
        self.stale = stale
        self.mb = ring.read_mailbox(dev.buf, dev.size)
        # Serving starts at the head: an entry between tail and head was queued before this
        # loop existed, and the kernel may already have answered it (cmd_time_out), or a
        # previous loop may have (out-of-order completion) while it still sat in the ring.
        # Running it now could land an old WRITE over newer data, or answer a command twice
        # (the kernel then declares the ring broken). Whoever starts a loop on a ring that
        # held commands first has the kernel fail them (``action/reset_ring``, as
        # ``chunk.lio.LioFrontend._attach`` does) so the host retries them.
        self._next = ring.head(dev.buf)
        self._slots: deque[ring.Entry] = deque()          # unanswered entries from the tail on
        self._results: dict[int, tuple[int, bytes | None, int | None]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._generation = 0
        self._reading = False
        self.commands = 0
        self.failed_entries = 0
        self.resets = 0
        self.busy = 0.0          # seconds spent in the SCSI layer, summed over commands

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self.dev.fileno(), self._wake)
        self._reading = True
        self._wake()

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop taking commands; let the running ones answer (bounded), then let go."""
        if self._reading:
            asyncio.get_running_loop().remove_reader(self.dev.fileno())
            self._reading = False
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        late = list(self._tasks)
        for t in late:
            t.cancel()
        if late:          # a cancelled task still touches the ring as it unwinds: the map outlives it
            await asyncio.gather(*late, return_exceptions=True)
        if self.commands:
            log.info("%s: served %d commands, %.1f ms each in the SCSI layer on average",
                     self.name, self.commands, 1000 * self.busy / self.commands)

    # -- the ring --------------------------------------------------------------------

    def _wake(self) -> None:
        self.dev.ack()
        buf = self.dev.buf
        try:
            entries = ring.pending(buf, self.mb, self.dev.size, self._next, ring.head(buf))
        except ring.RingError as e:
            self._broken(e)
            return
        gen = self._generation
        for e in entries:
            self._next = (e.pos + e.length) % self.mb.cmdr_size
            self._slots.append(e)
            if e.op != ring.OP_CMD:
                continue
            self.commands += 1
            if e.error:
                self.failed_entries += 1
                log.error("%s: TCMU command %d failed: %s", self.name, e.cmd_id, e.error)
                self._results[e.cmd_id] = (CHECK_CONDITION, INTERNAL_TARGET_FAILURE, None)
                continue
            t = asyncio.ensure_future(self._run(e, gen))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)
        self._flush()

    async def _run(self, e: ring.Entry, gen: int) -> None:
        buf, unit = self.dev.buf, self.unit
        read_len = None
        t0 = time.monotonic()
        try:
            want = unit.data_out_length(e.cdb)
            if self.stale is not None and self.stale():
                res = not_ready(e.cdb)            # nothing runs (REQUEST SENSE: the sense as data)
            else:
                data_out = ring.gather(buf, e.iovs, min(want, e.data_length)) if want else None
                res = await unit.execute(e.cdb, memoryview(data_out) if data_out is not None else None,
                                         e.data_length, NEXUS)
            status, sense = res.status, res.sense
            if not want and e.data_length and res.data is not None and gen == self._generation:
                read_len = ring.scatter(buf, e.iovs, memoryview(res.data)[:e.data_length])
        except Exception:  # noqa: BLE001 - one command must not take the LUN down
            log.exception("%s: command %s failed", self.name, e.cdb[:1].hex())
            status, sense = CHECK_CONDITION, INTERNAL_TARGET_FAILURE
        self.busy += time.monotonic() - t0
        if gen != self._generation:          # the ring was reset under us: the kernel failed it
            return
        self._results[e.cmd_id] = (status, sense, read_len)
        self._flush()

    def _flush(self) -> None:
        """Answer what can be answered at the tail; move the tail; kick the kernel once."""
        buf, mb = self.dev.buf, self.mb
        tail, moved = ring.tail(buf), False
        while self._slots:
            e = self._slots[0]
            if e.op == ring.OP_CMD:
                if e.cmd_id in self._results:
                    cmd_id = e.cmd_id
                elif mb.ooo and self._results:
                    cmd_id = next(iter(self._results))
                else:
                    break
                status, sense, read_len = self._results.pop(cmd_id)
                ring.write_response(buf, mb, e.pos, cmd_id, status, sense, read_len)
            elif e.op not in (ring.OP_PAD, ring.OP_TMR):
                ring.mark_unknown(buf, mb, e.pos, e.cmd_id)
            self._slots.popleft()
            tail = (e.pos + e.length) % mb.cmdr_size
            moved = True
        if moved:
            ring.set_tail(buf, tail)
            self.dev.kick()

    def _broken(self, err: Exception) -> None:
        self.resets += 1
        self._generation += 1
        self._slots.clear()
        self._results.clear()
        if self.reset_ring is None:
            log.error("%s: %s; no way to reset the ring, not serving it any more", self.name, err)
            asyncio.get_running_loop().remove_reader(self.dev.fileno())
            self._reading = False
            return
        log.error("%s: %s; resetting the ring (the kernel fails the queued commands)", self.name, err)
        try:
            self.reset_ring()
        except Exception:  # noqa: BLE001
            log.exception("%s: ring reset failed", self.name)
        self._next = ring.tail(self.dev.buf)
