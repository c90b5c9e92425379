"""Rendezvous hashing: even spread, and minimal movement when membership changes."""

from __future__ import annotations

from collections import Counter

from redirector.hashing import pick, score

TARGET = "iqn.2026-01.io.zstore:abcd1234.t0000"
INITIATORS = [f"iqn.1994-05.com.example:host{i:03d}" for i in range(300)]


def chunks(n: int) -> list[str]:
    return [f"chunk-{i:02d}-{'x' * i}" for i in range(n)]


def assignment(ids: list[str]) -> dict[str, str]:
    return {ini: pick(ini, TARGET, ids) for ini in INITIATORS}


def test_score_is_stable_64_bit():
    s = score(INITIATORS[0], TARGET, "c1")
    assert s == score(INITIATORS[0], TARGET, "c1") and 0 <= s < 2**64
    # No field boundary ambiguity: ("ab", "c") and ("a", "bc") differ.
    assert score("ab", "c", "x") != score("a", "bc", "x")
    # The known value pins the algorithm: changing it would move every session.
    assert score("i", "t", "c") == int.from_bytes(
        __import__("hashlib").blake2b(b"t\0i\0c", digest_size=8).digest(), "big")


def test_pick_is_order_independent_and_empty_is_none():
    ids = chunks(5)
    assert pick(INITIATORS[7], TARGET, ids) == pick(INITIATORS[7], TARGET, list(reversed(ids)))
    assert pick(INITIATORS[7], TARGET, []) is None


def test_spread_over_3_and_5_is_within_1_5x_fair_share():
    for n in (3, 5):
        counts = Counter(assignment(chunks(n)).values())
        fair = len(INITIATORS) / n
        assert len(counts) == n, counts
        assert max(counts.values()) <= 1.5 * fair, (n, counts)


def test_removing_a_chunk_server_moves_only_its_initiators():
    ids = chunks(5)
    before = assignment(ids)
    gone = ids[2]
    after = assignment([c for c in ids if c != gone])
    moved = {i for i in INITIATORS if before[i] != after[i]}
    assert moved == {i for i in INITIATORS if before[i] == gone}
    assert all(after[i] != gone for i in INITIATORS)


def test_adding_a_chunk_server_moves_about_one_nth_all_to_it():
    for n in (3, 5):
        ids = chunks(n)
        before = assignment(ids)
        new = "chunk-new"
        after = assignment(ids + [new])
        moved = [i for i in INITIATORS if before[i] != after[i]]
        assert all(after[i] == new for i in moved)
        expected = len(INITIATORS) / (n + 1)
        assert 0.5 * expected <= len(moved) <= 1.5 * expected, (n, len(moved))
