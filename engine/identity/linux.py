"""The production provider: public addresses on an interface, gratuitous ARP, host name.

Uses iproute2 (`ip addr add/del`), a gratuitous ARP of its own (`engine.identity.garp`), and
`hostname`. The responder runs on the addresses once they are up.
"""
from __future__ import annotations

import asyncio
import logging

from engine.identity import IdentityProvider
from engine.identity.garp import announce

log = logging.getLogger("nf.identity")


class LinuxIdentity(IdentityProvider):
    def __init__(self, cluster: str, node: str, addresses: tuple[str, ...], interface: str = "eth0",
                 hostname: str = "") -> None:
        self.raw = addresses
        super().__init__(cluster, node, addresses)
        self.interface = interface
        self.hostname = hostname

    async def take(self, epoch: int) -> None:
        for address in self.raw:
            cidr = address if "/" in address else f"{address}/32"
            await _run("ip", "addr", "replace", cidr, "dev", self.interface)
        for host in self.addresses:
            try:
                await asyncio.to_thread(announce, self.interface, host)
            except OSError as exc:  # the address is ours either way; neighbours learn it late
                log.warning("gratuitous ARP for %s on %s failed: %s", host, self.interface, exc)
        if self.hostname:
            await _run("hostname", self.hostname)
        await self._serve(epoch)

    async def release(self) -> None:
        await self._stop_serving()
        for address in self.raw:
            cidr = address if "/" in address else f"{address}/32"
            await _run("ip", "addr", "del", cidr, "dev", self.interface, check=False)


async def _run(*argv: str, check: bool = True) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if check and proc.returncode:
        raise OSError(f"{' '.join(argv)} failed: {err.decode(errors='replace').strip()}")
