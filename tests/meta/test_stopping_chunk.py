"""A chunk server shutting down (its live record marked ``stopping``, the lease kept until
its writes are flushed) stays up for fencing, but the meta places nothing new there: no
new extent's replica, no recovery copy, no resync of a stale replica it holds."""

from __future__ import annotations

from meta import chunks as chunkmod
from meta import extents, recovery
from zstore.records import ChunkInfo, ChunkLive

GiB = 1 << 30
DISKS = [{"path": "/d", "state": "ok", "capacity": 100 * GiB, "used": 0, "free": 100 * GiB}]


def view(cid: str, stopping: bool = False) -> chunkmod.ChunkView:
    info = ChunkInfo(chunk_id=cid, hostname=cid, address="127.0.0.1", data_port=1,
                     portal="127.0.0.1:3260", labels={"zone": cid}, disks=DISKS)
    live = ChunkLive(chunk_id=cid, pid=1, started=0.0, lease_ttl=5, disks=DISKS, stopping=stopping)
    return chunkmod.ChunkView(info=info, live=live, admin=None, chunk_id=cid)


def test_a_stopping_chunk_server_is_up_but_no_placement_candidate():
    views = [view("a"), view("b", stopping=True), view("c")]
    assert all(v.up for v in views)                     # fencing still sees the owner
    cands, unusable = chunkmod.candidates(views)
    assert [c.chunk_id for c in cands] == ["a", "c"] and unusable == 1
    assert extents.usable(views[0], GiB) and not extents.usable(views[1], GiB)
    assert views[1].to_dict()["status"] == "up" and views[1].to_dict()["stopping"] is True
    assert views[0].to_dict()["stopping"] is False


def test_a_stale_replica_on_a_stopping_server_waits_rather_than_being_resynced_now():
    assert recovery.chunk_state(view("a"), grace=60, now=1000.0) == recovery.OK
    assert recovery.chunk_state(view("b", stopping=True), grace=60, now=1000.0) == recovery.WAITING
