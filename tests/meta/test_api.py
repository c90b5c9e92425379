"""The meta API as a client sees it: real etcd, real meta and chunk processes."""

from __future__ import annotations

import time

import pytest

from tests.cluster import Cluster, Etcd, cluster, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def three(tmp_path, etcd_server):
    with cluster(tmp_path, etcd_server, metas=1, chunks=3,
                 labels=[{"zone": "a"}, {"zone": "b"}, {"zone": "c"}]) as c:
        wait_for(lambda: c.api("GET", "/cluster")[1]["chunks"]["up"] == 3, 30, "3 chunk servers up")
        yield c


def test_health_needs_no_token(meta_cluster):
    status, body = meta_cluster.api("GET", "/health", token=None)
    assert status == 200 and body["ok"] is True


def test_missing_or_wrong_token_is_refused_and_counted(meta_cluster: Cluster):
    c = meta_cluster
    assert c.api("GET", "/volumes", token=None)[0] == 401                 # read, no token
    status, body = c.api("GET", "/cluster", token="wrong-token")           # read, wrong token
    assert status == 401 and body["error"]["code"] == "unauthenticated"
    status, _ = c.api("POST", "/volumes", {"name": "v", "size": "1Gi"}, token=None)      # write
    assert status == 401
    status, _ = c.api("POST", "/volumes", {"name": "v", "size": "1Gi"}, token="nope")    # write
    assert status == 401
    status, body = c.api("GET", "/cluster")
    assert status == 200 and body["auth_failures"] == 4 and body["volumes"] == 0
    status, text = c.api("GET", "/metrics")
    assert "zstore_meta_auth_failures_total 4" in text
    log = c.metas[0].log()
    assert "refused unauthenticated" in log and c.token not in log and "wrong-token" not in log


def test_volume_lifecycle_over_http(three: Cluster):
    c = three
    status, vol = c.api("POST", "/volumes", {"name": "v1", "size": "1Gi", "replicas": 3})
    assert status == 201
    assert len({p["chunk_id"] for p in vol["placement"]}) == 3
    assert {tuple(p["labels"].items()) for p in vol["placement"]} == {(("zone", "a"),), (("zone", "b"),), (("zone", "c"),)}
    assert vol["target_iqn"].startswith("iqn.2026-01.io.zstore:") and vol["lun"] == 1
    assert c.api("POST", "/volumes", {"name": "v1", "size": "1Gi", "replicas": 3})[0] == 200
    status, body = c.api("POST", "/volumes", {"name": "v1", "size": "2Gi", "replicas": 3})
    assert status == 409 and "already exists with size 1Gi" in body["error"]["message"]
    status, body = c.api("POST", "/volumes", {"name": "v2", "size": "1Gi", "replicas": 4})
    assert status == 400
    assert c.api("GET", "/volumes/nope")[0] == 404
    assert c.api("POST", "/volumes", {"name": "v3", "size": "lots"})[0] == 400
    assert c.api("POST", "/volumes/v1/resize", {"size": "2Gi"})[1]["size"] == 2 * 2**30
    assert c.api("PUT", "/volumes/v1/acl/iqn.2004-10.com.example:h1")[0] == 200
    status, body = c.api("DELETE", "/volumes/v1")
    assert status == 409 and "exported" in body["error"]["message"]
    assert c.api("DELETE", "/volumes/v1?force=true")[0] == 200
    assert c.api("GET", "/volumes/v1")[0] == 404


def test_a_size_of_5000_digits_is_400_not_500(meta_cluster: Cluster):
    status, body = meta_cluster.api("POST", "/volumes", {"name": "v", "size": "9" * 5000})
    assert status == 400 and "too many digits" in body["error"]["message"]
    assert meta_cluster.api("GET", "/volumes/v")[0] == 404


