"""`nf init`: write a new cluster's configuration, CA and node certificates."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from engine.errors import NfError
from nftui.output import console, errors


def init(
    directory: Annotated[Path, typer.Option("--dir", help="Where to write cluster.toml and one directory per node.")],
    public_fqdn: Annotated[str, typer.Option("--public-fqdn", help="The cluster's public name.")],
    public_address: Annotated[list[str], typer.Option("--public-address", help="Public IP address (repeat for several).")],
    node: Annotated[list[str], typer.Option("--node", help="ID=CHANNEL_HOST:PORT,MANAGEMENT_IP (repeat per node).")],
    name: Annotated[str, typer.Option("--name", help="Cluster name.")] = "nf",
    protect: Annotated[list[str], typer.Option("--protect", help="A protected tree (repeat).")] = ["/srv/data"],
    root: Annotated[Path, typer.Option("--root", help="Root prefix on each node.")] = Path("/"),
    state_dir: Annotated[Path, typer.Option("--state-dir", help="State directory on each node.")] = Path("/var/lib/nf"),
    provider: Annotated[str, typer.Option("--provider", help="Public identity provider: linux or local.")] = "linux",
) -> None:
    """Write cluster.toml, a cluster CA and a certificate per node (secrets mode 0600)."""
    from engine.init import init_cluster

    with errors(False):
        plans = [_plan(spec, root, state_dir) for spec in node]
        path = init_cluster(directory, name, public_fqdn, public_address, plans, protected=protect, provider=provider)
    console.print(f"wrote {path}; copy {directory}/<node>/ and cluster.toml to each node, then run "
                  f"nf agent --config /path/to/node.toml")


def _plan(spec: str, root: Path, state_dir: Path):  # type: ignore[no-untyped-def]
    from engine.init import NodePlan

    try:
        node_id, rest = spec.split("=", 1)
        channel, management = rest.split(",", 1)
    except ValueError:
        raise NfError(f"--node {spec!r}: expected ID=CHANNEL_HOST:PORT,MANAGEMENT_IP",
                      hint="for example --node primary=10.0.0.1:7780,10.0.1.1") from None
    return NodePlan(id=node_id, channel=channel, management=management, root=root, state_dir=state_dir)
