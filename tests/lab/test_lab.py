"""Kernel lab tests: a stock Debian kernel under qemu (TCG) with open-iscsi, on a tap inside
a private network namespace. See tests/lab/README.md.

The image is built on first use and cached in $ZSTORE_LAB_DIR (default /tmp/zstore-lab);
build-image.sh is a no-op when it is up to date. Each test is bounded by a pytest timeout, and
the scripts are run in their own process group so that a timeout still tears down qemu, tgtd
and the netns through the scripts' own traps.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cluster import PY, Cluster, Etcd, Proc, free_port, port_open, wait_for, write_config

LAB = Path(__file__).resolve().parent
STATE = Path(os.environ.get("ZSTORE_LAB_DIR", "/tmp/zstore-lab"))
LOGS = STATE / "pytest-logs"
BUILD_TIMEOUT = 360      # from scratch: ~70 s plus apt downloads
VM_TIMEOUT = 240         # one TCG boot + test takes 20-40 s; generous for a loaded CI machine

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the kernel lab needs root (netns, tap, debootstrap)"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                       reason="qemu-system-x86_64 missing (apt-get install qemu-system-x86)"),
]


def run_script(name: str, argv: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run a lab script with its output in LOGS/name.log; return (exit status, output).

    On a timeout, or when pytest-timeout interrupts us, the script's process group gets SIGTERM
    first: the lab scripts trap it and stop what they started (qemu, tgtd, netns)."""
    LOGS.mkdir(parents=True, exist_ok=True)
    log_path = LOGS / f"{name}.log"
    with open(log_path, "wb") as log:
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env={**os.environ, "LAB_QUIET": "1", **(env or {})},
                             start_new_session=True)
        try:
            rc = p.wait(timeout)
        except BaseException:
            _stop_group(p)
            raise
    return rc, log_path.read_text(errors="replace")


def _stop_group(p: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 5)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def read_lun(portal: str, iqn: str, lun: int, image: Path, timeout: float = 120) -> Path:
    """The whole LUN into ``image``, through a target (qemu's iscsi driver is libiscsi)."""
    subprocess.run(["qemu-img", "convert", "-O", "raw", "--image-opts",
                    f"driver=iscsi,transport=tcp,portal={portal},target={iqn},lun={lun},"
                    f"initiator-name={HOST_IQN}", str(image)], check=True, timeout=timeout)
    return image


def ext4_file(image: Path, name: str) -> bytes:
    """A file's bytes from the ext4 filesystem in ``image`` (debugfs, no mount needed)."""
    out = image.with_name(image.name + "." + name.strip("/").replace("/", "_"))
    subprocess.run(["debugfs", "-R", f"dump {name} {out}", str(image)], check=True, capture_output=True,
                   timeout=60)
    return out.read_bytes()


def ext4_text(image: Path, name: str) -> str:
    """A small text file from the ext4 filesystem in ``image`` ("" if it is not there)."""
    return subprocess.run(["debugfs", "-R", f"cat {name}", str(image)], capture_output=True, text=True,
                          timeout=60).stdout


def tail(text: str, n: int = 60) -> str:
    return "\n".join(text.splitlines()[-n:])


def guest_log(out: str) -> str:
    """What the guest script printed (run-vm.sh names its run dir; the console there has the
    kernel's messages too, which is what to read when the guest did not get that far)."""
    for line in out.splitlines():
        if line.startswith("run-vm: run dir "):
            run = Path(line.split()[3])
            for f in (run / "job" / "guest.log", run / "console.log"):
                if f.exists():
                    return f.read_text(errors="replace")
    return ""


@pytest.fixture(scope="module")
def lab_image() -> Path:
    """The VM image, built if missing or stale (cached across runs in $ZSTORE_LAB_DIR)."""
    t0 = time.monotonic()
    rc, out = run_script("build-image", [str(LAB / "build-image.sh")], BUILD_TIMEOUT)
    assert rc == 0, f"build-image.sh failed ({rc}):\n{tail(out)}"
    print(f"lab image ready in {time.monotonic() - t0:.0f}s")
    return STATE / "image"


