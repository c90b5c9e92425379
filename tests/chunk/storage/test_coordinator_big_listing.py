"""Taking ownership reads the volume's extent map in pages, not in one Range reply.

gRPC's client refuses a reply over ``grpc.max_receive_message_length`` (4 MiB by default):
a volume of ~13k extents (3+ TiB) had an extent map past that, so ``_refresh_extents`` failed
on every ownership attempt and the volume could not be written at all. Here the client's limit
is 32 KiB and the page 40 keys, so a few hundred records show the same failure.
"""

import pytest
from aetcd import exceptions as aetcd_exc

from chunk.storage.coordinator import Coordinator
from zstore import etcd as zetcd
from zstore.keys import Keys
from zstore.records import ExtentRecord, Volume

from tests.conftest import SMALL_REPLY as LIMIT
N = 400


class _Engine:
    chunk_id, lease, min_write_replicas = "c1", None, 1

    def __init__(self, etcd, keys) -> None:
        self.etcd, self.keys = etcd, keys


async def test_ownership_of_a_volume_with_more_extents_than_one_reply_holds(small_client, etcd_config,
                                                                          monkeypatch):
    monkeypatch.setattr(zetcd, "PAGE_SIZE", 40, raising=False)
    keys = Keys(etcd_config.prefix)
    vol = Volume(volume_id="big", name="big", size=N << 30, replicas=2)
    await small_client.put(keys.volume(vol.volume_id), vol.encode())
    replicas = ["c1", "chunk-with-a-long-name-" + "x" * 40]
    for start in range(0, N, 100):                      # etcd takes up to 128 ops per txn
        ops = [small_client.transactions.put(
                   keys.extent(vol.volume_id, i),
                   ExtentRecord(volume_id=vol.volume_id, index=i, replicas=replicas,
                                generation=i % 7).encode())
               for i in range(start, min(N, start + 100))]
        await small_client.transaction(compare=[], success=ops, failure=[])
    with pytest.raises(aetcd_exc.ClientError, match="larger than max"):
        await small_client.get_prefix(keys.extents(vol.volume_id))   # what one Range does

    c = Coordinator(_Engine(small_client, keys), vol)
    c._is_ready = True                                  # noqa: SLF001 - no watch: only ownership
    await c.ensure_owner()
    assert c.epoch == 1
    assert sorted(c.extents) == list(range(N))
    assert [(r.index, r.replicas, r.generation) for _, r in sorted(c.extents.items())] == \
        [(i, replicas, i % 7) for i in range(N)]
    assert not c._short                                 # noqa: SLF001 - every extent fully replicated
