"""Kernel lab: the storage engine's durability contract across a host crash (docs/storage.md,
"Durability contract": after FUA or SYNCHRONIZE CACHE an acknowledged write has been
fdatasync'd on every in-sync replica, so it survives a host crash).

Until now only SIGKILL of a chunk server process was tested, which keeps the page cache. Here the
chunk server runs in the VM, its whole state on an ext4 file system on an extra virtio disk (a
host file, ``run-vm.sh --disk``); SIGKILLing qemu loses the guest's page cache and leaves ext4
unclean, exactly what a power cut does to the guest. The guest turns off periodic and background
writeback, so nothing the chunk server did not sync can reach the disk by chance.
etcd and meta run in the lab netns on the host (192.168.77.1); the guest half is
crash-chunk-guest.sh, the host hook crash-hook.py.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.cluster import PY, ROOT, write_config
from tests.lab.test_lab import (BUILD_TIMEOUT, HOST_IQN, LAB, LOGS, guest_log, hook_log, lab_image,
                                lab_netns, run_script, tail)
from tests.lab.test_lab_lio import HostSide, make_share

__all__ = ["lab_image"]        # the fixture, shared with test_lab.py

GUEST_IP = os.environ.get("LAB_GUEST_IP", "192.168.77.2")
PORTAL = f"{GUEST_IP}:3262"
VM_TIMEOUT = 900           # one boot + chunk server start + the I/O: 1-4 min under TCG on a loaded host
MiB = 1 << 20
EXTENT = 64 * MiB
DISK_SIZE = 1024 * MiB

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the kernel lab needs root (netns, tap, debootstrap)"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 missing"),
    pytest.mark.skipif(shutil.which("iscsi-inq") is None, reason="iscsi-inq missing (libiscsi-bin)"),
    pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io missing (qemu-utils, qemu-block-extra)"),
]


class ControlPlane(HostSide):
    """HostSide's etcd and meta on the tap address, without its chunk server: the guest's
    chunk server is the only one, so the volume's replica is placed there."""

    def start(self) -> None:
        self.start_control_plane()


def payloads(d: Path) -> dict:
    """Where each payload goes (distinct 64 MiB extents: a FLUSH fdatasyncs whole extent files,
    so the unflushed overwrite must not share one with a flushed or FUA write)."""
    d.mkdir()
    regions: dict = {"A": {"offset": 0, "length": 8 * MiB},          # new extent 0, then flush
                     "B": {"offset": EXTENT, "length": 4 * MiB},     # extent 1, FUA writes only
                     "C": {"offset": 2 * EXTENT, "length": 8 * MiB}}  # extent 2: C_old flushed, C_new not
    for name, length in (("A", 8 * MiB), ("C_old", 8 * MiB), ("C_new", 8 * MiB)):
        (d / name).write_bytes(os.urandom(length))
        regions.setdefault(name, {})["file"] = str(d / name)
    regions["B"]["pieces"] = []
    for i in range(4):
        f = d / f"B{i}"
        f.write_bytes(os.urandom(MiB))
        regions["B"]["pieces"].append({"file": str(f), "offset": EXTENT + i * MiB, "length": MiB})
    return regions


