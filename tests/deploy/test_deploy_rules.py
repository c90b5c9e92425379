"""Operational rules for deploy/: properties of the parsed manifests and systemd units that
the schemas cannot see (privileges that really take effect, stop timeouts, priorities...)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy.test_manifests import KDIR, ROOT, objects, one, pod_specs

yaml = pytest.importorskip("yaml")

SYSTEMD = ROOT / "deploy" / "systemd"


def unit(name: str) -> dict[str, list[str]]:
    """``[Service]`` of a systemd unit: key -> every value given (systemd's list keys add up)."""
    section, out = None, {}
    for line in (SYSTEMD / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service":
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def caps(u: dict[str, list[str]], key: str) -> set[str]:
    return {c for v in u.get(key, []) for c in v.split()}


def _runs_as_root(u: dict[str, list[str]]) -> bool:
    return u.get("User", ["root"])[-1] in ("root", "0")


# --- 1: the redirector can listen on :3260 --------------------------------------------------

@pytest.mark.parametrize("name", ["zstore-redirector.service", "zstore-chunk.service"])
def test_units_listening_on_3260_may_bind_it(name: str):
    """Both daemons listen on port 3260 by default (redirector.port, chunk.portal). A non-root
    User= needs CAP_NET_BIND_SERVICE in AmbientCapabilities: the bounding set alone gives a
    non-root process nothing, so the redirector's listen failed EACCES and it never held the VIP."""
    u = unit(name)
    if not _runs_as_root(u):
        assert "CAP_NET_BIND_SERVICE" in caps(u, "AmbientCapabilities"), name
    if "CapabilityBoundingSet" in u:
        assert caps(u, "AmbientCapabilities") <= caps(u, "CapabilityBoundingSet"), name


def test_redirector_unit_has_its_capabilities_ambient():
    u = unit("zstore-redirector.service")
    assert not _runs_as_root(u)
    assert {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_NET_BIND_SERVICE"} <= caps(u, "AmbientCapabilities")


def _run_as_user(spec: dict, c: dict) -> int | None:
    for ctx in (c.get("securityContext") or {}, spec.get("securityContext") or {}):
        if "runAsUser" in ctx:
            return ctx["runAsUser"]
    return None


def test_added_capabilities_take_effect():
    """Kubernetes' capabilities.add only reaches a root process (there are no ambient
    capabilities for a non-root container user): every container that adds some runs as
    uid 0 explicitly, whatever USER the image has."""
    checked = 0
    for wl, spec in pod_specs():
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c.get("securityContext") or {}
            if sc.get("capabilities", {}).get("add") and not sc.get("privileged"):
                checked += 1
                assert _run_as_user(spec, c) == 0, f"{wl}/{c['name']} adds capabilities but is not root"
                assert sc.get("runAsNonRoot") is not True, f"{wl}/{c['name']}"
    assert checked >= 1


def test_redirector_pod_may_hold_the_vip_and_bind_3260():
    spec = dict(pod_specs())["zstore-redirector"]
    c = next(c for c in spec["containers"] if c["name"] == "redirector")
    assert _run_as_user(spec, c) == 0
    assert {"NET_ADMIN", "NET_RAW", "NET_BIND_SERVICE"} <= set(c["securityContext"]["capabilities"]["add"])
    assert spec["hostNetwork"] is True


def test_chunk_pod_runs_as_root():
    """The chunk server writes a hostPath that kubelet creates root-owned."""
    spec = dict(pod_specs())["zstore-chunk"]
    c = next(c for c in spec["containers"] if c["name"] == "chunk")
    assert _run_as_user(spec, c) == 0


# --- 2c: the admin token stays off the nodes ------------------------------------------------

def test_node_plugin_gets_no_token():
    """The CSI node plugin never calls the meta API (csi/server.py builds no Meta in node
    mode), so the DaemonSet on every node must not mount the cluster's admin token."""
    spec = dict(pod_specs())["zstore-csi-node"]
    secrets = [v for v in spec.get("volumes", []) if "secret" in v or "projected" in v]
    assert not secrets, f"zstore-csi-node mounts {secrets}"
    for c in spec.get("initContainers", []) + spec["containers"]:
        assert not any(e.get("valueFrom", {}).get("secretKeyRef") for e in c.get("env", [])), c["name"]


def test_node_plugin_mode_really_skips_the_meta_api(monkeypatch, tmp_path: Path):
    """csi.server.main in node mode with the pod's args builds no Meta client (so needs no token)."""
    import csi.server as server
    from tests.deploy.test_manifests import container
    args = [a for a in container("zstore-csi-node", "zstore-csi")["args"] if not a.startswith("--config=")]
    cfg = tmp_path / "zstore.toml"
    cfg.write_text(one("ConfigMap", "zstore-config")["data"]["zstore.toml"]
                   .replace("/etc/zstore/secret/token", str(tmp_path / "no-such-token")))
    made = []
    monkeypatch.setattr(server.Meta, "from_config", classmethod(lambda cls, c: made.append(c)))
    monkeypatch.setattr(server, "serve", lambda *a, **k: None)
    monkeypatch.setattr(server.asyncio, "run", lambda coro: None)
    server.main(args + [f"--config={cfg}", "--node-id=iqn.2026-01.test:node", f"--state-dir={tmp_path}"])
    assert made == []


# --- 2a: etcd is reachable by zstore only ---------------------------------------------------

# Who opens connections to etcd: zstore/etcd.py users (meta/, chunk/, redirector/).
ETCD_CLIENTS = ("zstore-meta", "zstore-chunk", "zstore-redirector")


def _etcd_policies() -> list[dict]:
    etcd_labels = one("StatefulSet", "zstore-etcd")["spec"]["template"]["metadata"]["labels"]
    return [p for p in objects() if p["kind"] == "NetworkPolicy"
            and p["spec"]["podSelector"].get("matchLabels", {}).items() <= etcd_labels.items()
            and p["spec"]["podSelector"].get("matchLabels")]


def _rules_for(port: int) -> list[dict]:
    return [r for p in _etcd_policies() for r in p["spec"].get("ingress", [])
            if any(pt.get("port") == port for pt in r.get("ports", []))]


def test_etcd_ingress_only_from_zstore():
    """The bundled etcd is plain HTTP without client auth: a NetworkPolicy admits only
    zstore's pods (by label) and, for the hostNetwork chunk servers and redirectors, the
    node CIDR. No rule is open to everyone or to unlisted ports."""
    policies = _etcd_policies()
    assert policies, "no NetworkPolicy selects the etcd pods"
    assert all("Ingress" in p["spec"]["policyTypes"] for p in policies)
    labels = {wl: o["spec"]["template"]["metadata"]["labels"] for o in objects()
              if o["kind"] in ("Deployment", "DaemonSet", "StatefulSet") for wl in [o["metadata"]["name"]]}
    for p in policies:
        for rule in p["spec"].get("ingress", []):
            assert rule.get("from"), "an ingress rule without 'from' admits every pod"
            assert rule.get("ports") and {pt["port"] for pt in rule["ports"]} <= {2379, 2380}
            for peer in rule["from"]:
                assert "namespaceSelector" not in peer
                if "podSelector" in peer:
                    sel = peer["podSelector"]["matchLabels"].items()
                    assert any(sel <= l.items() for l in labels.values()), peer
                else:
                    assert peer["ipBlock"]["cidr"] != "0.0.0.0/0"
    specs = dict(pod_specs())
    for wl in ETCD_CLIENTS + ("zstore-etcd",):
        rules = _rules_for(2379)
        if specs[wl].get("hostNetwork"):
            assert any("ipBlock" in peer for r in rules for peer in r["from"]), wl
        else:
            assert any("podSelector" in peer and peer["podSelector"]["matchLabels"].items() <= labels[wl].items()
                       for r in rules for peer in r["from"]), wl
    for r in _rules_for(2380):     # peers: etcd members only
        for peer in r["from"]:
            assert peer["podSelector"]["matchLabels"].items() <= labels["zstore-etcd"].items()
    assert _rules_for(2380)


def test_etcd_security_is_documented():
    """The node-CIDR placeholder and the etcd client TLS settings are explained."""
    text = (KDIR / "README.md").read_text()
    cidrs = {peer["ipBlock"]["cidr"] for r in _rules_for(2379) for peer in r["from"] if "ipBlock" in peer}
    assert cidrs and all(c in text for c in cidrs)
    for key in ("ca_file", "cert_file", "key_file", "--client-cert-auth"):
        assert key in text, key


# --- 3: the node plugin starts only on a node with a usable initiator name ------------------

def _host_iscsi_check() -> tuple[dict, dict]:
    spec = dict(pod_specs())["zstore-csi-node"]
    inits = spec.get("initContainers", [])
    found = [c for c in inits if "/etc/iscsi/initiatorname.iscsi" in " ".join(c.get("command", []) + c.get("args", []))]
    assert len(found) == 1, "no initContainer checks the host's initiator name"
    return spec, found[0]


def test_etc_iscsi_must_exist():
    """DirectoryOrCreate made an empty /etc/iscsi on nodes without open-iscsi, and the plugin
    then crash-looped on a missing initiatorname.iscsi."""
    spec = dict(pod_specs())["zstore-csi-node"]
    vol = next(v for v in spec["volumes"] if v.get("hostPath", {}).get("path") == "/etc/iscsi")
    assert vol["hostPath"]["type"] == "Directory"


def test_init_container_runs_in_the_host_like_iscsiadm():
    spec, c = _host_iscsi_check()
    argv = c["command"] + c.get("args", [])
    # the same way into the host as the plugin's --host-cmd-prefix
    assert argv[:5] == ["nsenter", "-t", "1", "-a", "--"] and spec["hostPID"] is True
    assert c["securityContext"]["privileged"] is True
    script = argv[-1]
    assert "iscsid" in script and "enable --now" in script


def _run_check(tmp_path: Path, initiator: str | None, iscsid_active: bool, systemd: bool = True):
    import shutil
    import subprocess
    _, c = _host_iscsi_check()
    argv = c["command"] + c.get("args", [])
    assert argv[5:7] == ["sh", "-c"]
    name_file = tmp_path / "initiatorname.iscsi"
    if initiator is not None:
        name_file.write_text(initiator)
    sd = tmp_path / "run-systemd"
    if systemd:
        sd.mkdir(exist_ok=True)
    script = (argv[7].replace("/etc/iscsi/initiatorname.iscsi", str(name_file))
              .replace("/run/systemd/system", str(sd)))
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    for tool in ("grep", "sed", "head"):
        (bin_ / tool).symlink_to(shutil.which(tool))
    (bin_ / "iscsiadm").write_text("#!/bin/sh\nexit 0\n")
    log = tmp_path / "systemctl.log"
    (bin_ / "systemctl").write_text(f'#!/bin/sh\necho "$@" >> {log}\n'
                                    f'[ "$1" = is-active ] && exit {0 if iscsid_active else 3}\nexit 0\n')
    for f in ("iscsiadm", "systemctl"):
        (bin_ / f).chmod(0o755)
    r = subprocess.run([shutil.which("sh"), "-c", script], env={"PATH": str(bin_)},
                       capture_output=True, text=True, timeout=30)
    return r, (log.read_text() if log.exists() else "")


def test_init_container_refuses_a_node_without_initiator_name(tmp_path: Path):
    for i, content in enumerate([None, "", "## InitiatorName=iqn.x\n", "InitiatorName=\n"]):
        d = tmp_path / str(i)
        d.mkdir()
        r, _ = _run_check(d, content, iscsid_active=True)
        assert r.returncode != 0, content
        assert "InitiatorName=" in r.stderr and "own IQN" in r.stderr


def test_init_container_starts_iscsid_and_accepts_a_named_node(tmp_path: Path):
    (tmp_path / "a").mkdir()
    r, log = _run_check(tmp_path / "a", "InitiatorName=iqn.2004-10.com.ubuntu:01:abc\n", iscsid_active=False)
    assert r.returncode == 0, r.stderr
    assert "enable --now iscsid" in log and "iqn.2004-10.com.ubuntu:01:abc" in r.stdout
    (tmp_path / "b").mkdir()
    r, log = _run_check(tmp_path / "b", "InitiatorName=iqn.2004-10.com.ubuntu:01:abc\n", iscsid_active=True)
    assert r.returncode == 0 and "enable" not in log
    (tmp_path / "c").mkdir()
    r, log = _run_check(tmp_path / "c", "InitiatorName=iqn.x:1\n", iscsid_active=False, systemd=False)
    assert r.returncode == 0 and log == ""


def test_unique_iqn_documented():
    text = (KDIR / "README.md").read_text()
    assert "initiatorname.iscsi" in text and "unique" in text.lower()


# --- 4: a stopping chunk server has time to flush -------------------------------------------

CHUNK_STOP_SECONDS = 300     # what the chunk server's stop (sessions, flush of every extent) may take


def _seconds(value: str) -> float:
    import re
    total, units = 0.0, {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(num) * units[unit]
    return total


def test_chunk_stop_timeouts_cover_the_flush():
    """TimeoutStopSec=20 and terminationGracePeriodSeconds: 30 killed the chunk server in the
    middle of its shutdown flush, so its replicas had to resync as after a host crash."""
    u = unit("zstore-chunk.service")
    assert _seconds(u["TimeoutStopSec"][-1]) >= CHUNK_STOP_SECONDS
    assert u["KillSignal"][-1] == "SIGTERM"
    assert dict(pod_specs())["zstore-chunk"]["terminationGracePeriodSeconds"] >= CHUNK_STOP_SECONDS


def test_drain_before_reboot_documented():
    """SIGTERM does not move initiators off: the docs say to run `zstore chunk drain` and
    to give kubelet's graceful node shutdown at least the chunk pods' grace period."""
    import re
    text = (KDIR / "README.md").read_text()
    assert "zstore chunk drain" in text
    m = re.search(r"shutdownGracePeriodCriticalPods:\s*(\d+)s", text)
    assert m and int(m.group(1)) >= dict(pod_specs())["zstore-chunk"]["terminationGracePeriodSeconds"]
    total = re.search(r"shutdownGracePeriod:\s*(\d+)s", text)
    assert total and int(total.group(1)) > int(m.group(1))
    # The manifest no longer claims SIGTERM asks initiators to log out.
    assert "initiators are asked to log out" not in (KDIR / "chunk.yaml").read_text()


# --- 5: data-path pods are not BestEffort, and drains keep quorum ---------------------------

PRIORITY = {"zstore-chunk": "system-node-critical", "zstore-csi-node": "system-node-critical",
            "zstore-redirector": "system-cluster-critical", "zstore-meta": "system-cluster-critical",
            "zstore-etcd": "system-cluster-critical", "zstore-csi-controller": "system-cluster-critical"}


def test_priority_classes():
    specs = dict(pod_specs())
    assert set(specs) == set(PRIORITY)
    for wl, prio in PRIORITY.items():
        assert specs[wl].get("priorityClassName") == prio, wl


def test_every_container_requests_cpu_and_memory():
    """Without requests a pod is BestEffort: first evicted under memory pressure, with the
    chunk server's sessions and the VIP in it."""
    for wl, spec in pod_specs():
        for c in spec.get("initContainers", []) + spec["containers"]:
            req = (c.get("resources") or {}).get("requests") or {}
            assert {"cpu", "memory"} <= set(req), f"{wl}/{c['name']}"


def test_chunk_memory_limit_equals_request():
    res = next(c for c in dict(pod_specs())["zstore-chunk"]["containers"] if c["name"] == "chunk")["resources"]
    assert res["limits"]["memory"] == res["requests"]["memory"]
    assert "cpu" not in res.get("limits", {})       # CPU throttling would be I/O latency


def test_disruption_budgets():
    """etcd keeps its quorum, meta and the redirector one pod each, through node drains."""
    want = {"zstore-etcd": 2, "zstore-meta": 1, "zstore-redirector": 1}
    workloads = {o["metadata"]["name"]: o for o in objects() if o["kind"] in ("Deployment", "StatefulSet")}
    seen = {}
    for pdb in (o for o in objects() if o["kind"] == "PodDisruptionBudget"):
        sel = pdb["spec"]["selector"]["matchLabels"].items()
        (wl,) = [n for n, o in workloads.items() if sel <= o["spec"]["template"]["metadata"]["labels"].items()]
        seen[wl] = pdb["spec"]["minAvailable"]
        assert pdb["spec"]["minAvailable"] < workloads[wl]["spec"]["replicas"], wl   # drains can proceed
    assert seen == want
    etcd = workloads["zstore-etcd"]["spec"]["replicas"]
    assert seen["zstore-etcd"] == etcd // 2 + 1          # a quorum of the members


# --- 6: a redirector rollout keeps the VIP up -----------------------------------------------

def test_redirector_rolls_one_pod_at_a_time():
    """strategy Recreate stopped both redirectors at once: the VIP was down on every rollout.
    RollingUpdate without surge (a surge pod could not be placed: hostNetwork and required
    anti-affinity) replaces one while the other holds the VIP."""
    d = one("Deployment", "zstore-redirector")["spec"]
    assert d["replicas"] >= 2
    assert d["strategy"]["type"] == "RollingUpdate"
    assert d["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    anti = d["template"]["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti and anti[0]["topologyKey"] == "kubernetes.io/hostname"
    # A replacement gets time to join the VIP election before the other one goes.
    import tomllib
    ttl = tomllib.loads(one("ConfigMap", "zstore-config")["data"]["zstore.toml"])["redirector"]["lease_ttl"]
    assert d.get("minReadySeconds", 0) >= 3 * ttl


def test_vip_network_requirement_documented():
    text = (KDIR / "README.md").read_text()
    assert "gratuitous ARP" in text and "L2" in text and "VPC" in text
