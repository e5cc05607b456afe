"""`nf init`: a new cluster's configuration, CA and node certificates, all at once.

Everything is first written to a staging directory and loaded back through `engine.config`,
so init never leaves behind a configuration its own loader rejects, nor half a cluster: the
files are moved into place only after every one of them has been accepted, cluster.toml last.

Layout written under `outdir`:

    cluster.toml  ca.pem  ca.key (0600)
    <node>/node.toml  <node>/tls/{ca.pem, node.pem, node.key (0600)}
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from engine.config import (NodeSpec, ProtectedTree, PublicIdentity, dump_cluster_toml, dump_node_toml,
                           load_cluster, load_node, parse_channel)
from engine.errors import ConfigError, NfError
from engine.pki import make_ca, make_node_cert, write_public, write_secret

T = TypeVar("T")


@dataclass(frozen=True)
class NodePlan:
    """One node to create. Relative `root`/`state_dir` are relative to the current directory."""

    id: str
    channel: str  # host:port
    management: str  # IP address
    root: Path
    state_dir: Path


def init_cluster(outdir: Path, name: str, public_fqdn: str, public_addresses: list[str],
                 nodes: list[NodePlan], protected: Sequence[str] = ("/srv/data",),
                 provider: str = "local", netbios: str | None = None) -> Path:
    """Write a new cluster under `outdir` and return the path of its cluster.toml.

    Refuses to touch an existing cluster: its CA key would be replaced and every node's
    certificate orphaned.
    """
    outdir = Path(outdir).absolute()
    cluster_toml = outdir / "cluster.toml"
    if cluster_toml.exists():
        raise NfError(f"{cluster_toml} already exists",
                      hint="choose another directory, or remove the old cluster first (its CA key is lost with it)")
    targets = [outdir / "ca.pem", outdir / "ca.key"]
    for plan in nodes:
        targets += [outdir / plan.id / "node.toml", outdir / plan.id / "tls"]
    for target in targets:
        if target.exists() or target.is_symlink():
            raise NfError(f"{target} already exists", hint="nf init writes only into a fresh directory")
    outdir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".nf-init-", dir=outdir))
    try:
        _write(stage, outdir, name, public_fqdn, public_addresses, nodes, protected, provider, netbios)
        _move(stage, outdir, [plan.id for plan in nodes])
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return cluster_toml


def _write(stage: Path, outdir: Path, name: str, fqdn: str, addresses: list[str], nodes: list[NodePlan],
           protected: Sequence[str], provider: str, netbios: str | None) -> None:
    """Write everything into `stage` and load it back; errors name the final paths."""
    specs = []
    for i, plan in enumerate(nodes):
        try:
            host, port = parse_channel(plan.channel)
        except ValueError as exc:
            raise ConfigError(str(outdir / "cluster.toml"), f"nodes[{i}].channel", str(exc), plan.channel) from None
        specs.append(NodeSpec(plan.id, host, port, plan.management))
    public = PublicIdentity(fqdn, netbios, tuple(addresses), provider)
    trees = [ProtectedTree(p) for p in protected]
    write_public(stage / "cluster.toml", dump_cluster_toml(name, public, specs, trees).encode())
    cluster = _checked(stage, outdir, lambda: load_cluster(stage / "cluster.toml"))

    ca_cert, ca_key = make_ca(cluster.name)
    write_secret(stage / "ca.key", ca_key)
    write_public(stage / "ca.pem", ca_cert)
    for plan in nodes:
        spec = cluster.node(plan.id)
        node_dir = stage / plan.id
        (node_dir / "tls").mkdir(mode=0o700, parents=True)
        cert, key = make_node_cert(ca_cert, ca_key, plan.id, cluster.name, [spec.management, spec.channel_host])
        write_secret(node_dir / "tls" / "node.key", key)
        write_public(node_dir / "tls" / "node.pem", cert)
        write_public(node_dir / "tls" / "ca.pem", ca_cert)
        final_dir = outdir / plan.id
        text = dump_node_toml(plan.id, _relative_to(plan.root, final_dir), _relative_to(plan.state_dir, final_dir),
                              "tls/ca.pem", "tls/node.pem", "tls/node.key")
        write_public(node_dir / "node.toml", text.encode())
        _checked(stage, outdir, lambda: load_node(node_dir / "node.toml", cluster))


def _move(stage: Path, outdir: Path, node_ids: list[str]) -> None:
    """Move the accepted files into place; cluster.toml last, as it marks a finished init."""
    os.rename(stage / "ca.key", outdir / "ca.key")
    os.rename(stage / "ca.pem", outdir / "ca.pem")
    for node_id in node_ids:
        (outdir / node_id).mkdir(exist_ok=True)
        os.rename(stage / node_id / "tls", outdir / node_id / "tls")
        os.rename(stage / node_id / "node.toml", outdir / node_id / "node.toml")
    os.rename(stage / "cluster.toml", outdir / "cluster.toml")


def _checked(stage: Path, outdir: Path, load: Callable[[], T]) -> T:
    """Run a loader on staged files; a rejection is reported against the file's final path."""
    try:
        return load()
    except ConfigError as exc:
        final = str(exc.file).replace(str(stage), str(outdir), 1)
        raise ConfigError(final, exc.field, exc.expected, exc.got,
                          hint=exc.hint or "nf init wrote nothing; fix the argument and run it again") from None


def _relative_to(path: Path, node_dir: Path) -> str:
    """A path inside the node's directory is written relative to it, so the directory can move."""
    absolute = Path(os.path.abspath(path))
    if absolute.is_relative_to(node_dir):
        return os.path.relpath(absolute, node_dir)
    return str(absolute)
