"""A snapshot exported read-only as a LUN, end to end: real etcd, meta and two chunk servers on
loopback, real initiators (qemu-io, libiscsi's iscsi-inq/iscsi-ls) and a hand-built WRITE(10).

Write A, snapshot, write B, export the snapshot, put the initiator on its ACL: through iSCSI the
snapshot LUN reads A (on either chunk server) while the volume reads B; writes to it are refused
with a write-protect error; an initiator only on the volume's ACL does not see it; its VPD 0x83
WWN is its own, not the volume's.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import struct

import pytest

from chunk.iscsi import pdu as P
from tests.chunk.storage.test_replication import INIT, make_volume, opts, qemu_io, run, wait_served
from tests.cluster import Cluster, cluster, wait_for
from tests.redirector.iscsi_client import RawInitiator

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (shutil.which("qemu-io") and shutil.which("iscsi-inq")),
                                 reason="qemu-utils / libiscsi-bin are not installed")]

OTHER = "iqn.2026-01.io.zstore.test:other"
MiB = 1 << 20


def qemu_read(c: Cluster, lun: dict, chunk: int, *cmds: str) -> None:
    """qemu-io opened read-only (-r): qemu refuses a write-protected LUN read-write."""
    argv = ["qemu-io", "-r", "--image-opts", opts(c, lun, chunk)]
    for cmd in cmds:
        argv += ["-c", cmd]
    r = run(*argv, timeout=120)
    out = r.stdout.decode() + r.stderr.decode()
    assert r.returncode == 0 and "failed" not in out and "error" not in out.lower(), out


def url(c: Cluster, lun: dict, chunk: int) -> str:
    return f"iscsi://127.0.0.1:{c.portals[chunk]}/{lun['target_iqn']}/{lun['lun']}"


def wwn_of(c: Cluster, lun: dict, chunk: int, initiator: str = INIT) -> bytes:
    """The logical unit's NAA designator in VPD page 0x83 as iscsi-inq prints it: raw, with
    printf's %s, so it stops at the first zero byte (compare with ``printed_wwn``)."""
    r = run("iscsi-inq", "-i", initiator, "-e", "1", "-c", "131", url(c, lun, chunk), timeout=15)
    out = r.stdout
    assert r.returncode == 0, out.decode(errors="backslashreplace") + r.stderr.decode()
    at = out.find(b"Designator Type:(3) NAA")
    assert at >= 0, out.decode(errors="backslashreplace")
    start = out.index(b"Designator:[", at) + len(b"Designator:[")
    return out[start:out.index(b"]\n", start)]


def printed_wwn(wwn_hex: str) -> bytes:
    """What iscsi-inq prints for a 16-byte designator: up to its first zero byte."""
    return bytes.fromhex(wwn_hex).split(b"\0")[0]


def luns_seen(c: Cluster, initiator: str, target: str, chunk: int) -> set[int]:
    """LUN numbers REPORT LUNS gives this initiator on this target (iscsi-ls -s)."""
    r = run("iscsi-ls", "-s", "-i", initiator, f"iscsi://127.0.0.1:{c.portals[chunk]}", timeout=30)
    out = r.stdout.decode()
    assert r.returncode == 0, out + r.stderr.decode()
    seen, current = set(), None
    for line in out.splitlines():
        m = re.match(r"Target:(\S+)", line.strip())
        if m:
            current = m.group(1)
        m = re.match(r"Lun:(\d+)", line.strip())
        if m and current == target:
            seen.add(int(m.group(1)))
    return seen


async def raw_write10(port: int, target: str, lun: int) -> tuple[int, bytes]:
    """(SCSI status, sense) of a one-block WRITE(10) with immediate data, past any unit attention."""
    ini = await RawInitiator.connect("127.0.0.1", port)
    try:
        resp, _ = await ini.login(INIT, target, [("ImmediateData", "Yes"), ("InitialR2T", "No")])
        assert resp.status_class == 0, resp
        for _ in range(3):
            ini.itt += 1
            cdb = struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0)
            ini.w.write(P.ScsiCommand(write=True, lun=P.encode_lun(lun), itt=ini.itt, expected_length=512,
                                      cmdsn=ini.cmdsn, expstatsn=ini.expstatsn, cdb=cdb,
                                      data=b"\xee" * 512).to_bytes())
            ini.cmdsn += 1
            while True:
                got = await ini.recv()
                if isinstance(got, P.ScsiResponse):
                    break
            sense = got.sense
            if got.status == 0x02 and len(sense) > 2 and sense[2] & 0x0F == 0x06:
                continue                                   # UNIT ATTENTION (power on): once more
            return got.status, sense
        raise AssertionError("unit attention did not clear")
    finally:
        ini.close()


