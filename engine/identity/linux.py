"""The production provider: public addresses on an interface, gratuitous ARP, host name.

Uses iproute2 (`ip addr add/del`), a gratuitous ARP of its own (`engine.identity.garp`), and
`hostname`. The responder runs on the addresses once they are up.
"""
from __future__ import annotations

import asyncio
import logging

from engine.identity import IdentityProvider
from engine.identity.garp import announce, answered_elsewhere

log = logging.getLogger("nf.identity")


class LinuxIdentity(IdentityProvider):
    def __init__(self, cluster: str, node: str, addresses: tuple[str, ...], interface: str = "eth0",
                 hostname: str = "") -> None:
        self.raw = addresses
        super().__init__(cluster, node, addresses)
        self.interface = interface
        self.hostname = hostname

    async def take(self, epoch: int) -> None:
        await self._wait_until_released()
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

    async def _wait_until_released(self) -> None:
        """Never answer beside another holder: a frozen old active's kernel still answers ARP for
        the address, so wait (as long as it takes) until nobody else does."""
        waiting = False
        while True:
            busy = [a for a in self.addresses if await asyncio.to_thread(answered_elsewhere, self.interface, a)]
            if not busy:
                return
            if not waiting:
                log.warning("waiting: another machine still answers for %s", ", ".join(busy))
                waiting = True
            await asyncio.sleep(0.2)

    async def release(self) -> None:
        await self._stop_serving()
        for address in self.raw:
            cidr = address if "/" in address else f"{address}/32"
            await _run("ip", "addr", "del", cidr, "dev", self.interface, check=False)


#: Seconds an `ip` or `hostname` command may take. They answer in milliseconds; one that hangs
#: (a wedged netlink, a stuck NSS lookup) must fail the takeover or release that ran it, with its
#: name, rather than hold the HA loop for ever.
COMMAND_TIMEOUT = 10.0


async def _run(*argv: str, check: bool = True) -> None:
    """Run a command; with `check`, a failure or a hang raises OSError. Without, a failure is
    expected (deleting an address not held) and a hang is logged."""
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), COMMAND_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        hung = f"{' '.join(argv)} did not finish in {COMMAND_TIMEOUT:g} s (killed)"
        if check:
            raise OSError(hung) from None
        log.warning("%s", hung)
        return
    if check and proc.returncode:
        raise OSError(f"{' '.join(argv)} failed: {err.decode(errors='replace').strip()}")
