"""What every meta operation needs: the etcd client, the key layout, the fence.

``txn`` is the only way meta code writes to etcd. It adds the leader fence
(the leader key still holds exactly this server's leader record) to every
transaction, so a meta server that lost leadership, however briefly, cannot
change cluster state: its write fails and the client retries on the new
leader.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import aetcd

from zstore.errors import Unavailable
from zstore.etcd import get_prefix_paged, prefix_end
from zstore.keys import Keys
from zstore.records import ClusterInfo, Record

R = TypeVar("R", bound=Record)


@dataclass
class Ctx:
    etcd: aetcd.Client
    keys: Keys
    fence: Callable[[], list] = field(default=lambda: [])
    luns_per_target: int = 255
    max_targets: int = 4096
    _cluster: ClusterInfo | None = None

    async def get(self, key: bytes, cls: type[R]) -> tuple[R | None, int]:
        """(record, mod_revision) or (None, 0)."""
        got = await self.etcd.get(key)
        if got is None:
            return None, 0
        return cls.decode(got.value), got.mod_revision

    async def get_raw(self, key: bytes) -> bytes | None:
        got = await self.etcd.get(key)
        return None if got is None else got.value

    async def list(self, prefix: bytes, cls: type[R]) -> list[tuple[bytes, R]]:
        """Every record under ``prefix`` in key order: ``[(key, record)]``."""
        return [(key, cls.decode(value)) for key, value in await self.list_raw(prefix)]

    async def list_raw(self, prefix: bytes, keys_only: bool = False) -> list[tuple[bytes, bytes]]:
        """Every ``(key, value)`` under ``prefix`` in key order (values empty with ``keys_only``).

        Read in pages at one revision: one Range reply is capped at 4 MiB by gRPC, which a
        listing that grows with the cluster (snapshots, volumes, ACLs) can pass."""
        kvs, _ = await get_prefix_paged(self.etcd, prefix, keys_only=keys_only)
        return [(kv.key, kv.value) for kv in kvs]

    async def txn(self, compare: list, success: list) -> bool:
        """Run a fenced transaction; False when a caller's compare failed.

        Raises Unavailable when the fence failed (leadership was lost).
        """
        fence = self.fence()
        ok, _ = await self.etcd.transaction(compare=compare + fence, success=success, failure=[])
        if not ok and fence:
            ok_fence, _ = await self.etcd.transaction(compare=fence, success=[], failure=[])
            if not ok_fence:
                raise Unavailable("this meta server is no longer the leader",
                                  hint="retry; the client will find the new leader")
        return ok

    # compare/op shorthands
    @property
    def t(self):
        return self.etcd.transactions

    def absent(self, key: bytes):
        return self.t.version(key) == 0

    def unchanged(self, key: bytes, mod_revision: int):
        return self.t.mod(key) == mod_revision

    def untouched_since(self, prefix: bytes, revision: int):
        """No key under ``prefix`` was put since ``revision`` (a key deleted since is not seen)."""
        return self.t.mod(prefix, prefix_end(prefix)) < revision + 1

    def put(self, key: bytes, rec: Record | bytes | str):
        value = rec.encode() if isinstance(rec, Record) else rec
        return self.t.put(key, value.encode() if isinstance(value, str) else value)

    def delete(self, key: bytes, prefix: bool = False):
        return self.t.delete(key, range_end=prefix_end(key) if prefix else None)

    async def cluster(self) -> ClusterInfo:
        """The cluster record, created on first use (unfenced: it is write-once)."""
        if self._cluster is None:
            key = self.keys.cluster()
            fresh = ClusterInfo(cluster_id=uuid.uuid4().hex)
            await self.etcd.transaction(compare=[self.absent(key)], success=[self.put(key, fresh)],
                                        failure=[])
            rec, _ = await self.get(key, ClusterInfo)
            assert rec is not None
            self._cluster = rec
        return self._cluster
