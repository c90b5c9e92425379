#!/usr/bin/env python3
"""zstore's built-in iSCSI target side by side with Debian's tgtd: same machine, same run.

Performance goals live here, as numbers printed next to a reference, never in
timed unit tests: a number alone says little on a shared 2-core VM, a ratio to
tgtd measured a minute earlier on the same box says a lot.

Both targets serve a volume of the same size, backed by a file on the same
filesystem (the work dir), written once end to end before anything is
measured, so reads hit data. The same initiator name and the same client tools
(libiscsi's iscsi-perf, qemu-img bench with qemu's libiscsi driver) run against
both, one measurement after the other for each line, so drift on the machine
hits both columns alike.

    python bench/iscsi_bench.py              # full run, 10 s per measurement
    python bench/iscsi_bench.py --quick      # CI smoke: 2 s each, 256 MiB volume
    python bench/iscsi_bench.py --only tgtd  # the reference alone

Exit status: 0 when every tool ran (whatever the numbers say: this is a
report), 1 when a target could not be started or a tool failed, 2 for bad
arguments, 130 on Ctrl-C. Every process started here is stopped on the way out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
INITIATOR = "iqn.2024-01.dev.zstore:bench"
TGTD_IQN = "iqn.2024-01.dev.zstore:bench-tgtd"
# --tgtd-params matched: the session parameters zstore's target offers (TargetPreferences in
# chunk/iscsi/negotiation.py). Stock tgtd sends 8 KiB data segments and wants R2T before any
# write data, which costs it on large transfers whatever its implementation is worth.
TGTD_MATCHED = {"MaxRecvDataSegmentLength": "262144", "MaxXmitDataSegmentLength": "262144",
                "MaxBurstLength": "1048576", "FirstBurstLength": "65536",
                "InitialR2T": "No", "ImmediateData": "Yes"}
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
TOOLS = ("tgtd", "tgtadm", "iscsi-perf", "iscsi-inq", "qemu-img", "qemu-io")
PATTERN = 0xa5                         # the byte every write carries


class BenchError(Exception):
    """A target could not be started or a tool failed: the run is not a valid report."""


# -- small helpers ------------------------------------------------------------------

def say(text: str) -> None:
    """Progress goes to stderr, so stdout holds only the report."""
    print(text, file=sys.stderr, flush=True)


def run(argv: list[str], timeout: float, what: str, **kw) -> str:
    """Run a tool to completion within ``timeout``; its output, or BenchError saying why not."""
    try:
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, errors="replace", timeout=timeout, **kw)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what}: {argv[0]} did not finish within {timeout:.0f}s") from None
    except OSError as e:
        raise BenchError(f"{what}: cannot run {argv[0]}: {e}") from None
    if p.returncode != 0:
        tail = "\n".join("    " + l for l in p.stdout.replace("\r", "\n").strip().splitlines()[-6:])
        raise BenchError(f"{what}: {' '.join(argv[:2])} ... exited with {p.returncode}\n{tail}")
    return p.stdout


def free_ports(n: int) -> int:
    """A base port ``b`` with ``b .. b+n-1`` all free on 127.0.0.1 right now."""
    for base in range(30000 + os.getpid() % 1000 * 20, 60000, 97):
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise BenchError(f"no {n} consecutive free ports on 127.0.0.1")


def parse_size(text: str) -> int:
    """zstore's own size syntax (``1Gi``, ``256Mi``); whole MiB, since the first write pass
    uses 1 MiB requests."""
    from zstore.units import SizeError
    from zstore.units import parse_size as zstore_size
    try:
        n = zstore_size(text)
    except SizeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if n < 16 * MiB or n % MiB:
        raise argparse.ArgumentTypeError("size must be a whole number of MiB, at least 16Mi")
    return n


def wait_for(what: str, cond, timeout: float, proc: subprocess.Popen | None = None,
             log: Path | None = None) -> None:
    """Poll ``cond`` until true; fail early if ``proc`` (the server we wait on) dies."""
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what}: the server exited with {proc.returncode}{log_tail(log)}")
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}{log_tail(log)}")
        time.sleep(0.2)


def log_tail(log: Path | None, lines: int = 10) -> str:
    if log is None or not log.exists():
        return ""
    text = log.read_text(errors="replace").rstrip().splitlines()[-lines:]
    return f"; last lines of {log}:\n" + "\n".join("    " + l for l in text)


def stop_process(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL: only ever this one pid, which we started."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass


# -- the two targets ----------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """Where an initiator finds a LUN."""
    portal: str
    iqn: str
    lun: int
    block_size: int = 512

    @property
    def url(self) -> str:
        return f"iscsi://{self.portal}/{self.iqn}/{self.lun}"

    @property
    def image_opts(self) -> str:
        return (f"driver=iscsi,transport=tcp,portal={self.portal},target={self.iqn},"
                f"lun={self.lun},initiator-name={INITIATOR}")


def wait_login(name: str, t: Target, timeout: float, log: Path | None = None) -> None:
    """A LUN counts as served once iscsi-inq logs in and gets an INQUIRY answer."""
    def answers() -> bool:
        try:
            run(["iscsi-inq", "-i", INITIATOR, t.url], 10, "iscsi-inq")
            return True
        except BenchError:
            return False
    wait_for(f"{name} to answer logins on {t.portal} ({t.iqn} LUN {t.lun})", answers, timeout, log=log)


@dataclass
class Tgtd:
    """Debian's tgtd, the reference: a private instance on its own control port and portal.

    Its own control port (``-C``) keeps every tgtadm call away from any other
    tgtd on this machine; it is only ever stopped by its own pid.
    """
    workdir: Path
    size: int
    matched: bool = False
    name: str = "tgtd"
    proc: subprocess.Popen | None = None
    ctl: int = 0
    made_socket: bool = False
    prefilled: bool = False            # the image is already there, written: keep it

    def pids(self) -> dict[str, int]:
        """tgtd's pid by name (storage_bench's CPU accounting)."""
        return {"tgtd": self.proc.pid} if self.proc is not None else {}

    def adm(self, *args: str) -> str:
        return run(["tgtadm", "-C", str(self.ctl), "--lld", "iscsi", *args], 15, "tgtadm")

    def start(self) -> Target:
        sockets = Path("/var/run/tgtd")
        self.ctl = next((n for n in range(40, 1000) if not (sockets / f"socket.{n}").exists()
                         and not (sockets / f"socket.{n}.lock").exists()), 0)
        if not self.ctl:
            raise BenchError("no free tgtd control port in 40-999")
        port = free_ports(1)
        image = self.workdir / "tgtd-lun1.img"
        if not self.prefilled:
            with open(image, "wb") as f:
                f.truncate(self.size)                   # sparse, like a fresh thin zstore volume
        log = self.workdir / "tgtd.log"
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                ["tgtd", "-f", "-C", str(self.ctl), "--iscsi", f"portal=127.0.0.1:{port}"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)                 # Ctrl-C reaches us, not tgtd: we stop it
        self.made_socket = True

        def ready() -> bool:
            try:
                self.adm("--mode", "target", "--op", "show")
                return True
            except BenchError:
                return False
        wait_for(f"tgtd's control port {self.ctl}", ready, 10, self.proc, log)
        self.adm("--mode", "target", "--op", "new", "--tid", "1", "--targetname", TGTD_IQN)
        self.adm("--mode", "logicalunit", "--op", "new", "--tid", "1", "--lun", "1",
                 "--backing-store", str(image))
        for key, value in (TGTD_MATCHED if self.matched else {}).items():
            self.adm("--mode", "target", "--op", "update", "--tid", "1", "--name", key, "--value", value)
        self.adm("--mode", "target", "--op", "bind", "--tid", "1", "--initiator-address", "ALL")
        target = Target(f"127.0.0.1:{port}", TGTD_IQN, 1)
        wait_login("tgtd", target, 10)
        say(f"tgtd: pid {self.proc.pid}, control port {self.ctl}, portal {target.portal}, "
            f"{self.size // MiB} MiB file {image}")
        return target

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for args in (("--mode", "target", "--op", "delete", "--force", "--tid", "1"),
                         ("--mode", "system", "--op", "delete")):      # tgtd's own shutdown
                try:
                    self.adm(*args)
                except BenchError:
                    pass
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                stop_process(self.proc)
        if self.made_socket:                             # tgtd leaves these behind
            for suffix in ("", ".lock"):
                Path(f"/var/run/tgtd/socket.{self.ctl}{suffix}").unlink(missing_ok=True)


@dataclass
class Zstore:
    """A one-chunk zstore cluster from the project's own launcher, one volume, our initiator on its ACL."""
    workdir: Path
    size: int
    name: str = "zstore"
    proc: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def state_dir(self) -> Path:
        return self.workdir / "zstore"

    def zs(self, *args: str, module: str = "zstore.cli.main", timeout: float = 30) -> str:
        return run([sys.executable, "-m", module, *args], timeout, f"zstore {' '.join(args[:2])}",
                   cwd=REPO, env=self.env)

    def cli_json(self, *args: str):
        return json.loads(self.zs("--config", str(self.state_dir / "zstore.toml"), *args, "--json"))

    def start(self) -> Target:
        # ZSTORE_* from the caller's shell would point the CLI at another cluster.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ZSTORE_")}
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        self.state_dir.mkdir(mode=0o700)
        base = free_ports(40)
        log = self.workdir / "zstore-up.log"
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "zstore.up", "--state-dir", str(self.state_dir),
                 "--base-port", str(base), "--chunks", "1"],
                cwd=REPO, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)                 # Ctrl-C reaches us; we stop it in order
        wait_for("zstore up", lambda: "zstore is up" in log.read_text(errors="replace"), 90,
                 self.proc, log)
        self.cli_json("volume", "create", "bench", "--size", str(self.size), "--replicas", "1")
        self.cli_json("acl", "add", "bench", INITIATOR)
        vol = self.cli_json("volume", "show", "bench")
        chunks = {c["chunk_id"]: c for c in self.cli_json("chunk", "list")}
        placed = [p.get("chunk_id") for p in vol.get("placement") or []]
        chunk = chunks.get(placed[0]) if placed else next(iter(chunks.values()), None)
        if not chunk or not chunk.get("portal"):
            raise BenchError(f"no chunk server portal for volume bench (placement {placed})")
        target = Target(chunk["portal"], vol["target_iqn"], int(vol["lun"]), int(vol.get("block_size") or 512))
        # The chunk server learns of the volume and its ACL from etcd, a moment later.
        wait_login("zstore's chunk server", target, 30, self.state_dir / "logs" / "chunk0.log")
        say(f"zstore: supervisor pid {self.proc.pid}, base port {base}, portal {target.portal}, "
            f"{target.iqn} LUN {target.lun}, state {self.state_dir}")
        return target

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.zs("down", "--state-dir", str(self.state_dir), "--timeout", "30",
                    module="zstore.up", timeout=40)
        except BenchError as e:
            say(f"zstore down: {e}; signalling the supervisor (pid {self.proc.pid})")
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            stop_process(self.proc, grace=15)


