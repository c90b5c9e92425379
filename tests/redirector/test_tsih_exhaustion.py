"""TSIHs run out: the login is refused (out of resources), the portal does not spin forever."""

from __future__ import annotations

import threading

import pytest

from chunk.iscsi.constants import LoginStatus
from chunk.iscsi.errors import LoginError
from redirector import server
from redirector.portal import RedirectPolicy
from tests.redirector.iscsi_client import RawInitiator
from tests.redirector.test_portal import INIT, FakeCatalog, FakeMembers, _open
from zstore.config import Config, ConfigError

pytestmark = pytest.mark.timeout(60)

ALL_TSIHS = set(range(1, 0x10000))


def test_new_tsih_with_every_tsih_taken_refuses_promptly():
    policy = RedirectPolicy(FakeCatalog(), FakeMembers(), set(ALL_TSIHS), holding=lambda: True)
    got: list[BaseException] = []

    def call() -> None:
        try:
            policy.new_tsih()
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            got.append(e)
    t = threading.Thread(target=call, daemon=True)      # the old code never returns
    t.start()
    t.join(5)
    assert not t.is_alive(), "new_tsih is still looping"
    assert isinstance(got[0], LoginError) and got[0].status == LoginStatus.OUT_OF_RESOURCES


async def test_a_discovery_login_with_every_tsih_taken_is_answered_out_of_resources():
    p, _, port = await _open()
    p.tsihs |= ALL_TSIHS
    try:
        c = await RawInitiator.connect("127.0.0.2", port)
        try:
            resp, _ = await c.login(INIT, None)
        finally:
            c.close()
        assert resp.status == LoginStatus.OUT_OF_RESOURCES
    finally:
        await p.close()


def test_max_connections_is_capped_at_the_tsihs_there_are():
    cfg = Config()
    cfg.redirector.max_connections = 65536
    with pytest.raises(ConfigError, match=r"redirector.max_connections: 65536 must be 1..65535"):
        server.validate(cfg, fd_limit=1 << 20)