@pytest.mark.timeout(BUILD_TIMEOUT + VM_TIMEOUT + 60)
def test_kernel_initiator_against_reference_tgtd(lab_image):
    """Lab test 1 in tap mode: the guest's open-iscsi against Debian's tgtd in the lab netns
    (discovery, login, mkfs.ext4, mount, write/read, logout; then the host checks the LUN file).
    It proves the lab itself works, so a failure of the zstore test below is zstore's."""
    rc, out = run_script("initiator-tap", [str(LAB / "test-initiator.sh")], VM_TIMEOUT + 30,
                         env={"NET": "tap", "TIMEOUT": str(VM_TIMEOUT)})
    guest = guest_log(out)
    assert rc == 0 and "test-initiator (NET=tap): PASSED" in out, \
        f"rc={rc}\n--- guest:\n{tail(guest)}\n--- host:\n{tail(out)}"
    assert "initiator test PASSED" in guest


# ---- zstore's own target ---------------------------------------------------------------------
HOST_IP = os.environ.get("LAB_HOST_IP", "192.168.77.1")
PORTAL = f"{HOST_IP}:3260"
GUEST_IQN = "iqn.2026-01.io.zstore.lab:guest"     # the "Kubernetes node"
HOST_IQN = "iqn.2026-01.io.zstore.lab:host"       # the host-side read-back
CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def lab_netns(name: str):
    """A lab netns (lo + tap, see lab-netns.sh) that this thread works inside until the end.

    setns(2) moves only the calling thread: the sockets it opens and the processes it starts
    (etcd, meta, chunk server, CLI, qemu-img, run-vm.sh) live in the netns, where 127.0.0.1 is
    the netns's own loopback. So tests/cluster.py's helpers work unchanged, and nothing is ever
    bound outside the netns. The netns is removed after its processes are stopped."""
    subprocess.run([str(LAB / "lab-netns.sh"), "up", name], check=True, timeout=30)
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {name}")
        finally:
            os.close(fd)
        try:
            yield
        finally:
            if libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the host netns")
    finally:
        os.close(home)
        subprocess.run([str(LAB / "lab-netns.sh"), "down", name], timeout=30)


def start_chunk_at(c: Cluster, portal: str, i: int = 0) -> Proc:
    """Cluster.start_chunk, but with the iSCSI portal on the lab tap's address. Chunk servers
    replicate to each other on loopback; any of them serves any LUN. Each has a zone of its
    own, as there: replicas go to distinct failure domains, and these share one host."""
    data = c.workdir / f"chunk{i}"
    cfg = write_config(c.workdir / f"chunk{i}.toml", {
        "etcd": {"endpoints": [c.etcd.endpoint], "prefix": c.prefix},
        "chunk": {"data_dir": str(data), "disks": [f"{data}/disk0:4Gi"], "address": "127.0.0.1",
                  "data_port": free_port(), "portal": portal, "lease_ttl": c.lease_ttl,
                  "labels": {"zone": f"z{i}"}},
        "client": {"token_file": str(c.token_file)},
        "log": {"level": "DEBUG"},
    })
    p = Proc(f"chunk{i}", [PY, "-m", "chunk.server", "--config", str(cfg)],
             c.workdir / f"chunk{i}.log").start()
    c.chunks.append(p)
    return p


