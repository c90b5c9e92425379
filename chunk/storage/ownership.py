"""Volume ownership: the epoch that lets exactly one coordinator write a volume.

Acquiring is one etcd compare-and-swap on ``owners/{vid}`` raising the epoch;
replicas then refuse requests carrying any lower epoch (``fencing``). The
record is not leased: the epoch must only ever grow, even across a crash of
every owner. The volume record (``snap_seq``) is read *after* the swap, which
is what makes the meta's snapshot transaction (comparing the owner key) and a
new owner linearizable.
"""

from __future__ import annotations

import logging

from zstore.keys import Keys
from zstore.records import Volume, VolumeOwner

log = logging.getLogger(__name__)


class OwnershipError(Exception):
    pass


async def acquire(etcd, keys: Keys, vid: str, chunk_id: str, attempts: int = 32) -> tuple[int, int, Volume]:
    """(epoch, owner key mod revision, fresh volume record)."""
    key = keys.owner(vid)
    t = etcd.transactions
    for _ in range(attempts):
        got = await etcd.get(key)
        if got is None:
            epoch, compare = 1, [t.version(key) == 0]
        else:
            epoch, compare = VolumeOwner.decode(got.value).epoch + 1, [t.mod(key) == got.mod_revision]
        rec = VolumeOwner(volume_id=vid, chunk_id=chunk_id, epoch=epoch)
        ok, _ = await etcd.transaction(compare=compare + [t.version(keys.volume(vid)) > 0],
                                       success=[t.put(key, rec.encode())], failure=[])
        if ok:
            mine = await etcd.get(key)
            vol = await etcd.get(keys.volume(vid))
            if mine is None or vol is None:
                raise OwnershipError(f"volume {vid} vanished while taking ownership")
            if VolumeOwner.decode(mine.value).epoch != epoch:
                continue                       # someone took it right after us
            log.info("volume %s: owner now, epoch %d", vid, epoch)
            return epoch, mine.mod_revision, Volume.decode(vol.value)
        if await etcd.get(keys.volume(vid)) is None:
            raise OwnershipError(f"volume {vid} does not exist")
    raise OwnershipError(f"volume {vid}: could not take ownership (too much contention)")


async def release(etcd, keys: Keys, vid: str, chunk_id: str, epoch: int) -> bool:
    """Mark our ownership released (only if it is still ours at that epoch)."""
    key = keys.owner(vid)
    got = await etcd.get(key)
    if got is None:
        return False
    rec = VolumeOwner.decode(got.value)
    if rec.chunk_id != chunk_id or rec.epoch != epoch or rec.released:
        return False
    rec.released = True
    t = etcd.transactions
    ok, _ = await etcd.transaction(compare=[t.mod(key) == got.mod_revision],
                                   success=[t.put(key, rec.encode())], failure=[])
    return ok
