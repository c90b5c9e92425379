"""The boot record not writable (the data dir's filesystem full) after a host crash: the chunk
server starts anyway, keeps its suspects in memory, leaves a record that still reads as a crash,
and writes it once it can (chunk/storage/host_crash.py, ``save``)."""

from __future__ import annotations

import asyncio
import errno
import json
import os

from chunk.storage import host_crash
from chunk.storage.engine import StorageEngine
from chunk.storage.host_crash import STATE_FILE, BootState
from zstore.keys import Keys


def _engine(tmp_path, boot: str) -> StorageEngine:
    return StorageEngine(None, Keys("/hc"), "me", [(tmp_path / "d0", None)], listen=("127.0.0.1", 0),
                         token=None, boot_state=BootState(tmp_path, boot))


class _Full:
    """``os.write`` failing with ENOSPC for the boot record's temp file only."""

    def __init__(self, monkeypatch) -> None:
        self.on = True
        real = os.write

        def write(fd, data):
            if self.on and os.readlink(f"/proc/self/fd/{fd}").endswith(STATE_FILE + ".tmp"):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd, data)
        monkeypatch.setattr(host_crash.os, "write", write)


class _Etcd:
    async def get(self, key):
        return None                                   # every extent gone: settled


def _crash(tmp_path) -> set:
    eng = _engine(tmp_path, "boot-A")
    for i in range(2):
        eng.store.create("v", i, 1)
        eng.store.write("v", i, 0, b"x" * 4096, seq=1)
    keys = set(eng.store.extents())
    eng.store.close()                                 # host crash
    return keys


async def test_a_full_data_dir_after_a_crash_does_not_stop_the_start(tmp_path, monkeypatch):
    keys = _crash(tmp_path)
    before = (tmp_path / STATE_FILE).read_bytes()
    full = _Full(monkeypatch)
    eng = _engine(tmp_path, "boot-B")                 # raised OSError(ENOSPC) before the fix
    assert eng.boot_state.host_crash and eng.suspect == keys and eng.boot_state.unsaved
    assert (tmp_path / STATE_FILE).read_bytes() == before          # the old record: a crash
    assert not (tmp_path / (STATE_FILE + ".tmp")).exists()
    again = BootState(tmp_path, "boot-B")                          # a restart now still sees it
    assert again.read()["boot_id"] == "boot-A"
    # Settling: every extent gone from etcd (settled), but the record still does not write.
    eng.etcd = _Etcd()
    await eng._settle_suspects()                                   # noqa: SLF001
    assert eng.suspect == set() and eng.boot_state.unsaved
    assert (tmp_path / STATE_FILE).read_bytes() == before
    full.on = False                                                # space freed: next round
    await eng._settle_suspects()                                   # noqa: SLF001
    assert not eng.boot_state.unsaved
    assert json.loads((tmp_path / STATE_FILE).read_text()) == {
        "boot_id": "boot-B", "clean": False, "suspect": []}
    eng.store.close()


def test_a_clean_record_that_cannot_be_replaced_is_made_to_read_as_a_crash(tmp_path, monkeypatch):
    BootState(tmp_path, "boot-A").write([], clean=True)
    _Full(monkeypatch)
    state = BootState(tmp_path, "boot-B")
    assert state.begin([("v", 0)]) == set() and state.unsaved
    # Running now with no "not clean" record: a crash from here on must still be seen.
    monkeypatch.undo()
    after = BootState(tmp_path, "boot-C")
    assert after.begin([("v", 0)]) == {("v", 0)} and after.host_crash


def test_settling_with_a_full_data_dir_keeps_the_suspects(tmp_path, monkeypatch):
    keys = _crash(tmp_path)
    eng = _engine(tmp_path, "boot-B")
    assert eng.suspect == keys
    _Full(monkeypatch)
    eng.etcd = _Etcd()
    asyncio.run(eng._settle_suspects())               # noqa: SLF001 - raised before the fix
    assert eng.suspect == set() and eng.boot_state.unsaved
    rec = json.loads((tmp_path / STATE_FILE).read_text())
    assert rec["boot_id"] == "boot-B" and sorted(map(tuple, rec["suspect"])) == sorted(keys)
    eng.store.close()
