"""Keeps what a node presents in line with its role: cozen names while passive, public ones while active.

The agent calls `apply(role)` whenever it enters a role (an active after it took the public
address, so the responder can bind it) and on `nf cozen apply`. Each registrar's outcome is
kept for `nf cozen status`; one that fails (a wrong TSIG key, an unreachable server) says why
and leaves the others working.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from engine.config import ClusterConfig, NodeSpec
from engine.cozen import Presentation, ProviderState, Registrar

log = logging.getLogger("nf.cozen")

PROVIDERS = ("dns", "directory", "netbios")


class Cozen:
    def __init__(self, cluster: ClusterConfig, node_id: str, *, set_hostname: bool) -> None:
        self.cluster = cluster
        self.node: NodeSpec = cluster.node(node_id)
        self.set_hostname = set_hostname  # only where the node owns its host name (the linux provider)
        self.registrars: list[Registrar] = []
        if cluster.dns is not None:
            from engine.cozen.dns import DnsRegistrar

            self.registrars.append(DnsRegistrar(cluster.dns, cluster.public))
        if cluster.directory is not None:
            from engine.cozen.directory import DirectoryRegistrar

            self.registrars.append(DirectoryRegistrar(cluster.directory, cluster.name))
        if cluster.netbios is not None:
            from engine.cozen.netbios import NetBiosRegistrar

            self.registrars.append(NetBiosRegistrar(cluster.netbios.port))
        self.role: str | None = None
        self.states: dict[str, ProviderState] = {}
        self.hostname_error = ""
        self._lock = asyncio.Lock()

    def presentation(self, role: str, node: NodeSpec | None = None) -> Presentation:
        n = node or self.node
        if role == "active":
            p = self.cluster.public
            return Presentation(n, role, p.fqdn, p.netbios, p.addresses)
        return Presentation(n, role, n.cozen_fqdn, n.cozen_netbios, (n.management,))

    async def apply(self, role: str) -> dict[str, ProviderState]:
        """Present the names of `role` through every registrar; returns each one's outcome."""
        async with self._lock:
            self.role = role
            p = self.presentation(role)
            states: dict[str, ProviderState] = {}
            for r in self.registrars:
                try:
                    states[r.name] = await r.apply(p)
                except Exception as exc:  # one registrar's bug must not stop the others
                    log.exception("cozen %s failed", r.name)
                    states[r.name] = ProviderState(r.name, error=f"{type(exc).__name__}: {exc}")
            if self.set_hostname:
                await self._set_hostname(p.hostname.split(".")[0])
            self.states = states
            return states

    async def remove(self, node_id: str) -> dict[str, ProviderState]:
        node = self.cluster.node(node_id)
        async with self._lock:
            return {r.name: await r.remove(node) for r in self.registrars}

    async def close(self) -> None:
        for r in self.registrars:
            close = getattr(r, "close", None)
            if close is not None:
                await close()

    def status(self) -> dict[str, Any]:
        p = self.presentation(self.role or "passive")
        providers: dict[str, Any] = {}
        for name in PROVIDERS:
            if name in self.states:
                providers[name] = self.states[name].to_json()
            elif any(r.name == name for r in self.registrars):
                providers[name] = ProviderState(name, detail="not applied yet").to_json()
            else:
                providers[name] = ProviderState(name, configured=False,
                                                detail=f"not configured (no [{name}] in cluster.toml)").to_json()
        return {"node": self.node.id, "role": self.role, "presented": p.hostname, "presented_netbios": p.netbios,
                "addresses": list(p.addresses),
                "cozen": {"fqdn": self.node.cozen_fqdn, "netbios": self.node.cozen_netbios,
                          "management": self.node.management},
                "hostname_error": self.hostname_error, "providers": providers}

    async def _set_hostname(self, name: str) -> None:
        proc = await asyncio.create_subprocess_exec("hostname", name, stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        self.hostname_error = "" if proc.returncode == 0 else f"hostname {name}: {err.decode().strip()}"
