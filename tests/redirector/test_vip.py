"""The VIP: one holder at a time, failover on SIGKILL, release when etcd is gone.

The netns tests build a private LAN (root only): netns ``c`` holds a bridge (10.77.0.1/24),
etcd on that address, and is where the "initiator" connects from; netns ``a`` and ``b`` are
two redirector hosts, each with an ``eth0`` veth on the bridge. A ``tests.redirector.vipd``
process in each runs a VipHolder that answers TCP on VIP:3260 while it holds the VIP. So a
failover is observed the way an initiator sees it: through ARP (gratuitous, from the new
holder) and a TCP connect to the VIP. The last test runs the real daemons instead
(``redirector.server`` on a and b, meta and a chunk server in c) and logs in with libiscsi
through the VIP. Nothing is bound outside these namespaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import socket
import struct
import subprocess
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from redirector import arp
from redirector.vip import VipHolder
from tests.cluster import ETCD, PY, Proc, async_wait_for, wait_for
from zstore.config import RedirectorConfig
from zstore.keys import Keys
from zstore.records import VipRecord

VIP, PORT, TTL = "10.77.0.100", 3260, 3
# How long a test watches a standby campaign and lose. Deliberately a fixed wait, not a poll: it
# proves that nothing happens (the standby does not take the held VIP), and a campaign that
# loses leaves no trace to poll for. A standby tries every VipHolder.poll = 0.25 s (ttl 2-3 s).
STANDBY_WATCH = 1.0
ETCD_URL = "http://10.77.0.1:2379"
HOST_IP = {"a": "10.77.0.11", "b": "10.77.0.12"}
CLONE_NEWNET = 0x40000000

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None or
                                shutil.which("etcdctl") is None,
                                reason="needs root, iproute2 and etcdctl (network namespaces)")


# ---- pure pieces ------------------------------------------------------------------------------

def test_garp_frames_layout():
    mac = bytes.fromhex("020000000001")
    req, rep = arp.garp_frames(mac, "10.0.0.7")
    for frame, op, tha in ((req, 1, b"\0" * 6), (rep, 2, mac)):
        assert len(frame) == 60 and frame[:6] == b"\xff" * 6 and frame[6:12] == mac
        assert frame[12:14] == b"\x08\x06"
        htype, ptype, hlen, plen, oper, sha, spa, tha_, tpa = struct.unpack("!HHBBH6s4s6s4s", frame[14:42])
        assert (htype, ptype, hlen, plen, oper) == (1, 0x0800, 6, 4, op)
        assert sha == mac and tha_ == tha and spa == tpa == socket.inet_aton("10.0.0.7")
    with pytest.raises(ValueError):
        arp.garp_frames(b"\0" * 4, "10.0.0.7")


# ---- two holders in one process, loopback VIP (no address to manage) ---------------------------

class Events:
    def __init__(self) -> None:
        self.log: list[tuple[str, int | None]] = []

    async def acquire(self, rec: VipRecord) -> None:
        self.log.append(("acquire", rec.epoch))

    async def release(self) -> None:
        self.log.append(("release", None))


@pytest.mark.timeout(60)
async def test_one_holder_then_handover_on_stop_and_on_record_loss(etcd_client, etcd_config):
    keys = Keys(etcd_config.prefix)
    cfg = RedirectorConfig(vip="127.0.0.2", port=3260, interface=None, lease_ttl=2)
    h1, h2 = VipHolder(etcd_client, keys, cfg, "r1"), VipHolder(etcd_client, keys, cfg, "r2")
    e1, e2 = Events(), Events()
    s1, s2 = asyncio.Event(), asyncio.Event()
    t1 = asyncio.ensure_future(h1.run(s1, e1.acquire, e1.release))
    await async_wait_for(lambda: h1.holding, 10, "r1 holds")
    t2 = asyncio.ensure_future(h2.run(s2, e2.acquire, e2.release))
    try:
        await async_wait_for(lambda: etcd_client.get(keys.redirector_member("r2")), 10, "r2 registered")
        await asyncio.sleep(STANDBY_WATCH)               # r2 campaigns ~4 times and loses
        assert h1.holding and not h2.holding and h1.record.epoch == 1
        cur = await h2.current()
        assert cur.redirector_id == "r1" and cur.vip == "127.0.0.2" and cur.port == 3260

        # clean stop: r1 releases and revokes its lease, so r2 takes over well inside the TTL
        t0 = time.monotonic()
        s1.set()
        await asyncio.wait_for(t1, 5)
        assert e1.log == [("acquire", 1), ("release", None)]
        await async_wait_for(lambda: h2.holding, 5, "r2 holds")
        assert time.monotonic() - t0 < 1.5 and h2.record.epoch == 2
        assert int((await etcd_client.get(keys.vip_epoch())).value) == 2

        # the record deleted by hand (how an operator moves the VIP): r2 drops it, campaigns again
        await etcd_client.delete(keys.vip())
        await async_wait_for(lambda: ("release", None) in e2.log, 5, "r2 releases")
        await async_wait_for(lambda: h2.holding, 5, "r2 holds again")
        assert e2.log == [("acquire", 2), ("release", None), ("acquire", 3)]
    finally:
        s1.set()
        s2.set()
        await asyncio.wait_for(asyncio.gather(t1, t2, return_exceptions=True), 10)
    assert not h2.holding and await etcd_client.get(keys.vip()) is None


# ---- a private LAN in network namespaces -----------------------------------------------------

def sh(*argv: str, check: bool = True, timeout: float = 15) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=timeout)


class Lan:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        tag = f"{os.getpid() % 100000}{uuid.uuid4().hex[:4]}"
        self.ns = {n: f"zvip{tag}{n}" for n in "cab"}
        self.prefix = f"/t-{uuid.uuid4().hex[:10]}"
        self.etcd: Proc | None = None
        self.procs: list[Proc] = []
        self._libc = ctypes.CDLL(None, use_errno=True)

    def up(self) -> None:
        c = self.ns["c"]
        for name in self.ns.values():
            sh("ip", "netns", "add", name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "-n", c, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", c, "addr", "add", "10.77.0.1/24", "dev", "br0")
        sh("ip", "-n", c, "link", "set", "br0", "up")
        for h in "ab":
            sh("ip", "-n", c, "link", "add", f"h{h}", "type", "veth", "peer", "name", "eth0", "netns", self.ns[h])
            sh("ip", "-n", c, "link", "set", f"h{h}", "master", "br0", "up")
            sh("ip", "-n", self.ns[h], "addr", "add", f"{HOST_IP[h]}/24", "dev", "eth0")
            sh("ip", "-n", self.ns[h], "link", "set", "eth0", "up")

    def down(self) -> None:
        for p in self.procs:
            p.kill()
        if self.etcd:
            self.etcd.kill()
        for name in self.ns.values():
            sh("ip", "netns", "del", name, check=False)

    def exec(self, host: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[host], *argv]

    def start_etcd(self) -> None:
        argv = self.exec("c", ETCD, "--name", "t", "--data-dir", str(self.workdir / "etcd-data"),
                         "--listen-client-urls", ETCD_URL, "--advertise-client-urls", ETCD_URL,
                         "--listen-peer-urls", "http://127.0.0.1:2380",
                         "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
                         "--initial-cluster", "t=http://127.0.0.1:2380", "--log-level", "warn")
        self.etcd = Proc("etcd", argv, self.workdir / "etcd.log").start()
        wait_for(lambda: self.etcdctl("endpoint", "health").returncode == 0, 20, "etcd in the LAN")

    def etcdctl(self, *args: str) -> subprocess.CompletedProcess:
        return sh(*self.exec("c", "etcdctl", "--endpoints", ETCD_URL, "--command-timeout=2s", *args),
                  check=False)

    def get(self, key: bytes) -> str | None:
        r = self.etcdctl("get", key.decode(), "--print-value-only")
        assert r.returncode == 0, r.stderr
        return r.stdout.strip() or None

    def start_vipd(self, host: str, rid: str) -> Proc:
        p = Proc(rid, self.exec(host, PY, "-m", "tests.redirector.vipd", "--etcd", ETCD_URL,
                                "--prefix", self.prefix, "--id", rid, "--vip", VIP, "--port", str(PORT),
                                "--interface", "eth0", "--ttl", str(TTL)),
                 self.workdir / f"{rid}.log").start()
        self.procs.append(p)
        return p

    def has_vip(self, host: str) -> bool:
        out = sh("ip", "-n", self.ns[host], "-o", "addr", "show", "dev", "eth0").stdout
        return f"inet {VIP}/32 " in out

    def mac(self, host: str) -> str:
        return sh("ip", "-n", self.ns[host], "-o", "link", "show", "eth0").stdout.split("link/ether ")[1].split()[0]

    @contextlib.contextmanager
    def inside(self, host: str) -> Iterator[None]:
        """This thread in netns ``host`` (setns moves only the calling thread): the sockets it
        opens meanwhile live there."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        fd = os.open(f"/run/netns/{self.ns[host]}", os.O_RDONLY)
        try:
            if self._libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {host}")
            try:
                yield
            finally:
                if self._libc.setns(home, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back home")
        finally:
            os.close(fd)
            os.close(home)

    def ask(self, timeout: float = 0.3) -> str | None:
        """Connect to VIP:PORT from the client netns: the holder's 'ID EPOCH', or None."""
        with self.inside("c"):
            try:
                with socket.create_connection((VIP, PORT), timeout=timeout) as s:
                    s.settimeout(timeout)
                    return s.recv(100).decode().strip() or None
            except OSError:
                return None

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}:\n{p.log()[-3000:]}" for p in [*self.procs, *filter(None, [self.etcd])])


