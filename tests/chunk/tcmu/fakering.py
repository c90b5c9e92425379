"""A TCMU ring in a bytearray, laid out by hand from the uapi header (not by the codec
under test): the kernel's side of the protocol, enough to queue commands and collect
answers. The real ring is proven in the kernel lab (tests/lab/test_lab_lio.py)."""

from __future__ import annotations

import os
import struct

CMDR_OFF = 128
ALIGN = 8


class FakeKernel:
    def __init__(self, cmdr_size: int = 4096, data_size: int = 1 << 20, flags: int = 0b11,
                 version: int = 2):
        self.cmdr_size, self.data_off = cmdr_size, CMDR_OFF + cmdr_size
        self.size = self.data_off + data_size
        self.buf = bytearray(self.size)
        # struct tcmu_mailbox: u16 version, u16 flags, u32 cmdr_off, u32 cmdr_size, u32 cmd_head;
        # u32 cmd_tail aligned to 64
        struct.pack_into("<HHIII", self.buf, 0, version, flags, CMDR_OFF, cmdr_size, 0)
        struct.pack_into("<I", self.buf, 64, 0)
        self.head = 0
        self.last_tail = 0
        self.next_id = 1
        self.data_next = self.data_off
        self.answers: dict[int, dict] = {}
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        self.kicks = 0
        self.name = "fake-uio"

    # -- the "device" the command loop sees ---------------------------------------------
    def fileno(self) -> int:
        return self.r

    def ack(self) -> None:
        try:
            os.read(self.r, 64)
        except BlockingIOError:
            pass

    def kick(self) -> None:
        self.kicks += 1
        self.reap()

    def close(self) -> None:
        if self.r >= 0:
            os.close(self.r)
            os.close(self.w)
            self.r = self.w = -1

    # -- the kernel's side ------------------------------------------------------------
    @property
    def tail(self) -> int:
        return struct.unpack_from("<I", self.buf, 64)[0]

    def _alloc_data(self, n: int) -> int:
        if self.data_next + n > self.size:
            self.data_next = self.data_off
        b = self.data_next
        self.data_next += (n + 4095) // 4096 * 4096
        return b

    def _put_entry(self, length: int, op: int, cmd_id: int) -> int:
        if self.head + length > self.cmdr_size:       # no room before the end: a PAD entry
            pad = self.cmdr_size - self.head
            struct.pack_into("<IHBB", self.buf, CMDR_OFF + self.head, pad | 0, 0, 0, 0)
            self.head = 0
        pos = self.head
        struct.pack_into("<IHBB", self.buf, CMDR_OFF + pos, length | op, cmd_id, 0, 0)
        self.head = (pos + length) % self.cmdr_size
        return pos

    def queue(self, cdb: bytes, data: bytes = b"", length: int | None = None, iov_split: int = 0,
              bad_iov: bool = False, notify: bool = True) -> int:
        """Queue a CMD: data-out ``data`` (or ``length`` bytes of data-in space) in
        one iovec, or several of ``iov_split`` bytes each."""
        cmd_id = self.next_id
        self.next_id += 1
        n = len(data) if data else (length or 0)
        iovs = []
        if n:
            step = iov_split or n
            for off in range(0, n, step):
                k = min(step, n - off)
                b = self._alloc_data(k)
                self.buf[b:b + k] = data[off:off + k] if data else b"\xEE" * k
                iovs.append((b, k))
        if bad_iov:
            iovs = [(self.size - 16, 4096)]
        cdb_len = (len(cdb) + 7) // 8 * 8
        # base_command_size: max(offsetof(struct tcmu_cmd_entry, req.iov[n]), sizeof(entry))
        length = max(48 + 16 * len(iovs), 112) + cdb_len
        length = (length + ALIGN - 1) // ALIGN * ALIGN
        pos = self._put_entry(length, 1, cmd_id)
        base = CMDR_OFF + pos
        cdb_off = base + length - cdb_len
        # req: u32 iov_cnt @8, u32 iov_bidi_cnt @12, u32 iov_dif_cnt @16, u64 cdb_off @24 (the
        # req struct is not packed: 8-aligned), u64 __pad1 @32, u64 __pad2 @40, iov[] @48
        struct.pack_into("<III", self.buf, base + 8, len(iovs), 0, 0)
        struct.pack_into("<Q", self.buf, base + 24, cdb_off)
        for i, (b, k) in enumerate(iovs):
            struct.pack_into("<QQ", self.buf, base + 48 + 16 * i, b, k)
        self.buf[cdb_off:cdb_off + len(cdb)] = cdb
        self.answers[cmd_id] = {"iovs": iovs}
        struct.pack_into("<I", self.buf, 12, self.head)
        if notify:
            os.write(self.w, b"\1\0\0\0")
        return cmd_id

    def queue_raw(self, len_op: int) -> None:
        """An entry header with any len_op (to break the ring on purpose)."""
        struct.pack_into("<IHBB", self.buf, CMDR_OFF + self.head, len_op, 0, 0, 0)
        self.head = (self.head + max(len_op & ~7, 8)) % self.cmdr_size
        struct.pack_into("<I", self.buf, 12, self.head)
        os.write(self.w, b"\1\0\0\0")

    def reap(self) -> None:
        """tcmu_handle_completions: walk from the last tail to cmd_tail, read each answer."""
        pos = self.last_tail
        while pos != self.tail:
            len_op, cmd_id, _k, uflags = struct.unpack_from("<IHBB", self.buf, CMDR_OFF + pos)
            op, length = len_op & 7, len_op & ~7
            if op == 1:
                status, _, _, read_len = struct.unpack_from("<BBHI", self.buf, CMDR_OFF + pos + 8)
                sense = bytes(self.buf[CMDR_OFF + pos + 16:CMDR_OFF + pos + 112])
                a = self.answers[cmd_id]
                assert "status" not in a, f"cmd {cmd_id} answered twice"
                a.update(status=status, sense=sense, uflags=uflags,
                         read_len=read_len if uflags & 2 else None)
            pos = (pos + length) % self.cmdr_size
        self.last_tail = pos

    def data_in(self, cmd_id: int) -> bytes:
        a = self.answers[cmd_id]
        n = a["read_len"] if a.get("read_len") is not None else sum(k for _, k in a["iovs"])
        out = b"".join(bytes(self.buf[b:b + k]) for b, k in a["iovs"])
        return out[:n]

    def reset(self) -> None:
        """action/reset_ring: the kernel fails what is queued and restarts at 0."""
        for a in self.answers.values():
            a.setdefault("status", "reset")
        self.head = self.last_tail = 0
        struct.pack_into("<I", self.buf, 12, 0)
        struct.pack_into("<I", self.buf, 64, 0)
