"""deploy/kubernetes offline: every object against the Kubernetes OpenAPI schemas
(kubernetes-validate ships them per release), and the references between objects."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
kv = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
KDIR = ROOT / "deploy" / "kubernetes"
DRIVER = "csi.zstore.io"
# The oldest release we claim to run on and the newest the package knows.
K8S_VERSIONS = ["1.30.0", kv.utils.latest_version()]
# Not in the core OpenAPI: kustomize's own file, and the snapshot CRD (checked by hand below).
NO_SCHEMA = {("kustomize.config.k8s.io/v1beta1", "Kustomization"),
             ("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass")}


def manifests() -> list[Path]:
    return sorted(p for p in KDIR.glob("*.yaml") if p.name != "kustomization.yaml")


def objects() -> list[dict]:
    return [o for p in manifests() for o in yaml.safe_load_all(p.read_text()) if o]


def by_kind(kind: str) -> list[dict]:
    return [o for o in objects() if o["kind"] == kind]


def pod_specs() -> list[tuple[str, dict]]:
    return [(o["metadata"]["name"], o["spec"]["template"]["spec"])
            for o in objects() if o["kind"] in ("Deployment", "DaemonSet", "StatefulSet")]


def one(kind: str, name: str) -> dict:
    found = [o for o in by_kind(kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def container(workload: str, name: str) -> dict:
    spec = dict(pod_specs())[workload]
    return next(c for c in spec["containers"] if c["name"] == name)


def test_kustomization_lists_every_manifest():
    k = yaml.safe_load((KDIR / "kustomization.yaml").read_text())
    assert sorted(k["resources"]) == sorted(p.name for p in manifests())
    assert k["namespace"] == "zstore"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", manifests(), ids=lambda p: p.name)
def test_schema(path: Path, version: str):
    for obj in yaml.safe_load_all(path.read_text()):
        if obj and (obj["apiVersion"], obj["kind"]) not in NO_SCHEMA:
            # strict: unknown fields (typos such as mountpropagation) fail too
            kv.validate(obj, version, strict=True)


def test_schema_catches_mistakes():
    """The validator is really checking: a typo'd field and a wrong type are refused."""
    bad = one("Deployment", "zstore-meta")
    bad = {**bad, "spec": {**bad["spec"], "replica": 2}}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSIONS[-1], strict=True)
    with pytest.raises(kv.ValidationError):
        kv.validate({**one("CSIDriver", DRIVER), "spec": {"attachRequired": "yes"}}, K8S_VERSIONS[-1])


def test_volume_snapshot_class():
    (vsc,) = by_kind("VolumeSnapshotClass")
    assert vsc["apiVersion"] == "snapshot.storage.k8s.io/v1"
    assert vsc["driver"] == DRIVER and vsc["deletionPolicy"] in ("Delete", "Retain")
    assert set(vsc) <= {"apiVersion", "kind", "metadata", "driver", "deletionPolicy", "parameters"}


def test_csidriver():
    spec = one("CSIDriver", DRIVER)["spec"]
    assert spec == {"attachRequired": True, "podInfoOnMount": False, "fsGroupPolicy": "File",
                    "volumeLifecycleModes": ["Persistent"]}


def test_storage_classes():
    classes = by_kind("StorageClass")
    assert {c["parameters"]["csi.storage.k8s.io/fstype"] for c in classes} >= {"ext4", "xfs"}
    for c in classes:
        assert c["provisioner"] == DRIVER
        assert c["allowVolumeExpansion"] is True and c["reclaimPolicy"] == "Delete"
        assert 1 <= int(c["parameters"]["replicas"]) <= 3      # what the controller accepts


def test_chap_storage_class_names_a_secret_the_node_plugin_accepts():
    """node-stage-secret-name/namespace name an existing Secret whose keys make a CHAP config."""
    from csi.chap import from_secrets
    chap_classes = [c for c in by_kind("StorageClass")
                    if "csi.storage.k8s.io/node-stage-secret-name" in c["parameters"]]
    assert chap_classes, "no StorageClass with a node-stage secret"
    for c in chap_classes:
        p = c["parameters"]
        sec = one("Secret", p["csi.storage.k8s.io/node-stage-secret-name"])
        assert sec["metadata"]["namespace"] == p["csi.storage.k8s.io/node-stage-secret-namespace"]
        session, discovery = from_secrets(sec["stringData"])
        assert session is not None and session.username and session.password
        assert discovery is not None


def test_namespaced_objects_are_in_zstore():
    cluster_scoped = {"Namespace", "CSIDriver", "StorageClass", "VolumeSnapshotClass",
                      "ClusterRole", "ClusterRoleBinding"}
    for o in objects():
        if o["kind"] not in cluster_scoped:
            assert o["metadata"].get("namespace") == "zstore", f"{o['kind']}/{o['metadata']['name']}"


