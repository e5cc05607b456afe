"""Load and validate cluster.toml and node.toml.

Two files because they change for different reasons: cluster.toml is the same on every node
(who the nodes are, what is protected, how replication behaves), node.toml says which node this
machine is and where its own secrets live. Everything is checked at load, and every complaint is a
`ConfigError` naming the file and the dotted field, so a typo is found when the agent starts and
not at the first failover. Unknown keys are errors for the same reason.

The writers at the bottom produce TOML by hand (tomllib only reads) so `nf init` needs no extra
dependency; `init` loads what it wrote back through this module, so the two cannot drift.
"""
from __future__ import annotations

import fnmatch
import functools
import ipaddress
import math
import os
import posixpath
import re
import stat
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from engine.errors import ConfigError
from engine.netprobe import parse_target

NODE_IDS = ("primary", "secondary", "tertiary")

#: What makes every Linux clone a machine of its own, whatever else a node declares.
LOCAL_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id", "/etc/ssh/ssh_host_*")
STAGE_DIR = ".nf-stage"  # nf's own staging directory at the top of each protected tree
PROVIDERS = ("local", "linux")
COMPRESSIONS = ("zstd", "none")
#: The smallest max_frame_bytes: a record of a small file carries it whole (64 KiB), a manifest
#: message a file's block hashes, and a batch of them has to fit a frame.
MIN_FRAME_BYTES = 1 << 20


@dataclass(frozen=True)
class NodeSpec:
    """One node as every member of the cluster sees it."""

    id: str
    channel_host: str  # IP address or host name, without IPv6 brackets
    channel_port: int
    management: str  # IP address
    #: The cozen identity this node presents while passive (filled in at load when not given):
    #: a host name in `zone`, and a NetBIOS name.
    cozen: str = ""
    cozen_netbios: str = ""
    zone: str = ""

    @property
    def cozen_fqdn(self) -> str:
        return f"{self.cozen}.{self.zone}" if self.zone else self.cozen

    @property
    def channel(self) -> str:
        """host:port as written in cluster.toml (IPv6 in brackets)."""
        return format_channel(self.channel_host, self.channel_port)


@dataclass(frozen=True)
class ProtectedTree:
    """A directory tree replicated from the active to the passives."""

    path: str  # absolute, normalised, never "/", no trailing slash
    include: tuple[str, ...] = ()  # glob patterns for files; empty = every file
    exclude: tuple[str, ...] = ()

    @functools.cached_property
    def rel(self) -> str:
        """The tree's path relative to a node's root, e.g. "srv/data" (asked for every record applied)."""
        return self.path.lstrip("/")

    def wants(self, rel_in_tree: str, is_dir: bool) -> bool:
        """Whether a path (posix, relative to the tree root, "" = the root) is replicated.

        Every ancestor is checked too, so the answer is right for a lone path and not only
        while walking top-down. Include patterns decide for files only: a directory is wanted
        unless excluded, because an included file may lie below it. An include pattern ending
        in "/" includes every file below a matching directory.
        """
        if rel_in_tree in ("", "."):
            return True
        parts = rel_in_tree.split("/")
        if parts[0] == STAGE_DIR:
            return False
        excludes = _compile(self.exclude)
        for depth in range(1, len(parts) + 1):
            prefix = "/".join(parts[:depth])
            prefix_is_dir = is_dir if depth == len(parts) else True
            if any(p.matches(prefix, prefix_is_dir) for p in excludes):
                return False
        if is_dir or not self.include:
            return True
        includes = _compile(self.include)
        if any(p.matches(rel_in_tree, False) for p in includes):
            return True
        ancestors = ["/".join(parts[:depth]) for depth in range(1, len(parts))]
        return any(p.dir_only and p.matches(a, True) for p in includes for a in ancestors)


@dataclass(frozen=True)
class PublicIdentity:
    """The name and addresses clients use; they move to whichever node is active."""

    fqdn: str
    netbios: str | None
    addresses: tuple[str, ...]  # IPv4/IPv6, optionally with "/prefix"
    provider: str  # "local" | "linux"