@pytest.mark.timeout(BUILD_TIMEOUT + VM_TIMEOUT + 180)
def test_kernel_initiator_against_zstore(lab_image, tmp_path):
    """The Linux kernel initiator against a zstore chunk server's built-in target.

    etcd, a meta server and a chunk server all run inside a lab netns (the chunk server's portal
    is the tap address there, etcd and meta on the netns's loopback). The guest logs in as a
    Kubernetes node would: SendTargets discovery, login, the disk found by its WWN under
    /dev/disk/by-id, mkfs.ext4, mount, a payload written and read back after a remount, logout.
    Then the host reads the whole LUN back through the target with qemu's libiscsi driver and
    finds the guest's file, byte for byte, in the ext4 image."""
    share = tmp_path / "share"
    share.mkdir()
    payload = os.urandom(8 << 20)
    (share / "payload").write_bytes(payload)
    ns = f"labz{os.getpid()}"
    with lab_netns(ns):
        etcd = Etcd(tmp_path / "etcd").start()
        c = Cluster(workdir=tmp_path / "cluster", etcd=etcd)
        try:
            c.start_meta()
            chunk = start_chunk_at(c, PORTAL)
            c.wait_chunks_up(1)
            wait_for(lambda: port_open(3260, HOST_IP) or not chunk.alive(), 20, "chunk server portal")
            assert chunk.alive(), chunk.log()
            c.cli("volume", "create", "labvol", "--size", "128Mi", "--replicas", "1", check=True)
            for iqn in (GUEST_IQN, HOST_IQN):
                c.cli("acl", "add", "labvol", iqn, check=True)
            vol = c.cli_json("volume", "show", "labvol")
            iqn, lun, wwn = vol["target_iqn"], vol["lun"], vol["wwn"]
            # the target answers (and its catalog has the ACL) before we spend a VM boot on it
            url = f"iscsi://{PORTAL}/{iqn}/{lun}"
            wait_for(lambda: subprocess.run(["iscsi-inq", "-i", HOST_IQN, url], capture_output=True,
                                            timeout=10).returncode == 0, 30, f"iscsi-inq {url}")

            rc, out = run_script("zstore-initiator", [
                str(LAB / "run-vm.sh"), "--netns", ns, "--share", str(share), "--timeout", str(VM_TIMEOUT),
                str(LAB / "zstore-guest.sh"), PORTAL, iqn, str(lun), wwn, GUEST_IQN], VM_TIMEOUT + 30)
            guest = guest_log(out)
            assert rc == 0 and "zstore initiator test PASSED" in guest, \
                f"rc={rc}\n--- guest:\n{tail(guest)}\n--- host:\n{tail(out)}\n--- chunk:\n{tail(chunk.log())}"

            # read the LUN back through the target (qemu's iscsi driver is libiscsi)
            image = read_lun(PORTAL, iqn, lun, tmp_path / "readback.img")
            assert image.stat().st_size == vol["size"]
            assert ext4_file(image, "/payload") == payload
            assert ext4_text(image, "/hello.txt") == "hello from the kernel initiator\n"
        finally:
            c.stop()
            etcd.stop()


# ---- failover through the redirector's VIP ---------------------------------------------------
VIP = PORTAL                                         # the redirector holds the tap address's 3260
FAILOVER_PORTALS = [f"{HOST_IP}:{port}" for port in (3261, 3262, 3263)]
STALL_LIMIT = 60.0       # the guest's replacement_timeout: I/O would fail past it


def failover_line(guest: str) -> dict[str, str]:
    """The guest's ``FAILOVER k=v ...`` summary."""
    line = next(l for l in guest.splitlines() if l.startswith("FAILOVER "))
    return dict(kv.split("=", 1) for kv in line.split()[1:])


def hook_log(out: str) -> str:
    for line in out.splitlines():
        if line.startswith("run-vm: run dir "):
            f = Path(line.split()[3]) / "hook.log"
            return f.read_text(errors="replace") if f.exists() else ""
    return ""


@dataclass
class VipMove:
    """What one VIP run saw: the guest's FAILOVER summary, the hook's record, the processes."""
    result: dict[str, str]
    hook: dict
    chunks: list[Proc]
    guest: str