def test_references_exist():
    names = {(o["kind"], o["metadata"]["name"]) for o in objects()}
    claims = {wl["metadata"]["name"]: {t["metadata"]["name"] for t in wl["spec"].get("volumeClaimTemplates", [])}
              for wl in objects() if wl["kind"] == "StatefulSet"}
    for wl, spec in pod_specs():
        assert ("ServiceAccount", spec["serviceAccountName"]) in names, wl
        for v in spec.get("volumes", []):
            if "configMap" in v:
                assert ("ConfigMap", v["configMap"]["name"]) in names, wl
            if "secret" in v:
                assert ("Secret", v["secret"]["secretName"]) in names, wl
        mounts = {m["name"] for c in spec["containers"] for m in c.get("volumeMounts", [])}
        assert mounts <= {v["name"] for v in spec.get("volumes", [])} | claims.get(wl, set()), wl
    for b in by_kind("ClusterRoleBinding") + by_kind("RoleBinding"):
        kind = b["roleRef"]["kind"]
        assert (kind, b["roleRef"]["name"]) in names
        for s in b["subjects"]:
            assert ("ServiceAccount", s["name"]) in names
    for svc in by_kind("Service"):
        selected = [w for w in objects() if w["kind"] in ("Deployment", "StatefulSet")
                    and svc["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert selected, f"Service {svc['metadata']['name']} selects nothing"
    for sts in by_kind("StatefulSet"):
        assert ("Service", sts["spec"]["serviceName"]) in names


def test_sidecars_as_documented():
    """Every sidecar is pinned, from registry.k8s.io, talks to the plugin's socket, and
    the controller ones elect a leader (two replicas run)."""
    for wl in ("zstore-csi-controller", "zstore-csi-node"):
        for c in dict(pod_specs())[wl]["containers"]:
            if c["name"] == "zstore-csi":
                continue
            image = c["image"]
            assert image.startswith("registry.k8s.io/sig-storage/"), image
            assert re.search(r":v\d+\.\d+\.\d+$", image), f"{image} is not pinned"
            assert "--csi-address=/csi/csi.sock" in c["args"]
            if wl == "zstore-csi-controller" and c["name"] != "liveness-probe":
                assert "--leader-election" in c["args"], c["name"]
    ctl = {c["name"] for c in dict(pod_specs())["zstore-csi-controller"]["containers"]}
    assert ctl == {"zstore-csi", "csi-provisioner", "csi-attacher", "csi-resizer",
                   "csi-snapshotter", "liveness-probe"}


def _socket_dir(c: dict) -> str:
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/csi")
    return mount["name"]


def test_socket_paths_agree():
    for wl in ("zstore-csi-controller", "zstore-csi-node"):
        spec = dict(pod_specs())[wl]
        driver = container(wl, "zstore-csi")
        assert "--endpoint=unix:///csi/csi.sock" in driver["args"]
        # All containers share one volume at /csi, so the paths name the same socket.
        assert len({_socket_dir(c) for c in spec["containers"]}) == 1
    # kubelet finds the node plugin where the registrar says it is, which is the hostPath.
    reg = container("zstore-csi-node", "node-driver-registrar")
    (path,) = [a.split("=", 1)[1] for a in reg["args"] if a.startswith("--kubelet-registration-path=")]
    socket_dir = next(v for v in dict(pod_specs())["zstore-csi-node"]["volumes"] if v["name"] == "socket-dir")
    assert path == socket_dir["hostPath"]["path"] + "/csi.sock"
    assert f"/plugins/{DRIVER}/" in path


def test_node_plugin_privileges():
    spec = dict(pod_specs())["zstore-csi-node"]
    assert spec["hostNetwork"] and spec["hostPID"]
    c = container("zstore-csi-node", "zstore-csi")
    assert c["securityContext"]["privileged"] is True
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/var/lib/kubelet"]["mountPropagation"] == "Bidirectional"
    assert {"/dev", "/sys", "/lib/modules", "/etc/iscsi"} <= set(mounts)
    assert "--host-cmd-prefix=nsenter -t 1 -a --" in c["args"]


def test_config_map_is_a_valid_zstore_config():
    from zstore import config as zconfig
    text = one("ConfigMap", "zstore-config")["data"]["zstore.toml"]
    data = tomllib.loads(text)
    cfg = zconfig.Config()
    for section, values in data.items():
        for key, value in values.items():
            cfg.set(section, key, value)          # unknown keys or bad types raise
    # The token is the Secret's key, mounted where the config says.
    secret = one("Secret", "zstore-token")
    assert "token" in secret["stringData"]
    for wl in ("zstore-meta", "zstore-csi-controller"):
        spec = dict(pod_specs())[wl]
        vol = next(v["name"] for v in spec["volumes"] if v.get("secret", {}).get("secretName") == "zstore-token")
        mount = next(m for c in spec["containers"] for m in c.get("volumeMounts", []) if m["name"] == vol)
        assert cfg.client.token_file == cfg.meta.token_file == mount["mountPath"] + "/token"
    assert cfg.redirector.vip and cfg.redirector.interface


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion, with made-up values for the downward API."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), text)


FAKE_DOWNWARD = {"POD_IP": "10.1.2.3", "NODE_IP": "10.0.0.21", "NODE_NAME": "node-a", "POD_NAME": "x-0"}


def test_driver_flags_are_accepted():
    """The zstore-csi args in both workloads parse with the real server's parser."""
    from csi.server import arg_parser
    for wl, mode in (("zstore-csi-controller", "controller"), ("zstore-csi-node", "node")):
        c = container(wl, "zstore-csi")
        args = arg_parser().parse_args([_expand(a, FAKE_DOWNWARD) for a in c["args"]])
        assert args.mode == mode and args.endpoint == "unix:///csi/csi.sock"
        assert args.config.startswith(next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "config"))
    # The controller's metrics port is the one the pod declares.
    c = container("zstore-csi-controller", "zstore-csi")
    args = arg_parser().parse_args(c["args"])
    assert {p["containerPort"] for p in c["ports"]} >= {args.metrics_port}
    node = arg_parser().parse_args(container("zstore-csi-node", "zstore-csi")["args"])
    mounts = {m["mountPath"] for m in container("zstore-csi-node", "zstore-csi")["volumeMounts"]}
    assert node.state_dir in mounts        # staged-volume facts survive a restart


def test_commands_are_our_console_scripts():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for wl, spec in pod_specs():
        for c in spec["containers"]:
            if c["image"].startswith("zstore:"):
                assert c["command"][0] in scripts, f"{wl}/{c['name']}"


def test_pod_configs_load(tmp_path: Path):
    """zstore.toml plus each pod's ZSTORE_* env loads as the daemon would load it."""
    from zstore import config as zconfig
    path = tmp_path / "zstore.toml"
    path.write_text(one("ConfigMap", "zstore-config")["data"]["zstore.toml"])
    for wl, spec in pod_specs():
        for c in spec["containers"]:
            env = {e["name"]: _expand(e["value"], FAKE_DOWNWARD) for e in c.get("env", []) if "value" in e}
            for name in env:
                if name.startswith("ZSTORE_"):
                    section = name[len("ZSTORE_"):].split("_", 1)[0].lower()
                    assert section in ("etcd", "meta", "chunk", "redirector", "client", "log"), name
            cfg = zconfig.load(path, env=env)          # unknown keys or bad values raise
            if wl == "zstore-meta":
                assert cfg.meta.advertise_url == "http://10.1.2.3:7490"
            if wl == "zstore-chunk":
                assert cfg.chunk.address == "10.0.0.21" and cfg.chunk.portal == "10.0.0.21:3261"
                assert cfg.chunk.labels == {"host": "node-a"}
                assert cfg.chunk.data_dir in {m["mountPath"] for m in c["volumeMounts"]}


# Which config sections' *_file settings each daemon reads: found in its package's source
# (``cfg.<section>.<key>_file``), plus etcd's TLS files (zstore/etcd.py, every daemon) and,
# for the CSI driver, the client section (``Meta.from_config`` -> zstore/cli/client.py).
_DAEMON_PACKAGE = {"zstore-meta": "meta", "zstore-chunk": "chunk",
                   "zstore-redirector": "redirector", "zstore-csi": "csi"}
_ALWAYS_READ = {("etcd", "ca_file"), ("etcd", "cert_file"), ("etcd", "key_file")}
_ALSO_READ = {"csi": {("client", "token_file"), ("client", "ca_file")}}
# ... but a node plugin (--mode=node) talks to no etcd and no meta API (csi/server.py main).
_NODE_PLUGIN_READS: set[tuple[str, str]] = set()


def _files_read(package: str, args: list[str] = ()) -> set[tuple[str, str]]:
    if package == "csi" and "--mode=node" in args:
        return set(_NODE_PLUGIN_READS)
    found = set(_ALWAYS_READ) | _ALSO_READ.get(package, set())
    for py in (ROOT / package).rglob("*.py"):
        found |= set(re.findall(r"cfg\.([a-z_]+)\.([a-z_]+_file)\b", py.read_text()))
    return found


def test_every_file_a_daemon_reads_is_mounted(tmp_path: Path):
    """A path in zstore.toml that a pod's daemon reads (token, TLS) lies on one of that
    container's volume mounts: the chunk DaemonSet once lacked the token secret, and every
    chunk pod failed at start with "cannot read meta token file"."""
    from zstore import config as zconfig
    path = tmp_path / "zstore.toml"
    path.write_text(one("ConfigMap", "zstore-config")["data"]["zstore.toml"])
    assert ("client", "token_file") in _files_read("chunk")       # the scan finds what it must
    checked = 0
    for wl, spec in pod_specs():
        for c in spec["containers"]:
            package = _DAEMON_PACKAGE.get(c.get("command", [""])[0])
            if package is None:
                continue
            env = {e["name"]: _expand(e["value"], FAKE_DOWNWARD) for e in c.get("env", []) if "value" in e}
            cfg = zconfig.load(path, env=env)
            mounts = [m["mountPath"].rstrip("/") + "/" for m in c.get("volumeMounts", [])]
            for section, key in sorted(_files_read(package, c.get("args", []))):
                value = getattr(getattr(cfg, section), key)
                if value:
                    checked += 1
                    assert any(value.startswith(m) for m in mounts), \
                        f"{wl}/{c['name']} reads {section}.{key} = {value}, which no volume mounts"
    assert checked >= 3          # meta, chunk and the CSI pods all read the token