# -- measurements -------------------------------------------------------------------

@dataclass(frozen=True)
class Metric:
    """One line of the report: a request size, a queue depth, a tool."""
    label: str
    tool: str              # iscsi-perf | qemu-img
    size: int              # bytes per request
    depth: int
    write: bool = False
    random: bool = False   # iscsi-perf only; qemu-img bench walks sequential offsets

    @property
    def unit(self) -> str:
        return "IOPS" if self.size < MiB else "MiB/s"

    def value(self, ops_per_s: float) -> float:
        return ops_per_s if self.unit == "IOPS" else ops_per_s * self.size / MiB


METRICS = [
    Metric("4 KiB random read, QD1", "iscsi-perf", 4 * KiB, 1, random=True),
    Metric("4 KiB random read, QD32", "iscsi-perf", 4 * KiB, 32, random=True),
    Metric("4 KiB write, QD1 (seq offsets)", "qemu-img", 4 * KiB, 1, write=True),
    Metric("4 KiB write, QD32 (seq offsets)", "qemu-img", 4 * KiB, 32, write=True),
    Metric("1 MiB seq read, QD8", "iscsi-perf", MiB, 8),
    Metric("1 MiB seq read, QD8", "qemu-img", MiB, 8),
    Metric("1 MiB seq write, QD8 (overwrite)", "qemu-img", MiB, 8, write=True),
]
FIRST_WRITE = Metric("1 MiB seq write, QD8 (first pass)", "qemu-img", MiB, 8, write=True)


