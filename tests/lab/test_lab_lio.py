"""Kernel lab: a zstore chunk server with ``--frontend lio`` in the VM exports volumes through
the kernel's LIO target, their data served by the chunk engine through TCMU. See
tests/lab/README.md; the guest half is lio-zstore-guest.sh.

etcd, a meta server and a chunk server holding every replica run in a lab netns on the host, on
its tap address 192.168.77.1 (the guest reaches them there). The volumes are made before the VM
boots, so their replicas are on the host's chunk server and outlive the VM. In the guest, one chunk
server runs with the LIO frontend (portal 192.168.77.2:3260) and one with the built-in target
(192.168.77.2:3262), for conformance counts and figures side by side from the same VM.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

from tests.cluster import ETCD, PY, ROOT, Proc, free_port, port_open, wait_for, write_config
from tests.conformance import INITIATOR, INITIATOR_2
from tests.lab.test_lab import (BUILD_TIMEOUT, GUEST_IQN, HOST_IP, HOST_IQN, LAB, ext4_file, ext4_text,
                                guest_log, hook_log, lab_image, lab_netns, read_lun, run_script, tail)

__all__ = ["lab_image"]        # the fixture, shared with test_lab.py

GUEST_IP = os.environ.get("LAB_GUEST_IP", "192.168.77.2")
LIO_PORTAL = f"{GUEST_IP}:3260"
BUILTIN_PORTAL = f"{GUEST_IP}:3262"
HOST_PORTAL = f"{HOST_IP}:3261"
EXTRA_IQN = "iqn.2026-01.io.zstore.lab:extra"
VM_TIMEOUT = 2700         # boot and start ~3 min, conformance ~12, the rest ~8 (TCG, loaded host)
# the suites run against both targets: I/O, atomics, provisioning, and what LIO's core answers
# itself for a TCMU device (persistent reservations). WriteSame10 passes 10/10 on LIO too but
# takes ~4 min per target under TCG; Unmap.Simple (~1500 commands at QD1) does not finish in
# 5 min on LIO under TCG (the per-command latency, see the figures). LAB_LIO_SUITES=A,B picks others.
SUITES = os.environ.get("LAB_LIO_SUITES", ",".join([
    "SCSI.Inquiry", "SCSI.ReadCapacity16", "SCSI.TestUnitReady", "SCSI.Read10", "SCSI.Write10",
    "SCSI.CompareAndWrite", "SCSI.ModeSense6",
    "SCSI.PrinReadKeys", "SCSI.ProutRegister"])).split(",")
VOLUMES = {                # name: (size, initiators on its ACL; HOST_IQN read-only)
    "lio-data": ("128Mi", [GUEST_IQN, HOST_IQN]),
    "lio-bench": ("256Mi", [GUEST_IQN]),
    "bi-bench": ("256Mi", [GUEST_IQN]),
    "lio-conf": ("64Mi", [INITIATOR, INITIATOR_2]),
    "bi-conf": ("64Mi", [INITIATOR, INITIATOR_2]),
}

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the kernel lab needs root (netns, tap, debootstrap)"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 missing"),
    pytest.mark.skipif(shutil.which("iscsi-test-cu") is None, reason="iscsi-test-cu missing (libiscsi-bin)"),
]


class HostSide:
    """etcd, meta and one chunk server on the tap address inside the lab netns."""

    def __init__(self, workdir: Path):
        self.w = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.prefix = f"/lio-{os.getpid()}"
        self.token_file = workdir / "token"
        self.token_file.write_text(os.urandom(16).hex() + "\n")
        self.etcd_port, self.meta_port = free_port(HOST_IP), free_port(HOST_IP)
        self.etcd_ep = f"{HOST_IP}:{self.etcd_port}"
        self.meta_url = f"http://{HOST_IP}:{self.meta_port}"
        self.procs: list[Proc] = []

    def start(self) -> None:
        self.start_control_plane()
        cfg = write_config(self.w / "chunk-host.toml", self.chunk_config(
            str(self.w / "chunk-host"), HOST_IP, free_port(HOST_IP), HOST_PORTAL, str(self.token_file), "builtin"))
        self.chunk = Proc("chunk-host", [PY, "-m", "chunk.server", "--config", str(cfg)],
                          self.w / "chunk-host.log").start()
        self.procs.append(self.chunk)

    def start_control_plane(self) -> None:
        """etcd and the meta server on the tap address, and the CLI's client config."""
        url, peer = f"http://{self.etcd_ep}", f"http://127.0.0.1:{free_port()}"
        etcd = Proc("etcd", [ETCD, "--name", "lab", "--data-dir", str(self.w / "etcd-data"),
                             "--listen-client-urls", url, "--advertise-client-urls", url,
                             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                             "--initial-cluster", f"lab={peer}", "--log-level", "warn"],
                    self.w / "etcd.log").start()
        self.procs.append(etcd)
        wait_for(lambda: port_open(self.etcd_port, HOST_IP) or not etcd.alive(), 20, "etcd")
        meta = write_config(self.w / "meta.toml", {
            "etcd": {"endpoints": [self.etcd_ep], "prefix": self.prefix},
            "meta": {"listen": f"{HOST_IP}:{self.meta_port}", "advertise_url": self.meta_url,
                     "token_file": str(self.token_file), "lease_ttl": 3, "meta_id": "meta0"}})
        m = Proc("meta0", [PY, "-m", "meta.server", "--config", str(meta)], self.w / "meta0.log").start()
        self.procs.append(m)
        wait_for(lambda: port_open(self.meta_port, HOST_IP) or not m.alive(), 30, "meta")
        assert m.alive(), m.log()
        self.client_config = write_config(self.w / "client.toml", {
            "client": {"endpoints": [self.meta_url], "token_file": str(self.token_file), "timeout": 20.0},
            "etcd": {"endpoints": [self.etcd_ep], "prefix": self.prefix}})

    def chunk_config(self, data_dir: str, address: str, data_port: int, portal: str, token: str,
                     frontend: str, capacity: str = "4Gi", lease_ttl: int = 3) -> dict:
        return {"etcd": {"endpoints": [self.etcd_ep], "prefix": self.prefix},
                "chunk": {"data_dir": data_dir, "disks": [f"{data_dir}/disk0:{capacity}"], "address": address,
                          "data_port": data_port, "portal": portal, "lease_ttl": lease_ttl, "frontend": frontend},
                "client": {"endpoints": [self.meta_url], "token_file": token},
                "log": {"level": "INFO"}}

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([PY, "-m", "zstore.cli.main", *args], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "ZSTORE_CONFIG": str(self.client_config)}, timeout=60)
        if check and r.returncode:
            raise AssertionError(f"zstore {' '.join(args)}: {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}:\n{tail(p.log(), 30)}" for p in self.procs[1:])

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


