#!/usr/bin/env python3
"""The floor: the least per-write work a Python iSCSI target with synchronous replication
can do, measured beside tgtd on this machine, in the same run.

Issue 4 sets zstore's 2-replica goal at tgtd's 4 KiB random write IOPS at QD32, because "a
minimal Python target with one pipelined msgpack replica hop kept tgtd parity here". This
script is that minimal target, so the claim can be checked on the box where zstore is
measured, and zstore's distance from it read as the cost of what zstore does beyond it:

- ``target``: one asyncio process. zstore's own login code (not a hot path), then a loop
  that parses every complete PDU received, writes WRITE(16) data to a local file with one
  ``pwrite`` and sends it to each replica as one msgpack array ``(tag, offset, data)``; the
  SCSI Response goes out once every replica answered. READ(16) is a ``pread``. TEST UNIT
  READY, INQUIRY and READ CAPACITY answer what libiscsi and iscsi-inq ask; anything else
  is refused with CHECK CONDITION. No checksums (``--checksums`` adds zstore's crc32c
  per 4 KiB block and its 4-byte ``pwrite``), no fencing, no extent map, no failure
  handling, no R2T: none of what makes zstore trustworthy, on purpose.
- ``replica``: one asyncio protocol per connection that ``pwrite``s every frame it is fed
  and answers each batch with one msgpack list of tags.

Both files are filled before the run in 32 KiB pieces, tgtd's image in the same way (the
page-cache folio size matters on this kernel: docs/storage.md), so the two columns write
into the same kind of page cache.

    python bench/floor_target.py                    # r1 and r2 floors beside tgtd
    python bench/floor_target.py --quick            # smoke: 64 MiB, 1 s per line

Exit status: 0 report printed, 1 a target or tool failed, 2 bad arguments, 130 on Ctrl-C.
Every process started here is stopped and the work dir removed on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import crc32c
import msgpack

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

IQN = "iqn.2026-11.org.zstore.bench:floor"
BLOCK = 512
PIECE = 32 * 1024                    # the fill's write size: zstore's WRITE_PIECE
_CMD = struct.Struct(">III")         # ITT, expected data transfer length, CmdSN at byte 16
_SENSE_INVALID_OPCODE = bytes([0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0])


# -- the replica ---------------------------------------------------------------------

class _MsgpackConn(asyncio.Protocol):
    """A TCP_NODELAY connection fed into a msgpack stream unpacker."""

    def __init__(self):
        self.unpacker, self.t = msgpack.Unpacker(use_list=False), None

    def connection_made(self, transport):
        self.t = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _ReplicaConn(_MsgpackConn):
    """pwrite each ``(tag, offset, data)`` fed, answer the batch with one list of tags."""

    def __init__(self, fd: int):
        super().__init__()
        self.fd = fd

    def data_received(self, data):
        self.unpacker.feed(data)
        done = []
        fd, pwrite = self.fd, os.pwrite
        for tag, offset, block in self.unpacker:
            pwrite(fd, block, offset)
            done.append(tag)
        if done:
            self.t.write(msgpack.packb(done))


async def serve_replica(port: int, path: str) -> None:
    fd = os.open(path, os.O_RDWR)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _ReplicaConn(fd), "127.0.0.1", port)
    print("ready", flush=True)
    await server.serve_forever()


# -- the target ----------------------------------------------------------------------

class _Peer(_MsgpackConn):
    def __init__(self, session: "_Session"):
        super().__init__()
        self.s = session

    def data_received(self, data):
        self.unpacker.feed(data)
        replied = self.s.replied
        for tags in self.unpacker:
            for tag in tags:
                replied(tag)
        self.s.flush()

    def connection_lost(self, exc):
        self.s.writer.close()


class _Session:
    def __init__(self, reader, writer, login, fd: int, size: int, checksums: int):
        from chunk.iscsi import pdu as P
        self.P, self.reader, self.writer, self.fd, self.size = P, reader, writer, fd, size
        self.statsn, self.expcmdsn = login.statsn, login.expcmdsn
        self.crc_fd = checksums
        self.out: list[bytes] = []
        self.pending: dict[int, int] = {}
        self.peers: list[_Peer] = []
        self.peer_out: list[list[bytes]] = []

    def flush(self) -> None:
        if self.out:
            out, self.out = self.out, []
            self.writer.writelines(out)

    def respond(self, itt: int, status: int = 0) -> None:
        statsn = self.statsn
        self.statsn = (statsn + 1) & 0xFFFFFFFF
        self.out.append(self.P.encode_scsi_response(itt, status, statsn, self.expcmdsn,
                                                    (self.expcmdsn + 64) & 0xFFFFFFFF))

    def replied(self, tag: int) -> None:
        left = self.pending[tag] - 1
        if left:
            self.pending[tag] = left
        else:
            del self.pending[tag]
            self.respond(tag)

    def data_in(self, itt: int, lun: int, data: bytes, want: int) -> None:
        data = data[:want]
        statsn = self.statsn
        self.statsn = (statsn + 1) & 0xFFFFFFFF
        self.out += [self.P.encode_data_in(itt, lun, len(data), statsn, self.expcmdsn,
                                           (self.expcmdsn + 64) & 0xFFFFFFFF, 0, 0, True, 0,
                                           want - len(data)), data, self.P._PAD[len(data) & 3]]  # noqa: SLF001

    def refuse(self, itt: int) -> None:
        statsn = self.statsn
        self.statsn = (statsn + 1) & 0xFFFFFFFF
        pdu = self.P.ScsiResponse(itt=itt, status=2, statsn=statsn, expcmdsn=self.expcmdsn,
                                  maxcmdsn=(self.expcmdsn + 64) & 0xFFFFFFFF,
                                  data=self.P.ScsiResponse.sense_segment(_SENSE_INVALID_OPCODE))
        self.out += pdu.encode()

    def command(self, buf: bytearray, pos: int, start: int, dsl: int) -> None:
        itt, want, cmdsn = _CMD.unpack_from(buf, pos + 16)
        if not buf[pos] & 0x40:
            self.expcmdsn = (cmdsn + 1) & 0xFFFFFFFF
        op = buf[pos + 32]
        if op == 0x8A and dsl == want:                                   # WRITE(16), all immediate
            offset = int.from_bytes(buf[pos + 34:pos + 42], "big") * BLOCK
            data = bytes(buf[start:start + dsl])
            if offset + dsl > self.size:
                self.refuse(itt)
                return
            os.pwrite(self.fd, data, offset)
            if self.crc_fd:
                for i in range(0, dsl, 4096):
                    crc = crc32c.crc32c(data[i:i + 4096])
                    os.pwrite(self.crc_fd, crc.to_bytes(4, "little"), (offset + i) // 4096 * 4)
            if self.peers:
                self.pending[itt] = len(self.peers)
                frame = msgpack.packb((itt, offset, data))
                for out in self.peer_out:
                    out.append(frame)
            else:
                self.respond(itt)
        elif op == 0x88:                                                 # READ(16)
            offset = int.from_bytes(buf[pos + 34:pos + 42], "big") * BLOCK
            n = int.from_bytes(buf[pos + 42:pos + 46], "big") * BLOCK
            lun = int.from_bytes(buf[pos + 8:pos + 16], "big")
            if offset + n > self.size:
                self.refuse(itt)
                return
            self.data_in(itt, lun, os.pread(self.fd, n, offset), want)
        elif op == 0x00:                                                 # TEST UNIT READY
            self.respond(itt)
        elif op == 0x12 and not buf[pos + 33] & 1:                       # standard INQUIRY
            inq = bytes([0, 0, 6, 2, 31, 0, 0, 0x02]) + b"ZSTORE  FLOOR           0001"
            self.data_in(itt, int.from_bytes(buf[pos + 8:pos + 16], "big"), inq, want)
        elif op == 0x9E and buf[pos + 33] & 0x1F == 0x10:                # READ CAPACITY(16)
            cap = struct.pack(">QI20x", self.size // BLOCK - 1, BLOCK)
            self.data_in(itt, int.from_bytes(buf[pos + 8:pos + 16], "big"), cap, want)
        elif op == 0x25:                                                 # READ CAPACITY(10)
            cap = struct.pack(">II", min(self.size // BLOCK - 1, 0xFFFFFFFF), BLOCK)
            self.data_in(itt, int.from_bytes(buf[pos + 8:pos + 16], "big"), cap, want)
        else:
            self.refuse(itt)

    async def run(self, peers: list[int]) -> None:
        loop = asyncio.get_running_loop()
        for port in peers:
            _, peer = await loop.create_connection(lambda: _Peer(self), "127.0.0.1", port)
            self.peers.append(peer)
            self.peer_out.append([])
        P, buf, read = self.P, bytearray(), self.reader.read
        while True:
            chunk = await read(1 << 20)
            if not chunk:
                return
            buf += chunk
            pos, n = 0, len(buf)
            while n - pos >= 48:
                ahs = buf[pos + 4] * 4
                dsl = int.from_bytes(buf[pos + 5:pos + 8], "big")
                total = 48 + ahs + ((dsl + 3) & ~3)
                if n - pos < total:
                    break
                op = buf[pos] & 0x3F
                if op == 0x01:
                    self.command(buf, pos, pos + 48 + ahs, dsl)
                elif op == 0x00:                                         # NOP-Out
                    itt, = struct.unpack_from(">I", buf, pos + 16)
                    if itt != 0xFFFFFFFF:
                        statsn = self.statsn
                        self.statsn = (statsn + 1) & 0xFFFFFFFF
                        self.out += P.NopIn(itt=itt, statsn=statsn, expcmdsn=self.expcmdsn,
                                            maxcmdsn=(self.expcmdsn + 64) & 0xFFFFFFFF,
                                            data=bytes(buf[pos + 48 + ahs:pos + 48 + ahs + dsl])).encode()
                elif op == 0x06:                                         # Logout
                    itt, = struct.unpack_from(">I", buf, pos + 16)
                    self.out += P.LogoutResponse(itt=itt, statsn=self.statsn, expcmdsn=self.expcmdsn,
                                                 maxcmdsn=self.expcmdsn + 64).encode()
                    self.flush()
                    await self.writer.drain()
                    return
                else:
                    return                                               # not ours: hang up
                pos += total
            del buf[:pos]
            for peer, out in zip(self.peers, self.peer_out):
                if out:
                    peer.t.writelines(out)
                    out.clear()
            self.flush()


async def serve_target(port: int, path: str, size: int, peers: list[int], checksums: bool) -> None:
    from chunk.iscsi.login import login
    from chunk.iscsi.negotiation import TargetPreferences

    class Policy:
        def target_exists(self, iqn):
            return iqn == IQN

        def chap_for(self, target_iqn, initiator):
            return None

        def redirect(self, initiator, target_iqn):
            return None

        def new_tsih(self):
            return 1

    fd = os.open(path, os.O_RDWR)
    crc_fd = os.open(path + ".crc", os.O_RDWR | os.O_CREAT, 0o600) if checksums else 0
    prefs = TargetPreferences(header_digests=("None",), data_digests=("None",))

    async def handle(reader, writer):
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            result = await login(reader, writer, Policy(), prefs)
            if result is not None:
                await _Session(reader, writer, result, fd, size, crc_fd).run(peers)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, limit=1 << 20)
    print("ready", flush=True)
    await server.serve_forever()


# -- the run -------------------------------------------------------------------------

def fill(path: Path, size: int) -> None:
    """``size`` bytes of data, written in zstore's piece size (small page-cache folios)."""
    piece = bytes([0x5A]) * PIECE
    with open(path, "wb", buffering=0) as f:
        for _ in range(size // PIECE):
            f.write(piece)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve", choices=("target", "replica"), help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    p.add_argument("--peer", type=int, action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("--size", default="1Gi", help="volume and LUN size (default 1Gi, --quick 64Mi)")
    p.add_argument("--duration", type=float, default=8.0, help="seconds per measured line (default 8)")
    p.add_argument("--repeat", type=int, default=3, help="rounds, column order reversed each round; "
                                                          "medians are printed (default 3)")
    p.add_argument("--replicas", default="1,2", help="floor replica counts to run (default 1,2)")
    p.add_argument("--checksums", action="store_true",
                   help="the floor also keeps zstore's crc32c per 4 KiB block in a .crc file")
    p.add_argument("--tgtd-fill", choices=("pieces", "iscsi"), default="pieces",
                   help="how tgtd's image is filled: in 32 KiB pieces like the floor's files (default), "
                        "or through tgtd with qemu-img's 1 MiB writes, as storage_bench fills every column")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"), help="where the temp dir goes")
    p.add_argument("--quick", action="store_true", help="smoke: 64 MiB, 1 s per line, 1 round")
    a = p.parse_args(argv)
    from iscsi_bench import BenchError, Target, Tgtd, free_ports, parse_size, say, stop_process, wait_login
    from storage_bench import Line, measure_cpu, seq_write
    size = parse_size("64Mi" if a.quick and a.size == "1Gi" else a.size)
    if a.serve:
        coro = (serve_target(a.port, a.file, size, a.peer, a.checksums) if a.serve == "target"
                else serve_replica(a.port, a.file))
        try:
            asyncio.run(coro)
        except KeyboardInterrupt:
            pass
        return 0
    try:
        counts = sorted({int(x) for x in a.replicas.split(",")})
    except ValueError:
        p.error(f"--replicas {a.replicas!r}: a comma-separated list of 1, 2, 3")
    if not counts or counts[0] < 1 or counts[-1] > 3:
        p.error("--replicas: each count must be 1, 2 or 3")
    if a.quick:
        a.duration, a.repeat = 1.0, 1
    if a.duration <= 0 or a.repeat < 1:
        p.error("--duration must be > 0 and --repeat >= 1")
    for tool in ("tgtd", "tgtadm", "iscsi-inq"):
        if not shutil.which(tool):
            print(f"floor_target: {tool} not found (apt-get install tgt libiscsi-bin)", file=sys.stderr)
            return 1
    work = Path(tempfile.mkdtemp(prefix="zstore-floor-", dir=a.workdir))
    procs: list[subprocess.Popen] = []
    tgtd = Tgtd(work, size, matched=True, prefilled=a.tgtd_fill == "pieces")
    results: dict[str, list[float]] = {}
    cpu: dict[str, list[dict[str, float]]] = {}
    try:
        if a.tgtd_fill == "pieces":
            fill(work / "tgtd-lun1.img", size)
        targets: dict[str, tuple[Target, dict[str, int]]] = {"tgtd": (tgtd.start(), tgtd.pids())}
        if a.tgtd_fill == "iscsi":
            seq_write(targets["tgtd"][0], size, None)
        for r in counts:
            pids = {}
            peers = []
            for i in range(r - 1):
                port = free_ports(1)
                f = work / f"floor{r}-replica{i}.img"
                fill(f, size)
                procs.append(_spawn(work, f"floor{r}-replica{i}", ["--serve", "replica", "--port", str(port),
                                                                    "--file", str(f), "--size", str(size)]))
                pids[f"replica{i}"] = procs[-1].pid
                peers.append(port)
            port = free_ports(1)
            f = work / f"floor{r}-target.img"
            fill(f, size)
            extra = [x for q in peers for x in ("--peer", str(q))] + (["--checksums"] if a.checksums else [])
            procs.append(_spawn(work, f"floor{r}-target", ["--serve", "target", "--port", str(port),
                                                            "--file", str(f), "--size", str(size), *extra]))
            pids["target"] = procs[-1].pid
            t = Target(f"127.0.0.1:{port}", IQN, 0)
            wait_login(f"floor r{r}", t, 15)
            targets[f"floor-r{r}"] = (t, pids)
        line = Line(key="w32", label="4 KiB random write QD32", unit="IOPS")
        names = list(targets)
        for rnd in range(a.repeat):
            for name in (names if rnd % 2 == 0 else names[::-1]):
                t, pids = targets[name]
                v, per = measure_cpu(line, t, size, a.duration, pids)
                results.setdefault(name, []).append(v)
                cpu.setdefault(name, []).append(per)
                say(f"round {rnd + 1}: {name} {v:,.0f} IOPS")
        same = {name: _replicas_agree(work, int(name[-1])) for name in names if name.startswith("floor-r")}
    except BenchError as e:
        print(f"floor_target: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        tgtd.stop()
        for proc in procs:
            stop_process(proc)
        shutil.rmtree(work, ignore_errors=True)
    ref = statistics.median(results["tgtd"])
    print(f"floor target vs tgtd: 4 KiB random write QD32, {size >> 20} MiB, {a.duration:g} s per line, "
          f"medians of {a.repeat}, checksums {'on' if a.checksums else 'off'}, tgtd filled "
          f"{'in 32 KiB pieces' if a.tgtd_fill == 'pieces' else 'through iSCSI, 1 MiB writes'}")
    for name, vals in results.items():
        med = statistics.median(vals)
        per = {k: statistics.mean(c[k] for c in cpu[name]) for k in cpu[name][0]}
        procs_cpu = ", ".join(f"{k} {v:.0f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1])
                              if not k.startswith("_"))
        print(f"  {name:<9} {med:>9,.0f} IOPS  {med / ref:5.2f}x tgtd   CPU us/write: {procs_cpu}; "
              f"machine {per['_idle']:.0f}% idle" + ("" if name == "tgtd" else
                                                     f"; replicas identical: {'yes' if same[name] else 'NO'}"))
    return 0 if all(same.values()) else 1


def _replicas_agree(work: Path, replicas: int) -> bool:
    """Every replica file of a floor holds what its target's file holds: the hop is real."""
    def digest(path: Path) -> bytes:
        h = hashlib.blake2b()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        return h.digest()
    want = digest(work / f"floor{replicas}-target.img")
    return all(digest(work / f"floor{replicas}-replica{i}.img") == want for i in range(replicas - 1))


def _spawn(work: Path, name: str, args: list[str]) -> subprocess.Popen:
    from iscsi_bench import wait_for
    log = work / f"{name}.log"
    out = open(log, "wb")
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args], stdout=out,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    out.close()
    wait_for(f"{name} to start", lambda: b"ready" in log.read_bytes(), 15, proc, log)
    return proc


if __name__ == "__main__":
    sys.exit(main())
