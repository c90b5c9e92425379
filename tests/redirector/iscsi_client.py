"""Hand-built iSCSI logins and discovery for redirector tests (just enough of RFC 7143)."""

from __future__ import annotations

import asyncio

from chunk.iscsi import pdu as P
from chunk.iscsi.constants import RESERVED_TAG, TARGET_OPCODES
from chunk.iscsi.text import decode_text, encode_text

ISID = bytes.fromhex("80123456789a")
STEP = 5.0


class RawInitiator:
    """One TCP connection speaking Login/Text/Logout by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.r, self.w = reader, writer
        self.itt, self.cmdsn, self.expstatsn = 0x10, 1, 0

    @classmethod
    async def connect(cls, host: str, port: int, source: str | None = None) -> "RawInitiator":
        kw = {"local_addr": (source, 0)} if source else {}
        return cls(*await asyncio.wait_for(asyncio.open_connection(host, port, **kw), STEP))

    async def login(self, initiator: str, target: str | None,
                    extra: list[tuple[str, str]] = ()) -> tuple[P.LoginResponse, dict[str, str]]:
        """One operational-stage Login Request asking for full feature phase."""
        pairs = [("InitiatorName", initiator), ("SessionType", "Normal" if target else "Discovery")]
        if target:
            pairs.append(("TargetName", target))
        req = P.LoginRequest(transit=True, csg=1, nsg=3, isid=ISID, itt=self.itt, cid=1,
                             cmdsn=self.cmdsn, expstatsn=self.expstatsn,
                             data=encode_text(pairs + list(extra)))
        self.w.write(req.to_bytes())
        resp = await self.recv()
        assert isinstance(resp, P.LoginResponse), resp
        return resp, dict(decode_text(resp.data))

    async def send_targets(self, which: str = "All") -> list[tuple[str, str]]:
        self.itt += 1
        self.w.write(P.TextRequest(final=True, itt=self.itt, ttt=RESERVED_TAG, cmdsn=self.cmdsn,
                                   expstatsn=self.expstatsn,
                                   data=encode_text([("SendTargets", which)])).to_bytes())
        self.cmdsn += 1
        resp = await self.recv()
        assert isinstance(resp, P.TextResponse) and resp.final, resp
        return decode_text(resp.data)

    async def recv(self) -> P.PDU:
        resp = await asyncio.wait_for(P.read_pdu(self.r, opcodes=TARGET_OPCODES,
                                                 max_recv_data_segment_length=1 << 18), STEP)
        assert resp is not None, "connection closed"
        self.expstatsn = (resp.statsn + 1) & 0xFFFFFFFF
        return resp

    async def closed(self, timeout: float = STEP) -> bool:
        """True once the peer closed (EOF or reset) with nothing more to read."""
        try:
            while True:
                if not await asyncio.wait_for(self.r.read(65536), timeout):
                    return True
        except ConnectionError:
            return True

    def close(self) -> None:
        self.w.close()