@pytest.fixture
def lan(tmp_path) -> Iterator[Lan]:
    net = Lan(tmp_path)
    try:
        net.up()
        net.start_etcd()
        yield net
    finally:
        net.down()


def wait_holder(lan: Lan, rid: str, timeout: float, since: float | None = None) -> tuple[float, str]:
    """Poll the VIP from the client every ~50 ms until ``rid`` answers: (seconds since ``since``
    (default: now), answer)."""
    t0 = time.monotonic() if since is None else since
    while time.monotonic() - t0 < timeout:
        got = lan.ask()
        if got and got.split()[0] == rid:
            return time.monotonic() - t0, got
        time.sleep(0.05)
    raise AssertionError(f"{rid} did not answer on the VIP within {timeout}s\n{lan.logs()}")


@needs_root
@pytest.mark.timeout(60)
def test_gratuitous_arp_updates_the_lan_neighbour_cache(lan: Lan):
    """The client has a (stale) wrong MAC for the VIP; a's announce replaces it with a's."""
    c = lan.ns["c"]
    sh("ip", "-n", c, "neigh", "replace", VIP, "lladdr", "02:00:00:00:00:01", "dev", "br0", "nud", "stale")
    with lan.inside("a"):
        assert arp.announce("eth0", VIP)
    want = lan.mac("a")
    wait_for(lambda: want in sh("ip", "-n", c, "neigh", "show", VIP).stdout, 3, f"neighbour {VIP} -> {want}")
    with lan.inside("a"):
        assert not arp.announce("lo", "127.0.0.2")      # no Ethernet address: nothing sent


