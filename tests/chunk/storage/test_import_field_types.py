"""An IMPORT blob whose numbers are not integers is refused before anything is applied.

``_parse_blob`` checked ranges (``lo <= b < hi``) but not types: a block number or seq sent as
a float (msgpack has floats; only an authenticated peer can send one) passed the checks,
and ``_import`` then failed with a TypeError after it had already dropped the range's
snapshot versions: a replica half-changed, answered IO_ERROR, logged as unexpected. Now such a
blob is a StoreError (the replica server's INVALID) and the replica is left as it was.
"""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from chunk.storage.extent_file import BLOCK_SIZE
from chunk.storage.replica_store import ReplicaStore, StoreError

BLOCKS = 8
V = "vol-t"


def _blob(src: ReplicaStore) -> dict:
    blob, nxt = src.export(V, 0, 0, BLOCKS * BLOCK_SIZE, max_bytes=64 << 20)
    assert nxt is None
    return msgpack.unpackb(blob)


@pytest.mark.parametrize("where", ["live block", "live seq", "live crc", "version block",
                                   "version key", "version crc"])
def test_a_blob_with_a_float_is_refused_and_changes_nothing(tmp_path: Path, where: str):
    with ReplicaStore([(tmp_path / "src", None)], extent_size=BLOCKS * BLOCK_SIZE) as src, \
            ReplicaStore([(tmp_path / "dst", None)], extent_size=BLOCKS * BLOCK_SIZE) as dst:
        for s in (src, dst):
            s.create(V, 0, 1)
            s.write(V, 0, 0, b"a" * BLOCK_SIZE, seq=1)
            s.write(V, 0, 0, b"b" * BLOCK_SIZE, seq=3)          # a version of block 0 (1..2)
        src.write(V, 0, BLOCK_SIZE, b"c" * BLOCK_SIZE, seq=4)
        state = _blob(src)
        assert state["live"] and state["versions"]
        live, version = list(state["live"][0]), list(state["versions"][0])
        field = {"live block": (live, 0), "live seq": (live, 1), "live crc": (live, 2),
                 "version block": (version, 0), "version key": (version, 2),
                 "version crc": (version, 3)}[where]
        field[0][field[1]] = float(field[0][field[1]])
        state["live"][0], state["versions"][0] = live, version
        before = dst.digest(V, 0)
        with pytest.raises(StoreError, match="import"):
            dst.import_(V, 0, msgpack.packb(state))
        assert dst.digest(V, 0) == before                         # nothing applied
        assert dst.read(V, 0, 0, BLOCK_SIZE, view=2)[0] == b"a" * BLOCK_SIZE   # version kept


def test_a_create_with_an_overlong_volume_id_is_refused_as_a_bad_request(tmp_path: Path):
    """Before: the file system's ENAMETOOLONG surfaced as a StoreIOError (IO_ERROR, the whole
    5000-byte name logged at error level) instead of a bad request (INVALID)."""
    with ReplicaStore([(tmp_path / "d", None)], extent_size=BLOCKS * BLOCK_SIZE) as store:
        with pytest.raises(ValueError, match="bad extent name"):
            store.create("v" * 5000, 0, 1)
        store.create("v" * 128, 0, 1)                 # the longest allowed still works
        assert store.has("v" * 128, 0)