@pytest.mark.timeout(BUILD_TIMEOUT + 2 * VM_TIMEOUT + 300)
def test_flushed_writes_survive_a_host_crash(lab_image, tmp_path):
    """An acknowledged write survives a host crash of its only replica's server once flushed.

    Boot 1: the guest makes ext4 on the extra disk and runs a chunk server with its data dir
    (chunk id, disks, extents) there. The host creates a 1-replica volume (on that server, the
    only one) and, through its portal with qemu-io: writes A and C_old, SYNCHRONIZE CACHE; FUA
    writes B; an unflushed overwrite C_new of C_old; once that is acknowledged, SIGKILLs qemu.
    Boot 2: the same disk (ext4 replays its journal), the same chunk server; the host reads back.

    Asserted:
    * A (flushed) and B (FUA) read back byte for byte: the contract under test;
    * C reads without error, and every 4 KiB block of it is C_old or C_new, nothing else: a
      write not yet flushed may be lost or kept, but never surfaces as garbage or as a medium
      error. (extent_file.py can only detect, not repair, a block torn between .data and .crc;
      with one replica that would be a read error. Here no writeback runs between the flush and
      the crash, so C_new is expected lost whole and no block can tear.)
    * not all of C_new survived: the crash really dropped what was not flushed, so the
      survival of A and B is due to the flush and FUA, not to a crash that lost nothing;
    * the guest saw ext4 recover its journal on boot 2: the file system was not cleanly unmounted.
    """
    share = tmp_path / "share"
    share.mkdir()
    disk = tmp_path / "chunk-disk.raw"
    with open(disk, "wb") as f:
        f.truncate(DISK_SIZE)
    regions = payloads(tmp_path / "payloads")
    ns = f"labk{os.getpid()}"
    t_start = time.monotonic()
    with lab_netns(ns):
        host = ControlPlane(tmp_path / "cluster")
        try:
            host.start()
            make_share(share, host, {})
            write_config(share / "chunk-crash.toml", host.chunk_config(
                "/mnt/crash/zs", GUEST_IP, 7501, PORTAL, "/share/token", "builtin", "768Mi", 5))
            base = {"cli": [PY, "-m", "zstore.cli.main"], "client_config": str(host.client_config),
                    "portal": PORTAL, "initiator": HOST_IQN, "volume": "crashvol", "size": "256Mi",
                    "regions": regions, "workdir": str(tmp_path)}
            outs = {}
            for phase, boot in (("crash", "boot1"), ("readback", "boot2")):
                spec = tmp_path / f"hook-{phase}.json"
                outs[phase] = tmp_path / f"hook-{phase}.out.json"
                spec.write_text(json.dumps({**base, "phase": phase, "out": str(outs[phase]),
                                            "boot1_out": str(outs["crash"])}))
                hook = f"cd {ROOT} && {PY} {LAB / 'crash-hook.py'} {spec}"
                t0 = time.monotonic()
                rc, out = run_script(f"zstore-crash-{boot}-{ns}", [
                    str(LAB / "run-vm.sh"), "--netns", ns, "--share", str(share), "--disk", str(disk),
                    "--hook", hook, "--timeout", str(VM_TIMEOUT), str(LAB / "crash-chunk-guest.sh"), boot],
                    VM_TIMEOUT + 60)
                guest = guest_log(out)
                detail = (f"rc={rc}\n--- guest:\n{tail(guest, 80)}\n--- hook:\n{hook_log(out)}\n"
                          f"--- host:\n{tail(out)}\n{host.logs()}")
                if phase == "crash":
                    assert rc == 137 and "VM hard-killed by the host hook" in out, detail
                    assert json.loads(outs[phase].read_text()).get("crashed"), detail
                    print(f"\nboot 1 (writes, then the crash): {time.monotonic() - t0:.0f}s")
                else:
                    assert rc == 0 and "zstore crash test boot2 PASSED" in guest, detail
                    print(f"boot 2 (recovery, read-back): {time.monotonic() - t0:.0f}s")
            assert "recovery complete" in guest, f"ext4 did not replay its journal on boot 2:\n{tail(guest, 60)}"
            ids = [line.split()[1] for line in guest_log_all(ns) if line.startswith("CHUNK_ID ")]
            assert len(ids) == 2 and ids[0] == ids[1], f"boot 2 is not the same chunk server: {ids}"

            back = json.loads(outs["readback"].read_text())
            reads = back["reads"]
            got = {}
            for name in ("A", "B", "C"):
                r = reads[name]
                assert r["rc"] == 0, f"reading {name} after the crash failed: {r['stderr']}\n{hook_log(out)}"
                got[name] = Path(r["file"]).read_bytes()[:regions[name]["length"]]
                assert len(got[name]) == regions[name]["length"], name
            assert got["A"] == Path(regions["A"]["file"]).read_bytes(), \
                "data written and then SYNCHRONIZE CACHE'd was lost or damaged by the host crash"
            b = b"".join(Path(p["file"]).read_bytes() for p in regions["B"]["pieces"])
            assert got["B"] == b, "data written with FUA was lost or damaged by the host crash"
            old, new = Path(regions["C_old"]["file"]).read_bytes(), Path(regions["C_new"]["file"]).read_bytes()
            kept = lost = 0
            for i in range(0, len(old), 4096):
                blk = got["C"][i:i + 4096]
                if blk == new[i:i + 4096]:
                    kept += 1
                elif blk == old[i:i + 4096]:
                    lost += 1
                else:
                    raise AssertionError(f"C block at +{i}: neither the old nor the new data after the crash")
            assert lost > 0, "every unflushed block survived: the crash did not drop the guest's page cache"
            print(f"flushed A {len(got['A']) >> 20} MiB and FUA B {len(got['B']) >> 20} MiB intact; "
                  f"unflushed C_new: {kept} blocks kept, {lost} lost (old data); chunk ids {ids}; "
                  f"total {time.monotonic() - t_start:.0f}s")
        finally:
            host.stop()


def guest_log_all(ns: str) -> list[str]:
    """The lines both boots' guests printed (the run logs name their run dirs)."""
    lines: list[str] = []
    for boot in ("boot1", "boot2"):
        f = LOGS / f"zstore-crash-{boot}-{ns}.log"
        if f.exists():
            lines += guest_log(f.read_text(errors="replace")).splitlines()
    return lines
