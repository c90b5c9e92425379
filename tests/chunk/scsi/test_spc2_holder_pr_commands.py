"""PERSISTENT RESERVE IN/OUT while an SPC-2 RESERVE(6) is held conflict for every nexus,
the holder's included.

spc2r20 5.5.1: "If a logical unit has been reserved by any RESERVE command and is still
reserved by any initiator, all PERSISTENT RESERVE IN and all PERSISTENT RESERVE OUT
commands shall conflict regardless of initiator or service action and shall terminate
with a RESERVATION CONFLICT status." (LIO's PR IN/OUT emulation checks the same first.)

Before, only another nexus's PR commands conflicted: the SPC-2 holder could REGISTER and
take a persistent reservation on top of its SPC-2 one, mixing the two models.

Each scenario runs on the in-memory state and on the state shared through a real etcd
(the ``new_lu`` fixture of test_spc2_with_registrations.py).
"""

from __future__ import annotations

from .helpers import H1, H2, good, prin, prout, prout_params, run
from .test_spc2_with_registrations import CONFLICT, K1, REGISTER, RELEASE6, RESERVE6, new_lu  # noqa: F401

READ_KEYS, REPORT_CAPABILITIES = 0, 2


async def test_the_spc2_holders_pr_in_and_out_conflict(new_lu):   # noqa: F811
    lu = new_lu()
    good(await run(lu, RESERVE6, nexus=H1))
    for n in (H1, H2):
        assert (await run(lu, prin(READ_KEYS), nexus=n)).status == CONFLICT
        assert (await run(lu, prin(REPORT_CAPABILITIES), nexus=n)).status == CONFLICT
        assert (await run(lu, prout(REGISTER), prout_params(0, K1), nexus=n)).status == CONFLICT
    good(await run(lu, RELEASE6, nexus=H1))
    # released: the persistent model is open again, and nothing was registered meanwhile
    good(await run(lu, prout(REGISTER), prout_params(0, K1), nexus=H1))
    keys = await run(lu, prin(READ_KEYS), nexus=H2)
    good(keys)
    assert int.from_bytes(keys.data[4:8], "big") == 8          # one key: H1's, registered now
