"""The ``zstore`` CLI as an operator runs it: a real process against real etcd,
meta and chunk servers (tests/cluster.py). Checks output people read, the
JSON scripts read, and the exit codes scripts branch on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.cluster import Cluster, cluster, free_port, wait_for, write_config

pytestmark = pytest.mark.slow

GiB = 2**30
IQN1 = "iqn.2004-10.com.example:host1"
IQN2 = "iqn.2004-10.com.example:host2"


@pytest.fixture(scope="module")
def three(tmp_path_factory, etcd_server) -> Iterator[Cluster]:
    """One meta and three chunk servers (zones a, b, c), shared by this module's tests."""
    with cluster(tmp_path_factory.mktemp("cli"), etcd_server, metas=1, chunks=3,
                 labels=[{"zone": "a"}, {"zone": "b"}, {"zone": "c"}]) as c:
        c.wait_chunks_up(3)
        yield c


def ok(c: Cluster, *args: str, input: str | None = None) -> str:
    return c.cli(*args, check=True, input=input).stdout


def fails(c: Cluster, code: int, *args: str, input: str | None = None, **kw) -> str:
    r = c.cli(*args, input=input, **kw)
    assert r.returncode == code, f"zstore {' '.join(args)} -> {r.returncode}, wanted {code}\n{r.stdout}{r.stderr}"
    assert r.stderr.startswith("zstore: error: "), r.stderr
    return r.stderr


def rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.strip().splitlines()]


# -- cluster and chunk servers ----------------------------------------------------------

def test_cluster_status(three: Cluster) -> None:
    text = ok(three, "cluster", "status")
    assert "chunk servers  3 total, 3 up, 0 down, 0 draining" in text
    assert "leader         meta0 at http://127.0.0.1:" in text
    assert "capacity       30Gi total" in text
    st = three.cli_json("cluster", "status")
    assert st["leader"]["meta_id"] == "meta0" and st["answered_by"] == "meta0"
    assert st["chunks"] == {"total": 3, "up": 3, "down": 0, "draining": 0}


def test_chunk_list_and_drain(three: Cluster) -> None:
    chunks = three.cli_json("chunk", "list")
    assert sorted(c["labels"]["zone"] for c in chunks) == ["a", "b", "c"]
    table = rows(ok(three, "chunk", "list"))
    assert table[0] == ["ID", "HOSTNAME", "ADDRESS", "PORTAL", "STATUS", "STATE", "SESSIONS", "CAPACITY",
                        "USED", "LABELS"]
    by_id = {r[0]: r for r in table[1:]}
    for c in chunks:
        assert c["sessions"] == []
        assert by_id[c["chunk_id"]][3:8] == [c["portal"], "up", "active", "0", "10Gi"]
    cid = chunks[0]["chunk_id"]
    assert f"chunk server {cid} is draining" in ok(three, "chunk", "drain", cid)
    try:
        assert {c["chunk_id"]: c["state"] for c in three.cli_json("chunk", "list")}[cid] == "draining"
        assert "1 draining" in ok(three, "cluster", "status")
    finally:
        ok(three, "chunk", "undrain", cid)
    assert {c["chunk_id"]: c["state"] for c in three.cli_json("chunk", "list")}[cid] == "active"
    fails(three, 3, "chunk", "drain", "no-such-chunk")
    assert f"chunk server {cid} is up" in fails(three, 4, "chunk", "remove", cid)


def test_too_many_replicas_for_the_usable_chunk_servers(three: Cluster) -> None:
    ids = [c["chunk_id"] for c in three.cli_json("chunk", "list")]
    for cid in ids[:2]:
        ok(three, "chunk", "drain", cid)
    try:
        err = fails(three, 4, "volume", "create", "wide", "--size", "1Gi", "--replicas", "2")
        assert "hint:" in err
    finally:
        for cid in ids[:2]:
            ok(three, "chunk", "undrain", cid)
    fails(three, 3, "volume", "show", "wide")


# -- volumes ---------------------------------------------------------------------------------

