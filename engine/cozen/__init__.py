"""Cozen identities: each passive presents names of its own, the active the public ones.

Patch tools, backup and monitoring software identify a server by its names and address; a
clone that looks exactly like the active is skipped or confused with it. While passive a node
presents its cozen identity (a host name in DNS, a NetBIOS name, a directory object) on its
management address; once active it presents the public names again.

Each way of presenting a name is a `Registrar` behind this small ABC, chosen by config
(`engine.cozen.manager` builds them); a cluster without a DNS server or a directory leaves that
registrar out, and `nf cozen status` says so.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any

from engine.config import NodeSpec


@dataclass(frozen=True)
class Presentation:
    """What one node presents in one role."""

    node: NodeSpec
    role: str  # "active" | "passive"
    hostname: str  # the FQDN presented: the public name while active, the cozen name while passive
    netbios: str | None
    addresses: tuple[str, ...]  # where those names point: the public addresses, or the management address


@dataclass(frozen=True)
class ProviderState:
    """The outcome of presenting (or removing) one node's names through one registrar."""

    provider: str
    configured: bool = True
    registered: bool = False  # the records or objects for the current role are in place
    verified: bool = False  # read back from the server after the change
    changed: bool = False  # the last apply changed something (a second apply changes nothing)
    detail: str = ""  # what is registered, or the server's own error message
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Registrar(ABC):
    name: str

    @abstractmethod
    async def apply(self, p: Presentation) -> ProviderState:
        """Make the server match `p`; idempotent, verified by reading back."""

    @abstractmethod
    async def remove(self, node: NodeSpec) -> ProviderState:
        """Take the node's cozen names away (it left the cluster)."""
