"""A burst of snapshots during one reclaim run must not cost any of them its versions.

The run reads the volume's ``snap_seq`` S first and the snapshot listing after; a snapshot
committed later is protected only by ``SEQ_MARGIN`` (seqs S .. S+15 kept). The run then reads
every volume's extent records, recovery tasks and moved records, one etcd round trip after the
other, before it trims: on a server with many volumes that is seconds, while a snapshot commits
in ~0.1 s. A snapshot committed 16 or more snapshots after S, whose block was overwritten since,
lost that version to the trim: the snapshot (and its clones, its export) then read the newer
data.
"""

from __future__ import annotations

from chunk.storage.extent_file import BLOCK_SIZE
from chunk.storage.reclaim import SEQ_MARGIN, Reclaimer

from .replica_nodes import block
from .test_reclaim import ME, cluster, extent, keys, snapshot, store, volume  # noqa: F401

BURST = SEQ_MARGIN + 4


async def test_snapshots_taken_while_the_run_lists_extents_keep_their_versions(cluster, keys, store):  # noqa: F811
    etcd = cluster
    await volume(etcd, keys, "v1", snap_seq=1)
    await extent(etcd, keys, store, "v1", 0)            # block 0 written at seq 1

    async def snapshot_burst():
        """What a client taking snapshots in a loop does meanwhile: write, snapshot, ..."""
        for seq in range(1, BURST + 1):
            store.write("v1", 0, 0, block(f"at {seq}"), seq)
            await snapshot(etcd, keys, f"s{seq}", "v1", seq)
            await volume(etcd, keys, "v1", snap_seq=seq + 1)
        store.write("v1", 0, 0, block("live"), BURST + 1)

    class SlowListing(Reclaimer):
        burst_done = False

        async def _listing(self, prefix):
            if prefix == keys.extents("v1") and not self.burst_done:
                self.burst_done = True
                await snapshot_burst()
            return await super()._listing(prefix)

    r = SlowListing(store, etcd, keys, ME)
    await r.run_once()
    assert r.burst_done

    def view(seq):
        data, present = store.read("v1", 0, 0, BLOCK_SIZE, view=seq)
        return data if present == b"\x01" else None

    assert [seq for seq in range(1, BURST + 1) if view(seq) != block(f"at {seq}")] == []
    assert view(BURST + 1) == block("live")
    # The next run (every snapshot listed now) keeps them all too.
    await r.run_once()
    assert [seq for seq in range(1, BURST + 1) if view(seq) != block(f"at {seq}")] == []
