"""Public identity providers: who answers on the cluster's public addresses.

Contract for every provider:
- `take()` makes this node answer on the public addresses; it is called only after the node
  has become active at a new epoch, and must be idempotent. It may take up to a few seconds.
- `release()` stops answering; called before a node turns passive, idempotent, never raises
  for an identity that is not held.
- Every provider runs the identity responder: a TCP line `nf <cluster> <node> <epoch>` served
  on each public address while held. Passives probe it (`probe`) before they promote, so an
  active that is alive on the public network is never taken over, while a frozen one, whose
  kernel may still accept connections, is seen as silent because it does not answer the line.
"""
from __future__ import annotations

import asyncio
import ipaddress
from abc import ABC, abstractmethod
from dataclasses import dataclass

RESPONDER_PORT = 7790
PROBE_TIMEOUT = 0.5


@dataclass(frozen=True)
class ProbeAnswer:
    address: str
    node: str
    epoch: int


class IdentityProvider(ABC):
    def __init__(self, cluster: str, node: str, addresses: tuple[str, ...]) -> None:
        self.cluster = cluster
        self.node = node
        self.addresses = tuple(_host(a) for a in addresses)
        self.epoch = 0
        self._servers: list[asyncio.base_events.Server] = []

    @property
    def held(self) -> bool:
        return bool(self._servers)

    @abstractmethod
    async def take(self, epoch: int) -> None: ...

    @abstractmethod
    async def release(self) -> None: ...

    async def _serve(self, epoch: int) -> None:
        """Answer the identity line on every public address (retries while an old holder lets go)."""
        self.epoch = epoch
        if self._servers:
            return
        for address in self.addresses:
            self._servers.append(await asyncio.start_server(self._answer, address, RESPONDER_PORT,
                                                            reuse_address=True))

    async def _stop_serving(self) -> None:
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        for server in servers:
            await server.wait_closed()

    async def _answer(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"nf {self.cluster} {self.node} {self.epoch}\n".encode())
        try:
            await writer.drain()
        finally:
            writer.close()


async def probe(cluster: str, addresses: tuple[str, ...], timeout: float = PROBE_TIMEOUT) -> ProbeAnswer | None:
    """The node answering on the public addresses, or None when none answers in time."""
    for address in addresses:
        host = _host(address)
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, RESPONDER_PORT)
        except (OSError, TimeoutError):
            continue
        try:
            async with asyncio.timeout(timeout):
                line = await reader.readline()
        except (OSError, TimeoutError):
            continue
        finally:
            writer.close()
        parts = line.decode(errors="replace").split()
        if len(parts) == 4 and parts[0] == "nf" and parts[1] == cluster and parts[3].isdigit():
            return ProbeAnswer(host, parts[2], int(parts[3]))
    return None


def provider_for(kind: str, cluster: str, node: str, addresses: tuple[str, ...], **options: str) -> IdentityProvider:
    if kind == "local":
        from engine.identity.local import LocalIdentity

        return LocalIdentity(cluster, node, addresses)
    if kind == "linux":
        from engine.identity.linux import LinuxIdentity

        return LinuxIdentity(cluster, node, addresses, **options)
    raise ValueError(f"unknown identity provider {kind!r}")


def _host(address: str) -> str:
    return str(ipaddress.ip_interface(address).ip)