def make_share(share: Path, host: HostSide, spec: dict) -> None:
    """The host venv's site-packages (hard links), our packages, the guest's configs."""
    site = Path(sysconfig.get_paths()["purelib"])
    subprocess.run(["cp", "-al", str(site), str(share / "site")], check=True)
    for d in ("chunk", "zstore"):
        shutil.copytree(ROOT / d, share / "repo" / d, ignore=shutil.ignore_patterns("__pycache__"))
    (share / "repo" / "tests" / "lab").mkdir(parents=True)
    shutil.copy(LAB / "lio-bench.py", share / "repo" / "tests" / "lab")
    shutil.copy(host.token_file, share / "token")
    write_config(share / "client.toml", {"client": {"endpoints": [host.meta_url], "token_file": "/share/token"},
                                         "etcd": {"endpoints": [host.etcd_ep], "prefix": host.prefix}})
    write_config(share / "chunk-lio.toml", host.chunk_config(
        "/var/tmp/zs-lio", GUEST_IP, 7500, LIO_PORTAL, "/share/token", "lio", "1Gi", 10))
    write_config(share / "chunk-builtin.toml", host.chunk_config(
        "/var/tmp/zs-builtin", GUEST_IP, 7501, BUILTIN_PORTAL, "/share/token", "builtin", "1Gi", 10))
    (share / "spec.json").write_text(json.dumps(spec))


def bench(guest: str) -> dict[str, dict[str, str]]:
    out = {}
    for line in guest.splitlines():
        if line.startswith("BENCH "):
            label, *kvs = line.split()[1:]
            out[label] = dict(kv.split("=", 1) for kv in kvs)
    return out


