"""Mode pages: MODE SENSE(6/10) data and MODE SELECT(6/10) parsing (SPC-4 7.5, SBC-3 6.4).

Pages: caching (08h), control (0Ah), informational exceptions (1Ch).  Nothing is
changeable: the changeable-values mask is all zero and a MODE SELECT that changes a
field is INVALID FIELD IN PARAMETER LIST (SPC-4 7.5.4: a field not changeable).  WCE
and SWP were changeable, but per LogicalUnit object: a host that set SWP=1 or WCE=0
through one chunk server was obeyed there only, and forgotten at restart (any chunk
server may serve a LUN); a MODE SELECT repeating the current values is still GOOD.
Nothing is saveable: PC=11b and SP=1 are refused with SAVING PARAMETERS NOT SUPPORTED /
INVALID FIELD IN CDB.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .sense import (ASC_SAVING_PARAMS_UNSUPPORTED, ILLEGAL_REQUEST, ScsiError,
                    invalid_field_in_cdb, invalid_field_in_param, param_list_length_error)

CACHING = 0x08
CONTROL = 0x0A
INFO_EXCEPTIONS = 0x1C
ALL_PAGES = 0x3F

PC_CURRENT, PC_CHANGEABLE, PC_DEFAULT, PC_SAVED = 0, 1, 2, 3


@dataclass
class ModeState:
    """The mode parameters of one LU (set at creation; no MODE SELECT changes them)."""
    wce: bool = True              # write cache enabled: writes may sit in the page cache
    swp: bool = False             # software write protect (never set: not changeable)
    default_wce: bool = True


def _caching(wce: bool) -> bytearray:
    b = bytearray(20)
    b[0], b[1] = CACHING, 0x12
    if wce:
        b[2] = 0x04
    return b


def _control(swp: bool) -> bytearray:
    b = bytearray(12)
    b[0], b[1] = CONTROL, 0x0A
    b[2] = 0x02                   # GLTSD: no log parameters are saved
    b[3] = 0x10                   # QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
    if swp:
        b[4] = 0x08
    return b


def _info_exceptions() -> bytearray:
    b = bytearray(12)
    b[0], b[1] = INFO_EXCEPTIONS, 0x0A
    b[2] = 0x08                   # DEXCPT: no informational exception reporting
    return b


def page_bytes(code: int, pc: int, st: ModeState) -> bytearray:
    if code == CACHING:
        if pc == PC_CHANGEABLE:
            b = _caching(False)               # WCE not changeable: not shared between servers
            return b
        return _caching(st.default_wce if pc == PC_DEFAULT else st.wce)
    if code == CONTROL:
        if pc == PC_CHANGEABLE:
            b = bytearray(12)                 # SWP not changeable: not shared between servers
            b[0], b[1] = CONTROL, 0x0A
            return b
        return _control(False if pc == PC_DEFAULT else st.swp)
    if code == INFO_EXCEPTIONS:
        if pc == PC_CHANGEABLE:
            b = bytearray(12)
            b[0], b[1] = INFO_EXCEPTIONS, 0x0A
            return b
        return _info_exceptions()
    raise KeyError(code)


PAGES = (CACHING, CONTROL, INFO_EXCEPTIONS)


def mode_sense(cdb: bytes, st: ModeState, *, ten: bool, write_protect: bool,
               num_blocks: int, block_size: int) -> bytes:
    dbd = bool(cdb[1] & 0x08)
    llbaa = ten and bool(cdb[1] & 0x10)
    pc, code, sub = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
    if pc == PC_SAVED:
        raise ScsiError(ILLEGAL_REQUEST, ASC_SAVING_PARAMS_UNSUPPORTED)
    if code == ALL_PAGES:
        if sub not in (0x00, 0xFF):
            raise invalid_field_in_cdb(3)
        pages = b"".join(page_bytes(c, pc, st) for c in PAGES)
    elif code in PAGES:
        if sub not in (0x00, 0xFF):       # 0xFF: all subpages of the page; ours has none
            raise invalid_field_in_cdb(3)
        pages = bytes(page_bytes(code, pc, st))
    else:
        raise invalid_field_in_cdb(2, 5)

    if dbd:
        desc = b""
    elif llbaa:
        desc = struct.pack(">QII", num_blocks, 0, block_size)
    else:
        desc = struct.pack(">II", min(num_blocks, 0xFFFFFFFF), block_size & 0xFFFFFF)
    dsp = (0x80 if write_protect else 0) | 0x10          # WP, DPOFUA
    if ten:
        total = 8 + len(desc) + len(pages)
        hdr = struct.pack(">HBBBBH", total - 2, 0, dsp, 0x01 if desc and llbaa else 0, 0,
                          len(desc))
    else:
        total = 4 + len(desc) + len(pages)
        hdr = struct.pack(">BBBB", min(total - 1, 0xFF), 0, dsp, len(desc))
    return hdr + desc + pages


def mode_select(cdb: bytes, data: bytes | memoryview, st: ModeState, *, ten: bool,
                num_blocks: int, block_size: int) -> bool:
    """Validate and apply; returns True when a parameter changed.

    Every page is checked before anything is applied, so a bad list changes
    nothing.  Only bits in the changeable mask may differ from current values.
    """
    if cdb[1] & 0x01:                     # SP: we cannot save
        raise invalid_field_in_cdb(1, 0)
    data = bytes(data)
    hlen = 8 if ten else 4
    if not data:
        return False
    if len(data) < hlen:
        raise param_list_length_error()
    if ten:
        bdl = struct.unpack_from(">H", data, 6)[0]
        long_lba = bool(data[4] & 0x01)
    else:
        bdl = data[3]
        long_lba = False
    pos = hlen
    if bdl:
        dlen = 16 if long_lba else 8
        if bdl % dlen or pos + bdl > len(data):
            raise param_list_length_error() if pos + bdl > len(data) \
                else invalid_field_in_param(6 if ten else 3)
        for off in range(pos, pos + bdl, dlen):
            if long_lba:
                nb, _, bl = struct.unpack_from(">QII", data, off)
            else:
                nb, bl = struct.unpack_from(">II", data, off)
                bl &= 0xFFFFFF
            if bl != block_size:
                raise invalid_field_in_param(off + dlen - 3)
            if nb not in (0, num_blocks, min(num_blocks, 0xFFFFFFFF)):
                raise invalid_field_in_param(off)
        pos += bdl

    updates: list[tuple[int, bytes]] = []
    while pos < len(data):
        if pos + 2 > len(data):
            raise param_list_length_error()
        code, spf = data[pos] & 0x3F, data[pos] & 0x40
        if spf or code not in PAGES:
            raise invalid_field_in_param(pos)
        plen = data[pos + 1] + 2
        if pos + plen > len(data):
            raise param_list_length_error()
        cur = page_bytes(code, PC_CURRENT, st)
        mask = page_bytes(code, PC_CHANGEABLE, st)
        if plen != len(cur):
            raise invalid_field_in_param(pos + 1)
        new = data[pos:pos + plen]
        for i in range(2, plen):
            if (new[i] ^ cur[i]) & ~mask[i] & 0xFF:
                raise invalid_field_in_param(pos + i)
        updates.append((code, new))
        pos += plen

    changed = False
    for code, new in updates:
        if code == CACHING:
            wce = bool(new[2] & 0x04)
            changed |= wce != st.wce
            st.wce = wce
        elif code == CONTROL:
            swp = bool(new[4] & 0x08)
            changed |= swp != st.swp
            st.swp = swp
    return changed
