"""COMPARE AND WRITE from two chunk servers on one volume, for real below the coordinators:
real etcd (ownership epochs), three real replica servers on loopback (their fences), and
two Coordinators, one per "chunk server", each with its own replica client. Only the
interleaving is forced: the other server acts at the moment our write is about to leave,
between our compare and our write."""

from __future__ import annotations

import asyncio

import pytest

from chunk.blockdev import MiscompareError
from chunk.storage.coordinator import EXTENT_SIZE, Coordinator
from chunk.storage.peer_auth import load_or_create_secret
from chunk.storage.replica_client import ReplicaClient
from chunk.storage.replicas import RemoteReplica
from zstore.keys import Keys
from zstore.records import Volume

from .replica_nodes import CLUSTER, Nodes

VID = "vcaw"
BS = 512
X, N, Y = b"x" * BS, b"n" * BS, b"y" * BS


class _Replica(RemoteReplica):
    """A peer as one chunk server sees it; ``before`` (async) runs before a write leaves."""

    before = None

    def start_write(self, vid, idx, off, data, epoch, seq, fua=False, sole=False):
        if self.before is None:
            return super().start_write(vid, idx, off, data, epoch, seq, fua, sole=sole)
        before, parent = self.before, super()

        async def later():
            await before(self)
            await parent.start_write(vid, idx, off, data, epoch, seq, fua, sole=sole)
        return later()


class _Meta:
    async def call(self, method, path, body):
        raise AssertionError(f"no replica is dropped here ({method} {path} {body})")


class _Server:
    """What a chunk server gives its coordinator: etcd, and its own view of the peers."""

    lease, min_write_replicas, replicas_version = None, 1, 1

    def __init__(self, chunk_id: str, etcd, keys: Keys, client: ReplicaClient, nodes: Nodes) -> None:
        self.chunk_id, self.etcd, self.keys, self.client = chunk_id, etcd, keys, client
        self.meta = _Meta()
        self.reps = {cid: _Replica(cid, ("127.0.0.1", n.server.port), client)
                     for cid, n in nodes.nodes.items()}

    async def replica(self, chunk_id):
        return self.reps[chunk_id]

    def cached_replicas(self, chunk_ids):
        return [self.reps[c] for c in chunk_ids]

    def cached_replica(self, chunk_id):
        return self.reps.get(chunk_id)

    def local_store_for(self, rec):
        return None

    def forget_peer(self, chunk_id):
        pass

    def coordinator(self) -> Coordinator:
        c = Coordinator(self, Volume(volume_id=VID, name=VID, size=EXTENT_SIZE, replicas=3))
        c._is_ready = True                      # noqa: SLF001 - the extent map: read at _acquire
        return c


@pytest.fixture
async def servers(tmp_path, etcd_client, etcd_config):
    keys = Keys(etcd_config.prefix)
    nodes = Nodes(tmp_path, etcd_client, keys)
    for cid in "ABC":
        await nodes.add(cid)
    await etcd_client.put(keys.volume(VID), Volume(volume_id=VID, name=VID, size=EXTENT_SIZE,
                                                   replicas=3).encode())
    await nodes.extent(VID, 0, ["A", "B", "C"], {0: X * 8})
    secret = await load_or_create_secret(etcd_client, keys)
    clients = [ReplicaClient(secret, CLUSTER, f"s{k}", timeout=3.0) for k in (1, 2)]
    made = [_Server(f"s{k}", etcd_client, keys, cl, nodes) for k, cl in zip((1, 2), clients)]
    try:
        yield nodes, made[0].coordinator(), made[1].coordinator()
    finally:
        for cl in clients:
            await cl.close()
        await nodes.close()


def _on_disk(nodes: Nodes, n: int = BS) -> list[bytes]:
    return [bytes(nodes.nodes[c].store.read(VID, 0, 0, n)[0]) for c in "ABC"]


def _once(action):
    """A ``before`` hook for every replica of a server: ``action`` runs once, before the
    first of its writes leaves; the others wait for it."""
    task = None

    async def before(replica):
        nonlocal task
        if task is None:
            task = asyncio.ensure_future(action())
        await task
    return before


async def test_the_other_servers_write_between_our_compare_and_write_makes_ours_miscompare(servers):
    nodes, s1, s2 = servers
    await s1.ensure_owner()

    async def other_writes():
        await s2.write(0, Y)                # takes the volume over (a newer epoch), writes Y
    for r in s1.engine.reps.values():
        r.before = _once(other_writes)
    with pytest.raises(MiscompareError):
        await s1.compare_and_write(0, X, N)
    assert _on_disk(nodes) == [Y, Y, Y]      # Y kept: a repeated write would have put N back
    for r in s1.engine.reps.values():
        r.before = None
    await s1.compare_and_write(0, Y, N)      # against what is there now: GOOD
    assert _on_disk(nodes) == [N, N, N]


async def test_a_write_fenced_on_some_replicas_only_is_completed(servers):
    """The other server fences B and C (its own compare read, say) just after our write
    reached A: ours is on A only. Reconciled, it is on all three, and GOOD."""
    nodes, s1, s2 = servers
    await s1.ensure_owner()

    async def other_fences():
        await s2.ensure_owner()
        for cid in "BC":
            await s2.engine.reps[cid].fence(VID, 0, s2.epoch)
    s1.engine.reps["A"].before = None
    for cid in "BC":
        s1.engine.reps[cid].before = _once(other_fences)
    s1.engine.reps["C"].before = s1.engine.reps["B"].before
    await s1.compare_and_write(0, X, N)
    assert _on_disk(nodes) == [N, N, N]
    assert s1.counters["fenced"] >= 1


async def test_two_servers_racing_compare_and_writes_on_one_block_exactly_one_wins_each_round(servers):
    """Both servers swap the same block from the same expected value at once, round after
    round, each taking the volume from the other: one GOOD and one MISCOMPARE per round, and
    the block holds the winner's data on every replica."""
    nodes, s1, s2 = servers
    cur = X
    for rnd in range(12):
        mine = {s1: bytes([65 + rnd]) * BS, s2: bytes([97 + rnd]) * BS}

        async def swap(coord):
            try:
                await coord.compare_and_write(0, cur, mine[coord])
                return True
            except MiscompareError:
                return False
        won = await asyncio.wait_for(asyncio.gather(swap(s1), swap(s2)), 60)
        assert sorted(won) == [False, True], (rnd, won)
        winner = s1 if won[0] else s2
        assert _on_disk(nodes) == [mine[winner]] * 3, rnd
        cur = mine[winner]
