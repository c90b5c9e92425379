"""Text negotiation in full feature phase: MaxRecvDataSegmentLength ("Use: ALL") is declared,
not NotUnderstood, and bounds the Data-In that follows; a malformed text is rejected."""

from __future__ import annotations

from chunk.iscsi import pdu as P

from .test_session import Harness, params, read10


def _pairs(data: bytes) -> list[tuple[str, str]]:
    return [tuple(kv.split("=", 1)) for kv in data.decode().split("\0") if kv]


async def test_a_declared_max_recv_data_segment_length_bounds_the_data_in_after_it():
    async with Harness(params(max_send_data_segment_length=8192)) as h:
        h.send(P.TextRequest(itt=70, cmdsn=1, final=True, data=b"MaxRecvDataSegmentLength=512\0"))
        t = await h.recv()
        assert isinstance(t, P.TextResponse) and t.final
        # the target's own declaration, as at login: not NotUnderstood
        assert _pairs(t.data) == [("MaxRecvDataSegmentLength", "65536")]
        assert h.session.msdsl == 512
        h.send(read10(0, 8, itt=71, cmdsn=2))                 # 4 KiB: eight 512-byte Data-Ins
        pieces = []
        while True:
            d = await h.recv()
            assert isinstance(d, P.DataIn) and d.itt == 71
            pieces.append(len(d.data))
            if d.status_present:
                break
        assert sum(pieces) == 4096 and max(pieces) <= 512


async def test_a_key_sent_twice_in_one_text_is_rejected_and_the_session_goes_on():
    async with Harness(params()) as h:
        h.send(P.TextRequest(itt=72, cmdsn=1, final=True,
                             data=b"MaxRecvDataSegmentLength=4096\0MaxRecvDataSegmentLength=512\0"))
        rej = await h.recv()
        assert isinstance(rej, P.Reject) and rej.reason == 0x04       # protocol error
        assert h.session.msdsl == 8192                                  # nothing applied
        h.send(P.NopOut(itt=73, cmdsn=1, immediate=True))
        assert (await h.recv()).itt == 73
