"""Chunk servers publish their iSCSI sessions, and draining moves initiators off.

Real processes throughout: etcd, a meta server, two chunk servers on loopback,
qemu-io (libiscsi) as a long-lived initiator, and a hand-built initiator that
ignores the target's logout request, to see the target close it after the grace.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time

import pytest

from chunk.iscsi import pdu as P
from chunk.iscsi.constants import TARGET_OPCODES, AsyncEvent
from tests.chunk.iscsi.raw_login import normal_login
from tests.cluster import Cluster, Etcd, port_open, wait_for

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (shutil.which("iscsi-inq") and shutil.which("qemu-io")),
                                 reason="libiscsi-bin and qemu-utils are needed")]

INIT = "iqn.2026-01.io.zstore.test:sessions"
STUBBORN = "iqn.2026-01.io.zstore.test:stubborn"
GRACE = 2.0            # chunk.drain_grace for these servers: keep the tests short
VIP = "127.0.0.2"      # the redirector's portal (a loopback address: no ARP)
PROMPT = 5.0           # a session change shows within this (the periodic refresh is 10 s)


@pytest.fixture
def two(tmp_path, etcd_server: Etcd):
    c = Cluster(workdir=tmp_path, etcd=etcd_server)
    try:
        c.start_meta()
        for _ in range(2):
            c.start_chunk(options={"drain_grace": GRACE})
        c.wait_chunks_up(2)
        for port in c.portals:
            wait_for(lambda: port_open(port), 20, f"portal {port}")
        yield c
    finally:
        c.stop()


def make_volume(c: Cluster, initiators: tuple[str, ...] = (INIT,)) -> dict:
    status, vol = c.api("POST", "/volumes", {"name": "v", "size": "64Mi", "replicas": 1})
    assert status == 201, vol
    for iqn in initiators:
        assert c.api("PUT", f"/volumes/v/acl/{iqn}")[0] == 200
    url = f"iscsi://127.0.0.1:{c.portals[0]}/{vol['target_iqn']}/{vol['lun']}"
    wait_for(lambda: subprocess.run(["iscsi-inq", "-i", INIT, url], capture_output=True, timeout=30)
             .returncode == 0, 20, "the LUN to be served")
    return vol


def chunk_by_portal(c: Cluster, i: int) -> dict:
    status, body = c.api("GET", "/chunks")
    assert status == 200, body
    return next(ch for ch in body["chunks"] if ch["portal"] == f"127.0.0.1:{c.portals[i]}")


def sessions(c: Cluster, i: int, initiator: str = INIT) -> list[dict]:
    return [s for s in chunk_by_portal(c, i)["sessions"] if s["initiator"] == initiator]


class QemuIo:
    """One interactive qemu-io: a libiscsi session that lives as long as the process."""

    def __init__(self, c: Cluster, vol: dict, chunk: int | None = None, portal: str | None = None):
        portal = portal or f"127.0.0.1:{c.portals[chunk]}"
        opts = (f"driver=iscsi,transport=tcp,portal={portal},"
                f"target={vol['target_iqn']},lun={vol['lun']},initiator-name={INIT}")
        self.p = subprocess.Popen(["qemu-io", "--image-opts", opts], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def cmd(self, line: str) -> str:
        """Run one command; its output ends with a rate line or '<cmd> failed: ...'."""
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        out = []
        while True:
            s = self.p.stdout.readline()
            out.append(s)
            if "ops/sec" in s or s.startswith(("read failed", "write failed")) or not s:
                return "".join(out)

    def quit(self) -> None:
        self.p.stdin.write("quit\n")
        self.p.stdin.flush()
        self.p.wait(20)

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(10)


def test_sessions_show_up_in_chunk_list_and_go_away(two: Cluster):
    c = two
    vol = make_volume(c)
    q = QemuIo(c, vol, chunk=0)
    try:
        assert "ops/sec" in q.cmd("write -P 0x11 0 4096")
        t0 = time.monotonic()
        got = wait_for(lambda: sessions(c, 0), PROMPT, "the qemu-io session in the chunk list")
        print(f"session listed {time.monotonic() - t0:.2f}s after the first command")
        s, = got
        assert s["type"] == "normal" and s["target"] == vol["target_iqn"]
        assert abs(s["since"] - time.time()) < 60 and s["tsih"] > 0 and s["peer"].startswith("127.0.0.1:")
        assert sessions(c, 1) == []
        # the CLI: the whole list in JSON, a count of normal sessions in the table
        listed = {ch["portal"]: ch for ch in c.cli_json("chunk", "list")}
        assert [x["initiator"] for x in listed[f"127.0.0.1:{c.portals[0]}"]["sessions"]] == [INIT]
        table = c.cli("chunk", "list", check=True).stdout.splitlines()
        col = table[0].split().index("SESSIONS")
        counts = {r.split()[3]: r.split()[col] for r in table[1:]}
        assert counts == {f"127.0.0.1:{c.portals[0]}": "1", f"127.0.0.1:{c.portals[1]}": "0"}
        q.quit()
        t0 = time.monotonic()
        wait_for(lambda: not sessions(c, 0), PROMPT, "the session to leave the list")
        print(f"session gone from the list {time.monotonic() - t0:.2f}s after qemu-io quit")
    finally:
        q.kill()


def test_drain_asks_sessions_to_log_out_and_still_accepts_logins(two: Cluster):
    c = two
    vol = make_volume(c)
    q = QemuIo(c, vol, chunk=0)
    cid = chunk_by_portal(c, 0)["chunk_id"]
    try:
        assert "ops/sec" in q.cmd("write -P 0x5a 0 65536")
        first, = wait_for(lambda: sessions(c, 0), PROMPT, "the qemu-io session")
        c.cli("chunk", "drain", cid, check=True)
        drained = time.monotonic()
        # libiscsi honours the request: it logs out (the session leaves the list) and logs in
        # again at the portal it knows, which a draining server still accepts
        wait_for(lambda: all(s["tsih"] != first["tsih"] for s in sessions(c, 0)), GRACE + PROMPT,
                 "the first session to log out")
        assert "ops/sec" in q.cmd("read -P 0x5a 0 65536")
        assert "draining: asking 1 sessions to log out" in c.chunks[0].log()
        # A login within the grace is asked too (the redirector may not know yet); one after
        # it is served and left alone. Fixed waits, not polls: nothing is to happen (the grace
        # ends silently when everyone logged out; a target that closed sessions anyway would
        # log "did not log out" and drop the new session).
        time.sleep(max(0.0, drained + GRACE + 1.5 - time.monotonic()))
        second, = wait_for(lambda: sessions(c, 0), PROMPT, "the new session")
        assert second["tsih"] != first["tsih"]
        time.sleep(1.0)
        log = c.chunks[0].log()
        log = c.chunks[0].log()
        assert "did not log out" not in log          # it did; and the new session is left alone
        assert [s["tsih"] for s in sessions(c, 0)] == [second["tsih"]]
        c.cli("chunk", "undrain", cid, check=True)
        wait_for(lambda: "admin state draining -> active" in c.chunks[0].log(), 10, "undrain to arrive")
    finally:
        q.kill()


def test_drain_moves_a_vip_session_to_the_other_chunk_server(two: Cluster):
    """The whole point: an initiator that logged in through the VIP is asked to log out,
    logs in at the VIP again, and the redirector (which skips draining servers) sends it
    to the other chunk server; its data is there (any chunk server reads the volume's replicas)."""
    c = two
    vol = make_volume(c)
    c.start_redirector(VIP)
    host, port = c.vips[0]
    q = QemuIo(c, vol, portal=f"{host}:{port}")
    try:
        assert "ops/sec" in q.cmd("write -P 0x77 0 65536")
        on = wait_for(lambda: [i for i in (0, 1) if sessions(c, i)], PROMPT, "the session on a chunk server")
        assert len(on) == 1, on
        src, dst = on[0], 1 - on[0]
        c.cli("chunk", "drain", chunk_by_portal(c, src)["chunk_id"], check=True)
        t0 = time.monotonic()
        wait_for(lambda: sessions(c, dst) and not sessions(c, src), GRACE + PROMPT,
                 "the session to move to the other chunk server")
        print(f"session moved chunk{src} -> chunk{dst} {time.monotonic() - t0:.2f}s after the drain")
        assert "ops/sec" in q.cmd("read -P 0x77 0 65536")
        assert "ops/sec" in q.cmd("write -P 0x78 65536 4096")
        assert sessions(c, src) == []
        assert "did not log out" not in c.chunks[src].log()
    finally:
        q.kill()


class StubbornInitiator:
    """Logs in by hand and never logs out, whatever the target asks."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.r, self.w = reader, writer

    @classmethod
    async def login(cls, port: int, target_iqn: str) -> "StubbornInitiator":
        return cls(*await normal_login(port, target_iqn, STUBBORN))

    async def next_pdu(self, timeout: float) -> P.PDU | None:
        """The next PDU, or None at EOF (the target closed the connection)."""
        try:
            return await asyncio.wait_for(P.read_pdu(self.r, opcodes=TARGET_OPCODES), timeout)
        except asyncio.IncompleteReadError:
            return None

    def close(self) -> None:
        self.w.close()


async def test_drain_closes_sessions_that_ignore_the_logout_request(two: Cluster):
    c = two
    vol = await asyncio.to_thread(make_volume, c, (INIT, STUBBORN))
    ini = await StubbornInitiator.login(c.portals[1], vol["target_iqn"])
    try:
        await asyncio.to_thread(wait_for, lambda: sessions(c, 1, STUBBORN), PROMPT, "the session listed")
        cid = (await asyncio.to_thread(chunk_by_portal, c, 1))["chunk_id"]
        await asyncio.to_thread(c.cli, "chunk", "drain", cid, check=True)
        msg = await ini.next_pdu(10)
        asked = time.monotonic()
        assert isinstance(msg, P.AsyncMessage) and msg.event == AsyncEvent.LOGOUT_REQUESTED, msg
        assert msg.parameter3 == round(GRACE)          # "log out within" seconds
        assert await ini.next_pdu(GRACE + 10) is None   # we did not: the target closes the connection
        waited = time.monotonic() - asked
        assert GRACE - 0.5 < waited < GRACE + 5, waited
        await asyncio.to_thread(wait_for, lambda: not sessions(c, 1, STUBBORN), PROMPT, "the session gone")
        assert "draining: closing 1 sessions that did not log out" in c.chunks[1].log()
    finally:
        ini.close()


async def test_drain_asks_a_session_that_logs_in_during_the_grace_too(two: Cluster):
    """An initiator the redirector sends back before it has seen the drain must be asked as well."""
    c = two
    vol = await asyncio.to_thread(make_volume, c, (INIT, STUBBORN))
    cid = (await asyncio.to_thread(chunk_by_portal, c, 1))["chunk_id"]
    await asyncio.to_thread(c.cli, "chunk", "drain", cid, check=True)
    await asyncio.to_thread(wait_for, lambda: "admin state active -> draining" in c.chunks[1].log(),
                            GRACE / 2, "the drain to start")
    ini = await StubbornInitiator.login(c.portals[1], vol["target_iqn"])
    try:
        msg = await ini.next_pdu(GRACE)
        assert isinstance(msg, P.AsyncMessage) and msg.event == AsyncEvent.LOGOUT_REQUESTED, msg
        assert 1 <= msg.parameter3 <= round(GRACE)
        assert await ini.next_pdu(GRACE + 10) is None     # ignored: closed like the others
    finally:
        ini.close()


def test_chunk_list_json_has_sessions_for_every_chunk(two: Cluster):
    r = two.cli("chunk", "list", "--json", check=True)
    assert all(ch["sessions"] == [] for ch in json.loads(r.stdout))
