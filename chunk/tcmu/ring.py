"""Codec of the TCMU mailbox and command ring, over any writable buffer.

Layout (include/uapi/linux/target_core_user.h, mailbox version 2; all fields
little-endian on x86, ``__packed``):

* mailbox at offset 0: ``u16 version, u16 flags, u32 cmdr_off, u32 cmdr_size,
  u32 cmd_head`` then ``u32 cmd_tail`` on its own 64-byte cache line (offset 64).
  The kernel moves ``cmd_head``; userspace moves ``cmd_tail``.
* the command ring at ``cmdr_off``, ``cmdr_size`` bytes, a circular buffer of
  8-byte aligned entries. Each starts with ``u32 len_op`` (length | opcode in the
  low 3 bits), ``u16 cmd_id``, ``u8 kflags``, ``u8 uflags``. Opcodes: PAD (skip
  it), CMD, TMR (a notice; needs no answer).
* a CMD request: ``u32 iov_cnt, u32 iov_bidi_cnt, u32 iov_dif_cnt``, 4 bytes of
  padding (the request struct inside the packed entry is not itself packed, so
  ``u64 cdb_off`` sits 8-aligned at entry offset 24), ``u64 pad, u64 pad``, then at
  entry offset 48 ``iov_cnt + bidi + dif`` ``struct iovec {u64 base, u64 len}``
  whose bases, like ``cdb_off``, are offsets into the mapping.
* the response overwrites the same entry: ``u8 scsi_status, u8, u16, u32
  read_len, char sense[96]`` at offset 8.

Completion: write the response into a CMD entry at ``cmd_tail``, advance the
tail by its length (PAD/TMR entries are just stepped over), then write to the
uio fd. With ``CAP_OOOC`` the kernel takes the cmd_id from the entry, so a
response may go into whatever CMD slot is at the tail; without it, commands
complete in ring order. This module knows nothing about files or event loops:
the unit tests drive it over a bytearray built from the header's layout.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAILBOX_VERSION = 2
CAP_OOOC = 1 << 0            # out-of-order completion
CAP_READ_LEN = 1 << 1        # userspace may report a short data-in length
CAP_TMR = 1 << 2
CAP_KEEP_BUF = 1 << 3

OFF_VERSION, OFF_FLAGS, OFF_CMDR_OFF, OFF_CMDR_SIZE, OFF_HEAD = 0, 2, 4, 8, 12
OFF_TAIL = 64                # __aligned__(ALIGN_SIZE=64)
MAILBOX_SIZE = 128

OP_PAD, OP_CMD, OP_TMR = 0, 1, 2
OP_MASK = 0x7
ALIGN = 8                    # TCMU_OP_ALIGN_SIZE = sizeof(__u64)

UFLAG_UNKNOWN_OP = 0x1
UFLAG_READ_LEN = 0x2

SENSE_BUFFERSIZE = 96
HDR = struct.Struct("<IHBB")                 # len_op, cmd_id, kflags, uflags
REQ = struct.Struct("<IIIIQQQ")              # iov_cnt, bidi, dif, (align), cdb_off, pad, pad (at 8)
IOV = struct.Struct("<QQ")                   # iov_base (offset into the map), iov_len
REQ_IOV_OFF = HDR.size + REQ.size            # 48
RSP = struct.Struct("<BBHI")                 # scsi_status, pad, pad, read_len (at 8)
RSP_SENSE_OFF = HDR.size + RSP.size          # 16
ENTRY_MIN = RSP_SENSE_OFF + SENSE_BUFFERSIZE # sizeof(struct tcmu_cmd_entry) = 112
MAX_CDB = 260                                # varlen CDBs top out near here (SPC-4)


class RingError(Exception):
    """The ring itself is unreadable (bad mailbox, entry length, head): nothing after it
    can be trusted, so the caller must reset the ring rather than guess."""


class EntryError(Exception):
    """One CMD entry points outside the mapping: that command fails, the ring goes on."""


@dataclass(frozen=True)
class Mailbox:
    version: int
    flags: int
    cmdr_off: int
    cmdr_size: int

    @property
    def ooo(self) -> bool:
        return bool(self.flags & CAP_OOOC)


def read_mailbox(buf, map_size: int) -> Mailbox:
    version, flags, cmdr_off, cmdr_size = struct.unpack_from("<HHII", buf, 0)
    if version not in (1, MAILBOX_VERSION):
        raise RingError(f"TCMU mailbox version {version} (this code speaks 1 and 2)")
    if cmdr_off < MAILBOX_SIZE or cmdr_size < ENTRY_MIN or cmdr_off + cmdr_size > map_size \
            or cmdr_size % ALIGN:
        raise RingError(f"TCMU command ring at {cmdr_off}+{cmdr_size} does not fit the "
                        f"{map_size}-byte mapping")
    return Mailbox(version, flags, cmdr_off, cmdr_size)


def head(buf) -> int:
    return struct.unpack_from("<I", buf, OFF_HEAD)[0]


def tail(buf) -> int:
    return struct.unpack_from("<I", buf, OFF_TAIL)[0]


def set_tail(buf, value: int) -> None:
    struct.pack_into("<I", buf, OFF_TAIL, value)


@dataclass(frozen=True)
class Entry:
    """One ring entry as parsed: where it is, what it is, and (CMD) what it asks."""
    pos: int                              # offset inside the ring
    length: int
    op: int
    cmd_id: int = 0
    cdb: bytes = b""
    iovs: tuple[tuple[int, int], ...] = ()   # data iovecs (bidi/dif ones are not data for us)
    error: str | None = None                 # why this CMD cannot be run (EntryError text)

    @property
    def data_length(self) -> int:
        return sum(n for _, n in self.iovs)


def _cdb_length(first: int, buf, off: int) -> int:
    """SCSI CDB length from its opcode group (scsi_command_size in the kernel)."""
    group = first >> 5
    if first == 0x7F:                    # VARIABLE LENGTH: 8 + additional length
        return 8 + buf[off + 7]
    return {0: 6, 1: 10, 2: 10, 3: 16, 4: 16, 5: 12, 6: 16, 7: 16}[group]


def parse_entry(buf, mb: Mailbox, map_size: int, pos: int) -> Entry:
    """Decode the entry at ring offset ``pos``; raise RingError if its length is unusable."""
    if pos % ALIGN or pos >= mb.cmdr_size:
        raise RingError(f"TCMU ring position {pos} is not an aligned offset in the ring")
    base = mb.cmdr_off + pos
    len_op, cmd_id, _kflags, _uflags = HDR.unpack_from(buf, base)
    op, length = len_op & OP_MASK, len_op & ~OP_MASK
    if length < HDR.size or length % ALIGN or pos + length > mb.cmdr_size:
        raise RingError(f"TCMU entry at ring offset {pos} has length {length} "
                        f"(op {op}, ring {mb.cmdr_size} bytes)")
    if op != OP_CMD:
        return Entry(pos, length, op, cmd_id)
    if length < ENTRY_MIN:
        raise RingError(f"TCMU CMD entry at ring offset {pos} is {length} bytes, "
                        f"shorter than a response ({ENTRY_MIN})")
    iov_cnt, bidi, dif, _, cdb_off, _, _ = REQ.unpack_from(buf, base + HDR.size)
    try:
        if REQ_IOV_OFF + (iov_cnt + bidi + dif) * IOV.size > length:
            raise EntryError(f"{iov_cnt}+{bidi}+{dif} iovecs do not fit a {length}-byte entry")
        iovs = []
        for i in range(iov_cnt):
            b, n = IOV.unpack_from(buf, base + REQ_IOV_OFF + i * IOV.size)
            if b < mb.cmdr_off + mb.cmdr_size or b + n > map_size:
                raise EntryError(f"iovec {i} ({b}+{n}) is outside the data area")
            iovs.append((b, n))
        if cdb_off < MAILBOX_SIZE or cdb_off >= map_size:
            raise EntryError(f"CDB offset {cdb_off} is outside the mapping")
        n = _cdb_length(buf[cdb_off], buf, cdb_off) if cdb_off + 8 <= map_size else 6
        if n > MAX_CDB or cdb_off + n > map_size:
            raise EntryError(f"CDB of {n} bytes at {cdb_off} runs past the mapping")
        cdb = bytes(buf[cdb_off:cdb_off + n])
    except EntryError as e:
        return Entry(pos, length, op, cmd_id, error=str(e))
    return Entry(pos, length, op, cmd_id, cdb, tuple(iovs))


def pending(buf, mb: Mailbox, map_size: int, start: int, stop: int) -> list[Entry]:
    """Entries from ring offset ``start`` up to ``stop`` (the head), in ring order."""
    if stop >= mb.cmdr_size or stop % ALIGN:
        raise RingError(f"TCMU cmd_head {stop} is outside the {mb.cmdr_size}-byte ring")
    out, pos, walked = [], start, 0
    while pos != stop:
        e = parse_entry(buf, mb, map_size, pos)
        out.append(e)
        walked += e.length
        if walked > mb.cmdr_size:
            raise RingError("TCMU entries between tail and head overrun the ring")
        pos = (pos + e.length) % mb.cmdr_size
    return out


def gather(buf, iovs, length: int) -> bytes:
    """The first ``length`` bytes of data-out, copied: the device may keep the buffer past
    the command's completion, when the kernel reuses those pages."""
    if iovs and iovs[0][1] >= length:
        b = iovs[0][0]
        return bytes(buf[b:b + length])
    parts, left = [], length
    for b, n in iovs:
        if left <= 0:
            break
        take = min(n, left)
        parts.append(bytes(buf[b:b + take]))
        left -= take
    return b"".join(parts)


