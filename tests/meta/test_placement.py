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


def on_hosts(*specs):
    """Candidates (free, host, labels): chunk servers whose hostname is given."""
    return [Candidate(chunk_id=f"c{i}", free=free, labels=labels, host=host)
            for i, (free, host, labels) in enumerate(specs)]


def test_one_host_cannot_hold_three_replicas():
    cs = on_hosts(*[(10 * GiB, "node1", {})] * 3)
    with pytest.raises(InsufficientResources) as e:
        place(cs, 3)
    assert "distinct failure domains" in e.value.message
    assert "only 1 failure domain(s) (host=node1); 3 are needed" in e.value.message
    assert "allow_shared_failure_domain" in e.value.hint
    assert e.value.details["domains"] == ["host=node1"] and e.value.details["replicas"] == 3
    with pytest.raises(InsufficientResources):
        place(cs, 2)                               # two on one host is no better
    assert len(place(cs, 1)) == 1


def test_shared_domains_when_the_setting_allows_them():
    cs = on_hosts(*[(10 * GiB, "node1", {})] * 3)
    assert sorted(place(cs, 3, allow_shared=True)) == ["c0", "c1", "c2"]
    cs = on_hosts((10 * GiB, "node1", {}), (10 * GiB, "node1", {}), (10 * GiB, "node2", {}))
    for seed in range(20):                         # still spread as far as the cluster allows
        got = place(cs, 2, rng=random.Random(seed), allow_shared=True)
        assert "c2" in got


def test_the_configured_setting_is_the_default(monkeypatch):
    from meta import placement
    from zstore.config import Config
    cs = on_hosts(*[(10 * GiB, "node1", {})] * 3)
    assert Config().meta.allow_shared_failure_domain is False
    cfg = Config()
    cfg.set("meta", "allow_shared_failure_domain", "true")
    monkeypatch.setattr(placement, "ALLOW_SHARED_DOMAIN", False)
    placement.configure(cfg.meta)
    assert len(place(cs, 3)) == 3
    with pytest.raises(InsufficientResources):
        place(cs, 3, allow_shared=False)           # an explicit argument wins
    placement.configure(Config().meta)
    with pytest.raises(InsufficientResources):
        place(cs, 3)


def test_host_label_and_zone_labels_make_domains():
    # A host label overrides the hostname: two servers labelled host=a are one domain.
    cs = on_hosts((GiB, "n1", {"host": "a"}), (GiB, "n2", {"host": "a"}))
    with pytest.raises(InsufficientResources):
        place(cs, 2)
    # Different zones on one machine (zstore up, test clusters) are different domains.
    cs = on_hosts(*[(GiB, "node1", {"zone": f"z{i}"}) for i in range(3)])
    assert sorted(place(cs, 3)) == ["c0", "c1", "c2"]


def test_two_zones_of_two_hosts_place_two_replicas_across_zones():
    cs = on_hosts((10 * GiB, "h1", {"zone": "a"}), (10 * GiB, "h2", {"zone": "a"}),
                  (10 * GiB, "h3", {"zone": "b"}), (10 * GiB, "h4", {"zone": "b"}))
    for seed in range(50):
        got = place(cs, 2, rng=random.Random(seed))
        assert {cs[int(c[1:])].labels["zone"] for c in got} == {"a", "b"}, got
    for seed in range(20):                         # three: distinct hosts, both zones
        got = place(cs, 3, rng=random.Random(seed))
        assert len({cs[int(c[1:])].host for c in got}) == 3
        assert {cs[int(c[1:])].labels["zone"] for c in got} == {"a", "b"}


def test_servers_sharing_a_host_count_once():
    cs = on_hosts((100 * GiB, "h1", {}), (100 * GiB, "h1", {}), (GiB, "h2", {}))
    for seed in range(30):
        got = place(cs, 2, rng=random.Random(seed))
        assert "c2" in got                         # never both servers of h1