@pytest.mark.timeout(BUILD_TIMEOUT + VM_TIMEOUT + 300)
def test_lio_frontend_through_tcmu(lab_image, tmp_path):
    """LIO + TCMU, configured from etcd, data through the chunk engine; proven with the kernel.

    * LIO shows the target, its portal, the LUNs (each on a ``user:`` backstore zs-<volume id>)
      and the ACLs from etcd, with masking (the guest does not see the conformance LUN);
    * iscsi-test-cu from the host runs the same suites against the LIO LUN and against the
      built-in target of a second chunk server in the same VM; both counts are printed;
    * the guest's kernel initiator logs in to LIO over loopback, mkfs.ext4, mount, a payload
      written, remounted with caches dropped and its sha256 checked;
    * ``zstore acl add`` / ``chap set`` / ``acl remove`` change LIO's NodeACLs (and CHAP) live,
      and a deleted volume's LUN, backstore and uio device go while the others stay;
    * figures: 4 KiB random and 1 MiB sequential O_DIRECT I/O, LIO+TCMU vs the built-in target;
    * restarting the LIO chunk server leaves every LIO object as it was (no duplicates), a
      foreign target and backstore are untouched, and the open session works on;
    * after the VM is gone, the host reads the volume back through its own chunk server's
      built-in target (qemu-img, read-only ACL) and finds the payload byte for byte."""
    share = tmp_path / "share"
    share.mkdir()
    payload = os.urandom(8 << 20)
    (share / "payload").write_bytes(payload)
    ns = f"labl{os.getpid()}"
    with lab_netns(ns):
        host = HostSide(tmp_path / "cluster")
        try:
            host.start()
            wait_for(lambda: port_open(3261, HOST_IP) or not host.chunk.alive(), 60, "host chunk server portal")
            assert host.chunk.alive(), host.logs()
            luns, vids, iqn = {}, {}, None
            for name, (size, initiators) in VOLUMES.items():
                host.cli("volume", "create", name, "--size", size, "--replicas", "1")
                for init in initiators:
                    host.cli("acl", "add", name, init, *(["--readonly"] if init == HOST_IQN else []))
                v = json.loads(host.cli("volume", "show", name, "--json").stdout)
                luns[name], vids[name], iqn = v["lun"], v["volume_id"], v["target_iqn"]
            assert len({json.loads(host.cli("volume", "show", n, "--json").stdout)["target_iqn"]
                        for n in VOLUMES}) == 1, "the lab expects every volume on one target"
            url = f"iscsi://{HOST_PORTAL}/{iqn}/{luns['lio-data']}"
            wait_for(lambda: subprocess.run(["iscsi-inq", "-i", HOST_IQN, url], capture_output=True,
                                            timeout=10).returncode == 0, 60, f"iscsi-inq {url}")
            make_share(share, host, {"target_iqn": iqn, "guest_iqn": GUEST_IQN, "extra_iqn": EXTRA_IQN,
                                     "lio_portal": LIO_PORTAL, "builtin_portal": BUILTIN_PORTAL, "luns": luns,
                                     "vids": vids})
            conf_out = tmp_path / "conformance.json"
            hook_spec = tmp_path / "hook.json"
            hook_spec.write_text(json.dumps({
                "urls": {"lio": f"iscsi://{LIO_PORTAL}/{iqn}/{luns['lio-conf']}",
                         "builtin": f"iscsi://{BUILTIN_PORTAL}/{iqn}/{luns['bi-conf']}"},
                "suites": SUITES, "out": str(conf_out), "workdir": str(tmp_path / "cu"), "timeout": 300}))
            hook = f"cd {ROOT} && {PY} {LAB / 'lio-conformance-hook.py'} {hook_spec}"
            rc, out = run_script(f"zstore-lio-{ns}", [      # its own log: CI may run it meanwhile
                str(LAB / "run-vm.sh"), "--netns", ns, "--share", str(share), "--hook", hook, "--mem", "3072",
                "--timeout", str(VM_TIMEOUT), str(LAB / "lio-zstore-guest.sh")], VM_TIMEOUT + 60)
            guest = guest_log(out)
            assert rc == 0 and "zstore lio test PASSED" in guest, \
                f"rc={rc}\n--- guest:\n{tail(guest, 150)}\n--- hook:\n{hook_log(out)}\n--- host:\n{tail(out)}\n{host.logs()}"

            # the conformance counts, side by side
            conf = json.loads(conf_out.read_text())
            rows = [f"{'suite':28} {'LIO+TCMU':>10} {'built-in':>10}"]
            for suite in SUITES:
                cells = [conf[label].get(suite, {}) for label in ("lio", "builtin")]
                rows.append(f"{suite:28} " + " ".join(f"{sum(c.values()):>4}/{len(c):<5}" for c in cells))
                assert all(cells), f"{suite} did not run against both targets: {hook_log(out)}"
            totals = {label: (sum(sum(r.values()) for r in conf[label].values()),
                              sum(len(r) for r in conf[label].values())) for label in ("lio", "builtin")}
            rows.append(f"{'total':28} " + " ".join(f"{p:>4}/{n:<5}" for p, n in totals.values()))
            failed = sorted(f"{label} {t}" for label in conf for r in conf[label].values() for t, ok in r.items() if not ok)
            figures = bench(guest)
            assert set(figures) == {"lio", "builtin"}, guest
            print("\niscsi-test-cu from the host (passed/run):\n" + "\n".join(rows))
            print("failing tests:\n  " + "\n  ".join(failed or ["none"]))
            print("O_DIRECT in the guest, LIO+TCMU vs the built-in target (same VM, same run):")
            for label in ("lio", "builtin"):
                f = figures[label]
                print(f"  {label:8} 4k randwrite {f['rand4k_write_iops']:>6} IOPS  4k randread {f['rand4k_read_iops']:>6} IOPS"
                      f"  1M seqwrite {f['seq1m_write_MiBps']:>6} MiB/s  1M seqread {f['seq1m_read_MiBps']:>6} MiB/s")
            for line in guest.splitlines():
                if line.startswith(("LIO_OBJECTS", "LIO_DELETE", "LIO_RESTART", "CHAP on ACL", "LUN ")) \
                        or "served" in line:
                    print(line)
            assert totals["lio"][0] > 0

            # the data is in the volume: read it back through the host's own chunk server
            image = read_lun(HOST_PORTAL, iqn, luns["lio-data"], tmp_path / "readback.img", timeout=300)
            assert ext4_file(image, "/payload") == payload
            for name, text in (("hello.txt", "written through LIO and TCMU\n"), ("after.txt", "after restart\n")):
                assert ext4_text(image, f"/{name}") == text, name
        finally:
            host.stop()
