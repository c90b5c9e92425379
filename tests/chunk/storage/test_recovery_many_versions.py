"""A rebuild of an extent with a block of 260 versions (written between 260 retained
snapshots): Coordinator.run_recovery over real ReplicaStores, peers through real
ReplicaServers on loopback (harness of test_recovery_unreadable).

Before, that block's export was over a wire frame: a remote source answered IO_ERROR on
every attempt, and a local source's blob failed to encode on the IMPORT, which dropped the
connection to the target; the extent stayed below its replica count for good."""

from __future__ import annotations

import pytest

from chunk.storage.extent_file import BLOCK_SIZE
from zstore.records import RecoveryTask

from .test_recovery_unreadable import VID, _coordinator, cluster  # noqa: F401 - fixture

pytestmark = pytest.mark.timeout(120)

HOT, VERSIONS = 5, 260


def _pat(seq: int) -> bytes:
    return seq.to_bytes(4, "big") * (BLOCK_SIZE // 4)


def _populate(stores: dict, on: str) -> None:
    """Block HOT written at seqs 1..261: a version per seq in between (origin s, key s)."""
    for cid in on:
        st = stores[cid]
        st.create(VID, 0, 3)
        st.write(VID, 0, 0, _pat(7), seq=1)
        for seq in range(1, VERSIONS + 2):
            st.write(VID, 0, HOT * BLOCK_SIZE, _pat(seq), seq=seq)
        st.write(VID, 0, (HOT + 1) * BLOCK_SIZE, _pat(9), seq=VERSIONS + 1)


async def _rebuild_and_check(stores, engine, replicas: list[str], source: str) -> None:
    _populate(stores, replicas)
    coord = _coordinator(engine, replicas)
    await coord.run_recovery(RecoveryTask(VID, 0, "C", "rebuild", source, 3), 1, 0)
    assert coord.extents[0].replicas == [*replicas, "C"]
    c, src = stores["C"], stores[source]
    assert c.digest(VID, 0) == src.digest(VID, 0)
    for view in (0, 1, 2, 100, 200, VERSIONS, VERSIONS + 1):
        want = _pat(view or VERSIONS + 1)                   # view 0: the live block
        assert c.read(VID, 0, HOT * BLOCK_SIZE, BLOCK_SIZE, view)[0] == want
    assert c.verify(VID, 0) == []


async def test_a_block_with_260_versions_copies_from_a_remote_source(cluster):
    stores, engine = cluster
    await _rebuild_and_check(stores, engine, ["B"], "B")


async def test_a_block_with_260_versions_copies_from_the_local_source(cluster):
    """The executor's own replica exports it (no frame there): the IMPORTs to the remote
    target must each fit a frame, and the connection to it stays up."""
    stores, engine = cluster
    await _rebuild_and_check(stores, engine, ["A"], "A")
    assert engine.client.connected(engine.reps["C"].addr)
