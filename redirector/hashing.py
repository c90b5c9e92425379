"""Rendezvous (highest-random-weight) hashing of (initiator, target) over chunk servers.

Every candidate gets a score from a stable 64-bit hash of the pair and its
own id; the highest score wins. Why rendezvous and not a ring: it needs no
virtual nodes or shared ring state, every redirector computes the same answer
from the same set of ids, and when a chunk server leaves only the pairs it
won move (each to its runner-up); when one joins it takes ~1/n of the pairs,
from everyone evenly. The hash is blake2b (keyed by nothing but the input),
not Python's ``hash()``, so the choice is the same in every process and run.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

_SEP = b"\x00"      # cannot occur in an IQN or a chunk id, so fields never run together


def score(initiator: str, target: str, chunk_id: str) -> int:
    """The 64-bit weight of ``chunk_id`` for this initiator/target pair."""
    h = hashlib.blake2b(_SEP.join((target.encode(), initiator.encode(), chunk_id.encode())),
                        digest_size=8)
    return int.from_bytes(h.digest(), "big")


def pick(initiator: str, target: str, chunk_ids: Iterable[str]) -> str | None:
    """The chunk id with the highest score (ties, never seen in practice, go to the larger id)."""
    best: tuple[int, str] | None = None
    for cid in chunk_ids:
        key = (score(initiator, target, cid), cid)
        if best is None or key > best:
            best = key
    return best[1] if best else None
