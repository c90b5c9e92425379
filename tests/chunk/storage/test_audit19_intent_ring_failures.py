"""The intent ring's failure paths (review of the sole-replica intent ring, session 19).

A flagged (sole replica) write that fails, here with EFBIG from a real RLIMIT_FSIZE in a child
process, must not leave its record behind: a later open would "restore" the checksum of a
block that fails on purpose (an import's filler under the exporter's crc). And a ring that
cannot be allocated must not fail a write that would succeed unflagged: the ring only mends.
"""

from __future__ import annotations

import subprocess
import sys
from array import array
from pathlib import Path

import pytest

from chunk.storage.extent_file import BLOCK_SIZE, INT_SLOT, INT_SLOTS, ChecksumError, ExtentFile

V = "vol-f"
SIZE = 1024 * BLOCK_SIZE
FAR = 200                     # a block whose data offset (800 KiB) is past the child's size limit


def _child(tmp: Path, body: str, limit: int) -> subprocess.CompletedProcess:
    """Run ``body`` with ``ext`` (the extent, opened) in a child whose files may not grow past
    ``limit`` bytes (RLIMIT_FSIZE; SIGXFSZ ignored, so the write fails EFBIG)."""
    code = (
        "import resource, signal, sys\n"
        "from chunk.storage.extent_file import ExtentFile, BLOCK_SIZE\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"ext = ExtentFile.open({str(tmp)!r}, {V!r}, 0)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))\n"
        + body
    )
    return subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[3],
                          capture_output=True, text=True, timeout=60)


def _valid_records(tmp: Path) -> int:
    raw = (tmp / f"{V}.0.int").read_bytes()
    return sum(1 for k in range(INT_SLOTS) if raw[k * INT_SLOT:k * INT_SLOT + 4] != bytes(4))


@pytest.mark.parametrize("shape", ["one block", "two blocks"])
def test_a_failed_flagged_write_leaves_no_record(tmp_path: Path, shape: str):
    with ExtentFile.create(tmp_path, V, 0, extent_size=SIZE) as ext:
        ext.write_block(1, b"\1" * BLOCK_SIZE, intent=True)      # the ring is open and allocated
    zeros = bytes(BLOCK_SIZE) if shape == "one block" else bytes(2 * BLOCK_SIZE)
    body = (
        f"try:\n"
        f"    ext.write({FAR} * BLOCK_SIZE, bytes({len(zeros)}), intent=True)\n"
        f"except OSError as e:\n"
        f"    print('failed', e.errno)\n"
        f"else:\n"
        f"    sys.exit('the write did not fail')\n"
    )
    r = _child(tmp_path, body, 64 * 1024)
    assert "failed" in r.stdout, r.stdout + r.stderr
    assert _valid_records(tmp_path) == 0
    # An import's filler: the data zeros, the crc the exporter's (failing on purpose).
    with ExtentFile.open(tmp_path, V, 0) as ext:
        ext.write(FAR * BLOCK_SIZE, bytes(BLOCK_SIZE))
        ext._store_crcs(FAR, array("I", [0x1234567]))             # noqa: SLF001 - as the import
    with ExtentFile.open(tmp_path, V, 0) as ext:
        with pytest.raises(ChecksumError):
            ext.read(FAR * BLOCK_SIZE, BLOCK_SIZE)


def test_a_ring_that_cannot_be_allocated_does_not_fail_the_write(tmp_path: Path):
    """The ring (32 KiB) cannot be made under a 16 KiB file size limit, while an overwrite of
    block 1 fits: the flagged write lands without a record, as an unflagged one would."""
    with ExtentFile.create(tmp_path, V, 0, extent_size=SIZE) as ext:
        ext.write_block(1, b"\1" * BLOCK_SIZE)
        ext.write_block(2, b"\1" * BLOCK_SIZE)
    body = (
        "ext.write_block(1, b'\\2' * BLOCK_SIZE, intent=True)\n"
        "ext.write(2 * BLOCK_SIZE, b'\\3' * BLOCK_SIZE, intent=True)\n"
        "print('written')\n"
    )
    r = _child(tmp_path, body, 16 * 1024)
    assert "written" in r.stdout, r.stdout + r.stderr
    assert "intent ring not used" in r.stderr
    with ExtentFile.open(tmp_path, V, 0) as ext:
        assert ext.read(BLOCK_SIZE, 2 * BLOCK_SIZE) == b"\2" * BLOCK_SIZE + b"\3" * BLOCK_SIZE
        ext.write_block(3, b"\4" * BLOCK_SIZE, intent=True)       # no limit here: a ring now
    assert _valid_records(tmp_path) == 0
    assert (tmp_path / f"{V}.0.int").stat().st_size == INT_SLOTS * INT_SLOT