def test_volume_lifecycle(three: Cluster) -> None:
    out = ok(three, "volume", "create", "life", "--size", "1Gi", "--replicas", "3")
    assert out.startswith("volume life created: 1Gi, 3 replica(s), thin; target iqn.2026-01.io.zstore:")
    assert "already exists, unchanged" in ok(three, "volume", "create", "life", "--size", "1Gi",
                                             "--replicas", "3")

    vol = three.cli_json("volume", "show", "life")
    assert (vol["size"], vol["replicas"], vol["thin"]) == (GiB, 3, True)
    text = ok(three, "volume", "show", "life")
    assert f"target           {vol['target_iqn']}" in text
    assert f"LUN              {vol['lun']}" in text
    assert f"WWN              {vol['wwn']}" in text
    reps = rows(text.split("replicas:\n", 1)[1])
    assert reps[0] == ["CHUNK", "HOSTNAME", "ADDRESS", "STATUS", "LABELS"]
    assert sorted(r[-1] for r in reps[1:]) == ["zone=a", "zone=b", "zone=c"]
    assert all(r[3] == "up" for r in reps[1:])

    listed = three.cli_json("volume", "list")
    assert "life" in [v["name"] for v in listed]
    line = [r for r in rows(ok(three, "volume", "list")) if r[0] == "life"][0]
    assert line[1:5] == ["1Gi", "3", "thin", "available"]

    assert "is 2Gi" in ok(three, "volume", "resize", "life", "--size", "2Gi")
    assert three.cli_json("volume", "show", "life")["size"] == 2 * GiB
    assert "shrink" in fails(three, 2, "volume", "resize", "life", "--size", "1Gi")

    assert "deleted volume life" in ok(three, "volume", "delete", "life")
    fails(three, 3, "volume", "show", "life")
    fails(three, 3, "volume", "delete", "life")


def test_volume_create_errors(three: Cluster) -> None:
    ok(three, "volume", "create", "taken", "--size", "1Gi", "--replicas", "1")
    err = fails(three, 4, "volume", "create", "taken", "--size", "2Gi", "--replicas", "1")
    assert "already exists with size 1Gi" in err
    assert "invalid size '12 parsecs'" in fails(three, 2, "volume", "create", "x", "--size", "12 parsecs")
    assert "replica" in fails(three, 2, "volume", "create", "x", "--size", "1Gi", "--replicas", "4")
    assert "invalid volume name" in fails(three, 2, "volume", "create", "bad/name", "--size", "1Gi")
    err = fails(three, 3, "volume", "show", "nope")
    assert "volume 'nope' not found" in err and "hint:" in err
    ok(three, "volume", "delete", "taken")


def test_volume_list_pages(three: Cluster) -> None:
    for name in ("page-a", "page-b", "page-c"):
        ok(three, "volume", "create", name, "--size", "64Mi", "--replicas", "1")
    try:
        page = three.cli_json("volume", "list", "--limit", "2", "--start-after", "page-")
        assert [v["name"] for v in page["volumes"]] == ["page-a", "page-b"] and page["next"] == "page-b"
        text = ok(three, "volume", "list", "--limit", "2", "--start-after", "page-")
        assert text.strip().endswith("(more: zstore volume list --limit 2 --start-after page-b)")
        page = three.cli_json("volume", "list", "--limit", "2", "--start-after", "page-b")
        assert [v["name"] for v in page["volumes"]][:1] == ["page-c"]
    finally:
        for name in ("page-a", "page-b", "page-c"):
            ok(three, "volume", "delete", name)


# -- snapshots and clones -----------------------------------------------------------------------

def test_snapshots_and_clone(three: Cluster) -> None:
    ok(three, "volume", "create", "src", "--size", "1Gi", "--replicas", "2")
    assert "snapshot src@s1 created (1Gi)" in ok(three, "snapshot", "create", "src", "s1")
    assert "already exists" in ok(three, "snapshot", "create", "src@s1")
    ok(three, "snapshot", "create", "src@s2")

    snaps = three.cli_json("snapshot", "list", "src")
    assert sorted(s["name"] for s in snaps) == ["s1", "s2"]
    assert all(s["volume"] == "src" and s["size"] == GiB for s in snaps)
    table = rows(ok(three, "snapshot", "list"))
    assert table[0] == ["VOLUME", "NAME", "SIZE", "STATE", "CREATED", "ID", "EXPORT"]
    assert ["src", "s1", "1Gi"] in [r[:3] for r in table[1:]]

    assert "volume copy created: 1Gi" in ok(three, "volume", "clone", "src@s1", "copy")
    clone = three.cli_json("volume", "show", "copy")
    assert clone["source_snapshot"] == next(s["snapshot_id"] for s in snaps if s["name"] == "s1")
    fails(three, 3, "volume", "clone", "src@nope", "copy2")
    fails(three, 2, "volume", "clone", "src", "copy2")

    assert "deleted snapshot src@s1" in ok(three, "snapshot", "delete", "src", "s1")
    ok(three, "snapshot", "delete", "src@s2")
    fails(three, 3, "snapshot", "delete", "src@s2")
    assert three.cli_json("snapshot", "list", "src") == []
    for name in ("copy", "src"):
        ok(three, "volume", "delete", name)


