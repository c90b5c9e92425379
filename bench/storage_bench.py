#!/usr/bin/env python3
"""zstore's replicated storage engine side by side with Debian's tgtd: same machine, same run.

Two reports, one run:

1. Snapshot create time on a 1 GiB and a 1 TiB thin volume, each with 64 MiB
   written first (1 MiB at 64 offsets spread over the volume), several
   snapshots each with 1 MiB more written before every one (so each snapshot
   goes through the coordinator's write barrier), timed at the meta API
   (``POST /api/v1/volumes/{name}/snapshots``, what ``zstore snapshot create``
   sends). Snapshots are metadata only, so the two columns must be level: the
   ratio 1 TiB / 1 GiB is printed.
2. 4 KiB random write IOPS at QD1 and QD32, 1 MiB sequential write MiB/s and
   4 KiB random read IOPS at QD32 for volumes with 1, 2 and 3 replicas on a
   local 3-chunk-server cluster (``zstore up --chunks 3``: etcd, a meta, 3
   chunk servers, all on loopback), each line measured right after the same
   line against a private tgtd (file-backed LUN in the same work dir), with
   zstore/tgtd ratios. Dirty pages are written back (``sync``) before every
   timed line of every column (``--between``).

Tools: random writes come from a small libiscsi initiator driven through
ctypes (``IscsiLoad`` below: neither qemu-img bench nor iscsi-perf does
random writes, and Debian's fio has no libiscsi engine); random reads from
libiscsi's iscsi-perf; 1 MiB sequential writes from qemu-img bench (qemu's
libiscsi driver). Same initiator, same tool, for both columns.

    python bench/storage_bench.py              # full run (~4-5 min)
    python bench/storage_bench.py --quick      # smoke: 128 MiB volumes, 2 s per line

Exit status: 0 report printed (whatever the numbers say), 1 a target or tool
failed, 2 bad arguments, 130 on Ctrl-C. Every process started here is stopped
and the work dir removed on the way out.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import random
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from iscsi_bench import (INITIATOR, KiB, MiB, GiB, PATTERN, BenchError, Metric, Target,  # noqa: E402
                         Tgtd, Zstore, free_ports, iscsi_perf, machine, parse_size, qemu_bench, run,
                         say, wait_for, wait_login)

TiB = 1 << 40
TOOLS = ("tgtd", "tgtadm", "iscsi-perf", "iscsi-inq", "qemu-img", "qemu-io")
REPLICAS = (1, 2, 3)
STOP_REQUESTED = False                 # set by on_signal


# -- a libiscsi initiator for random writes -----------------------------------------

_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


def _libiscsi() -> ctypes.CDLL:
    """libiscsi.so.7, the library iscsi-perf and qemu use; prototypes from libiscsi 1.19's iscsi.h."""
    name = ctypes.util.find_library("iscsi") or "libiscsi.so.7"
    try:
        lib = ctypes.CDLL(name)
    except OSError as e:
        raise BenchError(f"cannot load libiscsi ({name}): {e}; apt-get install libiscsi7") from None
    vp, c, i, u32, u64 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_uint64
    for fn, res, args in (
            ("iscsi_create_context", vp, [c]), ("iscsi_destroy_context", i, [vp]),
            ("iscsi_set_targetname", i, [vp, c]), ("iscsi_set_session_type", i, [vp, i]),
            ("iscsi_set_header_digest", i, [vp, i]), ("iscsi_full_connect_sync", i, [vp, c, i]),
            ("iscsi_logout_sync", i, [vp]), ("iscsi_get_error", c, [vp]),
            ("iscsi_get_fd", i, [vp]), ("iscsi_which_events", i, [vp]), ("iscsi_service", i, [vp, i]),
            ("scsi_free_scsi_task", None, [vp]),
            ("iscsi_write16_task", vp, [vp, i, u64, vp, u32, i, i, i, i, i, i, _CB, vp]),
            ("iscsi_read16_task", vp, [vp, i, u64, u32, i, i, i, i, i, i, _CB, vp])):
        f = getattr(lib, fn)
        f.restype, f.argtypes = res, args
    return lib


