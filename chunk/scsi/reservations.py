"""Persistent reservations (SPC-4 5.12) and SPC-2 RESERVE/RELEASE for one LU.

All state sits behind ``ReservationState`` so that the cluster-wide variant
(``chunk/shared_reservations.py``: registrations in etcd, shared by every chunk
server exporting the volume) can replace the in-memory one: the mutating calls
are ``async`` and return the unit attentions to establish instead of posting
them, and the hot-path check ``conflicts()`` only reads local state.

Persist through power loss: the shared state persists whatever the host asks (every chunk
server may serve the LU, and none loses it on restart), so REPORT CAPABILITIES has PTPL_C=1
(APTPL accepted) and PTPL_A=1 (the capability is active); an APTPL of 0 cannot switch it
off. Not supported, and reported so: SPEC_I_PT, ALL_TG_PT (ATP_C=0: refused on the
REGISTER actions, the only ones it means something for; ignored on the others, as SPC-4
says), REGISTER AND MOVE.  PREEMPT AND ABORT is
a PREEMPT here; the unit runs it alone with respect to writes, so that none of
a preempted nexus's writes lands after it completes (``LogicalUnit._prout``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from .cdb import U32
from .nexus import Nexus
from .sense import (ASC_INVALID_RELEASE_OF_PR, ASC_REGISTRATIONS_PREEMPTED,
                    ASC_RESERVATIONS_PREEMPTED, ASC_RESERVATIONS_RELEASED, ILLEGAL_REQUEST,
                    ReservationConflict, ScsiError, invalid_field_in_cdb,
                    invalid_field_in_param, param_list_length_error)


class PrType(IntEnum):
    WRITE_EXCLUSIVE = 1
    EXCLUSIVE_ACCESS = 3
    WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 5
    EXCLUSIVE_ACCESS_REGISTRANTS_ONLY = 6
    WRITE_EXCLUSIVE_ALL_REGISTRANTS = 7
    EXCLUSIVE_ACCESS_ALL_REGISTRANTS = 8


_TYPES = frozenset(int(t) for t in PrType)
_ALL_REGISTRANTS = frozenset((7, 8))
_REGISTRANTS_ACCESS = frozenset((5, 6, 7, 8))     # registered nexuses may read and write
_READS_SHARED = frozenset((1, 5, 7))              # write exclusive: anyone may read


class Access(IntEnum):
    """How a command is treated by reservations (SPC-4 table 66, SBC-3 table 13).

    READ CAPACITY is allowed under every persistent reservation type (SBC-3 table 13) and,
    as tgtd and SCST do, under another nexus's SPC-2 RESERVE(6): a host sharing the LU must
    still learn its size. TEST UNIT READY keeps SPC-2's RESERVATION CONFLICT (tgtd and LIO
    too; multipath path checkers read it as "path up"). PR IN/OUT conflict with an SPC-2
    reservation whoever sends them, its holder included (spc2r20 5.5.1: "all PERSISTENT
    RESERVE IN and all PERSISTENT RESERVE OUT commands shall conflict regardless of
    initiator or service action"), and never with a persistent reservation."""
    ALWAYS = 0        # INQUIRY, REPORT LUNS, REQUEST SENSE, RSOC, READ CAPACITY: never conflicts
    NON_MEDIUM = 1    # TEST UNIT READY, START STOP UNIT with START=1 and POWER CONDITION 0h,
    #                   PREVENT ALLOW with PREVENT=00b: conflicts only with SPC-2 (the other
    #                   START STOP UNIT and PREVENT ALLOW are WRITE: ``unit._power_medium_access``)
    READ = 2          # reads medium or mode data: shared under the write-exclusive types
    WRITE = 3         # modifies medium or mode data
    PERSISTENT = 4    # PR IN/OUT: conflicts with any SPC-2 reservation, the holder's too


# PR OUT service actions
REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_AND_ABORT, REGISTER_IGNORE, \
    REGISTER_AND_MOVE = range(8)

UnitAttentions = list[tuple[Nexus, tuple[int, int]]]


@dataclass
class Registration:
    key: int


def transport_id(initiator: str) -> bytes:
    """iSCSI TransportID (SPC-4 7.6.4.6): format 01b when the name carries an ISID."""
    fmt = 0x40 if ",i,0x" in initiator else 0x00
    name = initiator.encode() + b"\0"
    name += bytes(-len(name) % 4)
    if len(name) < 20:
        name = name.ljust(20, b"\0")
    return bytes((fmt | 0x05, 0)) + struct.pack(">H", len(name)) + name


_THIRD_PARTY, _LONGID = 0x10, 0x02      # RESERVE/RELEASE CDB byte 1


def check_spc2_cdb(cdb: bytes, reserve: bool) -> bool:
    """Check a RESERVE or RELEASE CDB, 6 or 10 bytes long (both act on the one SPC-2
    reservation); True for a third-party RELEASE, which has nothing to release.

    3RDPTY (byte 1 bit 4: RESERVE(10)/RELEASE(10) in SPC-2 7.21/7.23; RESERVE(6)/RELEASE(6)
    in SCSI-2, obsolete there since SPC-2) asks for a reservation held for another SCSI
    device, named by a THIRD PARTY DEVICE ID (in the CDB, or with LONGID in an 8-byte
    parameter list). Such an ID names no iSCSI initiator port, so none is ever made, the
    same way for both lengths:

    * a third-party RESERVE is ILLEGAL REQUEST, INVALID FIELD IN CDB at byte 1 bit 4.
      Taking it for the sender instead (LIO ignores the bit) would give the LU to the host
      that asked for it on another's behalf;
    * a third-party RELEASE ends only a third-party reservation the sender made for that
      device: there is none, and releasing nothing is GOOD, as a non-holder's RELEASE. The
      sender's own reservation stays (LIO, ignoring the bit, releases it). Its LONGID and
      parameter list are not looked at (the list is not transferred).

    Without 3RDPTY, LONGID or a nonzero PARAMETER LIST LENGTH in a 10-byte form is refused
    (INVALID FIELD IN CDB at the field): its list could only carry a device ID, and nothing
    is ever transferred. The other obsolete SCSI-2 fields (LUN, extent, reservation
    identification) are not looked at; REPORT SUPPORTED OPERATION CODES says so."""
    ten = cdb[:1] in (b"\x56", b"\x57")             # RESERVE(10), RELEASE(10)
    if len(cdb) < (10 if ten else 6):
        raise invalid_field_in_cdb(0)
    if cdb[1] & _THIRD_PARTY:
        if reserve:
            raise invalid_field_in_cdb(1, 4)
        return True
    if ten:
        if cdb[1] & _LONGID:
            raise invalid_field_in_cdb(1, 1)
        if cdb[7] or cdb[8]:
            raise invalid_field_in_cdb(7)
    return False


class ReservationState:
    """In-memory reservation state of one logical unit."""

    def __init__(self) -> None:
        self.generation = 0
        self.registrations: dict[Nexus, Registration] = {}
        self.holder: Nexus | None = None     # PR holder (for *_ALL_REGISTRANTS: who reserved)
        self.type = 0                         # PrType of the reservation, 0 when none
        self.spc2: Nexus | None = None        # SPC-2 RESERVE(6) holder

    # -- checks ----------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Cheap hot-path test: is any reservation (PR or SPC-2) in place?"""
        return self.holder is not None or self.spc2 is not None

    def is_holder(self, n: Nexus) -> bool:
        if self.holder is None:
            return False
        if self.type in _ALL_REGISTRANTS:
            return n in self.registrations
        return n == self.holder

    def conflicts(self, n: Nexus, access: Access) -> bool:
        if access == Access.ALWAYS:
            return False
        if access == Access.PERSISTENT:
            return self.spc2 is not None
        if self.spc2 is not None and self.spc2 != n:
            return True
        if self.holder is None or access == Access.NON_MEDIUM or self.is_holder(n):
            return False
        if access == Access.READ and self.type in _READS_SHARED:
            return False
        return not (self.type in _REGISTRANTS_ACCESS and n in self.registrations)

    # -- SPC-2 RESERVE(6) / RELEASE(6), and RESERVE(10) / RELEASE(10) -----------------
    #
    # The 10-byte forms act on the same reservation (see ``check_spc2_cdb``).
    #
    # While any I_T nexus is registered, SPC-2 5.5.1 has every RESERVE and every RELEASE
    # conflict, from whichever nexus. SPC-3 5.6.3 (CRH=1, reported by REPORT CAPABILITIES)
    # excepts the persistent reservation holder and, under a registrants-only or
    # all-registrants reservation, every registered nexus: their RESERVE or RELEASE is GOOD
    # and changes nothing. LIO (target_check_scsi2_reservation_conflict) does the same.

    def _registered_exception(self, n: Nexus) -> bool:
        """Is ``n`` one SPC-3 5.6.3 answers GOOD without doing anything?"""
        return self.holder is not None and (
            self.is_holder(n) or (self.type in _REGISTRANTS_ACCESS and n in self.registrations))

    async def spc2_reserve(self, n: Nexus) -> None:
        if self.registrations:
            if self._registered_exception(n):
                return
            raise ReservationConflict()
        if self.spc2 is not None and self.spc2 != n:
            raise ReservationConflict()
        self.spc2 = n

    async def spc2_release(self, n: Nexus) -> None:
        if self.registrations:
            if self._registered_exception(n):
                return
            raise ReservationConflict()
        if self.spc2 == n:                            # from a non-holder: GOOD, nothing done
            self.spc2 = None

    async def spc2_release_nothing(self, n: Nexus) -> None:
        """A RELEASE with nothing to release (a third-party one, see ``check_spc2_cdb``):
        RESERVATION CONFLICT where ``spc2_release`` would conflict, else GOOD; nothing
        changes. Answered from the latest state (``refresh``: a shared one reads it)."""
        await self.refresh()
        if self.registrations and not self._registered_exception(n):
            raise ReservationConflict()

    def drop_spc2(self, n: Nexus | None = None) -> None:
        """Release the SPC-2 reservation, only ``n``'s when given: I_T nexus loss releases
        an SPC-2 reservation, LOGICAL UNIT RESET / hard reset any; PR state survives both.
        Called by the transport, so it cannot wait (a shared state stores it behind)."""
        if self.spc2 is not None and (n is None or self.spc2 == n):
            self.spc2 = None

    async def nexus_lost(self, n: Nexus) -> None:
        self.drop_spc2(n)

    async def reset(self) -> None:
        self.drop_spc2()

    async def refresh(self) -> None:
        """Bring the state up to date before PERSISTENT RESERVE IN answers from it (a no-op
        here; a state shared between servers reads the shared copy)."""

    async def settle(self) -> None:
        """Return once the changes made so far hold everywhere the LU is served (a no-op
        here; a shared state waits for the other servers to apply them)."""

    # -- PERSISTENT RESERVE IN -------------------------------------------------

    def prin(self, cdb: bytes) -> bytes:
        sa = cdb[1] & 0x1F
        if sa == 0:                                   # READ KEYS
            keys = b"".join(struct.pack(">Q", r.key) for r in self.registrations.values())
            return struct.pack(">II", self.generation, len(keys)) + keys
        if sa == 1:                                   # READ RESERVATION
            if self.holder is None:
                return struct.pack(">II", self.generation, 0)
            key = 0 if self.type in _ALL_REGISTRANTS else self.registrations[self.holder].key
            return struct.pack(">IIQ4xxBxx", self.generation, 16, key, self.type)
        if sa == 2:                                   # REPORT CAPABILITIES
            # CRH, PTPL_C; TMV with ALLOW COMMANDS 0, PTPL_A; every type; no SIP_C/ATP_C
            return struct.pack(">HBBBBxx", 8, 0x11, 0x81, 0xEA, 0x01)
        if sa == 3:                                   # READ FULL STATUS
            out = []
            for n, r in self.registrations.items():
                tid = transport_id(n.initiator)
                holder = self.is_holder(n)
                out.append(struct.pack(">Q4xBB4xHI", r.key, 0x01 if holder else 0,
                                       self.type if holder else 0, n.relative_port_id,
                                       len(tid)) + tid)
            body = b"".join(out)
            return struct.pack(">II", self.generation, len(body)) + body
        raise invalid_field_in_cdb(1, 4)

    # -- PERSISTENT RESERVE OUT ------------------------------------------------

    async def prout(self, n: Nexus, cdb: bytes, data: bytes | memoryview) -> UnitAttentions:
        """Execute PR OUT; returns the unit attentions to establish.

        Raises ``ReservationConflict`` or ``ScsiError``; state is unchanged
        when it raises.
        """
        sa = cdb[1] & 0x1F
        scope, rtype = cdb[2] >> 4, cdb[2] & 0x0F
        if sa > REGISTER_AND_MOVE or sa == REGISTER_AND_MOVE:
            raise invalid_field_in_cdb(1, 4)
        if U32(cdb, 5)[0] != 24:
            raise param_list_length_error()
        key, sark = struct.unpack_from(">QQ", data, 0)
        flags = data[20]
        if flags & 0x08:                              # SPEC_I_PT: not supported
            raise invalid_field_in_param(20, 3)
        if flags & 0x04 and sa in (REGISTER, REGISTER_IGNORE):   # ALL_TG_PT: ATP_C=0
            raise invalid_field_in_param(20, 2)
        # APTPL (bit 0): accepted, and the state persists whatever its value (PTPL_A=1)

        reg = self.registrations.get(n)
        if sa in (REGISTER, REGISTER_IGNORE):
            return self._register(n, reg, key, sark, ignore=sa == REGISTER_IGNORE)
        if reg is None or reg.key != key:
            raise ReservationConflict()
        if sa == CLEAR:
            uas = [(m, ASC_RESERVATIONS_PREEMPTED) for m in self.registrations if m != n]
            self.registrations.clear()
            self._drop_reservation()
            self._bump()
            return uas
        if scope != 0:
            raise invalid_field_in_cdb(2, 7)
        if sa == RESERVE:
            if rtype not in _TYPES:
                raise invalid_field_in_cdb(2, 3)
            if self.holder is not None:
                if self.is_holder(n) and self.type == rtype:
                    return []
                raise ReservationConflict()
            self.holder, self.type = n, rtype
            return []
        if sa == RELEASE:
            if self.holder is None or not self.is_holder(n):
                return []
            if rtype != self.type:
                raise ScsiError(ILLEGAL_REQUEST, ASC_INVALID_RELEASE_OF_PR)
            released = self.type
            self._drop_reservation()
            if released in (PrType.WRITE_EXCLUSIVE, PrType.EXCLUSIVE_ACCESS):
                return []
            return [(m, ASC_RESERVATIONS_RELEASED) for m in self.registrations if m != n]
        # PREEMPT, PREEMPT AND ABORT
        if rtype not in _TYPES:
            raise invalid_field_in_cdb(2, 3)
        return self._preempt(n, sark, rtype)

    def _register(self, n: Nexus, reg: Registration | None, key: int, sark: int,
                  ignore: bool) -> UnitAttentions:
        if reg is None:
            if key != 0 and not ignore:
                raise ReservationConflict()
            if sark == 0:
                return []
            self.registrations[n] = Registration(sark)
            self._bump()
            return []
        if not ignore and key != reg.key:
            raise ReservationConflict()
        self._bump()
        if sark != 0:
            reg.key = sark
            return []
        return self._unregister(n)

    def _unregister(self, n: Nexus) -> UnitAttentions:
        del self.registrations[n]
        if self.holder is None:
            return []
        if self.type in _ALL_REGISTRANTS:
            if not self.registrations:
                self._drop_reservation()
            elif self.holder == n:
                self.holder = next(iter(self.registrations))
            return []
        if self.holder != n:
            return []
        released = self.type
        self._drop_reservation()
        if released in (PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
                        PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY):
            return [(m, ASC_RESERVATIONS_RELEASED) for m in self.registrations]
        return []

    def _remove(self, victims: list[Nexus]) -> UnitAttentions:
        for m in victims:
            del self.registrations[m]
        return [(m, ASC_REGISTRATIONS_PREEMPTED) for m in victims]

    def _preempt(self, n: Nexus, sark: int, rtype: int) -> UnitAttentions:
        if self.holder is None or (self.type not in _ALL_REGISTRANTS
                                   and sark != self.registrations[self.holder].key):
            # no reservation, or SARK names registrants other than the holder:
            # only registrations are removed (SPC-4 5.12.11.4.3)
            if sark == 0:
                raise invalid_field_in_param(8)
            victims = [m for m, r in self.registrations.items() if r.key == sark and m != n]
            if not victims:
                raise ReservationConflict()
            self._bump()
            return self._remove(victims)
        if self.type in _ALL_REGISTRANTS:
            if sark != 0:
                victims = [m for m, r in self.registrations.items()
                           if r.key == sark and m != n]
                if not victims:
                    raise ReservationConflict()
                self._bump()
                return self._remove(victims)
            victims = [m for m in self.registrations if m != n]
        else:
            victims = [m for m, r in self.registrations.items() if r.key == sark and m != n]
        changed = rtype != self.type
        uas = self._remove(victims)
        self.holder, self.type = n, rtype
        self._bump()
        if changed:
            uas += [(m, ASC_RESERVATIONS_RELEASED) for m in self.registrations if m != n]
        return uas

    def _bump(self) -> None:
        """PRgeneration: "a 32-bit wrapping counter" (SPC-4 6.16.2), FFFFFFFFh then 0."""
        self.generation = (self.generation + 1) & 0xFFFFFFFF

    def _drop_reservation(self) -> None:
        self.holder, self.type = None, 0


__all__ = ["Access", "PrType", "ReservationState", "Registration", "check_spc2_cdb", "transport_id"]
