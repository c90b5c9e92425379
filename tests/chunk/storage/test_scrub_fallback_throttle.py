"""The block-by-block fallback and the confirmations are throttled and read off the event loop."""

from __future__ import annotations

import pytest

from chunk.storage.extent_file import BLOCK_SIZE
from chunk.storage.scrubber import Scrubber

from .replica_nodes import block
from .test_scrubber import VID, MediaError, setup

pytestmark = pytest.mark.timeout(60)


async def test_fallback_blocks_and_confirmations_charge_the_bucket_and_read_in_a_worker(
        nodes, monkeypatch):
    a, b = await setup(nodes)
    for n in (a, b):
        n.store.write(VID, 0, BLOCK_SIZE, block("one, later"), 2)   # version (1, 1) on both
    b.corrupt(VID, 0, 300)                                          # rot: confirmed, then repaired
    ver = next((b.data_path(VID, 0).parent / f"{VID}.0.v").glob("*.ver"))
    eio = MediaError(monkeypatch, ver, [1], data_at=BLOCK_SIZE)     # slice 0 raises EIO
    scrub = Scrubber(b.store, b.repair, rate_bytes_per_s=1 << 20, interval=3600,
                     recheck_delay=0.1, compare_digests=False)
    assert scrub.slice_blocks == 256
    charges: list[int] = []
    take = scrub.bucket.take

    async def counting(n):
        charges.append(n)
        await take(n)
    monkeypatch.setattr(scrub.bucket, "take", counting)
    on_loop: list[tuple] = []
    verify = b.store.verify

    def loop_verify(*args, **kw):
        on_loop.append(args)
        return verify(*args, **kw)
    monkeypatch.setattr(b.store, "verify", loop_verify)

    counts = await scrub.scrub_extent(VID, 0)
    assert eio.failed and counts["unreadable"] == 1 and counts["bad_blocks"] == 1
    # Slice 0 (blocks 0-255) fell back to one verify per block: each one charged.
    assert charges.count(BLOCK_SIZE) >= scrub.slice_blocks + 1     # + the confirmation of 300
    assert counts["bytes"] == sum(charges)
    assert on_loop == [], "verified on the event loop"
