"""Replica placement: distinct chunk servers, spread over failure domains.

Pure policy (no etcd): given the usable chunk servers and a replica count,
pick that many distinct servers so that replicas land in as many different
zones, then racks, then hosts as the cluster has, choosing among equally good
candidates at random weighted by free capacity (so fuller servers fill
slower, and concurrent placements do not all pick the same "best" server).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from zstore.errors import InsufficientResources

DOMAIN_LEVELS = ("zone", "rack", "host")


@dataclass(frozen=True)
class Candidate:
    chunk_id: str
    free: int
    labels: dict[str, str] = field(default_factory=dict, hash=False)
    host: str = ""

    def domain(self, level: str) -> str:
        if level == "host":
            return self.labels.get("host", self.host or self.chunk_id)
        return self.labels.get(level, "")


def place(candidates: list[Candidate], replicas: int, need: int = 0,
          rng: random.Random | None = None, unusable: int = 0) -> list[str]:
    """Chunk ids for ``replicas`` copies, each with at least ``need`` free bytes.

    ``unusable`` is only used to explain a failure (servers that are down,
    draining or full and so not among ``candidates``).
    """
    rng = rng or random.Random()
    fit = [c for c in candidates if c.free >= need and c.free > 0]
    if len(fit) < replicas:
        short = len(candidates) - len(fit)
        raise InsufficientResources(
            f"cannot place {replicas} replicas: only {len(fit)} chunk server(s) are up, "
            f"not draining and have {need} bytes free"
            + (f" ({short} more lack free space)" if short else "")
            + (f" ({unusable} are down or draining)" if unusable else ""),
            hint="add or bring back chunk servers, undrain one, or ask for fewer replicas",
            available=len(fit), replicas=replicas)
    chosen: list[Candidate] = []
    pool = list(fit)
    for _ in range(replicas):
        def penalty(c: Candidate) -> tuple[int, ...]:
            return tuple(sum(1 for x in chosen if x.domain(lvl) == c.domain(lvl) and c.domain(lvl))
                         for lvl in DOMAIN_LEVELS)
        best = min(penalty(c) for c in pool)
        tier = [c for c in pool if penalty(c) == best]
        pick = rng.choices(tier, weights=[max(c.free, 1) for c in tier], k=1)[0]
        chosen.append(pick)
        pool.remove(pick)
    return [c.chunk_id for c in chosen]
