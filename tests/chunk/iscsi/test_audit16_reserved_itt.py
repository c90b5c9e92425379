"""A SCSI command carrying the reserved ITT 0xffffffff (RFC 7143 §11.2.1.8: never assigned to
a task) is rejected with Invalid PDU Field and not run: no Data-In or SCSI Response goes out
with that tag, no data is written, and the session goes on."""

from __future__ import annotations

import pytest

from chunk.iscsi import pdu as P
from chunk.iscsi.constants import RESERVED_TAG, RejectReason
from tests.chunk.iscsi.test_session import Harness, params, read10, write10

pytestmark = pytest.mark.timeout(30)


async def test_a_command_with_the_reserved_itt_is_rejected_not_run():
    async with Harness(params()) as h:
        h.send(read10(0, 1, itt=RESERVED_TAG, cmdsn=1))
        rej = await h.recv()
        assert isinstance(rej, P.Reject), rej
        assert rej.reason == RejectReason.INVALID_PDU_FIELD
        # a write whose unsolicited data follows: rejected, its data dropped, nothing written
        h.send(write10(8, 2, itt=RESERVED_TAG, cmdsn=2, data=b"w" * 512, final=False))
        h.send(P.DataOut(itt=RESERVED_TAG, ttt=RESERVED_TAG, final=True, datasn=0, buffer_offset=512,
                         data=b"w" * 512))
        rej = await h.recv()
        assert isinstance(rej, P.Reject) and rej.reason == RejectReason.INVALID_PDU_FIELD, rej
        # the session goes on: both CmdSNs were taken
        h.send(read10(0, 1, itt=7, cmdsn=3))
        d = await h.recv()
        assert isinstance(d, P.DataIn) and d.itt == 7 and d.status_present and d.status == 0, d
        assert h.unit.writes == [] and h.unit.order == [0]