@pytest.mark.timeout(300)
def test_snapshot_lun_reads_the_snapshot_and_refuses_writes(tmp_path, etcd_server):
    with cluster(tmp_path, etcd_server, metas=1, chunks=2) as c:
        c.wait_chunks_up(2)
        vol = make_volume(c, "v", "128Mi", 2)                  # INIT on the volume's ACL
        assert c.api("PUT", f"/volumes/v/acl/{OTHER}")[0] == 200
        wait_served(c, vol, 0)
        qemu_io(c, vol, 0, "write -P 0xaa 0 4M", "write -P 0xaa 100M 1M")
        c.cli("snapshot", "create", "v@s", check=True)
        qemu_io(c, vol, 0, "write -P 0xbb 0 2M", "write -P 0xbb 100M 4k")
        c.cli("volume", "resize", "v", "--size", "192Mi", check=True)     # grown after the snapshot

        exp = c.cli_json("snapshot", "export", "v@s")
        snap_lun = {"target_iqn": exp["target_iqn"], "lun": exp["lun"]}
        assert exp["readonly"] and (exp["target_iqn"], exp["lun"]) != (vol["target_iqn"], vol["lun"])
        # Exported but on nobody's ACL: masked, even for the volume's own initiators.
        assert exp["lun"] not in luns_seen(c, INIT, exp["target_iqn"], 0)
        assert run("iscsi-inq", "-i", INIT, url(c, snap_lun, 0), timeout=15).returncode != 0

        c.cli("acl", "add", "v@s", INIT, check=True)
        wait_served(c, snap_lun, 0)
        # The snapshot LUN reads A (through either chunk server), the volume reads B.
        for chunk in (0, 1):
            qemu_read(c, snap_lun, chunk, "read -P 0xaa 0 4M", "read -P 0xaa 100M 1M", "read -P 0 4M 1M")
        qemu_io(c, vol, 0, "read -P 0xbb 0 2M", "read -P 0xaa 2M 2M", "read -P 0xbb 100M 4k")
        # Its capacity is the snapshot's, not the grown volume's.
        r = run("iscsi-readcapacity16", "-i", INIT, url(c, snap_lun, 0), timeout=15)
        out = r.stdout.decode()
        assert r.returncode == 0 and f"Total size:{128 * MiB}\n" in out, out
        r = run("iscsi-readcapacity16", "-i", INIT, url(c, vol, 0), timeout=15)
        assert f"Total size:{192 * MiB}\n" in r.stdout.decode(), r.stdout.decode()

        # Writes are refused: qemu will not open a write-protected LUN read-write ...
        r = run("qemu-io", "--image-opts", opts(c, snap_lun, 0), "-c", "write -P 0xcc 0 4k", timeout=60)
        err = r.stdout.decode() + r.stderr.decode()
        assert r.returncode != 0 and "write protected" in err.lower(), err
        # ... and a WRITE(10) sent anyway gets CHECK CONDITION, DATA PROTECT / WRITE PROTECTED.
        status, sense = asyncio.run(raw_write10(c.portals[1], exp["target_iqn"], exp["lun"]))
        assert status == 0x02 and sense[2] & 0x0F == 0x07 and sense[12:14] == b"\x27\x00", sense.hex()
        qemu_read(c, snap_lun, 1, "read -P 0xaa 0 4M")                      # nothing changed

        # OTHER is on the volume's ACL only: it sees the volume's LUN, not the snapshot's.
        seen = luns_seen(c, OTHER, exp["target_iqn"], 1)
        assert exp["lun"] not in seen
        if vol["target_iqn"] == exp["target_iqn"]:
            assert vol["lun"] in seen and exp["lun"] in luns_seen(c, INIT, exp["target_iqn"], 1)
        assert run("iscsi-inq", "-i", OTHER, url(c, snap_lun, 1), timeout=15).returncode != 0

        # VPD 0x83: the snapshot LUN carries its own WWN.
        snap_wwn, vol_wwn = wwn_of(c, snap_lun, 0), wwn_of(c, vol, 0)
        assert snap_wwn == printed_wwn(exp["wwn"]) and vol_wwn == printed_wwn(vol["wwn"]), (snap_wwn, vol_wwn)
        assert exp["wwn"] != vol["wwn"] and len(exp["wwn"]) == len(vol["wwn"]) == 32

        # Unexport: the LUN is gone for everyone, and chunk1 closes the snapshot's view (it keeps the
        # volume, which iscsi-ls opened there); the snapshot itself stays.
        chunk1 = (c.workdir / "chunk1" / "chunk-id").read_text().strip()

        def open_volumes() -> int:
            return c.cli_json("chunk", "show", chunk1)["storage"].get("open_volumes", -1)

        wait_for(lambda: open_volumes() == 2, 30, "chunk1 serving the volume and the snapshot view")
        c.cli("snapshot", "unexport", "v@s", check=True)
        wait_for(lambda: run("iscsi-inq", "-i", INIT, url(c, snap_lun, 0), timeout=15).returncode != 0,
                 20, "the unexported LUN gone")
        wait_for(lambda: open_volumes() == 1, 30, "the snapshot view closed on chunk1")
        assert [s["name"] for s in c.cli_json("snapshot", "list", "v")] == ["s"]
        qemu_io(c, vol, 0, "read -P 0xbb 0 2M")