# -- exports: targets, ACLs, CHAP ------------------------------------------------------------------

def test_snapshot_of_a_deleted_volume_is_deleted_by_id(three: Cluster) -> None:
    import json
    ok(three, "volume", "create", "gone", "--size", "64Mi", "--replicas", "1")
    snap = json.loads(ok(three, "snapshot", "create", "gone@keep", "--json"))
    ok(three, "volume", "delete", "gone")
    listed = json.loads(ok(three, "snapshot", "list", "--json"))
    assert [s["volume"] for s in listed if s["snapshot_id"] == snap["snapshot_id"]] == [None]
    assert "deleted snapshot" in ok(three, "snapshot", "delete", snap["snapshot_id"])
    assert all(s["snapshot_id"] != snap["snapshot_id"] for s in json.loads(ok(three, "snapshot", "list", "--json")))
    fails(three, 3, "snapshot", "delete", snap["snapshot_id"])


def test_acl_and_targets(three: Cluster) -> None:
    ok(three, "volume", "create", "shared", "--size", "1Gi", "--replicas", "1")
    vol = three.cli_json("volume", "show", "shared")
    assert f"initiator {IQN1} may access volume shared (read-write)" in ok(three, "acl", "add", "shared", IQN1)
    ok(three, "acl", "add", "shared", IQN2, "--readonly")
    entries = three.cli_json("acl", "list", "shared")
    assert [(e["initiator"], e["readonly"]) for e in entries] == [(IQN1, False), (IQN2, True)]
    assert [r[:2] for r in rows(ok(three, "acl", "list", "shared"))[1:]] == [[IQN1, "read-write"],
                                                                              [IQN2, "read-only"]]
    assert three.cli_json("volume", "show", "shared")["acl"] == [IQN1, IQN2]
    assert "invalid initiator name" in fails(three, 2, "acl", "add", "shared", "not an iqn")

    targets = three.cli_json("target", "list")
    mine = next(t for t in targets if t["iqn"] == vol["target_iqn"])
    line = next(r for r in rows(ok(three, "target", "list"))[1:] if r[1] == vol["target_iqn"])
    assert f"{vol['lun']}:shared" in line[3]
    assert mine["luns"] >= 1

    assert "exported to 2 initiator(s)" in fails(three, 4, "volume", "delete", "shared")
    ok(three, "acl", "remove", "shared", IQN2)
    fails(three, 3, "acl", "remove", "shared", IQN2)
    assert [e["initiator"] for e in three.cli_json("acl", "list", "shared")] == [IQN1]
    ok(three, "volume", "delete", "shared", "--force")


