"""Replica placement: distinct chunk servers in distinct failure domains.

Pure policy (no etcd): given the usable chunk servers and a replica count,
pick that many servers, each in a failure domain of its own, and among those
spread the replicas over as many different zones, then racks, then hosts as
the cluster has, choosing among equally good candidates at random weighted by
free capacity (so fuller servers fill slower, and concurrent placements do not
all pick the same "best" server).

A chunk server's **failure domain** is its host within its rack within its
zone: the path of its ``zone`` and ``rack`` labels and its ``host`` label (else
its hostname). Two replicas of one extent never share a domain: three chunk
servers on one unlabelled host are one domain, so a 3-replica volume there is
refused (InsufficientResources: 507 from the API, RESOURCE_EXHAUSTED from CSI)
instead of putting every copy where one host failure loses them all. Chunk
servers that carry different zone (or rack) labels are in different domains
even on one machine: labels are the operator's word (``zstore up`` gives each
local chunk server its own zone). ``meta.allow_shared_failure_domain = true``
(default false) lets replicas share a domain when there are not enough, the way
Longhorn's replica soft anti-affinity does; they are still spread as far as the
cluster allows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from zstore.errors import InsufficientResources

DOMAIN_LEVELS = ("zone", "rack", "host")

# meta.allow_shared_failure_domain: the meta server sets it from its config (``configure``).
ALLOW_SHARED_DOMAIN = False

SHARED_HINT = ("run chunk servers on more hosts, or label each with its zone/rack/host "
               "(chunk.labels), or ask for fewer replicas; meta.allow_shared_failure_domain = true "
               "accepts replicas sharing a failure domain")


def configure(meta_cfg: Any) -> None:
    """Take ``allow_shared_failure_domain`` from a ``[meta]`` config section."""
    global ALLOW_SHARED_DOMAIN
    ALLOW_SHARED_DOMAIN = bool(getattr(meta_cfg, "allow_shared_failure_domain", False))


def shared_allowed(allow_shared: bool | None) -> bool:
    return ALLOW_SHARED_DOMAIN if allow_shared is None else allow_shared


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

    @property
    def failure_domain(self) -> tuple[str, ...]:
        """(zone, rack, host): two replicas of an extent never share one."""
        return tuple(self.domain(lvl) for lvl in DOMAIN_LEVELS)

    def domain_name(self) -> str:
        return describe(self.failure_domain)


def describe(domain: tuple[str, ...]) -> str:
    return "/".join(f"{lvl}={v}" for lvl, v in zip(DOMAIN_LEVELS, domain) if v)


def domain_names(cands: list[Candidate]) -> list[str]:
    return sorted({c.domain_name() for c in cands})


def too_few_domains(cands: list[Candidate], replicas: int, what: str) -> InsufficientResources:
    """The refusal when ``cands`` (described by ``what``) span fewer than ``replicas`` domains."""
    names = domain_names(cands)
    return InsufficientResources(
        f"cannot place {replicas} replicas in distinct failure domains: {what} are in only "
        f"{len(names)} failure domain(s) ({', '.join(names) or 'none'}); {replicas} are needed",
        hint=SHARED_HINT, domains=names, replicas=replicas)


def choose(pool: list[Candidate], keep: list[Candidate], n: int,
           rng: random.Random | None = None, allow_shared: bool | None = None) -> list[Candidate]:
    """``n`` more of ``pool`` (distinct servers, none in ``keep``) for a replica set holding ``keep``.

    Each pick is in a failure domain no replica (kept or picked) is in, unless sharing is
    allowed; then the fewest shared zones, then racks, then hosts; capacity-weighted among
    equals. Raises InsufficientResources if ``pool`` has too few fresh domains.
    """
    rng = rng or random.Random()
    taken = {c.chunk_id for c in keep}
    pool = [c for c in pool if c.chunk_id not in taken]
    shared = shared_allowed(allow_shared)
    if not shared:
        held = {c.failure_domain for c in keep}
        fresh = [c for c in pool if c.failure_domain not in held]
        if len({c.failure_domain for c in fresh}) < n:
            if not keep:
                raise too_few_domains(pool, n, f"the {len(pool)} usable chunk server(s)")
            names = domain_names(fresh)
            raise InsufficientResources(
                f"cannot place {n} more replica(s) away from the failure domains that already hold "
                f"one ({', '.join(domain_names(keep))}): the other usable chunk servers are in "
                f"{len(names)} other failure domain(s) ({', '.join(names) or 'none'})",
                hint=SHARED_HINT, domains=names, replicas=len(keep) + n)
        pool = fresh
    chosen = list(keep)
    picked: list[Candidate] = []
    for _ in range(n):
        if not shared:
            used = {c.failure_domain for c in chosen}
            pool = [c for c in pool if c.failure_domain not in used]

        def penalty(c: Candidate) -> tuple[int, ...]:
            return tuple(sum(1 for x in chosen if x.domain(lvl) == c.domain(lvl) and c.domain(lvl))
                         for lvl in DOMAIN_LEVELS)
        best = min(penalty(c) for c in pool)
        tier = [c for c in pool if penalty(c) == best]
        pick = rng.choices(tier, weights=[max(c.free, 1) for c in tier], k=1)[0]
        chosen.append(pick)
        picked.append(pick)
        pool.remove(pick)
    return picked


def place(candidates: list[Candidate], replicas: int, need: int = 0,
          rng: random.Random | None = None, unusable: int = 0,
          allow_shared: bool | None = None) -> list[str]:
    """Chunk ids for ``replicas`` copies, each with at least ``need`` free bytes.

    ``unusable`` is only used to explain a failure (servers that are down,
    draining or full and so not among ``candidates``). ``allow_shared`` None
    means the configured ``meta.allow_shared_failure_domain``.
    """
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
    if not shared_allowed(allow_shared) and len({c.failure_domain for c in fit}) < replicas:
        raise too_few_domains(fit, replicas, f"the {len(fit)} usable chunk server(s)"
                                             + (f" with {need} bytes free" if need else ""))
    return [c.chunk_id for c in choose(fit, [], replicas, rng, allow_shared)]
