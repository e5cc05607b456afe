"""Cozen names in DNS: RFC 2136 dynamic updates signed with TSIG (dnspython).

A passive's cozen name gets an A (or AAAA) record for its management address and a PTR back;
an active has neither, and with `public_takeover` the public name's records point at the public
addresses (for WAN sites on different subnets, where the address itself cannot move). Current
records are read first and only what differs is updated, so applying twice changes nothing; a
change is read back from the server before it counts as verified. Network failures are retried
with backoff; a refusal (bad key, no right to update) is reported at once with the server's
own words.
"""
from __future__ import annotations

import asyncio
import ipaddress
import re
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import dns.exception
import dns.message
import dns.flags
import dns.query
import dns.rcode
import dns.rdatatype
import dns.reversename
import dns.tsig
import dns.update

from engine.config import DnsSettings, NodeSpec, PublicIdentity
from engine.cozen import Presentation, ProviderState, Registrar

TIMEOUT = 3.0
RETRIES = (0.2, 0.5, 1.0)  # waits between attempts after a network failure

_KEY = re.compile(r'key\s+"?([\w.-]+)"?\s*\{\s*algorithm\s+([\w.-]+)\s*;\s*secret\s+"([^"]+)"\s*;\s*\}\s*;', re.S)


class DnsError(Exception):
    """A failure with the message an operator should read (the server's own words included)."""