def test_bad_json_body(meta_cluster: Cluster):
    import urllib.request
    import urllib.error
    req = urllib.request.Request(f"http://127.0.0.1:{meta_cluster.meta_ports[0]}/api/v1/volumes",
                                 data=b"{not json", method="POST",
                                 headers={"Authorization": f"Bearer {meta_cluster.token}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 400


def test_chunk_killed_shows_down_within_ttl(three: Cluster):
    c = three
    victim = c.chunks[0]
    victim.kill()
    t0 = time.monotonic()
    wait_for(lambda: c.api("GET", "/cluster")[1]["chunks"]["down"] == 1, c.lease_ttl + 5, "chunk shown down")
    assert time.monotonic() - t0 <= c.lease_ttl + 2
    chunks = c.api("GET", "/chunks")[1]["chunks"]
    down = [x for x in chunks if x["status"] == "down"]
    assert len(down) == 1
    # The leader records when it went down (recovery's grace period starts there).
    wait_for(lambda: [x for x in c.api("GET", "/chunks")[1]["chunks"] if x["status"] == "down"][0]["down_since"],
             10, "down_since recorded")


def test_leader_failover_within_10s_and_writes_keep_working(tmp_path, etcd_server):
    with cluster(tmp_path, etcd_server, metas=2, chunks=1) as c:
        wait_for(lambda: c.api("GET", "/cluster")[1]["chunks"]["up"] == 1, 30, "chunk up")
        leader = wait_for(lambda: c.api("GET", "/meta/leader")[1].get("meta_id"), 15, "a leader")
        epoch = c.api("GET", "/meta/leader")[1]["epoch"]
        li = int(leader.removeprefix("meta"))
        other = 1 - li
        # A write sent to the follower is forwarded to the leader.
        status, _ = c.api("POST", "/volumes", {"name": "before", "size": "1Gi", "replicas": 1}, meta=other)
        assert status == 201
        c.metas[li].kill()
        t0 = time.monotonic()
        # Until the other leads, a write there is refused with a 503 that says it did
        # nothing (forward refused, or no/new leader): a CLI's retried DELETE then answered
        # 404 is "not found", not the earlier attempt's success.
        status, body = c.api("DELETE", "/volumes/before", meta=other)
        assert status == 503 and body["error"]["details"]["maybe_applied"] is False, body
        wait_for(lambda: c.api("GET", "/meta/leader", meta=other)[1].get("meta_id") == f"meta{other}",
                 10, "the other meta server to lead")
        assert time.monotonic() - t0 < 10
        new = c.api("GET", "/meta/leader", meta=other)[1]
        assert new["epoch"] > epoch
        status, _ = c.api("POST", "/volumes", {"name": "after", "size": "1Gi", "replicas": 1}, meta=other)
        assert status == 201
        # The CLI's config still lists both meta servers, the dead one first when meta0 led:
        # it keeps working without new flags.
        r = c.cli("volume", "create", "via-cli", "--size", "1Gi", "--replicas", "1")
        assert r.returncode == 0, r.stderr
        status = c.cli_json("cluster", "status")
        assert status["leader"]["meta_id"] == f"meta{other}" and status["leader"]["epoch"] == new["epoch"]


def test_etcd_down_is_503_and_nothing_half_written(tmp_path):
    own = Etcd(tmp_path / "own-etcd").start()
    try:
        with cluster(tmp_path / "c", own, metas=1, chunks=1) as c:
            wait_for(lambda: c.api("GET", "/cluster")[1]["chunks"]["up"] == 1, 30, "chunk up")
            assert c.api("POST", "/volumes", {"name": "ok", "size": "1Gi", "replicas": 1})[0] == 201
            own.kill()
            status, body = c.api("POST", "/volumes", {"name": "lost", "size": "1Gi", "replicas": 1}, timeout=30)
            assert status == 503 and body["error"]["code"] == "unavailable"
            assert "etcd" in body["error"]["message"]
            status, body = c.api("GET", "/volumes", timeout=30)
            assert status == 503 and "etcd is unreachable" in body["error"]["message"]
            own.start()
            vols = wait_for(lambda: c.api("GET", "/volumes")[1].get("volumes"), 30, "etcd back")
            assert [v["name"] for v in vols] == ["ok"]
            targets = c.api("GET", "/targets")[1]["targets"]
            assert sum(t["luns"] for t in targets) == 1
            # and the cluster works again
            wait_for(lambda: c.api("POST", "/volumes", {"name": "again", "size": "1Gi", "replicas": 1})[0] == 201,
                     30, "writes after etcd came back")
    finally:
        own.stop()


def test_chap_secrets_stay_out_of_answers_and_logs(three: Cluster):
    c = three
    assert c.api("POST", "/volumes", {"name": "v", "size": "1Gi", "replicas": 1})[0] == 201
    secret, mutual = "initiator-secret-42", "target-secret-4242"
    status, body = c.api("PUT", "/chap", {"target": "v", "initiator": "iqn.2004-10.com.example:h1",
                                          "user": "h1", "secret": secret, "mutual_user": "t",
                                          "mutual_secret": mutual})
    assert status == 200 and body["mutual"] is True
    status, body = c.api("PUT", "/chap", {"target": "v", "initiator": "iqn.2004-10.com.example:h1",
                                          "user": "h1", "secret": "short"})
    assert status == 400 and "short" not in body["error"]["message"]
    _, listed = c.api("GET", "/chap")
    everything = repr(listed) + c.metas[0].log()
    assert len(listed["chap"]) == 1 and secret not in everything and mutual not in everything


@pytest.mark.parametrize("allow, status", [(False, 507), (True, 201)])
def test_replicas_sharing_a_host_need_the_setting(tmp_path, etcd_server, allow, status):
    """Two unlabelled chunk servers on this one host are one failure domain: a 2-replica
    volume is refused unless the meta server is configured to allow a shared domain."""
    with cluster(tmp_path, etcd_server, metas=1, chunks=2, labels=[{}, {}],
                 meta_options={"allow_shared_failure_domain": allow}) as c:
        wait_for(lambda: c.api("GET", "/cluster")[1]["chunks"]["up"] == 2, 30, "2 chunk servers up")
        got, body = c.api("POST", "/volumes", {"name": "v", "size": "1Gi", "replicas": 2})
        assert got == status, body
        if not allow:
            assert "failure domain" in body["error"]["message"]
