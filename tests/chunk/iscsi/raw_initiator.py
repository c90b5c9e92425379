"""A raw iSCSI session driven by hand, for tests that must choose every PDU sent (a CmdSN gap,
withheld Data-Out, a TMF) and see every PDU the target sends (R2Ts, TMF responses, the NOP-In
that opens a window, a dropped connection) with no initiator logic in between."""

from __future__ import annotations

import asyncio
import socket

from chunk.iscsi import pdu as P
from chunk.iscsi.constants import RESERVED_TAG, TARGET_OPCODES
from chunk.iscsi.session import sn_lt
from tests.chunk.iscsi.raw_login import ISID, open_session

TUR = bytes(16)


class Initiator:
    """One session: ITT and CmdSN in order unless told otherwise, MaxCmdSN followed from what
    the target sends. ``login`` is the Login Response (None if the caller logged in itself)."""

    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter,
                 login: P.LoginResponse | None = None):
        self.r, self.w, self.login = r, w, login
        self.itt = 0x100
        self.cmdsn = login.expcmdsn if login else 1
        self.maxcmdsn = login.maxcmdsn if login else self.cmdsn
        self.nops: list[P.NopIn] = []

    @classmethod
    async def connect(cls, port: int, target_iqn: str, initiator: str, isid: bytes = ISID,
                      keys: tuple[tuple[str, str], ...] = (), sock: socket.socket | None = None,
                      ) -> Initiator:
        return cls(*await open_session(port, target_iqn, initiator, isid, keys, sock))

    def send(self, lun: int, cdb: bytes, data: bytes = b"", *, edtl: int | None = None,
             read: int = 0, cmdsn: int | None = None) -> int:
        """The ITT of a command sent with ``data`` immediate; ``edtl`` beyond it is solicited
        by R2T. A ``cmdsn`` given leaves the session's own alone (to fill a gap)."""
        self.itt += 1
        if cmdsn is None:
            cmdsn = self.cmdsn
            self.cmdsn += 1
        self.w.write(P.ScsiCommand(itt=self.itt, cmdsn=cmdsn, lun=P.encode_lun(lun),
                                   write=bool(data) or bool(edtl), read=bool(read), final=True,
                                   expected_length=read or (edtl if edtl is not None else len(data)),
                                   cdb=cdb, data=data).to_bytes())
        return self.itt

    def tmf(self, lun: int, function: int) -> int:
        """The ITT of an immediate task management request (no CmdSN taken)."""
        self.itt += 1
        self.w.write(P.TaskMgmtRequest(itt=self.itt, cmdsn=self.cmdsn, immediate=True,
                                       function=function, lun=P.encode_lun(lun)).to_bytes())
        return self.itt

    def data_out(self, r2t: P.R2T, data: bytes) -> None:
        """All the data an R2T asked for, in one final Data-Out."""
        self.w.write(P.DataOut(itt=r2t.itt, ttt=r2t.ttt, lun=r2t.lun, final=True, datasn=0,
                               buffer_offset=r2t.buffer_offset, data=data).to_bytes())

    async def pdu(self, timeout: float = 10) -> P.PDU | None:
        """The next PDU (None at EOF) other than an unsolicited NOP-In: those asking for nothing
        are kept in ``nops`` (they tell a new MaxCmdSN), pings go unanswered."""
        while True:
            pdu = await asyncio.wait_for(
                P.read_pdu(self.r, max_recv_data_segment_length=1 << 20, opcodes=TARGET_OPCODES), timeout)
            if pdu is not None and sn_lt(self.maxcmdsn, getattr(pdu, "maxcmdsn", self.maxcmdsn)):
                self.maxcmdsn = pdu.maxcmdsn
            if isinstance(pdu, P.NopIn) and pdu.itt == RESERVED_TAG:
                if pdu.ttt == RESERVED_TAG:
                    self.nops.append(pdu)
                continue
            return pdu

    async def reply(self, timeout: float = 10):
        """(itt, status, (key, asc, ascq) or None, data-in) of the next SCSI answer."""
        data = b""
        pdu = await self.pdu(timeout)
        while isinstance(pdu, P.DataIn) and not pdu.status_present:
            data += pdu.data
            pdu = await self.pdu(timeout)
        assert isinstance(pdu, (P.ScsiResponse, P.DataIn)), pdu
        if isinstance(pdu, P.DataIn):
            return pdu.itt, pdu.status, None, data + pdu.data
        s = pdu.sense
        return pdu.itt, pdu.status, ((s[2] & 0x0F, s[12], s[13]) if s else None), data

    async def answer(self, timeout: float = 10):
        """(itt, status, (key, asc, ascq) or None) of the next SCSI answer."""
        return (await self.reply(timeout))[:3]

    async def transfer(self, lun: int, cdb: bytes, data: bytes = b"", *, read: int = 0,
                       timeout: float = 10):
        """(status, sense, data-in) of one command, the only one in flight."""
        itt = self.send(lun, cdb, data, read=read)
        got, status, sense, data_in = await self.reply(timeout)
        assert got == itt, (got, itt)
        return status, sense, data_in

    async def command(self, lun: int, cdb: bytes, data: bytes = b"", *, read: int = 0,
                      timeout: float = 10):
        """(status, sense) of one command, the only one in flight."""
        return (await self.transfer(lun, cdb, data, read=read, timeout=timeout))[:2]

    async def ready(self, lun: int) -> None:
        """TEST UNIT READY until no unit attention is left (through ``transfer``: a subclass
        may give ``command`` the shape its callers read, as test_lun_inventory does)."""
        for _ in range(8):
            if (await self.transfer(lun, TUR))[:2] == (0, None):
                return
        raise AssertionError("unit attentions never cleared")

    async def quiet(self, seconds: float = 0.3) -> None:
        """Nothing but NOP-Ins arrives for ``seconds``."""
        try:
            pdu = await self.pdu(timeout=seconds)
        except asyncio.TimeoutError:
            return
        raise AssertionError(f"unexpected {pdu}")

    def close(self) -> None:
        self.w.close()
