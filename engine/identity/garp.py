"""Gratuitous ARP: tell the LAN at once that an IPv4 address moved to this interface.

Without it, clients and the gateway keep sending to the old holder's MAC address until their
neighbour entry times out, which can take most of a minute. Sent from a raw packet socket
(root), so no arping binary is needed: a request and a reply, as arping -U and -A would.
"""
from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
import time

__all__ = ["announce", "answered_elsewhere"]

_SIOCGIFHWADDR = 0x8927
_ETH_P_ARP = 0x0806


def announce(interface: str, address: str, count: int = 2) -> None:
    """Broadcast `count` ARP request/reply pairs saying `address` is at this interface's MAC."""
    ip = ipaddress.ip_address(address)
    if ip.version != 4:
        return  # IPv6 would take an unsolicited neighbour advertisement
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ARP)) as sock:
        sock.bind((interface, 0))
        mac = _mac(sock, interface)
        for _ in range(count):
            for op in (1, 2):  # request, then reply: some stacks heed only one of them
                sock.send(_frame(mac, ip.packed, op))


def answered_elsewhere(interface: str, address: str, timeout: float = 0.1) -> bool:
    """Whether another machine answers ARP for `address` (an RFC 5227 probe: sender address 0).

    A node taking over the public address asks first: a frozen old holder's kernel still
    answers ARP (and its applications still serve), so taking the address then would make two
    machines answer on it. IPv6 addresses are not probed.
    """
    ip = ipaddress.ip_address(address)
    if ip.version != 4:
        return False
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ARP)) as sock:
        sock.bind((interface, 0))
        mac = _mac(sock, interface)
        ethernet = b"\xff" * 6 + mac + struct.pack("!H", _ETH_P_ARP)
        probe = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + b"\0" * 4 + b"\0" * 6 + ip.packed
        sock.send(ethernet + probe)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                frame = sock.recv(128)
            except socket.timeout:
                return False
            arp = frame[14:42]
            if len(arp) < 28:
                continue
            op = struct.unpack("!H", arp[6:8])[0]
            sender_mac, sender_ip = arp[8:14], arp[14:18]
            if op == 2 and sender_ip == ip.packed and sender_mac != mac:
                return True
    return False


def _mac(sock: socket.socket, interface: str) -> bytes:
    ifreq = struct.pack("16s16x", interface.encode()[:15])
    return fcntl.ioctl(sock.fileno(), _SIOCGIFHWADDR, ifreq)[18:24]


def _frame(mac: bytes, ip: bytes, op: int) -> bytes:
    broadcast = b"\xff" * 6
    ethernet = broadcast + mac + struct.pack("!H", _ETH_P_ARP)
    target_mac = b"\x00" * 6 if op == 1 else broadcast
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + mac + ip + target_mac + ip
    return ethernet + arp
