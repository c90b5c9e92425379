"""INQUIRY data: the standard page and the VPD pages (SPC-4 6.6, 7.8; SBC-3 6.5).

Pure functions of the LU's identity, limits and device; the target-port
designators depend on the I_T nexus the command arrived on.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .sense import invalid_field_in_cdb

PROTOCOL_ISCSI = 0x5

# version descriptors (SPC-4 table 35): SAM-5, SPC-4, SBC-3
VERSION_DESCRIPTORS = (0x00A0, 0x0460, 0x04C0)


@dataclass(frozen=True)
class LunIdentity:
    """What the LU says about itself; the wwn comes from the volume (zstore.naming)."""
    wwn: str                       # 32 hex digits, NAA 6 (IEEE Registered Extended)
    serial: str                    # unit serial number (VPD 0x80), printable ASCII
    lun: int = 0
    vendor: str = "ZSTORE"
    product: str = "zstore volume"
    revision: str = "0001"
    target_port_group: int = 1

    def naa_bytes(self) -> bytes:
        h = self.wwn.lower().removeprefix("naa.").removeprefix("0x")
        raw = bytes.fromhex(h)
        if len(raw) != 16 or raw[0] >> 4 != 6:
            raise ValueError(f"wwn {self.wwn!r} is not a 16-byte NAA-6 identifier")
        return raw


@dataclass(frozen=True)
class BlockLimits:
    """Numbers advertised in the Block Limits VPD page, in logical blocks."""
    max_transfer: int
    optimal_transfer: int
    optimal_granularity: int
    max_compare_write: int
    max_unmap_lbas: int
    max_unmap_descriptors: int
    unmap_granularity: int
    max_write_same: int


def _ascii(s: str, n: int) -> bytes:
    b = s.encode("ascii", "replace")[:n]
    return b.ljust(n, b" ")


def standard(ident: LunIdentity, tpgs: bool = True) -> bytes:
    """96-byte standard INQUIRY data for a direct-access block device.

    TPGS=01b (implicit ALUA): every chunk server exporting the volume is one
    target port group, and REPORT TARGET PORT GROUPS says which is active.
    HiSup: LUNs are reported in hierarchical (SAM) format.  CmdQue: commands
    are executed concurrently.
    """
    b = bytearray(96)
    b[0] = 0x00                        # peripheral qualifier 000b, direct access block device
    b[2] = 0x06                        # SPC-4
    b[3] = 0x10 | 0x02                 # HISUP, response data format 2
    b[4] = len(b) - 5
    b[5] = 0x10 if tpgs else 0x00      # TPGS implicit
    b[7] = 0x02                        # CMDQUE
    b[8:16] = _ascii(ident.vendor, 8)
    b[16:32] = _ascii(ident.product, 16)
    b[32:36] = _ascii(ident.revision, 4)
    for i, v in enumerate(VERSION_DESCRIPTORS):
        struct.pack_into(">H", b, 58 + 2 * i, v)
    return bytes(b)


def not_present() -> bytes:
    """Standard INQUIRY for a LUN that is not there (SPC-4 6.6.2).

    Peripheral qualifier 011b with device type 1Fh: "not capable of
    supporting a device on this logical unit".
    """
    b = bytearray(36)
    b[0] = 0x7F
    b[2] = 0x06
    b[3] = 0x12
    b[4] = len(b) - 5
    return bytes(b)


def _page(code: int, body: bytes) -> bytes:
    return struct.pack(">BBH", 0x00, code, len(body)) + body


def _designator(code_set: int, assoc: int, dtype: int, data: bytes,
                protocol: int | None = None) -> bytes:
    piv = protocol is not None
    b0 = ((protocol or 0) << 4) | code_set
    b1 = (0x80 if piv else 0) | (assoc << 4) | dtype
    return bytes((b0, b1, 0, len(data))) + data


def _name_string(name: str) -> bytes:
    """SCSI name string: UTF-8, NUL-terminated, padded to a multiple of 4."""
    raw = name.encode() + b"\0"
    return raw + bytes(-len(raw) % 4)


SUPPORTED_VPD = (0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2)


def vpd(page: int, *, ident: LunIdentity, limits: BlockLimits, thin: bool,
        relative_port_id: int, target_port: str, protocol_id: int | None,
        readonly: bool = False) -> bytes:
    if page == 0x00:
        return _page(0x00, bytes(SUPPORTED_VPD))
    if page == 0x80:
        return _page(0x80, ident.serial.encode("ascii", "replace"))
    if page == 0x83:
        return _page(0x83, device_identification(ident, relative_port_id, target_port,
                                                 protocol_id))
    if page == 0xB0:
        return _page(0xB0, block_limits(limits, thin and not readonly))
    if page == 0xB1:
        b = bytearray(0x3C)
        struct.pack_into(">H", b, 0, 0x0001)           # MEDIUM ROTATION RATE: non-rotating
        return _page(0xB1, bytes(b))
    if page == 0xB2:
        return _page(0xB2, logical_block_provisioning(thin, readonly))
    raise invalid_field_in_cdb(2)


def device_identification(ident: LunIdentity, relative_port_id: int, target_port: str,
                          protocol_id: int | None) -> bytes:
    """VPD 0x83.  The NAA designator is what hosts key multipath and by-id links on."""
    d = [
        _designator(1, 0, 0x3, ident.naa_bytes()),                       # NAA, LU
        _designator(2, 0, 0x1, _ascii(ident.vendor, 8) + ident.serial.encode("ascii")),
        _designator(1, 1, 0x4, struct.pack(">HH", 0, relative_port_id), protocol_id),
        _designator(1, 1, 0x5, struct.pack(">HH", 0, ident.target_port_group), protocol_id),
    ]
    if target_port:
        d.append(_designator(3, 1, 0x8, _name_string(target_port), protocol_id))
        target = target_port.split(",", 1)[0]
        d.append(_designator(3, 2, 0x8, _name_string(target), protocol_id))
    return b"".join(d)


def block_limits(lim: BlockLimits, thin: bool) -> bytes:
    """VPD 0xB0 body (0x3C bytes, the SBC-3 length libiscsi insists on). ``thin``: the UNMAP
    limits are given; without LBPU they are 0 (SBC-3: UNMAP not implemented)."""
    b = bytearray(0x3C)
    b[0] = 0x01                                        # WSNZ: WRITE SAME of 0 blocks is refused
    b[1] = lim.max_compare_write
    struct.pack_into(">HIII", b, 2, lim.optimal_granularity, lim.max_transfer,
                     lim.optimal_transfer, lim.max_transfer)   # max prefetch = max transfer
    if thin:
        struct.pack_into(">III", b, 16, lim.max_unmap_lbas, lim.max_unmap_descriptors,
                         lim.unmap_granularity)
        struct.pack_into(">I", b, 28, 0x80000000)      # UGAVALID, alignment 0
    struct.pack_into(">Q", b, 32, lim.max_write_same)
    return bytes(b)


def logical_block_provisioning(thin: bool, readonly: bool = False) -> bytes:
    """VPD 0xB2 body: UNMAP, WRITE SAME(16/10) with UNMAP, unmapped reads zeros.

    A read-only LU (a snapshot, a read-only grant) unmaps nothing: LBPU, LBPWS and LBPWS10
    are clear, so that hosts trusting the page send no discard that can only fail (the
    commands still answer DATA PROTECT). It stays thin provisioned (LBPME, LBPRZ, type)."""
    if not thin:
        return bytes(4)
    unmaps = 0 if readonly else 0x80 | 0x40 | 0x20
    return bytes((0x00, unmaps | 0x04, 0x02, 0x00))
