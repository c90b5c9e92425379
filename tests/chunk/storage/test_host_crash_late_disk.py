"""A disk missing at the first start after a host crash (mounted late, ``nofail``) is not
forgotten: its extents become suspect at the first start that scans it, whatever starts and
stops came between (chunk/storage/host_crash.py, ``unscanned``)."""

from __future__ import annotations

import asyncio
import json

from chunk.storage.engine import StorageEngine
from chunk.storage.host_crash import STATE_FILE, BootState
from zstore.keys import Keys


def _engine(tmp_path, boot: str, failed=None) -> StorageEngine:
    disks = [(tmp_path / "d0", None), (tmp_path / "d1", None)]
    return StorageEngine(None, Keys("/hc"), "me", disks, failed_disks=failed, listen=("127.0.0.1", 0),
                         token=None, boot_state=BootState(tmp_path, boot))


def _populate(tmp_path) -> set:
    eng = _engine(tmp_path, "boot-A")
    eng.store._disks[0].enospc = True                 # noqa: SLF001 - every extent goes to d1
    for i in range(3):
        eng.store.create("v", i, 1)
        eng.store.write("v", i, 0, b"x" * 4096, seq=1)
    assert {eng.store.stat("v", i)["disk"] for i in range(3)} == {str(tmp_path / "d1")}
    keys = set(eng.store.extents())
    eng.store.close()                                 # the host crashes: no stop
    return keys


def test_a_disk_late_at_the_crash_start_is_suspect_once_scanned_after_a_clean_stop(tmp_path):
    keys = _populate(tmp_path)
    eng = _engine(tmp_path, "boot-B", failed={str(tmp_path / "d1"): "not mounted yet"})
    assert eng.boot_state.host_crash and eng.suspect == set()     # nothing of d1 is open
    asyncio.run(eng.stop())                                       # a clean stop, same boot
    assert json.loads((tmp_path / STATE_FILE).read_text())["unscanned"] == [str(tmp_path / "d1")]
    eng = _engine(tmp_path, "boot-B")                             # d1 is mounted now
    assert not eng.boot_state.host_crash
    assert eng.suspect == keys                                    # ...and its extents suspect
    assert "unscanned" not in json.loads((tmp_path / STATE_FILE).read_text())
    eng.store.close()


def test_a_late_disk_stays_pending_across_starts_until_it_is_scanned(tmp_path):
    keys = _populate(tmp_path)
    late = {str(tmp_path / "d1"): "not mounted yet"}
    eng = _engine(tmp_path, "boot-B", failed=late)
    eng.store.close()                                 # SIGKILL, same boot
    eng = _engine(tmp_path, "boot-B", failed=late)    # still not mounted: still pending
    assert not eng.boot_state.host_crash and eng.suspect == set()
    asyncio.run(eng.stop())
    eng = _engine(tmp_path, "boot-C", failed=late)    # a clean reboot, still not mounted
    assert not eng.boot_state.host_crash and eng.suspect == set()
    asyncio.run(eng.stop())
    eng = _engine(tmp_path, "boot-C")
    assert eng.suspect == keys
    eng.store.close()
    # Not settled yet: suspect still, from the record, and the disk no longer pending.
    eng = _engine(tmp_path, "boot-C")
    assert eng.suspect == keys and eng.boot_state.unscanned == set()
    eng.store.close()


def test_an_old_record_without_the_list_still_reads(tmp_path):
    (tmp_path / STATE_FILE).write_text(json.dumps({"boot_id": "boot-A", "clean": True, "suspect": []}))
    state = BootState(tmp_path, "boot-B")
    assert state.begin([("v", 0)], unscanned=["/x"], by_disk={"/y": [("v", 0)]}) == set()
    assert not state.host_crash and state.unscanned == set()
