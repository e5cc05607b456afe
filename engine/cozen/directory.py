"""Cozen identities in Active Directory: one computer object per node, kept by ldap3.

Patch tools such as SCCM and WSUS find Windows-domain machines by their computer objects. Each
node gets one in the configured OU, named by its cozen NetBIOS name: sAMAccountName `NAME$`,
dNSHostName its cozen FQDN, servicePrincipalName `HOST/fqdn` and `HOST/NAME`, and a description
naming the cluster and node. It is enabled while the node is passive and disabled while it is
active (the active presents the original machine's names, whose object is not ours). Only what
differs is written, then read back. The connection is LDAPS or StartTLS, never a plain simple
bind, and the directory's own error text (a duplicate SPN, insufficient rights) is passed on.
"""
from __future__ import annotations

import asyncio
import ssl
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import ldap3
from ldap3.core.exceptions import LDAPException

from engine.config import DirectorySettings, NodeSpec
from engine.cozen import Presentation, ProviderState, Registrar

TIMEOUT = 10
UAC_WORKSTATION = 0x1000  # WORKSTATION_TRUST_ACCOUNT
UAC_DISABLED = 0x0002  # ACCOUNTDISABLE
OBJECT_CLASSES = ["top", "person", "organizationalPerson", "user", "computer"]
ATTRIBUTES = ("sAMAccountName", "dNSHostName", "servicePrincipalName", "description", "userAccountControl")


class DirectoryError(Exception):
    pass