@needs_root
@pytest.mark.slow
@pytest.mark.timeout(90)
def test_failover_on_sigkill_of_the_holder(lan: Lan):
    a = lan.start_vipd("a", "rA")
    wait_holder(lan, "rA", 15)
    assert lan.has_vip("a") and not lan.has_vip("b")
    assert lan.get(Keys(lan.prefix).vip_epoch()) == "1"
    b = lan.start_vipd("b", "rB")
    wait_for(lambda: lan.get(Keys(lan.prefix).redirector_member("rB")), 15, "rB registered")
    time.sleep(STANDBY_WATCH)                             # rB campaigns and loses
    assert lan.ask() == "rA 1" and not lan.has_vip("b"), lan.logs()

    # SIGKILL the holder: rB serves the VIP (address, ARP, listener) within 5 s
    t0 = time.monotonic()
    a.kill()
    took, answer = wait_holder(lan, "rB", 10, since=t0)
    print(f"\nVIP failover after SIGKILL of the holder: {took:.2f}s (lease ttl {TTL}s)")
    assert took < 5.0, lan.logs()
    assert answer == "rB 2" and lan.has_vip("b")
    assert lan.get(Keys(lan.prefix).vip_epoch()) == "2"
    rec = VipRecord.decode(lan.get(Keys(lan.prefix).vip()).encode())
    assert (rec.redirector_id, rec.vip, rec.port, rec.epoch, rec.interface) == ("rB", VIP, PORT, 2, "eth0")
    assert lan.mac("b") in sh("ip", "-n", lan.ns["c"], "neigh", "show", VIP).stdout

    # the dead holder's address goes by its kernel lifetime (nobody extends it any more)
    wait_for(lambda: not lan.has_vip("a"), TTL + 3 - (time.monotonic() - t0), "rA's address to expire")
    print(f"dead holder's address expired {time.monotonic() - t0:.2f}s after the kill")

    # a restarted redirector first removes an address it finds (here: a permanent one), then waits
    sh("ip", "-n", lan.ns["a"], "addr", "add", f"{VIP}/32", "dev", "eth0")
    lan.procs.remove(a)
    a = lan.start_vipd("a", "rA")
    wait_for(lambda: not lan.has_vip("a"), 10, "stale address removed at start")
    wait_for(lambda: lan.get(Keys(lan.prefix).redirector_member("rA")), 15, "rA registered again")
    assert lan.ask() == "rB 2"

    # clean stop of the holder (SIGTERM): lease revoked, so the handover is fast
    t0 = time.monotonic()
    b.stop()
    took, answer = wait_holder(lan, "rA", 5, since=t0)
    print(f"VIP handover after SIGTERM of the holder: {took:.2f}s")
    assert took < 2.0 and answer == "rA 3" and not lan.has_vip("b")
    assert "vipd rB released" in b.log()


