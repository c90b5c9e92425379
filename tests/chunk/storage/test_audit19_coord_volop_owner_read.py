"""``run_volop`` reads the volume's owner record before claiming the op (``_owner_confirmed``:
taken back if it moved past our epoch). With etcd out of reach that read raised the etcd
client's raw error out of the op; now it is NotServing, as taking ownership and a flush's
owner read answer it: nothing is claimed, the op is left pending and assigned here.

test_volops' harness (a real Coordinator over a real etcd, in-memory replicas); "out of
reach" is test_audit17c's real etcd client whose endpoint nobody listens on, swapped in
once the volume is owned."""

from __future__ import annotations

import asyncio

import pytest

from chunk.storage.coordinator import NotServing

from .test_audit17c_etcd_unreachable import dead_etcd  # noqa: F401 - fixture
from .test_volops import _op, _stored, keys, setup  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("kind", ["revert", "snapshot"])
async def test_the_owner_read_before_a_volop_with_etcd_unreachable_is_not_serving(
        setup, etcd_client, keys, dead_etcd, kind):  # noqa: F811
    coord, rep = setup
    op = await _op(etcd_client, keys, kind=kind)
    await coord.ensure_owner()                     # owned (real etcd), then etcd goes away
    coord.engine.etcd = dead_etcd
    with pytest.raises(NotServing) as got:
        await asyncio.wait_for(coord.run_volop(op), 30)
    assert f"cannot confirm its owner in etcd before a {kind}" in str(got.value)
    coord.engine.etcd = etcd_client
    left = await _stored(etcd_client, keys)
    assert (left.state, left.executor) == ("pending", "me")   # not claimed: runs once etcd is back
    assert rep.reverts == []
