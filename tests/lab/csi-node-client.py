"""Guest side of test_csi_node_lifecycle: drives the zstore CSI node plugin over its socket as
kubelet would, and checks the host's view (sessions, devices, mounts) after every step.

Runs with the guest's python3 and the host venv's site-packages on PYTHONPATH (see
csi-node-guest.sh). Args: a JSON file with the plugin command, the expected node id and the
volumes (id, publish_context, kind); prints "CSI NODE ... PASSED" lines and exits non-zero on
the first failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc

from csi import csi_pb2 as pb
from csi import csi_pb2_grpc as pbg

SOCK = "/run/csi/csi.sock"
Mode = pb.VolumeCapability.AccessMode
T0 = time.monotonic()


def step(msg: str) -> None:
    print(f"=== [{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def sh(cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise SystemExit(f"FAIL: {cmd}: exit {r.returncode}: {r.stderr}{r.stdout}")
    return r


class Plugin:
    def __init__(self, argv: list[str]):
        self.argv = argv
        self.proc: subprocess.Popen | None = None

    def start(self) -> pbg.NodeStub:
        log = open("/tmp/plugin.log", "ab")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        # short reconnect backoff: the socket appears only once the new process is up, and
        # gRPC's default backoff would keep waiting seconds after that
        ch = grpc.insecure_channel(f"unix:{SOCK}", options=[
            ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 500)])
        grpc.channel_ready_future(ch).result(timeout=120)
        print(f"plugin up in {time.monotonic() - t0:.1f}s", flush=True)
        return pbg.NodeStub(ch)

    def stop(self) -> None:
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.terminate()
        self.proc.wait(30)
        print(f"plugin stopped in {time.monotonic() - t0:.1f}s", flush=True)


def cap(kind: str, ro: bool = False) -> pb.VolumeCapability:
    c = pb.VolumeCapability(access_mode=Mode(mode=Mode.SINGLE_NODE_READER_ONLY if ro else Mode.SINGLE_NODE_WRITER))
    if kind == "block":
        c.block.SetInParent()
    else:
        c.mount.fs_type = kind
    return c


def mounted(path: str) -> bool:
    return sh(f"mountpoint -q '{path}'", check=False).returncode == 0


def sessions() -> str:
    r = sh("iscsiadm -m session", check=False)
    return r.stdout if r.returncode == 0 else ""


def records() -> str:
    """``iscsiadm -m node``: the node records (a CHAP password would be kept in one)."""
    r = sh("iscsiadm -m node", check=False)
    return r.stdout if r.returncode == 0 else ""


def refused(call, code: grpc.StatusCode) -> str:
    """Run a call that must fail with ``code``; return the error's details."""
    try:
        call()
    except grpc.RpcError as e:
        assert e.code() == code, f"{e.code()} ({e.details()}), expected {code}"
        return e.details()
    raise SystemExit(f"FAIL: the call succeeded, expected {code}")


def without_secrets(req):
    out = type(req)()
    out.CopyFrom(req)
    out.ClearField("secrets")
    return out


def sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    plugin = Plugin(spec["plugin"])
    node = plugin.start()
    payload = Path("/share/payload").read_bytes()
    want = hashlib.sha256(payload).hexdigest()

    step("NodeGetInfo / NodeGetCapabilities")
    info = node.NodeGetInfo(pb.NodeGetInfoRequest())
    assert info.node_id == spec["node_id"], info
    caps = node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest())
    print(f"node_id={info.node_id} caps={[c.rpc.type for c in caps.capabilities]}", flush=True)

    for vol in spec["volumes"]:
        vid, kind, ctx = vol["id"], vol["kind"], vol["ctx"]
        staging = f"/var/lib/kubelet/plugins/kubernetes.io/csi/csi.zstore.io/{vid}/globalmount"
        target = f"/var/lib/kubelet/pods/pod-{vid}/volumes/kubernetes.io~csi/pv/mount"
        byid = f"/dev/disk/by-id/wwn-0x{ctx['wwn'].lower().removeprefix('0x')}"
        Path(staging).mkdir(parents=True, exist_ok=True)
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        stage = pb.NodeStageVolumeRequest(volume_id=vid, staging_target_path=staging,
                                          volume_capability=cap(kind), publish_context=ctx,
                                          secrets=vol.get("secrets", {}))
        publish = pb.NodePublishVolumeRequest(volume_id=vid, staging_target_path=staging, target_path=target,
                                              volume_capability=cap(kind), publish_context=ctx)

        if vol.get("secrets"):
            step(f"[{kind}] CHAP required: partial secrets, no secrets, wrong passwords are refused")
            partial = pb.NodeStageVolumeRequest()
            partial.CopyFrom(stage)
            del partial.secrets["node.session.auth.password"]
            print("partial:", refused(lambda: node.NodeStageVolume(partial), grpc.StatusCode.INVALID_ARGUMENT))
            wrong = pb.NodeStageVolumeRequest()
            wrong.CopyFrom(stage)
            wrong.secrets["node.session.auth.password"] = "wrong-password-0123"
            cases = [("no secrets", without_secrets(stage)), ("wrong password", wrong)]
            if "node.session.auth.password_in" in stage.secrets:
                wrong_in = pb.NodeStageVolumeRequest()
                wrong_in.CopyFrom(stage)
                wrong_in.secrets["node.session.auth.password_in"] = "wrong-password-4567"
                cases.append(("mutual: the target does not know the secret we expect", wrong_in))
            for label, req in cases:
                why = refused(lambda: node.NodeStageVolume(req), grpc.StatusCode.UNAUTHENTICATED)
                print(f"{label}: UNAUTHENTICATED {why}", flush=True)
                assert "wrong-password" not in why and not any(v in why for v in vol["secrets"].values())
                assert ctx["targetIQN"] not in sessions(), f"{label}: session left: {sessions()}"
                assert ctx["targetIQN"] not in records(), f"{label}: node record left: {records()}"
                assert not Path(f"/var/lib/zstore-csi/{vid}.json").exists(), f"{label}: state file left"
                assert not os.path.exists(byid) and not mounted(staging)

        step(f"[{kind}] NodeStageVolume (twice: idempotent){' with CHAP' if vol.get('secrets') else ''}")
        node.NodeStageVolume(stage)
        node.NodeStageVolume(stage)
        assert ctx["targetIQN"] in sessions(), sessions()
        assert os.path.exists(byid), byid
        if kind != "block":
            assert mounted(staging), staging
            fs = sh(f"findmnt -n -o FSTYPE '{staging}'").stdout.strip()
            assert fs == kind, fs
        print(sh("iscsiadm -m session -P 3").stdout, flush=True)

        step(f"[{kind}] plugin restart between stage and publish")
        plugin.stop()
        node = plugin.start()

        step(f"[{kind}] NodePublishVolume (twice) + write {len(payload)} bytes")
        node.NodePublishVolume(publish)
        node.NodePublishVolume(publish)
        assert mounted(target), target
        if kind == "block":
            with open(target, "r+b") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
        else:
            Path(target, "payload").write_bytes(payload)
            sh(f"sync '{target}/payload'")
            stats = node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=target))
            print("stats:", [(u.unit, u.total, u.used, u.available) for u in stats.usage], flush=True)
            assert stats.usage[0].used >= len(payload)

        if vol.get("expand_to"):
            step(f"[{kind}] host grows the volume to {vol['expand_to']}; NodeExpandVolume")
            before = int(sh(f"blockdev --getsize64 {byid}").stdout)
            rc = sh(". /job/lib.sh; lab_host_hook 120", check=False)
            assert rc.returncode == 0, f"host hook failed: {rc.stdout}{rc.stderr}"
            r = node.NodeExpandVolume(pb.NodeExpandVolumeRequest(
                volume_id=vid, volume_path=target, staging_target_path=staging, volume_capability=cap(kind),
                capacity_range=pb.CapacityRange(required_bytes=vol["expand_to"])))
            after = int(sh(f"blockdev --getsize64 {byid}").stdout)
            stats = node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=target))
            print(f"expand: device {before} -> {after} (response {r.capacity_bytes}); "
                  f"fs total {stats.usage[0].total}", flush=True)
            assert after == vol["expand_to"] == r.capacity_bytes
            if kind != "block":
                assert stats.usage[0].total > before, "the filesystem did not grow"

        if kind != "xfs":   # (the mount path is ext4's; a restart costs 20-50 s under TCG)
            step(f"[{kind}] plugin restart between publish and unpublish")
            plugin.stop()
            node = plugin.start()

        step(f"[{kind}] NodeUnpublishVolume (twice) + NodeUnstageVolume (twice)")
        node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target))
        node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target))
        assert not os.path.exists(target), target
        node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=staging))
        node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=staging))
        sh("udevadm settle")
        assert not mounted(staging)
        assert ctx["targetIQN"] not in sessions(), f"session still there: {sessions()}"
        assert ctx["targetIQN"] not in records(), f"node record still there: {records()}"
        assert not os.path.exists(byid), f"{byid} still there"

        # (for the CHAP volume the lab hook has cleared CHAP on the target: no secrets now)
        step(f"[{kind}] stage + publish readonly again: the data survived (no second mkfs)")
        sh("echo 3 > /proc/sys/vm/drop_caches")
        node.NodeStageVolume(without_secrets(stage))
        ro = pb.NodePublishVolumeRequest()
        ro.CopyFrom(publish)
        ro.readonly = True
        node.NodePublishVolume(ro)
        if kind == "block":
            # a ro bind mount does not stop writes to a device node: the plugin sets the disk ro
            assert sh(f"blockdev --getro {byid}").stdout.strip() == "1", "readonly publish: disk not ro"
            try:
                with open(target, "r+b") as f:
                    f.write(b"\0" * 4096)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                print(f"readonly raw block: write refused ({e})", flush=True)
            else:
                raise SystemExit("FAIL: readonly raw block publish is writable")
            with open(target, "rb") as f:
                got = hashlib.sha256(f.read(len(payload))).hexdigest()
        else:
            got = sha(f"{target}/payload")
            assert sh(f"touch '{target}/x'", check=False).returncode != 0, "readonly publish is writable"
        assert got == want, f"checksum {got} != {want}"
        node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target))
        if kind == "block":
            assert sh(f"blockdev --getro {byid}").stdout.strip() == "0", "disk still ro after unpublish"
        node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=staging))
        sh("udevadm settle")
        assert ctx["targetIQN"] not in sessions(), f"session still there: {sessions()}"
        print(f"CSI NODE {kind} PASSED (sha256 {want[:16]})", flush=True)

    step("two volumes of one target staged at once: unstaging one keeps the other's session")
    both = spec["volumes"][:2]
    for vol in both:
        assert vol["ctx"]["targetIQN"] == both[0]["ctx"]["targetIQN"], "expected LUNs of one target"
        node.NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id=vol["id"], staging_target_path=f"/tmp/both-{vol['id']}", volume_capability=cap(vol["kind"]),
            publish_context=vol["ctx"]))
    print(sh("iscsiadm -m session -P 3 | grep -E 'SID|Attached scsi disk'").stdout, flush=True)
    node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=both[0]["id"],
                                                       staging_target_path=f"/tmp/both-{both[0]['id']}"))
    assert both[0]["ctx"]["targetIQN"] in sessions(), "unstaging one LUN logged the other out"
    assert sha(f"/tmp/both-{both[1]['id']}/payload") == want
    node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=both[1]["id"],
                                                       staging_target_path=f"/tmp/both-{both[1]['id']}"))
    sh("udevadm settle")
    assert not sessions(), f"session left after the last unstage: {sessions()}"
    print("CSI NODE shared target PASSED", flush=True)
    plugin.stop()

    step("nothing leaked: sessions, node records, mounts, SCSI disks, state files")
    assert not sessions(), sessions()
    assert not records(), f"node records left: {records()}"
    left = [m for m in sh("findmnt -rn -o TARGET").stdout.split()
            if m.startswith(("/var/lib/kubelet", "/tmp/both-"))]
    assert not left, f"mounts left: {left}"
    wwids = sh("cat /sys/block/sd*/device/wwid 2>/dev/null", check=False).stdout.lower()
    for vol in spec["volumes"]:
        wwn = vol["ctx"]["wwn"].lower().removeprefix("0x")
        assert wwn not in wwids, f"SCSI disk of {vol['id']} left: {wwids}"
        assert not os.path.exists(f"/dev/disk/by-id/wwn-0x{wwn}")
    state = list(Path("/var/lib/zstore-csi").glob("*"))
    assert not state, f"state files left: {state}"
    print("CSI NODE no leaks PASSED", flush=True)


if __name__ == "__main__":
    main()
