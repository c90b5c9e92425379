"""An IPv6 VIP serves at once, and its holder tells the LAN with an unsolicited NA.

A private LAN of two network namespaces made here (root only): ``h`` (the redirector host,
``eth0``) and ``c`` (a neighbour, ``veth0``), joined by a veth pair on which DAD really runs.
The VIP is added with the real VipAddress and listened on with the real RedirectPortal, in a
process started inside ``h``. Nothing is bound outside these namespaces.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import redirector
from redirector import arp
from redirector.vip import VipAddress
from tests.cluster import wait_for

VIP, PEER = "fd00:77::10", "fd00:77::1"
CODE = Path(redirector.__file__).resolve().parent.parent     # the code under test

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                reason="needs root and iproute2 (network namespaces)")


def sh(*argv: str, check: bool = True, timeout: float = 15) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=timeout)


def test_an_ipv6_vip_is_added_without_dad_an_ipv4_one_unchanged():
    v6, v4 = VipAddress(VIP, "eth0", lifetime=3), VipAddress("10.0.0.7", "eth0", lifetime=3)
    assert v6.add_args() == ["addr", "replace", f"{VIP}/128", "dev", "eth0",
                             "valid_lft", "3", "preferred_lft", "3", "nodad"]
    assert v4.add_args() == ["addr", "replace", "10.0.0.7/32", "dev", "eth0",
                             "valid_lft", "3", "preferred_lft", "3"]
    assert v6.announceable and not VipAddress("::1", "lo", lifetime=3).announceable


def test_neighbor_advert_layout():
    mac = bytes.fromhex("020000000001")
    pkt = arp.neighbor_advert(mac, VIP)
    assert len(pkt) == 32
    typ, code, _csum, flags = struct.unpack("!BBHI", pkt[:8])
    assert (typ, code, flags) == (136, 0, 0x20000000)          # Override, not Solicited/Router
    assert pkt[8:24] == bytes.fromhex("fd000077000000000000000000000010")
    assert pkt[24:] == b"\x02\x01" + mac                       # target link-layer address option


SERVE = r"""
import asyncio, socket, sys
from redirector.vip import VipAddress
from redirector.portal import RedirectPortal

async def main():
    a = VipAddress(sys.argv[1], "eth0", lifetime=30)
    await a.add()
    p = RedirectPortal(None, None, holding=lambda: True, login_timeout=1, max_connections=8)
    try:
        await p.open(sys.argv[1], 3260)
    except OSError as e:
        print("bind failed:", e, flush=True)
        return
    r, w = await asyncio.wait_for(asyncio.open_connection(sys.argv[1], 3260), 5)
    w.close()
    print("serving", flush=True)
    print("announced" if a.announce() else "not announced", flush=True)
    await p.close()

asyncio.run(main())
"""


@needs_root
@pytest.mark.timeout(60)
def test_an_ipv6_vip_can_be_listened_on_at_once_and_is_advertised():
    tag = uuid.uuid4().hex[:6]
    h, c = f"zv6{tag}h", f"zv6{tag}c"
    try:
        for ns in (h, c):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", h, "link", "add", "eth0", "type", "veth", "peer", "name", "veth0", "netns", c)
        sh("ip", "-n", c, "addr", "add", f"{PEER}/64", "dev", "veth0", "nodad")
        for ns, dev in ((h, "eth0"), (c, "veth0")):
            sh("ip", "-n", ns, "link", "set", dev, "up")
        for ns, dev in ((h, "eth0"), (c, "veth0")):      # a LAN that is up: link-locals past DAD
            wait_for(lambda: "tentative" not in sh("ip", "-n", ns, "-6", "-o", "addr", "show", "dev", dev).stdout
                     and "fe80::" in sh("ip", "-n", ns, "-6", "-o", "addr", "show", "dev", dev).stdout,
                     10, f"{dev} in {ns} to be up")
        # the neighbour still has the old holder's MAC for the VIP
        sh("ip", "-n", c, "neigh", "replace", VIP, "lladdr", "02:00:00:00:00:01", "dev", "veth0", "nud", "stale")

        run = sh("ip", "netns", "exec", h, sys.executable, "-c", SERVE, VIP, check=False, timeout=30)
        out = run.stdout + run.stderr
        assert run.returncode == 0 and "serving" in run.stdout, out
        addr = sh("ip", "-n", h, "-6", "-o", "addr", "show", "dev", "eth0").stdout
        line = next((ln for ln in addr.splitlines() if f"{VIP}/128" in ln), "")
        assert line and "tentative" not in line, addr

        assert "announced" in run.stdout and "not announced" not in run.stdout, out
        mac = sh("ip", "-n", h, "-o", "link", "show", "eth0").stdout.split("link/ether ")[1].split()[0]
        wait_for(lambda: mac in sh("ip", "-n", c, "neigh", "show", VIP).stdout, 3,
                 f"neighbour {VIP} -> {mac}")
    finally:
        for ns in (h, c):
            sh("ip", "netns", "del", ns, check=False)


@pytest.fixture(autouse=True)
def _code_on_path(monkeypatch):
    """The process started in the namespace imports the same code as this test."""
    monkeypatch.setenv("PYTHONPATH", str(CODE))
    monkeypatch.chdir(CODE)