def load_tsig_key(path: Path) -> dns.tsig.Key:
    """The key from a file in BIND's format, as `tsig-keygen` writes it. Read at every use, so a
    rotated key needs no restart; its secret never appears in an error."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise DnsError(f"cannot read the TSIG key file {path}: {exc.strerror}") from None
    m = _KEY.search(text)
    if m is None:
        raise DnsError(f"{path}: expected a BIND key statement: key \"NAME\" {{ algorithm ALG; secret \"BASE64\"; }};")
    name, algorithm, secret = m.groups()
    try:
        return dns.tsig.Key(name, secret, algorithm)
    except Exception as exc:  # bad base64 or an unknown algorithm
        raise DnsError(f"{path}: unusable key {name!r} ({type(exc).__name__}: algorithm {algorithm})") from None


class DnsRegistrar(Registrar):
    name = "dns"

    def __init__(self, settings: DnsSettings, public: PublicIdentity) -> None:
        self.s = settings
        self.public = public

    async def apply(self, p: Presentation) -> ProviderState:
        return await asyncio.to_thread(self._converge, p.node, p.role == "passive", p.role == "active")

    async def remove(self, node: NodeSpec) -> ProviderState:
        state = await asyncio.to_thread(self._converge, node, False, False)
        return replace(state, registered=False)

    # -- one pass ----------------------------------------------------------------------------
    def _converge(self, node: NodeSpec, cozen: bool, public: bool) -> ProviderState:
        """Bring the records to: the node's cozen names present (or absent), and, if configured and
        `public`, the public name at the public addresses."""
        try:
            key = load_tsig_key(self.s.key_file)
            wanted = self._wanted(node, cozen, public)
            updated: dict[tuple[str, str], frozenset[str]] = {}
            for zone, rrsets in wanted.items():
                todo = {k: v for k, v in rrsets.items() if self._query(*k) != v}
                if todo:
                    self._update(zone, todo, key)
                    updated.update(todo)
            for (name, rdtype), values in updated.items():  # what was read already matched
                got = self._query(name, rdtype)
                if got != values:
                    raise DnsError(f"{name} {rdtype} reads back as {sorted(got) or 'absent'} after the update, "
                                   f"expected {sorted(values) or 'absent'}")
        except DnsError as exc:
            return ProviderState("dns", registered=False, verified=False, error=str(exc),
                                 detail=f"server {self.s.server}:{self.s.port}")
        shown = [f"{name} {rdtype} {' '.join(sorted(values)) or '(none)'}"
                 for rrsets in wanted.values() for (name, rdtype), values in rrsets.items()]
        return ProviderState("dns", registered=True, verified=True, changed=bool(updated), detail="; ".join(shown))

    def _wanted(self, node: NodeSpec, cozen: bool, public: bool) -> dict[str, dict[tuple[str, str], frozenset[str]]]:
        """zone -> {(owner name, type): the values it must hold (empty: absent)}."""
        out: dict[str, dict[tuple[str, str], frozenset[str]]] = {}
        fqdn = node.cozen_fqdn.rstrip(".") + "."
        mgmt = ipaddress.ip_address(node.management)
        forward = out.setdefault(node.zone or self.s.zone, {})
        family = "A" if mgmt.version == 4 else "AAAA"
        forward[(fqdn, family)] = frozenset([str(mgmt)] if cozen else [])
        reverse_name = dns.reversename.from_address(str(mgmt)).to_text()
        zone = next((z for z in self.s.reverse_zones if reverse_name.rstrip(".").endswith("." + z)), None)
        if zone is not None:
            out.setdefault(zone, {})[(reverse_name, "PTR")] = frozenset([fqdn] if cozen else [])
        if self.s.public_takeover and public:
            addrs = [ipaddress.ip_interface(a).ip for a in self.public.addresses]
            name = self.public.fqdn.rstrip(".") + "."
            public_zone = out.setdefault(self.s.zone, {})
            for rdtype, version in (("A", 4), ("AAAA", 6)):
                values = frozenset(str(a) for a in addrs if a.version == version)
                if values:
                    public_zone[(name, rdtype)] = values
        return out

    def _update(self, zone: str, rrsets: dict[tuple[str, str], frozenset[str]], key: dns.tsig.Key) -> None:
        upd = dns.update.UpdateMessage(zone, keyring=key, keyname=key.name, keyalgorithm=key.algorithm)
        for (name, rdtype), values in rrsets.items():
            if values:
                upd.replace(name, self.s.ttl, rdtype, *sorted(values))
            else:
                upd.delete(name, rdtype)
        resp = self._send(lambda: dns.query.tcp(upd, self.s.server, port=self.s.port, timeout=TIMEOUT),
                          f"update of zone {zone}")
        rcode = resp.rcode()
        if rcode != dns.rcode.NOERROR:
            raise DnsError(f"the DNS server {self.s.server}:{self.s.port} refused the update of zone {zone}: "
                           f"{dns.rcode.to_text(rcode)}" + _rcode_hint(rcode, key))

    def _query(self, name: str, rdtype: str) -> frozenset[str]:
        q = dns.message.make_query(name, rdtype)
        q.flags &= ~dns.flags.RD  # ask the zone's server itself, not a resolver
        resp = self._send(lambda: dns.query.tcp(q, self.s.server, port=self.s.port, timeout=TIMEOUT),
                          f"query for {name} {rdtype}")
        if resp.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            raise DnsError(f"the DNS server {self.s.server}:{self.s.port} answered {dns.rcode.to_text(resp.rcode())} "
                           f"for {name} {rdtype}")
        return frozenset(rd.to_text() for rrset in resp.answer if rrset.rdtype == dns.rdatatype.from_text(rdtype)
                         for rd in rrset)

    def _send(self, call: Callable[[], dns.message.Message], what: str) -> dns.message.Message:
        """`call()` with retries on network failures; TSIG refusals are final."""
        last = ""
        for wait in (*RETRIES, None):
            try:
                return call()
            except (dns.tsig.PeerBadKey, dns.tsig.PeerBadSignature, dns.tsig.PeerBadTime) as exc:
                raise DnsError(f"the DNS server {self.s.server}:{self.s.port} refused our TSIG key for the {what}: "
                               f"{exc} (check key_file against the server's key)") from None
            except (OSError, EOFError, dns.exception.Timeout, dns.exception.DNSException) as exc:
                last = str(exc) or type(exc).__name__
            if wait is not None:
                time.sleep(wait)
        raise DnsError(f"the DNS server {self.s.server}:{self.s.port} did not answer the {what} "
                       f"({len(RETRIES) + 1} attempts): {last}")


def _rcode_hint(rcode: int, key: dns.tsig.Key) -> str:
    if rcode == dns.rcode.REFUSED:
        return f" (does the zone allow updates with key {key.name.to_text(omit_final_dot=True)}?)"
    if rcode == dns.rcode.NOTAUTH:
        return " (the server is not authoritative for the zone, or refused the TSIG key)"
    return ""
