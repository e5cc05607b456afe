"""A NetBIOS name-service responder (RFC 1001/1002), enough for name queries.

Windows tools and Samba's `nmblookup` find a machine by its NetBIOS name with a NAME QUERY
REQUEST on UDP 137. The responder answers, on the addresses it is given, for the names it is
given: a passive's cozen NetBIOS name on its management address, the public NetBIOS name on
the public address while active. Anything else (other names, node status, registrations) is
left unanswered, as a node that does not own a name does.
"""
from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import struct
import time

from engine.cozen import Presentation, ProviderState, Registrar
from engine.config import NodeSpec

log = logging.getLogger("nf.netbios")

TYPE_NB = 0x0020
CLASS_IN = 0x0001
TTL = 300
#: How long a new holder of a name waits for the old one to let go of its address and port.
BIND_PATIENCE = 5.0
#: Suffixes answered for a name: workstation, messenger, file server (what a Windows host registers).
SUFFIXES = (0x00, 0x03, 0x20)


def encode_name(name: str, suffix: int) -> bytes:
    """First-level encoding (RFC 1001 14.1): 16 bytes (name padded with spaces, then the suffix),
    each as two letters 'A'+nibble, as one 32-byte label."""
    raw = name.upper().encode("ascii")[:15].ljust(15, b" ") + bytes([suffix])
    return bytes([32]) + bytes(c for b in raw for c in (0x41 + (b >> 4), 0x41 + (b & 0x0F))) + b"\x00"


def decode_question(packet: bytes) -> tuple[int, int, str, int, int] | None:
    """(transaction id, flags, name, suffix, qtype) of a name query, or None."""
    if len(packet) < 12 + 34 + 4:
        return None
    trn_id, flags, qdcount = struct.unpack(">HHH", packet[:6])
    if flags & 0x8000 or (flags >> 11) & 0xF != 0 or qdcount != 1 or packet[12] != 32:
        return None  # a response, not a query, or not one first-level encoded name
    enc = packet[13:45]
    if any(not 0x41 <= c <= 0x50 for c in enc):
        return None
    raw = bytes(((enc[i] - 0x41) << 4) | (enc[i + 1] - 0x41) for i in range(0, 32, 2))
    pos = 45
    while pos < len(packet) and packet[pos] != 0:  # a scope id: skip its labels
        pos += 1 + packet[pos]
    pos += 1
    if pos + 4 > len(packet):
        return None
    qtype, qclass = struct.unpack(">HH", packet[pos : pos + 4])
    if qclass != CLASS_IN:
        return None
    try:
        name = raw[:15].decode("ascii").rstrip(" ")
    except UnicodeDecodeError:
        return None
    return trn_id, flags, name, raw[15], qtype


def positive_response(trn_id: int, flags: int, name: str, suffix: int, address: str) -> bytes:
    """A POSITIVE NAME QUERY RESPONSE (RFC 1002 4.2.13) for a unique name of a B node."""
    out_flags = 0x8000 | 0x0400 | (flags & 0x0100)  # response, authoritative, recursion desired echoed
    header = struct.pack(">HHHHHH", trn_id, out_flags, 0, 1, 0, 0)
    rdata = struct.pack(">H", 0x0000) + ipaddress.IPv4Address(address).packed
    return header + encode_name(name, suffix) + struct.pack(">HHIH", TYPE_NB, CLASS_IN, TTL, len(rdata)) + rdata


class _Responder(asyncio.DatagramProtocol):
    def __init__(self, names: dict[str, str]) -> None:
        self.names = {n.upper(): a for n, a in names.items()}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        q = decode_question(data)
        if q is None or self.transport is None:
            return
        trn_id, flags, name, suffix, qtype = q
        address = self.names.get(name.upper())
        if address is None or qtype != TYPE_NB or suffix not in SUFFIXES:
            return
        self.transport.sendto(positive_response(trn_id, flags, name, suffix, address), addr)


class NetBiosRegistrar(Registrar):
    """Answers for the presented NetBIOS name on the presented IPv4 addresses."""

    name = "netbios"

    def __init__(self, port: int) -> None:
        self.port = port
        self._transports: list[asyncio.DatagramTransport] = []
        self._serving: tuple[str | None, tuple[str, ...]] = (None, ())

    async def apply(self, p: Presentation) -> ProviderState:
        hosts = tuple(str(ipaddress.ip_interface(a).ip) for a in p.addresses
                      if ipaddress.ip_interface(a).ip.version == 4)
        if not p.netbios:
            await self.close()
            return ProviderState("netbios", registered=False, detail="no NetBIOS name to present in this role")
        if not hosts:
            await self.close()
            return ProviderState("netbios", error="NetBIOS needs an IPv4 address; none to answer on",
                                 detail=f"{p.netbios} not presented")
        if self._serving == (p.netbios, hosts) and self._transports:
            return ProviderState("netbios", registered=True, verified=True, changed=False,
                                 detail=self._detail(p.netbios, hosts))
        await self.close()
        deadline = time.monotonic() + BIND_PATIENCE
        while True:
            try:
                await self._bind(p.netbios, hosts)
                break
            except OSError as exc:
                await self.close()
                if exc.errno == errno.EADDRINUSE and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)  # the node that held these names is letting go of them
                    continue
                return ProviderState("netbios", error=f"cannot answer on UDP {self.port} of {', '.join(hosts)}: "
                                     f"{exc.strerror or exc}" + (" (port 137 needs root)" if exc.errno == 13 else ""))
        self._serving = (p.netbios, hosts)
        return ProviderState("netbios", registered=True, verified=True, changed=True,
                             detail=self._detail(p.netbios, hosts))

    async def _bind(self, name: str, hosts: tuple[str, ...]) -> None:
        loop = asyncio.get_running_loop()
        for host in hosts:
            transport, _ = await loop.create_datagram_endpoint(
                lambda h=host: _Responder({name: h}), local_addr=(host, self.port),  # type: ignore[misc]
                family=socket.AF_INET)
            self._transports.append(transport)  # type: ignore[arg-type]

    async def remove(self, node: NodeSpec) -> ProviderState:
        return ProviderState("netbios", registered=False, detail="a node's responder stops with its agent")

    async def close(self) -> None:
        transports, self._transports = self._transports, []
        for t in transports:
            t.close()
        self._serving = (None, ())

    def _detail(self, name: str, hosts: tuple[str, ...]) -> str:
        return f"{name}<00> on {', '.join(f'{h}:{self.port}' for h in hosts)}"