def run_vip_move(tmp_path: Path, action: str) -> VipMove:
    """etcd, meta, three chunk servers and a redirector on the VIP in a lab netns; the guest
    logs in at the VIP and writes in a loop while the hook takes its chunk server away
    (``kill``: SIGKILL, ``drain``: ``zstore chunk drain``); the guest checks that the session
    moved and every byte verifies; the host then reads the payload back through the VIP."""
    share = tmp_path / "share"
    share.mkdir()
    payload = os.urandom(8 << 20)
    (share / "payload").write_bytes(payload)
    ns = f"labf{os.getpid()}"
    with lab_netns(ns):
        etcd = Etcd(tmp_path / "etcd").start()
        c = Cluster(workdir=tmp_path / "cluster", etcd=etcd)
        try:
            c.start_meta()
            pids = {portal: start_chunk_at(c, portal, i).pid for i, portal in enumerate(FAILOVER_PORTALS)}
            c.wait_chunks_up(3)
            for portal in FAILOVER_PORTALS:
                wait_for(lambda: port_open(int(portal.rsplit(":", 1)[1]), HOST_IP), 20, f"portal {portal}")
            redirector = c.start_redirector(HOST_IP, 3260)
            # three replicas: the chunk server the hook takes away holds one, the others carry on
            c.cli("volume", "create", "failvol", "--size", "128Mi", "--replicas", "3", check=True)
            for iqn in (GUEST_IQN, HOST_IQN):
                c.cli("acl", "add", "failvol", iqn, check=True)
            vol = c.cli_json("volume", "show", "failvol")
            iqn, lun, wwn = vol["target_iqn"], vol["lun"], vol["wwn"]
            # every chunk server and the redirector know the LUN before we spend a VM boot on it
            for where in [*FAILOVER_PORTALS, VIP]:
                url = f"iscsi://{where}/{iqn}/{lun}"
                wait_for(lambda: subprocess.run(["iscsi-inq", "-i", HOST_IQN, url], capture_output=True,
                                                timeout=10).returncode == 0, 30, f"iscsi-inq {url}")

            hook_out = tmp_path / "hook-result.json"
            spec = tmp_path / "hook.json"
            spec.write_text(json.dumps({"api": f"http://127.0.0.1:{c.meta_ports[0]}",
                                        "token_file": str(c.token_file), "initiator": GUEST_IQN,
                                        "pids": pids, "out": str(hook_out), "action": action}))
            hook = f"{PY} {LAB / 'session-holder-hook.py'} {spec}"
            rc, out = run_script(f"zstore-vip-{action}", [
                str(LAB / "run-vm.sh"), "--netns", ns, "--share", str(share), "--hook", hook,
                "--timeout", str(VM_TIMEOUT + 120), str(LAB / "zstore-failover-guest.sh"),
                VIP, iqn, str(lun), wwn, GUEST_IQN], VM_TIMEOUT + 150)
            guest = guest_log(out)
            logs = "\n".join(f"--- {p.name}:\n{tail(p.log(), 25)}" for p in [*c.chunks, redirector])
            assert rc == 0 and "zstore failover test PASSED" in guest, \
                f"rc={rc}\n--- guest:\n{tail(guest, 80)}\n--- hook:\n{hook_log(out)}\n--- host:\n{tail(out)}\n{logs}"
            moved = VipMove(failover_line(guest), json.loads(hook_out.read_text()), list(c.chunks), guest)
            assert moved.hook["portal"] == moved.result["portal_before"]
            assert moved.result["portal_after"] in FAILOVER_PORTALS
            assert moved.result["portal_after"] != moved.hook["portal"]

            # and the data is where any chunk server serves it: read back through the VIP
            image = read_lun(VIP, iqn, lun, tmp_path / "readback.img")
            assert ext4_file(image, "/payload") == payload
            assert ext4_text(image, "/after.txt") == "after failover\n"
            return moved
        finally:
            c.stop()
            etcd.stop()


@pytest.mark.timeout(BUILD_TIMEOUT + VM_TIMEOUT + 360)
def test_kernel_failover_through_vip(lab_image, tmp_path):
    """The kernel initiator survives losing its chunk server, through the redirector's VIP.

    etcd, a meta server, three chunk servers (portals 192.168.77.1:3261-3263, a volume with a
    replica on each) and a redirector holding the VIP 192.168.77.1:3260 run inside a lab netns. The guest
    discovers and logs in at the VIP only, is redirected to a chunk server, finds the LUN by
    WWN, makes ext4, copies a payload and starts an O_DIRECT write loop. Through the lab hook
    the host then finds which chunk server holds the guest's session (the session lists the
    chunk servers publish) and SIGKILLs it. open-iscsi reconnects to the VIP, the redirector
    (the dead server's lease gone) sends it to a live chunk server, the loop finishes, the
    filesystem stays read-write and every file verifies after a remount. The longest gap
    between two completed writes is the I/O stall, printed and bounded."""
    moved = run_vip_move(tmp_path, "kill")
    r = moved.result
    stall = float(r["stall"])
    print(f"\nfailover: session on {r['portal_before']} (SIGKILLed), then on {r['portal_after']}; "
          f"I/O stall {stall:.1f}s (median write {r['typical']}s, {r['writes']} writes)")
    assert stall < STALL_LIMIT
    assert not moved.chunks[FAILOVER_PORTALS.index(moved.hook["portal"])].alive()


