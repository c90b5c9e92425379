"""The TCMU ring codec against byte layouts built by hand from target_core_user.h."""

from __future__ import annotations

import struct

import pytest

from chunk.tcmu import ring

from .fakering import CMDR_OFF, FakeKernel


def test_mailbox_fields_at_the_header_offsets():
    k = FakeKernel(cmdr_size=8192, flags=ring.CAP_OOOC | ring.CAP_READ_LEN)
    mb = ring.read_mailbox(k.buf, k.size)
    assert (mb.version, mb.cmdr_off, mb.cmdr_size, mb.ooo) == (2, 128, 8192, True)
    struct.pack_into("<I", k.buf, 12, 4096)
    assert ring.head(k.buf) == 4096
    ring.set_tail(k.buf, 2048)
    assert struct.unpack_from("<I", k.buf, 64)[0] == 2048      # its own cache line
    assert struct.unpack_from("<I", k.buf, 16)[0] == 0         # not right after cmd_head


@pytest.mark.parametrize("version,cmdr_off,cmdr_size,why", [
    (3, 128, 4096, "version 3"),
    (2, 64, 4096, "does not fit"),
    (2, 128, 1 << 30, "does not fit"),
])
def test_bad_mailbox_is_a_ring_error(version, cmdr_off, cmdr_size, why):
    k = FakeKernel()
    struct.pack_into("<HHII", k.buf, 0, version, 0, cmdr_off, cmdr_size)
    with pytest.raises(ring.RingError, match=why):
        ring.read_mailbox(k.buf, k.size)


def test_cmd_entry_decodes_cdb_and_iovecs():
    k = FakeKernel()
    mb = ring.read_mailbox(k.buf, k.size)
    cdb = bytes([0x2A, 0, 0, 0, 0, 8, 0, 0, 16, 0])                # WRITE(10) lba 8, 16 blocks
    cid = k.queue(cdb, b"x" * 8192, iov_split=4096)
    (e,) = ring.pending(k.buf, mb, k.size, 0, ring.head(k.buf))
    assert (e.op, e.cmd_id, e.cdb, e.pos) == (ring.OP_CMD, cid, cdb, 0)
    assert e.iovs == tuple(k.answers[cid]["iovs"]) and e.data_length == 8192 and e.error is None
    assert ring.gather(k.buf, e.iovs, 8192) == b"x" * 8192
    assert ring.gather(k.buf, e.iovs, 5000) == b"x" * 5000


def test_cdb_lengths_follow_the_opcode_group():
    k = FakeKernel()
    mb = ring.read_mailbox(k.buf, k.size)
    for cdb in (bytes(6), bytes([0x28]) + bytes(9), bytes([0x88]) + bytes(15), bytes([0xA0]) + bytes(11)):
        k.queue(cdb, notify=False)
    got = [e.cdb for e in ring.pending(k.buf, mb, k.size, 0, ring.head(k.buf))]
    assert [len(c) for c in got] == [6, 10, 16, 12]


def test_pad_entry_at_the_end_of_the_ring_and_wrap():
    k = FakeKernel(cmdr_size=512)
    mb = ring.read_mailbox(k.buf, k.size)
    k.queue(bytes(10), notify=False)             # 128 bytes
    k.queue(bytes(10), notify=False)
    k.queue(bytes(10), notify=False)             # head at 384: 128 left
    ring.set_tail(k.buf, 384)
    k.queue(bytes([0x28]) + bytes(9), length=500, iov_split=100, notify=False)  # 5 iovecs: 144 bytes > 128 left: PAD, then at 0
    es = ring.pending(k.buf, mb, k.size, 384, ring.head(k.buf))
    assert [(e.op, e.pos, e.length) for e in es] == [(ring.OP_PAD, 384, 128), (ring.OP_CMD, 0, 144)]


