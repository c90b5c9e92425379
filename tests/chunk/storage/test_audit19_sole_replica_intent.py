"""The intent ring of a sole replica (``ExtentFile``'s ``.int``): an acknowledged block survives
a SIGKILL between its data pwrite and its crc pwrite, and nothing else is "recovered".

Real files, a real child process really SIGKILLed (the crc store is replaced, inside the
child only, by the kill), real threads; no mocks.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from array import array
from pathlib import Path

import pytest

from chunk.storage.extent_file import (
    BLOCK_SIZE, INT_BLOCKS, INT_SLOT, INT_SLOTS, ChecksumError, ExtentFile, block_crc,
)
from chunk.storage.replica_client import PeerUnavailable, ReplicaClient, ReplicaError
from chunk.storage.replica_store import ReplicaStore, _filler

pytestmark = pytest.mark.timeout(60)

V = "vol-s"
SIZE = 2048 * BLOCK_SIZE                   # 8 MiB: room for writes longer than a slot
ROOT = Path(__file__).resolve().parents[3]


def _blk(seed: int, n: int = 1) -> bytes:
    return bytes((i * 7 + seed * 31 + (i >> 12)) % 253 for i in range(n * BLOCK_SIZE))


def _killed_child(body: str, data: bytes, tmp: Path) -> None:
    """Run ``body`` in a child Python that is SIGKILLed at its first pwrite into the ``.crc``
    of the extent ``body`` passes to ``arm``; ``DATA`` there is ``data``."""
    src = tmp / "child-data"
    src.write_bytes(data)
    code = (
        "import os, signal, sys\n"
        "from chunk.storage.extent_file import ExtentFile\n"
        "from chunk.storage.replica_store import ReplicaStore\n"
        "def arm(ext):\n"
        "    crc_fd, pwrite = ext.crc_fd, os.pwrite\n"
        "    def pw(fd, data, offset):\n"
        "        if fd == crc_fd:\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "        return pwrite(fd, data, offset)\n"
        "    os.pwrite = pw\n"
        f"DATA = open({str(src)!r}, 'rb').read()\n"
        + body)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=30,
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def _old_and_new(tmp_path: Path, first: int, n: int, intent: bool) -> tuple[bytes, bytes]:
    """An extent with ``n`` acknowledged blocks at ``first``; a child then overwrites them
    (with the flag or not) and is killed where its crcs would be stored."""
    old, new = _blk(1, n), _blk(2, n)
    with ExtentFile.create(tmp_path, V, 0, extent_size=SIZE) as ext:
        ext.write(first * BLOCK_SIZE, old)
    _killed_child(
        f"ext = ExtentFile.open({str(tmp_path)!r}, {V!r}, 0)\n"
        "arm(ext)\n"
        f"ext.write({first * BLOCK_SIZE}, DATA, intent={intent})\n"
        "sys.exit(3)\n", new, tmp_path)
    return old, new


def test_killed_flagged_write_reads_new_data(tmp_path: Path):
    _, new = _old_and_new(tmp_path, 5, 1, intent=True)
    with ExtentFile.open(tmp_path, V, 0) as ext:
        assert ext.read(5 * BLOCK_SIZE, BLOCK_SIZE) == new
        assert ext.verify(0, SIZE // BLOCK_SIZE) == []
    with ExtentFile.open(tmp_path, V, 0) as ext:      # the restored crc is in the file
        assert ext.crcs[5] == block_crc(5, new)


def test_killed_flagged_write_block_ring_open(tmp_path: Path):
    """The one-block path of a flagged ``write_block`` once the ring is open (a sole
    replica's every 4 KiB write after its first): killed at its crc pwrite, restored."""
    with ExtentFile.create(tmp_path, V, 0, extent_size=SIZE) as ext:
        ext.write_block(5, _blk(1))
    _killed_child(
        f"ext = ExtentFile.open({str(tmp_path)!r}, {V!r}, 0)\n"
        "ext.write_block(0, DATA, intent=True)\n"      # opens the ring
        "assert ext._int >= 0\n"
        "arm(ext)\n"
        "ext.write_block(5, DATA, intent=True)\n", _blk(2), tmp_path)
    with ExtentFile.open(tmp_path, V, 0) as ext:
        assert ext.read(5 * BLOCK_SIZE, BLOCK_SIZE) == _blk(2)


def test_killed_unflagged_write_fails_its_checksum(tmp_path: Path):
    """The old behaviour, kept without the flag: proves the kill lands in the window."""
    _old_and_new(tmp_path, 5, 1, intent=False)
    assert not (tmp_path / f"{V}.0.int").exists()
    with ExtentFile.open(tmp_path, V, 0) as ext:
        with pytest.raises(ChecksumError):
            ext.read(5 * BLOCK_SIZE, BLOCK_SIZE)


def test_killed_write_longer_than_a_slot(tmp_path: Path):
    """A write of more blocks than a record holds goes piece by piece (intent -> data -> crcs):
    killed at the first piece's crc store, that piece is restored and the next never began."""
    n = INT_BLOCKS + 10
    old, new = _old_and_new(tmp_path, 3, n, intent=True)
    with ExtentFile.open(tmp_path, V, 0) as ext:
        got = ext.read(3 * BLOCK_SIZE, n * BLOCK_SIZE)
        split = INT_BLOCKS * BLOCK_SIZE
        assert got[:split] == new[:split]          # the piece killed at its crcs: restored
        assert got[split:] == old[split:]          # the next piece never began
        assert ext.verify(0, SIZE // BLOCK_SIZE) == []


def test_long_write_complete_pieces(tmp_path: Path):
    """A flagged write spanning three records lands whole and leaves verifiable records."""
    n = 2 * INT_BLOCKS + 7
    data = _blk(9, n)
    with ExtentFile.create(tmp_path, V, 0, extent_size=SIZE) as ext:
        ext.write(BLOCK_SIZE, data, intent=True)
        assert ext.read(BLOCK_SIZE, len(data)) == data
    assert os.path.getsize(tmp_path / f"{V}.0.int") <= INT_SLOTS * INT_SLOT
    with ExtentFile.open(tmp_path, V, 0) as ext:
        assert ext.read(BLOCK_SIZE, len(data)) == data
        assert ext.verify(0, SIZE // BLOCK_SIZE) == []


def test_rot_in_a_recorded_block_still_fails(tmp_path: Path):
    with ExtentFile.create(tmp_path, V, 0, extent_size=SIZE) as ext:
        ext.write_block(7, _blk(1), intent=True)
    with open(tmp_path / f"{V}.0.data", "r+b") as f:
        f.seek(7 * BLOCK_SIZE + 100)
        f.write(b"\x5a")
    with ExtentFile.open(tmp_path, V, 0) as ext:
        with pytest.raises(ChecksumError):
            ext.read(7 * BLOCK_SIZE, BLOCK_SIZE)


def test_older_record_only_is_not_recovered(tmp_path: Path):
    """Data matching an older record of the block, not its newest: a rollback, not a lost
    crc write; it stays failing."""
    a, b = _blk(1), _blk(2)
    with ExtentFile.create(tmp_path, V, 0, extent_size=SIZE) as ext:
        ext.write_block(4, a, intent=True)
        ext.write_block(4, b, intent=True)
        ext.write_block(4, _blk(3))                    # unflagged, whole
        os.pwrite(ext._data, a, 4 * BLOCK_SIZE)        # a's data back under the 3rd crc
    with ExtentFile.open(tmp_path, V, 0) as ext:
        with pytest.raises(ChecksumError):
            ext.read(4 * BLOCK_SIZE, BLOCK_SIZE)


@pytest.mark.parametrize("punched", [True, False])
def test_unmap_after_flagged_write_reads_zeros(tmp_path: Path, punched: bool):
    """ABA: a flagged write, then an unmap of the block (crc 0, synced, then the punch; or
    killed before the punch: the data is still there). The record must not bring it back."""
    with ExtentFile.create(tmp_path, V, 0, extent_size=SIZE) as ext:
        ext.write_block(6, _blk(1), intent=True)
        if punched:
            ext.unmap(6 * BLOCK_SIZE, BLOCK_SIZE)
        else:
            ext.unmap_checksums(6 * BLOCK_SIZE, BLOCK_SIZE)   # no punch: a kill before it
    with ExtentFile.open(tmp_path, V, 0) as ext:
        assert ext.crcs[6] == 0
        assert ext.read(6 * BLOCK_SIZE, BLOCK_SIZE) == bytes(BLOCK_SIZE)


def test_unflagged_rewrite_killed_is_not_recovered(tmp_path: Path):
    """ABA: a flagged write, then an unflagged write of other data by another path, killed
    before its crc: the newest record names the first data, not what is there."""
    with ExtentFile.create(tmp_path, V, 0, extent_size=SIZE) as ext:
        ext.write_block(2, _blk(1), intent=True)
        ext.write_block(2, _blk(2))
    _killed_child(
        f"ext = ExtentFile.open({str(tmp_path)!r}, {V!r}, 0)\n"
        "arm(ext)\n"
        f"ext.write({2 * BLOCK_SIZE}, DATA)\n", _blk(3), tmp_path)
    with ExtentFile.open(tmp_path, V, 0) as ext:
        with pytest.raises(ChecksumError):
            ext.read(2 * BLOCK_SIZE, BLOCK_SIZE)


def test_import_filler_stays_unreadable(tmp_path: Path):
    """ABA: a flagged write, then replica_store's import filler (filler data under the
    exporter's crc: unreadable on purpose). It must stay unreadable."""
    exported = 0x12345678
    with ExtentFile.create(tmp_path, V, 0, extent_size=SIZE) as ext:
        ext.write_block(9, _blk(1), intent=True)
        ext.write(9 * BLOCK_SIZE, _filler(9, exported))
        ext._store_crcs(9, array("I", [exported]))
    with ExtentFile.open(tmp_path, V, 0) as ext:
        assert ext.crcs[9] == exported
        with pytest.raises(ChecksumError):
            ext.read(9 * BLOCK_SIZE, BLOCK_SIZE)


def _valid_records(tmp_path: Path) -> int:
    """How many slots of the ring hold a record (magic and crc set)."""
    raw = (tmp_path / f"{V}.0.int").read_bytes()
    return sum(1 for k in range(INT_SLOTS) if raw[k * INT_SLOT:k * INT_SLOT + 8].strip(b"\0"))


def test_records_cleared_when_done_and_numbers_continue(tmp_path: Path):
    """A completed flagged write leaves no record; a killed one leaves its record, which the
    next open uses, clears, and numbers new records above; a second kill of a write to the
    same block then recovers the newer data (the first kill's record, cleared at the open
    between, cannot outrank it)."""
    with ExtentFile.create(tmp_path, V, 0, extent_size=SIZE) as ext:
        for k in range(INT_SLOTS + 3):
            ext.write_block(k, _blk(k), intent=True)
        assert _valid_records(tmp_path) == 0
        assert ext._int_next == INT_SLOTS + 4
    for seed in (40, 41):
        _killed_child(
            f"ext = ExtentFile.open({str(tmp_path)!r}, {V!r}, 0)\n"
            "for k in range(5):\n"
            "    ext.write_block(20 + k, DATA, intent=True)\n"
            "arm(ext)\n"
            f"ext.write({2 * BLOCK_SIZE}, DATA, intent=True)\n", _blk(seed), tmp_path)
        assert _valid_records(tmp_path) == 1
        with ExtentFile.open(tmp_path, V, 0) as ext:
            assert ext.read(2 * BLOCK_SIZE, BLOCK_SIZE) == _blk(seed)
            assert _valid_records(tmp_path) == 0
            assert ext._int_next == 7                  # above the killed write's record (6)


def test_concurrent_flagged_writes(tmp_path: Path):
    """Two threads of flagged writes on one ExtentFile (the loop and a FUA worker), more of
    them than slots: every block verifies after a reopen, and the ring stays 8 slots."""
    ext = ExtentFile.create(tmp_path, V, 0, extent_size=SIZE)
    errors: list[BaseException] = []

    def run(base: int) -> None:
        try:
            for k in range(200):
                b = base + k % 100
                ext.write_block(b, _blk(b + k), intent=True)
                if k % 17 == 0:
                    ext.write(b * BLOCK_SIZE, _blk(k, 3), intent=True)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(base,)) for base in (0, 500)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    ext.close()
    assert not errors and not any(t.is_alive() for t in threads)
    assert os.path.getsize(tmp_path / f"{V}.0.int") <= INT_SLOTS * INT_SLOT
    with ExtentFile.open(tmp_path, V, 0) as ext:
        assert ext.verify(0, SIZE // BLOCK_SIZE) == []
        assert not any(ext._int_held)


def test_all_slots_held_waits(tmp_path: Path):
    """A ninth flagged write waits for a slot rather than overwrite one in use."""
    ext = ExtentFile.create(tmp_path, V, 0, extent_size=SIZE)
    try:
        held = [ext._take_slot()[0] for _ in range(INT_SLOTS)]
        assert sorted(held) == list(range(INT_SLOTS))
        done = threading.Event()
        t = threading.Thread(target=lambda: (ext.write_block(3, _blk(3), intent=True), done.set()))
        t.start()
        time.sleep(0.2)
        assert not done.is_set()
        ext._free_slot(held[4])
        assert done.wait(10)
        t.join(10)
        for s in held:
            if s != held[4]:
                ext._free_slot(s)
        assert ext.read(3 * BLOCK_SIZE, BLOCK_SIZE) == _blk(3)
    finally:
        ext.close()


@pytest.mark.parametrize("sole,n", [(True, 1), (True, 2), (False, 2)])
def test_replica_store_sole_write_killed(tmp_path: Path, sole: bool, n: int):
    """Through ReplicaStore.write(..., sole=...), the one-block hot path and a run: a child
    (its ring opened by a first write) killed at the crc pwrite; the parent's store reads the
    new data (the old failure without ``sole``), and deleting the extent removes its ring."""
    d = tmp_path / "d0"
    s = ReplicaStore([(d, None)], extent_size=SIZE)
    s.create(V, 0, 1)
    s.write(V, 0, 0, _blk(1, 4), seq=1)
    s.close()
    new = _blk(2, n)
    _killed_child(
        f"s = ReplicaStore([({str(d)!r}, None)], extent_size={SIZE})\n"
        f"s.write({V!r}, 0, {3 * BLOCK_SIZE}, DATA[:{BLOCK_SIZE}], seq=1, sole={sole})\n"
        f"arm(s._replicas[({V!r}, 0)].ext)\n"
        f"s.write({V!r}, 0, {BLOCK_SIZE}, DATA, seq=1, sole={sole})\n", new, tmp_path)
    s = ReplicaStore([(d, None)], extent_size=SIZE)
    try:
        if sole:
            assert s.read(V, 0, BLOCK_SIZE, n * BLOCK_SIZE)[0] == new
        else:
            with pytest.raises(ChecksumError):
                s.read(V, 0, BLOCK_SIZE, BLOCK_SIZE)
        assert (d / f"{V}.0.int").exists() == sole
        s.delete(V, 0)
        assert not (d / f"{V}.0.int").exists()
    finally:
        s.close()


@pytest.mark.parametrize("zero", [True, False])
def test_replica_store_sole_unmap_killed(tmp_path: Path, zero: bool):
    """A sole replica's unmap killed at the crc store of the zeros it writes (all of a
    ``zero`` range; a partial edge otherwise): the parent reads zeros, no ChecksumError."""
    d = tmp_path / "d0"
    s = ReplicaStore([(d, None)], extent_size=SIZE)
    s.create(V, 0, 1)
    s.write(V, 0, 0, _blk(1, 4), seq=1)
    s.close()
    _killed_child(
        f"s = ReplicaStore([({str(d)!r}, None)], extent_size={SIZE}, cow_sync=False)\n"
        f"arm(s._replicas[({V!r}, 0)].ext)\n"
        f"s.unmap({V!r}, 0, {BLOCK_SIZE + 100}, {2 * BLOCK_SIZE}, seq=1, zero={zero}, sole=True)\n",
        b"", tmp_path)
    s = ReplicaStore([(d, None)], extent_size=SIZE)
    try:
        got = s.read(V, 0, BLOCK_SIZE, BLOCK_SIZE)[0]
        assert got == _blk(1, 4)[BLOCK_SIZE:BLOCK_SIZE + 100] + bytes(BLOCK_SIZE - 100)
    finally:
        s.close()


def test_import_zero_filler_after_flagged_zeros_stays_unreadable(tmp_path: Path):
    """ABA: a flagged write of zeros (a sole replica's WRITE ZEROES), later an import's filler,
    which is zeros too, under the exporter's crc; then a kill elsewhere. The filler's data
    equals that write's record, so a ring keeping completed records would "recover" the block
    into silent zeros. Records are dropped when their write completes: it stays unreadable."""
    exported = 0x12345678
    assert _filler(9, exported) == bytes(BLOCK_SIZE)
    with ExtentFile.create(tmp_path, V, 0, extent_size=SIZE) as ext:
        ext.write_block(9, bytes(BLOCK_SIZE), intent=True)
        ext.write(9 * BLOCK_SIZE, _filler(9, exported))
        ext._store_crcs(9, array("I", [exported]))
    with ExtentFile.open(tmp_path, V, 0) as ext:
        assert ext.crcs[9] == exported
        with pytest.raises(ChecksumError):
            ext.read(9 * BLOCK_SIZE, BLOCK_SIZE)


def test_killed_after_the_record_before_the_data(tmp_path: Path):
    """Killed between the record and the data: the block keeps its old data and crc."""
    old = _blk(1)
    with ExtentFile.create(tmp_path, V, 0, extent_size=SIZE) as ext:
        ext.write_block(5, old)
    _killed_child(
        f"ext = ExtentFile.open({str(tmp_path)!r}, {V!r}, 0)\n"
        "real = ExtentFile._put_record\n"
        "def put(self, *a):\n"
        "    real(self, *a)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "ExtentFile._put_record = put\n"
        f"ext.write({5 * BLOCK_SIZE}, DATA, intent=True)\n", _blk(2), tmp_path)
    with ExtentFile.open(tmp_path, V, 0) as ext:
        assert ext.read(5 * BLOCK_SIZE, BLOCK_SIZE) == old


def test_unreadable_ring_does_not_fail_the_open(tmp_path: Path):
    """A ring that cannot be read (here: a directory where the file should be, EISDIR) is
    skipped with a warning: the extent opens and reads as before rings existed, and a flagged
    write goes on without its record (the ring only mends; review: it failed the write)."""
    with ExtentFile.create(tmp_path, V, 0, extent_size=SIZE) as ext:
        ext.write_block(1, _blk(1))
    (tmp_path / f"{V}.0.int").mkdir()
    with ExtentFile.open(tmp_path, V, 0) as ext:
        assert ext.read(BLOCK_SIZE, BLOCK_SIZE) == _blk(1)
        ext.write_block(2, _blk(2), intent=True)
        ext.write(3 * BLOCK_SIZE, _blk(3) + _blk(4), intent=True)
        assert ext.read(2 * BLOCK_SIZE, 3 * BLOCK_SIZE) == _blk(2) + _blk(3) + _blk(4)


@pytest.mark.parametrize("sole", [True, False])
async def test_replica_server_killed_mid_sole_write(tmp_path: Path, sole: bool):
    """End to end over the wire: a replica server in a child process, SIGKILLed at the crc
    pwrite of a WRITE it was sent (with ``sole`` or without); the write is never answered. The
    store reopened reads the new data with ``sole``, a ChecksumError without."""
    d = tmp_path / "d0"
    s = ReplicaStore([(d, None)], extent_size=SIZE)
    s.create(V, 0, 1)
    s.write(V, 0, 0, _blk(1, 4), seq=1)
    s.close()
    secret = b"k" * 32
    code = (
        "import asyncio, os, signal, sys\n"
        "from chunk.storage.replica_server import ReplicaServer\n"
        "from chunk.storage.replica_store import ReplicaStore\n"
        "async def main():\n"
        f"    s = ReplicaStore([({str(d)!r}, None)], extent_size={SIZE})\n"
        f"    s.admit({V!r}, 0, 5)\n"
        f"    server = ReplicaServer(s, {secret!r}, 'c', '127.0.0.1', 0)\n"
        "    await server.start()\n"
        f"    crc_fd, pwrite = s._replicas[({V!r}, 0)].ext.crc_fd, os.pwrite\n"
        "    def pw(fd, data, offset):\n"
        "        if fd == crc_fd:\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "        return pwrite(fd, data, offset)\n"
        "    os.pwrite = pw\n"
        "    print(server.port, flush=True)\n"
        "    await asyncio.sleep(30)\n"
        "asyncio.run(main())\n")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, cwd=ROOT,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    client = ReplicaClient(secret, "c", "me", timeout=5.0)
    try:
        port = int(await asyncio.wait_for(proc.stdout.readline(), 20))
        with pytest.raises((PeerUnavailable, ReplicaError, ConnectionError)):
            await asyncio.wait_for(client.write(("127.0.0.1", port), V, 0, BLOCK_SIZE, _blk(2),
                                                epoch=5, seq=1, sole=sole), 10)
        assert await asyncio.wait_for(proc.wait(), 10) == -signal.SIGKILL
    finally:
        await client.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    s = ReplicaStore([(d, None)], extent_size=SIZE)
    try:
        if sole:
            assert s.read(V, 0, BLOCK_SIZE, BLOCK_SIZE)[0] == _blk(2)
        else:
            with pytest.raises(ChecksumError):
                s.read(V, 0, BLOCK_SIZE, BLOCK_SIZE)
    finally:
        s.close()


@pytest.mark.parametrize("sole", [True, False])
def test_replica_store_sole_revert_killed(tmp_path: Path, sole: bool):
    """A sole replica's revert killed at the crc pwrite of a block it writes back: the parent
    reads the snapshot's data (with ``sole``), a ChecksumError without."""
    d = tmp_path / "d0"
    s = ReplicaStore([(d, None)], extent_size=SIZE)
    s.create(V, 0, 1)
    s.write(V, 0, 0, _blk(1, 2), seq=1)                 # in the snapshot at seq 1
    s.write(V, 0, 0, _blk(2, 2), seq=3)                 # after it (its COW keeps _blk(1))
    s.close()
    _killed_child(
        f"s = ReplicaStore([({str(d)!r}, None)], extent_size={SIZE})\n"
        f"arm(s._replicas[({V!r}, 0)].ext)\n"
        f"s.revert({V!r}, 0, to_seq=1, seq=4, sole={sole})\n", b"", tmp_path)
    s = ReplicaStore([(d, None)], extent_size=SIZE)
    try:
        if sole:
            assert s.read(V, 0, 0, 2 * BLOCK_SIZE)[0] == _blk(1, 2)
        else:
            with pytest.raises(ChecksumError):
                s.read(V, 0, 0, BLOCK_SIZE)
    finally:
        s.close()
