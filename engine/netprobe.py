"""Probes of the public network (gateway, DNS servers) by TCP connect or ICMP echo.

They tell an active that has lost every peer whether it is the one cut off: if nothing on the
public network answers either, it demotes itself (self-isolation) instead of serving a split
brain. A TCP probe counts a refusal as an answer: the host is there, only the port is closed.
ICMP uses an unprivileged ping socket where the kernel allows one (net.ipv4.ping_group_range),
else a raw socket (root).
"""
from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import struct
import time
from dataclasses import dataclass

__all__ = ["Target", "parse_target", "probe_all"]


@dataclass(frozen=True)
class Target:
    """One probe target: `tcp:HOST:PORT` or `icmp:HOST`."""

    kind: str  # "tcp" | "icmp"
    host: str
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "icmp":
            return f"icmp:{self.host}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def parse_target(text: str) -> Target:
    """A Target from `tcp:HOST:PORT` or `icmp:HOST` (HOST an IP address); ValueError says why not."""
    kind, _, rest = text.partition(":")
    if kind == "icmp":
        return Target("icmp", str(_address(rest)))
    if kind == "tcp":
        host, sep, port = rest.rpartition(":")
        if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError("expected tcp:HOST:PORT with a port 1..65535")
        return Target("tcp", str(_address(host.strip("[]"))), int(port))
    raise ValueError("expected tcp:HOST:PORT or icmp:HOST")


async def probe_all(targets: tuple[Target, ...], timeout: float) -> dict[Target, bool]:
    """Whether each target answered within `timeout`, all probed at once."""
    answers = await asyncio.gather(*(_probe(t, timeout) for t in targets))
    return dict(zip(targets, answers))


async def _probe(target: Target, timeout: float) -> bool:
    try:
        if target.kind == "tcp":
            async with asyncio.timeout(timeout):
                return await _tcp(target)
        return await asyncio.to_thread(_icmp, target.host, timeout)
    except (TimeoutError, OSError):
        return False


async def _tcp(target: Target) -> bool:
    try:
        _, writer = await asyncio.open_connection(target.host, target.port)
    except ConnectionRefusedError:
        return True  # a RST came back: the host and the path to it are up
    writer.close()
    return True


def _icmp(host: str, timeout: float) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    proto = socket.IPPROTO_ICMPV6 if family == socket.AF_INET6 else socket.IPPROTO_ICMP
    request_type, reply_type = (128, 129) if family == socket.AF_INET6 else (8, 0)
    try:
        sock = socket.socket(family, socket.SOCK_DGRAM, proto)  # the kernel fills in the id
        raw = False
    except PermissionError:
        sock = socket.socket(family, socket.SOCK_RAW, proto)
        raw = True
    ident = os.getpid() & 0xFFFF
    seq = int(time.monotonic() * 1000) & 0xFFFF
    with sock:
        packet = _echo(request_type, ident, seq)
        sock.sendto(packet, (host, 0))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data, addr = sock.recvfrom(2048)
            except socket.timeout:
                return False
            except OSError as exc:
                if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
                    return False
                raise
            if raw and family == socket.AF_INET:
                data = data[(data[0] & 0x0F) * 4 :]  # a raw IPv4 socket hands over the IP header too
            if addr[0] != host or len(data) < 8:
                continue
            kind, _, _, _, got_seq = struct.unpack("!BBHHH", data[:8])
            if kind == reply_type and got_seq == seq:
                return True
    return False


def _echo(kind: int, ident: int, seq: int) -> bytes:
    body = struct.pack("!BBHHH", kind, 0, 0, ident, seq) + b"nf-probe"
    return body[:2] + struct.pack("!H", _checksum(body)) + body[4:]


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"expected an IP address, got {text!r}") from None