class DirectoryRegistrar(Registrar):
    name = "directory"

    def __init__(self, settings: DirectorySettings, cluster: str) -> None:
        self.s = settings
        self.cluster = cluster

    async def apply(self, p: Presentation) -> ProviderState:
        return await asyncio.to_thread(self._run, p.node, "enable" if p.role == "passive" else "disable")

    async def remove(self, node: NodeSpec) -> ProviderState:
        state = await asyncio.to_thread(self._run, node, "delete" if self.s.on_remove == "delete" else "disable")
        return replace(state, registered=False)

    # -- one pass ----------------------------------------------------------------------------
    def _run(self, node: NodeSpec, action: str) -> ProviderState:
        dn = f"CN={node.cozen_netbios},{self.s.base}"
        try:
            conn = self._connect()
            try:
                self._ensure_ou(conn)
                changed = self._converge(conn, node, dn, action)
                now = self._read(conn, node)
                want = None if action == "delete" else self._wanted(node, action)
                if (now is None) != (want is None) or (want is not None and now is not None and _differs(now, want)):
                    raise DirectoryError(f"{dn} reads back as {now} after the change, expected {want}")
            finally:
                conn.unbind()
        except DirectoryError as exc:
            return ProviderState("directory", error=str(exc), detail=dn)
        except LDAPException as exc:
            return ProviderState("directory", error=f"the directory at {self.s.url}: {type(exc).__name__}: {exc}",
                                 detail=dn)
        state = {"enable": "enabled", "disable": "disabled", "delete": "deleted"}[action]
        return ProviderState("directory", registered=True, verified=True, changed=changed, detail=f"{dn} ({state})")

    def _connect(self) -> ldap3.Connection:
        url = urlsplit(self.s.url)
        tls = ldap3.Tls(ca_certs_file=str(self.s.ca_file) if self.s.ca_file else None, validate=ssl.CERT_REQUIRED,
                        version=ssl.PROTOCOL_TLS_CLIENT)
        server = ldap3.Server(url.hostname, port=url.port or (636 if url.scheme == "ldaps" else 389),
                              use_ssl=url.scheme == "ldaps", tls=tls, connect_timeout=TIMEOUT)
        password = self.s.password_file.read_text().strip()
        conn = ldap3.Connection(server, user=self.s.bind_dn, password=password, receive_timeout=TIMEOUT,
                                raise_exceptions=False)
        if not conn.open() and conn.closed:
            raise DirectoryError(f"cannot reach the directory at {self.s.url}")
        if url.scheme == "ldap" and not conn.start_tls():
            raise DirectoryError(f"the directory at {self.s.url} refused StartTLS: {_said(conn)}")
        if not conn.bind():
            raise DirectoryError(f"the directory at {self.s.url} refused the bind as {self.s.bind_dn}: {_said(conn)}")
        return conn

    def _ensure_ou(self, conn: ldap3.Connection) -> None:
        if conn.search(self.s.base, "(objectClass=*)", search_scope=ldap3.BASE, attributes=[]):
            return
        if conn.result.get("description") != "noSuchObject":
            raise DirectoryError(f"cannot read {self.s.base}: {_said(conn)}")
        if not conn.add(self.s.base, ["top", "organizationalUnit"]):
            if conn.result.get("description") == "entryAlreadyExists":
                return  # another node created it since the search: nodes present at once
            raise DirectoryError(f"the directory refused to create {self.s.base}: {_said(conn)}")

    def _wanted(self, node: NodeSpec, action: str) -> dict[str, Any]:
        uac = UAC_WORKSTATION | (UAC_DISABLED if action == "disable" else 0)
        return {"sAMAccountName": f"{node.cozen_netbios}$", "dNSHostName": node.cozen_fqdn,
                "servicePrincipalName": sorted([f"HOST/{node.cozen_fqdn}", f"HOST/{node.cozen_netbios}"]),
                "description": f"nf cluster {self.cluster}: cozen identity of node {node.id}",
                "userAccountControl": uac}

    def _read(self, conn: ldap3.Connection, node: NodeSpec) -> dict[str, Any] | None:
        flt = f"(&(objectClass=computer)(sAMAccountName={ldap3.utils.conv.escape_filter_chars(node.cozen_netbios)}$))"
        if not conn.search(self.s.base, flt, search_scope=ldap3.LEVEL, attributes=list(ATTRIBUTES)):
            if conn.result.get("description") not in ("success", "noSuchObject"):
                raise DirectoryError(f"cannot search {self.s.base}: {_said(conn)}")
            return None
        e = conn.entries[0].entry_attributes_as_dict
        return {"dn": conn.entries[0].entry_dn, "sAMAccountName": _one(e, "sAMAccountName"),
                "dNSHostName": _one(e, "dNSHostName"), "servicePrincipalName": sorted(e.get("servicePrincipalName", [])),
                "description": _one(e, "description"), "userAccountControl": int(_one(e, "userAccountControl") or 0)}

    def _converge(self, conn: ldap3.Connection, node: NodeSpec, dn: str, action: str) -> bool:
        now = self._read(conn, node)
        if action == "delete":
            if now is None:
                return False
            if not conn.delete(now["dn"]):
                raise DirectoryError(f"the directory refused to delete {now['dn']}: {_said(conn)}")
            return True
        want = self._wanted(node, action)
        if now is None:
            if not conn.add(dn, OBJECT_CLASSES, want):
                raise DirectoryError(f"the directory refused to create {dn}: {_said(conn)}")
            return True
        changes = {k: [(ldap3.MODIFY_REPLACE, v if isinstance(v, list) else [v])]
                   for k, v in want.items() if now.get(k) != v and k != "sAMAccountName"}
        if not changes:
            return False
        if not conn.modify(now["dn"], changes):
            raise DirectoryError(f"the directory refused to update {now['dn']}: {_said(conn)}")
        return True


def _differs(now: dict[str, Any], want: dict[str, Any]) -> bool:
    return any(now.get(k) != v for k, v in want.items())


def _one(attrs: dict[str, Any], key: str) -> Any:
    values = attrs.get(key) or [None]
    return values[0]


def _said(conn: ldap3.Connection) -> str:
    """The server's own words: result name and diagnostic message."""
    r = conn.result or {}
    return f"{r.get('description', 'error')}: {r.get('message', '').strip()}".rstrip(": ")