@needs_root
@pytest.mark.slow
@pytest.mark.timeout(90)
def test_holder_that_loses_etcd_releases_the_vip(lan: Lan):
    lan.start_vipd("a", "rA")
    wait_holder(lan, "rA", 15)
    lan.start_vipd("b", "rB")
    wait_for(lambda: lan.get(Keys(lan.prefix).redirector_member("rB")), 15, "rB registered")

    t0 = time.monotonic()
    lan.etcd.kill()
    wait_for(lambda: not lan.has_vip("a"), TTL + 1, "rA to remove the VIP")
    took = time.monotonic() - t0
    print(f"\nholder released the VIP {took:.2f}s after etcd was killed (lease ttl {TTL}s)")
    assert lan.ask() is None and not lan.has_vip("b")
    assert "vipd rA released" in lan.procs[0].log()

    # etcd back: someone holds it again, one epoch later
    lan.start_etcd()
    holder, epoch = wait_for(lan.ask, 20, "a holder again").split()
    assert holder in ("rA", "rB") and epoch == "2", lan.logs()


def log_time(text: str, needle: str) -> float:
    """Wall time of the first log line containing ``needle`` (both daemons share this clock)."""
    import datetime
    line = next(ln for ln in text.splitlines() if needle in ln)
    return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


@needs_root
@pytest.mark.slow
@pytest.mark.timeout(90)
def test_partitioned_holder_releases_before_the_other_takes_over(lan: Lan):
    """The holder's link goes down: its etcd calls hang rather than fail. It must stop
    serving (and drop the address) before its lease can expire, i.e. before the other
    redirector can acquire; and come back as a standby when the link returns."""
    a = lan.start_vipd("a", "rA")
    wait_holder(lan, "rA", 15)
    b = lan.start_vipd("b", "rB")
    wait_for(lambda: lan.get(Keys(lan.prefix).redirector_member("rB")), 15, "rB registered")

    t0 = time.monotonic()
    sh("ip", "-n", lan.ns["c"], "link", "set", "ha", "down")       # a's cable pulled
    wait_for(lambda: not lan.has_vip("a"), TTL, "partitioned rA to remove the VIP")
    released = time.monotonic() - t0
    took, answer = wait_holder(lan, "rB", 10, since=t0)
    print(f"\npartitioned holder released after {released:.2f}s; rB answered after {took:.2f}s")
    assert answer == "rB 2"
    gap = log_time(b.log(), "(epoch 2)") - log_time(a.log(), "releasing VIP")
    print(f"rA released {gap:.2f}s before rB acquired")
    assert gap > 0, lan.logs()

    sh("ip", "-n", lan.ns["c"], "link", "set", "ha", "up")
    wait_for(lambda: "acquired" not in a.log().split("released", 1)[1] and
             lan.get(Keys(lan.prefix).redirector_member("rA")), 20, "rA back as a standby")
    time.sleep(STANDBY_WATCH)                             # rA, back, campaigns and loses
    assert lan.ask() == "rB 2" and not lan.has_vip("a")