@pytest.mark.timeout(BUILD_TIMEOUT + VM_TIMEOUT + 360)
def test_kernel_drain_moves_the_session_through_vip(lab_image, tmp_path):
    """``zstore chunk drain`` moves the kernel initiator off, as it moves libiscsi.

    The same set-up as the failover test, but the hook drains the chunk server holding the
    guest's session instead of killing it: the chunk server sends an Async Message asking for
    a logout, open-iscsi logs out, logs in again at the VIP (its persistent portal) and the
    redirector, which skips draining servers, sends it to another one, all while the write
    loop runs. open-iscsi honours the request, so the grace-period close never has to act."""
    moved = run_vip_move(tmp_path, "drain")
    r = moved.result
    print(f"\ndrain: session on {r['portal_before']} (drained), then on {r['portal_after']}; "
          f"longest write {float(r['stall']):.1f}s (median {r['typical']}s, {r['writes']} writes)")
    drained = moved.chunks[FAILOVER_PORTALS.index(moved.hook["portal"])]
    log = drained.log()
    assert drained.alive() or drained.popen.returncode == 0
    assert "draining: asking 1 sessions to log out" in log
    assert "did not log out" not in log
    assert float(r["stall"]) < STALL_LIMIT


# ---- the CSI node plugin ---------------------------------------------------------------------
CSI_PORTALS = [f"{HOST_IP}:3261"]


def csi_share(share: Path) -> None:
    """What the guest needs to run the plugin with the host's Python packages: the guest's
    python3 is Debian's 3.11 like the venv's, and Debian's grpcio is too old for the stubs.
    Hard links: instant, and 9p shows them as plain files."""
    import sysconfig
    site = Path(sysconfig.get_paths()["purelib"])
    subprocess.run(["cp", "-al", str(site), str(share / "site")], check=True)
    root = LAB.parent.parent
    for d in ("csi", "zstore"):
        shutil.copytree(root / d, share / "repo" / d, ignore=shutil.ignore_patterns("__pycache__"))
    (share / "repo" / "tests" / "lab").mkdir(parents=True)
    shutil.copy(LAB / "csi-node-client.py", share / "repo" / "tests" / "lab")


