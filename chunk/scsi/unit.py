"""``LogicalUnit``: SPC-4/SBC-3 command execution over a ``BlockDevice``.

Transport-agnostic: the iSCSI session (and later a TCMU frontend) hands in a
CDB, the data-out buffer and the I_T nexus, and gets back status, data-in and
sense.  The transport owns task management, residuals and data movement;
the contract is:

* ``data_out_length(cdb)`` says how many bytes to collect before
  ``execute``.  It is 0 for CDBs that will fail anyway (unknown opcode, out of
  range, over the transfer limit) so no data is solicited for them.
* ``execute`` receives the data-out the initiator sent (at most the expected
  length).  Extra bytes are ignored.  When a WRITE gets less than its CDB
  describes (EDTL < SPDTL), the whole blocks that arrived are written and
  the command succeeds (FCP-4's "process normally except data beyond the
  expected length is not transferred", what libiscsi's residual tests
  check); a trailing partial block, or a short parameter list, fails with
  INVALID FIELD IN COMMAND INFORMATION UNIT and writes nothing.  The
  transport reports the residual either way.
* data-in is already cut to the CDB's allocation length; the transport cuts
  it to the expected length and reports the residual.

Unit attentions: like tgtd, a nexus gets POWER ON, RESET, OR BUS DEVICE
RESET OCCURRED (29/00) on its first command (``power_on_ua``).  LIO sets none
at login; we follow tgtd because a (re)login may follow a target restart that
lost the page cache or SPC-2 reservations, and initiators (Linux, libiscsi's
connect, which sends TEST UNIT READY until the UAs are gone) expect it.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Callable
from typing import AsyncIterator

from chunk.blockdev import BlockDevice, MediumError, NoSpaceError, ReadOnlyError

from . import inquiry, modes
from . import opcodes as op
from .cdb import U16, U32, U64, lba_len, need
from .inquiry import BlockLimits, LunIdentity
from .luns import report_luns_command
from .nexus import Nexus
from .reservations import (CLEAR, PREEMPT, PREEMPT_AND_ABORT, REGISTER_AND_MOVE, RESERVE, Access,
                           ReservationState, check_spc2_cdb)
from .sense import (ASC_BUS_DEVICE_RESET, ASC_CAPACITY_CHANGED, ASC_MODE_PARAMS_CHANGED,
                    ASC_NO_ADDITIONAL, ASC_POWER_ON_RESET, ASC_SPACE_ALLOC_FAILED_WP,
                    ASC_UNRECOVERED_READ, ASC_WRITE_ERROR, CHECK_CONDITION, DATA_PROTECT,
                    GOOD, MEDIUM_ERROR, NO_SENSE, RESULT_GOOD, RESULT_RESERVATION_CONFLICT,
                    UNIT_ATTENTION, ReservationConflict, ScsiError, ScsiResult,
                    data_out_too_short, fixed_sense, invalid_field_in_cdb,
                    invalid_field_in_param, invalid_opcode, lba_out_of_range, miscompare,
                    param_list_length_error, write_protected)

__all__ = ["LogicalUnit", "Nexus", "ScsiResult", "LunIdentity"]

_UA_EXEMPT = frozenset((op.INQUIRY, op.REPORT_LUNS, op.REQUEST_SENSE))
_MAX_UAS = 16
_PATTERN_CHUNK = 1 << 20


# PR OUT service actions a read-only LU refuses: they take the reservation or remove
# other nexuses' registrations.
_RESTRICTING_PROUT = frozenset((RESERVE, CLEAR, PREEMPT, PREEMPT_AND_ABORT, REGISTER_AND_MOVE))


def _first_difference(a: bytes | memoryview, b: bytes | memoryview) -> int:
    """Offset of the first differing byte of two equal-length buffers that differ."""
    a, b = memoryview(a), memoryview(b)
    lo, step = 0, 4096
    while a[lo:lo + step] == b[lo:lo + step]:
        lo += step
    chunk_a, chunk_b = bytes(a[lo:lo + step]), bytes(b[lo:lo + step])
    for i, (x, y) in enumerate(zip(chunk_a, chunk_b)):
        if x != y:
            return lo + i
    return lo + min(len(chunk_a), len(chunk_b))


_WRITE_VERIFY = frozenset((op.WRITE_VERIFY_10, op.WRITE_VERIFY_12, op.WRITE_VERIFY_16))

_W10 = struct.Struct(">IxH").unpack_from        # WRITE(10): LBA, TRANSFER LENGTH
_W16 = struct.Struct(">QI").unpack_from         # WRITE(16)


_POWER_MEDIUM = frozenset((op.START_STOP_UNIT, op.PREVENT_ALLOW))


def _power_medium_access(cdb: bytes) -> Access:
    """How reservations treat a START STOP UNIT or PREVENT ALLOW MEDIUM REMOVAL, by its CDB.

    SBC-4 table 13 (SBC-3's table of SBC commands allowed in the presence of various
    reservations has the same rows) allows START STOP UNIT with START=1 and POWER CONDITION
    0h, and PREVENT ALLOW MEDIUM REMOVAL with PREVENT=00b, under every persistent reservation
    type from every I_T nexus (``NON_MEDIUM``: only another nexus's SPC-2 reservation
    conflicts). Any other START STOP UNIT (START=0 or a power condition) or PREVENT (field
    not 00b) has the WRITE row's answers: Conflict under Write Exclusive and Exclusive Access
    for a non-holder, and under the Registrants Only / All Registrants types for a nexus not
    registered; allowed for a registered one. A CDB too short to tell is the restricted kind
    (its handler then refuses the length; iSCSI and TCMU always carry at least 6 bytes)."""
    b4 = cdb[4] if len(cdb) > 4 else 0
    if cdb[0] == op.START_STOP_UNIT:
        allowed = len(cdb) > 4 and b4 & 0x01 and not b4 >> 4
    else:
        allowed = len(cdb) > 4 and not b4 & 0x03
    return Access.NON_MEDIUM if allowed else Access.WRITE


# Failures a command is answered with (CHECK CONDITION or RESERVATION CONFLICT), see
# ``_error_result``; anything else is a bug the transport answers as INTERNAL TARGET FAILURE.
_ANSWERED = (ScsiError, ReservationConflict, MediumError, NoSpaceError, ReadOnlyError)


class LogicalUnit:
    """One SCSI logical unit (a volume) as seen through any transport."""

    def __init__(self, dev: BlockDevice, ident: LunIdentity, *,
                 reservations: ReservationState | None = None,
                 protocol_id: int | None = inquiry.PROTOCOL_ISCSI,
                 max_transfer_bytes: int = 8 << 20,
                 max_compare_write_blocks: int = 64,
                 max_unmap_blocks: int | None = None,
                 max_unmap_descriptors: int = 256,
                 max_write_same_blocks: int | None = None,
                 physical_block_exponent: int = 0,
                 write_cache: bool = True,
                 power_on_ua: bool = True,
                 tmf_support: int = 0xDA,
                 luns: Callable[[Nexus], list[int]] | None = None) -> None:
        self.dev = dev
        self.ident = ident
        ident.naa_bytes()                    # validate the wwn now, not on first INQUIRY
        self.reservations = reservations or ReservationState()
        attach = getattr(self.reservations, "attach", None)
        if attach is not None:               # shared: attentions other servers establish
            attach(self)
        self.protocol_id = protocol_id
        self.block_size = bs = dev.block_size
        self.thin = dev.thin
        self.physical_block_exponent = physical_block_exponent
        self.power_on_ua = power_on_ua
        self.tmf_support = tmf_support
        self._luns = luns
        self.alua_state = 0                  # 0 active/optimized; the coordinator may change it
        self.modes = modes.ModeState(wce=write_cache, default_wce=write_cache)
        self.max_transfer = max(1, max_transfer_bytes // bs)
        granularity = max(1, 4096 // bs) << physical_block_exponent
        self.limits = BlockLimits(
            max_transfer=self.max_transfer,
            optimal_transfer=max(1, min(self.max_transfer, (1 << 20) // bs)),
            optimal_granularity=granularity,
            max_compare_write=min(255, max_compare_write_blocks),
            max_unmap_lbas=max_unmap_blocks or (1 << 20),
            max_unmap_descriptors=max_unmap_descriptors,
            unmap_granularity=granularity,
            max_write_same=max_write_same_blocks or 0xFFFF,     # LIO's default
        )
        self.num_blocks = dev.size // bs
        self._size = dev.size
        self._seen: set[Nexus] = set()
        self._ua: dict[Nexus, list[tuple[int, int]]] = {}
        # write ordering for COMPARE AND WRITE / ORWRITE atomicity
        self._inflight = 0
        self._drained: asyncio.Event | None = None
        self._exclusive: asyncio.Event | None = None
        self._exclusive_lock = asyncio.Lock()
        self._dev_nowait = getattr(dev, "write_nowait", None)
        self.fast_writes = self._dev_nowait is not None    # the transport may call write_nowait

        h = self._dispatch = {}
        A = Access
        for code, fn, acc in (
            (op.TEST_UNIT_READY, self._test_unit_ready, A.NON_MEDIUM),
            (op.REQUEST_SENSE, self._request_sense, A.ALWAYS),
            (op.READ_6, self._read, A.READ),
            (op.READ_10, self._read, A.READ),
            (op.READ_12, self._read, A.READ),
            (op.READ_16, self._read, A.READ),
            (op.WRITE_6, self._write, A.WRITE),
            (op.WRITE_10, self._write, A.WRITE),
            (op.WRITE_12, self._write, A.WRITE),
            (op.WRITE_16, self._write, A.WRITE),
            (op.WRITE_VERIFY_10, self._write, A.WRITE),
            (op.WRITE_VERIFY_12, self._write, A.WRITE),
            (op.WRITE_VERIFY_16, self._write, A.WRITE),
            (op.VERIFY_10, self._verify, A.READ),
            (op.VERIFY_12, self._verify, A.READ),
            (op.VERIFY_16, self._verify, A.READ),
            (op.COMPARE_AND_WRITE, self._compare_and_write, A.WRITE),
            (op.ORWRITE_16, self._orwrite, A.WRITE),
            (op.WRITE_SAME_10, self._write_same, A.WRITE),
            (op.WRITE_SAME_16, self._write_same, A.WRITE),
            (op.UNMAP, self._unmap, A.WRITE),
            (op.SYNCHRONIZE_CACHE_10, self._synchronize_cache, A.WRITE),
            (op.SYNCHRONIZE_CACHE_16, self._synchronize_cache, A.WRITE),
            (op.PRE_FETCH_10, self._pre_fetch, A.READ),
            (op.PRE_FETCH_16, self._pre_fetch, A.READ),
            (op.INQUIRY, self._inquiry, A.ALWAYS),
            (op.READ_CAPACITY_10, self._read_capacity_10, A.ALWAYS),
            (op.SERVICE_ACTION_IN_16, self._service_action_in, A.ALWAYS),
            (op.MODE_SENSE_6, self._mode_sense, A.READ),
            (op.MODE_SENSE_10, self._mode_sense, A.READ),
            (op.MODE_SELECT_6, self._mode_select, A.WRITE),
            (op.MODE_SELECT_10, self._mode_select, A.WRITE),
            (op.START_STOP_UNIT, self._start_stop_unit, A.NON_MEDIUM),
            (op.PREVENT_ALLOW, self._prevent_allow, A.NON_MEDIUM),
            (op.PERSISTENT_RESERVE_IN, self._prin, A.PERSISTENT),
            (op.PERSISTENT_RESERVE_OUT, self._prout, A.PERSISTENT),
            (op.RESERVE_6, self._reserve, A.ALWAYS),
            (op.RELEASE_6, self._release, A.ALWAYS),
            (op.RESERVE_10, self._reserve, A.ALWAYS),
            (op.RELEASE_10, self._release, A.ALWAYS),
            (op.MAINTENANCE_IN, self._maintenance_in, A.ALWAYS),
            (op.REPORT_LUNS, self._report_luns, A.ALWAYS),
        ):
            h[code] = (fn, acc)
        # GET LBA STATUS reads medium state; READ CAPACITY(16), same opcode, is allowed even
        # under another nexus's RESERVE(6), as READ CAPACITY(10) (see ``Access``)
        self._gls_access = A.READ

    # ------------------------------------------------------------------------
    # entry points for the transport

    def data_out_length(self, cdb: bytes) -> int:
        """Bytes of data-out the initiator must send for this CDB (R2T sizing).

        0 for commands without data-out and for CDBs that ``execute`` will
        reject before touching data, so nothing is solicited for them.
        """
        try:
            code = cdb[0]
            bs = self.block_size
            if code in (op.WRITE_6, op.WRITE_10, op.WRITE_12, op.WRITE_16, op.WRITE_VERIFY_10,
                        op.WRITE_VERIFY_12, op.WRITE_VERIFY_16, op.ORWRITE_16):
                lba, n = lba_len(cdb)
                if cdb[1] & 0x04 and code in _WRITE_VERIFY:       # reserved BYTCHK
                    return 0
                return n * bs if self._fits(lba, n) and n <= self.max_transfer else 0
            if code == op.COMPARE_AND_WRITE:
                need(cdb, 16)
                n = cdb[13]
                return 2 * n * bs if n <= self.limits.max_compare_write else 0
            if code in (op.VERIFY_10, op.VERIFY_12, op.VERIFY_16):
                lba, n = lba_len(cdb)
                bytchk = (cdb[1] >> 1) & 3
                if not n or not self._fits(lba, n) or n > self.max_transfer:
                    return 0
                return n * bs if bytchk == 1 else bs if bytchk == 3 else 0
            if code == op.WRITE_SAME_10:
                return bs
            if code == op.WRITE_SAME_16:
                return 0 if cdb[1] & 0x01 else bs
            if code in (op.UNMAP, op.MODE_SELECT_10):
                need(cdb, 10)
                return U16(cdb, 7)[0]
            if code == op.MODE_SELECT_6:
                need(cdb, 6)
                return cdb[4]
            if code == op.PERSISTENT_RESERVE_OUT:
                need(cdb, 10)
                n = U32(cdb, 5)[0]
                return n if n <= 4096 else 0
        except (ScsiError, IndexError):
            pass
        return 0

    async def execute(self, cdb: bytes, data_out: memoryview | None, expected_length: int,
                      nexus: Nexus) -> ScsiResult:
        if self.dev.size != self._size:
            self._capacity_changed()
        if not cdb:
            return ScsiResult(CHECK_CONDITION, None, invalid_opcode().sense())
        code = cdb[0]
        if nexus not in self._seen:
            self._seen.add(nexus)
            if self.power_on_ua:
                self._post(nexus, ASC_POWER_ON_RESET)
        if self._ua and code not in _UA_EXEMPT:
            pending = self._ua.get(nexus)
            if pending:
                asc = pending.pop(0)
                if not pending:
                    del self._ua[nexus]
                return ScsiResult(CHECK_CONDITION, None, fixed_sense(UNIT_ATTENTION, *asc))
        entry = self._dispatch.get(code)
        if entry is None:
            return ScsiResult(CHECK_CONDITION, None, invalid_opcode().sense())
        handler, access = entry
        rs = self.reservations
        if rs.holder is not None or rs.spc2 is not None:
            if code == op.SERVICE_ACTION_IN_16 and len(cdb) > 1 and \
                    cdb[1] & 0x1F == op.SAI_GET_LBA_STATUS:
                access = self._gls_access
            if rs.conflicts(nexus, _power_medium_access(cdb) if code in _POWER_MEDIUM else access):
                return RESULT_RESERVATION_CONFLICT
        try:
            out = await handler(cdb, data_out, expected_length, nexus)
        except _ANSWERED as e:
            return self._error_result(e, access)
        if out is None:
            return RESULT_GOOD
        if isinstance(out, ScsiResult):
            return out
        return ScsiResult(GOOD, out)

    # -- the write fast path (no coroutine per command) -------------------------

    def write_nowait(self, cdb: bytes, data_out, nexus: Nexus):
        """Start a plain WRITE(10)/WRITE(16) on the device without a coroutine, or None.

        The common case of a replicated write costs a Task and a resumed chain of
        coroutines per command on the general path, which on this box was a large
        share of the CPU per write. Here it is a few checks and the device's own
        ``write_nowait``; the result is the device's future, to be passed to
        ``finish_nowait`` once done. Anything unusual (a unit attention, a
        reservation, a new nexus, FUA or write-through, write protection,
        protection info, an out-of-range or short transfer, an atomic command
        running) returns None with nothing done: ``execute`` then handles it with
        every check and error of the general path.
        """
        start = self._dev_nowait
        # ``nexus in self._ua``, not any UA: a shared reservation change posts attentions for
        # hosts that may never come here, and one of them must not slow every other host.
        if start is None or nexus in self._ua or self._exclusive is not None or nexus not in self._seen:
            return None
        code = cdb[0]
        if code == op.WRITE_10 and len(cdb) >= 10:
            lba, n = _W10(cdb, 2)
        elif code == op.WRITE_16 and len(cdb) >= 16:
            lba, n = _W16(cdb, 2)
        else:
            return None
        rs = self.reservations
        if (cdb[1] & 0xE8 or not n or lba + n > self.num_blocks or n > self.max_transfer
                or rs.holder is not None or rs.spc2 is not None or self.dev.size != self._size
                or not self.modes.wce or self.modes.swp or self.dev.readonly):
            return None
        nbytes = n * self.block_size
        if data_out is None or len(data_out) != nbytes:
            return None
        fut = start(lba * self.block_size, data_out)
        if fut is not None:
            self._inflight += 1
        return fut

    def finish_nowait(self, fut) -> ScsiResult:
        """The SCSI result of a write started by ``write_nowait`` whose future is done."""
        self._end_write()
        if fut.cancelled():
            return ScsiResult(CHECK_CONDITION, None, fixed_sense(MEDIUM_ERROR, *ASC_WRITE_ERROR))
        e = fut.exception()
        if e is None:
            return RESULT_GOOD
        if isinstance(e, _ANSWERED):
            return self._error_result(e, Access.WRITE)
        raise e

    @staticmethod
    def _error_result(e: BaseException, access: Access) -> ScsiResult:
        """The SCSI answer to a command that failed with one of ``_ANSWERED``."""
        if isinstance(e, ScsiError):
            return ScsiResult(CHECK_CONDITION, None, e.sense())
        if isinstance(e, ReservationConflict):
            return RESULT_RESERVATION_CONFLICT
        if isinstance(e, MediumError):
            asc = ASC_WRITE_ERROR if access == Access.WRITE else ASC_UNRECOVERED_READ
            return ScsiResult(CHECK_CONDITION, None, fixed_sense(MEDIUM_ERROR, *asc))
        if isinstance(e, NoSpaceError):
            # SBC-3 4.7.3.6: a thin LU out of backing space reports SPACE ALLOCATION
            # FAILED WRITE PROTECT.  Not MEDIUM ERROR: nothing is wrong with the
            # medium, and hosts (Linux: BLK_STS_NOSPC) must not mark sectors bad.
            return ScsiResult(CHECK_CONDITION, None,
                              fixed_sense(DATA_PROTECT, *ASC_SPACE_ALLOC_FAILED_WP))
        return ScsiResult(CHECK_CONDITION, None, write_protected().sense())     # ReadOnlyError

    # -- nexus and unit attention management (called by the transport) --------

    def nexus_lost(self, nexus: Nexus) -> None:
        """The I_T nexus is gone (logout, connection loss): SPC-2 reservation
        released, pending UAs dropped; the next command from it counts as new."""
        self._seen.discard(nexus)
        self._ua.pop(nexus, None)
        self.reservations.drop_spc2(nexus)

    def reset(self, issuer: Nexus | None = None) -> None:
        """LOGICAL UNIT RESET: SPC-2 reservation released (PRs stay); every
        nexus, the issuer included, gets BUS DEVICE RESET FUNCTION OCCURRED
        (SAM-5 6.3.3; libiscsi's MultipathIO.Reset checks every path, as LIO does)."""
        self.reservations.drop_spc2()
        for n in self._seen:
            self._post(n, ASC_BUS_DEVICE_RESET)
        if issuer is not None and issuer not in self._seen:
            self._post(issuer, ASC_BUS_DEVICE_RESET)

    def post_unit_attention(self, asc_ascq: tuple[int, int], nexus: Nexus | None = None) -> None:
        """Establish a UA for one nexus, or for every nexus seen so far
        (e.g. REPORTED LUNS DATA HAS CHANGED 3F/0E from the target)."""
        if nexus is not None:
            self._post(nexus, asc_ascq)
        else:
            for n in self._seen:
                self._post(n, asc_ascq)

    def reservation_attention(self, asc_ascq: tuple[int, int], nexus: Nexus) -> None:
        """Establish a UA a reservation change sets for ``nexus``, if this LU knows it: a
        nexus not seen here (or lost since) has nothing to be told, and a queue for it would
        only keep every other host off the write fast path."""
        if nexus in self._seen:
            self._post(nexus, asc_ascq)

    def clear_unit_attention(self, asc_ascq: tuple[int, int], nexus: Nexus) -> None:
        """Drop one pending UA of a nexus without reporting it (REPORT LUNS clears
        REPORTED LUNS DATA HAS CHANGED on every LU, SPC-4 6.33)."""
        q = self._ua.get(nexus)
        if q and asc_ascq in q:
            q.remove(asc_ascq)
            if not q:
                del self._ua[nexus]

    def _post(self, nexus: Nexus, asc: tuple[int, int]) -> None:
        q = self._ua.setdefault(nexus, [])
        if asc not in q and len(q) < _MAX_UAS:
            q.append(asc)

    def _capacity_changed(self) -> None:
        self._size = self.dev.size
        self.num_blocks = self._size // self.block_size
        for n in self._seen:
            self._post(n, ASC_CAPACITY_CHANGED)

    # ------------------------------------------------------------------------
    # helpers

    def _fits(self, lba: int, n: int) -> bool:
        """SBC-3 range rule: the LBA must exist even for a zero-length transfer."""
        nb = self.num_blocks
        return lba < nb and lba + n <= nb

    def _check_range(self, lba: int, n: int) -> None:
        if lba >= self.num_blocks or lba + n > self.num_blocks:
            raise lba_out_of_range()

    def _check_writable(self) -> None:
        if self.dev.readonly or self.modes.swp:
            raise write_protected()

    async def _begin_write(self, nexus: Nexus) -> None:
        if self._exclusive is not None:
            while self._exclusive is not None:
                await self._exclusive.wait()
            self._check_still_allowed(nexus)
        self._inflight += 1

    def _check_still_allowed(self, nexus: Nexus) -> None:
        """A write that waited may have been aborted meanwhile by a PREEMPT AND ABORT (which
        runs alone): its reservation check at arrival no longer holds."""
        if self.reservations.conflicts(nexus, Access.WRITE):
            raise ReservationConflict()

    def _end_write(self) -> None:
        self._inflight -= 1
        if not self._inflight and self._drained is not None:
            self._drained.set()

    def writes_paused(self):
        """An async context in which no write of this LU runs: the ones in flight finished,
        new ones wait and then check their reservation again (a shared reservation state
        applies another server's restricting change in it)."""
        return self._atomic(None)

    @contextlib.asynccontextmanager
    async def _atomic(self, nexus: Nexus | None) -> AsyncIterator[None]:
        """Run alone with respect to every write of this LU (CAW, ORWRITE, PREEMPT AND
        ABORT); a write (``nexus`` given) checks its reservation again once it runs."""
        async with self._exclusive_lock:
            done = self._exclusive = asyncio.Event()
            try:
                while self._inflight:
                    self._drained = asyncio.Event()
                    await self._drained.wait()
                self._drained = None
                if nexus is not None:
                    self._check_still_allowed(nexus)
                yield
            finally:
                self._exclusive = None
                done.set()

    # ------------------------------------------------------------------------
    # block commands (SBC-3)

    async def _read(self, cdb: bytes, data_out, exp: int, nexus: Nexus):
        lba, n = lba_len(cdb)
        if cdb[0] != op.READ_6 and cdb[1] & 0xE0:        # RDPROTECT without protection info
            raise invalid_field_in_cdb(1, 7)
        if lba >= self.num_blocks or lba + n > self.num_blocks:
            raise lba_out_of_range()
        if n > self.max_transfer:
            raise invalid_field_in_cdb(7 if cdb[0] == op.READ_10 else 6)
        if not n:
            return None
        bs = self.block_size
        return await self.dev.read(lba * bs, n * bs)

    async def _write(self, cdb: bytes, data_out, exp: int, nexus: Nexus):
        lba, n = lba_len(cdb)
        code = cdb[0]
        flags = 0 if code == op.WRITE_6 else cdb[1]
        if flags & 0xE0:                                  # WRPROTECT without protection info
            raise invalid_field_in_cdb(1, 7)
        if flags & 0x04 and code in _WRITE_VERIFY:       # BYTCHK 10b, 11b: reserved (SBC-4)
            raise invalid_field_in_cdb(1, 2)
        self._check_writable()
        if lba >= self.num_blocks or lba + n > self.num_blocks:
            raise lba_out_of_range()
        if n > self.max_transfer:
            raise invalid_field_in_cdb(7 if code == op.WRITE_10 else 6)
        if not n:
            return None
        bs = self.block_size
        nbytes = n * bs
        got = 0 if data_out is None else len(data_out)
        if got < nbytes:                                  # EDTL < SPDTL: see module docstring
            if got % bs:
                raise data_out_too_short()
            nbytes = got
            if not nbytes:
                return None
        if got != nbytes:
            data_out = data_out[:nbytes]
        # FUA, WRITE AND VERIFY (must reach the medium to be verified) and a
        # disabled write cache all mean write-through
        fua = bool(flags & 0x08) or not self.modes.wce or code in _WRITE_VERIFY
        await self._begin_write(nexus)
        try:
            await self.dev.write(lba * bs, data_out, fua)
        finally:
            self._end_write()
        return None

    async def _verify(self, cdb: bytes, data_out, exp: int, nexus: Nexus):
        lba, n = lba_len(cdb)
        if cdb[1] & 0xE0:                                 # VRPROTECT
            raise invalid_field_in_cdb(1, 7)
        bytchk = (cdb[1] >> 1) & 3
        if bytchk == 2:
            raise invalid_field_in_cdb(1, 2)
        self._check_range(lba, n)
        if n > self.max_transfer:
            raise invalid_field_in_cdb(7 if cdb[0] == op.VERIFY_10 else 6)
        if not n:
            return None
        bs = self.block_size
        if bytchk == 0:
            await self._verify_medium(lba * bs, n * bs)
            return None
        want = n * bs if bytchk == 1 else bs
        if data_out is None or len(data_out) < want:
            raise data_out_too_short()
        have = await self.dev.read(lba * bs, n * bs)
        if bytchk == 1:
            expect: bytes | memoryview = memoryview(data_out)[:want]
        else:
            expect = bytes(data_out[:bs]) * n
        if memoryview(have) != memoryview(expect):
            raise miscompare(_first_difference(expect, have))
        return None

    async def _verify_medium(self, offset: int, length: int) -> None:
        """BYTCHK 00b still verifies the medium (SBC-4 VERIFY: no data compared): read the
        range, so an unreadable block fails with MEDIUM ERROR as READ does; a piece of
        optimal-transfer size at a time, since nothing read is kept."""
        step = self.limits.optimal_transfer * self.block_size
        end = offset + length
        while offset < end:
            await self.dev.read(offset, min(step, end - offset))
            offset += step

    async def _compare_and_write(self, cdb: bytes, data_out, exp: int, nexus: Nexus):
        need(cdb, 16)
        flags = cdb[1]
        if flags & 0xE0:
            raise invalid_field_in_cdb(1, 7)
        lba = U64(cdb, 2)[0]
        n = cdb[13]
        self._check_writable()
        self._check_range(lba, n)
        if n > self.limits.max_compare_write:
            raise invalid_field_in_cdb(13)
        bs = self.block_size
        half = n * bs
        # SBC-4 5.3: the Data-Out Buffer is exactly 2n blocks.  Checked before
        # the n=0 no-op: 256 blocks wraps to 0 in the one-byte field.
        if exp != 2 * half:
            raise invalid_field_in_cdb(13)
        if not n:
            return None
        if data_out is None or len(data_out) < 2 * half:
            raise data_out_too_short()
        view = memoryview(data_out)
        fua = bool(flags & 0x08) or not self.modes.wce
        caw = getattr(self.dev, "compare_and_write", None)
        async with self._atomic(nexus):
            if caw is not None:
                # The device's own: atomic against every writer of it (a replicated volume
                # is written through several chunk servers); our lock orders it against ours.
                from chunk.blockdev import MiscompareError
                try:
                    await caw(lba * bs, view[:half], view[half:2 * half], fua)
                except MiscompareError as e:
                    raise miscompare(e.offset) from None
                return None
            have = await self.dev.read(lba * bs, half)
            if memoryview(have) != view[:half]:
                raise miscompare(_first_difference(view[:half], have))
            await self.dev.write(lba * bs, view[half:2 * half], fua)
        return None

    async def _orwrite(self, cdb: bytes, data_out, exp: int, nexus: Nexus):
        lba, n = lba_len(cdb)
        flags = cdb[1]
        if flags & 0xE0:                                  # ORPROTECT
            raise invalid_field_in_cdb(1, 7)
        self._check_writable()
        self._check_range(lba, n)
        if n > self.max_transfer:
            raise invalid_field_in_cdb(10)
        if not n:
            return None
        bs = self.block_size
        nbytes = n * bs
        if data_out is None or len(data_out) < nbytes:
            raise data_out_too_short()
        fua = bool(flags & 0x08) or not self.modes.wce
        async with self._atomic(nexus):
            have = await self.dev.read(lba * bs, nbytes)
            merged = (int.from_bytes(have, "big") |
                      int.from_bytes(data_out[:nbytes], "big")).to_bytes(nbytes, "big")
            await self.dev.write(lba * bs, merged, fua)
        return None

    async def _write_same(self, cdb: bytes, data_out, exp: int, nexus: Nexus):
        lba, n = lba_len(cdb)
        flags = cdb[1]
        if flags & 0xE0:
            raise invalid_field_in_cdb(1, 7)
        if flags & 0x10:                                  # ANCHOR: ANC_SUP is 0
            raise invalid_field_in_cdb(1, 4)
        ndob = cdb[0] == op.WRITE_SAME_16 and flags & 0x01
        self._check_writable()
        self._check_range(lba, n)
        if not n:                                         # WSNZ=1 in the Block Limits page
            raise invalid_field_in_cdb(7 if cdb[0] == op.WRITE_SAME_10 else 10)
        if n > self.limits.max_write_same:
            raise invalid_field_in_cdb(7 if cdb[0] == op.WRITE_SAME_10 else 10)
        bs = self.block_size
        if ndob:
            block: bytes = bytes(bs)
        else:
            if data_out is None or len(data_out) < bs:
                raise data_out_too_short()
            block = bytes(data_out[:bs])
        offset, length = lba * bs, n * bs
        await self._begin_write(nexus)
        try:
            if block.count(0) != bs:
                await self._write_pattern(offset, length, block)
            elif flags & 0x08 and self.thin:              # UNMAP, and unmapped blocks read zero
                await self.dev.unmap(offset, length)
            else:
                await self.dev.write_zeroes(offset, length)
            if not self.modes.wce:
                await self.dev.flush()
        finally:
            self._end_write()
        return None

    async def _write_pattern(self, offset: int, length: int, block: bytes) -> None:
        per = max(1, min(length, _PATTERN_CHUNK) // len(block))
        chunk = block * per
        end = offset + length
        while offset < end:
            part = chunk if end - offset >= len(chunk) else chunk[:end - offset]
            await self.dev.write(offset, part)
            offset += len(part)

    async def _unmap(self, cdb: bytes, data_out, exp: int, nexus: Nexus):
        if not self.thin:                                 # LBPU=0: UNMAP is not supported
            raise invalid_opcode()
        need(cdb, 10)
        if cdb[1] & 0x01:                                 # ANCHOR
            raise invalid_field_in_cdb(1, 0)
        self._check_writable()
        plen = U16(cdb, 7)[0]
        if not plen:
            return None
        if plen < 8:
            raise param_list_length_error()
        if data_out is None or len(data_out) < plen:
            raise data_out_too_short()
        data = bytes(data_out[:plen])
        bddl = U16(data, 2)[0]
        if U16(data, 0)[0] > plen - 2 or bddl > plen - 8:
            raise param_list_length_error()
        count = bddl // 16                                # a truncated last descriptor is ignored
        if count > self.limits.max_unmap_descriptors:
            raise invalid_field_in_param(2)
        ranges = []
        total = 0
        for i in range(count):
            lba, n = struct.unpack_from(">QI", data, 8 + 16 * i)
            if lba + n > self.num_blocks:
                raise lba_out_of_range()
            total += n                                    # SBC-4: the command's total, not each
            if total > self.limits.max_unmap_lbas:
                raise invalid_field_in_param(8 + 16 * i + 8)
            if n:
                ranges.append((lba, n))
        bs = self.block_size
        await self._begin_write(nexus)
        try:
            for lba, n in ranges:
                await self.dev.unmap(lba * bs, n * bs)
        finally:
            self._end_write()
        return None

    async def _synchronize_cache(self, cdb: bytes, data_out, exp: int, nexus: Nexus):
        lba, n = lba_len(cdb)
        self._check_range(lba, n)
        await self.dev.flush()                            # IMMED is honoured by finishing first
        return None

    async def _pre_fetch(self, cdb: bytes, data_out, exp: int, nexus: Nexus):
        lba, n = lba_len(cdb)
        self._check_range(lba, n)
        return None                                       # GOOD: "cache may not hold it all"

    async def _read_capacity_10(self, cdb: bytes, data_out, exp: int, nexus: Nexus):
        need(cdb, 10)
        if not cdb[8] & 0x01 and U32(cdb, 2)[0]:          # LBA without PMI
            raise invalid_field_in_cdb(2)
        return struct.pack(">II", min(self.num_blocks - 1, 0xFFFFFFFF), self.block_size)

    async def _service_action_in(self, cdb: bytes, data_out, exp: int, nexus: Nexus):
        need(cdb, 16)
        sa = cdb[1] & 0x1F
        alloc = U32(cdb, 10)[0]
        if sa == op.SAI_READ_CAPACITY_16:
            b = bytearray(32)
            struct.pack_into(">QI", b, 0, self.num_blocks - 1, self.block_size)
            b[13] = self.physical_block_exponent & 0x0F
            if self.thin:                                 # read-only too: still thin (VPD B2)
                b[14] = 0x80 | 0x40                       # LBPME, LBPRZ
            return bytes(b[:alloc])
        if sa == op.SAI_GET_LBA_STATUS:
            return (await self._get_lba_status(cdb))[:alloc]
        raise invalid_field_in_cdb(1, 4)

    async def _get_lba_status(self, cdb: bytes) -> bytes:
        lba = U64(cdb, 2)[0]
        if lba >= self.num_blocks:
            raise lba_out_of_range()
        bs = self.block_size
        rest = self.num_blocks - lba
        mapped, run = True, rest
        probe = getattr(self.dev, "allocation", None)
        if self.thin and probe is not None:
            is_mapped, nbytes = await probe(lba * bs, rest * bs)
            mapped, run = is_mapped, max(1, nbytes // bs)
        desc = struct.pack(">QIB3x", lba, min(run, 0xFFFFFFFF), 0 if mapped else 1)
        return struct.pack(">I4x", 4 + len(desc)) + desc

    # ------------------------------------------------------------------------
    # primary commands (SPC-4)

    async def _test_unit_ready(self, cdb: bytes, data_out, exp: int, nexus: Nexus):
        return None

    async def _request_sense(self, cdb: bytes, data_out, exp: int, nexus: Nexus):
        need(cdb, 6)
        if cdb[1] & 0x01:                                 # DESC: descriptor format unsupported
            raise invalid_field_in_cdb(1, 0)
        pending = self._ua.get(nexus)
        if pending:
            asc = pending.pop(0)
            if not pending:
                del self._ua[nexus]
            sense = fixed_sense(UNIT_ATTENTION, *asc)
        else:
            sense = fixed_sense(NO_SENSE, *ASC_NO_ADDITIONAL)
        return sense[:cdb[4]]

    async def _inquiry(self, cdb: bytes, data_out, exp: int, nexus: Nexus):
        need(cdb, 6)
        evpd, page, alloc = cdb[1] & 0x01, cdb[2], U16(cdb, 3)[0]
        if cdb[1] & 0x02:                                 # CMDDT is obsolete
            raise invalid_field_in_cdb(1, 1)
        if not evpd:
            if page:
                raise invalid_field_in_cdb(2)
            return inquiry.standard(self.ident)[:alloc]
        data = inquiry.vpd(page, ident=self.ident, limits=self.limits, thin=self.thin,
                           relative_port_id=nexus.relative_port_id,
                           target_port=nexus.target_port, protocol_id=self.protocol_id,
                           readonly=self.dev.readonly)
        return data[:alloc]

    async def _mode_sense(self, cdb: bytes, data_out, exp: int, nexus: Nexus):
        ten = cdb[0] == op.MODE_SENSE_10
        need(cdb, 10 if ten else 6)
        data = modes.mode_sense(cdb, self.modes, ten=ten,
                                write_protect=self.dev.readonly or self.modes.swp,
                                num_blocks=self.num_blocks, block_size=self.block_size)
        return data[:U16(cdb, 7)[0] if ten else cdb[4]]

    async def _mode_select(self, cdb: bytes, data_out, exp: int, nexus: Nexus):
        ten = cdb[0] == op.MODE_SELECT_10
        need(cdb, 10 if ten else 6)
        plen = U16(cdb, 7)[0] if ten else cdb[4]
        if plen and (data_out is None or len(data_out) < plen):
            raise data_out_too_short()
        data = bytes(data_out[:plen]) if plen else b""
        if modes.mode_select(cdb, data, self.modes, ten=ten, num_blocks=self.num_blocks,
                             block_size=self.block_size):
            for n in self._seen:
                if n != nexus:
                    self._post(n, ASC_MODE_PARAMS_CHANGED)
        return None

    async def _start_stop_unit(self, cdb: bytes, data_out, exp: int, nexus: Nexus):
        need(cdb, 6)
        b4 = cdb[4]
        if b4 & 0x02:                                     # LOEJ: the medium is not removable
            raise invalid_field_in_cdb(4, 1)
        if b4 >> 4 not in (0x0, 0x1, 0x2, 0x3, 0x7, 0xA, 0xB):
            raise invalid_field_in_cdb(4, 7)
        if not b4 & 0x01 and not b4 >> 4 and not b4 & 0x04:
            await self.dev.flush()                        # STOP without NO_FLUSH: flush cache
        return None

    async def _prevent_allow(self, cdb: bytes, data_out, exp: int, nexus: Nexus):
        need(cdb, 6)
        return None                                       # nothing to lock in place

    async def _prin(self, cdb: bytes, data_out, exp: int, nexus: Nexus):
        need(cdb, 10)
        await self.reservations.refresh()
        return self.reservations.prin(cdb)[:U16(cdb, 7)[0]]

    async def _prout(self, cdb: bytes, data_out, exp: int, nexus: Nexus):
        need(cdb, 10)
        plen = U32(cdb, 5)[0]
        if plen == 24 and (data_out is None or len(data_out) < 24):
            raise data_out_too_short()
        params = bytes(data_out or b"")[:24]
        if self.dev.readonly and cdb[1] & 0x1F in _RESTRICTING_PROUT:
            # A read-only grant (a read-only ACL entry, a snapshot LUN) shares the volume's
            # reservation state with the writers: a reservation or preemption from it would
            # lock out or deregister every writer. Registering and releasing its own stay.
            raise write_protected()
        if cdb[1] & 0x1F == PREEMPT_AND_ABORT:
            # SPC-4 5.13.11.2.4: the preempted nexuses' tasks are aborted before this
            # completes. Here: writes in flight finish first, and writes not yet started
            # find the new state when they run, so none of theirs lands after the answer.
            async with self._atomic(None):
                uas = await self.reservations.prout(nexus, cdb, params)
        else:
            uas = await self.reservations.prout(nexus, cdb, params)
        if uas:
            # Every LU over this state (a volume's read-write and read-only LUs on this server
            # share one), for the nexuses it knows: one never seen here gets POWER ON first.
            attached = getattr(self.reservations, "attached", None)
            for lu in attached() if attached is not None else (self,):
                for n, asc in uas:
                    lu.reservation_attention(asc, n)
        # Outside the exclusive section: another server's change may need it meanwhile.
        await self.reservations.settle()
        return None

    async def _reserve(self, cdb: bytes, data_out, exp: int, nexus: Nexus):
        """RESERVE(6) and RESERVE(10): the one SPC-2 reservation, no third-party one."""
        check_spc2_cdb(cdb, reserve=True)
        if self.dev.readonly:                             # as PR OUT's RESERVE, above
            raise write_protected()
        await self.reservations.spc2_reserve(nexus)
        await self.reservations.settle()
        return None

    async def _release(self, cdb: bytes, data_out, exp: int, nexus: Nexus):
        """RELEASE(6) and RELEASE(10); a third-party one releases nothing."""
        if check_spc2_cdb(cdb, reserve=False):
            await self.reservations.spc2_release_nothing(nexus)
        else:
            await self.reservations.spc2_release(nexus)
        return None

    async def _report_luns(self, cdb: bytes, data_out, exp: int, nexus: Nexus):
        need(cdb, 12)
        luns = self._luns(nexus) if self._luns else [self.ident.lun]
        return report_luns_command(cdb, luns)

    async def _maintenance_in(self, cdb: bytes, data_out, exp: int, nexus: Nexus):
        need(cdb, 12)
        sa = cdb[1] & 0x1F
        alloc = U32(cdb, 6)[0]
        if sa == op.MI_REPORT_SUPPORTED_OPCODES:
            return self._rsoc(cdb)[:alloc]
        if sa == op.MI_REPORT_TARGET_PORT_GROUPS:
            return self._rtpg(cdb, nexus)[:alloc]
        if sa == op.MI_REPORT_SUPPORTED_TMFS:
            if cdb[2] & 0x80:                             # REPD: extended format
                return bytes((self.tmf_support, 0, 0, 0x0C)).ljust(16, b"\0")[:alloc]
            return bytes((self.tmf_support, 0, 0, 0))[:alloc]
        raise invalid_field_in_cdb(1, 4)

    def _rsoc(self, cdb: bytes) -> bytes:
        rctd = bool(cdb[2] & 0x80)
        option = cdb[2] & 0x07
        timeouts = struct.pack(">HxBII", 0x0A, 0, 0, 30) if rctd else b""
        supported = op.SUPPORTED if self.thin else {
            k: v for k, v in op.SUPPORTED.items() if k != (op.UNMAP, None)}   # LBPU=0
        if option == 0:
            parts = []
            for (code, sa), usage in sorted(supported.items(),
                                            key=lambda kv: (kv[0][0], kv[0][1] or 0)):
                parts.append(struct.pack(">BxHxBH", code, sa or 0,
                                         (0x02 if rctd else 0) | (0x01 if sa is not None else 0),
                                         len(usage) + 1) + timeouts)
            body = b"".join(parts)
            return struct.pack(">I", len(body)) + body
        if option not in (1, 2, 3):
            raise invalid_field_in_cdb(2, 2)
        code, sa = cdb[3], U16(cdb, 4)[0]
        has_sa = code in op.WITH_SERVICE_ACTION
        if option == 1 and has_sa or option == 2 and not has_sa:
            raise invalid_field_in_cdb(2, 2)
        usage = supported.get((code, sa if has_sa else None))
        if usage is None:
            return bytes((0, 0x01, 0, 0))                 # SUPPORT 001b: not supported
        cdb_usage = bytes((code, *usage))
        return (bytes((0, (0x80 if rctd else 0) | 0x03)) + struct.pack(">H", len(cdb_usage))
                + cdb_usage + timeouts)

    def _rtpg(self, cdb: bytes, nexus: Nexus) -> bytes:
        """One target port group: this port, in ``alua_state``."""
        desc = struct.pack(">BBHBBBBHH", self.alua_state & 0x0F, 0x8F,
                           self.ident.target_port_group, 0, 0, 0, 1, 0,
                           nexus.relative_port_id)
        if (cdb[1] >> 5) == 1:                            # extended header
            return struct.pack(">IBBxx", len(desc) + 4, 0x10, 0) + desc
        return struct.pack(">I", len(desc)) + desc

