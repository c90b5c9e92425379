"""Gratuitous ARP: tell the LAN that the VIP now lives behind this interface's MAC.

Neighbours keep the old holder's MAC in their ARP caches for minutes; a
gratuitous ARP (sender IP = target IP = VIP) makes Linux and most switches
replace it at once (Linux even inside its ARP ``locktime``). Written here with
an AF_PACKET socket rather than depending on ``arping``: it is two frames.
Needs CAP_NET_RAW, which the daemon has anyway to add the address.

IPv6 has no ARP: the same job is done by an unsolicited Neighbor Advertisement
(RFC 4861 7.2.6: to all-nodes, Override set, with our link-layer address),
which makes neighbours replace the old holder's MAC in their caches.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

ETH_P_ARP = 0x0806
ND_NEIGHBOR_ADVERT = 136
NA_OVERRIDE = 0x20000000
ND_OPT_TARGET_LLADDR = 2
ALL_NODES = "ff02::1"
BROADCAST = b"\xff" * 6
ARP_REQUEST, ARP_REPLY = 1, 2
MIN_FRAME = 60          # Ethernet minimum without FCS; veth and some drivers do not pad


def garp_frames(mac: bytes, ip: str) -> list[bytes]:
    """The two usual forms: an ARP request and an ARP reply, both for ``ip`` from ``ip``.

    Some stacks only honour one of them. For the reply, the target MAC equals the
    sender's: that is what Linux's ``arp_is_garp`` wants to call it gratuitous."""
    if len(mac) != 6:
        raise ValueError(f"not an Ethernet address: {mac.hex(':')}")
    pa = ipaddress.IPv4Address(ip).packed
    frames = []
    for op, tha in ((ARP_REQUEST, b"\0" * 6), (ARP_REPLY, mac)):
        arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, mac, pa, tha, pa)
        frame = BROADCAST + mac + struct.pack("!H", ETH_P_ARP) + arp
        frames.append(frame.ljust(MIN_FRAME, b"\0"))
    return frames


def announce(interface: str, ip: str) -> bool:
    """Broadcast gratuitous ARP for ``ip`` on ``interface``; False if it has no Ethernet
    address (loopback, tun, ...), where there is nobody to tell."""
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as s:
        s.bind((interface, ETH_P_ARP))
        mac = s.getsockname()[4]        # the interface's own MAC, from this netns (no sysfs)
        if len(mac) != 6 or mac == b"\0" * 6:
            return False
        for frame in garp_frames(mac, ip):
            s.send(frame)
    return True


def _mac(interface: str) -> bytes | None:
    """The interface's Ethernet address (from this netns), None if it has none."""
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as s:
        s.bind((interface, ETH_P_ARP))
        mac = s.getsockname()[4]
    return mac if len(mac) == 6 and mac != b"\0" * 6 else None


def neighbor_advert(mac: bytes, ip: str) -> bytes:
    """ICMPv6 unsolicited Neighbor Advertisement for ``ip`` at ``mac`` (checksum left 0:
    the kernel fills it in for ICMPv6 raw sockets)."""
    if len(mac) != 6:
        raise ValueError(f"not an Ethernet address: {mac.hex(':')}")
    target = ipaddress.IPv6Address(ip).packed
    return (struct.pack("!BBHI", ND_NEIGHBOR_ADVERT, 0, 0, NA_OVERRIDE) + target
            + struct.pack("!BB6s", ND_OPT_TARGET_LLADDR, 1, mac))


def advertise(interface: str, ip: str) -> bool:
    """Send an unsolicited Neighbor Advertisement for IPv6 ``ip`` (which must be on
    ``interface``) to all nodes; False if the interface has no Ethernet address."""
    mac = _mac(interface)
    if mac is None:
        return False
    index = socket.if_nametoindex(interface)
    with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)   # receivers insist
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
        s.bind((ip, 0, 0, 0))
        s.sendto(neighbor_advert(mac, ip), (ALL_NODES, 0, 0, index))
    return True
