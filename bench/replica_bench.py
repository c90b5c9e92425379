#!/usr/bin/env python3
"""CPU per replicated 4 KiB WRITE on the peer side: a ReplicaServer alone in its own process.

A peer chunk server (one holding a non-coordinator replica) spends its CPU in
ReplicaServer + ReplicaStore for every replicated write; this measures that
cost alone.  The server runs in a subprocess over a real ReplicaStore in a
temp dir (127.0.0.1, a random port); this process creates one 64 MiB extent
(CREATE with epoch 1) and then drives pipelined 4 KiB WRITEs at a fixed queue
depth (random 4 KiB-aligned offsets, seq 1) through
``ReplicaClient.start_write``, as a coordinator does.  Reported: writes/s
(wall clock, noisy on a shared box) and the server's CPU microseconds per
write (utime + stime from /proc/PID/stat over the timed window, the stable
number).

    python bench/replica_bench.py                      # 5 s at QD32, 3 runs, medians
    python bench/replica_bench.py --seconds 10 --repeat 5 --qd 32
    python bench/replica_bench.py --profile out.txt    # py-spy record the server (raw)

Every run starts a fresh server process and temp dir; both are removed on
the way out (also on Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECRET = b"b" * 32
CLUSTER = "bench-cluster"
VID = "bench-vol"
EXTENT = 64 << 20
BLOCK = 4096


# -- server side (subprocess) ----------------------------------------------------

async def _serve(disk: str) -> None:
    from chunk.storage.replica_server import ReplicaServer
    from chunk.storage.replica_store import ReplicaStore

    store = ReplicaStore([(disk, None)], extent_size=EXTENT, cow_sync=False)
    server = ReplicaServer(store, SECRET, CLUSTER, "127.0.0.1", 0)
    await server.start()
    print(server.port, flush=True)
    # Until the parent closes our stdin (or dies).
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    await server.stop()
    store.close()


# -- driver side -------------------------------------------------------------------

def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])           # utime + stime (fields 14, 15)


async def _drive(port: int, pid: int, seconds: float, qd: int) -> tuple[float, float, int]:
    """(writes/s, server CPU µs per write, writes) over the timed window."""
    from chunk.storage.replica_client import ReplicaClient

    addr = ("127.0.0.1", port)
    client = ReplicaClient(SECRET, CLUSTER, "bench-coordinator", timeout=10.0)
    try:
        await client.create(addr, VID, 0, 1, 1)
        payloads = [os.urandom(BLOCK) for _ in range(64)]
        rng = random.Random(1)
        blocks = EXTENT // BLOCK
        loop = asyncio.get_running_loop()
        done = 0
        failed: list[BaseException] = []
        finished = loop.create_future()
        stop_at = 0.0
        counting = False

        def issue() -> None:
            fut = client.start_write(addr, VID, 0, rng.randrange(blocks) * BLOCK,
                                     payloads[rng.randrange(64)], 1, 1)
            if fut is None:
                raise RuntimeError("no connection to the replica server")
            fut.add_done_callback(completed)

        def completed(fut: asyncio.Future) -> None:
            nonlocal done
            exc = None if fut.cancelled() else fut.exception()   # retrieved even after the end
            if finished.done():
                return
            if exc is None and fut.result() is not None and fut.result().status != 0:
                exc = RuntimeError(f"WRITE answered {fut.result().status!r} {fut.result().args}")
            if exc is not None:
                failed.append(exc)
                finished.set_result(None)
                return
            if counting:
                done += 1
            if loop.time() >= stop_at and counting:
                finished.set_result(None)
                return
            issue()

        # Warm-up (1 s): connection, page cache, allocation of the first blocks.
        stop_at = loop.time() + 1.0
        for _ in range(qd):
            issue()
        await asyncio.sleep(1.0)
        counting = True
        t0, c0 = time.monotonic(), _cpu_ticks(pid)
        stop_at = loop.time() + seconds
        await finished
        t1, c1 = time.monotonic(), _cpu_ticks(pid)
        if failed:
            raise failed[0]
        hz = os.sysconf("SC_CLK_TCK")
        cpu_us = (c1 - c0) / hz * 1e6
        return done / (t1 - t0), cpu_us / max(done, 1), done
    finally:
        await client.close()


def _start_server(tmp: Path) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve", str(tmp)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT, text=True)
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        proc.wait()
        raise RuntimeError(f"replica server did not start: {line!r}")
    return proc, int(line)


def _stop_server(proc: subprocess.Popen) -> None:
    try:
        proc.stdin.close()
        proc.wait(timeout=10)
    except (subprocess.TimeoutExpired, OSError):
        proc.kill()
        proc.wait()


def run_once(seconds: float, qd: int, profile: str | None) -> tuple[float, float, int]:
    tmp = Path(tempfile.mkdtemp(prefix="replica-bench-"))
    proc = spy = None
    try:
        proc, port = _start_server(tmp / "disk")
        if profile:
            spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "-p",
                                    str(proc.pid), "-r", "200", "-f", "raw", "-o", profile,
                                    "-d", str(int(seconds + 2))],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return asyncio.run(_drive(port, proc.pid, seconds, qd))
    finally:
        if spy is not None:
            try:
                spy.wait(timeout=seconds + 15)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
        if proc is not None:
            _stop_server(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--qd", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", help="py-spy raw output file (first run only)")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve))
        return 0
    if args.seconds <= 0 or args.qd <= 0 or args.repeat <= 0:
        ap.error("--seconds, --qd and --repeat must be > 0")
    rates, cpus = [], []
    for i in range(args.repeat):
        rate, cpu, n = run_once(args.seconds, args.qd, args.profile if i == 0 else None)
        rates.append(rate)
        cpus.append(cpu)
        print(f"run {i + 1}: {n} writes, {rate:,.0f} writes/s, server {cpu:.1f} µs CPU/write",
              file=sys.stderr, flush=True)
    print(f"replica server, 4 KiB random WRITE QD{args.qd}, {args.repeat} x {args.seconds:g} s: "
          f"median {statistics.median(rates):,.0f} writes/s, "
          f"median {statistics.median(cpus):.1f} µs server CPU per write")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