@pytest.mark.timeout(BUILD_TIMEOUT + VM_TIMEOUT + 700)   # seven plugin (re)starts: 3-6 min under TCG, more when loaded
def test_csi_node_lifecycle(lab_image, tmp_path):
    """The CSI node plugin attaches zstore volumes with the kernel initiator, as on a Kubernetes node.

    etcd, meta, a chunk server (192.168.77.1:3261) and a redirector on the VIP 192.168.77.1:3260
    run in a lab netns; three volumes (ext4, xfs, raw block) get the guest's IQN on their ACL
    before boot. In the guest, ``python -m csi.server --mode node`` runs on a unix socket and
    csi-node-client.py drives it like kubelet: NodeGetInfo must return the IQN from
    /etc/iscsi/initiatorname.iscsi; per volume NodeStage (discovery + login at the VIP, the disk
    found by WWN, mkfs, mount) twice, a plugin restart, NodePublish twice, an 8 MiB payload
    written, stats, (ext4: the host grows the volume through the lab hook and NodeExpandVolume
    grows the device and resize2fs the filesystem), NodeUnpublish + NodeUnstage twice each, after
    which the session and the disk are gone; then stage + readonly publish again must find the
    payload intact (no second mkfs) and a write refused. Finally two volumes (LUNs of one
    target) are staged together: unstaging one must keep the session the other still uses.

    CHAP: the host sets mutual CHAP for the ext4 volume's target and the guest's IQN (``zstore
    chap set``), and for target '*' (which zstore asks of SendTargets discovery) with other
    credentials, before boot. Staging it without secrets, with a wrong password or expecting
    another target secret (mutual) must fail with
    UNAUTHENTICATED and leave no session, node record or state file; with the secrets in the
    request it logs in. The lab hook (the ext4 resize) clears CHAP again, so the later stages
    log in without. The plugin is restarted between stage and publish and between publish and
    unpublish; a readonly raw block publish must refuse writes; at the end nothing is left:
    no session, node record, mount, SCSI disk or state file."""
    share = tmp_path / "share"
    share.mkdir()
    payload = os.urandom(8 << 20)
    (share / "payload").write_bytes(payload)
    csi_share(share)
    chap_secret, target_secret, disc_secret = (os.urandom(12).hex() for _ in range(3))
    ns = f"labc{os.getpid()}"
    with lab_netns(ns):
        etcd = Etcd(tmp_path / "etcd").start()
        c = Cluster(workdir=tmp_path / "cluster", etcd=etcd)
        try:
            c.start_meta()
            for i, portal in enumerate(CSI_PORTALS):
                start_chunk_at(c, portal, i)
            c.wait_chunks_up(len(CSI_PORTALS))
            for portal in CSI_PORTALS:
                wait_for(lambda: port_open(int(portal.rsplit(":", 1)[1]), HOST_IP), 20, f"portal {portal}")
            redirector = c.start_redirector(HOST_IP, 3260)
            volumes = []
            for kind in ("ext4", "xfs", "block"):
                name = f"csi-{kind}"
                size = "512Mi" if kind == "xfs" else "128Mi"      # mkfs.xfs 6.x wants more than 300 MB
                c.cli("volume", "create", name, "--size", size, "--replicas", "1", check=True)
                for iqn in (GUEST_IQN, HOST_IQN):
                    c.cli("acl", "add", name, iqn, check=True)
                v = c.cli_json("volume", "show", name)
                url = f"iscsi://{VIP}/{v['target_iqn']}/{v['lun']}"
                wait_for(lambda: subprocess.run(["iscsi-inq", "-i", HOST_IQN, url], capture_output=True,
                                                timeout=10).returncode == 0, 30, f"iscsi-inq {url}")
                # publish_context exactly as the Controller hands it over
                ctx = {"targetIQN": v["target_iqn"], "lun": str(v["lun"]), "wwn": v["wwn"], "portal": VIP}
                vol = {"id": v.get("volume_id") or name, "kind": kind, "ctx": ctx}
                if kind == "ext4":
                    vol["expand_to"] = 256 << 20
                    # mutual CHAP for this volume's target and the guest, and one-way CHAP for
                    # discovery (target '*', as deploy/kubernetes suggests); the hook clears both
                    (tmp_path / "chap-in").write_text(target_secret + "\n")
                    # CHAP is per target, which the other volumes share: named by its IQN
                    # (by volume name, `zstore chap` wants --whole-target once they exist)
                    ext4_target = v["target_iqn"]
                    for target, user, secret, mutual in (
                            (ext4_target, "csi-node", chap_secret, ["--mutual-user", "zstore-target",
                                                             "--mutual-secret-file", str(tmp_path / "chap-in")]),
                            ("*", "csi-disc", disc_secret, [])):
                        (tmp_path / "chap").write_text(secret + "\n")
                        c.cli("chap", "set", target, GUEST_IQN, "--user", user, "--secret-file",
                              str(tmp_path / "chap"), *mutual, check=True)
                    vol["secrets"] = {"node.session.auth.username": "csi-node",
                                      "node.session.auth.password": chap_secret,
                                      "node.session.auth.username_in": "zstore-target",
                                      "node.session.auth.password_in": target_secret,
                                      "discovery.sendtargets.auth.username": "csi-disc",
                                      "discovery.sendtargets.auth.password": disc_secret}
                volumes.append(vol)
            (share / "spec.json").write_text(json.dumps({
                "node_id": GUEST_IQN, "volumes": volumes,
                "plugin": ["python3", "-m", "csi.server", "--mode", "node", "--endpoint", "unix:///run/csi/csi.sock",
                           "--state-dir", "/var/lib/zstore-csi", "--device-timeout", "60"]}))
            hook = (f"cd {LAB.parent.parent} && ZSTORE_CONFIG={c.client_config} {PY} -m zstore.cli.main "
                    f"volume resize csi-ext4 --size 256Mi && ZSTORE_CONFIG={c.client_config} {PY} -m "
                    f"zstore.cli.main chap clear {ext4_target} {GUEST_IQN} && ZSTORE_CONFIG={c.client_config} {PY} "
                    f"-m zstore.cli.main chap clear '*' {GUEST_IQN}")
            rc, out = run_script("csi-node", [
                str(LAB / "run-vm.sh"), "--netns", ns, "--share", str(share), "--hook", hook,
                "--timeout", str(VM_TIMEOUT + 540), str(LAB / "csi-node-guest.sh"), GUEST_IQN], VM_TIMEOUT + 570)
            guest = guest_log(out)
            logs = "\n".join(f"--- {p.name}:\n{tail(p.log(), 25)}" for p in [*c.chunks, redirector])
            assert rc == 0 and "csi node test PASSED" in guest, \
                f"rc={rc}\n--- guest:\n{tail(guest, 120)}\n--- hook:\n{hook_log(out)}\n--- host:\n{tail(out)}\n{logs}"
            for kind in ("ext4", "xfs", "block", "shared target", "no leaks"):
                assert f"CSI NODE {kind} PASSED" in guest
            print("\n" + "\n".join(l for l in guest.splitlines() if l.startswith(("===", "CSI NODE", "expand:"))))
        finally:
            c.stop()
            etcd.stop()