# ---- the real daemons ----------------------------------------------------------------------

INIT = "iqn.2026-01.io.zstore.test:vip-init"


@needs_root
@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.skipif(not shutil.which("iscsi-ls"), reason="libiscsi-bin is not installed")
def test_two_redirector_daemons_iscsi_through_the_vip_after_sigkill(lan: Lan):
    """meta and a chunk server (portal 10.77.0.1:3261) run in the client's netns, a redirector
    daemon (zstore-redirector, VIP on eth0) on each of a and b. libiscsi in the client knows only
    the VIP: discovery and a login (redirected to the chunk server) work before and after the
    holder is SIGKILLed, and cluster status names the new holder."""
    import types
    from tests.cluster import Cluster, write_config
    url = f"iscsi://{VIP}:{PORT}"

    def redirector(host: str, rid: str) -> Proc:
        cfg = write_config(lan.workdir / f"{rid}.toml", {
            "etcd": {"endpoints": [ETCD_URL], "prefix": lan.prefix},
            "redirector": {"vip": VIP, "port": PORT, "interface": "eth0", "redirector_id": rid,
                           "lease_ttl": TTL, "login_timeout": 5.0}})
        p = Proc(rid, lan.exec(host, PY, "-m", "redirector.server", "--config", str(cfg)),
                 lan.workdir / f"{rid}.log").start()
        lan.procs.append(p)
        return p

    def iscsi(*argv: str, timeout: float = 20) -> subprocess.CompletedProcess:
        return sh(*lan.exec("c", *argv), check=False, timeout=timeout)

    with lan.inside("c"):            # meta, chunk server and the CLI live in the client's netns
        c = Cluster(workdir=lan.workdir / "cluster", etcd=types.SimpleNamespace(endpoint=ETCD_URL[7:]),
                    prefix=lan.prefix, lease_ttl=TTL)
        try:
            c.start_meta()
            c.start_chunk(options={"portal": "10.77.0.1:3261"})
            c.wait_chunks_up(1)
            assert c.api("POST", "/volumes", {"name": "v", "size": "64Mi", "replicas": 1})[0] == 201
            assert c.api("PUT", f"/volumes/v/acl/{INIT}")[0] == 200
            vol = c.api("GET", "/volumes/v")[1]
            lun_url = f"{url}/{vol['target_iqn']}/{vol['lun']}"

            a = redirector("a", "rA")
            wait_for(lambda: "holding VIP" in a.log(), 30, f"rA to hold the VIP\n{lan.logs()}")
            b = redirector("b", "rB")
            wait_for(lambda: "campaigning for VIP" in b.log(), 30, "rB to campaign")
            wait_for(lambda: iscsi("iscsi-inq", "-i", INIT, lun_url).returncode == 0, 30,
                     "iscsi-inq through the VIP (held by rA)")
            assert c.api("GET", "/cluster")[1]["vip"]["holder"] == "rA"

            t0 = time.monotonic()
            a.kill()
            wait_for(lambda: iscsi("iscsi-inq", "-i", INIT, lun_url, timeout=2).returncode == 0, 10,
                     "iscsi-inq through the VIP (held by rB)", interval=0.05)
            took = time.monotonic() - t0
            print(f"\niSCSI login through the VIP works again {took:.2f}s after SIGKILL of the "
                  f"holding redirector daemon")
            assert took < 6.0, lan.logs()
            ls = iscsi("iscsi-ls", "-i", INIT, "-s", url)
            assert ls.returncode == 0 and vol["target_iqn"] in ls.stdout, ls.stdout + ls.stderr
            assert f"Portal:{VIP}:{PORT},1" in ls.stdout and lan.has_vip("b")
            st = c.api("GET", "/cluster")[1]["vip"]
            assert (st["holder"], st["epoch"], st["portal"], st["interface"]) == ("rB", 2, f"{VIP}:{PORT}", "eth0")
            assert f"redirect {INIT} -> {vol['target_iqn']}: chunk" in b.log()
        finally:
            c.stop()
