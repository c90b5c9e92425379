import random
from collections import Counter

import pytest

from meta.placement import Candidate, place
from zstore.errors import InsufficientResources

GiB = 2**30


def cands(*specs):
    return [Candidate(chunk_id=f"c{i}", free=free, labels=labels, host=f"h{i}")
            for i, (free, labels) in enumerate(specs)]


def test_distinct_servers():
    cs = cands(*[(10 * GiB, {})] * 5)
    for seed in range(50):
        got = place(cs, 3, rng=random.Random(seed))
        assert len(set(got)) == 3


def test_spreads_across_zones_before_reusing_one():
    cs = cands((100 * GiB, {"zone": "a"}), (100 * GiB, {"zone": "a"}), (100 * GiB, {"zone": "a"}),
               (1 * GiB, {"zone": "b"}), (1 * GiB, {"zone": "c"}))
    for seed in range(50):
        got = place(cs, 3, rng=random.Random(seed))
        zones = {c.labels["zone"] for c in cs if c.chunk_id in got}
        assert zones == {"a", "b", "c"}, got


def test_racks_within_a_zone():
    cs = cands((10 * GiB, {"zone": "a", "rack": "r1"}), (10 * GiB, {"zone": "a", "rack": "r1"}),
               (10 * GiB, {"zone": "a", "rack": "r2"}))
    for seed in range(30):
        got = place(cs, 2, rng=random.Random(seed))
        racks = {c.labels["rack"] for c in cs if c.chunk_id in got}
        assert racks == {"r1", "r2"}


def test_weighted_by_free_capacity():
    cs = cands((90 * GiB, {}), (10 * GiB, {}))
    rng = random.Random(7)
    counts = Counter(place(cs, 1, rng=rng)[0] for _ in range(2000))
    assert counts["c0"] > 5 * counts["c1"] > 0


def test_too_few_servers_is_a_clear_error():
    with pytest.raises(InsufficientResources) as e:
        place(cands((GiB, {}), (GiB, {})), 3, unusable=1)
    assert "only 2 chunk server(s)" in e.value.message
    assert "1 are down or draining" in e.value.message


def test_need_excludes_full_servers():
    cs = cands((10 * GiB, {}), (GiB, {}), (10 * GiB, {}))
    with pytest.raises(InsufficientResources) as e:
        place(cs, 3, need=5 * GiB)
    assert "1 more lack free space" in e.value.message
    assert sorted(place(cs, 2, need=5 * GiB)) == ["c0", "c2"]
