"""The production provider: public addresses on an interface, gratuitous ARP, host name.

Uses iproute2 (`ip addr add/del`), `arping -U` from iputils-arping when present, and
`hostname`. The responder runs on the addresses once they are up.
"""
from __future__ import annotations

import asyncio
import shutil

from engine.identity import IdentityProvider


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
        if shutil.which("arping"):
            for host in self.addresses:
                await _run("arping", "-U", "-c", "2", "-I", self.interface, host, check=False)
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
