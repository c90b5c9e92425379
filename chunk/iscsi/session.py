"""Full-feature phase of one iSCSI connection (RFC 7143, ErrorRecoveryLevel 0).

We negotiate MaxConnections=1, so a session has exactly one connection and
this class is both. It owns the command window (CmdSN ordering,
ExpCmdSN/MaxCmdSN), write data collection (immediate data, unsolicited
Data-Out, R2T), Data-In, NOP pings, task management, Text (SendTargets) and
Logout. SCSI semantics live in ``chunk.scsi``; which LUNs this initiator may
use comes from a ``LunResolver`` consulted on every command, so ACL changes
apply to the next command. A command that waits between its arrival and its
start (a write for its Data-Out, however long the initiator holds it back) is
checked again when it starts (``_start_late``): it runs only on the LU that its
LUN resolves to then, and is answered as a new command there would be.

Requests are taken in batches: every complete PDU already received is decoded
in one call (``P.read_buffered``), and only an incomplete one is awaited.
Responses are written with ``writelines`` and no per-PDU drain: the reader
loop applies back-pressure only when the socket buffer is large, which lets
many completions share one send.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

from . import pdu as P
from .constants import (RESERVED_TAG, AsyncEvent, LogoutReason, LogoutResponseCode, RejectReason,
                        ScsiStatus, TmfFunction, TmfResponse)
from .errors import ProtocolError
from .negotiation import NegotiationError, SessionParams, negotiate_full_feature
from .text import TextAssembler, encode_text, split_text

log = logging.getLogger(__name__)

SERIAL_MASK = 0xFFFFFFFF
WRITE_BUFFER_HIGH = 4 << 20
OUT_BATCH_MAX = 256             # queued answer pieces that make a batch go out before it ends
FLUSH_EVERY = 8                 # answer pieces queued outside a batch that go out at once
WRITE_BUFFER_BUDGET = 64 << 20  # bytes of write buffers a session grants before R2Ts wait
# How long a session that ends waits for its commands still running before it cancels them
# (unanswered, as aborted ones): its end (a shutdown, a reinstatement, a Logout) must not wait
# forever for a command stuck below (ownership, a replica); the host retries what got no answer.
CLOSE_GRACE = 10.0


def sn_lt(a: int, b: int) -> bool:
    """RFC 1982 serial-number "a < b" for 32-bit CmdSN/StatSN."""
    return a != b and ((b - a) & SERIAL_MASK) < 0x80000000


def sn_lte(a: int, b: int) -> bool:
    return a == b or sn_lt(a, b)


@dataclass(frozen=True, slots=True)
class _Answer:
    """A SCSI result the session gives itself (an iSCSI condition, RFC 7143 §11.4.7.2)."""
    status: int
    data: bytes | None = None
    sense: bytes | None = None


# CHECK CONDITION, ABORTED COMMAND, 0C/0D: the iSCSI condition "Incorrect amount of data"
INCORRECT_AMOUNT_OF_DATA = _Answer(ScsiStatus.CHECK_CONDITION, None,
                                   bytes([0x70, 0, 0x0B, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x0C, 0x0D, 0, 0, 0, 0]))

# SPC-4: the unit attention a CLEAR TASK SET leaves the other nexuses whose tasks it cleared
ASC_COMMANDS_CLEARED_BY_ANOTHER_INITIATOR = (0x2F, 0x00)


class LunResolver(Protocol):
    """What the session asks the target about LUNs (implemented over the catalog)."""

    def unit(self, lun: int) -> Any | None:            # a chunk.scsi LogicalUnit, or None if masked
        ...

    # Optional: ``generation``, a value that changes with every change that may change what
    # ``unit`` answers (the catalog's generation, read live, not a cache's). With it, a command
    # that waited is resolved again only when it changed; without it, always.

    def visible_luns(self) -> list[int]:
        ...

    def send_targets(self, which: str) -> list[tuple[str, list[str]]]:
        """[(target iqn, [TargetAddress values])] for a SendTargets=``which`` request."""
        ...


@dataclass(eq=False, slots=True)
class Task:
    cmd: P.ScsiCommand
    lun: int
    unit: Any
    want: int = 0                       # data-out bytes the command uses: buffered and solicited
    edtl: int = 0                       # data-out bytes the initiator may send (EDTL); beyond want: dropped
    buf: bytearray | None = None        # want bytes once granted; until then at most a first burst
    held: int = 0                       # bytes of buf counted in the session's write buffer total
    data: bytes | memoryview | None = None
    received: int = 0
    unsolicited_done: bool = True
    next_r2t_offset: int = 0
    r2tsn: int = 0
    outstanding: dict[int, list[int]] = field(default_factory=dict)   # ttt -> [offset, length, next DataSN, received]
    unsol_datasn: int = 0
    aborted: bool = False
    runner: asyncio.Task | None = None
    gen: Any = None                     # the resolver's generation when unit was resolved


class _Continue:
    """Awaitable that resumes a coroutine which already ran up to its first wait."""

    __slots__ = ("coro", "first")

    def __init__(self, coro, first):
        self.coro, self.first = coro, first

    def __await__(self):
        pending = self.first
        while True:
            try:
                sent = yield pending
            except BaseException as e:          # noqa: BLE001 - cancellation, forwarded
                try:
                    pending = self.coro.throw(e)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    pending = self.coro.send(sent)
                except StopIteration as stop:
                    return stop.value


async def _resume(coro, first):
    return await _Continue(coro, first)


class Session:
    """One logged-in connection in full-feature phase."""

    close_grace = CLOSE_GRACE

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 params: SessionParams, *, isid: bytes, tsih: int, statsn: int, expcmdsn: int,
                 resolver: LunResolver, scsi: Any, nexus: Any, window: int = 128,
                 nop_interval: float = 15.0, nop_timeout: float = 15.0,
                 on_close: Callable[["Session"], None] | None = None,
                 write_buffer_budget: int = WRITE_BUFFER_BUDGET,
                 peers: Callable[[], Iterable["Session"]] | None = None, cid: int | None = None):
        self.r, self.w, self.p = reader, writer, params
        # This connection's CID (from its Login). The session's only one (MaxConnections=1), so
        # a Logout naming another CID names none of the session's. None: not told, any matches.
        self.cid = cid
        try:
            # cached for the answers' flush: asyncio.get_running_loop() is a getpid() syscall
            self._loop = asyncio.get_running_loop()
        except RuntimeError:            # built outside a loop (unit tests): set by run()
            self._loop = asyncio.get_event_loop_policy().get_event_loop()
        self.isid, self.tsih = isid, tsih
        self.statsn = statsn & SERIAL_MASK
        self.expcmdsn = expcmdsn & SERIAL_MASK
        self.window = window
        self.resolver, self.scsi, self.nexus = resolver, scsi, nexus
        self._resolver_gen = hasattr(resolver, "generation")    # see LunResolver
        self.nop_interval, self.nop_timeout = nop_interval, nop_timeout
        self.on_close = on_close
        # Every session of this target server, this one included (the target's table): the
        # scope of LOGICAL UNIT RESET, CLEAR TASK SET and the target resets. None: only this one.
        self.peers = peers
        self.tasks: dict[int, Task] = {}          # ITT -> task (received, not yet answered)
        self.units_used: set[Any] = set()         # LUs told when this nexus goes away
        # Write data buffers: a command's full buffer (up to max_transfer_bytes) is granted while
        # the session holds less than the budget (or none at all); a command beyond it gets only
        # room for its unsolicited data, and its R2Ts wait (FIFO) until buffers are released.
        # Held at most: budget + one command + window * FirstBurstLength.
        self.write_buffer_budget = write_buffer_budget
        self._buf_bytes = 0                       # bytes held by tasks' write buffers
        self._buf_full = 0                        # tasks holding a granted (full) buffer
        self._buf_waiting: list[Task] = []        # tasks whose R2Ts wait for a grant
        self.pending: dict[int, P.PDU] = {}       # CmdSN -> out-of-order non-immediate request
        # ITT -> unsolicited Data-Out received for a write held in ``pending`` (legal: it may
        # come before the CmdSN gap fills), filed once the command runs. At most
        # FirstBurstLength per command, and write_buffer_budget for all of them.
        self._early: dict[int, list[P.DataOut]] = {}
        self._early_bytes = 0
        self._ttt = 0x1000
        self._r2t_owner: dict[int, Task] = {}     # TTT -> task
        self._discarding: dict[int, None] = {}    # ITTs answered before their unsolicited data came
        self._discarding_ttt: dict[int, None] = {}   # R2T tags of aborted tasks: Data-Out dropped
        self._nop_ttt: dict[int, float] = {}      # our NOP-In pings awaiting an answer
        self._text_in = TextAssembler()
        self._text_in_ttt: int | None = None     # TTT the initiator's next text piece carries
        self._out: list[bytes | memoryview] = []
        self._in_batch = False
        self._flush_pending = False
        self._text_out: dict[int | None, list[bytes]] = {}   # TTT -> pieces of a long text answer
        self._last_rx = time.monotonic()
        self._closing = False
        self._logout_requested = False
        self._frozen_maxcmdsn: int | None = None   # set while closing down: grant no new CmdSNs
        self._granted = (self.expcmdsn + window - 1) & SERIAL_MASK   # highest MaxCmdSN computed
        self._nexus_released = False               # units told this nexus is gone (once)
        self._ended = asyncio.Event()              # _shutdown has finished
        self.since = round(time.time(), 3)         # wall clock, for session listings
        self.hd, self.dd = params.header_digest, params.data_digest
        self.mrdsl = params.max_recv_data_segment_length
        self.msdsl = params.max_send_data_segment_length

    # --- sending --------------------------------------------------------------

    @property
    def maxcmdsn(self) -> int:
        """ExpCmdSN + free window slots - 1, but never below one already granted.

        Tasks of immediate commands take slots without moving ExpCmdSN, so the plain
        value can go down; an initiator never lowers its MaxCmdSN (RFC 7143 §4.2.2.1:
        a smaller one is ignored) and may already have sent the CmdSNs up to it, which
        would be dropped as out of window and the session would stall. So the window
        only shrinks by not growing; a CmdSN once granted is always taken."""
        if self._frozen_maxcmdsn is not None:
            return self._frozen_maxcmdsn
        free = self.window - len(self.tasks)
        m = (self.expcmdsn + free - 1) & SERIAL_MASK if free > 0 else (self.expcmdsn - 1) & SERIAL_MASK
        granted = self._granted
        if m != granted and ((m - granted) & SERIAL_MASK) < 0x80000000:     # sn_lt(granted, m)
            self._granted = m
            return m
        return granted

    def _send(self, pdu: P.PDU, status: bool = True) -> None:
        """Stamp StatSN/ExpCmdSN/MaxCmdSN and queue on the socket."""
        if status:
            pdu.statsn = self.statsn
            self.statsn = (self.statsn + 1) & SERIAL_MASK
        elif hasattr(pdu, "statsn"):
            pdu.statsn = self.statsn
        pdu.expcmdsn = self.expcmdsn
        pdu.maxcmdsn = self.maxcmdsn
        if not self._closing or isinstance(pdu, (P.LogoutResponse, P.TaskMgmtResponse, P.Reject)):
            self._out.extend(pdu.encode(self.hd, self.dd))
            if not self._in_batch and not self._flush_pending:
                self._flush_pending = True
                self._loop.call_soon(self._flush)

    def _queue(self, hdr: bytes, data: bytes | memoryview = b"") -> None:
        """What ``_send`` does after stamping, for a header packed by hand (no AHS):
        a Data-In or SCSI Response, dropped while closing."""
        if self._closing:
            return
        out = self._out
        out.append(hdr)
        if self.hd:
            out.append(P.digest(hdr))
        if data:
            out.append(data)
            pad = P._PAD[len(data) & 3]           # noqa: SLF001
            if pad:
                out.append(pad)
            if self.dd:
                out.append(P.digest(data, pad))
        if not self._in_batch:
            if len(out) >= FLUSH_EVERY:
                # Answers completed outside a batch (the replicas' replies) leave in pieces:
                # the initiator sends the next commands while we finish the rest (as the
                # replica hop does, chunk.storage.wire.FLUSH_EVERY).
                self._flush()
            elif not self._flush_pending:
                self._flush_pending = True
                self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Hand everything queued to the socket in one writelines (one send, mostly)."""
        self._flush_pending = False
        if self._out:
            out, self._out = self._out, []
            if not self.w.is_closing():
                self.w.writelines(out)

    def _reject(self, reason: int, header: bytes | None) -> None:
        rej = P.Reject(reason=reason, data=(header or b"")[:48])
        self._send(rej)

    def _new_ttt(self) -> int:
        self._ttt = (self._ttt + 1) & 0x7FFFFFFF or 1
        return self._ttt

    # --- main loop --------------------------------------------------------------

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._pinger_task = asyncio.ensure_future(self._pinger())
        r, hd, dd, mrdsl = self.r, self.hd, self.dd, self.mrdsl
        ScsiCommand = P.ScsiCommand
        try:
            while not self._closing:
                # Every complete PDU already received, in one go; await only for more.
                batch = P.read_buffered(r, hd, dd, mrdsl)
                if not batch:
                    try:
                        pdu = await P.read_pdu(r, hd, dd, mrdsl)
                    except ProtocolError as e:
                        batch = [e]
                    else:
                        if pdu is None:
                            break
                        batch = [pdu]
                # While more requests are already buffered, answers accumulate and
                # go out together once the buffer runs dry.
                self._in_batch = True
                fatal = False
                try:
                    for pdu in batch:
                        if self._closing:
                            break
                        if isinstance(pdu, ProtocolError):
                            log.info("%s: %s", self.nexus.initiator, pdu)
                            self._reject(pdu.reason, pdu.header)
                            if pdu.fatal:
                                fatal = True
                                break
                            continue
                        self._last_rx = time.monotonic()
                        if type(pdu) is ScsiCommand and not pdu.immediate and pdu.cmdsn == self.expcmdsn \
                                and len(self.tasks) < self.window and self._frozen_maxcmdsn is None:
                            # _dispatch -> _execute -> _drain for the in-order command, inline
                            self.expcmdsn = (self.expcmdsn + 1) & SERIAL_MASK
                            self._scsi_command(pdu)
                            if self.pending:
                                await self._drain()
                        else:
                            await self._dispatch(pdu)
                        if len(self._out) > OUT_BATCH_MAX:
                            # Commands answered inline (reads of unwritten blocks, errors) pile
                            # their data up here until the batch ends: bound it by the socket.
                            self._flush()
                            if self.w.transport.get_write_buffer_size() > WRITE_BUFFER_HIGH:
                                await self._drain_socket()
                finally:
                    self._in_batch = False
                if fatal:
                    break
                if len(r._buffer) < 48:        # noqa: SLF001 - StreamReader's buffer
                    self._flush()
                if self.w.transport.get_write_buffer_size() > WRITE_BUFFER_HIGH:
                    self._flush()
                    await self._drain_socket()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._pinger_task.cancel()
            await self._shutdown()

    async def _shutdown(self) -> None:
        try:
            await self._close_down()
        finally:
            self._ended.set()

    async def _close_down(self) -> None:
        self._closing = True
        for t in list(self.tasks.values()):
            t.aborted = True
        runners = [t.runner for t in self.tasks.values() if t.runner and not t.runner.done()]
        if runners:
            await self._finish_or_cancel(runners)
        self.tasks.clear()
        self._buf_waiting.clear()
        self._early.clear()
        self._early_bytes = 0
        self._flush()
        self._release_nexus()
        if self._unsent():
            await self._drain_socket()      # a last Reject or Logout Response; bounded
        self._hang_up()
        if self.on_close:
            self.on_close(self)

    async def _finish_or_cancel(self, runners: list) -> None:
        """Let ``runners`` finish within ``close_grace``, then cancel the ones left (and wait
        a moment more for them to unwind). Cancelled while waiting (the target stopping): the
        ones left are cancelled at once, then the cancel goes on."""
        try:
            _, left = await asyncio.wait(runners, timeout=self.close_grace)
        except asyncio.CancelledError:
            for r in runners:
                r.cancel()
            raise
        if left:
            log.warning("%s: %d command(s) still running %.0fs after the session ended; cancelling "
                        "them", self.nexus.initiator, len(left), self.close_grace)
            for t in self.tasks.values():
                t.aborted = True    # a cancelled write's CHECK CONDITION is not its answer either
            for r in left:
                r.cancel()
            await asyncio.wait(left, timeout=self.close_grace)

    def _release_nexus(self) -> None:
        """Tell the units this I_T nexus is gone (SPC-2 reservation, unit attentions), once."""
        if self._nexus_released:
            return
        self._nexus_released = True
        for unit in self.units_used:
            lost = getattr(unit, "nexus_lost", None)
            if lost:
                lost(self.nexus)

    async def end_for_reinstatement(self, timeout: float) -> None:
        """A new login with this session's ISID replaces it (RFC 7143 §6.3.5): end it, and
        return only once its nexus is released, so the new session starts after that.

        A Nexus compares by value, and the new session's equals this one's. Released
        later (this session's shutdown first waits for its writes still on the
        replicas), the loss would drop the new session's own SPC-2 reservation, unit
        attentions and seen-state. So the new session waits for it, at most ``timeout``;
        past that the nexus is released now, and never again by this session."""
        await self.close()
        try:
            await asyncio.wait_for(self._ended.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("%s: reinstated session still has commands in flight after %.0fs; "
                        "releasing its nexus now", self.nexus.initiator, timeout)
        self._release_nexus()

    async def close(self) -> None:
        """Drop the connection (session reinstatement, target reset, shutdown, a peer gone)."""
        self._closing = True
        self._hang_up()

    def _unsent(self) -> int:
        """Bytes queued on the transport that the socket has not taken (0 once closed)."""
        try:
            return self.w.transport.get_write_buffer_size()
        except Exception:  # noqa: BLE001 - a transport already gone
            return 0

    def _hang_up(self) -> None:
        """Close the socket now. With data still unsent the transport is aborted (RST):
        a plain close waits for the send buffer to empty, which an initiator that stops
        reading never lets happen, and its session would never end (its run loop parked in
        a drain, its tasks and buffers held, reinstatement and resets waiting on it)."""
        try:
            if self._unsent():
                self.w.transport.abort()
            else:
                self.w.close()
        except Exception:  # noqa: BLE001
            pass

    async def _drain_socket(self) -> bool:
        """Wait until the socket takes what is queued, at most ``nop_timeout`` (the time an
        initiator has to answer a ping): one that reads nothing for that long is taken as
        gone, and the connection is aborted. False if it was (or is lost)."""
        try:
            await asyncio.wait_for(self.w.drain(), self.nop_timeout)
            return True
        except asyncio.TimeoutError:       # (before OSError: TimeoutError is one since 3.11)
            log.warning("%s: the initiator took none of %d queued bytes within %.0fs; dropping the "
                        "connection", self.nexus.initiator, self._unsent(), self.nop_timeout)
            await self.close()
            return False
        except OSError:                    # the connection is lost (reset, unreachable)
            return False

    def post_unit_attention(self, units, asc_ascq: tuple[int, int]) -> None:
        """Establish a UA for this session's nexus on each of ``units`` (the target's word,
        e.g. REPORTED LUNS DATA HAS CHANGED); it is reported on the next command there."""
        for unit in units:
            post = getattr(unit, "post_unit_attention", None)
            if post:
                post(asc_ascq, self.nexus)

    @property
    def logout_requested(self) -> bool:
        return self._logout_requested

    async def request_logout(self, within: int = 10) -> None:  # noqa: D401
        """Async message asking the initiator to log out (used for draining)."""
        if self._logout_requested:
            return
        self._logout_requested = True
        msg = P.AsyncMessage(lun=0, event=AsyncEvent.LOGOUT_REQUESTED, parameter3=within)
        self._send(msg, status=True)

    def forget_logout_request(self) -> None:
        """The reason for asking went away (undrain): a later drain asks again."""
        self._logout_requested = False

    async def close_when_idle(self, timeout: float = 30.0) -> None:
        """Close the connection at a moment no command is in flight, or after ``timeout``.

        MaxCmdSN stops advancing first (it may not move back, RFC 7143 §4.2.2.1),
        so an initiator under load runs out of window and the commands it has
        sent get answered; the ones it has not sent yet it reissues after it
        logs in again, somewhere else. Cancelling reopens the window."""
        self._frozen_maxcmdsn = self.maxcmdsn
        deadline = time.monotonic() + timeout
        try:
            while (self.tasks or self.pending) and not self._closing and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if self.tasks or self.pending:
                log.warning("%s: %d commands still in flight after %.0fs; closing anyway",
                            self.nexus.initiator, len(self.tasks) + len(self.pending), timeout)
            self._flush()
            try:
                await asyncio.wait_for(self.w.drain(), max(0.1, deadline - time.monotonic()))
            except (ConnectionError, asyncio.TimeoutError):
                pass
        except asyncio.CancelledError:
            self._frozen_maxcmdsn = None
            raise
        await self.close()

    async def _pinger(self) -> None:
        """Target-initiated NOP-In pings: find dead initiators on idle connections."""
        while True:
            await asyncio.sleep(self.nop_interval)
            now = time.monotonic()
            if any(now - sent > self.nop_timeout for sent in self._nop_ttt.values()):
                log.warning("%s: no answer to NOP-In within %.0fs; dropping the connection",
                            self.nexus.initiator, self.nop_timeout)
                await self.close()
                return
            if now - self._last_rx >= self.nop_interval and not self._nop_ttt:
                ttt = self._new_ttt()
                self._nop_ttt[ttt] = now
                self._send(P.NopIn(itt=RESERVED_TAG, ttt=ttt, lun=0), status=False)

    # --- command ordering ----------------------------------------------------------

    async def _dispatch(self, pdu: P.PDU) -> None:
        if isinstance(pdu, P.DataOut):
            self._data_out(pdu)
            return
        if isinstance(pdu, P.SnackRequest):
            self._reject(RejectReason.COMMAND_NOT_SUPPORTED, pdu.header())
            return
        if isinstance(pdu, P.LoginRequest):
            self._reject(RejectReason.PROTOCOL_ERROR, pdu.header())
            self._closing = True
            return
        if isinstance(pdu, P.NopOut):
            if pdu.ttt != RESERVED_TAG:
                # The answer to our ping (its TTT copied), whatever its ITT: a valid one asks
                # for a NOP-In back too (RFC 7143 §11.18.1), answered below like any ping.
                self._nop_ttt.pop(pdu.ttt, None)
            if pdu.itt == RESERVED_TAG:
                return                              # carries no CmdSN, asks for nothing
        if pdu.immediate:
            if isinstance(pdu, P.ScsiCommand) and len(self.tasks) >= 2 * self.window:
                self._reject(RejectReason.IMMEDIATE_COMMAND_REJECT, pdu.header())   # no CmdSN window for these
                return
            await self._execute(pdu)
            return
        cmdsn = pdu.cmdsn
        if not sn_lte(cmdsn, self.maxcmdsn):
            return      # beyond the window we granted: ignored (RFC 7143 §4.2.2.1), no task made
        if cmdsn == self.expcmdsn:
            self.expcmdsn = (self.expcmdsn + 1) & SERIAL_MASK
            await self._execute(pdu)
            await self._drain()
        elif sn_lt(self.expcmdsn, cmdsn) and sn_lte(cmdsn, (self.expcmdsn + self.window) & SERIAL_MASK):
            if cmdsn not in self.pending:           # early: hold until the gap fills
                self.pending[cmdsn] = pdu
                if type(pdu) is P.ScsiCommand and pdu.write and not pdu.final and not self.p.initial_r2t \
                        and pdu.itt not in self.tasks and pdu.itt not in self._early:
                    self._early[pdu.itt] = []       # its unsolicited Data-Out may come first
        # else: outside the window or a duplicate: silently ignored (RFC 7143 §4.2.2.1)

    async def _drain(self) -> None:
        """Run held requests whose turn has come."""
        while self.expcmdsn in self.pending:
            nxt = self.pending.pop(self.expcmdsn)
            self.expcmdsn = (self.expcmdsn + 1) & SERIAL_MASK
            await self._execute(nxt)
            if self._early and type(nxt) is P.ScsiCommand:
                self._file_early(nxt.itt)

    def _file_early(self, itt: int) -> None:
        """The Data-Out that came for a held write before its turn, filed now that it runs
        (checked as if it came now: DataSN, offsets, FirstBurstLength)."""
        held = self._early.pop(itt, None)
        if not held:
            return
        for d in held:
            self._early_bytes -= len(d.data)
            if not self._closing:
                self._data_out(d)

    def _hold_early(self, d: P.DataOut, held: list[P.DataOut]) -> None:
        n = len(d.data)
        if sum(len(x.data) for x in held) + n > self.p.first_burst_length \
                or self._early_bytes + n > self.write_buffer_budget:
            self._protocol_error(d, "unsolicited data for a held command beyond FirstBurstLength "
                                    "or the session's write buffer budget")
            return
        held.append(d)
        self._early_bytes += n

    def _drop_early(self, itt: int) -> None:
        """A held write is aborted: its unsolicited Data-Out, held or still to come, dropped."""
        held = self._early.pop(itt, None)
        if held:
            self._early_bytes -= sum(len(d.data) for d in held)
            if held[-1].final:
                return                              # all of it came: nothing more to drop
        self._discard_later(self._discarding, itt)

    async def _execute(self, pdu: P.PDU) -> None:
        if isinstance(pdu, P.ScsiCommand):
            self._scsi_command(pdu)
        elif isinstance(pdu, P.NopOut):
            if pdu.itt != RESERVED_TAG:       # RESERVED_TAG: a placeholder for an aborted CmdSN
                # The ping data reflected, limited to the initiator's MaxRecvDataSegmentLength
                # (RFC 7143 §11.18.3): never a data segment longer than it may receive.
                data = pdu.data
                if len(data) > self.msdsl:
                    data = data[:self.msdsl]
                self._send(P.NopIn(itt=pdu.itt, ttt=RESERVED_TAG, lun=pdu.lun, data=data))
        elif isinstance(pdu, P.TaskMgmtRequest):
            await self._task_mgmt(pdu)
        elif isinstance(pdu, P.TextRequest):
            self._text(pdu)
        elif isinstance(pdu, P.LogoutRequest):
            await self._logout(pdu)
        else:
            self._reject(RejectReason.COMMAND_NOT_SUPPORTED, pdu.header())

    # --- SCSI commands ---------------------------------------------------------------

    def _scsi_command(self, cmd: P.ScsiCommand) -> None:
        itt = cmd.itt
        tasks = self.tasks
        if itt == RESERVED_TAG:
            # RFC 7143 §11.2.1.8: 0xffffffff is never a task's ITT (it marks a NOP-In that asks
            # nothing, a ping's answer, a Reject): Invalid PDU Field, and the command is not run
            # (its answer would carry that tag). Unsolicited data announced for it is dropped.
            if cmd.write and not cmd.final and not self.p.initial_r2t:
                self._discard_later(self._discarding, itt)
            self._reject(RejectReason.INVALID_PDU_FIELD, cmd.header())
            return
        if itt in tasks:
            if cmd.write and not cmd.final:
                # Unsolicited Data-Out follows it, with this ITT and no TTT: nothing tells it
                # from the live task's own, which would take it (another command's data written
                # at the live task's LBA). The stream cannot be kept apart: close.
                self._protocol_error(cmd, f"ITT {itt:#x} reused by a write whose data follows")
                return
            self._reject(RejectReason.TASK_IN_PROGRESS, cmd.header())
            return
        raw = cmd.lun
        lun = -1 if raw >> 63 else (raw >> 48) & 0x3FFF     # P.decode_lun, inline: once per command
        cdb = cmd.cdb
        unit = self.resolver.unit(lun) if lun >= 0 else None
        task = Task(cmd, lun, unit)
        tasks[itt] = task
        if unit is not None and unit not in self.units_used:
            self.units_used.add(unit)
        if cdb[0] == 0xA0 or unit is None:      # REPORT LUNS, or a LUN this initiator may not see
            if cmd.write and not cmd.final and not self.p.initial_r2t:
                # Its unsolicited Data-Out still comes after this answer: taken and dropped, as
                # LIO does, not a protocol error ending the session (a LUN masked mid-I/O).
                self._discard_later(self._discarding, itt)
            self._finish_inline(task, self._no_unit_result(task))
            return
        edtl = cmd.expected_length
        if cmd.write and edtl:
            imm = cmd.data
            n = len(imm)
            p = self.p
            if n > edtl or n > p.first_burst_length:
                tasks.pop(itt, None)
                self._reject(RejectReason.PROTOCOL_ERROR, cmd.header())
                return
            if n and not p.immediate_data:
                # ImmediateData=No: the initiator must not send it, and the target rejects it
                # (RFC 7143 §13.11): a Reject (Protocol Error) and no response, as LIO does;
                # the command does not run and none of its data is written. Its unsolicited
                # Data-Out, if it announced some, is taken and dropped.
                tasks.pop(itt, None)
                if not cmd.final and not p.initial_r2t:
                    self._discard_later(self._discarding, itt)
                self._reject(RejectReason.PROTOCOL_ERROR, cmd.header())
                return
            if n == edtl:               # all of it came with the command (the common small write)
                task.want = task.edtl = task.received = task.next_r2t_offset = n
                task.data = imm
                self._start(task)
                return
            # Buffered and solicited: what the CDB uses, never more than EDTL. EDTL is only
            # the initiator's word: one command claiming 4 GiB must not allocate 4 GiB. Data
            # sent beyond it (unsolicited) is taken and dropped, and answered as a residual.
            want = unit.data_out_length(cdb)
            if want > edtl:
                want = edtl
            task.want, task.edtl, task.received = want, edtl, n
            if self._resolver_gen:       # what unit was resolved under (no await since)
                task.gen = self.resolver.generation
            done = task.unsolicited_done = cmd.final or p.initial_r2t
            task.next_r2t_offset = n
            if done and n >= want:
                task.data = imm if n == want else memoryview(imm)[:want]
            else:
                size = want
                if self._buf_full and self._buf_bytes + want > self.write_buffer_budget:
                    # Beyond the budget: room for what may come unasked; R2Ts wait for a grant.
                    size = min(want, n if done else p.first_burst_length)
                if size < want:
                    self._buf_waiting.append(task)
                else:
                    self._buf_full += 1
                buf = task.buf = bytearray(size)
                task.held = size
                self._buf_bytes += size
                k = min(n, want)
                buf[:k] = imm[:k]
                if done:
                    self._send_r2ts(task)
                return
        elif cmd.data:
            # Immediate data with no W bit: protocol error.
            self.tasks.pop(cmd.itt, None)
            self._reject(RejectReason.PROTOCOL_ERROR, cmd.header())
            return
        elif edtl and unit.data_out_length(cdb) > 0:
            # A data-out CDB with an EDTL but no W bit (neither R nor W: RFC 7143 §11.3.1 says
            # EDTL MUST then be 0; or R alone, a read's direction): none of its data can come,
            # and run it would be a write of nothing answered GOOD. Terminated with the iSCSI
            # condition "Incorrect amount of data" (§11.4.7.2), its residual the whole EDTL,
            # unrun. (EDTL 0 is a legal overflow: run, as SAM says.)
            del tasks[itt]
            self._respond(task, INCORRECT_AMOUNT_OF_DATA, 0)
            return
        self._start(task)

    def _no_unit_result(self, task: Task):
        cdb = task.cmd.cdb
        if cdb[0] == 0xA0:
            result = self.scsi.report_luns(self.resolver.visible_luns(), cdb)
            if result.status == ScsiStatus.GOOD:
                # The initiator has the new inventory: no LU need tell it again (SPC-4 6.33).
                for unit in self.units_used:
                    clear = getattr(unit, "clear_unit_attention", None)
                    if clear:
                        clear(self.scsi.luns_changed, self.nexus)
            return result
        return self.scsi.lun_not_supported(cdb)

    def _finish_inline(self, task: Task, result) -> None:
        self.tasks.pop(task.cmd.itt, None)
        if task.held:
            self._release_buffer(task)
        self._respond(task, result)

    def _release_buffer(self, task: Task) -> None:
        """A command is done with its write buffer: count it out, and grant waiting ones."""
        self._buf_bytes -= task.held
        task.held = 0
        if task.buf is not None and len(task.buf) >= task.want:
            self._buf_full -= 1
        waiting = self._buf_waiting
        if task in waiting:
            waiting.remove(task)
        while waiting:
            t = waiting[0]
            if t.aborted or self.tasks.get(t.cmd.itt) is not t:
                del waiting[0]
                continue
            grow = t.want - len(t.buf)
            if self._buf_full and self._buf_bytes + grow > self.write_buffer_budget:
                break
            del waiting[0]
            t.buf.extend(bytes(grow))
            t.held += grow
            self._buf_bytes += grow
            self._buf_full += 1
            if t.unsolicited_done:
                self._send_r2ts(t)

    def _send_r2ts(self, task: Task) -> None:
        if len(task.buf) < task.want:
            return          # no grant yet: _release_buffer sends them once there is one
        maxb = self.p.max_burst_length
        while task.next_r2t_offset < task.want and len(task.outstanding) < self.p.max_outstanding_r2t:
            off = task.next_r2t_offset
            length = min(maxb, task.want - off)
            ttt = self._new_ttt()
            task.outstanding[ttt] = [off, length, 0, 0]
            self._r2t_owner[ttt] = task
            r2t = P.R2T(itt=task.cmd.itt, ttt=ttt, lun=task.cmd.lun, r2tsn=task.r2tsn,
                        buffer_offset=off, desired_length=length)
            task.r2tsn += 1
            task.next_r2t_offset += length
            self._send(r2t, status=False)

    def _data_out(self, d: P.DataOut) -> None:
        """File one Data-Out. DataSN and offsets must run in order (we negotiate
        DataPDUInOrder=Yes); at ErrorRecoveryLevel 0 a gap is a protocol error
        that ends the connection, as the RFC and libiscsi's conformance tests expect."""
        seq = None
        if d.ttt == RESERVED_TAG:
            task = self.tasks.get(d.itt)
            if task is None and d.itt in self._discarding:
                if d.final:
                    del self._discarding[d.itt]
                return
            if task is None and d.itt in self._early:    # its command waits for its CmdSN
                self._hold_early(d, self._early[d.itt])
                return
            if task is None or task.unsolicited_done or self.p.initial_r2t:
                self._protocol_error(d, "unsolicited Data-Out not allowed here")
                return
            expected_sn, expected_off = task.unsol_datasn, task.received
        else:
            task = self._r2t_owner.get(d.ttt)
            if task is None and d.ttt in self._discarding_ttt:
                if d.final:
                    del self._discarding_ttt[d.ttt]
                return
            if task is None or task.cmd.itt != d.itt:
                self._reject(RejectReason.INVALID_PDU_FIELD, d.header())
                return
            seq = task.outstanding[d.ttt]
            expected_sn, expected_off = seq[2], seq[0] + seq[3]
        n = len(d.data)
        off = d.buffer_offset
        end = off + n
        if d.datasn != expected_sn or off != expected_off:
            self._protocol_error(d, f"Data-Out DataSN {d.datasn}/offset {off}, expected "
                                    f"{expected_sn}/{expected_off}")
            return
        if task.buf is None or end > (task.edtl if seq is None else task.want) \
                or (seq is not None and seq[3] + n > seq[1]):
            self._protocol_error(d, "Data-Out beyond the solicited or expected length")
            return
        if seq is None and end > self.p.first_burst_length:
            self._protocol_error(d, f"unsolicited data beyond FirstBurstLength ({end} bytes)")
            return
        if seq is not None and d.final and seq[3] + n != seq[1]:
            # The R2T's sequence ends short: nothing would ever complete the command.
            self._protocol_error(d, f"Data-Out sequence ended at {seq[3] + n} of {seq[1]} solicited bytes")
            return
        if end <= task.want:
            task.buf[off:end] = d.data
        elif off < task.want:                   # unsolicited data beyond what the command uses
            task.buf[off:task.want] = memoryview(d.data)[:task.want - off]
        task.received += n
        if seq is None:
            task.unsol_datasn += 1
            if d.final:
                task.unsolicited_done = True
                task.next_r2t_offset = max(task.next_r2t_offset, end)
                self._send_r2ts(task)
        else:
            seq[2] += 1
            seq[3] += n
            if d.final:
                task.outstanding.pop(d.ttt, None)
                self._r2t_owner.pop(d.ttt, None)
                self._send_r2ts(task)
        if task.received >= task.want and not task.outstanding and task.unsolicited_done:
            task.data = memoryview(task.buf)
            self._start_late(task)

    def _protocol_error(self, pdu: P.PDU, why: str) -> None:
        log.info("%s: protocol error: %s; closing the connection", self.nexus.initiator, why)
        self._reject(RejectReason.PROTOCOL_ERROR, pdu.header())
        self._closing = True

    def _start_late(self, task: Task) -> None:
        """Start a command that waited since it was resolved (for its Data-Out, which the
        initiator may hold back as long as it likes): only if its LUN still resolves to the
        same LU. An ACL entry removed or made read-only, or a LUN unmapped or remapped,
        meanwhile applies to it as to a command arriving now: answered LOGICAL UNIT NOT
        SUPPORTED if the LUN is gone, else run on the LU it resolves to now (a read-only
        one answers a write WRITE PROTECTED). Its data is never written where it no longer
        may be. One comparison when the resolver has a generation and it has not changed."""
        if not self._resolver_gen or self.resolver.generation != task.gen:
            unit = self.resolver.unit(task.lun)
            if unit is not task.unit:
                log.info("%s: LUN %d changed while a command waited for its data; answered "
                         "as the LUN is now", self.nexus.initiator, task.lun)
                task.unit = unit
                if unit is None:
                    self._finish_inline(task, self._no_unit_result(task))
                    return
                if unit not in self.units_used:
                    self.units_used.add(unit)
        self._start(task)

    def _start(self, task: Task) -> None:
        """Run the command inline as far as it goes without waiting.

        A page-cache read or write completes without ever suspending, so it is
        answered here with no Task at all; only a command that really waits
        (a flush, a replica round trip) continues in a Task of its own.
        """
        unit = task.unit
        data = task.data     # write_nowait declines a command without data: not asked then
        try:
            fut = unit.write_nowait(task.cmd.cdb, data, self.nexus) if data is not None and unit.fast_writes else None
        except Exception:  # noqa: BLE001 - one command's bug must not kill the session
            self._finish_inline(task, self._command_failed(task))
            return
        if fut is not None:
            if fut.done():
                self._write_done(task, fut)
            else:
                task.runner = fut
                fut.add_done_callback(lambda f: self._write_done(task, f))
            return
        coro = self._run(task)
        try:
            waiting_on = coro.send(None)
        except StopIteration:
            return
        task.runner = asyncio.ensure_future(_resume(coro, waiting_on))

    async def _run(self, task: Task) -> None:
        cmd = task.cmd
        try:
            result = await task.unit.execute(cmd.cdb, task.data, cmd.expected_length, self.nexus)
        except Exception:  # noqa: BLE001 - one command's bug must not kill the session
            result = self._command_failed(task)
        self._complete(task, result)

    def _write_done(self, task: Task, fut) -> None:
        """Answer a write the unit ran on its fast path (``write_nowait``)."""
        try:
            result = task.unit.finish_nowait(fut)
        except Exception:  # noqa: BLE001 - one command's bug must not kill the session
            result = self._command_failed(task)
        # write_nowait took it only if the data is exactly data_out_length(cdb), and a
        # unit only grows: that length, without asking the unit again.
        self._complete(task, result, len(task.data))      # flushed soon when outside a batch

    def _command_failed(self, task: Task):
        log.exception("%s: SCSI command %#04x failed", self.nexus.initiator, task.cmd.cdb[0])
        return self.scsi.internal_error()

    def _complete(self, task: Task, result, needed: int = -1) -> None:
        """A running command is done: forget it, and answer unless aborted or closing."""
        itt = task.cmd.itt
        if self.tasks.get(itt) is task:
            del self.tasks[itt]
        if task.held:
            self._release_buffer(task)
        if not task.aborted and not self._closing:
            self._respond(task, result, needed)
            if not self.tasks and not self._in_batch:
                self._flush()        # nothing else in flight (QD1): no batch to wait for

    def _respond(self, task: Task, result, needed: int = -1) -> None:
        """Answer a command: Data-In (the last one carrying the status when GOOD) and/or
        a SCSI Response (``needed``: the data-out length of a write, when known). Headers without sense data are packed directly (``P.encode_*``,
        byte-identical to the PDU classes); a response with sense takes ``_send``."""
        cmd = task.cmd
        data = result.data
        edtl = cmd.expected_length
        status = result.status
        sense = result.sense
        if (cmd.write and not cmd.read) or (not cmd.read and needed < 0 and task.unit is not None
                                            and (needed := task.unit.data_out_length(cmd.cdb)) > 0):
            # A data-out command sent without the W bit is answered as one too: its residual
            # says none of its data was taken (it was not sent), never a plain GOOD.
            if needed < 0:
                needed = task.unit.data_out_length(cmd.cdb) if task.unit is not None else 0
            resid = edtl - needed
            if sense:
                self._send(P.ScsiResponse(
                    itt=cmd.itt, status=status, underflow=resid > 0, overflow=resid < 0,
                    residual=abs(resid), data=P.ScsiResponse.sense_segment(sense)))
                return
            statsn = self.statsn
            self.statsn = (statsn + 1) & SERIAL_MASK
            self._queue(P.encode_scsi_response(cmd.itt, status, statsn, self.expcmdsn, self.maxcmdsn,
                                               0, resid))
            return
        n = len(data) if data is not None else 0
        sent = min(n, edtl)
        resid = edtl - n
        datasn = 0
        if sent and sent <= self.msdsl and sent <= self.p.max_burst_length and status == ScsiStatus.GOOD \
                and not sense:       # the common read: one Data-In that carries the status
            statsn = self.statsn
            self.statsn = (statsn + 1) & SERIAL_MASK
            self._queue(P.encode_data_in(cmd.itt, cmd.lun, sent, statsn, self.expcmdsn, self.maxcmdsn,
                                         0, 0, True, status, resid), data if sent == n else memoryview(data)[:sent])
            return
        if sent:
            mv = memoryview(data)[:sent] if not isinstance(data, memoryview) else data[:sent]
            seg, burst = self.msdsl, self.p.max_burst_length
            off = 0
            good = status == ScsiStatus.GOOD and not sense
            itt, lun = cmd.itt, cmd.lun
            while off < sent:
                length = min(seg, sent - off, burst - (off % burst))
                last = off + length >= sent
                piece = mv[off:off + length]
                if last and good:
                    statsn = self.statsn
                    self.statsn = (statsn + 1) & SERIAL_MASK
                    self._queue(P.encode_data_in(itt, lun, length, statsn, self.expcmdsn, self.maxcmdsn,
                                                 datasn, off, True, status, resid), piece)
                    return
                self._queue(P.encode_data_in(itt, lun, length, self.statsn, self.expcmdsn, self.maxcmdsn,
                                             datasn, off, last or (off + length) % burst == 0), piece)
                datasn += 1
                off += length
        if sense:
            self._send(P.ScsiResponse(
                itt=cmd.itt, status=status, underflow=resid > 0, overflow=resid < 0, residual=abs(resid),
                expdatasn=datasn, data=P.ScsiResponse.sense_segment(sense)))
            return
        statsn = self.statsn
        self.statsn = (statsn + 1) & SERIAL_MASK
        self._queue(P.encode_scsi_response(cmd.itt, status, statsn, self.expcmdsn, self.maxcmdsn,
                                           datasn, resid))

    # --- task management -----------------------------------------------------------
    #
    # Scope (SAM-5 7, RFC 7143 11.5.1): ABORT TASK and ABORT TASK SET act on the issuing
    # I_T nexus's own tasks; CLEAR TASK SET and LOGICAL UNIT RESET on every task of the LU,
    # whichever session of this target server sent it; a target reset on every LU of the
    # target the issuer may access (SAM's rule with access controls), and a cold reset then
    # ends every session of the target. Other chunk servers' sessions are not reached.
    # The TMF response goes out once every affected task is done: running ones finish
    # (unanswered), the others are dropped at once, and Data-Out still coming for any of
    # them is taken and dropped, in whichever session it was.

    def _discard_later(self, table: dict[int, None], tag: int) -> None:
        if len(table) >= self.window:
            del table[next(iter(table))]
        table[tag] = None

    def _abort_now(self, tasks: Iterable[Task]) -> list:
        """Abort ``tasks`` of this session: never answered, their window slots free, their
        Data-Out dropped. Returns the runners still running, for the caller to wait on."""
        runners = []
        for t in tasks:
            t.aborted = True
            # Data-Out the initiator queued before the TMF still comes (libiscsi sends an
            # immediate TMF ahead of it): taken and dropped, not a protocol error that ends
            # the connection (RFC 7143 11.5.1: the target waits for it on ABORT TASK SET).
            for ttt in list(t.outstanding):
                self._r2t_owner.pop(ttt, None)
                self._discard_later(self._discarding_ttt, ttt)
            if not t.unsolicited_done and not self.p.initial_r2t:
                self._discard_later(self._discarding, t.cmd.itt)
            self.tasks.pop(t.cmd.itt, None)
            if t.held and t.runner is None:        # a running one releases it when done
                self._release_buffer(t)
            if t.runner is not None and not t.runner.done():
                runners.append(t.runner)
        return runners

    async def _abort(self, tasks: list[Task]) -> None:
        runners = self._abort_now(tasks)
        if runners:      # a running command finishes; its response is suppressed
            # wait, not gather: this TMF's end must never cancel a command's runner
            await asyncio.wait(runners)

    def _abort_pending(self, match: Callable[[int, Any], bool], before: int | None = None) -> int:
        """Abort held (out-of-order) SCSI commands that ``match(lun, unit)`` selects, only those
        with a CmdSN below ``before`` when given (the issuer's: sent before its TMF). Each
        keeps its CmdSN as a placeholder, so the window moves on once the gap before it fills."""
        n = 0
        for sn, pdu in list(self.pending.items()):
            if type(pdu) is not P.ScsiCommand or (before is not None and not sn_lt(sn, before)):
                continue
            try:
                lun = P.decode_lun(pdu.lun)
            except ValueError:
                lun = -1
            if not match(lun, self.resolver.unit(lun) if lun >= 0 else None):
                continue
            self._drop_pending(sn, pdu)
            n += 1
        return n

    def _drop_pending(self, sn: int, pdu: P.PDU) -> None:
        """Abort a held request: a placeholder keeps its CmdSN (consumed once the gap before
        it fills); a write's unsolicited Data-Out is taken and dropped."""
        self.pending[sn] = P.NopOut(itt=RESERVED_TAG, cmdsn=sn)
        if type(pdu) is P.ScsiCommand and pdu.write and not pdu.final and not self.p.initial_r2t:
            self._drop_early(pdu.itt)

    def _sessions(self) -> list["Session"]:
        """This session first, then every other one of this target server."""
        out = [self]
        if self.peers is not None:
            out.extend(s for s in self.peers() if s is not self)
        return out

    async def _abort_everywhere(self, units: set, req: P.TaskMgmtRequest, lun: int = -1,
                                everything: bool = False) -> list["Session"]:
        """Abort every task on ``units`` in every session of this server; of this one also
        those addressed to ``lun`` (or all of them: ``everything``). Returns once the running
        ones are done, with the other sessions that lost tasks, each told its new MaxCmdSN."""
        runners: list = []
        hit: list[Session] = []
        for s in self._sessions():
            if s is self:
                def mine(tl: int, tu: Any) -> bool:
                    return everything or tu in units or tl == lun
                runners += self._abort_now([t for t in self.tasks.values() if mine(t.lun, t.unit)])
                self._abort_pending(mine, req.cmdsn)
                continue
            tasks = [t for t in s.tasks.values() if t.unit in units]
            held = s._abort_pending(lambda tl, tu: tu in units) if s.pending else 0   # noqa: SLF001
            if tasks or held:
                runners += s._abort_now(tasks)                                          # noqa: SLF001
                hit.append(s)
                log.info("%s: %s from %s aborted %d of its commands", s.nexus.initiator,
                         TmfFunction(req.function).name, self.nexus.initiator, len(tasks) + held)
        if runners:
            await asyncio.wait(runners)
        for s in hit:
            s._announce_window()                                                        # noqa: SLF001
        return hit

    def _announce_window(self) -> None:
        """A NOP-In asking for nothing (ITT and TTT reserved, StatSN not advanced) to carry the
        MaxCmdSN that another session's TMF freed by aborting tasks here: they get no
        response, and an initiator whose window they filled would never learn it otherwise."""
        self._send(P.NopIn(itt=RESERVED_TAG, ttt=RESERVED_TAG, lun=0), status=False)

    def _target_units(self) -> set:
        """The LUs a target reset acts on: the target's LUs this initiator may access (SAM:
        no change to those it is denied), among those open here (an unopened one has no
        task and no nexus state on this server)."""
        view = self.resolver
        opened = getattr(view, "opened_unit", None) or view.unit
        units = set()
        for lun in view.visible_luns():
            unit = opened(lun)
            if unit is not None:
                units.add(unit)
        return units

    async def _task_mgmt(self, req: P.TaskMgmtRequest) -> None:
        fn = req.function
        resp = TmfResponse.FUNCTION_COMPLETE
        try:
            lun = P.decode_lun(req.lun)
        except ValueError:
            lun = -1
        if fn == TmfFunction.ABORT_TASK:
            task = self.tasks.get(req.referenced_task_tag)
            if task is not None:
                await self._abort([task])
            else:
                pending = [sn for sn, p in self.pending.items() if p.itt == req.referenced_task_tag]
                for sn in pending:
                    self._drop_pending(sn, self.pending[sn])
                ref = req.refcmdsn
                never_received = (sn_lte(self.expcmdsn, ref) and sn_lte(ref, self.maxcmdsn)
                                  and sn_lt(ref, req.cmdsn) and ref not in self.pending)
                if never_received:
                    # RFC 7143 §11.5.1: a command inside the window that never arrived
                    # counts as received (and aborted), so the window can move on.
                    self.pending[ref] = P.NopOut(itt=RESERVED_TAG, cmdsn=ref)
                    await self._drain()
                elif not pending:
                    # Already answered (or never existed): the initiator has or will get its response.
                    resp = TmfResponse.TASK_DOES_NOT_EXIST
        elif fn in (TmfFunction.ABORT_TASK_SET, TmfFunction.CLEAR_TASK_SET, TmfFunction.LOGICAL_UNIT_RESET):
            unit = self.resolver.unit(lun) if lun >= 0 else None
            if unit is None:
                resp = TmfResponse.LUN_DOES_NOT_EXIST
            elif fn == TmfFunction.ABORT_TASK_SET:
                # SAM-5: the task set of the issuing I_T nexus only
                def ours(tl: int, tu: Any) -> bool:
                    return tl == lun or tu is unit
                self._abort_pending(ours, req.cmdsn)
                await self._abort([t for t in self.tasks.values() if ours(t.lun, t.unit)])
            else:
                hit = await self._abort_everywhere({unit}, req, lun)
                if fn == TmfFunction.LOGICAL_UNIT_RESET:
                    if hasattr(unit, "reset"):
                        unit.reset(self.nexus)      # BUS DEVICE RESET FUNCTION OCCURRED, every nexus
                else:
                    # SPC-4 (Control mode page TAS=0, the only value we report): the other
                    # nexuses whose tasks were cleared learn it by COMMANDS CLEARED BY ANOTHER
                    # INITIATOR; the aborted tasks themselves get no status.
                    post = getattr(unit, "post_unit_attention", None)
                    if post is not None:
                        for s in hit:
                            if s.nexus != self.nexus:
                                post(ASC_COMMANDS_CLEARED_BY_ANOTHER_INITIATOR, s.nexus)
        elif fn in (TmfFunction.TARGET_WARM_RESET, TmfFunction.TARGET_COLD_RESET):
            units = self._target_units()
            await self._abort_everywhere(units, req, everything=True)
            for unit in units:
                if hasattr(unit, "reset"):
                    unit.reset(self.nexus)
            self._send(P.TaskMgmtResponse(itt=req.itt, response=resp))
            if fn == TmfFunction.TARGET_COLD_RESET:
                # RFC 7143 11.5.1: after the response, every connection of the target closes.
                self._flush()
                await self._drain_socket()
                target = self.p.target_name
                for s in self._sessions()[1:]:
                    if s.p.target_name == target and not s.p.discovery:
                        log.info("%s: TARGET COLD RESET from %s ends its session", s.nexus.initiator,
                                 self.nexus.initiator)
                        await s.close()
                await self.close()
            return
        elif fn == TmfFunction.TASK_REASSIGN:
            resp = TmfResponse.REASSIGNMENT_NOT_SUPPORTED
        else:
            resp = TmfResponse.NOT_SUPPORTED
        self._send(P.TaskMgmtResponse(itt=req.itt, response=resp))

    # --- text and logout -------------------------------------------------------------

    def _text(self, req: P.TextRequest) -> None:
        """Text negotiation in full feature phase: SendTargets, continued both ways.

        A long answer (thousands of targets) goes out in pieces of at most the
        initiator's MaxRecvDataSegmentLength with the C bit set; the initiator
        fetches each next piece with an empty request carrying our TTT.
        """
        if req.ttt != RESERVED_TAG and req.ttt == self._text_in_ttt:
            self._text_in_ttt = None      # the next piece of the initiator's own text (C bit)
        elif req.ttt != RESERVED_TAG:
            rest = self._text_out.get(req.ttt)
            if rest is None or req.data:
                self._text_in = TextAssembler()
                self._reject(RejectReason.PROTOCOL_ERROR, req.header())
                return
            self._text_piece(req.itt, req.ttt, rest)
            return
        try:
            pairs = self._text_in.feed(req.data, req.cont)
        except ProtocolError as e:
            self._text_in = TextAssembler()
            self._reject(e.reason, req.header())
            return
        if pairs is None:                 # the initiator continues its text: ask for the rest
            self._text_in_ttt = self._new_ttt()     # which its next piece carries (11.10.4)
            self._send(P.TextResponse(itt=req.itt, final=False, ttt=self._text_in_ttt))
            return
        try:
            out, params, requests = negotiate_full_feature(pairs, self.p)
        except NegotiationError:
            # a key sent twice, or one only a target may send: the text is malformed
            self._reject(RejectReason.PROTOCOL_ERROR, req.header())
            return
        for _, value in requests:             # SendTargets, answered after the other keys
            for iqn, addrs in self.resolver.send_targets(value):
                out.append(("TargetName", iqn))
                out.extend(("TargetAddress", a) for a in addrs)
        # The initiator's new MaxRecvDataSegmentLength (if any) bounds what we send from the
        # next PDU on; this exchange's answer fits both the old and the new limit, whichever
        # the initiator applies to it.
        limit = min(self.msdsl, params.max_send_data_segment_length)
        self.p, self.msdsl = params, params.max_send_data_segment_length
        self._text_piece(req.itt, None, split_text(encode_text(out), limit))

    def _text_piece(self, itt: int, ttt: int | None, pieces: list[bytes]) -> None:
        self._text_out.pop(ttt, None)
        first, rest = pieces[0], pieces[1:]
        if rest:
            ttt = self._new_ttt()
            self._text_out.clear()            # one text exchange at a time per connection
            self._text_out[ttt] = rest
            self._send(P.TextResponse(itt=itt, final=False, cont=True, ttt=ttt, data=first))
        else:
            self._send(P.TextResponse(itt=itt, final=True, ttt=RESERVED_TAG, data=first))

    def _is_this_connection(self, cid: int) -> bool:
        return self.cid is None or cid == self.cid

    async def _logout(self, req: P.LogoutRequest) -> None:
        """Close the connection, and so the session (one connection each), when asked.

        RFC 7143 §11.14: "the target MUST terminate all pending commands, whether
        acknowledged via ExpCmdSN or not, on that connection or session respectively"; "For
        the terminated commands, no additional responses should be expected." Commands in
        flight get ``close_grace`` to finish and be answered first; those still running
        then are cancelled unanswered, as at a connection's close. One stuck below (a hung
        replica, an ownership wait) holds the Logout Response no longer than that (10 s,
        within open-iscsi's 15 s logout timeout) and the moment its cancel takes (at most
        ``close_grace`` more), nor the login that follows a drain or a redirect. Nothing
        is sent after the Logout Response.

        "Close the connection" naming a CID that is not this connection's names none of
        this session's (MaxConnections=1): Response "CID not found" (§11.15.1), and the
        session and this connection go on, as in LIO. "Remove the connection for recovery"
        is answered "recovery not supported" whatever its CID: we run at ErrorRecoveryLevel 0
        (§11.15.1; LIO checks the level first too). The CID of "close the session" is not
        valid (§11.14.3) and is not looked at."""
        if req.reason == LogoutReason.REMOVE_CONNECTION_FOR_RECOVERY:
            self._send(P.LogoutResponse(itt=req.itt, response=LogoutResponseCode.RECOVERY_NOT_SUPPORTED))
            return
        if req.reason == LogoutReason.CLOSE_CONNECTION and not self._is_this_connection(req.cid):
            self._send(P.LogoutResponse(itt=req.itt, response=LogoutResponseCode.CID_NOT_FOUND))
            return
        runners = [t.runner for t in self.tasks.values() if t.runner and not t.runner.done()]
        if runners:
            await self._finish_or_cancel(runners)
        self._closing = True      # one that ignored its cancel and ends later: unanswered
        self._send(P.LogoutResponse(itt=req.itt, response=LogoutResponseCode.SUCCESS,
                                    time2wait=0, time2retain=0))
        self._flush()
        await self._drain_socket()