def test_response_layout():
    k = FakeKernel(flags=ring.CAP_READ_LEN)
    mb = ring.read_mailbox(k.buf, k.size)
    cid = k.queue(bytes([0x12, 0, 0, 0, 96, 0]), length=96)
    sense = bytes([0x70, 0, 5]) + bytes(15)
    ring.write_response(k.buf, mb, 0, cid, 2, sense, read_len=36)
    base = CMDR_OFF
    len_op, cmd_id, kflags, uflags = struct.unpack_from("<IHBB", k.buf, base)
    assert (len_op & 7, cmd_id, uflags) == (1, cid, ring.UFLAG_READ_LEN)
    assert k.buf[base + 8] == 2                                      # scsi_status
    assert struct.unpack_from("<I", k.buf, base + 12)[0] == 36       # read_len
    assert bytes(k.buf[base + 16:base + 16 + 18]) == sense
    assert bytes(k.buf[base + 16 + 18:base + 112]) == bytes(96 - 18)  # rest of sense_buffer cleared


def test_no_read_len_flag_without_the_capability():
    k = FakeKernel(flags=0)
    mb = ring.read_mailbox(k.buf, k.size)
    cid = k.queue(bytes(6))
    ring.write_response(k.buf, mb, 0, cid, 0, None, read_len=10)
    assert k.buf[CMDR_OFF + 7] == 0


def test_bad_iovec_is_an_entry_error_not_a_ring_error():
    k = FakeKernel()
    mb = ring.read_mailbox(k.buf, k.size)
    k.queue(bytes([0x2A]) + bytes(9), b"y" * 512, bad_iov=True)
    k.queue(bytes(6))
    e1, e2 = ring.pending(k.buf, mb, k.size, 0, ring.head(k.buf))
    assert e1.error and "outside the data area" in e1.error and e2.error is None


@pytest.mark.parametrize("len_op", [0 | 1, 16 | 1, 4 | 2, (1 << 20) | 1])
def test_unwalkable_entry_is_a_ring_error(len_op):
    k = FakeKernel()
    mb = ring.read_mailbox(k.buf, k.size)
    k.queue_raw(len_op)
    with pytest.raises(ring.RingError):
        ring.pending(k.buf, mb, k.size, 0, max(8, ring.head(k.buf)))


def test_head_outside_the_ring_is_a_ring_error():
    k = FakeKernel(cmdr_size=4096)
    mb = ring.read_mailbox(k.buf, k.size)
    with pytest.raises(ring.RingError, match="outside"):
        ring.pending(k.buf, mb, k.size, 0, 4096)


def test_scatter_fills_iovecs_in_order():
    k = FakeKernel()
    mb = ring.read_mailbox(k.buf, k.size)
    cid = k.queue(bytes([0x28]) + bytes(9), length=3000, iov_split=1024)
    (e,) = ring.pending(k.buf, mb, k.size, 0, ring.head(k.buf))
    data = bytes(range(256)) * 10
    assert ring.scatter(k.buf, e.iovs, data) == 2560
    assert k.data_in(cid)[:2560] == data


def test_request_field_offsets_inside_the_entry():
    """struct tcmu_cmd_entry is __packed, its req struct is not: after the three u32 counts
    comes 4 bytes of padding, cdb_off at 24 and the iovecs at 48 (what the kernel writes;
    reading cdb_off at 20 gives offset << 32, as a first lab run showed)."""
    buf = bytearray(1 << 16)
    struct.pack_into("<HHIII", buf, 0, 2, 3, 128, 4096, 128)           # head after one entry
    entry = 128
    struct.pack_into("<IHBB", buf, entry, 128 | 1, 42, 0, 0)
    struct.pack_into("<III", buf, entry + 8, 1, 0, 0)
    struct.pack_into("<I", buf, entry + 20, 0xDEADBEEF)                  # padding: must be ignored
    struct.pack_into("<Q", buf, entry + 24, entry + 112)                 # cdb_off
    struct.pack_into("<QQ", buf, entry + 48, 8192, 512)                  # iov[0]
    buf[entry + 112:entry + 118] = bytes([0x12, 0, 0, 0, 36, 0])
    mb = ring.read_mailbox(buf, len(buf))
    (e,) = ring.pending(buf, mb, len(buf), 0, 128)
    assert (e.cmd_id, e.cdb, e.iovs, e.error) == (42, bytes([0x12, 0, 0, 0, 36, 0]), ((8192, 512),), None)
