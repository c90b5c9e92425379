"""A normal session opened by hand: one operational-stage Login PDU, for tests that need to
see every PDU the target sends (async messages, unit attentions) without an initiator's logic."""

from __future__ import annotations

import asyncio
import socket

from chunk.iscsi import pdu as P
from chunk.iscsi.constants import TARGET_OPCODES
from chunk.iscsi.text import encode_text

ISID = bytes.fromhex("80aabbccddee")


async def open_session(port: int, target_iqn: str, initiator: str, isid: bytes = ISID,
                       keys: tuple[tuple[str, str], ...] = (), sock: socket.socket | None = None,
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, P.LoginResponse]:
    """The connection and the Login Response (its ExpCmdSN/MaxCmdSN open the window);
    ``keys``: operational keys beyond the digests', e.g. InitialR2T; ``sock``: a socket
    already connected to the target (one with options of its own, e.g. a small SO_RCVBUF)."""
    if sock is None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
    else:
        r, w = await asyncio.open_connection(sock=sock)
    pairs = [("InitiatorName", initiator), ("SessionType", "Normal"), ("TargetName", target_iqn),
             ("HeaderDigest", "None"), ("DataDigest", "None"), *keys]
    w.write(P.LoginRequest(transit=True, csg=1, nsg=3, isid=isid, itt=1,
                           cid=1, cmdsn=1, expstatsn=0, data=encode_text(pairs)).to_bytes())
    resp = await asyncio.wait_for(P.read_pdu(r, opcodes=TARGET_OPCODES), 10)
    assert isinstance(resp, P.LoginResponse) and resp.status == 0 and resp.transit, resp
    return r, w, resp


async def normal_login(port: int, target_iqn: str, initiator: str,
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    r, w, _ = await open_session(port, target_iqn, initiator)
    return r, w
