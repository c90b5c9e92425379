"""O_DIRECT figures for one block device (the guest image has no fio): 4 KiB random writes and
reads at queue depth 1, then 1 MiB sequential writes and reads. Prints one BENCH line.
Usage: lio-bench.py LABEL DEVICE [SECONDS] [SEQ_MIB]"""

import mmap
import os
import random
import sys
import time

label, dev = sys.argv[1], sys.argv[2]
secs = float(sys.argv[3]) if len(sys.argv) > 3 else 8.0
seq_mib = int(sys.argv[4]) if len(sys.argv) > 4 else 64
fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
size = os.lseek(fd, 0, os.SEEK_END)
buf4k = mmap.mmap(-1, 4096)
buf4k.write(os.urandom(4096))
buf1m = mmap.mmap(-1, 1 << 20)
buf1m.write(os.urandom(1 << 20))
rnd = random.Random(7)
span = min(size, 128 << 20) // 4096


def loop(op, buf, secs):
    n, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < secs:
        op(fd, buf, rnd.randrange(span) * 4096)
        n += 1
    return n / (time.monotonic() - t0)


w4 = loop(os.pwrite, buf4k, secs)
os.fsync(fd)
r4 = loop(lambda f, b, o: os.preadv(f, [b], o), buf4k, secs)


def seq(op):
    t0 = time.monotonic()
    for i in range(seq_mib):
        op(i)
    if op is w:
        os.fsync(fd)
    return seq_mib / (time.monotonic() - t0)


def w(i):
    os.pwrite(fd, buf1m, i << 20)


def r(i):
    os.preadv(fd, [buf1m], i << 20)


ws, rs = seq(w), seq(r)
os.close(fd)
print(f"BENCH {label} rand4k_write_iops={w4:.0f} rand4k_read_iops={r4:.0f} "
      f"seq1m_write_MiBps={ws:.1f} seq1m_read_MiBps={rs:.1f}", flush=True)
