"""Host hook of test_lab_crash.py (run by run-vm.sh inside the lab netns): ``crash-hook.py SPEC``.

Phase ``crash`` (boot 1, the guest's chunk server is up): create the 1-replica volume (the
guest's chunk server is the only one registered, so it holds the replica), give the host's IQN
an ACL, then through the guest's portal with qemu-io (libiscsi):

1. write A (new extent 0) and C_old (extent 2), then SYNCHRONIZE CACHE (``flush``);
2. FUA writes of B (extent 1), in one session that stays open (qemu-io flushes when it closes);
3. in the same session an unflushed overwrite C_new of C_old; once it is acknowledged, the VM is
   SIGKILLed: the guest's page cache is lost, as in a host crash.

Phase ``readback`` (boot 2, the same chunk server on the same disk): read A, B and C back
through the guest's portal into files (``qemu-img dd``) for the test to compare.
Writes SPEC["out"] (JSON) with what it did; exits non-zero on any failure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

MiB = 1 << 20
# qemu-io's default cache mode is writethrough: the block layer would follow every write with a
# flush (or make it FUA), and nothing would be left unflushed. writeback sends what we say.
QEMU_IO = ["-t", "writeback", "--image-opts"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cli(spec: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([*spec["cli"], *args], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "ZSTORE_CONFIG": spec["client_config"]})
    if check and r.returncode:
        raise SystemExit(f"zstore {' '.join(args)}: {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def wait(cond, timeout: float, what: str, interval: float = 1.0):
    end = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def image_opts(spec: dict, out: dict) -> str:
    return (f"driver=iscsi,transport=tcp,portal={spec['portal']},target={out['iqn']},lun={out['lun']},"
            f"initiator-name={spec['initiator']}")


def wait_lun(spec: dict, out: dict, timeout: float) -> None:
    url = f"iscsi://{spec['portal']}/{out['iqn']}/{out['lun']}"
    wait(lambda: subprocess.run(["iscsi-inq", "-i", spec["initiator"], url], capture_output=True,
                                timeout=20).returncode == 0, timeout, f"iscsi-inq {url}", 2)


def crash(spec: dict, out: dict) -> None:
    t0 = time.monotonic()
    regions = spec["regions"]

    def create():
        r = cli(spec, "volume", "create", spec["volume"], "--size", spec["size"], "--replicas", "1",
                check=False)
        if r.returncode:
            log(f"volume create: {r.stderr.strip()[-200:]}")
        return r.returncode == 0
    wait(create, 300, "the guest's chunk server to be placeable", 3)
    cli(spec, "acl", "add", spec["volume"], spec["initiator"])
    vol = json.loads(cli(spec, "volume", "show", spec["volume"], "--json").stdout)
    out.update(iqn=vol["target_iqn"], lun=vol["lun"], volume_id=vol["volume_id"],
               placement=vol.get("placement"))
    log(f"volume {vol['volume_id']} target {vol['target_iqn']} lun {vol['lun']} placement {vol.get('placement')}")
    wait_lun(spec, out, 300)
    opts = image_opts(spec, out)

    # 1. A and C_old, then SYNCHRONIZE CACHE
    cmds = [f"write -s {regions['A']['file']} {regions['A']['offset']} {regions['A']['length']}",
            f"write -s {regions['C_old']['file']} {regions['C']['offset']} {regions['C']['length']}",
            "flush"]
    r = subprocess.run(["qemu-io", *QEMU_IO, opts, *sum((["-c", c] for c in cmds), [])],
                       capture_output=True, text=True, timeout=600)
    log(f"qemu-io (writes + flush) rc={r.returncode}\n{r.stdout}{r.stderr}")
    if r.returncode or r.stdout.count("wrote ") != 2 or r.stderr.strip():
        raise SystemExit("the flushed writes failed")
    out["flushed_at"] = time.monotonic() - t0

    # 2. + 3. FUA writes of B, then the unflushed overwrite C_new; the session stays open
    cmds = [f"write -f -s {piece['file']} {piece['offset']} {piece['length']}" for piece in regions["B"]["pieces"]]
    cmds += [f"write -s {regions['C_new']['file']} {regions['C']['offset']} {regions['C']['length']}",
             "sleep 3600000"]
    want = len(cmds) - 1
    qlog = Path(spec["workdir"]) / "qemu-io-open.log"
    with open(qlog, "w") as f:
        q = subprocess.Popen(["stdbuf", "-oL", "-eL", "qemu-io", *QEMU_IO, opts,
                              *sum((["-c", c] for c in cmds), [])], stdout=f, stderr=subprocess.STDOUT)
    try:
        def acked():
            text = qlog.read_text()
            if q.poll() is not None:
                raise SystemExit(f"qemu-io exited early ({q.returncode}):\n{text}")
            return text.count("wrote ") >= want
        wait(acked, 600, "the FUA and unflushed writes to be acknowledged", 0.2)
        log(f"qemu-io (FUA + unflushed, still open):\n{qlog.read_text()}")
        # 4. the host crash, as the guest sees it: qemu SIGKILLed, the guest's page cache gone
        pid = int(Path(os.environ["LAB_QEMU_PIDFILE"]).read_text())
        Path(os.environ["LAB_RUN"], "host-crash").touch()
        os.kill(pid, signal.SIGKILL)
        out["killed_at"] = time.monotonic() - t0
        log(f"SIGKILLed qemu (pid {pid}) {out['killed_at'] - out['flushed_at']:.1f}s after the flush")
    finally:
        q.kill()
        q.wait(10)
    out["crashed"] = True


def readback(spec: dict, out: dict) -> None:
    out.update(json.loads(Path(spec["boot1_out"]).read_text()))
    wait_lun(spec, out, 600)
    opts = image_opts(spec, out)
    reads = {}
    for name in ("A", "B", "C"):
        reg = spec["regions"][name]
        off, length = reg["offset"], reg["length"]
        assert off % MiB == 0 and length % MiB == 0
        dest = Path(spec["workdir"]) / f"read-{name}.bin"
        # qemu 7.2's dd counts skipped blocks in count: ask for skip+n, keep the first n
        r = subprocess.run(["qemu-img", "dd", "--image-opts", "-O", "raw", f"if={opts}", f"of={dest}",
                            f"bs={MiB}", f"skip={off // MiB}", f"count={(off + length) // MiB}"],
                           capture_output=True, text=True, timeout=600)
        reads[name] = {"rc": r.returncode, "stderr": r.stderr.strip(), "file": str(dest)}
        log(f"read {name} ({off}+{length}): rc={r.returncode} {r.stderr.strip()}")
    out["reads"] = reads


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out: dict = {"phase": spec["phase"]}
    try:
        (crash if spec["phase"] == "crash" else readback)(spec, out)
    finally:
        Path(spec["out"]).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
