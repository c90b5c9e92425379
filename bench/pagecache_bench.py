"""Kernel CPU of a 4 KiB page-cache write, by the size of the writes that laid the data down.

Why this exists: on Linux 6.16+ ext4 caches a file in folios sized by the write (or
readahead) that created them, up to 2 MiB, and a later 4 KiB write into a large folio
costs several times one into a small folio. zstore's extent files are written in pieces
of at most ``chunk.storage.extent_file.WRITE_PIECE`` and opened with POSIX_FADV_RANDOM
for that reason; this script shows the effect on the machine it runs on.

For each piece size: N sparse 64 MiB files (an extent's ``.data``) are filled with 1 MiB
of data written in pieces of that size, rewritten the same way, then 4 KiB writes and
reads go to random aligned offsets. Reported: CPU µs per MiB for the fill and the
rewrite, and per 4 KiB random write and read (process CPU time, which includes the
kernel's work in the syscalls). One more line refills with 1 MiB writes, drops the cache
and reads everything back with and without POSIX_FADV_RANDOM (readahead builds large
folios too).

    python bench/pagecache_bench.py [--files 16] [--writes 20000] [--workdir /var/tmp]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chunk.storage.extent_file import WRITE_PIECE  # noqa: E402

EXTENT = 64 << 20
MiB = 1 << 20
BLOCK = 4096
PIECES = (MiB, 256 << 10, 64 << 10, WRITE_PIECE, 16 << 10, BLOCK)


def open_files(d: Path, n: int, fadv_random: bool) -> list[int]:
    fds = []
    for i in range(n):
        fd = os.open(d / f"{i}.data", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(fd, EXTENT)
        if fadv_random:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        fds.append(fd)
    return fds


def lay_down(fds: list[int], piece: int, data: memoryview) -> float:
    """CPU µs per MiB to write every file whole, ``piece`` bytes per pwrite."""
    t0 = time.process_time()
    for fd in fds:
        for off in range(0, EXTENT, MiB):
            for p in range(0, MiB, piece):
                os.pwrite(fd, data[p:p + piece], off + p)
    return (time.process_time() - t0) * 1e6 / (len(fds) * EXTENT / MiB)


def random_ops(fds: list[int], count: int, rng: random.Random) -> tuple[float, float]:
    """CPU µs per 4 KiB write, then per 4 KiB read, at the same random aligned offsets."""
    block = os.urandom(BLOCK)
    offs = [(rng.choice(fds), rng.randrange(EXTENT // BLOCK) * BLOCK) for _ in range(count)]
    t0 = time.process_time()
    for fd, off in offs:
        os.pwrite(fd, block, off)
    t1 = time.process_time()
    for fd, off in offs:
        os.pread(fd, BLOCK, off)
    t2 = time.process_time()
    return (t1 - t0) * 1e6 / count, (t2 - t1) * 1e6 / count


def reread(d: Path, n: int, count: int, rng: random.Random, fadv_random: bool) -> float:
    """Fill with 1 MiB writes, sync, drop the cache, read it all in 1 MiB reads, then µs per
    random 4 KiB write: what a restarted server sees."""
    fds = open_files(d, n, fadv_random)
    try:
        lay_down(fds, MiB, memoryview(os.urandom(MiB)))
        for fd in fds:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            for off in range(0, EXTENT, MiB):
                os.pread(fd, MiB, off)
        return random_ops(fds, count, rng)[0]
    finally:
        for fd in fds:
            os.close(fd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=16, help="64 MiB files (default 16: 1 GiB)")
    ap.add_argument("--writes", type=int, default=20000, help="random 4 KiB writes per line")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    args = ap.parse_args(argv)
    if not 1 <= args.files <= 256 or not 100 <= args.writes <= 10_000_000:
        ap.error("--files must be 1..256 and --writes 100..10000000")
    d = Path(tempfile.mkdtemp(prefix="zspc-", dir=args.workdir))
    rng = random.Random(1)
    data = memoryview(os.urandom(MiB))
    print(f"{args.files} x 64 MiB files in {d} ({os.uname().release}); CPU µs, process time")
    print(f"{'written in pieces of':>22} {'fill/MiB':>9} {'rewrite/MiB':>12} {'4K write':>9} {'4K read':>8}")
    try:
        for piece in PIECES:
            fds = open_files(d, args.files, fadv_random=True)
            try:
                fill = lay_down(fds, piece, data)
                again = lay_down(fds, piece, data)
                w, r = random_ops(fds, args.writes, rng)
            finally:
                for fd in fds:
                    os.close(fd)
            mark = "  <- WRITE_PIECE" if piece == WRITE_PIECE else ""
            print(f"{piece // 1024:>19} KiB {fill:>9.0f} {again:>12.0f} {w:>9.1f} {r:>8.1f}{mark}")
        print("after a cache drop and 1 MiB reads of everything, 4 KiB random write:")
        print(f"  with readahead     {reread(d, args.files, args.writes, rng, False):6.1f}")
        print(f"  POSIX_FADV_RANDOM  {reread(d, args.files, args.writes, rng, True):6.1f}")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