@dataclass(frozen=True)
class ReplicationSettings:
    block_size: int = 8192  # power of two, 4 KiB .. 4 MiB; 8 KiB keeps unaligned edits near 1.1x
    compression: str = "zstd"  # "zstd" | "none"
    compression_level: int = 3  # 1..19
    rescan_interval: float = 3600.0  # seconds, > 0
    send_queue_max_bytes: int = 1 << 30  # >= max_frame_bytes
    max_frame_bytes: int = 16 << 20  # >= 2 * block_size and >= MIN_FRAME_BYTES
    coalesce_ms: int = 20  # 0..10000

    @property
    def chunk_bytes(self) -> int:
        """The most file data one record carries: half a frame at most, so a batch of records
        cut at the other half still fits one frame."""
        return min(4 << 20, self.max_frame_bytes // 2)


@dataclass(frozen=True)
class HeartbeatSettings:
    # Chosen with bench/failover.py on the namespace testbed: client downtime p50 about 1.5 s
    # (keepalived with advert_int 1: 3.6 s) and no false failover with the active's CPUs saturated.
    interval: float = 0.2  # seconds, > 0
    failover_timeout: float = 1.0  # > 2 * interval, so one lost heartbeat never fails over
    probes: tuple[str, ...] = ()  # public network targets: "tcp:HOST:PORT" or "icmp:HOST"


@dataclass(frozen=True)
class EmailAlerts:
    host: str
    port: int
    sender: str
    recipients: tuple[str, ...]
    starttls: bool = False
    username: str = ""
    password_file: Path | None = None  # mode 0600; read when an alert is sent
    ca_file: Path | None = None  # PEM bundle the server's STARTTLS certificate must chain to; else the system's


@dataclass(frozen=True)
class WebhookAlerts:
    url: str
    token_file: Path | None = None  # sent as "Authorization: Bearer <token>"; mode 0600


@dataclass(frozen=True)
class AlertSettings:
    rate_limit: float = 60.0  # seconds between two alerts of one kind on one sink
    email: EmailAlerts | None = None
    webhook: WebhookAlerts | None = None
    #: Where syslog alerts go: "" for none, "/dev/log" (what `syslog = true` means), another
    #: Unix socket path, or "HOST:PORT" of a remote syslog server over UDP.
    syslog: str = ""


@dataclass(frozen=True)
class DnsSettings:
    """RFC 2136 updates of cozen names (A and PTR) and, with `public_takeover`, the public name."""

    server: str  # IP address of the primary server for the zones
    zone: str  # forward zone of the cozen names (each node may name its own)
    key_file: Path  # TSIG key in BIND's format (`tsig-keygen`), mode 0600
    port: int = 53
    reverse_zones: tuple[str, ...] = ()  # PTR records go in the one holding the address
    ttl: int = 60
    public_takeover: bool = False  # the active points the public name at the public addresses


@dataclass(frozen=True)
class DirectorySettings:
    """Active Directory computer objects for cozen identities (ldap3), over LDAPS or StartTLS."""

    url: str  # ldaps://host[:port], or ldap://host[:port] (StartTLS, always)
    bind_dn: str
    password_file: Path  # mode 0600
    base: str  # the OU that holds the objects, e.g. OU=nf-clones,DC=example,DC=test (created if missing)
    ca_file: Path | None = None  # PEM CA bundle for the server certificate; else the system's
    on_remove: str = "disable"  # what `nf cozen remove` does to a departed node's object: disable | delete


@dataclass(frozen=True)
class NetBiosSettings:
    """The name-service responder (RFC 1001/1002): cozen name while passive, public while active."""

    port: int = 137


@dataclass(frozen=True)
class Application:
    """A protected service: runs only on the active, in `order`, restarted then failed over."""

    name: str
    start: str
    stop: str
    monitor: str
    order: int = 0
    timeout: float = 30.0  # seconds per start, stop or monitor run
    restarts: int = 3  # restarts after a failed monitor before the failure policy applies
    on_failure: str = "switchover"  # "switchover" | "alert"
    monitor_interval: float = 5.0


@dataclass(frozen=True)
class ClusterConfig:
    name: str
    public: PublicIdentity
    nodes: tuple[NodeSpec, ...]
    protected: tuple[ProtectedTree, ...]
    replication: ReplicationSettings
    heartbeat: HeartbeatSettings
    path: Path
    alerts: AlertSettings = AlertSettings()
    applications: tuple[Application, ...] = ()
    dns: DnsSettings | None = None
    netbios: NetBiosSettings | None = None
    directory: DirectorySettings | None = None

    def node(self, node_id: str) -> NodeSpec:
        """The node with this id; a ConfigError naming the known ids otherwise."""
        for spec in self.nodes:
            if spec.id == node_id:
                return spec
        raise ConfigError(str(self.path), "nodes", "a node id of cluster " + self.name + ": "
                          + ", ".join(n.id for n in self.nodes), node_id)


@dataclass(frozen=True)
class NodeConfig:
    id: str
    root: Path  # prefix under which protected paths live: /srv/data is root/srv/data
    state_dir: Path
    ca: Path
    cert: Path
    key: Path
    path: Path
    #: Files that make this clone a distinct machine to other software: never replicated, never
    #: overwritten by apply or verify --repair (absolute paths; a glob in the last part).
    local_files: tuple[str, ...] = ()

    @property
    def socket(self) -> Path:
        return self.state_dir / "agent.sock"


def load_cluster(path: str | Path) -> ClusterConfig:
    """Read and validate cluster.toml."""
    file = str(path)
    top = _Reader(file, "", _read_toml(file))
    top.only("cluster", "public", "nodes", "protected", "replication", "heartbeat", "alerts", "applications", "dns",
             "netbios", "directory")
    cluster = top.table("cluster")
    name = cluster.text("name", "a cluster name matching [a-z0-9-]{1,63}", pattern=r"[a-z0-9-]{1,63}")
    cluster.done()
    public = _public(top.table("public"))
    base = Path(path).absolute().parent
    dns = _dns(top.table("dns"), base, public) if "dns" in top.data else None
    netbios = _netbios(top.table("netbios")) if "netbios" in top.data else None
    directory = _directory(top.table("directory"), base) if "directory" in top.data else None
    nodes = _nodes(top, public, dns)
    protected = _protected(top)
    replication = _replication(top.table("replication", required=False))
    heartbeat = _heartbeat(top.table("heartbeat", required=False))
    alerts = _alerts(top.table("alerts", required=False), base)
    applications = _applications(top)
    top.done()
    return ClusterConfig(name, public, nodes, protected, replication, heartbeat, Path(path).absolute(), alerts,
                         applications, dns, netbios, directory)


def load_node(path: str | Path, cluster: ClusterConfig | None = None) -> NodeConfig:
    """Read and validate node.toml; with `cluster`, also check the id is one of its nodes.

    Relative paths resolve against node.toml's directory, so a node directory written by
    `nf init` can be moved as a whole.
    """
    file = str(path)
    base = Path(path).absolute().parent
    top = _Reader(file, "", _read_toml(file))
    top.only("node", "tls", "identity")
    node = top.table("node")
    known = tuple(n.id for n in cluster.nodes) if cluster else NODE_IDS
    where = f"a node of cluster {cluster.name}" if cluster else "a node id"
    node_id = node.text("id", f"{where}: {', '.join(known)}")
    if node_id not in known:
        raise node.error("id", f"{where}: {', '.join(known)}", node_id)
    root = _resolve(base, node.text("root", "a directory path"))
    state_dir = _resolve(base, node.text("state_dir", "a directory path"))
    node.done()
    tls = top.table("tls")
    ca = _resolve(base, tls.text("ca", "a PEM file path"))
    cert = _resolve(base, tls.text("cert", "a PEM file path"))
    key = _resolve(base, tls.text("key", "a PEM file path"))
    tls.done()
    local = LOCAL_FILES
    if "identity" in top.data:
        ident = top.table("identity")
        expected = "a list of absolute, normalised file paths (a glob allowed), e.g. /etc/agent/id.dat"
        declared = ident.strings("local_files", expected, default=[])
        for f in declared:
            if not f.startswith("/") or posixpath.normpath(f) != f or f == "/":
                raise ident.error("local_files", expected, f)
        ident.done()
        local = tuple(dict.fromkeys((*LOCAL_FILES, *declared)))
    top.done()
    for name, p in (("ca", ca), ("cert", cert)):
        if not p.is_file():
            raise tls.error(name, "an existing PEM file", str(p), hint="nf init writes it into the node's tls/")
    _check_key_mode(tls, key)
    return NodeConfig(node_id, root, state_dir, ca, cert, key, Path(path).absolute(), local)


def local_trees(trees: Sequence[ProtectedTree], local_files: Sequence[str]) -> tuple[ProtectedTree, ...]:
    """The protected trees with a node's local identity files excluded (anchored patterns), so
    that neither capture, a sync nor verify ever ships or compares them."""
    out = []
    for t in trees:
        extra = tuple(f[len(t.path):] for f in local_files if f.startswith(t.path + "/"))
        out.append(replace(t, exclude=t.exclude + extra) if extra else t)
    return tuple(out)


def parse_channel(value: str) -> tuple[str, int]:
    """Split "host:port" or "[v6]:port"; ValueError says what was expected."""
    expected = "host:port ([v6]:port for IPv6) with port 1..65535"
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^\s:\[\]]+):(\d{1,5})", value)
    if not m:
        raise ValueError(expected)
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    if m.group(1):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(expected) from None
    elif not (_is_ip(host) or _is_hostname(host)):
        raise ValueError(expected)
    if not 1 <= int(port) <= 65535:
        raise ValueError(expected)
    return host, int(port)