def test_chap_secrets_come_from_stdin_and_never_come_back(three: Cluster, tmp_path: Path) -> None:
    ok(three, "volume", "create", "locked", "--size", "64Mi", "--replicas", "1")
    secret, mutual = "initiator-secret-1", "target-secret-222"
    out = ok(three, "chap", "set", "locked", IQN1, "--user", "alice", input=secret + "\n")
    assert "CHAP set for initiator" in out and secret not in out
    (tmp_path / "mutual").write_text(mutual + "\n")
    ok(three, "chap", "set", "*", IQN2, "--user", "bob", "--mutual-user", "tgt",
       "--mutual-secret-file", str(tmp_path / "mutual"), input=secret + "2\n")

    text = ok(three, "chap", "list")
    js = three.cli(*["chap", "list", "--json"], check=True).stdout
    for shown in (text, js):
        assert secret not in shown and mutual not in shown
    entries = {e["initiator"]: e for e in json.loads(js)}
    iqn = three.cli_json("volume", "show", "locked")["target_iqn"]
    assert (entries[IQN1]["target"], entries[IQN1]["user"], entries[IQN1]["mutual"]) == (iqn, "alice", False)
    assert (entries[IQN2]["target"], entries[IQN2]["mutual_user"]) == ("*", "tgt")
    assert ["*", IQN2, "bob", "tgt"] in [r[:4] for r in rows(text)]

    err = fails(three, 2, "chap", "set", "*", IQN1, "--user", "u", input="too-short\n")
    assert "12-255 characters" in err and "too-short" not in err
    fails(three, 2, "chap", "set", "*", IQN1, "--user", "u", input="")

    assert "CHAP cleared" in ok(three, "chap", "clear", "locked", IQN1)
    ok(three, "chap", "clear", "*", IQN2)
    fails(three, 3, "chap", "clear", "*", IQN2)
    assert three.cli_json("chap", "list") == []
    ok(three, "volume", "delete", "locked")


# -- how the CLI finds (or fails to find) the cluster -------------------------------------------------

def test_state_dir_and_endpoint_options(three: Cluster, tmp_path: Path) -> None:
    """--state-dir DIR reads DIR/zstore.toml, ahead of $ZSTORE_CONFIG (which cli() sets)."""
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    (good / "zstore.toml").write_text(three.client_config.read_text())
    (bad / "token").write_text("a-token-the-cluster-does-not-know\n")
    write_config(bad / "zstore.toml", {"client": {
        "endpoints": [f"http://127.0.0.1:{three.meta_ports[0]}"], "token_file": "token"}})
    st = json.loads(ok(three, "--state-dir", str(good), "cluster", "status", "--json"))
    assert st["answered_by"] == "meta0"
    fails(three, 6, "cluster", "status", "--state-dir", str(bad))
    dead = f"http://127.0.0.1:{free_port()}"
    live = f"http://127.0.0.1:{three.meta_ports[0]}"
    r = three.cli("--endpoint", dead, "--endpoint", live, "chunk", "list", "--json", check=True)
    assert len(json.loads(r.stdout)) == 3


def test_unreachable_meta_exits_5(three: Cluster, tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "closed.toml", {"client": {
        "endpoints": [f"http://127.0.0.1:{port}"], "token_file": str(three.token_file)}})
    err = fails(three, 5, "--config", str(cfg), "volume", "list")
    assert f"cannot reach any meta server at http://127.0.0.1:{port}: connection refused" in err
    assert "zstore up" in err and three.token not in err


def test_missing_or_wrong_token_exits_6(three: Cluster, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "notoken.toml", {"client": {
        "endpoints": [f"http://127.0.0.1:{three.meta_ports[0]}"]}})
    err = fails(three, 6, "--config", str(cfg), "volume", "list", env={"ZSTORE_TOKEN": ""})
    assert "missing or wrong cluster token" in err
    err = fails(three, 6, "volume", "create", "v", "--size", "1Gi",
                env={"ZSTORE_TOKEN": "not-the-token-at-all"})
    assert "not-the-token-at-all" not in err and three.token not in err
    assert three.cli_json("cluster", "status")["auth_failures"] >= 2


def test_leader_failover_is_invisible(tmp_path: Path, etcd_server) -> None:
    """Kill the leader: the next write waits out the election instead of failing."""
    with cluster(tmp_path, etcd_server, metas=2) as c:
        leader = wait_for(lambda: c.cli_json("cluster", "status")["leader"], 20, "a leader")["meta_id"]
        c.cli("chap", "set", "*", IQN1, "--user", "u", input="initiator-secret-1\n", check=True)
        c.metas[int(leader.removeprefix("meta"))].kill()
        started = time.monotonic()
        c.cli("chap", "set", "*", IQN2, "--user", "u", input="initiator-secret-1\n", check=True)
        assert time.monotonic() - started < 15
        st = c.cli_json("cluster", "status")
        assert st["leader"]["meta_id"] != leader
        assert {e["initiator"] for e in c.cli_json("chap", "list")} == {IQN1, IQN2}