def iscsi_perf(m: Metric, t: Target, seconds: int) -> float:
    """Requests per second: iscsi-perf's final ``iops average N`` over its whole -t run."""
    argv = ["iscsi-perf", "-i", INITIATOR, "-m", str(m.depth), "-b", str(m.size // t.block_size),
            "-t", str(seconds), *(["-r"] if m.random else []), t.url]
    out = run(argv, seconds + 30, m.label)
    found = re.findall(r"iops average (\d+)", out)
    if not found:
        raise BenchError(f"{m.label}: no 'iops average' in iscsi-perf's output: {out[-300:]!r}")
    return float(found[-1])


def qemu_bench(m: Metric, t: Target, count: int, timeout: float) -> float:
    """Seconds qemu-img bench took for ``count`` requests (its own timer: login not included)."""
    argv = ["qemu-img", "bench", "--image-opts", t.image_opts, "-t", "none", "-c", str(count),
            "-d", str(m.depth), "-s", str(m.size), "-S", str(m.size)]
    if m.write:
        argv += ["-w", f"--pattern={PATTERN}"]  # not zeros: no target gets to skip the data
    out = run(argv, timeout, m.label)
    found = re.search(r"Run completed in ([\d.]+) seconds", out)
    if not found:
        raise BenchError(f"{m.label}: no 'Run completed' in qemu-img's output: {out[-300:]!r}")
    return max(float(found[1]), 1e-3)


def qemu_rate(m: Metric, t: Target, seconds: int) -> float:
    """qemu-img bench takes a count, not a time: probe the rate, then run ~``seconds`` long."""
    count, elapsed = max(16, 4 * m.depth), 0.0
    while True:
        elapsed = qemu_bench(m, t, count, timeout=60 + 5 * seconds)
        if elapsed >= min(0.5, seconds / 4) or count >= 1 << 24:
            break
        count *= 8
    count = max(count, int(count / elapsed * seconds))
    return count / qemu_bench(m, t, count, timeout=60 + 10 * seconds)


def measure(m: Metric, t: Target, seconds: int) -> float:
    ops = iscsi_perf(m, t, seconds) if m.tool == "iscsi-perf" else qemu_rate(m, t, seconds)
    return m.value(ops)


def first_write(t: Target, size: int) -> float:
    """Write the whole LUN once (so reads hit data), then check the data is there.

    Its MiB/s is a line of the report too. The read-back makes sure no column
    is fast because the target drops writes.
    """
    count = size // MiB
    rate = FIRST_WRITE.value(count / qemu_bench(FIRST_WRITE, t, count, timeout=max(120, count)))
    reads = [c for off in (0, size // 2 + 512, size - MiB) for c in ("-c", f"read -P {PATTERN} {off} 1M")]
    out = run(["qemu-io", "-r", "--image-opts", t.image_opts, *reads], 60, "read-back check")
    if "verification failed" in out or out.count("read 1048576/1048576 bytes") != 3:
        raise BenchError(f"read-back check: the written pattern is not there: {out[-400:]!r}")
    return rate


# -- the report ---------------------------------------------------------------------

def machine(load: str) -> str:
    """What the numbers were measured on: they mean nothing without it."""
    def first_line(argv: list[str]) -> str:
        try:
            return run(argv, 10, argv[0]).strip().splitlines()[0]
        except (BenchError, IndexError):
            return "?"
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.machine())
    rev = first_line(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
    try:
        pkgs = ", ".join(run(["dpkg-query", "-W", "-f", "${Package} ${Version}\\n", "tgt", "libiscsi-bin",
                              "qemu-utils"], 10, "dpkg-query").split("\n")).strip(", ")
    except BenchError:
        pkgs = "?"
    return "\n".join([
        f"date     {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"machine  {len(os.sched_getaffinity(0))} CPUs (nproc), {cpu}, Linux {platform.release()}, "
        f"load {load}",
        f"python   {platform.python_version()} ({sys.executable})",
        f"zstore   {rev}",
        f"tools    {pkgs}",
    ])


def fmt(m: Metric, v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if m.unit == "IOPS" else f"{v:,.1f}"


def table(rows: list[tuple[Metric, dict[str, float]]]) -> str:
    lines = [("metric", "tool", "unit", "tgtd", "zstore", "zstore/tgtd")]
    for m, got in rows:
        ref, ours = got.get("tgtd"), got.get("zstore")
        ratio = f"{ours / ref:.2f}x" if ref and ours is not None else "-"
        lines.append((m.label, m.tool, m.unit, fmt(m, ref), fmt(m, ours), ratio))
    widths = [max(len(r[i]) for r in lines) for i in range(len(lines[0]))]
    out = []
    for n, r in enumerate(lines):
        out.append("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


# -- main ---------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="exit status: 0 report printed, 1 a target or tool failed, 2 bad usage")
    p.add_argument("--quick", action="store_true", help="CI smoke: 2 s per measurement and a 256 MiB volume")
    p.add_argument("--seconds", type=int, metavar="N", help="seconds per measurement (default 10, --quick 2)")
    p.add_argument("--size", type=parse_size, metavar="SIZE", help="volume size (default 1Gi, --quick 256Mi)")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="measure each line N times, alternating which target goes first; "
                        "report the median (default 1)")
    p.add_argument("--only", choices=("tgtd", "zstore"), help="measure one target alone")
    p.add_argument("--tgtd-params", choices=("stock", "matched"), default="stock",
                   help="tgtd's session parameters: Debian's defaults (default), or matched to what "
                        "zstore's target offers (256 KiB data segments, InitialR2T=No, 1 MiB bursts)")
    p.add_argument("--workdir", type=Path, metavar="DIR",
                   help="where both backing files and the zstore state go (default: a new dir in /var/tmp)")
    p.add_argument("--keep", action="store_true",
                   help="keep the work dir (logs, LUN image, zstore state) for debugging; processes still stop")
    args = p.parse_args(argv)
    args.seconds = args.seconds or (2 if args.quick else 10)
    args.size = args.size or (256 * MiB if args.quick else GiB)
    if args.seconds < 1 or args.repeat < 1:
        p.error("--seconds and --repeat must be at least 1")
    return args


def on_sigterm(signum, frame):
    raise KeyboardInterrupt            # same clean-up path as Ctrl-C


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        say(f"iscsi_bench: missing {', '.join(missing)}: apt-get install tgt libiscsi-bin qemu-utils")
        return 1
    signal.signal(signal.SIGTERM, on_sigterm)
    start_load = os.getloadavg()[0]              # a shared box: say how busy it was
    base = args.workdir or Path("/var/tmp")
    base.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="zstore-bench-", dir=base))
    servers = [s for s in (Tgtd(workdir, args.size, matched=args.tgtd_params == "matched"),
                           Zstore(workdir, args.size)) if args.only in (None, s.name)]
    targets: dict[str, Target] = {}
    errors: list[str] = []
    rows: list[tuple[Metric, dict[str, float]]] = []
    try:
        for s in servers:
            say(f"starting {s.name} ...")
            try:
                targets[s.name] = s.start()
            except BenchError as e:
                errors.append(f"{s.name}: {e}")
                say(f"!! {s.name} not measured: {e}")
        plan = [(FIRST_WRITE, lambda t: first_write(t, args.size))]
        plan += [(m, lambda t, m=m: measure(m, t, args.seconds)) for m in METRICS]
        for m, fn in plan:
            samples: dict[str, list[float]] = {name: [] for name in targets}
            failed: set[str] = set()
            for rep in range(1 if m is FIRST_WRITE else args.repeat):
                order = list(targets.items())[::-1 if rep % 2 else 1]   # alternate who goes first
                for name, t in order:
                    if name in failed:
                        continue
                    try:
                        samples[name].append(fn(t))
                        say(f"  {name:<7} {m.label:<34} {m.tool:<10} {fmt(m, samples[name][-1]):>10} {m.unit}")
                    except BenchError as e:
                        failed.add(name)
                        errors.append(f"{name}: {e}")
                        say(f"!! {name} {m.label}: {e}")
            rows.append((m, {name: statistics.median(v) for name, v in samples.items() if v}))
    except KeyboardInterrupt:
        say("\ninterrupted: stopping the targets")
        errors.append("interrupted")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # let the clean-up finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for s in reversed(servers):
            say(f"stopping {s.name} ...")
            s.stop()
        if args.keep:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if rows:
        median = f", median of {args.repeat}" if args.repeat > 1 else ""
        print(f"zstore iSCSI target vs tgtd: {args.size // MiB} MiB volume, {args.seconds} s per "
              f"measurement{median}, tgtd params {args.tgtd_params}, initiator {INITIATOR}")
        print(machine(f"{start_load:.2f} at start, {os.getloadavg()[0]:.2f} at end"))
        print()
        print(table(rows))
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    if "interrupted" in errors:
        return 130
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