class IscsiLoad:
    """Keep ``depth`` WRITE(16)/READ(16) commands in flight on one session for ``seconds``.

    The completion callback frees the task and submits the next one, so the
    queue never drains; ``iscsi_service`` runs whenever the socket is ready.
    The Python callback costs a few microseconds per command, the same in
    both columns (check it with ``--calibrate``: random reads through this and
    through iscsi-perf against tgtd).
    """

    def __init__(self, t: Target, volume_size: int):
        self.t, self.volume_size = t, volume_size
        self.lib = _libiscsi()
        self.ctx = self.lib.iscsi_create_context(INITIATOR.encode())
        if not self.ctx:
            raise BenchError("iscsi_create_context failed")
        self.lib.iscsi_set_targetname(self.ctx, t.iqn.encode())
        self.lib.iscsi_set_session_type(self.ctx, 2)          # ISCSI_SESSION_NORMAL
        self.lib.iscsi_set_header_digest(self.ctx, 0)         # ISCSI_HEADER_DIGEST_NONE
        if self.lib.iscsi_full_connect_sync(self.ctx, t.portal.encode(), t.lun) != 0:
            err = self.error()
            self.lib.iscsi_destroy_context(self.ctx)
            raise BenchError(f"libiscsi login to {t.url}: {err}")

    def error(self) -> str:
        return (self.lib.iscsi_get_error(self.ctx) or b"?").decode(errors="replace")

    def close(self) -> None:
        if not STOP_REQUESTED:                            # logging out waits on the target
            self.lib.iscsi_logout_sync(self.ctx)
        self.lib.iscsi_destroy_context(self.ctx)

    def rate(self, size: int, depth: int, seconds: float, write: bool = True, rand: bool = True) -> float:
        """Commands completed per second over ``seconds`` (in flight at the end: not counted)."""
        lib, bs = self.lib, self.t.block_size
        slots = self.volume_size // size
        buf = ctypes.create_string_buffer(bytes([PATTERN]) * size, size)
        rng = random.Random(1)
        st = {"done": 0, "bad": 0, "inflight": 0, "seq": 0, "stop": False, "status": 0}

        def submit() -> None:
            if rand:
                slot = rng.randrange(slots)
            else:
                slot, st["seq"] = st["seq"] % slots, st["seq"] + 1
            lba = slot * (size // bs)
            if write:
                task = lib.iscsi_write16_task(self.ctx, self.t.lun, lba, buf, size, bs, 0, 0, 0, 0, 0, cb, None)
            else:
                task = lib.iscsi_read16_task(self.ctx, self.t.lun, lba, size, bs, 0, 0, 0, 0, 0, cb, None)
            if not task:
                raise BenchError(f"cannot queue a command: {self.error()}")
            st["inflight"] += 1

        def on_done(ctx, status, task, private) -> None:
            lib.scsi_free_scsi_task(task)
            st["inflight"] -= 1
            if status != 0:
                st["bad"] += 1
                st["status"] = status
            elif not st["stop"]:
                st["done"] += 1
            if not st["stop"] and not st["bad"]:
                submit()

        cb = _CB(on_done)                      # referenced until the end of this call
        fd = lib.iscsi_get_fd(self.ctx)
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        for _ in range(depth):
            submit()
        start = time.monotonic()
        end = start + seconds
        while True:
            now = time.monotonic()
            if now >= end and not st["stop"]:
                st["stop"], counted, elapsed = True, st["done"], now - start
            if st["stop"] and st["inflight"] == 0:
                break
            if st["bad"] or now > end + 30:
                break
            poller.modify(fd, lib.iscsi_which_events(self.ctx))
            revents = 0
            for _, ev in poller.poll(200):
                revents |= ev
            if lib.iscsi_service(self.ctx, revents) < 0:
                raise BenchError(f"iscsi_service: {self.error()}")
            if STOP_REQUESTED:
                raise KeyboardInterrupt
        if st["bad"]:
            raise BenchError(f"{st['bad']} commands failed (SCSI status {st['status']:#x})")
        if not st["stop"] or st["inflight"]:
            raise BenchError(f"{st['inflight']} commands still in flight 30 s after the run")
        return counted / elapsed


def load_rate(t: Target, volume_size: int, size: int, depth: int, seconds: float,
              write: bool = True, rand: bool = True) -> float:
    session = IscsiLoad(t, volume_size)
    try:
        return session.rate(size, depth, seconds, write, rand)
    finally:
        session.close()


# -- the zstore cluster: zstore up with 3 chunk servers, several volumes -------------

class Cluster(Zstore):
    """``zstore up --chunks 3`` (iscsi_bench's launcher), and one LUN per volume we create."""

    def start_cluster(self) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ZSTORE_")}
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parent.parent),
                                                             os.environ.get("PYTHONPATH")) if p)
        self.state_dir.mkdir(mode=0o700)
        base = free_ports(40)
        log = self.workdir / "zstore-up.log"
        vip = free_ports(1)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "zstore.up", "--state-dir", str(self.state_dir),
                 "--base-port", str(base), "--vip-port", str(vip), "--chunks", "3"],
                cwd=Path(__file__).resolve().parent.parent, env=self.env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for("zstore up", lambda: "zstore is up" in log.read_text(errors="replace"), 120, self.proc, log)
        say(f"zstore: supervisor pid {self.proc.pid}, base port {base}, state {self.state_dir}")
        cfg = tomllib.loads((self.state_dir / "zstore.toml").read_text())["client"]
        self.meta_url = cfg["endpoints"][0].rstrip("/")
        self.token = (self.state_dir / cfg["token_file"]).read_text().strip()

    def volume(self, name: str, size: int, replicas: int) -> Target:
        """A thin volume with our initiator on its ACL, through the meta API (what the CLI sends;
        the API and not the CLI, so no interpreter start per call on a busy box)."""
        self.api("POST", "/volumes", {"name": name, "size": size, "thin": True, "replicas": replicas})
        self.api("PUT", f"/volumes/{name}/acl/{INITIATOR}", {"readonly": False})
        vol = self.api("GET", f"/volumes/{name}")
        portal = next((p.get("portal") for p in vol.get("placement") or [] if p.get("portal")), None)
        if not portal:
            raise BenchError(f"volume {name}: no chunk server portal in its placement")
        t = Target(portal, vol["target_iqn"], int(vol["lun"]), int(vol.get("block_size") or 512))
        wait_login(f"zstore volume {name}", t, 30)
        return t

    def pids(self) -> dict[str, int]:
        """The chunk servers' pids by name (``zstore up``'s up.json)."""
        state = json.loads((self.state_dir / "up.json").read_text())
        return {c["name"]: int(c["pid"]) for c in state.get("children", [])
                if c.get("kind") == "chunk" and c.get("pid")}

    def replica_drops(self) -> int:
        """Replicas dropped from extents so far, over all chunk servers (their heartbeat counters)."""
        return sum(int((c.get("storage") or {}).get("replica_drops") or 0)
                   for c in self.api("GET", "/chunks").get("chunks", []))

    def settle(self, names: list[str], timeout: float) -> tuple[float, int]:
        """Wait until no volume in ``names`` has degraded extents or recovery tasks, so the timed
        lines do not run beside a resync; (seconds waited, most degraded extents seen at once)."""
        t0, worst = time.monotonic(), 0
        while True:
            busy = 0
            for name in names:
                v = self.api("GET", f"/volumes/{name}")
                busy += int((v.get("extents") or {}).get("degraded") or 0) + \
                    len((v.get("recovery") or {}).get("tasks") or [])
            worst = max(worst, busy)
            waited = time.monotonic() - t0
            if not busy:
                return waited, worst
            if waited > timeout:
                raise BenchError(f"volumes {', '.join(names)} still degraded or recovering after "
                                 f"{timeout:.0f}s")
            time.sleep(1)

    def api(self, method: str, path: str, body: object = None) -> object:
        req = urllib.request.Request(f"{self.meta_url}/api/v1{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            raise BenchError(f"{method} {path}: HTTP {e.code}: {e.read()[:300]!r}") from None
        except OSError as e:
            raise BenchError(f"{method} {path}: {e}") from None


# -- part 1: snapshots ----------------------------------------------------------------

def spread_write(t: Target, volume_size: int, count: int, first: int = 0) -> None:
    """``count`` 1 MiB writes of PATTERN spread evenly over the volume, in one qemu-io session."""
    step = (volume_size // count) // MiB * MiB
    cmds = [a for k in range(count) for a in ("-c", f"write -P {PATTERN} {first + k * step} 1M")]
    for off in range(0, len(cmds), 256):            # keep argv modest
        run(["qemu-io", "--image-opts", t.image_opts, *cmds[off:off + 256]], 120, "spread write")


@dataclass
class SnapResult:
    size: int
    times: list[float]
    spread: int

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def snapshot_times(z: Cluster, name: str, size: int, replicas: int, count: int, spread: int) -> SnapResult:
    t = z.volume(name, size, replicas)
    say(f"  {name}: writing {spread} MiB spread over {fmt_size(size)} ...")
    spread_write(t, size, spread)
    times = []
    for k in range(count):
        spread_write(t, size, 1, first=(k + 1) * MiB)      # a fresh write before each snapshot
        t0 = time.perf_counter()
        snap = z.api("POST", f"/volumes/{name}/snapshots", {"name": f"s{k}"})
        times.append(time.perf_counter() - t0)
        state = (snap or {}).get("state") if isinstance(snap, dict) else None
        if state not in (None, "ready"):
            raise BenchError(f"snapshot {name}@s{k} came back {state!r}, not ready")
    listed = z.api("GET", f"/snapshots?volume={name}")
    got = len(listed.get("snapshots", [])) if isinstance(listed, dict) else 0
    if got != count:
        raise BenchError(f"{name}: {got} snapshots listed after creating {count}")
    say(f"  {name}: {count} snapshots, median {statistics.median(times) * 1e3:.1f} ms, "
        f"max {max(times) * 1e3:.1f} ms")
    return SnapResult(size, times, spread)


def fmt_size(n: int) -> str:
    return f"{n // TiB} TiB" if n >= TiB else f"{n // GiB} GiB" if n >= GiB else f"{n // MiB} MiB"


def snapshot_table(small: SnapResult, big: SnapResult, replicas: int) -> str:
    ms = lambda v: f"{v * 1e3:,.1f}"   # noqa: E731
    rows = [("snapshot create (meta API)", fmt_size(small.size), fmt_size(big.size), "ratio"),
            ("median ms", ms(small.median), ms(big.median), f"{big.median / small.median:.2f}x"),
            ("max ms", ms(max(small.times)), ms(max(big.times)),
             f"{max(big.times) / max(small.times):.2f}x")]
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    out = [f"{replicas} replicas, {small.spread} MiB written spread over each volume, then {len(small.times)} "
           f"snapshots each, 1 MiB written before each"]
    for n, r in enumerate(rows):
        out.append("  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)))
        if n == 0:
            out.append("  ".join("-" * x for x in w))
    flat = big.median / small.median
    out.append(f"flat (metadata only): {'yes' if flat < 1.5 else 'NO'} "
               f"(1 TiB median is {flat:.2f}x the 1 GiB one; 'yes' means below 1.5x)")
    return "\n".join(out)


# -- part 2: I/O --------------------------------------------------------------------

@dataclass(frozen=True)
class Line:
    label: str
    unit: str
    key: str


LINES = [Line("1 MiB seq write, QD8 (first pass)", "MiB/s", "fill"),
         Line("4 KiB random write, QD1", "IOPS", "w1"),
         Line("4 KiB random write, QD32", "IOPS", "w32"),
         Line("1 MiB seq write, QD8 (overwrite)", "MiB/s", "seqw"),
         Line("4 KiB random read, QD32", "IOPS", "r32")]
SEQ = Metric("1 MiB seq write", "qemu-img", MiB, 8, write=True)


def seq_write(t: Target, size: int, seconds: float | None) -> float:
    """qemu-img bench, 1 MiB at QD8 from offset 0: the whole volume once (``seconds`` None),
    else about ``seconds`` of it (capped at one pass so it stays sequential over written data)."""
    count = size // MiB
    if seconds is not None:
        probe = min(count, 64)
        per = qemu_bench(SEQ, t, probe, timeout=120) / probe
        count = max(8, min(count, int(seconds / per)))
    return count / qemu_bench(SEQ, t, count, timeout=max(120, count)) * 1.0


def measure(line: Line, t: Target, size: int, seconds: float) -> float:
    if line.key == "fill":
        return seq_write(t, size, None)
    if line.key == "seqw":
        return seq_write(t, size, seconds)
    if line.key == "r32":
        return iscsi_perf(Metric("r", "iscsi-perf", 4 * KiB, 32, random=True), t, max(1, round(seconds)))
    return load_rate(t, size, 4 * KiB, 1 if line.key == "w1" else 32, seconds)


def proc_cpu(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_cpu(line: Line, t: Target, size: int, seconds: float,
                pids: dict[str, int]) -> tuple[float, dict[str, float]]:
    """``measure``, plus the CPU microseconds per operation each process spent meanwhile
    (``pids``: name -> pid; "initiator" is this process, where IscsiLoad runs)."""
    before = {name: proc_cpu(pid) for name, pid in pids.items()}
    box = box_ticks()
    mine = time.process_time()
    v = measure(line, t, size, seconds)
    ops = max(1.0, v * seconds)
    per = {name: (proc_cpu(pid) - before[name]) * 1e6 / ops for name, pid in pids.items()}
    per["initiator"] = (time.process_time() - mine) * 1e6 / ops
    spent = [b - a for a, b in zip(box, box_ticks())]
    per["_idle"] = 100.0 * (spent[3] + spent[4]) / max(1, sum(spent))     # idle + iowait
    return v, per


def quiesce() -> float:
    """Write back every dirty page before a timed line; the seconds it took.

    Without it a line runs beside the kernel's write-back of the line before it, and
    which column that penalises depends only on the measuring order: with columns
    alternated over three rounds the first column of rounds 1 and 3 follows the low-rate
    QD1 line while every middle column follows another column's QD32 writes (on this box
    a 2-replica zstore line right after other random writes measured ~18% lower than the
    same line after a sync)."""
    t0 = time.monotonic()
    os.sync()
    return time.monotonic() - t0


def box_ticks() -> list[int]:
    """The machine's CPU time so far by kind (user nice system idle iowait irq softirq steal),
    /proc/stat's first line: an idle box means one process, not the machine, was the limit."""
    return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]


def cpu_table(cpu: dict[str, dict[str, float]]) -> str:
    """Where a 4 KiB random write at QD32 spends CPU, per column (busiest process first)."""
    out = ["CPU per 4 KiB random write, QD32 (us, utime+stime from /proc during that line):"]
    for col, per in cpu.items():
        procs = sorted(((v, k) for k, v in per.items() if k not in ("initiator", "_idle")), reverse=True)
        parts = ", ".join(f"{k} {v:.0f}" for v, k in procs if v >= 0.5)
        out.append(f"  {col:<10} initiator {per.get('initiator', 0):.0f}; {parts or '-'}; "
                   f"all {sum(v for k, v in per.items() if k != '_idle'):.0f}; "
                   f"machine {per.get('_idle', 0):.0f}% idle")
    return "\n".join(out)


def read_back(t: Target, size: int) -> None:
    """The filled pattern is there: no column is fast by dropping writes."""
    reads = [c for off in (0, size // 2, size - MiB) for c in ("-c", f"read -P {PATTERN} {off} 1M")]
    out = run(["qemu-io", "-r", "--image-opts", t.image_opts, *reads], 60, "read-back check")
    if "verification failed" in out or out.count("read 1048576/1048576 bytes") != 3:
        raise BenchError(f"read-back check on {t.url}: the written pattern is not there: {out[-300:]!r}")


def io_table(results: dict[str, dict[str, float]], columns: list[str]) -> str:
    head = ["metric", "unit", *columns] + [f"{c}/tgtd" for c in columns if c != "tgtd"]
    rows = [head]
    for line in LINES:
        got = results.get(line.key, {})
        f = (lambda v: f"{v:,.0f}") if line.unit == "IOPS" else (lambda v: f"{v:,.1f}")
        ref = got.get("tgtd")
        rows.append([line.label, line.unit, *[f(got[c]) if c in got else "-" for c in columns],
                     *[f"{got[c] / ref:.2f}x" if ref and c in got else "-" for c in columns if c != "tgtd"]])
    w = [max(len(r[i]) for r in rows) for i in range(len(head))]
    out = []
    for n, r in enumerate(rows):
        out.append("  ".join(c.ljust(w[i]) if i < 2 else c.rjust(w[i]) for i, c in enumerate(r)))
        if n == 0:
            out.append("  ".join("-" * x for x in w))
    return "\n".join(out)


def goals(results: dict[str, dict[str, float]]) -> list[str]:
    """The issue's targets for 4 KiB QD32 random writes, said plainly."""
    got = results.get("w32", {})
    ref = got.get("tgtd")
    out = []
    for col, want in (("zstore-r2", 1.0), ("zstore-r3", 0.8)):
        if ref and col in got:
            ratio = got[col] / ref
            out.append(f"goal {col} 4 KiB random write QD32 >= {want:.1f}x tgtd: "
                       f"{'MET' if ratio >= want else 'NOT MET'} ({ratio:.2f}x)")
        else:
            out.append(f"goal {col} 4 KiB random write QD32 >= {want:.1f}x tgtd: not measured")
    return out


# -- main ---------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="exit status: 0 report printed, 1 a target or tool failed, 2 bad usage")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 128 MiB volumes, 2 s per measurement, 16 MiB written and 3 snapshots "
                        "per snapshot volume")
    p.add_argument("--duration", type=float, metavar="S",
                   help="seconds per timed measurement (default 6, --quick 2)")
    p.add_argument("--size", type=parse_size, metavar="SIZE",
                   help="size of the I/O volumes and tgtd's LUN (default 1Gi, --quick 128Mi)")
    p.add_argument("--snapshots", type=int, metavar="N", help="snapshots per volume (default 7, --quick 3)")
    p.add_argument("--only", choices=("snapshots", "io"), help="run one part alone")
    p.add_argument("--tgtd-params", choices=("stock", "matched"), default="matched",
                   help="tgtd's session parameters: matched to zstore's target (default: InitialR2T=No, "
                        "256 KiB segments, as iscsi_bench.py --tgtd-params matched), or Debian's stock ones")
    p.add_argument("--calibrate", action="store_true",
                   help="also print this script's initiator against iscsi-perf, random reads on tgtd")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="measure every timed line N times, alternating which column goes first, and "
                        "report the median (the first pass is written once)")
    p.add_argument("--between", choices=("sync", "none"), default="sync",
                   help="before every timed line: write back the dirty pages the previous one left "
                        "(sync, default), or go straight on (none: a line then pays for writing back "
                        "the line before it, whichever column that was)")
    p.add_argument("--workdir", type=Path, metavar="DIR", help="parent of the work dir (default /var/tmp)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, state) for debugging")
    args = p.parse_args(argv)
    if args.duration is None:
        args.duration = 2.0 if args.quick else 6.0
    args.size = args.size or (128 * MiB if args.quick else GiB)
    if args.snapshots is None:
        args.snapshots = 3 if args.quick else 7
    if args.duration < 0.5 or args.snapshots < 1 or not 1 <= args.repeat <= 20:
        p.error("--duration must be at least 0.5, --snapshots at least 1 and --repeat 1..20")
    return args


def quiet_say(text: str) -> None:
    """Progress during clean-up, which must go on if stderr is a closed pipe."""
    try:
        say(text)
    except OSError:
        pass


def on_signal(signum, frame):
    """Ctrl-C and SIGTERM: one clean-up path. The flag is for the load loop: a KeyboardInterrupt
    raised inside a ctypes callback is swallowed by ctypes, the flag is not."""
    global STOP_REQUESTED
    STOP_REQUESTED = True
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        say(f"storage_bench: missing {', '.join(missing)}: apt-get install tgt libiscsi-bin qemu-utils")
        return 1
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)       # also when started with SIGINT ignored (a & job)
    start_load, began = os.getloadavg()[0], time.monotonic()
    base = args.workdir or Path("/var/tmp")
    base.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="zsb-", dir=base))
    tgtd = Tgtd(workdir, args.size, matched=args.tgtd_params == "matched")
    z = Cluster(workdir, args.size)
    errors: list[str] = []
    snaps: tuple[SnapResult, SnapResult] | None = None
    results: dict[str, dict[str, float]] = {}
    cpu: dict[str, dict[str, float]] = {}
    columns: list[str] = []
    calib: tuple[float, float] | None = None
    settled: tuple[float, int, int] | None = None
    synced: list[float] = []
    try:
        say("starting zstore (etcd, meta, 3 chunk servers) ...")
        z.start_cluster()
        if args.only in (None, "snapshots"):
            say("snapshots ...")
            try:
                spread = 16 if args.quick else 64
                snaps = (snapshot_times(z, "snap-small", GiB, 3, args.snapshots, spread),
                         snapshot_times(z, "snap-big", TiB, 3, args.snapshots, spread))
            except BenchError as e:
                errors.append(f"snapshots: {e}")
                say(f"!! snapshots: {e}")
        if args.only in (None, "io"):
            targets: dict[str, Target] = {}
            say("starting tgtd ...")
            try:
                targets["tgtd"] = tgtd.start()
            except BenchError as e:
                errors.append(f"tgtd: {e}")
                say(f"!! tgtd not measured: {e}")
            for r in REPLICAS:
                try:
                    targets[f"zstore-r{r}"] = z.volume(f"io-r{r}", args.size, r)
                except BenchError as e:
                    errors.append(f"zstore-r{r}: {e}")
                    say(f"!! zstore-r{r} not measured: {e}")
            columns = list(targets)
            if args.calibrate and "tgtd" in targets:
                t = targets["tgtd"]
                seq_write(t, args.size, None)
                calib = (load_rate(t, args.size, 4 * KiB, 32, args.duration, write=False),
                         iscsi_perf(Metric("r", "iscsi-perf", 4 * KiB, 32, random=True), t,
                                    max(1, round(args.duration))))
            failed: set[str] = set()
            for line in LINES:
                runs: dict[str, list[float]] = {}
                cpu_runs: dict[str, list[dict[str, float]]] = {}
                for rep in range(1 if line.key == "fill" else args.repeat):
                    order = list(targets.items())           # alternate who goes first
                    for name, t in (order if rep % 2 == 0 else order[::-1]):
                        if name in failed:
                            continue
                        try:
                            if line.key != "fill" and args.between == "sync":
                                synced.append(quiesce())
                            if line.key == "w32":
                                v, per = measure_cpu(line, t, args.size, args.duration,
                                                     tgtd.pids() if name == "tgtd" else z.pids())
                                cpu_runs.setdefault(name, []).append(per)
                            else:
                                v = measure(line, t, args.size, args.duration)
                            if line.key == "fill":
                                read_back(t, args.size)
                            runs.setdefault(name, []).append(v)
                            say(f"  {name:<10} {line.label:<34} {v:>10,.1f} {line.unit}")
                        except BenchError as e:
                            failed.add(name)
                            errors.append(f"{name}: {e}")
                            say(f"!! {name} {line.label}: {e}")
                for name, vs in runs.items():
                    if name not in failed:
                        results.setdefault(line.key, {})[name] = statistics.median(vs)
                for name, pers in cpu_runs.items():                 # the mean of each process's share
                    if name not in failed:
                        cpu[name] = {k: statistics.fmean(p.get(k, 0.0) for p in pers) for k in pers[0]}
                if line.key == "fill":
                    names = [f"io-r{r}" for r in REPLICAS if f"zstore-r{r}" in targets]
                    try:
                        settled = z.settle(names, 120)
                        time.sleep(3)                   # a heartbeat, for the drop counters
                        settled = (*settled, z.replica_drops())
                        say(f"  first pass settled: waited {settled[0]:.0f} s for recovery, "
                            f"{settled[2]} replica drops so far")
                    except BenchError as e:
                        errors.append(f"zstore: {e}")
                        say(f"!! zstore: {e}")
    except BenchError as e:
        errors.append(str(e))
        say(f"!! {e}")
    except KeyboardInterrupt:
        say("\ninterrupted: stopping everything")
        errors.append("interrupted")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)    # let the clean-up finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:                                            # stderr may be gone (a closed pipe):
            quiet_say("stopping tgtd and zstore ...")   # stop and remove all the same
            tgtd.stop()
        finally:
            try:
                z.stop()
            finally:
                if args.keep:
                    quiet_say(f"kept {workdir}")
                else:
                    shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    median = f" (median of {args.repeat}, alternated)" if args.repeat > 1 else ""
    print(f"zstore storage engine vs tgtd: I/O volumes {args.size // MiB} MiB, {args.duration:g} s per "
          f"measurement{median}, tgtd params {args.tgtd_params}, initiator {INITIATOR}, "
          f"{time.monotonic() - began:.0f} s in all")
    if synced:
        print(f"between lines: sync before each of {len(synced)} timed measurements, "
              f"median {statistics.median(synced):.1f} s, max {max(synced):.1f} s")
    elif args.between == "none":
        print("between lines: no sync (each line runs beside the write-back of the one before it)")
    print(machine(f"{start_load:.2f} at start, {os.getloadavg()[0]:.2f} at end"))
    if snaps:
        print()
        print(snapshot_table(*snaps, replicas=3))
    if results:
        print()
        print(io_table(results, columns))
        print()
        if settled:
            print(f"after the first pass: {settled[2]} replicas dropped from extents (all chunk servers, "
                  f"whole run so far), up to {settled[1]} extents/tasks degraded at once; waited "
                  f"{settled[0]:.0f} s for recovery before the timed lines")
        print("\n".join(goals(results)))
        if cpu:
            print()
            print(cpu_table(cpu))
    if calib:
        print(f"calibration, 4 KiB random read QD32 on tgtd: this script's initiator {calib[0]:,.0f} IOPS, "
              f"iscsi-perf {calib[1]:,.0f} IOPS ({calib[0] / calib[1]:.2f}x)")
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    if "interrupted" in errors:
        return 130
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