def format_channel(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def dump_cluster_toml(name: str, public: PublicIdentity, nodes: Sequence[NodeSpec],
                      protected: Sequence[ProtectedTree],
                      replication: ReplicationSettings | None = None,
                      heartbeat: HeartbeatSettings | None = None) -> str:
    """cluster.toml text; settings equal to the defaults are left out so new defaults apply."""
    out = ["# nf cluster configuration: identical on every node.", "",
           "[cluster]", f"name = {_q(name)}", "",
           "[public]", f"fqdn = {_q(public.fqdn)}"]
    if public.netbios is not None:
        out.append(f"netbios = {_q(public.netbios)}")
    out += [f"addresses = {_q(list(public.addresses))}", f"provider = {_q(public.provider)}"]
    for n in nodes:
        out += ["", "[[nodes]]", f"id = {_q(n.id)}", f"channel = {_q(n.channel)}",
                f"management = {_q(n.management)}"]
        out += [f"{k} = {_q(v)}" for k, v in (("cozen", n.cozen), ("cozen_netbios", n.cozen_netbios), ("zone", n.zone))
                if v]
    for t in protected:
        out += ["", "[[protected]]", f"path = {_q(t.path)}", f"include = {_q(list(t.include))}",
                f"exclude = {_q(list(t.exclude))}"]
    for title, settings, cls in (("replication", replication, ReplicationSettings),
                                 ("heartbeat", heartbeat, HeartbeatSettings)):
        out += ["", f"[{title}]  # every key optional; see the defaults in engine/config.py"]
        defaults = cls()
        for f in fields(cls):
            value = getattr(settings, f.name) if settings is not None else getattr(defaults, f.name)
            if value != getattr(defaults, f.name):
                out.append(f"{f.name} = {_q(value)}")
    return "\n".join(out) + "\n"


def dump_node_toml(node_id: str, root: str | Path, state_dir: str | Path,
                   ca: str | Path, cert: str | Path, key: str | Path) -> str:
    """node.toml text; relative paths will resolve against the file's own directory."""
    return "\n".join([
        "# nf node configuration: which node this machine is, and its secrets.",
        "# Relative paths are relative to this file's directory.", "",
        "[node]", f"id = {_q(node_id)}", f"root = {_q(str(root))}", f"state_dir = {_q(str(state_dir))}", "",
        "[tls]", f"ca = {_q(str(ca))}", f"cert = {_q(str(cert))}", f"key = {_q(str(key))}",
    ]) + "\n"


# -- reading ------------------------------------------------------------------------------

_REQUIRED = object()


class _Reader:
    """Takes typed values out of one TOML table, then complains about any key left unread."""

    def __init__(self, file: str, prefix: str, data: object) -> None:
        if not isinstance(data, dict):
            raise ConfigError(file, prefix, "a table", data)
        self.file = file
        self.prefix = prefix
        self.data: dict[str, Any] = data
        self._read: list[str] = []

    def name(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def error(self, key: str, expected: str, got: object = None, hint: str = "") -> ConfigError:
        return ConfigError(self.file, self.name(key), expected, got, hint=hint)

    def raw(self, key: str, default: object = _REQUIRED) -> Any:
        self._read.append(key)
        if key not in self.data:
            return default
        return self.data[key]

    def text(self, key: str, expected: str, *, pattern: str | None = None, default: object = _REQUIRED) -> Any:
        value = self.raw(key, default)
        if value is _REQUIRED:
            raise self.error(key, expected + " (required)")
        if value is default:
            return value
        if not isinstance(value, str) or "\0" in value or (pattern and not re.fullmatch(pattern, value)):
            raise self.error(key, expected, value)
        return value

    def strings(self, key: str, expected: str, default: object = _REQUIRED) -> tuple[str, ...]:
        value = self.raw(key, default)
        if value is _REQUIRED:
            raise self.error(key, expected + " (required)")
        if not isinstance(value, list) or not all(isinstance(v, str) and v and "\0" not in v for v in value):
            raise self.error(key, expected, value)
        return tuple(value)

    def integer(self, key: str, default: int, ok: Any, expected: str) -> int:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not ok(value):
            raise self.error(key, expected, value)
        return value

    def number(self, key: str, default: float, ok: Any, expected: str) -> float:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
            raise self.error(key, expected, value)
        return float(value)

    def table(self, key: str, required: bool = True) -> _Reader:
        value = self.raw(key, _REQUIRED)
        if value is _REQUIRED:
            if required:
                raise self.error(key, f"a [{self.name(key)}] table (required)")
            value = {}
        return _Reader(self.file, self.name(key), value)

    def tables(self, key: str, expected: str) -> list[_Reader]:
        value = self.raw(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error(key, expected, value)
        return [_Reader(self.file, f"{self.name(key)}[{i}]", v) for i, v in enumerate(value)]

    def only(self, *known: str) -> None:
        """Refuse unknown keys up front, so a misspelt table is named rather than reported missing."""
        unknown = [k for k in self.data if k not in known]
        if unknown:
            raise self.error(unknown[0], "a known key: " + ", ".join(known),
                             hint="check the spelling; unknown keys are refused so typos are not ignored")

    def done(self) -> None:
        """Refuse any key no one asked for."""
        self.only(*self._read)


def _read_toml(file: str) -> dict[str, Any]:
    try:
        with open(file, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(file, "", "an existing, readable TOML file", exc.strerror or str(exc)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(file, "", "UTF-8 text", str(exc)) from None
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"at line (\d+)", str(exc))
        raise ConfigError(file, f"line {m.group(1)}" if m else "", "valid TOML", str(exc)) from None


def _public(r: _Reader) -> PublicIdentity:
    fqdn = r.text("fqdn", "a DNS name such as app01.example.test")
    if not _is_hostname(fqdn):
        raise r.error("fqdn", "a DNS name such as app01.example.test", fqdn)
    netbios = r.text("netbios", "a NetBIOS name of at most 15 characters [A-Z0-9-]",
                     pattern=r"[A-Z0-9-]{1,15}", default=None)
    expected = "a non-empty list of IP addresses, each optionally with /prefix"
    addresses = r.strings("addresses", expected)
    if not addresses:
        raise r.error("addresses", expected, [])
    seen: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for a in addresses:
        try:
            ip = ipaddress.ip_interface(a).ip
        except ValueError:
            raise r.error("addresses", expected, a) from None
        if ip in seen:
            raise r.error("addresses", "each address once", a)
        seen.add(ip)
    provider = r.text("provider", "one of " + ", ".join(PROVIDERS))
    if provider not in PROVIDERS:
        raise r.error("provider", "one of " + ", ".join(PROVIDERS), provider)
    r.done()
    return PublicIdentity(fqdn, netbios, addresses, provider)


def _nodes(top: _Reader, public: PublicIdentity, dns: DnsSettings | None) -> tuple[NodeSpec, ...]:
    readers = top.tables("nodes", "2 or 3 [[nodes]] tables")
    if not 2 <= len(readers) <= 3:
        raise top.error("nodes", "2 or 3 [[nodes]] tables", len(readers))
    nodes: list[NodeSpec] = []
    for r in readers:
        node_id = r.text("id", "one of " + ", ".join(NODE_IDS))
        if node_id not in NODE_IDS:
            raise r.error("id", "one of " + ", ".join(NODE_IDS), node_id)
        if any(n.id == node_id for n in nodes):
            raise r.error("id", "an id not used by another node", node_id)
        channel = r.text("channel", "host:port")
        try:
            host, port = parse_channel(channel)
        except ValueError as exc:
            raise r.error("channel", str(exc), channel) from None
        for i, other in enumerate(nodes):
            if _same_host(other.channel_host, host) and other.channel_port == port:
                raise r.error("channel", f"an address not used by nodes[{i}]", channel)
        management = r.text("management", "an IP address")
        if not _is_ip(management):
            raise r.error("management", "an IP address", management)
        label, _, domain = public.fqdn.partition(".")
        cozen = r.text("cozen", "a host name label (letters, digits, hyphens)", default=f"{label}-nf-{node_id}")
        if not re.fullmatch(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)", cozen):
            raise r.error("cozen", "a host name label (letters, digits, hyphens)", cozen)
        base_name = (public.netbios or label.upper())[:11]
        cozen_netbios = r.text("cozen_netbios", "a NetBIOS name of at most 15 characters [A-Z0-9-]",
                               pattern=r"[A-Z0-9-]{1,15}", default=f"{base_name}-NF{NODE_IDS.index(node_id) + 1}")
        zone = r.text("zone", "a DNS zone such as example.test", default=dns.zone if dns else domain)
        if zone and not _is_hostname(zone):
            raise r.error("zone", "a DNS zone such as example.test", zone)
        r.done()
        nodes.append(NodeSpec(node_id, host, port, management, cozen, cozen_netbios, zone))
    ids = sorted((n.id for n in nodes), key=NODE_IDS.index)
    if tuple(ids) != NODE_IDS[: len(ids)]:
        raise top.error("nodes", "node ids primary, secondary and optionally tertiary", ids)
    return tuple(nodes)


def _dns(r: _Reader, base: Path, public: PublicIdentity) -> DnsSettings:
    r.only("server", "port", "zone", "reverse_zones", "key_file", "ttl", "public_takeover")
    server = r.text("server", "the IP address of the DNS server that takes updates")
    if not _is_ip(server):
        raise r.error("server", "the IP address of the DNS server that takes updates", server)
    zone = r.text("zone", "a DNS zone such as example.test").rstrip(".")
    if not _is_hostname(zone):
        raise r.error("zone", "a DNS zone such as example.test", zone)
    reverse = tuple(z.rstrip(".") for z in r.strings("reverse_zones", "a list of reverse zones", default=[]))
    for z in reverse:
        if not (_is_hostname(z) and (z.endswith(".in-addr.arpa") or z.endswith(".ip6.arpa"))):
            raise r.error("reverse_zones", "zones ending in .in-addr.arpa or .ip6.arpa", z)
    key = _secret(r, "key_file", base)
    if key is None:
        raise r.error("key_file", "a path to a TSIG key file (BIND format) with mode 0600", "")
    takeover = _flag(r, "public_takeover")
    if takeover and not (public.fqdn == zone or public.fqdn.endswith("." + zone)):
        raise r.error("public_takeover", f"the public name {public.fqdn} inside zone {zone}", True)
    settings = DnsSettings(server, zone, key,
                           r.integer("port", 53, lambda v: 0 < v < 65536, "a port 1..65535"), reverse,
                           r.integer("ttl", 60, lambda v: 0 <= v <= 86400, "seconds 0..86400"), takeover)
    r.done()
    return settings


def _directory(r: _Reader, base: Path) -> DirectorySettings:
    r.only("url", "bind_dn", "password_file", "base", "ca_file", "on_remove")
    expected = "ldaps://HOST[:PORT], or ldap://HOST[:PORT] (StartTLS): never a plain bind"
    url = r.text("url", expected, pattern=r"ldaps?://[\w.\[\]:-]+(:\d{1,5})?/?")
    bind_dn = r.text("bind_dn", "a DN such as CN=nf,CN=Users,DC=example,DC=test", pattern=r"\S.*=.*")
    password = _secret(r, "password_file", base)
    if password is None:
        raise r.error("password_file", "a path to a file with mode 0600 holding the bind password", "")
    ou = r.text("base", "the DN of the OU for the computer objects, e.g. OU=nf-clones,DC=example,DC=test",
                pattern=r"(?i)OU=.+")
    settings = DirectorySettings(url, bind_dn, password, ou, _pem_file(r, "ca_file", base),
                                 r.text("on_remove", '"disable" or "delete"', pattern=r"disable|delete",
                                        default="disable"))
    r.done()
    return settings


def _netbios(r: _Reader) -> NetBiosSettings:
    r.only("port")
    settings = NetBiosSettings(r.integer("port", 137, lambda v: 0 < v < 65536, "a port 1..65535"))
    r.done()
    return settings


def _protected(top: _Reader) -> tuple[ProtectedTree, ...]:
    readers = top.tables("protected", "one or more [[protected]] tables")
    if not readers:
        raise top.error("protected", "one or more [[protected]] tables", 0)
    trees: list[ProtectedTree] = []
    for r in readers:
        expected = "an absolute, normalised directory path other than /"
        raw = r.text("path", expected)
        path = raw.rstrip("/") if raw != "/" else raw
        if not path.startswith("/") or path.startswith("//") or path == "/" or posixpath.normpath(path) != path:
            raise r.error("path", expected, raw)
        include = r.strings("include", "a list of glob patterns", default=[])
        exclude = r.strings("exclude", "a list of glob patterns", default=[])
        for key, patterns in (("include", include), ("exclude", exclude)):
            bad = [p for p in patterns if not p.rstrip("/")]
            if bad:
                raise r.error(key, "a list of glob patterns", bad[0])
        for i, other in enumerate(trees):
            if path == other.path or path.startswith(other.path + "/") or other.path.startswith(path + "/"):
                raise r.error("path", f"a tree that does not overlap protected[{i}].path ({other.path})", raw)
        r.done()
        trees.append(ProtectedTree(path, include, exclude))
    return tuple(trees)


def _replication(r: _Reader) -> ReplicationSettings:
    d = ReplicationSettings()
    block = r.integer("block_size", d.block_size,
                      lambda v: 4096 <= v <= 4 << 20 and v & (v - 1) == 0,
                      "a power of two from 4096 to 4194304")
    compression = r.text("compression", "one of " + ", ".join(COMPRESSIONS), default=d.compression)
    if compression not in COMPRESSIONS:
        raise r.error("compression", "one of " + ", ".join(COMPRESSIONS), compression)
    level = r.integer("compression_level", d.compression_level, lambda v: 1 <= v <= 19, "an integer 1..19")
    rescan = r.number("rescan_interval", d.rescan_interval, lambda v: v > 0, "seconds, more than 0")
    least = max(2 * block, MIN_FRAME_BYTES)
    frame = r.integer("max_frame_bytes", d.max_frame_bytes, lambda v: v >= least,
                      f"at least {least} (1 MiB, and 2 * block_size)")
    queue = r.integer("send_queue_max_bytes", d.send_queue_max_bytes, lambda v: v >= frame,
                      f"at least max_frame_bytes ({frame})")
    coalesce = r.integer("coalesce_ms", d.coalesce_ms, lambda v: 0 <= v <= 10000, "an integer 0..10000")
    r.done()
    return ReplicationSettings(block, compression, level, rescan, queue, frame, coalesce)


def _heartbeat(r: _Reader) -> HeartbeatSettings:
    d = HeartbeatSettings()
    interval = r.number("interval", d.interval, lambda v: v > 0, "seconds, more than 0")
    timeout = r.number("failover_timeout", d.failover_timeout, lambda v: v > 2 * interval,
                       f"seconds, more than 2 * interval ({2 * interval:g})")
    expected = 'a list of probe targets like "tcp:192.0.2.1:53" or "icmp:192.0.2.254"'
    probes = r.strings("probes", expected, default=[])
    for i, text in enumerate(probes):
        try:
            parse_target(text)
        except ValueError as exc:
            raise r.error(f"probes[{i}]", f"{exc} (a gateway or DNS server on the public network)", text) from None
    r.done()
    return HeartbeatSettings(interval, timeout, probes)


def _applications(top: _Reader) -> tuple[Application, ...]:
    apps = []
    for a in top.tables("applications", "a list of [[applications]] tables"):
        a.only("name", "unit", "start", "stop", "monitor", "order", "timeout", "restarts", "on_failure",
               "monitor_interval")
        name = a.text("name", "an application name matching [A-Za-z0-9_.-]{1,64}", pattern=r"[A-Za-z0-9_.-]{1,64}")
        unit = a.text("unit", "a systemd unit name like nginx.service", pattern=r"[A-Za-z0-9@_.:-]+", default="")
        if unit:  # the shortcut for all three commands
            start, stop, monitor = (f"systemctl start {unit}", f"systemctl stop {unit}",
                                    f"systemctl is-active --quiet {unit}")
        else:
            start = a.text("start", "a shell command (or give unit = ...)")
            stop = a.text("stop", "a shell command (or give unit = ...)")
            monitor = a.text("monitor", "a shell command exiting 0 while healthy (or give unit = ...)")
        d = Application(name, start, stop, monitor)
        apps.append(Application(
            name, start, stop, monitor,
            a.integer("order", d.order, lambda v: v >= 0, "an integer 0 or more"),
            a.number("timeout", d.timeout, lambda v: v > 0, "seconds, more than 0"),
            a.integer("restarts", d.restarts, lambda v: v >= 0, "an integer 0 or more"),
            a.text("on_failure", '"switchover" or "alert"', pattern=r"switchover|alert", default=d.on_failure),
            a.number("monitor_interval", d.monitor_interval, lambda v: v > 0, "seconds, more than 0"),
        ))
        a.done()
    names = [app.name for app in apps]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise top.error("applications", "unique application names", dup)
    return tuple(sorted(apps, key=lambda app: app.order))


def _alerts(r: _Reader, base: Path) -> AlertSettings:
    r.only("rate_limit", "email", "webhook", "syslog")
    rate = r.number("rate_limit", AlertSettings.rate_limit, lambda v: v >= 0, "seconds, 0 or more")
    email = webhook = None
    if "email" in r.data:
        e = r.table("email")
        e.only("host", "port", "from", "to", "starttls", "username", "password_file", "ca_file")
        email = EmailAlerts(
            e.text("host", "the SMTP server's host name or address"),
            e.integer("port", 25, lambda v: 0 < v < 65536, "a port 1..65535"),
            e.text("from", "a sender address like nf@example.com", pattern=r"[^@\s]+@[^@\s]+"),
            e.strings("to", "a list of recipient addresses"),
            _flag(e, "starttls"),
            e.text("username", "a login name", default=""),
            _secret(e, "password_file", base),
            _pem_file(e, "ca_file", base),
        )
        if not email.recipients:
            raise e.error("to", "at least one recipient address", [])
        e.done()
    if "webhook" in r.data:
        w = r.table("webhook")
        w.only("url", "token_file")
        webhook = WebhookAlerts(w.text("url", "an http:// or https:// URL", pattern=r"https?://\S+"),
                                _secret(w, "token_file", base))
        w.done()
    syslog = _syslog(r)
    r.done()
    return AlertSettings(rate, email, webhook, syslog)


def _syslog(r: _Reader) -> str:
    expected = 'true (the local /dev/log), a Unix socket path, or "HOST:PORT" of a syslog server (UDP)'
    value = r.raw("syslog", False)
    if isinstance(value, bool):
        return "/dev/log" if value else ""
    if isinstance(value, str) and (value.startswith("/") or re.fullmatch(r"[\w.:\[\]-]+:\d{1,5}", value)):
        return value
    raise r.error("syslog", expected, value)


def _flag(r: _Reader, key: str) -> bool:
    value = r.raw(key, False)
    if not isinstance(value, bool):
        raise r.error(key, "true or false", value)
    return value


def _pem_file(r: _Reader, key: str, base: Path) -> Path | None:
    value = r.text(key, "a path to a PEM file of CA certificates", default="")
    if not value:
        return None
    path = _resolve(base, value)
    if not path.is_file():
        raise r.error(key, "a path to a PEM file of CA certificates (no such file)", value)
    return path


def _secret(r: _Reader, key: str, base: Path) -> Path | None:
    """A secret lives in a file only the agent's user can read; never inline in the config."""
    value = r.text(key, "a path to a file with mode 0600", default="")
    if not value:
        return None
    path = _resolve(base, value)
    try:
        mode = path.stat().st_mode
    except OSError:
        raise r.error(key, "an existing file with mode 0600", str(path)) from None
    if mode & 0o077:
        raise r.error(key, "a file with mode 0600 (no group or other access)", f"{str(path)} mode {mode & 0o777:o}",
                      hint=f"chmod 600 {path}")
    return path


def _check_key_mode(tls: _Reader, key: Path) -> None:
    try:
        st = key.stat()
    except OSError as exc:
        raise tls.error("key", "an existing private key file", f"{key}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise tls.error("key", "a regular file", str(key))
    if st.st_mode & 0o077:
        raise tls.error("key", "mode 0600 (no group or other permissions)",
                        f"{key} has mode {stat.S_IMODE(st.st_mode):04o}", hint=f"chmod 600 {key}")


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return Path(os.path.normpath(p if p.is_absolute() else base / p))


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _is_hostname(value: str) -> bool:
    label = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
    return len(value) <= 253 and re.fullmatch(rf"{label}(\.{label})*", value) is not None


def _same_host(a: str, b: str) -> bool:
    if _is_ip(a) and _is_ip(b):
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    return a.lower() == b.lower()


@dataclass(frozen=True)
class _Pattern:
    glob: str
    dir_only: bool  # pattern ended in "/"
    whole_path: bool  # pattern contains "/": match the whole relative path, else the basename

    def matches(self, rel: str, is_dir: bool) -> bool:
        if self.dir_only and not is_dir:
            return False
        subject = rel if self.whole_path else rel.rsplit("/", 1)[-1]
        return fnmatch.fnmatchcase(subject, self.glob)


@functools.lru_cache(maxsize=256)
def _compile(patterns: tuple[str, ...]) -> tuple[_Pattern, ...]:
    out = []
    for p in patterns:
        dir_only = p.endswith("/")
        body = p.rstrip("/")
        whole = "/" in body
        out.append(_Pattern(body.lstrip("/") if whole else body, dir_only, whole))
    return tuple(out)


# -- writing ------------------------------------------------------------------------------

def _q(value: object) -> str:
    """A TOML literal for a str, int, float or list of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"TOML cannot hold {value!r} here")
        return repr(value)
    if isinstance(value, str):
        return '"' + "".join(_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c)
                             for c in value) + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_q(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