def scatter(buf, iovs, data) -> int:
    """Copy data-in into the iovecs; returns how many bytes went in."""
    mv, done = memoryview(data), 0
    for b, n in iovs:
        if done >= len(mv):
            break
        take = min(n, len(mv) - done)
        buf[b:b + take] = mv[done:done + take]
        done += take
    return done


def write_response(buf, mb: Mailbox, pos: int, cmd_id: int, status: int, sense: bytes | None = None,
                   read_len: int | None = None) -> None:
    """Answer a command in the CMD slot at ring offset ``pos`` (keeps its length and opcode)."""
    base = mb.cmdr_off + pos
    len_op = struct.unpack_from("<I", buf, base)[0]
    if len_op & OP_MASK != OP_CMD:
        raise RingError(f"TCMU slot at ring offset {pos} is op {len_op & OP_MASK}, not CMD")
    uflags = 0
    if read_len is not None and mb.flags & CAP_READ_LEN:
        uflags |= UFLAG_READ_LEN
    HDR.pack_into(buf, base, len_op, cmd_id, 0, uflags)
    RSP.pack_into(buf, base + HDR.size, status, 0, 0, read_len or 0)
    s = (sense or b"")[:SENSE_BUFFERSIZE]
    buf[base + RSP_SENSE_OFF:base + RSP_SENSE_OFF + SENSE_BUFFERSIZE] = s.ljust(SENSE_BUFFERSIZE, b"\0")


def mark_unknown(buf, mb: Mailbox, pos: int, cmd_id: int) -> None:
    """Tell the kernel we do not know this entry's opcode (it fails the command)."""
    base = mb.cmdr_off + pos
    len_op = struct.unpack_from("<I", buf, base)[0]
    HDR.pack_into(buf, base, len_op, cmd_id, 0, UFLAG_UNKNOWN_OP)


def slot_op(buf, mb: Mailbox, pos: int) -> tuple[int, int]:
    """(opcode, length) of the entry at ring offset ``pos``."""
    len_op = struct.unpack_from("<I", buf, mb.cmdr_off + pos)[0]
    return len_op & OP_MASK, len_op & ~OP_MASK
